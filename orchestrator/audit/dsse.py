"""DSSE envelopes signed with Ed25519: the signing format of in-toto attestations.

An envelope (https://github.com/secure-systems-lab/dsse, ``envelope.md``) is the JSON object
``{"payload": <base64>, "payloadType": <type>, "signatures": [{"keyid": ..., "sig": <base64>}]}``;
each signature signs the pre-authentication encoding of the type and payload (:func:`pae`),
never the JSON around them, so that nothing outside the signed bytes can change their meaning.

Keys are Ed25519 in PEM: the private key as PKCS#8, the public key as SubjectPublicKeyInfo, as
``openssl`` and ``cryptography`` write them. A key's id is the SHA-256 of its public key's DER
bytes (hex); it is a hint for finding the key, never trusted on its own: a signature is checked
against the key the auditor gives, whatever id it claims.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from envelopes import read_bounded

from ..errors import AttestationError

__all__ = [
    "MAX_KEY_BYTES",
    "dumps",
    "key_id",
    "load_private_key",
    "load_public_key",
    "pae",
    "sign_envelope",
    "verified_payload",
    "write_keypair",
]

#: Largest key file read (an Ed25519 PEM is under 200 bytes).
MAX_KEY_BYTES = 64 << 10


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: ``DSSEv1 SP LEN(type) SP type SP LEN(body) SP body``,
    lengths in decimal bytes."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def key_id(public: Ed25519PublicKey) -> str:
    """The hex SHA-256 of *public*'s DER (SubjectPublicKeyInfo) bytes."""
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def sign_envelope(payload_type: str, payload: bytes, key: Ed25519PrivateKey) -> dict[str, Any]:
    """A DSSE envelope of *payload*, signed with *key*."""
    signature = key.sign(pae(payload_type, payload))
    return {
        "payload": base64.b64encode(payload).decode(),
        "payloadType": payload_type,
        "signatures": [
            {"keyid": key_id(key.public_key()), "sig": base64.b64encode(signature).decode()}
        ],
    }


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise AttestationError(f"{what} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AttestationError(f"{what} is not base64") from exc


def verified_payload(
    envelope: Mapping[str, Any], payload_type: str, public: Ed25519PublicKey
) -> bytes:
    """The payload of *envelope* once one of its signatures verifies with *public*.

    AttestationError (one line) when the envelope is not a DSSE envelope of *payload_type*,
    or no signature verifies: nothing of an unverified payload is returned.
    """
    if not isinstance(envelope, Mapping) or set(envelope) != {
        "payload",
        "payloadType",
        "signatures",
    }:
        raise AttestationError("not a DSSE envelope (payload, payloadType, signatures)")
    if envelope["payloadType"] != payload_type:
        raise AttestationError(f"payloadType is {envelope['payloadType']!r}, not {payload_type!r}")
    payload = _b64(envelope["payload"], "payload")
    signatures = envelope["signatures"]
    if not isinstance(signatures, list) or not signatures:
        raise AttestationError("no signatures")
    signed = pae(payload_type, payload)
    # Each signature stands alone (DSSE: several are as good as several envelopes): one that
    # is not ours, or not in the form we read, does not spoil one that is.
    for entry in signatures[:16]:
        if not isinstance(entry, Mapping):
            continue
        try:
            public.verify(_b64(entry.get("sig"), "sig"), signed)
        except (InvalidSignature, AttestationError):
            continue
        return payload
    raise AttestationError("no signature verifies with the given public key")


def load_private_key(source: str) -> Ed25519PrivateKey:
    """The Ed25519 private key in PEM file *source*, or in environment variable ``NAME`` for
    ``env:NAME``. AttestationError when it cannot be read or is not an unencrypted Ed25519
    key."""
    if source.startswith("env:"):
        name = source.removeprefix("env:")
        text = os.environ.get(name)
        if not text:
            raise AttestationError(
                f"environment variable {name} is not set (it should hold the PEM key)"
            )
        data, where = text.encode(), f"environment variable {name}"
    else:
        data, where = _read_key(Path(source)), source
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise AttestationError(
            f"{where}: the key is encrypted (give an unencrypted PEM key)"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise AttestationError(f"{where}: not a PEM private key of a supported kind") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise AttestationError(f"{where}: not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key in PEM file *path* (a private key's public half too)."""
    data = _read_key(path)
    try:
        key: Any = serialization.load_pem_public_key(data)
    except UnsupportedAlgorithm as exc:
        raise AttestationError(f"{path}: not an Ed25519 key") from exc
    except ValueError:
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise AttestationError(f"{path}: not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise AttestationError(f"{path}: not an Ed25519 key")
    return key


def _read_key(path: Path) -> bytes:
    try:
        return read_bounded(path, MAX_KEY_BYTES)
    except OSError as exc:
        raise AttestationError(f"cannot read {path}: {exc.strerror or exc}") from exc


def write_keypair(out: Path) -> tuple[Path, Path]:
    """A new Ed25519 key pair written to ``<out>.pem`` (private, mode 0600, created so) and
    ``<out>.pub.pem``; neither may exist already (nor be a link). Returns the two paths.
    AttestationError for a name that is no key's (empty, ``.``, a directory, ``x.pub``)."""
    stem = out.name.removesuffix(".pem")
    if stem in ("", ".", "..") or stem.endswith(".pub") or out.name != out.name.strip():
        raise AttestationError(
            f"--out {str(out)!r}: give the key's name, e.g. --out key (for key.pem and key.pub.pem)"
        )
    private_path = out.with_name(f"{stem}.pem")
    public_path = out.with_name(f"{stem}.pub.pem")
    if not out.parent.is_dir():
        raise AttestationError(f"--out: {out.parent} is not a directory")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise AttestationError(f"{path} exists: keygen never overwrites a key")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _create(private_path, private, 0o600)
    try:
        _create(public_path, public, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return private_path, public_path


def _create(path: Path, data: bytes, mode: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        raise AttestationError(f"cannot create {path}: {exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, mode)  # whatever the umask
        with os.fdopen(os.dup(fd), "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        os.close(fd)


def dumps(value: Any) -> bytes:
    """*value* as the compact, key-sorted JSON bytes a payload is signed as."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
