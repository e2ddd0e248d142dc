"""Task and run identifiers.

Task ids end up in branch names (``orchestrator/<run_id>/<task_id>``) and file names, so they
are restricted to a set of characters that is safe in both. A task of a plan with a ``matrix``
expands into one task per combination, with the id ``<id>[<value>,<value>...]``; since git
refuses ``[`` in a ref, such ids are written ``<id>@<value>@<value>...`` in branch and file
names (:func:`ref_safe`; ``@`` never appears in a plain id, so no two tasks share a name).
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

__all__ = [
    "MATRIX_VALUE_PATTERN",
    "TASK_ID_PATTERN",
    "new_run_id",
    "new_task_id",
    "ref_safe",
    "task_id_problem",
]

TASK_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
#: One value of a matrix task's id, between the brackets.
MATRIX_VALUE_PATTERN = r"[A-Za-z0-9._-]{1,32}"
_TASK_ID_RE = re.compile(TASK_ID_PATTERN)
_MATRIX_ID_RE = re.compile(
    rf"({TASK_ID_PATTERN})\[({MATRIX_VALUE_PATTERN}(?:,{MATRIX_VALUE_PATTERN})*)\]"
)


def task_id_problem(value: str, *, what: str = "id", matrix: bool = False) -> str | None:
    """Why *value* cannot be a task id (or, with *what*, an agent name), or None when it can.

    With *matrix*, the expanded form ``<id>[<value>,...]`` of a matrix task is accepted too.
    """
    if matrix and (found := _MATRIX_ID_RE.fullmatch(value)):
        base, values = found.group(1), found.group(2).split(",")
        if why := task_id_problem(base, what=what):
            return why
        if any(".." in v or v.endswith((".", ".lock")) for v in values):
            return f"invalid {what} {value!r}: a matrix value must not contain '..' or end with '.' or '.lock'"
        return None
    if not _TASK_ID_RE.fullmatch(value):
        return f"invalid {what} {value!r}: must match {TASK_ID_PATTERN}"
    # The pattern alone lets through names git refuses as a ref component.
    if ".." in value or value.endswith((".", ".lock")):
        return f"invalid {what} {value!r}: must not contain '..' or end with '.' or '.lock'"
    return None


def ref_safe(task_id: str) -> str:
    """*task_id* as it appears in branch and file names: ``impl[a,b]`` is ``impl@a@b``."""
    if not task_id.endswith("]"):
        return task_id
    return task_id[:-1].replace("[", "@", 1).replace(",", "@")


def new_task_id() -> str:
    """A fresh random task id, for envelopes built in code without one."""
    return "task-" + secrets.token_hex(8)


def new_run_id(now: datetime | None = None) -> str:
    """A run id that sorts by start time: ``20261122-031500-a1b2c3``."""
    now = now or datetime.now(UTC)
    return now.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
