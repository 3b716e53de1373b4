"""The local Apache Kafka broker: jars from Maven Central, a KRaft config, storage format, health.

Single node, combined broker + controller, loopback only, no ZooKeeper. Authenticated and authorized:

* the client listener (``CLIENT``, also the inter-broker one) is SASL_PLAINTEXT with SCRAM-SHA-512 on
  127.0.0.1. Plain text is acceptable only because it never leaves the host: a listener reachable from
  other hosts must be SASL_SSL (TLS), as the Strimzi listeners in ``k8s/`` are;
* the controller listener is SASL_PLAINTEXT with PLAIN and one static user, ``admin`` (KRaft cannot use
  SCRAM there: the SCRAM credentials live in the metadata log the controller serves);
* ``StandardAuthorizer`` with ``allow.everyone.if.no.acl.found=false`` and ``super.users=User:admin``;
  the other principals get per-topic ACLs from :mod:`services.stack.acls`;
* the principals (``services.transport.PRINCIPALS``) get random passwords, generated once into the
  credentials file (``settings.kafka_credentials_path``, mode 0600) and added as SCRAM credentials when
  the storage is formatted (``StorageTool format --add-scram``). A stack formatted without them (an older
  PFI, or regenerated passwords) is detected by :func:`auth_outdated` and re-formatted by ``pfi stack up``.

The jars are resolved by ``mvn`` through ``scripts/kafka/pom.xml`` into
``<cache_dir>/kafka-<version>/libs`` (outside the checkout, reused once complete).
:mod:`services.stack.manager` starts and stops the process.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError

from schemas.errors import ConfigError, StackError
from services.settings import PFISettings
from services.stack.topics import broker_message_max_bytes
from services.transport import PRINCIPALS, Principal, kafka_kwargs, load_credentials

Echo = Callable[[str], None]

#: The pom that lists the broker's jars (repository root / scripts / kafka).
POM_PATH = Path(__file__).resolve().parents[2] / "scripts" / "kafka" / "pom.xml"
#: Written into the libs folder's parent once ``mvn`` copied every jar.
COMPLETE_MARKER = ".complete"
MIN_JAVA = 11
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


def jars_ready(settings: PFISettings) -> bool:
    paths = kafka_paths(settings)
    return (paths.cache / COMPLETE_MARKER).is_file() and paths.libs.is_dir()


def ensure_jars(settings: PFISettings, echo: Echo = print) -> Path:
    """The folder with every broker jar; resolves them with ``mvn`` on first use. Returns the libs path."""
    paths = kafka_paths(settings)
    if jars_ready(settings):
        return paths.libs
    with _locked(paths.cache.with_name(paths.cache.name + ".lock")):
        if jars_ready(settings):  # another process finished meanwhile
            return paths.libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError(
                "mvn (Apache Maven) not found; it resolves the Kafka jars from Maven Central. "
                "Install it with: apt-get install -y maven"
            )
        if not POM_PATH.is_file():
            raise StackError(f"Kafka pom not found at {POM_PATH} (run from a PFI checkout)")
        partial = paths.cache / "libs.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        mvn_log = settings.log_dir / "mvn.log"
        mvn_log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            mvn,
            "-B",
            "-f",
            str(POM_PATH),
            "dependency:copy-dependencies",
            f"-Dkafka.version={settings.kafka_version}",
            f"-DoutputDirectory={partial}",
            "-DincludeScope=runtime",
        ]
        echo(f"kafka: resolving Apache Kafka {settings.kafka_version} jars from Maven Central (mvn) ...")
        echo(f"kafka:   into {paths.libs}; full output in {mvn_log}")
        jars = 0
        with mvn_log.open("w") as out:
            out.write(" ".join(cmd) + "\n")
            try:
                proc = subprocess.Popen(
                    cmd,
                    cwd=paths.cache,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            except OSError as err:
                raise StackError(f"cannot run mvn: {err}") from err
            assert proc.stdout is not None
            errors: list[str] = []
            for line in proc.stdout:
                out.write(line)
                text = line.rstrip()
                if text.startswith("[ERROR]"):
                    errors.append(text)
                match = re.match(r"\[INFO\] Downloaded from \S+: (\S+\.jar) \((.*)\)", text)
                if match:
                    jars += 1
                    echo(f"kafka:   downloaded {match.group(1).rsplit('/', 1)[-1]} ({match.group(2)})")
            code = proc.wait()
        if code != 0:
            shutil.rmtree(partial, ignore_errors=True)
            detail = "\n  ".join(errors[-8:]) or "(no [ERROR] lines)"
            raise StackError(
                f"mvn could not resolve Kafka {settings.kafka_version} (exit {code}); "
                f"see {mvn_log}:\n  {detail}"
            )
        found = sorted(p.name for p in partial.glob("*.jar"))
        if not any(name.startswith("kafka_2.13-") for name in found):
            raise StackError(f"mvn finished but no kafka_2.13 jar in {partial}; see {mvn_log}")
        shutil.rmtree(paths.libs, ignore_errors=True)
        partial.rename(paths.libs)
        (paths.cache / COMPLETE_MARKER).write_text("\n".join(found) + "\n")
        echo(f"kafka: {len(found)} jars ready ({jars} files downloaded from Maven Central)")
        return paths.libs


# --------------------------------------------------------------------------------------------- java


def java_binary() -> str:
    """``java`` (from ``JAVA_HOME`` or ``PATH``), version-checked."""
    java_home = os.environ.get("JAVA_HOME")
    candidate = Path(java_home) / "bin" / "java" if java_home else None
    java = str(candidate) if candidate is not None and candidate.is_file() else shutil.which("java")
    if java is None:
        raise StackError(
            "java not found; the local Kafka broker needs Java 17 "
            "(apt-get install -y openjdk-17-jre-headless) or set PFI_KAFKA_BOOTSTRAP_SERVERS"
        )
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise StackError(f"cannot run {java} -version: {err}") from err
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match is None:
        raise StackError(f"cannot parse the output of {java} -version: {out.stderr.strip()!r}")
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8.0_x"
        major = int(match.group(2))
    if major < MIN_JAVA:
        raise StackError(f"{java} is Java {major}; Kafka {MIN_JAVA}+ is required (17 recommended)")
    return java


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
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (22 characters)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


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
    if paths.cluster_id.is_file():
        cluster_id = paths.cluster_id.read_text().strip()
    else:
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


def command(settings: PFISettings, java: str) -> list[str]:
    paths = kafka_paths(settings)
    return [java, *jvm_options(settings, paths), "kafka.Kafka", str(paths.config)]


def prepare(settings: PFISettings, echo: Echo = print) -> list[str]:
    """Everything before the start: jars, Java, config, storage. Returns the command line to run."""
    java = java_binary()
    ensure_jars(settings, echo)
    credentials = ensure_credentials(settings)
    write_config(settings, credentials)
    format_storage(settings, java, credentials, echo)
    return command(settings, java)


def process_marker(settings: PFISettings) -> str:
    """A string found in the command line of this stack's broker (and of no other process)."""
    return str(kafka_paths(settings).config)


