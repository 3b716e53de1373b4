"""A device's credential: its federation, client id, signing key and current device token.

Stored as JSON in ``<state_dir>/<federation>/<client_id>/credential.json`` with mode 0600 (written
atomically). The signing key never leaves the device after enrollment; the token is replaced before it
expires (:class:`clients.enrollment.DeviceIdentity`).
"""

from __future__ import annotations

import json
import re
import stat
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from clients.files import atomic_write
from schemas.errors import ConfigError
from schemas.signing import MIN_KEY_BYTES

CREDENTIAL_FILE = "credential.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


@dataclass(frozen=True)
class Credential:
    federation: str
    client_id: str
    signing_key: bytes
    token: str
    expires_at: float

    def __post_init__(self) -> None:
        for what, value in (("federation", self.federation), ("client id", self.client_id)):
            if not _NAME.fullmatch(value):
                raise ConfigError(f"invalid {what} {value!r} in a credential")
        if len(self.signing_key) < MIN_KEY_BYTES:
            raise ConfigError(f"a credential's signing key needs at least {MIN_KEY_BYTES} bytes")

    def expires_in(self, now: float | None = None) -> float:
        return self.expires_at - (time.time() if now is None else now)

    def with_token(self, token: str, expires_at: float) -> Credential:
        return replace(self, token=token, expires_at=float(expires_at))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["signing_key"] = self.signing_key.hex()
        return out

    @classmethod
    def from_json(cls, data: Any) -> Credential:
        if not isinstance(data, dict):
            raise ConfigError("a credential must be a JSON object")
        try:
            return cls(
                federation=str(data["federation"]),
                client_id=str(data["client_id"]),
                signing_key=bytes.fromhex(str(data["signing_key"])),
                token=str(data["token"]),
                expires_at=float(data["expires_at"]),
            )
        except (KeyError, ValueError, TypeError) as err:
            raise ConfigError(f"malformed credential: {type(err).__name__}: {err}") from None


def credential_path(state_dir: Path, federation: str, client_id: str) -> Path:
    return state_dir / federation / client_id / CREDENTIAL_FILE


def save_credential(path: Path, credential: Credential) -> None:
    """Write the credential (mode 0600, atomically)."""
    atomic_write(path, json.dumps(credential.to_json(), indent=1).encode() + b"\n", mode=0o600)


def load_credential(path: Path) -> Credential:
    """Read a credential; refuses a file that others may read (mode must not grant group/other access)."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read the credential {path}: {err}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"the credential {path} is readable by others (chmod 600 it)")
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"the credential {path} is not JSON: {err}") from None
    return Credential.from_json(data)
