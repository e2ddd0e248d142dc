"""Resource limits of an agent's processes: setrlimit in the child, and telling which one hit.

A plan's ``limits`` become ``(resource, soft, hard)`` triples that :func:`run_command` sets
before the agent's program starts (see orchestrator/process.py). Children inherit them; each
counts per process (``processes`` excepted: the kernel counts every process of the user, and
not at all for root). When an attempt fails, :func:`limit_error` says whether a limit is the
likely cause, from the signal that ended it or the last line of its stderr.
"""

from __future__ import annotations

import functools
import resource
import signal

from envelopes import ErrorInfo, Limits

from .process import ProcessOutcome

__all__ = ["Rlimit", "limit_error", "rlimits_of"]

#: ``(resource, soft, hard)`` as ``resource.setrlimit`` takes them.
Rlimit = tuple[int, int, int]

_MB = 1024 * 1024

#: Seconds of CPU between SIGXCPU (the soft limit, which a program may catch) and SIGKILL.
CPU_GRACE_S = 1

#: What a program prints when a limit refuses it something: (limit, markers in the last line).
_MARKERS = (
    ("memory_mb", ("MemoryError", "Cannot allocate memory", "out of memory", "bad_alloc")),
    ("file_size_mb", ("File too large",)),
    ("open_files", ("Too many open files",)),
    ("processes", ("Resource temporarily unavailable",)),
)


@functools.cache
def _may_raise_hard_limits() -> bool:
    """Whether this process may raise a hard limit: CAP_SYS_RESOURCE in its effective set.

    Being root is not enough: containers drop the capability, root or not.
    """
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_RESOURCE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


#: The capability's bit in ``CapEff`` (linux/capability.h).
_CAP_SYS_RESOURCE = 24


def rlimits_of(limits: Limits) -> list[Rlimit]:
    """The triples for *limits* (empty when none is set), never above this process's hard limits
    unless it may raise them: a limit higher than what this process has is what it has."""
    wanted = [
        (resource.RLIMIT_AS, limits.memory_mb, _MB),
        (resource.RLIMIT_CPU, limits.cpu_s, 1),
        (resource.RLIMIT_NOFILE, limits.open_files, 1),
        (resource.RLIMIT_FSIZE, limits.file_size_mb, _MB),
        (resource.RLIMIT_NPROC, limits.processes, 1),
    ]
    out: list[Rlimit] = []
    for which, value, unit in wanted:
        if value is None:
            continue
        soft = hard = value * unit
        if which == resource.RLIMIT_CPU:
            hard = soft + CPU_GRACE_S
        current = resource.getrlimit(which)[1]
        if current != resource.RLIM_INFINITY and not _may_raise_hard_limits():
            soft, hard = min(soft, current), min(hard, current)
        out.append((which, soft, hard))
    if out:
        # SIGXCPU and SIGXFSZ dump core by default: not into the worktree, to be committed.
        out.append((resource.RLIMIT_CORE, 0, 0))
    return out


def limit_error(
    limits: Limits, outcome: ProcessOutcome, last_line: str | None = None
) -> ErrorInfo | None:
    """``ErrorInfo(kind="limit")`` when a limit of *limits* most likely ended the attempt.

    Told by the signal (SIGXCPU: ``cpu_s``; SIGXFSZ: ``file_size_mb``; SIGKILL after
    ``cpu_s`` of CPU: ``cpu_s``), or by *last_line*, the last line of a failed attempt's
    stderr (``MemoryError``, ``File too large``, ``Too many open files``, ``Resource
    temporarily unavailable``), for limits that are set. None otherwise.
    """
    if outcome.timed_out or outcome.cancelled:
        return None
    sig = outcome.signal
    cpu = (outcome.cpu_user_s or 0.0) + (outcome.cpu_system_s or 0.0)
    if limits.cpu_s is not None and (
        sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= limits.cpu_s)
    ):
        return _error("cpu_s", limits.cpu_s, "s of CPU", _how(outcome))
    if limits.file_size_mb is not None and sig == signal.SIGXFSZ:
        return _error("file_size_mb", limits.file_size_mb, " MB per file", _how(outcome))
    if sig is None and outcome.exit_code in (None, 0):
        return None
    for name, markers in _MARKERS:
        value = getattr(limits, name)
        if value is not None and last_line and any(m in last_line for m in markers):
            unit = {"memory_mb": " MB", "file_size_mb": " MB per file", "open_files": " files"}
            return _error(
                name, value, unit.get(name, " processes"), f"{_how(outcome)}: {last_line}"
            )
    return None


def _how(outcome: ProcessOutcome) -> str:
    if outcome.signal is not None:
        try:
            return f"killed by {signal.Signals(outcome.signal).name}"
        except ValueError:
            return f"killed by signal {outcome.signal}"
    return f"exited with code {outcome.exit_code}"


def _error(name: str, value: int, unit: str, how: str) -> ErrorInfo:
    return ErrorInfo(kind="limit", message=f"exceeded limits.{name} ({value}{unit}): {how}")
