"""How every service process connects to Kafka: one place for bootstrap servers, SASL and TLS.

``kafka_kwargs(settings, principal)`` returns the keyword arguments of ``AIOKafkaProducer``,
``AIOKafkaConsumer``, ``AIOKafkaAdminClient`` and ``AIOKafkaClient`` for one of the service principals
(``admin``, ``aggregator``, ``ingest``, ``serving``). No PFI code builds a Kafka client without it.

Where the credentials come from, first match wins:

1. ``PFI_KAFKA_<PRINCIPAL>_USERNAME`` / ``..._PASSWORD`` (aggregator, ingest, serving): that principal's
   identity, for a process that uses several (the personalization pod serves and ingests).
2. ``PFI_KAFKA_SASL_USERNAME`` / ``PFI_KAFKA_SASL_PASSWORD``: this process's one identity (in Kubernetes
   each Deployment gets the secret of its Strimzi ``KafkaUser``); ``principal`` is then only a label.
3. The credentials file (``PFI_KAFKA_CREDENTIALS_FILE``, default ``<PFI_HOME>/stack/kafka-credentials.json``,
   mode 0600, ``{"admin": "...", "aggregator": "...", ...}``): written once by ``pfi stack up`` for the
   local broker, which knows these users (SCRAM credentials added when its storage is formatted).

``PFI_KAFKA_SECURITY_PROTOCOL=PLAINTEXT`` turns authentication off (an unsecured external broker).
"""

from __future__ import annotations

import json
import os
import ssl
from pathlib import Path
from typing import Any, Final, Literal

from schemas.errors import ConfigError
from services.settings import PFISettings

Principal = Literal["admin", "aggregator", "ingest", "serving"]

#: Every service principal; ``admin`` is the broker's super user (topics, ACLs, tests' raw access).
PRINCIPALS: Final[tuple[Principal, ...]] = ("admin", "aggregator", "ingest", "serving")


def load_credentials(path: Path) -> dict[str, str]:
    """``{principal: password}`` from a credentials file; ``{}`` when it does not exist."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise ConfigError(f"cannot read the Kafka credentials file {path}: {err}") from err
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"the Kafka credentials file {path} is not JSON: {err}") from err
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in data.items()
    ):
        raise ConfigError(f"the Kafka credentials file {path} must map principal names to passwords")
    return dict(data)


def sasl_credentials(settings: PFISettings, principal: Principal) -> tuple[str, str]:
    """(username, password) that ``principal`` authenticates with (see the module docstring)."""
    pairs = [("SASL", settings.kafka_sasl_username, settings.kafka_sasl_password)]
    if principal != "admin":
        own = (
            getattr(settings, f"kafka_{principal}_username"),
            getattr(settings, f"kafka_{principal}_password"),
        )
        pairs.insert(0, (principal.upper(), *own))
    for name, username, password in pairs:
        if username is None and password is None:
            continue
        if not username or not password:
            raise ConfigError(f"set both PFI_KAFKA_{name}_USERNAME and PFI_KAFKA_{name}_PASSWORD, or neither")
        return username, password
    path = settings.kafka_credentials_path
    password = load_credentials(path).get(principal)
    if password is None:
        raise ConfigError(
            f"no Kafka credentials for principal {principal!r}: set PFI_KAFKA_SASL_USERNAME / "
            f"PFI_KAFKA_SASL_PASSWORD, or run `pfi stack up` (writes {path}), or point "
            "PFI_KAFKA_CREDENTIALS_FILE at the credentials of this broker"
        )
    return principal, password


def ssl_context(settings: PFISettings) -> ssl.SSLContext:
    """Verifies the broker's certificate and host name (``kafka_ssl_cafile``, else the system CAs)."""
    cafile = settings.kafka_ssl_cafile
    if cafile is not None and not cafile.is_file():
        raise ConfigError(f"PFI_KAFKA_SSL_CAFILE {cafile} does not exist")
    context = ssl.create_default_context(cafile=str(cafile) if cafile is not None else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def kafka_kwargs(settings: PFISettings, principal: Principal) -> dict[str, Any]:
    """Connection arguments for ``principal`` (bootstrap servers, security protocol, SASL, TLS)."""
    protocol = settings.kafka_security_protocol
    kwargs: dict[str, Any] = {"bootstrap_servers": settings.kafka_bootstrap(), "security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = ssl_context(settings)
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        username, password = sasl_credentials(settings, principal)
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = username
        kwargs["sasl_plain_password"] = password
    return kwargs


def kafka_env(settings: PFISettings) -> dict[str, str]:
    """``PFI_KAFKA_*`` variables for a child process that must reach the same Kafka with the same credentials

    (also when the child gets another ``PFI_HOME``): bootstrap servers, protocol, mechanism, the absolute
    path of the credentials file, and the explicit username/password or CA file when set."""
    env = {
        "PFI_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap(),
        "PFI_KAFKA_SECURITY_PROTOCOL": settings.kafka_security_protocol,
        "PFI_KAFKA_SASL_MECHANISM": settings.kafka_sasl_mechanism,
        "PFI_KAFKA_CREDENTIALS_FILE": os.path.abspath(settings.kafka_credentials_path),
    }
    for who in ("sasl", "aggregator", "ingest", "serving"):
        for part in ("username", "password"):
            value = getattr(settings, f"kafka_{who}_{part}")
            if value is not None:
                env[f"PFI_KAFKA_{who.upper()}_{part.upper()}"] = value
    if settings.kafka_ssl_cafile is not None:
        env["PFI_KAFKA_SSL_CAFILE"] = os.path.abspath(settings.kafka_ssl_cafile)
    return env
