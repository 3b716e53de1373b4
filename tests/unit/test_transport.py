"""``services.transport.kafka_kwargs`` and the local broker's credentials / security config (no broker)."""

from __future__ import annotations

import json
import os
import ssl
import stat
from pathlib import Path

import pytest

from schemas.errors import ConfigError
from services.settings import PFISettings
from services.stack import broker, broker_config
from services.transport import PRINCIPALS, kafka_env, kafka_kwargs


def _settings(tmp_path: Path, **kw: object) -> PFISettings:
    return PFISettings(**{"home": tmp_path / "home", "kafka_bootstrap_servers": None, **kw})  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PFI_KAFKA_"):
            monkeypatch.delenv(name)


def test_local_credentials_are_generated_once_private_and_used_per_principal(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    with pytest.raises(ConfigError, match="pfi stack up"):
        kafka_kwargs(settings, "aggregator")
    creds = broker.ensure_credentials(settings)
    assert set(creds) == set(PRINCIPALS)
    assert len(set(creds.values())) == len(PRINCIPALS)
    assert stat.S_IMODE(settings.kafka_credentials_path.stat().st_mode) == 0o600
    assert broker.ensure_credentials(settings) == creds  # idempotent
    kwargs = kafka_kwargs(settings, "aggregator")
    assert kwargs["security_protocol"] == "SASL_PLAINTEXT"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == (
        "aggregator",
        creds["aggregator"],
    )
    assert kwargs["bootstrap_servers"] == settings.kafka_bootstrap()


def test_one_explicit_identity_wins_and_sasl_ssl_verifies_the_broker(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        kafka_bootstrap_servers="kafka.example:9093",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_username="pfi-aggregator",
        kafka_sasl_password="s3cret",
    )
    kwargs = kafka_kwargs(settings, "aggregator")
    assert (kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == ("pfi-aggregator", "s3cret")
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    env = kafka_env(settings)
    assert env["PFI_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["PFI_KAFKA_SASL_USERNAME"] == "pfi-aggregator"
    with pytest.raises(ConfigError, match="both"):
        kafka_kwargs(_settings(tmp_path, kafka_sasl_username="x"), "admin")
    with pytest.raises(ConfigError, match="does not exist"):
        kafka_kwargs(
            _settings(tmp_path, kafka_security_protocol="SSL", kafka_ssl_cafile=tmp_path / "no"), "admin"
        )


def test_plaintext_has_no_credentials(tmp_path: Path) -> None:
    kwargs = kafka_kwargs(_settings(tmp_path, kafka_security_protocol="PLAINTEXT"), "admin")
    assert kwargs == {"bootstrap_servers": "127.0.0.1:19092", "security_protocol": "PLAINTEXT"}


def test_broker_config_authenticates_and_authorizes_on_loopback(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    creds = broker.ensure_credentials(settings)
    props = dict(
        line.split("=", 1)
        for line in broker.server_properties(settings, creds).splitlines()
        if line and not line.startswith("#")
    )
    assert props["listener.security.protocol.map"] == "CLIENT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT"
    assert "PLAINTEXT://" not in props["listeners"]
    assert all("//127.0.0.1:" in part for part in props["listeners"].split(","))
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert props["authorizer.class.name"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["super.users"] == "User:admin"


def test_storage_formatted_without_scram_users_is_outdated(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    paths = broker.kafka_paths(settings)
    assert broker.auth_outdated(settings) is None  # never formatted
    paths.data.mkdir(parents=True)
    (paths.data / "meta.properties").write_text("cluster.id=abc\nnode.id=1\n")
    assert "without SASL" in (broker.auth_outdated(settings) or "")
    creds = broker.ensure_credentials(settings)
    paths.auth_stamp.write_text(json.dumps(broker_config._auth_stamp(creds)))
    assert broker.auth_outdated(settings) is None
    settings.kafka_credentials_path.unlink()
    broker.ensure_credentials(settings)  # new passwords: the SCRAM users no longer match
    assert broker.auth_outdated(settings) is not None
    broker.reset_storage(settings)
    assert not paths.data.exists()
    assert broker.auth_outdated(settings) is None


def test_a_principal_of_its_own_wins_over_the_process_identity(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        kafka_sasl_username="pfi-serving",
        kafka_sasl_password="a",
        kafka_ingest_username="pfi-ingest",
        kafka_ingest_password="b",
    )
    assert kafka_kwargs(settings, "ingest")["sasl_plain_username"] == "pfi-ingest"
    assert kafka_kwargs(settings, "serving")["sasl_plain_username"] == "pfi-serving"
    assert kafka_env(settings)["PFI_KAFKA_INGEST_PASSWORD"] == "b"
    with pytest.raises(ConfigError, match="PFI_KAFKA_AGGREGATOR_PASSWORD"):
        kafka_kwargs(_settings(tmp_path, kafka_aggregator_username="x"), "aggregator")
