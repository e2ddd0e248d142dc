"""Fields added to the contract's models after the first plans, envelopes and reports were
written: left out of the JSON while unset, so that what was written before them reads back in
its written form and hashes as it did."""

from __future__ import annotations

from typing import Any

__all__ = ["unset_addition"]


def unset_addition(value: Any) -> bool:
    """Whether a field added later is unset (None or empty), and so left out of the JSON:
    the ``exclude_if`` of each such field (pydantic's own serializer then leaves it out, with
    no Python serializer around the whole model)."""
    return value is None or value == [] or value == {}
