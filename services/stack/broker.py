"""The local Apache Kafka broker: jars from Maven Central, a KRaft config, storage format, health.

Single node, combined broker + controller, loopback only, no ZooKeeper. The jars are resolved by
``mvn`` through ``scripts/kafka/pom.xml`` into ``<cache_dir>/kafka-<version>/libs`` (outside the
checkout, reused once complete). :mod:`services.stack.manager` starts and stops the process.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import fcntl
import logging
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError

from schemas.errors import StackError
from services.settings import PFISettings
from services.stack.topics import broker_message_max_bytes

Echo = Callable[[str], None]

#: The pom that lists the broker's jars (repository root / scripts / kafka).
POM_PATH = Path(__file__).resolve().parents[2] / "scripts" / "kafka" / "pom.xml"
#: Written into the libs folder's parent once ``mvn`` copied every jar.
COMPLETE_MARKER = ".complete"
MIN_JAVA = 11


@dataclass(frozen=True)
class KafkaPaths:
    """Where the local broker keeps its files."""

    root: Path  # <stack_dir>/kafka
    config: Path  # server.properties
    log4j: Path
    data: Path  # log.dirs (and the KRaft metadata log)
    pidfile: Path
    cluster_id: Path
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


# ------------------------------------------------------------------------------------------- config


def server_properties(settings: PFISettings) -> str:
    paths = kafka_paths(settings)
    max_bytes = broker_message_max_bytes(settings)
    kp, cp = settings.kafka_port, settings.kafka_controller_port
    lines = {
        # KRaft, one node that is both broker and controller.
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{cp}",
        "listeners": f"PLAINTEXT://127.0.0.1:{kp},CONTROLLER://127.0.0.1:{cp}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{kp}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
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


def write_config(settings: PFISettings) -> KafkaPaths:
    paths = kafka_paths(settings)
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.data.mkdir(parents=True, exist_ok=True)
    paths.log.parent.mkdir(parents=True, exist_ok=True)
    paths.config.write_text(server_properties(settings))
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


def format_storage(settings: PFISettings, java: str, echo: Echo = print) -> None:
    """``StorageTool format`` once (the data folder keeps ``meta.properties`` afterwards)."""
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
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise StackError(f"kafka storage format failed: {err}") from err
    with paths.log.open("a") as log_file:
        log_file.write(out.stdout + out.stderr)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
        raise StackError(f"kafka storage format failed (exit {out.returncode}): {' | '.join(tail)}")


def command(settings: PFISettings, java: str) -> list[str]:
    paths = kafka_paths(settings)
    return [java, *jvm_options(settings, paths), "kafka.Kafka", str(paths.config)]


def prepare(settings: PFISettings, echo: Echo = print) -> list[str]:
    """Everything before the start: jars, Java, config, storage. Returns the command line to run."""
    java = java_binary()
    ensure_jars(settings, echo)
    write_config(settings)
    format_storage(settings, java, echo)
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


async def kafka_health(bootstrap: str, *, timeout_s: float = 5.0) -> str | None:
    """``None`` when a metadata request succeeds and lists at least one broker; else why not."""
    token = _probing.set(True)
    client = AIOKafkaClient(
        bootstrap_servers=bootstrap,
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
