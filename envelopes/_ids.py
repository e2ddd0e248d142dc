"""Task and run identifiers.

Task ids end up in branch names (``orchestrator/<run_id>/<task_id>``) and file names, so they
are restricted to a set of characters that is safe in both.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

__all__ = ["TASK_ID_PATTERN", "new_run_id", "new_task_id", "task_id_problem"]

TASK_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_TASK_ID_RE = re.compile(TASK_ID_PATTERN)


def task_id_problem(value: str, *, what: str = "id") -> str | None:
    """Why *value* cannot be a task id (or, with *what*, an agent name), or None when it can."""
    if not _TASK_ID_RE.fullmatch(value):
        return f"invalid {what} {value!r}: must match {TASK_ID_PATTERN}"
    # The pattern alone lets through names git refuses as a ref component.
    if ".." in value or value.endswith((".", ".lock")):
        return f"invalid {what} {value!r}: must not contain '..' or end with '.' or '.lock'"
    return None


def new_task_id() -> str:
    """A fresh random task id, for envelopes built in code without one."""
    return "task-" + secrets.token_hex(8)


def new_run_id(now: datetime | None = None) -> str:
    """A run id that sorts by start time: ``20261122-031500-a1b2c3``."""
    now = now or datetime.now(UTC)
    return now.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
