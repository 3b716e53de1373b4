"""The server side of device uploads: the HTTPS ingest route and the one Kafka producer of updates.

Devices never talk to Kafka: they POST each framed message to ``/v1/federations/{fed}/updates``
(:mod:`services.ingest.routes`); the route authenticates the device, checks the message's identity and
signature and produces it with the ``ingest`` Kafka principal (:mod:`services.ingest.producer`).
"""
