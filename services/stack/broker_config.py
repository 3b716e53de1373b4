"""The local Kafka broker's files: paths, the principals' SCRAM credentials, the KRaft config and the storage
format (with the SCRAM users), and the check whether a formatted storage must be re-formatted
(:func:`auth_outdated`, :func:`reset_storage`). See :mod:`services.stack.broker` for the security set-up;
that module resolves the jars and Java, prepares and probes the process.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.errors import StackError
from services.settings import PFISettings
from services.stack.topics import broker_message_max_bytes
from services.transport import PRINCIPALS, load_credentials

Echo = Callable[[str], None]

#: The SCRAM mechanism of the client listener (aiokafka supports SCRAM-SHA-256/512).
SCRAM_MECHANISM = "SCRAM-SHA-512"
#: Bumped when the broker's security set-up changes in a way that needs a re-format.
AUTH_SCHEME = 1


@dataclass(frozen=True)
class KafkaPaths:
    """Where the local broker keeps its files."""

    root: Path  # <stack_dir>/kafka
    config: Path  # server.properties
    log4j: Path
    data: Path  # log.dirs (and the KRaft metadata log)
    pidfile: Path
    cluster_id: Path
    auth_stamp: Path  # which credentials the storage was formatted with (see auth_outdated)
    log: Path  # stdout/stderr of the JVM (log4j console appender)
    cache: Path  # <cache_dir>/kafka-<version>
    libs: Path


def kafka_paths(settings: PFISettings) -> KafkaPaths:
    root = settings.stack_dir / "kafka"
    cache = settings.cache_dir / f"kafka-{settings.kafka_version}"
    return KafkaPaths(
        root=root,
        config=root / "server.properties",
        log4j=root / "log4j.properties",
        data=root / "data",
        pidfile=root / "kafka.pid",
        cluster_id=root / "cluster.id",
        auth_stamp=root / "auth.json",
        log=settings.log_dir / "kafka.log",
        cache=cache,
        libs=cache / "libs",
    )


# --------------------------------------------------------------------------------------------- jars


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -------------------------------------------------------------------------------------- credentials


def ensure_credentials(settings: PFISettings) -> dict[str, str]:
    """The principals' passwords: read from the credentials file, missing ones generated (mode 0600)."""
    path = settings.kafka_credentials_path
    with _locked(path.with_name(path.name + ".lock")):
        current = load_credentials(path)
        if all(name in current for name in PRINCIPALS):
            return current
        merged: dict[str, str] = {name: secrets.token_urlsafe(24) for name in PRINCIPALS}
        merged.update(current)
        partial = path.with_name(path.name + ".partial")
        partial.unlink(missing_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(merged, out, indent=2, sort_keys=True)
            out.write("\n")
        partial.replace(path)
        return merged


def _credentials_digest(credentials: Mapping[str, str]) -> str:
    blob = json.dumps({k: credentials[k] for k in PRINCIPALS}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _auth_stamp(credentials: Mapping[str, str]) -> dict[str, Any]:
    return {
        "scheme": AUTH_SCHEME,
        "mechanism": SCRAM_MECHANISM,
        "credentials": _credentials_digest(credentials),
    }


def auth_outdated(settings: PFISettings) -> str | None:
    """Why this stack's formatted storage must be re-formatted for authentication; ``None`` when it is fine.

    Storage formatted without SCRAM users (by a PFI that ran Kafka unauthenticated), or with other
    passwords than the credentials file holds now, cannot authenticate anyone."""
    paths = kafka_paths(settings)
    if _formatted_cluster_id(paths) is None:
        return None  # not formatted yet: the next start formats it with the users
    try:
        stamp = json.loads(paths.auth_stamp.read_text())
    except (OSError, ValueError):
        return "its storage was formatted without SASL/SCRAM users (unauthenticated broker)"
    credentials = load_credentials(settings.kafka_credentials_path)
    if not all(name in credentials for name in PRINCIPALS):
        return f"the credentials file {settings.kafka_credentials_path} is missing or incomplete"
    if stamp != _auth_stamp(credentials):
        return "its SCRAM users were created with other passwords or an older security set-up"
    return None


def reset_storage(settings: PFISettings) -> None:
    """Deletes the broker's data (topics, offsets, metadata) so that the next start formats it afresh."""
    paths = kafka_paths(settings)
    shutil.rmtree(paths.data, ignore_errors=True)
    paths.auth_stamp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- config


def server_properties(settings: PFISettings, credentials: Mapping[str, str]) -> str:
    """The broker's config; holds the admin password (the file is written with mode 0600)."""
    paths = kafka_paths(settings)
    max_bytes = broker_message_max_bytes(settings)
    kp, cp = settings.kafka_port, settings.kafka_controller_port
    admin = credentials["admin"]
    scram_login = "org.apache.kafka.common.security.scram.ScramLoginModule"
    plain_login = "org.apache.kafka.common.security.plain.PlainLoginModule"
    lines = {
        # KRaft, one node that is both broker and controller.
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{cp}",
        # Loopback only, so SASL without TLS is acceptable here. A listener that leaves the host must be
        # SASL_SSL (the passwords and all records would otherwise cross the network in clear text).
        "listeners": f"CLIENT://127.0.0.1:{kp},CONTROLLER://127.0.0.1:{cp}",
        "advertised.listeners": f"CLIENT://127.0.0.1:{kp}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "CLIENT",
        "listener.security.protocol.map": "CLIENT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT",
        # Clients and inter-broker traffic: SCRAM-SHA-512; the broker itself is the admin principal.
        "sasl.enabled.mechanisms": SCRAM_MECHANISM,
        "sasl.mechanism.inter.broker.protocol": SCRAM_MECHANISM,
        "listener.name.client.sasl.enabled.mechanisms": SCRAM_MECHANISM,
        f"listener.name.client.{SCRAM_MECHANISM.lower()}.sasl.jaas.config": (
            f'{scram_login} required username="admin" password="{admin}";'
        ),
        # Broker -> controller: PLAIN with one static user (SCRAM is not available on KRaft controllers).
        "sasl.mechanism.controller.protocol": "PLAIN",
        "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
        "listener.name.controller.plain.sasl.jaas.config": (
            f'{plain_login} required username="admin" password="{admin}" user_admin="{admin}";'
        ),
        # Nobody may do anything without an ACL; admin (the broker, topic/ACL management) is a super user.
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found": "false",
        "super.users": "User:admin",
        "log.dirs": str(paths.data),
        # Topics are created explicitly (services/stack/topics.py).
        "auto.create.topics.enable": "false",
        "num.partitions": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "10",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "4",
        "group.initial.rebalance.delay.ms": "0",
        # Size limits: the topics' max.message.bytes is the effective one.
        "message.max.bytes": str(max_bytes),
        "replica.fetch.max.bytes": str(max_bytes),
        "replica.fetch.response.max.bytes": str(max(10 * 1024 * 1024, max_bytes)),
        # A 2-core box: few threads.
        "num.network.threads": "2",
        "num.io.threads": "2",
        "num.replica.fetchers": "1",
        "num.recovery.threads.per.data.dir": "1",
        "background.threads": "2",
        "log.cleaner.threads": "1",
        "log.cleaner.dedupe.buffer.size": str(8 * 1024 * 1024),
        "log.segment.bytes": str(256 * 1024 * 1024),
        "log.retention.hours": "168",
        "log.retention.check.interval.ms": "60000",
        "delete.topic.enable": "true",
    }
    header = "# Generated by `pfi stack up` (services/stack/broker.py); rewritten on every start.\n"
    return header + "".join(f"{key}={value}\n" for key, value in lines.items())


def log4j_properties() -> str:
    return (
        "# Generated by `pfi stack up`: everything to stdout, which is redirected to kafka.log.\n"
        "log4j.rootLogger=WARN, stdout\n"
        "log4j.appender.stdout=org.apache.log4j.ConsoleAppender\n"
        "log4j.appender.stdout.layout=org.apache.log4j.PatternLayout\n"
        "log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
        "log4j.logger.kafka.Kafka$=INFO\n"
        "log4j.logger.kafka.server.KafkaRaftServer=INFO\n"
        "log4j.logger.kafka.server.BrokerServer=INFO\n"
        "log4j.logger.kafka.server.ControllerServer=INFO\n"
        "log4j.logger.kafka.server.BrokerLifecycleManager=INFO\n"
        "log4j.logger.kafka.request.logger=WARN\n"
        "log4j.logger.state.change.logger=WARN\n"
    )


def new_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (22 characters).

    Never starts with ``-``: ``kafka-storage format -t -x…`` reads such an id as an option and fails (one id
    in 64 would), which is why Kafka's own ``Uuid.randomUuid`` draws again in that case too."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if usable_cluster_id(cluster_id):
            return cluster_id


def usable_cluster_id(cluster_id: str) -> bool:
    """Whether the storage tool can take ``cluster_id`` as its ``-t`` argument."""
    return bool(cluster_id) and not cluster_id.startswith("-")


def _formatted_cluster_id(paths: KafkaPaths) -> str | None:
    meta = paths.data / "meta.properties"
    if not meta.is_file():
        return None
    for line in meta.read_text().splitlines():
        if line.startswith("cluster.id="):
            return line.split("=", 1)[1].strip()
    return None


def write_config(settings: PFISettings, credentials: Mapping[str, str]) -> KafkaPaths:
    paths = kafka_paths(settings)
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.data.mkdir(parents=True, exist_ok=True)
    paths.log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when an older (world-readable) file is rewritten
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(server_properties(settings, credentials))
    paths.log4j.write_text(log4j_properties())
    return paths


def jvm_options(settings: PFISettings, paths: KafkaPaths) -> list[str]:
    return [
        f"-Xmx{settings.kafka_heap}",
        f"-Xms{settings.kafka_heap}",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dlog4j.configuration=file:{paths.log4j}",
        f"-Dkafka.logs.dir={paths.log.parent}",
        "-cp",
        f"{paths.libs}/*",
    ]


def format_storage(
    settings: PFISettings, java: str, credentials: Mapping[str, str], echo: Echo = print
) -> None:
    """``StorageTool format`` once (the data folder keeps ``meta.properties`` afterwards), with a SCRAM
    credential for every principal."""
    paths = kafka_paths(settings)
    if _formatted_cluster_id(paths) is not None:
        return
    stored = paths.cluster_id.read_text().strip() if paths.cluster_id.is_file() else ""
    if usable_cluster_id(stored):
        cluster_id = stored
    else:  # none yet, or one written before ids starting with "-" were refused (the storage is unformatted)
        cluster_id = new_cluster_id()
        paths.cluster_id.write_text(cluster_id + "\n")
    echo(f"kafka: formatting storage in {paths.data} (cluster id {cluster_id})")
    with paths.log.open("a") as log_file:
        log_file.write(f"\n===== pfi stack: formatting {paths.data} (cluster id {cluster_id})\n")
    cmd = [
        java,
        *jvm_options(settings, paths)[2:],  # the tool needs no big heap
        "-Xmx256m",
        "kafka.tools.StorageTool",
        "format",
        "-t",
        cluster_id,
        "-c",
        str(paths.config),
        "--ignore-formatted",
    ]
    for name in PRINCIPALS:  # passwords are URL-safe base64: no ',', '[' or ']' to escape
        cmd += ["--add-scram", f"{SCRAM_MECHANISM}=[name={name},password={credentials[name]}]"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise StackError(f"kafka storage format failed: {err}") from err
    with paths.log.open("a") as log_file:
        log_file.write(out.stdout + out.stderr)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
        raise StackError(f"kafka storage format failed (exit {out.returncode}): {' | '.join(tail)}")
    paths.auth_stamp.write_text(json.dumps(_auth_stamp(credentials), indent=2) + "\n")
