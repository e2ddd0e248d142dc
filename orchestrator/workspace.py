"""What a plan puts around each task's worktree and agent: ``copy``, ``hooks`` and ``ports``.

**copy**: files of the main checkout that git does not give a worktree (an ignored ``.env``, a
local config) are copied into it whenever it is made ready for a task (new, borrowed from the
pool, or cleaned for a retry), before its hooks. A copy fills in and never overwrites: what
the checkout put there stays. Symbolic links are never followed, on either side: a link is
copied as a link when its target stays inside the repository, and skipped when it points out
of it; a listed path beyond a link is skipped. What was copied, with digests, is the result's
``provenance.copied``; the commit step leaves out a copied file that is unchanged
(:func:`unchanged_copies`), so that a copied ``.env`` that is not ignored is never committed
unless the agent changed it.

**hooks**: commands run as steps (orchestrator/steps.py: in the worktree, with the task's
environment and isolation, their own timeout and logs), recorded in the result's ``hooks``.
``after_create`` and ``before_run`` must pass (the task fails, kind ``hook``); a failing
``after_run`` or ``before_remove`` is recorded, told as a warning of the report, and ignored.

**ports**: each running task holds a slot, 0 to ``concurrency - 1``, taken when it starts and
given back when it ends (:class:`PortSlots`), so that no two tasks running at once share one;
``ORCHESTRATOR_SLOT`` names it and, with ``ports``, ``ORCHESTRATOR_PORT_BASE`` is the first of
its block of ``per_task`` ports.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import posixpath
import stat
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import anyio

from envelopes import CopiedFile, Hooks, Ports, Step, TaskResult, hash_file, open_regular

from .steps import StepRun, failure_of, run_steps

if TYPE_CHECKING:
    from .attempt import AttemptRequest
    from .secrets import Masker

__all__ = [
    "REQUIRED_HOOKS",
    "HookName",
    "PortSlots",
    "copy_into",
    "hook_step",
    "hook_warnings",
    "missing_copies",
    "run_hook",
    "slot_env",
    "unchanged_copies",
]

HookName = Literal["after_create", "before_run", "after_run", "before_remove"]
#: The hooks that must pass: without them the worktree, or the turn, is not ready.
REQUIRED_HOOKS: frozenset[HookName] = frozenset({"after_create", "before_run"})

_CHUNK = 1 << 20


def hook_step(hooks: Hooks, name: HookName) -> Step | None:
    """The plan's hook *name* as a step (None when the plan has none): named after it, with
    the hooks' timeout, required when its failure fails the task."""
    command = getattr(hooks, name)
    if command is None:
        return None
    return Step(name=name, run=command, timeout=hooks.timeout, required=name in REQUIRED_HOOKS)


async def run_hook(
    hooks: Hooks,
    name: HookName,
    *,
    turn: int,
    request: AttemptRequest,
    values: Mapping[str, str],
    masker: Masker,
    log_stem: Path,
) -> StepRun | None:
    """Run the hook *name* for *turn* as a step (see :func:`~orchestrator.steps.run_steps`):
    *request*'s cwd, environment and isolation, its logs ``logs/<task>.hook-<name>.<turn>``.
    None when the plan has no such hook.

    Cancellation: the hook's process group is ended, and the cancellation propagates.
    """
    step = hook_step(hooks, name)
    if step is None:
        return None
    runs = await run_steps(
        [step], "hook", turn=turn, request=request, values=values, masker=masker, log_stem=log_stem
    )
    return runs[0]


def hook_warnings(results: Iterable[TaskResult]) -> list[str]:
    """One line per hook that failed and was ignored (``after_run``, ``before_remove``)."""
    return [
        f"task {result.task_id}: {failure_of(StepRun(hook)).message} (ignored)"
        for result in results
        for hook in result.hooks
        if not hook.required and not hook.passed
    ]


class PortSlots:
    """The slots of a run's running tasks, 0 to *count* - 1: a task takes the lowest free one
    when it starts and gives it back when it ends."""

    def __init__(self, count: int, *, only: int | None = None) -> None:
        #: With *only*: that one slot (a task's on a Dask worker, chosen by the coordinator).
        self._free = [only] if only is not None else list(range(count))
        self._given_back: anyio.Event | None = None

    async def take(self) -> int:
        """The lowest free slot, once there is one (the scheduler starts no more tasks than
        there are slots, so this waits only for a task that is giving its slot back).

        Cancellation: no slot is taken.
        """
        while not self._free:
            if self._given_back is None:
                self._given_back = anyio.Event()
            await self._given_back.wait()
        return heapq.heappop(self._free)

    def give_back(self, slot: int) -> None:
        """Make *slot* free again."""
        heapq.heappush(self._free, slot)
        if self._given_back is not None:
            self._given_back.set()
            self._given_back = None


