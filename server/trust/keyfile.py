"""Private keys on disk: PEM PKCS#8, 0600, encrypted at rest when the operator gives a passphrase.

The passphrase comes from the environment: FEDFLEET_KEY_PASSPHRASE, or the file FEDFLEET_KEY_PASSPHRASE_FILE
names (its content without the trailing newline; a file suits systemd credentials and compose secrets). With a
passphrase set, every key fedfleet writes is encrypted (PKCS#8 PBES2: PBKDF2-HMAC-SHA256 and AES-256-CBC, what
`cryptography` writes and `openssl pkey` reads); `fedfleet keys encrypt` encrypts the keys already in DATA/keys.
Readers open plain and encrypted keys alike, and an encrypted key without the passphrase is one sentence saying
what to set. PBKDF2 here runs 2,048 rounds, so the passphrase must be strong on its own: at least
MIN_PASSPHRASE characters, best random (`openssl rand -base64 32 > passphrase`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from edge_agent.contract.files import atomic_write_bytes
from server.errors import CoordinatorError, DataDirError

__all__ = [
    "ENV_PASSPHRASE",
    "ENV_PASSPHRASE_FILE",
    "MIN_PASSPHRASE",
    "Encrypted",
    "OfflineKeyError",
    "encrypt_keys",
    "is_encrypted",
    "passphrase",
    "read_key",
    "write_key",
]

ENV_PASSPHRASE = "FEDFLEET_KEY_PASSPHRASE"
ENV_PASSPHRASE_FILE = "FEDFLEET_KEY_PASSPHRASE_FILE"
MIN_PASSPHRASE = 12
_ENCRYPTED_HEADER = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
_SET_IT = f"set {ENV_PASSPHRASE} (or {ENV_PASSPHRASE_FILE}, a file holding it)"


class OfflineKeyError(CoordinatorError):
    """An operation needs a key kept offline, and its directory was not given (or does not hold it)."""


def passphrase() -> bytes | None:
    """The key passphrase from the environment, or None when neither variable is set (or both are empty)."""
    value = os.environ.get(ENV_PASSPHRASE, "")
    file = os.environ.get(ENV_PASSPHRASE_FILE, "")
    if value and file:
        raise DataDirError(f"both {ENV_PASSPHRASE} and {ENV_PASSPHRASE_FILE} are set; set only one")
    if file:
        try:
            value = Path(file).read_text().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise DataDirError(f"{ENV_PASSPHRASE_FILE} names {file}, which cannot be read ({e})") from e
        if not value:
            raise DataDirError(f"{ENV_PASSPHRASE_FILE} names {file}, which is empty; write the passphrase into it")
    if not value:
        return None
    if len(value) < MIN_PASSPHRASE:
        raise DataDirError(f"the key passphrase has {len(value)} characters; use at least {MIN_PASSPHRASE}")
    return value.encode()


def is_encrypted(pem: bytes) -> bool:
    return pem.lstrip().startswith(_ENCRYPTED_HEADER)


def _pem(key: PrivateKeyTypes, password: bytes | None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def write_key(path: Path, key: PrivateKeyTypes) -> None:
    """Write a private key atomically, 0600 (the temp file is created so), encrypted when a passphrase is set."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, _pem(key, passphrase()))
    os.chmod(path, 0o600)


def _parse(path: Path, pem: bytes, password: bytes | None) -> PrivateKeyTypes:
    encrypted = is_encrypted(pem)
    if encrypted and password is None:
        raise DataDirError(f"key {path} is encrypted; {_SET_IT} to its passphrase")
    try:
        return serialization.load_pem_private_key(pem, password=password if encrypted else None)
    except (ValueError, TypeError) as e:
        if encrypted:
            raise DataDirError(f"key {path} does not open with the passphrase given; {_SET_IT} to the right one") from e
        raise DataDirError(f"key {path} is not a readable PEM private key") from e


def read_key(path: Path) -> PrivateKeyTypes:
    """A private key, plain or encrypted (with the passphrase from the environment)."""
    try:
        pem = path.read_bytes()
    except OSError as e:
        raise DataDirError(f"key {path} is missing or unreadable; was the data directory initialised?") from e
    return _parse(path, pem, passphrase() if is_encrypted(pem) else None)


@dataclass(frozen=True)
class Encrypted:
    encrypted: list[Path]  # written encrypted now
    already: list[Path]  # were encrypted with this passphrase


def encrypt_keys(keys_dir: Path) -> Encrypted:
    """Encrypt every private key under keys_dir (retired ones too) with the passphrase, each file replaced
    atomically. Every key is read first: a missing passphrase, a key that does not open with it, or one that
    is not a key changes nothing."""
    password = passphrase()
    if password is None:
        raise DataDirError(f"no passphrase to encrypt with; {_SET_IT}")
    paths = sorted(p for p in keys_dir.rglob("*.pem") if p.is_file())
    plain: list[tuple[Path, PrivateKeyTypes]] = []
    already: list[Path] = []
    for path in paths:
        pem = path.read_bytes()
        key = _parse(path, pem, password)
        if is_encrypted(pem):
            already.append(path)
        else:
            plain.append((path, key))
    for path, key in plain:
        atomic_write_bytes(path, _pem(key, password))
        os.chmod(path, 0o600)
    return Encrypted([p for p, _ in plain], already)
