"""The edge SDK: everything a device runs, and nothing of the server's.

It imports only ``schemas`` (the wire contract) and ``modeling`` (the shared model/LoRA layer), never
``services``, and holds no server credential: a device talks to the personalization service over HTTPS
only (``PFI_EDGE_SERVICE_URL``).

* :mod:`clients.settings` — :class:`~clients.settings.EdgeSettings` (``PFI_EDGE_*``).
* :mod:`clients.enrollment` — :func:`~clients.enrollment.enroll` with an enrollment token,
  :func:`~clients.enrollment.refresh_token` with a key proof, :class:`~clients.enrollment.DeviceIdentity`
  (the stored credential + a fresh device token on demand); :mod:`clients.credentials` stores it (0600).
* :mod:`clients.http_source` — :class:`~clients.http_source.HttpGlobalSource`: spec and global adapter
  (digest-checked), personal adapter upload.
* :mod:`clients.updates` — :func:`~clients.updates.build_update` (signed) and
  :func:`~clients.updates.update_messages` (framed, signed chunks).
* :mod:`clients.uploader` — :class:`~clients.uploader.HttpUpdateSender`: the ingest route.
* :mod:`clients.outbox` — durable :class:`~clients.outbox.Outbox` and
  :class:`~clients.outbox.OutboxPublisher` (retries, back-off, rejected updates set aside).
* :mod:`clients.agent` — :class:`~clients.agent.EdgeAgent` (fetch -> train -> clip/DP -> sign -> send);
  :mod:`clients.training`, :mod:`clients.privacy`, :mod:`clients.personal`, :mod:`clients.data`.
* :mod:`clients.commands` — ``pfi edge run | flush``.
"""
