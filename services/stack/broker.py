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
:mod:`services.stack.manager` starts and stops the process. The paths, the credentials, the config and the
storage format live in :mod:`services.stack.broker_config` (their public names are re-exported here).
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError

from schemas.errors import ConfigError, StackError
from services.settings import PFISettings
from services.stack.broker_config import (
    AUTH_SCHEME,
    SCRAM_MECHANISM,
    Echo,
    KafkaPaths,
    _locked,
    auth_outdated,
    ensure_credentials,
    format_storage,
    jvm_options,
    kafka_paths,
    log4j_properties,
    new_cluster_id,
    reset_storage,
    server_properties,
    write_config,
)
from services.transport import Principal, kafka_kwargs

__all__ = [
    "AUTH_SCHEME",
    "COMPLETE_MARKER",
    "MIN_JAVA",
    "POM_PATH",
    "SCRAM_MECHANISM",
    "Echo",
    "KafkaPaths",
    "auth_outdated",
    "command",
    "ensure_credentials",
    "ensure_jars",
    "format_storage",
    "jars_ready",
    "java_binary",
    "jvm_options",
    "kafka_health",
    "kafka_paths",
    "log4j_properties",
    "new_cluster_id",
    "prepare",
    "process_marker",
    "reset_storage",
    "server_properties",
    "settings_health",
    "write_config",
]

#: The pom that lists the broker's jars (repository root / scripts / kafka).
POM_PATH = Path(__file__).resolve().parents[2] / "scripts" / "kafka" / "pom.xml"
#: Written into the libs folder's parent once ``mvn`` copied every jar.
COMPLETE_MARKER = ".complete"
MIN_JAVA = 11


# --------------------------------------------------------------------------------------------- jars


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
