"""Canonical JSON and SHA-256 digests.

Every digest in a report is ``sha256(canonical_json(value))``: keys sorted, no insignificant
whitespace, UTF-8, no NaN or infinity. Anyone can recompute them with the standard library.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["canonical_json", "digest", "digest_without", "json_line", "sha256_hex"]


def canonical_json(value: Any) -> bytes:
    """Serialize a JSON-compatible value to canonical bytes."""
    return json.dumps(
        value,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode("utf-8")


def json_line(value: Any) -> str:
    """*value* as one line of JSON in its own key order, no spaces, UTF-8 characters as they
    are: how the journal and a report (version 2) write a result."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of raw bytes."""
    return hashlib.sha256(data).hexdigest()


def digest(value: Any) -> str:
    """Hex SHA-256 of the canonical JSON of *value*."""
    return sha256_hex(canonical_json(value))


def digest_without(value: Mapping[str, Any], *path: str) -> str:
    """Digest of a JSON object with the field at *path* removed.

    Used for self-describing digests such as ``report_sha256``, which covers the whole report
    except itself. A missing field is not an error: the digest is then over the object as is.
    """
    copy: dict[str, Any] = dict(value)
    node = copy
    for key in path[:-1]:
        inner = node.get(key)
        if not isinstance(inner, Mapping):
            return digest(copy)
        node[key] = dict(inner)
        node = node[key]
    node.pop(path[-1], None)
    return digest(copy)