# ------------------------------------------------------------------------------------------- health


_probing: contextvars.ContextVar[bool] = contextvars.ContextVar("pfi_kafka_probe", default=False)


class _ProbeFilter(logging.Filter):
    """Drops aiokafka's connection errors logged while a health probe runs (it reports them itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _probing.get()


for _name in ("aiokafka", "aiokafka.conn"):
    logging.getLogger(_name).addFilter(_ProbeFilter())


async def kafka_health(connection: str | Mapping[str, Any], *, timeout_s: float = 5.0) -> str | None:
    """``None`` when a metadata request succeeds and lists at least one broker; else why not.

    ``connection``: ``services.transport.kafka_kwargs(settings, principal)`` (a bare bootstrap string
    connects without authentication, which an authenticated broker refuses)."""
    kwargs = {"bootstrap_servers": connection} if isinstance(connection, str) else dict(connection)
    token = _probing.set(True)
    client = AIOKafkaClient(
        **kwargs,
        client_id="pfi-stack-health",
        request_timeout_ms=int(timeout_s * 1000),
        retry_backoff_ms=100,
    )
    try:
        await client.bootstrap()
        brokers = client.cluster.brokers()
        if not brokers:
            return "metadata lists no broker yet"
        return None
    except KafkaError as err:
        return f"{type(err).__name__}: {err}"
    except (OSError, TimeoutError) as err:
        return f"{type(err).__name__}: {err}"
    finally:
        await client.close()
        _probing.reset(token)


async def settings_health(
    settings: PFISettings, principal: Principal = "admin", *, timeout_s: float = 5.0
) -> str | None:
    """:func:`kafka_health` with ``principal``'s credentials from ``settings`` (missing ones: the reason)."""
    try:
        connection = kafka_kwargs(settings, principal)
    except ConfigError as err:
        return str(err)
    return await kafka_health(connection, timeout_s=timeout_s)
