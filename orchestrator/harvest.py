"""The commit step: what an agent left in its worktree becomes a commit on the task's branch.

Done once the attempts are over, on success and failure alike (and, shielded, when the task
is cancelled, so that nothing is lost). Before git stores anything, what the agent left is
checked: the worktree's ``.git`` file and admin files are put back if the agent pointed them
elsewhere, the branch must be the base or descend from it (by the agent's own commits), and
neither those commits nor the changed files may be too large or hold a secret's value. What
is refused this way makes the task fail, whatever its agent's outcome
(:attr:`Harvest.refused`); the branch then goes back to its base, by compare-and-swap.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from envelopes import (
    CheckResult,
    CopiedFile,
    ErrorInfo,
    HandoffEnvelope,
    checks_trailer,
    read_bounded,
)

from ._git import Git
from .errors import GitError
from .repo import Repository
from .secrets import Masker
from .workspace import unchanged_copies
from .worktree import (
    TOO_MANY_CHANGES,
    Worktree,
    branch_tip,
    changed_paths,
    check_branch,
    commit_worktree,
    restore_admin_files,
)

__all__ = ["Harvest", "harvest"]


@dataclass(frozen=True)
class Harvest:
    """What the commit step made of a task's worktree.

    ``result_commit`` and ``result_tree`` are the branch's tip and its tree afterwards
    (``committed``: a commit was made for the task's changes). ``refused`` says what was
    found and not taken (kinds ``tamper``, ``secret_leak``, ``too_large``); ``error`` that
    git failed (kind ``commit``). Either makes the task fail, ``refused`` first.
    ``changed`` is every path the result changed from the base, sorted, when the commit step
    knows it (the agent committed nothing itself), else None.
    """

    result_commit: str | None = None
    result_tree: str | None = None
    committed: bool = False
    refused: ErrorInfo | None = None
    error: ErrorInfo | None = None
    changed: list[str] | None = None


async def harvest(
    repo: Repository,
    worktree: Worktree,
    envelope: HandoffEnvelope,
    *,
    run_id: str,
    envelope_sha256: str,
    base_tree: str,
    masker: Masker,
    checks: Sequence[CheckResult] = (),
    copied: Sequence[CopiedFile] = (),
) -> Harvest:
    """Commit whatever the agent left in *worktree* on its branch, as far as it may be taken.

    The files of the plan's ``copy`` (*copied*) are left out while they are as they were
    copied: only a change the agent made to one is committed (orchestrator/workspace.py).

    A git failure is the result's ``error``, not an exception. Cancellation: git commands
    that change something run to their end (see ``Git.run``); those that only read (the
    listing of the changes, the secret check's diffs) are killed, which leaves no lock
    (``GIT_OPTIONAL_LOCKS=0``); then the cancellation propagates.
    """
    refused: ErrorInfo | None = None
    try:
        git = repo.git
        if tampered := await restore_admin_files(worktree):
            message = f"the agent pointed {', '.join(tampered)} elsewhere (put back)"
            refused = ErrorInfo(kind="tamper", message=message, paths=tampered)
        tip = await branch_tip(repo, worktree)
        if problem := await check_branch(repo, worktree, tip):
            # Not this task's doing: the branch goes back to the base (by compare-and-swap
            # from what was found), the worktree is committed on it for the record, and the
            # task fails.
            refs = [f"refs/heads/{worktree.branch}"]
            refused = ErrorInfo(kind="tamper", message=problem, paths=refs)
            tip = await _branch_back_to_base(git, worktree, tip)
        if (
            masker
            and not envelope.allow_secrets_in_commit
            and (why := await _secrets_in_git(repo, worktree, tip, envelope, masker))
        ):
            # The agent's own commits or staged files hold a secret (or are too large to be
            # checked): none of it is taken (its objects stay unreferenced until git gc
            # prunes them).
            refused = refused or why
            await _branch_back_to_base(git, worktree, tip)
            return Harvest(refused=refused)
        # Bounded by the task's timeout: what git reads here, the agent left.
        paths = await changed_paths(repo, worktree, timeout=envelope.timeout)
        if paths is None:
            why = ErrorInfo(kind="too_large", message=TOO_MANY_CHANGES)
            return Harvest(refused=refused or why)  # nothing of it enters the repository
        if paths and copied:
            same = await anyio.to_thread.run_sync(
                unchanged_copies, worktree.path, copied, frozenset(paths)
            )
            paths = [p for p in paths if p not in same]
        if paths and (
            why := await anyio.to_thread.run_sync(
                _refuse_changes, envelope, masker, worktree.path, paths
            )
        ):
            refused = refused or why
            if why.kind == "too_large":
                return Harvest(refused=refused)  # nothing of it enters the repository
            paths = [p for p in paths if p not in why.paths]
        commit, tree, committed = await commit_worktree(
            repo,
            worktree,
            _message(envelope, run_id, envelope_sha256, masker, checks),
            base_tree=base_tree,
            parent=tip,
            paths=paths,
            timeout=envelope.timeout,
        )
    except GitError as exc:
        return Harvest(refused=refused, error=ErrorInfo(kind="commit", message=str(exc)))
    # On the base, the commit holds exactly the paths it took (none when it made none).
    changed = (sorted(paths) if committed else []) if tip == worktree.base_commit else None
    return Harvest(commit, tree, committed, refused, changed=changed)


def _message(
    envelope: HandoffEnvelope,
    run_id: str,
    envelope_sha256: str,
    masker: Masker,
    checks: Sequence[CheckResult] = (),
) -> str:
    """``<agent>: <first line of the task> [task <id>]`` and the run's trailers, masked; with
    checks, a ``Checks:`` trailer saying how the last turn's went (``tests passed, lint
    failed (not required)``), so that a branch tells whether what it holds passed."""
    task = envelope.task.strip()
    subject = task.splitlines()[0] if task else "(no description)"
    trailers = f"Orchestrator-Run: {run_id}\nEnvelope-SHA256: {envelope_sha256}\n"
    if told := checks_trailer([c.model_dump(mode="json") for c in checks]):
        trailers += f"Checks: {told}\n"
    return masker.text(f"{envelope.agent}: {subject} [task {envelope.task_id}]\n\n{trailers}")


async def _branch_back_to_base(git: Git, worktree: Worktree, tip: str) -> str:
    """Move the task's branch back to its base, by compare-and-swap from *tip*; the base."""
    if tip != worktree.base_commit:
        await git.update_ref(f"refs/heads/{worktree.branch}", worktree.base_commit, tip)
    return worktree.base_commit


async def _secrets_in_git(
    repo: Repository, worktree: Worktree, tip: str, envelope: HandoffEnvelope, masker: Masker
) -> ErrorInfo | None:
    """A secret_leak error when the agent's own commits (content, paths, messages, the
    objects as stored) or what it staged hold a secret's value, else None.

    What git prints of them is read up to twice ``max_commit_mb`` (and a MiB) each: larger
    than that, they cannot be checked without holding them whole, and the task fails with
    kind ``too_large``, as changes over ``max_commit_mb`` do."""
    git, args, env = repo.git, worktree.git_args(), worktree.git_env()
    text = ["--no-ext-diff", "--no-textconv", "--text", "--no-color"]
    # What it staged (in the worktree's index), then its commits (in the repository).
    commands: list[tuple[list[str], Path | None]] = [
        ([*args, "diff", "--cached", *text, "--end-of-options", tip], worktree.path)
    ]
    span = f"{worktree.base_commit}..{tip}"
    if tip != worktree.base_commit:
        commands.append((["log", "--format=%B", "--end-of-options", span], None))
        commands.append((["diff", *text, "--end-of-options", worktree.base_commit, tip], None))
    limit = 2 * (envelope.max_commit_mb << 20) + (1 << 20)
    timeout = math.inf if envelope.timeout is None else envelope.timeout
    for command, cwd in commands:
        out, cut = await git.read(
            *command, stdin=b"", limit=limit, timeout=timeout, cwd=cwd, env=env
        )
        if why := _secret_or_too_large(out, cut, masker, limit, envelope):
            return why
    if tip != worktree.base_commit:
        # The commits as stored: log gives a message labelled in another encoding (an
        # ``encoding`` header the agent chose) converted, and a secret written in its bytes
        # as they are would not be seen there.
        ids, cut = await git.read(
            "rev-list", "--end-of-options", span, stdin=b"", limit=limit, timeout=timeout, env=env
        )
        if cut:
            return _secret_or_too_large(b"", cut, masker, limit, envelope)
        raw, cut = await git.read(
            "cat-file", "--batch", stdin=ids, limit=limit, timeout=timeout, env=env
        )
        return _secret_or_too_large(raw, cut, masker, limit, envelope)
    return None


def _secret_or_too_large(
    out: bytes, cut: bool, masker: Masker, limit: int, envelope: HandoffEnvelope
) -> ErrorInfo | None:
    """What git printed of the agent's commits (*out*, *cut* short at *limit*) says about
    committing them: a secret in it, a part too large to check, or None."""
    if masker.found_in(out):  # told as such, even when the rest was not read
        return ErrorInfo(
            kind="secret_leak",
            message="the value of a secret variable is in the agent's own commits or in "
            "what it staged: nothing was committed (set allow_secrets_in_commit to commit "
            "it anyway)",
        )
    if cut:
        return ErrorInfo(
            kind="too_large",
            message=f"the agent's own commits or what it staged are larger than "
            f"{limit >> 20} MiB of diff (twice max_commit_mb, {envelope.max_commit_mb}): "
            "they cannot be checked for secrets, and nothing was committed",
        )
    return None


def _refuse_changes(
    envelope: HandoffEnvelope, masker: Masker, root: Path, paths: list[str]
) -> ErrorInfo | None:
    """Why the changed *paths* must not be committed (too large, holding a secret), if so.

    Blocking (a thread): sizes come from ``lstat`` (links are not followed), and with
    secrets to look for every changed file is read, up to the size limit.
    """
    limit = envelope.max_commit_mb * 1024 * 1024
    sizes: dict[str, int] = {}
    for path in paths:
        with contextlib.suppress(OSError):
            sizes[path] = os.lstat(root / path).st_size
    if sum(sizes.values()) > limit:
        largest = sorted(sizes, key=lambda p: -sizes[p])[:3]
        return ErrorInfo(
            kind="too_large",
            message=f"the changes are {sum(sizes.values())} bytes, more than max_commit_mb "
            f"({envelope.max_commit_mb}); largest: {', '.join(largest)}; nothing was "
            "committed",
            paths=largest,
        )
    if not masker or envelope.allow_secrets_in_commit:
        return None
    leaking = [p for p in paths if p not in sizes and masker.found_in(p.encode())]
    for path in sizes:
        try:
            if os.path.islink(root / path):
                data = os.readlink(root / path).encode("utf-8", "surrogateescape")
            else:
                data = read_bounded(path, limit, within=root)
        except OSError:
            continue  # not a regular file: git does not commit it either
        if masker.found_in(data) or masker.found_in(path.encode()):
            leaking.append(path)
    if not leaking:
        return None
    return ErrorInfo(
        kind="secret_leak",
        message=f"the value of a secret variable is in {', '.join(leaking)}: "
        "not committed (set allow_secrets_in_commit to commit it anyway)",
        paths=leaking,
    )
