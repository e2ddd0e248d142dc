"""The bubblewrap sandbox: what one command of a task sees of the machine, and may change.

:func:`bwrap_argv` wraps any argv (an agent's command today; a task's set-up or check command
tomorrow) in ``bwrap`` with a :class:`SandboxLayout`:

- the system read-only (``--ro-bind / /``), a fresh ``/dev`` and ``/proc``;
- hidden, each under an empty tmpfs: ``/tmp`` and ``/run`` (private, writable), the real
  HOME (an empty private one instead), and whatever the layout hides: for a task, the
  repository's main checkout, the orchestrator's state directory (every run's worktrees,
  venvs and logs) and the repository's other worktrees (see orchestrator/isolation.py);
- shown again inside what is hidden, read-only or read-write as the layout says: for a task,
  the git directory read-only, its worktree and venv read-write, its private git state;
- its own PID, IPC and UTS namespaces, and network namespace unless the layout allows the
  network (then only loopback, in a namespace of its own); no capabilities, even as root;
  a new session (no terminal to push keystrokes into); and ``--die-with-parent``: when the
  orchestrator dies, bwrap and with it every process of the sandbox is killed.

Mounts are applied parents first, so that a path shown again inside a hidden one appears.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio

__all__ = ["BWRAP", "SandboxLayout", "bwrap_argv", "find_bwrap", "sandbox_problem"]

#: The bubblewrap program, looked up on this process's PATH.
BWRAP = "bwrap"

#: Namespaces and privileges of every sandbox (the network namespace is the layout's choice).
_ISOLATION = (
    "--unshare-pid",
    "--unshare-ipc",
    "--unshare-uts",
    "--die-with-parent",
    "--new-session",
    "--cap-drop",
    "ALL",
)

_probed: dict[str, str | None] = {}


@dataclass
class SandboxLayout:
    """What a sandboxed command sees: host paths hidden, and shown again read-only or writable.

    ``mounts`` show a host path at another place: ``(source, target, writable)``.
    """

    cwd: Path
    hide: list[Path] = field(default_factory=list)
    read_only: list[Path] = field(default_factory=list)
    writable: list[Path] = field(default_factory=list)
    mounts: list[tuple[Path, Path, bool]] = field(default_factory=list)
    network: bool = False


def bwrap_argv(layout: SandboxLayout, argv: Sequence[str], *, bwrap: str = BWRAP) -> list[str]:
    """*argv* run inside a sandbox laid out as *layout* (see the module docstring)."""
    ops: list[tuple[Path, tuple[str, ...]]] = [
        (Path("/tmp"), ("--tmpfs", "/tmp")),
        *((p, ("--tmpfs", str(p))) for p in layout.hide),
        *((p, ("--ro-bind", str(p), str(p))) for p in layout.read_only),
        *(
            (dst, ("--bind" if rw else "--ro-bind", str(src), str(dst)))
            for src, dst, rw in layout.mounts
        ),
        *((p, ("--bind", str(p), str(p))) for p in layout.writable),
    ]
    # Parents before children (a stable sort: for one path, later entries win).
    ops.sort(key=lambda op: len(op[0].parts))
    out = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    seen: set[tuple[str, ...]] = set()
    for _, args in ops:
        if args not in seen:
            seen.add(args)
            out += args
    out += _ISOLATION
    if not layout.network:
        out.append("--unshare-net")
    out += ["--chdir", str(layout.cwd), "--", *argv]
    return out


def system_hidden() -> list[Path]:
    """What every sandbox hides of the system: ``/run`` (sockets of system services, the
    user's agents) and the real HOME."""
    hidden = [Path("/run")]
    var_run = Path("/var/run")
    if var_run.is_dir() and not var_run.is_symlink():
        hidden.append(var_run)
    home = Path(os.path.expanduser("~")).resolve()
    if home != Path("/") and home.is_dir():
        hidden.append(home)
    return hidden


def system_shown() -> list[Path]:
    """What is shown again of the hidden system paths: the resolver configuration, when
    ``/etc/resolv.conf`` points into ``/run`` (systemd-resolved)."""
    resolv = Path(os.path.realpath("/etc/resolv.conf"))
    return [resolv] if resolv.is_relative_to("/run") and resolv.is_file() else []


def find_bwrap() -> str | None:
    """The bubblewrap program on this process's PATH, or None."""
    return shutil.which(BWRAP)


async def sandbox_problem() -> str | None:
    """Why this machine cannot make the sandbox, or None when it can.

    Looks for ``bwrap`` on PATH, then runs ``true`` in a sandbox once per bwrap program (a
    kernel without user namespaces for this user, say, fails here rather than in every task).
    """
    bwrap = find_bwrap()
    if bwrap is None:
        return (
            "bwrap (bubblewrap) is not on PATH; install it (apt-get install bubblewrap, "
            "dnf install bubblewrap) or set sandbox: none"
        )
    if bwrap not in _probed:
        probe = SandboxLayout(cwd=Path("/"), hide=system_hidden())
        result = await anyio.run_process(
            bwrap_argv(probe, ["true"], bwrap=bwrap),
            check=False,
            stdin=subprocess.DEVNULL,
        )
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        _probed[bwrap] = (
            None
            if result.returncode == 0
            else f"{bwrap} cannot make a sandbox here: {lines[-1] if lines else result.returncode}"
        )
    return _probed[bwrap]