def slot_env(slot: int | None, ports: Ports | None) -> dict[str, str]:
    """``ORCHESTRATOR_SLOT`` and, with *ports*, ``ORCHESTRATOR_PORT_BASE`` for *slot*."""
    if slot is None:
        return {}
    env = {"ORCHESTRATOR_SLOT": str(slot)}
    if ports is not None:
        env["ORCHESTRATOR_PORT_BASE"] = str(ports.base + slot * ports.per_task)
    return env


def copy_into(source: Path, target: Path, paths: Sequence[str]) -> list[CopiedFile]:
    """Copy each of *paths* (relative, as a plan's ``copy`` checks them), file or directory,
    from *source*, the main checkout, into *target*, a worktree; what was copied, in order.

    Blocking (a thread). Skipped: a path missing from *source*, one beyond a symbolic link or
    a file in either tree, what is already in *target* (never overwritten), a symbolic link
    whose target is absolute or leaves the repository, and what is neither a file, a
    directory nor a link (a FIFO, a socket). OSError when a file cannot be copied.
    """
    copied: list[CopiedFile] = []
    for path in paths:
        if not (_beyond_link(source, path) or _beyond_link(target, path)):
            _copy(source, target, path, copied)
    return copied


def _beyond_link(root: Path, path: str) -> bool:
    """Whether a directory on the way from *root* to *path* is not a plain directory (a link,
    a file); a missing one is not (it is made as a plain directory)."""
    here = root
    for part in path.split("/")[:-1]:
        here = here / part
        try:
            info = os.lstat(here)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(info.st_mode):
            return True
    return False


def _copy(source: Path, target: Path, path: str, copied: list[CopiedFile]) -> None:
    src, dst = source / path, target / path
    try:
        info = os.lstat(src)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        try:
            if not stat.S_ISDIR(os.lstat(dst).st_mode):
                return  # a file or a link where the directory would go: not followed
        except FileNotFoundError:
            os.makedirs(dst)
        with os.scandir(src) as entries:
            names = sorted(entry.name for entry in entries)
        for name in names:
            _copy(source, target, f"{path}/{name}", copied)
    elif os.path.lexists(dst):
        return
    elif stat.S_ISLNK(info.st_mode):
        link = os.readlink(src)
        if _stays_inside(source, path, link):
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(link, dst)
            text = os.fsencode(link)
            digest = hashlib.sha256(text).hexdigest()
            copied.append(CopiedFile(path=path, sha256=digest, size=len(text), symlink=True))
    elif stat.S_ISREG(info.st_mode):
        dst.parent.mkdir(parents=True, exist_ok=True)
        copied.append(_copy_file(src, dst, path, stat.S_IMODE(info.st_mode)))


def _stays_inside(source: Path, path: str, link: str) -> bool:
    """Whether the link at *path*, pointing to *link*, points inside the repository: its
    target relative, inside both as written and as resolved in the main checkout (a ``..``
    after another link inside goes where that link goes)."""
    if posixpath.isabs(link):
        return False
    written = posixpath.normpath(posixpath.join(posixpath.dirname(path), link))
    if written == ".." or written.startswith("../"):
        return False
    root = os.path.realpath(source)
    resolved = os.path.realpath(source / path)
    return resolved == root or resolved.startswith(root + os.sep)


def _copy_file(src: Path, dst: Path, path: str, mode: int) -> CopiedFile:
    """Copy one regular file (never through a link, never over a file), hashing it."""
    digest, size = hashlib.sha256(), 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    with (
        os.fdopen(open_regular(src), "rb") as reader,
        os.fdopen(os.open(dst, flags, 0o600), "wb") as writer,
    ):
        while chunk := reader.read(_CHUNK):
            digest.update(chunk)
            writer.write(chunk)
            size += len(chunk)
        os.fchmod(writer.fileno(), mode)
    return CopiedFile(path=path, sha256=digest.hexdigest(), size=size)


def unchanged_copies(root: Path, copied: Iterable[CopiedFile], among: Collection[str]) -> set[str]:
    """The paths of *among* that are copied files still exactly as they were copied into the
    worktree *root* (a link still a link to the same target). Blocking (a thread)."""
    same: set[str] = set()
    for entry in copied:
        if entry.path not in among:
            continue
        path = root / entry.path
        try:
            if entry.symlink:
                text = os.fsencode(os.readlink(path))
                found = (hashlib.sha256(text).hexdigest(), len(text))
            else:
                found = hash_file(path, entry.size)
        except OSError:
            continue  # no longer a file, or a link where a file was: changed
        if found == (entry.sha256, entry.size):
            same.add(entry.path)
    return same


def missing_copies(root: Path, paths: Iterable[str]) -> list[str]:
    """One line per path of a plan's ``copy`` that a run would not copy from the main
    checkout *root*: missing, or beyond a symbolic link (``orchestrator validate`` warns)."""
    problems = []
    for path in paths:
        if _beyond_link(root, path):
            problems.append(f"copy: {path} is beyond a symbolic link in {root}: not copied")
        elif not os.path.lexists(root / path):
            problems.append(f"copy: {path} does not exist in {root}")
    return problems
