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
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, StringConstraints

__all__ = [
    "MATRIX_VALUE_PATTERN",
    "OBJECT_ID_PATTERN",
    "RUN_ID_PATTERN",
    "TASK_ID_PATTERN",
    "BranchName",
    "Digest",
    "ObjectId",
    "RunId",
    "Seal",
    "TaskId",
    "is_object_id",
    "new_run_id",
    "new_task_id",
    "ref_name_problem",
    "ref_safe",
    "run_id_problem",
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


#: A git object name: SHA-1 (40 hex digits) or SHA-256 (64), lower case. Nothing else from a
#: report, a plan or an agent is ever passed to git as a revision: not ``HEAD``, not a branch
#: name, not ``--output=...``.
OBJECT_ID_PATTERN = r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$"
_OBJECT_ID_RE = re.compile(OBJECT_ID_PATTERN)
#: Run ids are made by :func:`new_run_id`; one given by a caller must be as safe in a path and
#: in a branch name as a task id.
RUN_ID_PATTERN = TASK_ID_PATTERN


def is_object_id(value: object) -> bool:
    """True when *value* is a full git object id (40 or 64 lower-case hex digits)."""
    return isinstance(value, str) and _OBJECT_ID_RE.fullmatch(value) is not None


def run_id_problem(value: str) -> str | None:
    """Why *value* cannot be a run id, or None when it can."""
    return task_id_problem(value, what="run id")


#: Characters git refuses in a ref name, and ones this project never writes in one.
_REF_BAD = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|/\.|\.lock(?:/|$)")


def ref_name_problem(value: str) -> str | None:
    """Why *value* cannot be a branch name (``main``, ``orchestrator/<run>/<task>``), or None.

    The rules of ``git check-ref-format --branch``, conservatively, in Python: the engine
    still runs ``git check-ref-format`` before git sees one; this check lets an auditor with
    ``envelopes`` alone refuse a report whose branch names could be read as options.
    """
    if (
        not value
        or len(value) > 255
        or value.startswith(("-", "/", "."))
        or value.endswith(("/", "."))
        or value in ("@", "HEAD")
        or _REF_BAD.search(value)
    ):
        return f"invalid branch name {value!r}"
    return None


def _check(problem: Callable[[str], str | None]) -> AfterValidator:
    def check(value: str) -> str:
        if why := problem(value):
            raise ValueError(why)
        return value

    return AfterValidator(check)


#: A git object id (see OBJECT_ID_PATTERN).
ObjectId = Annotated[str, StringConstraints(pattern=OBJECT_ID_PATTERN)]
#: A hex SHA-256 digest.
Digest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
#: A self-describing digest: empty until the object is sealed.
Seal = Annotated[str, StringConstraints(pattern=r"^(?:[0-9a-f]{64})?$")]
#: A task id, plain or a matrix member's ``id[value,...]``.
TaskId = Annotated[str, _check(lambda v: task_id_problem(v, what="task id", matrix=True))]
#: A run id.
RunId = Annotated[str, _check(run_id_problem)]
#: A branch name, without ``refs/heads/``.
BranchName = Annotated[str, _check(ref_name_problem)]
