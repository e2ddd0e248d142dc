"""Fault injection for the crash tests: die at a named point, as a power cut would.

Does nothing unless ``ORCHESTRATOR_CRASH_AT=<point>:<n>`` is set, in which case the process
SIGKILLs itself the *n*-th time it reaches *point* (``worktree``, ``commit``, ``report``,
``journal``). tests/test_resume.py uses it to kill the orchestrator inside the windows a
random kill rarely hits: between the steps of creating a worktree, of a commit, of writing
the report, and in the middle of a journal line.
"""

from __future__ import annotations

import os
import signal

__all__ = ["armed", "crash_point", "load"]

_POINT = _NTH = ""
_seen = 0


def load() -> None:
    """Read ``ORCHESTRATOR_CRASH_AT`` (at import, and again in a resident process's worker,
    whose environment is its client's)."""
    global _POINT, _NTH, _seen
    _POINT, _, _NTH = os.environ.get("ORCHESTRATOR_CRASH_AT", "").partition(":")
    _seen = 0


load()


def armed(name: str) -> bool:
    """Whether the process is set to die at *name*."""
    return name == _POINT


def crash_point(name: str) -> None:
    """Die here if the environment says so (see the module's docstring)."""
    global _seen
    if not _POINT or name != _POINT:
        return
    _seen += 1
    if _seen == int(_NTH or 1):
        os.kill(os.getpid(), signal.SIGKILL)
