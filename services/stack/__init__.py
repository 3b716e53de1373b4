"""The local stack: a real Apache Kafka broker (KRaft) and a real Redis server on loopback.

``pfi stack up | down | status`` (:mod:`services.stack.commands`) drive :mod:`services.stack.manager`
(the orchestration) over :mod:`services.stack.components` (what Kafka and Redis are) and
:mod:`services.stack.processes` (process control, shared with the demo, benchmarks, chaos and tests);
:mod:`services.stack.topics` creates the PFI topics and holds the message-size limits every Kafka
client should use.
"""
