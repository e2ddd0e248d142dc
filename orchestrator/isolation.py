"""A task's isolation: the environment its agent starts from, its sandbox, its limits.

:func:`agent_environment` is where an agent's variables start: the orchestrator's own
(``inherit``), or a minimal base plus the names the plan passes. :func:`isolate` turns one
command of an attempt (of an :class:`~orchestrator.attempt.AttemptRequest`) into what
:func:`~orchestrator.process.run_command` runs: as it is, or wrapped in a bubblewrap sandbox
laid out for the task (see orchestrator/sandbox.py) with a private git state
(orchestrator/sandbox_git.py); after it, it takes the agent's commits and its output out of
the sandbox. :meth:`Spawn.error` tells a limit that ended an attempt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import getpass
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio

from envelopes import ErrorInfo, HandoffEnvelope, ref_safe

from ._fs import last_line, remove_tree
from .attempt import AttemptRequest
from .errors import GitError
from .limits import Rlimit, limit_error, rlimits_of
from .process import ProcessOutcome
from .repo import Repository
from .sandbox import SandboxLayout, bwrap_argv, find_bwrap, system_hidden, system_shown
from .sandbox_git import PrivateGit, adopt_commits, prepare_private_git
from .venv import Venv
from .worktree import Worktree

__all__ = ["BASE_VARIABLES", "SYSTEM_PATH", "Spawn", "agent_environment", "isolate"]

#: What an agent that does not inherit the orchestrator's environment gets of it.
BASE_VARIABLES = ("HOME", "LANG", "TERM", "TMPDIR", "USER")
#: PATH of an agent that does not inherit it (its venv's ``bin`` comes first).
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def agent_environment(base: Mapping[str, str], envelope: HandoffEnvelope) -> dict[str, str]:
    """The variables an agent starts from, before its agent's and its task's own are set.

    All of *base* (the orchestrator's environment) with ``inherit_env``; otherwise PATH (the
    system's), HOME, LANG, TERM, TMPDIR and USER, and the names in ``pass_env`` found in
    *base* (``PATH`` among them: the orchestrator's PATH instead of the system's).
    """
    if envelope.inherit_env:
        return dict(base)
    env = {"PATH": SYSTEM_PATH}
    env.update({name: base[name] for name in BASE_VARIABLES if name in base})
    env.setdefault("HOME", os.path.expanduser("~"))
    env.setdefault("LANG", "C.UTF-8")
    env.setdefault("TMPDIR", "/tmp")
    if "USER" not in env:
        with contextlib.suppress(KeyError, OSError):
            env["USER"] = getpass.getuser()
    env.update({name: base[name] for name in envelope.pass_env if name in base})
    return env


@dataclass
class Spawn:
    """One command as it is to run: argv, cwd and environment, limits, and whether sandboxed.

    ``problem`` is set when the command has ended: why the agent's commits could not be
    taken out of the sandbox, if they could not.
    """

    argv: list[str]
    cwd: Path
    env: dict[str, str]
    rlimits: list[Rlimit]
    sandboxed: bool = False
    problem: str | None = None

    def outcome(self, outcome: ProcessOutcome) -> ProcessOutcome:
        """*outcome* as the command's own: bwrap exits with 128 + N when its command was
        killed by signal N."""
        code = outcome.exit_code
        if self.sandboxed and code is not None and 128 < code <= 128 + signal.NSIG:
            return dataclasses.replace(outcome, exit_code=None, signal=code - 128)
        return outcome


async def isolate_error(
    envelope: HandoffEnvelope, spawn: Spawn, outcome: ProcessOutcome, stderr: Path
) -> ErrorInfo | None:
    """Why the attempt failed when the plan's isolation is the reason: a limit it hit
    (``limit``), or its commits that could not come out of the sandbox (``commit``)."""
    if spawn.rlimits and (outcome.signal is not None or outcome.exit_code not in (None, 0)):
        last = await anyio.to_thread.run_sync(last_line, stderr)
        if (error := limit_error(envelope.limits, outcome, last)) is not None:
            return error
    if spawn.problem is not None and outcome.exit_code == 0:
        return ErrorInfo(kind="commit", message=f"the agent's own commits: {spawn.problem}")
    return None


@dataclass(frozen=True)
class _TaskPaths:
    worktree: Worktree | None
    venv: Venv | None
    envelope: Path
    output: Path


@asynccontextmanager
async def isolate(request: AttemptRequest, argv: Sequence[str]) -> AsyncIterator[Spawn]:
    """The command *argv* of one attempt as it is to run under the envelope's isolation.

    Without a sandbox, *argv* as it is (with the limits), in ``request.cwd`` with
    ``request.env``: nothing is made. With one, a scratch directory of the attempt in the run
    directory holds its private git state and output file; when the block ends (cancelled or
    not), the agent's commits and output are taken out of it, under a shielded scope, and it
    is removed. OSError when it cannot be made, or bwrap is not on PATH.
    """
    envelope, worktree, repo = request.envelope, request.worktree, request.repo
    rlimits = rlimits_of(envelope.limits)
    if envelope.sandbox == "none":
        yield Spawn(list(argv), request.cwd, dict(request.env), rlimits)
        return
    bwrap = find_bwrap()
    if bwrap is None:
        raise OSError(errno.ENOENT, "the sandbox needs bwrap (bubblewrap), which is not on PATH")
    name = f"{ref_safe(envelope.task_id)}.attempt-{request.attempt}"
    scratch = request.run_dir / "sandbox" / name
    paths = _TaskPaths(worktree, request.venv, request.envelope_path, request.output_path)

    def prepare() -> tuple[PrivateGit | None, SandboxLayout]:
        private = _prepare(repo, worktree, scratch)
        layout = _layout(repo, request.state_dir, envelope, argv, paths, private, scratch)
        return private, layout

    try:
        private, layout = await anyio.to_thread.run_sync(prepare)
    except BaseException:
        await anyio.to_thread.run_sync(remove_tree, scratch, True)
        raise
    home = _home()
    spawn = Spawn(
        bwrap_argv(layout, argv, bwrap=bwrap),
        worktree.path if worktree is not None else scratch,
        {
            **request.env,
            "HOME": str(home),
            "TMPDIR": "/tmp",
            **(private.env() if private is not None else {}),
        },
        rlimits,
        sandboxed=True,
    )
    try:
        yield spawn
    finally:
        with anyio.CancelScope(shield=True):
            try:
                if private is not None and repo is not None:
                    try:
                        spawn.problem = await adopt_commits(repo, private)
                    except (GitError, OSError) as exc:
                        spawn.problem = f"they could not be taken: {exc}"
                await anyio.to_thread.run_sync(
                    _take_output, scratch / "output.json", request.output_path
                )
            finally:
                await anyio.to_thread.run_sync(remove_tree, scratch, True)


def _home() -> Path:
    """The sandbox's HOME: the real one's path (an empty tmpfs there), or the private /tmp."""
    home = Path(os.path.expanduser("~")).resolve()
    return home if home in system_hidden() else Path("/tmp")


def _prepare(
    repo: Repository | None, worktree: Worktree | None, scratch: Path
) -> PrivateGit | None:
    # A killed orchestrator's attempt of the same number left its scratch behind (a resume
    # runs the attempt again): it is the orchestrator's own directory, gone over without
    # following links.
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    (scratch / "output.json").touch()
    if worktree is None or repo is None:
        return None
    return prepare_private_git(worktree, repo.common_dir, scratch)


def _take_output(source: Path, target: Path) -> None:
    """The agent's output file out of the sandbox; an empty one is none."""
    try:
        if source.lstat().st_size > 0 and source.is_file() and not source.is_symlink():
            os.replace(source, target)
    except FileNotFoundError:
        pass


def _layout(
    repo: Repository | None,
    state_dir: Path,
    envelope: HandoffEnvelope,
    argv: Sequence[str],
    paths: _TaskPaths,
    private: PrivateGit | None,
    scratch: Path,
) -> SandboxLayout:
    """What the task's command sees (see orchestrator/sandbox.py)."""
    hide = [*system_hidden(), state_dir]
    shown = system_shown()
    if repo is not None:
        if not repo.bare:
            hide.append(repo.root)
        shown.append(repo.common_dir)
        admin = repo.common_dir / "worktrees"
        if admin.is_dir():
            hide.append(admin)
            hide += _other_worktrees(admin, paths.worktree, hide, repo.common_dir)
    hide = [_real(p) for p in hide]
    # Shown again if hidden: the interpreters a command may run, and the files it names.
    wanted = [Path(sys.prefix), Path(sys.base_prefix)]
    if paths.venv is not None:
        wanted += _base_interpreter(paths.venv.path)
    wanted += [Path(a) for a in argv if os.path.isabs(a) and os.path.isfile(a)]
    roots = [*hide, Path("/tmp")]
    for path in wanted:
        real = _real(path)
        if any(real.is_relative_to(root) for root in roots):
            shown.append(real)
    shown.append(paths.envelope)
    worktree, venv = paths.worktree, paths.venv
    mounts = [
        (scratch / "output.json", paths.output, True),
        *(private.mounts() if private is not None else ()),
    ]
    return SandboxLayout(
        cwd=_real(worktree.path) if worktree is not None else _home(),
        hide=hide,
        read_only=[_real(p) for p in shown],
        writable=[_real(p.path) for p in (worktree, venv) if p is not None],
        # Where they are, links resolved: as the hidden places are named.
        mounts=[(source, _real(target), rw) for source, target, rw in mounts],
        network=envelope.network,
    )


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _other_worktrees(
    admin: Path, own: Worktree | None, hidden: list[Path], common_dir: Path
) -> list[Path]:
    """The repository's other worktrees not hidden already (``<admin>/<name>/gitdir`` names
    each one's ``.git``); the git directory, shown again, is not a hiding place."""
    out = []
    for gitdir in admin.glob("*/gitdir"):
        try:
            path = Path(gitdir.read_text(encoding="utf-8").strip()).parent
        except (OSError, UnicodeDecodeError):
            continue
        if not path.is_absolute() or (own is not None and path == own.path):
            continue
        covered = any(
            path.is_relative_to(h)
            and not (common_dir.is_relative_to(h) and path.is_relative_to(common_dir))
            for h in hidden
            if h != admin
        )
        if not covered and path.is_dir():
            out.append(path)
    return out


def _base_interpreter(venv: Path) -> list[Path]:
    """The installation a venv's interpreter comes from (``home`` in ``pyvenv.cfg``)."""
    try:
        lines = (venv / "pyvenv.cfg").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() == "home" and value.strip():
            return [Path(value.strip()).parent]
    return []
