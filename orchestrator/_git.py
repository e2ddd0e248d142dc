"""Running git: one small async runner per repository, counting its calls.

The count is part of the contract with the test suite: git subprocesses per task are a
regression guard (see docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from envelopes import is_object_id

from . import stall
from .errors import GitError
from .guard import RepoGuard, user_git_files
from .locks import try_flock
from .stall import END_GRACE_S

__all__ = [
    "FALLBACK_IDENTITY",
    "HARDENING",
    "REPOSITORY_VARIABLES",
    "Git",
    "check_ids",
    "clean_environment",
]

#: Used for the orchestrator's commits when neither git config nor GIT_* variables name anyone.
FALLBACK_IDENTITY = ("worktree-orchestrator", "worktree-orchestrator@localhost")

#: What ``git rev-parse --local-env-vars`` lists: variables that point git at one particular
#: repository, index or object store. Inherited from a hook or a wrapper, they would make
#: every task's git commands (and the agents' own) act on that repository instead of the
#: task's worktree, so they are removed from every environment the orchestrator hands out.
REPOSITORY_VARIABLES = frozenset(
    {
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_CONFIG",
        "GIT_CONFIG_PARAMETERS",
        "GIT_CONFIG_COUNT",
        "GIT_OBJECT_DIRECTORY",
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_IMPLICIT_WORK_TREE",
        "GIT_GRAFT_FILE",
        "GIT_INDEX_FILE",
        "GIT_NO_REPLACE_OBJECTS",
        "GIT_REPLACE_REF_BASE",
        "GIT_PREFIX",
        "GIT_INTERNAL_SUPER_PREFIX",
        "GIT_SHALLOW_FILE",
        "GIT_COMMON_DIR",
    }
)


def clean_environment(env: Mapping[str, str]) -> dict[str, str]:
    """*env* without the variables that tie git to one repository (REPOSITORY_VARIABLES)."""
    return {
        k: v
        for k, v in env.items()
        if k not in REPOSITORY_VARIABLES
        and not k.startswith("GIT_CONFIG_KEY_")
        and not k.startswith("GIT_CONFIG_VALUE_")
    }


_BASE_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_OPTIONAL_LOCKS": "0",
    # A replace ref (refs/replace/<id>) makes git show another object in place of the one
    # named: an agent could make a result commit look like something else to every check.
    "GIT_NO_REPLACE_OBJECTS": "1",
    # Grafts (.git/info/grafts, deprecated) rewrite commits' parents the same way, even into
    # a cycle: none is read.
    "GIT_GRAFT_FILE": os.devnull,
    "LC_ALL": "C",
    "LANGUAGE": "C",
}

#: Options every git command of the orchestrator runs with: whatever the repository's config
#: says (an agent may have written it), no hook runs, no fsmonitor program, no signing
#: program, no automatic gc or maintenance; commit messages written and read as UTF-8 (a
#: repository configured for Latin-1 would label the orchestrator's UTF-8 messages Latin-1,
#: and give its logs back re-encoded). Command-line ``-c`` wins over every config file.
#: (Filters and merge drivers named by attributes cannot be switched off this way; the
#: repository guard, orchestrator/guard.py, refuses to run git once the config has changed.)
HARDENING = (
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "core.fsmonitor=false",
    "-c",
    "commit.gpgSign=false",
    "-c",
    "tag.gpgSign=false",
    "-c",
    "gc.auto=0",
    "-c",
    "maintenance.auto=false",
    "-c",
    "core.sshCommand=false",
    "-c",
    "i18n.commitEncoding=UTF-8",
    "-c",
    "i18n.logOutputEncoding=UTF-8",
)


#: A ref name the kept ``update-ref --stdin`` takes as one word (its lines are split on
#: spaces): anything else goes to a ``git update-ref`` of its own, as an argument.
_PLAIN_REF = re.compile(r"refs/[!-~]+")


def check_ids(*values: str | None) -> None:
    """GitError unless every value is a full object id (see ``envelopes.is_object_id``).

    Called before a revision that came from a report, a journal or an agent reaches git:
    ``HEAD``, a branch name or ``--output=...`` never does.
    """
    for value in values:
        if not is_object_id(value):
            raise GitError(["<check>"], 128, f"fatal: not an object id: {value!r}")


class Git:
    """Runs ``git -C <cwd> ...`` for one repository."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.calls = 0
        #: While a run is on, its repository guard: checked (and what changed put back)
        #: before every command, so that git never runs what an agent planted.
        self.guard: RepoGuard | None = None
        #: The repository's git directory shared by its worktrees (set once it is known):
        #: where a ref's own files are checked before git is asked about the ref.
        self.common_dir: Path | None = None
        self._env = {**clean_environment(os.environ), **_BASE_ENV}
        self._identity: dict[str, str] | None = None
        self._asking = _LoopLock()
        self._refs: _Kept | None = None
        self._objects: _Kept | None = None
        self._ident_cache: dict[tuple[tuple[str, str], ...], tuple[bytes, bytes, bool]] = {}

    @property
    def environment(self) -> Mapping[str, str]:
        """The environment every git command of this runner gets (before its own *env*)."""
        return self._env

    async def run(
        self,
        *args: str,
        cwd: Path | None = None,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (a bound on one git command)
    ) -> subprocess.CompletedProcess[bytes]:
        """Run git and return its result; raise GitError on failure when *check*.

        With *timeout*, git is killed after that many seconds and GitError raised, whatever
        *check* says: for commands that read what an agent left (a FIFO in a worktree blocks
        ``git status`` forever).
        """
        self.calls += 1
        if self.guard is not None:
            self.guard.check()
        command = ["git", "-C", str(cwd or self.repo), *HARDENING, *args]
        # A started git command is never killed: killed, it can leave ref and index locks
        # behind. It runs to its end (milliseconds, for what the engine runs) and a pending
        # cancellation is delivered right after.
        # (Unless it would wait for ever on what an agent planted: see orchestrator/stall.py.)
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(timeout if timeout is not None else math.inf) as limit:
                try:
                    result, stopped = await self._run_watched(
                        command, stdin, {**self._env, **env} if env else self._env, cwd
                    )
                except* (anyio.BrokenResourceError, BrokenPipeError, ConnectionResetError):
                    # git ended with success before it read all its input: what it made of
                    # part of it is no answer, so it is a failure. (Seen when the writer
                    # saw the pipe close: a git that exits before the first write is not
                    # told apart, as asyncio reports that write's EPIPE only later. No git
                    # command the engine feeds exits 0 before it read all of its input.)
                    raise GitError(args, -1, "fatal: git ended before it read its input") from None
        if limit.cancelled_caught:
            raise GitError(
                args, -9, f"fatal: git did not finish within {timeout:g} s and was killed"
            )
        if stopped is not None:
            raise _blocked(args, stopped)
        await anyio.lowlevel.checkpoint_if_cancelled()
        if check and result.returncode != 0:
            raise GitError(args, result.returncode, result.stderr.decode(errors="replace"))
        return result

    async def read(
        self,
        *args: str,
        stdin: bytes,
        limit: int,
        timeout: float,  # noqa: ASYNC109 (a bound on one git command)
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        quiet: bool = False,
    ) -> tuple[bytes, bool]:
        """Run a git command that only reads (``diff-tree``, ``log``) and return at most *limit*
        bytes of its stdout, and whether it was cut short there. Past *limit* or *timeout* it
        is killed (a command that only reads leaves no lock behind). GitError when it fails,
        runs out of time, or (with *quiet*) writes anything to stderr."""
        self.calls += 1
        if self.guard is not None:
            self.guard.check()
        command = ["git", "-C", str(cwd or self.repo), *HARDENING, *args]
        out: list[bytes] = []
        err = bytearray()
        size, cut = 0, False
        stopped: list[Path] | None = None
        async with await anyio.open_process(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**self._env, **env} if env else self._env,
        ) as process:
            stdin_stream, stdout, stderr = process.stdin, process.stdout, process.stderr
            assert stdin_stream is not None and stdout is not None and stderr is not None

            async def feed() -> None:
                with contextlib.suppress(anyio.BrokenResourceError, OSError):
                    await stdin_stream.send(stdin)
                with contextlib.suppress(anyio.BrokenResourceError, OSError):
                    await stdin_stream.aclose()

            async def drain_errors() -> None:
                async for chunk in stderr:
                    if len(err) < 4096:
                        err.extend(chunk[: 4096 - len(err)])

            async def drain() -> None:
                nonlocal size, cut
                async for chunk in stdout:
                    out.append(chunk)
                    size += len(chunk)
                    if size > limit:
                        cut = True
                        tg.cancel_scope.cancel()
                        return

            with anyio.move_on_after(timeout) as limited:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(feed)
                    tg.start_soon(drain_errors)
                    tg.start_soon(drain)
                    stopped = await self.wait(process, cwd)
            if cut or limited.cancelled_caught:
                stall.signal_child(process, signal.SIGKILL)  # (unless it ended meanwhile)
            returncode = await process.wait()
        if stopped is not None:
            raise _blocked(args, stopped)
        if limited.cancelled_caught:
            raise GitError(
                args, -9, f"fatal: git did not finish within {timeout:g} s and was killed"
            )
        if not cut and (returncode != 0 or (quiet and err)):
            # quiet: a word on stderr is a failure too (``ls-files`` and ``diff-files`` say
            # there that they could not read a directory, and still exit 0).
            raise GitError(args, returncode or 1, err.decode(errors="replace"))
        return b"".join(out)[:limit], cut

    async def _run_watched(
        self,
        command: list[str],
        stdin: bytes | None,
        env: Mapping[str, str],
        cwd: Path | None,
    ) -> tuple[subprocess.CompletedProcess[bytes], list[Path] | None]:
        """*command* run to its end (as ``anyio.run_process``), its output collected; and,
        if it was stopped waiting for ever on what an agent planted, on what (:meth:`wait`).
        Its input is written beside the wait: git blocked before it read it all is still
        looked at."""
        output = [b"", b""]

        async def collect(stream: anyio.abc.ByteReceiveStream, index: int) -> None:
            chunks = [chunk async for chunk in stream]
            output[index] = b"".join(chunks)

        broken: list[BaseException] = []

        async def feed(stream: anyio.abc.ByteSendStream, data: bytes) -> None:
            try:
                await stream.send(data)
                await stream.aclose()
            except (anyio.BrokenResourceError, BrokenPipeError, ConnectionResetError) as exc:
                broken.append(exc)  # git ended first: said after the wait (if not stopped)

        async with await anyio.open_process(
            command,
            # Given input (even none at all) or nothing: never this process's stdin.
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        ) as process:
            assert process.stdout is not None and process.stderr is not None
            async with anyio.create_task_group() as tg:
                tg.start_soon(collect, process.stdout, 0)
                tg.start_soon(collect, process.stderr, 1)
                if process.stdin is not None and stdin:
                    tg.start_soon(feed, process.stdin, stdin)
                stopped = await self.wait(process, cwd)
        if broken and stopped is None and process.returncode == 0:
            # (A git that failed says why on stderr, which is what is told then: whether
            # the writer saw the pipe close before the exit was noticed is a race.)
            raise broken[0]
        assert process.returncode is not None
        return subprocess.CompletedProcess(command, process.returncode, *output), stopped

    async def wait(
        self,
        process: Process,
        cwd: Path | None,
        until: Callable[[], Awaitable[object]] | None = None,
    ) -> list[Path] | None:
        """Wait for git *process* (run in *cwd*) to end, or *until* to return, unless it
        would wait for ever on what an agent planted (orchestrator/stall.py): then it is
        stopped, and what it was stuck on returned (empty: not known)."""
        return await stall.wait(process, *self._watched(cwd), until=until)

    def _watched(
        self, cwd: Path | None
    ) -> tuple[Path, list[Path], Callable[[dict[Path, float]], None] | None]:
        common = self.common_dir or self.repo / ".git"
        also = [(cwd or self.repo) / ".git", *user_git_files()]
        return common, also, self.guard.removed if self.guard is not None else None

    async def out(
        self,
        *args: str,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (a bound on one git command)
    ) -> str:
        """Run git and return its stdout, stripped (*timeout* as :meth:`run` takes it)."""
        result = await self.run(*args, cwd=cwd, env=env, timeout=timeout)
        return result.stdout.decode(errors="replace").strip()

    async def ok(self, *args: str, cwd: Path | None = None) -> bool:
        """Run git and tell whether it exited 0."""
        return (await self.run(*args, cwd=cwd, check=False)).returncode == 0

    def use_identity(self, env: Mapping[str, str]) -> None:
        """Make commits as *env* says (``GIT_AUTHOR_NAME``...), whatever the config says: a
        Dask worker's commits carry the coordinator's identity."""
        self._identity = dict(env)

    async def identity_env(self) -> dict[str, str]:
        """Author/committer variables for commits, falling back when no identity is set.

        The user's identity (git config or GIT_AUTHOR_* / GIT_COMMITTER_*) always wins; only a
        missing name or email is filled with :data:`FALLBACK_IDENTITY`, so commits work on a
        fresh machine.
        """
        if self._identity is not None:
            return self._identity
        # Asked once, however many tasks commit at the same moment.
        async with self._asking.hold():
            if self._identity is not None:
                return self._identity
            result = await self.run(
                "config", "--get-regexp", r"^(user|author|committer)\.(name|email)$", check=False
            )
            configured = dict(
                line.split(" ", 1)
                for line in result.stdout.decode(errors="replace").splitlines()
                if " " in line
            )
            env: dict[str, str] = {}
            for role in ("AUTHOR", "COMMITTER"):
                # As git reads them: GIT_<ROLE>_*, then <role>.*, then user.* (and EMAIL).
                own = role.lower()
                if not (
                    os.environ.get(f"GIT_{role}_NAME")
                    or configured.get(f"{own}.name")
                    or configured.get("user.name")
                ):
                    env[f"GIT_{role}_NAME"] = FALLBACK_IDENTITY[0]
                if not (
                    os.environ.get(f"GIT_{role}_EMAIL")
                    or configured.get(f"{own}.email")
                    or configured.get("user.email")
                    or os.environ.get("EMAIL")
                ):
                    env[f"GIT_{role}_EMAIL"] = FALLBACK_IDENTITY[1]
            self._identity = env
        return self._identity

    @contextlib.asynccontextmanager
    async def kept(self) -> AsyncIterator[None]:
        """While open, :meth:`update_ref` and :meth:`commit_tree` go through git processes
        kept running (``update-ref --stdin``, ``hash-object --stdin-paths``: see
        :class:`_Kept`) instead of one each; closed (their standard input), they end.
        Opened again inside, they are the same ones."""
        if self._refs is not None:
            yield
            return
        refs = self._refs = _Kept(self, ["update-ref", "--stdin"], timeout=REF_TIMEOUT_S)
        objects = self._objects = _Kept(
            self, ["hash-object", "-w", "-t", "commit", "--stdin-paths"], timeout=OBJECT_TIMEOUT_S
        )
        try:
            yield
        finally:
            self._refs = self._objects = None
            with anyio.CancelScope(shield=True):
                try:
                    await refs.aclose()
                finally:
                    await objects.aclose()

    def unblock_ref(self, ref: str) -> None:
        """Make sure no git command about *ref* (``refs/heads/x``) can block on its files.

        git opens a ref's loose file to read it and its reflog to write it: either made a
        FIFO, or a link to one (an agent can write the shared refs/ and logs/), would block
        that command for ever. Such a file is removed when it is the git directory's own (a
        FIFO holds nothing; a link is removed, never what it points at), and GitError says
        so: the operation on *ref* fails at once rather than hanging, and the next one finds
        the ref's place free.
        """
        if self.common_dir is None or not _PLAIN_REF.fullmatch(ref) or ".." in ref:
            return  # not a name git takes as a loose ref: git refuses it itself
        for path in (self.common_dir / ref, self.common_dir / "logs" / ref):
            try:
                mode = os.lstat(path).st_mode
                if stat.S_ISLNK(mode):
                    mode = os.stat(path).st_mode  # what git would open
            except OSError:
                continue  # absent, or a dangling link: git finds no file either
            if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
                continue
            root, parent = os.path.realpath(self.common_dir), os.path.realpath(path.parent)
            removed = ""
            if parent == root or parent.startswith(root + os.sep):
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    removed = ", and was removed"
            raise GitError(
                ["update-ref", ref],
                128,
                f"fatal: {path} was not a regular file (a FIFO, or a link to one){removed}",
            )

    async def update_ref(
        self, ref: str, new: str | None, old: str | None = None, *, check: bool = True
    ) -> bool:
        """Point *ref* at *new* (None: delete it) if it is at *old* ("": only if it does not
        exist; None: whatever it is at), as ``git update-ref`` does; whether it did. GitError
        with git's reason when it did not and *check*.

        In :meth:`kept`, a transaction of its own (``start``, the update, ``commit``) on
        the kept ``update-ref --stdin``. git refuses one by ending with the reason: the
        update fails with it, and the next update starts another process."""
        check_ids(*(v for v in (new, old) if v))
        try:
            self.unblock_ref(ref)
        except GitError:
            if check:
                raise
            return False
        if self._refs is None or not _PLAIN_REF.fullmatch(ref):
            if new is None:
                args = ["update-ref", "-d", "--end-of-options", ref, *([old] if old else [])]
            else:
                args = ["update-ref", "--end-of-options", ref, new, *([] if old is None else [old])]
            return (await self.run(*args, check=check)).returncode == 0
        if new is None:
            line = f"delete {ref}" + (f" {old}" if old else "")
        elif old == "":
            line = f"create {ref} {new}"
        else:
            line = f"update {ref} {new}" + (f" {old}" if old else "")
        try:
            await self._refs.ask(
                f"start\n{line}\ncommit\n".encode(), 2, [b"start: ok", b"commit: ok"]
            )
        except _Closed:  # the run's kept processes ended meanwhile: a git of its own
            return await self.update_ref(ref, new, old, check=check)
        except GitError:
            await anyio.lowlevel.checkpoint_if_cancelled()  # a cancel first, as Git.run
            if check:
                raise
            return False
        # A cancel that came while git ran is delivered now that it is done (as Git.run).
        await anyio.lowlevel.checkpoint_if_cancelled()
        return True

    async def commit_tree(
        self, tree: str, parents: Sequence[str], message: str, *, known: bool = False
    ) -> str:
        """The commit of *tree* on *parents* with *message*, made as ``git commit-tree -p
        PARENT... -m MESSAGE TREE`` makes it with the run's identity (:meth:`identity_env`):
        its id.

        In :meth:`kept`, the commit's bytes are made here (the author and committer as
        ``git var`` gives them, once; the time now) and written by the kept ``hash-object``
        from a file of this process's own; the id git gives is checked against the bytes'
        own, so nothing that changed the file meanwhile can change the commit. With a date
        set in the environment (``GIT_AUTHOR_DATE``), which only git parses, a zone git does
        not share with this process, bytes git would rewrite (not UTF-8, noncharacters), or
        outside :meth:`kept`, ``git commit-tree`` makes it; and unless *known* says that
        *tree* is a tree and *parents* are commits (write-tree's tree, a task's base):
        hash-object checks neither, and would write a commit on a tag or a blob an agent
        pointed its branch at, which commit-tree refuses. A NUL in *message* is a GitError,
        as git says."""
        check_ids(tree, *parents)
        if "\0" in message:  # as git refuses it (and no argument can hold it)
            raise GitError(
                ["commit-tree"], 128, "error: a NUL byte in commit log message not allowed."
            )
        identity = await self.identity_env()
        flags = [flag for parent in parents for flag in ("-p", parent)]
        by_git = ("commit-tree", *flags, "-m", message, "--end-of-options", tree)
        if not known or self._objects is None or await self._dated_by_git(identity):
            return await self.out(*by_git, env=identity)
        author, committer = await self.ident_lines(identity)
        text = os.fsencode(message)
        if text and not text.endswith(b"\n"):
            text += b"\n"  # as commit-tree ends a -m message
        data = (
            f"tree {tree}\n".encode()
            + b"".join(f"parent {parent}\n".encode() for parent in parents)
            + b"author "
            + author
            + b"\n"
            + b"committer "
            + committer
            + b"\n"
            + b"\n"
            + text
        )
        if not _kept_by_git(data):
            # git commit-tree rewrites what is not UTF-8 to its eyes (bytes that are not,
            # noncharacters) as Latin-1: its commit, not these bytes.
            return await self.out(*by_git, env=identity)
        header = b"commit %d\0" % len(data)
        expected = (hashlib.sha1 if len(tree) == 40 else hashlib.sha256)(header + data).hexdigest()
        try:
            if self._objects is None:
                raise _Closed
            made = await self._objects.ask_with_file(data)
        except _Closed:  # the run's kept processes ended meanwhile
            return await self.out(*by_git, env=identity)
        if made != expected:
            raise GitError(
                ["hash-object", "-t", "commit"], 1, f"fatal: wrote {made!r}, not {expected}"
            )
        return made

    async def ident_lines(self, env: Mapping[str, str]) -> tuple[bytes, bytes]:
        """The author and committer a commit made now with *env* (the identity) gets, as
        ``git var GIT_AUTHOR_IDENT`` and ``GIT_COMMITTER_IDENT`` give them (``Name <email>
        <seconds> <zone>``): the names asked of git once per identity, the time now; with
        a date set in the environment (only git parses dates), asked of git each time."""
        if await self._dated_by_git(env):
            return (
                (await self.run("var", "GIT_AUTHOR_IDENT", env=env)).stdout.rstrip(b"\n"),
                (await self.run("var", "GIT_COMMITTER_IDENT", env=env)).stdout.rstrip(b"\n"),
            )
        author, committer, _ = await self._idents(env)
        when = b" %d %s" % _now_and_zone()
        return author + when, committer + when

    async def _dated_by_git(self, env: Mapping[str, str]) -> bool:
        """Whether a commit made now with *env* must be dated by git itself: a date set in
        the environment (only git parses dates), or a time zone this process does not
        share with git (``TZ`` set in ``os.environ`` after Python read it, without
        ``time.tzset()``: git var's zone, asked with the names, is not this process's)."""
        full = {**self._env, **env}
        if "GIT_AUTHOR_DATE" in full or "GIT_COMMITTER_DATE" in full:
            return True
        return not (await self._idents(env))[2]

    async def _idents(self, identity: Mapping[str, str]) -> tuple[bytes, bytes, bool]:
        """The author and committer ``git var`` gives (``Name <email>``, without its time),
        asked once per identity, and whether git's zone was this process's then."""
        key = tuple(sorted(identity.items()))
        if (known := self._ident_cache.get(key)) is not None:
            return known
        async with self._asking.hold():  # asked once, however many commit at once
            if (known := self._ident_cache.get(key)) is not None:
                return known
            return await self._ask_idents(key, identity)

    async def _ask_idents(
        self, key: tuple[tuple[str, str], ...], identity: Mapping[str, str]
    ) -> tuple[bytes, bytes, bool]:
        lines = []
        same_zone = True
        for name in ("GIT_AUTHOR_IDENT", "GIT_COMMITTER_IDENT"):
            before = _now_and_zone()[1]
            out = (await self.run("var", name, env=identity)).stdout.rstrip(b"\n")
            parts = out.rsplit(b" ", 2)
            if len(parts) != 3 or not parts[0] or b"\n" in parts[0]:
                raise GitError(["var", name], 1, f"fatal: git var gave {out!r}")
            lines.append(parts[0])
            # A change of offset (DST) between the two reads says nothing: git dates them.
            same_zone = same_zone and parts[2] == before == _now_and_zone()[1]
        known = self._ident_cache[key] = (lines[0], lines[1], same_zone)
        return known


def _now_and_zone() -> tuple[int, bytes]:
    """The time now and this process's zone then, as git writes them (``+0200``)."""
    now = int(time.time())
    offset = time.localtime(now).tm_gmtoff // 60
    sign = "-" if offset < 0 else "+"
    return now, f"{sign}{abs(offset) // 60:02d}{abs(offset) % 60:02d}".encode()


#: The noncharacters (U+FDD0..U+FDEF, U+xxFFFE, U+xxFFFF): valid UTF-8 that git's check of a
#: commit's encoding (commit.c, verify_utf8) takes for Latin-1 all the same.
_NONCHARACTERS = re.compile(
    "[\ufdd0-\ufdef"
    + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17))
    + "]"
)


def _kept_by_git(data: bytes) -> bool:
    """Whether ``git commit-tree`` (i18n.commitEncoding UTF-8) writes *data* as it is."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return _NONCHARACTERS.search(text) is None


#: Longest the kept hash-object may take to write one commit (milliseconds, as a rule).
OBJECT_TIMEOUT_S = 60.0
#: Longest the kept update-ref may take to apply one transaction (milliseconds, as a rule).
#: It waits on nothing but a FIFO someone put where a ref is read (an agent, in the
#: repository's refs/): past this, the transaction fails rather than the whole run hanging.
REF_TIMEOUT_S = 60.0
#: Longest a listing of refs (``for-each-ref``) may take: it opens every loose ref it lists,
#: and a FIFO put among them (by an agent, in the shared refs/) would block it for ever.
#: Past this, git is killed (a listing holds no lock) and the listing fails (GitError).
LIST_REFS_TIMEOUT_S = 60.0


def _blocked(args: Sequence[str], found: list[Path]) -> GitError:
    if not found:
        return GitError(
            args,
            -15,
            "fatal: git was stopped: it was waiting for ever to open a FIFO, not one found in "
            "the git directory (behind a link to a directory, say)",
        )
    named = ", ".join(str(p) for p in found[:5]) + (" ..." if len(found) > 5 else "")
    return GitError(
        args,
        -15,
        f"fatal: git was stopped: it would have waited for ever on {named} (a FIFO or a "
        "device where git reads a file, or a link to one); those in the git directory "
        "were removed",
    )


class _Closed(Exception):
    """A kept git process asked after its run's scope closed: the caller runs git itself."""


class _Kept:
    """One git process kept running through a run, asked a line at a time on its standard
    input and answering on its standard output: ``update-ref --stdin`` (each update a
    transaction of its own) and ``hash-object --stdin-paths`` (each a commit). A task's
    branch made, moved and deleted, and its commit written, without a git process started
    each time (about 4 ms each here; a question takes well under 1 ms).

    git refuses what it is asked (a ref not at the old value, a lock held, an object it
    cannot read) by ending, with the reason on its standard error: that question fails
    with the reason, and the next starts another process. A question git has been given is
    not cut short (as :meth:`Git.run` never kills a started command: a killed git can leave
    a ref locked) unless it is not answered within the process's timeout (git waits on
    nothing but a FIFO put where it reads a ref or the commit's bytes): then git is told to
    end with SIGTERM, on which it removes its lock files. Closing its standard input ends
    it, and ``update-ref`` aborts a transaction given only in part then, never applying half
    of one."""

    def __init__(self, git: Git, args: list[str], *, timeout: float | None = None) -> None:
        self.git = git
        self.args = args
        #: Longest an answer may take: past it, the process is told to end (SIGTERM, on
        #: which git removes its lock files; then SIGKILL) and the question fails. None:
        #: waited for.
        self.timeout = timeout
        self._lock = anyio.Lock()
        self._process: Process | None = None
        self._stdout: BufferedByteReceiveStream | None = None
        #: Its standard error, read only once it has ended: a file, so that nothing it
        #: writes meanwhile can fill a pipe and stop it.
        self._stderr: IO[bytes] | None = None
        #: Where the commits' bytes are written for hash-object to read (this process's own).
        self._scratch: Path | None = None
        self._scratch_lock: int | None = None
        #: Ended for good (its run's kept scope closed): asked now, it raises _Closed.
        self.closed = False

    async def ask(
        self, question: bytes, lines: int, expect: list[bytes] | None = None
    ) -> list[bytes]:
        """Send *question*, return the *lines* of the answer (without their newlines);
        GitError with git's reason when it ended instead, or answered otherwise than
        *expect* says."""
        async with self._lock:
            return await self._ask(question, lines, expect)

    async def ask_with_file(self, data: bytes) -> str:
        """``hash-object --stdin-paths`` of *data*, written to a file of its own: the id."""
        async with self._lock:
            if self.closed:
                raise _Closed
            if self._scratch is None:
                scratch, lock = await anyio.to_thread.run_sync(_new_scratch)
                if "\n" in str(scratch):  # a TMPDIR git would read as two paths
                    shutil.rmtree(scratch, ignore_errors=True)
                    os.close(lock)
                    raise _Closed
                self._scratch, self._scratch_lock = scratch, lock
            # Shielded: a cancel meanwhile would leave the file (its name not known yet).
            with anyio.CancelScope(shield=True):
                path = await anyio.to_thread.run_sync(_write_new, self._scratch, data)
            try:
                [answer] = await self._ask(os.fsencode(path) + b"\n", 1)
            finally:
                with contextlib.suppress(OSError):
                    path.unlink()
            return answer.decode("ascii", "replace")

    async def _ask(
        self, question: bytes, lines: int, expect: list[bytes] | None = None
    ) -> list[bytes]:
        if self.closed:
            raise _Closed
        if self.git.guard is not None:
            self.git.guard.check()
        with anyio.CancelScope(shield=True):
            for again in (True, False):
                if self._process is None:
                    await self._start()
                process, stdout = self._process, self._stdout
                assert process is not None and process.stdin is not None and stdout is not None
                said: list[bytes] = []
                stopped: list[Path] | None = None
                with anyio.move_on_after(
                    math.inf if self.timeout is None else self.timeout
                ) as late:
                    try:
                        await process.stdin.send(question)
                        answer = functools.partial(_read_lines, stdout, said, lines)
                        stopped = await self.git.wait(process, None, until=answer)
                    except (
                        anyio.EndOfStream,
                        anyio.IncompleteRead,
                        anyio.DelimiterNotFound,
                        anyio.BrokenResourceError,
                        OSError,
                    ):
                        pass
                if stopped is not None:  # still stuck once what blocked it was let go of
                    await self._end()
                    raise _blocked(self.args, stopped)
                if late.cancelled_caught:
                    # Blocked (a FIFO put where it reads the commit's bytes, or a ref): told
                    # to end (git removes its lock files then), killed if it does not.
                    stall.signal_child(process, signal.SIGTERM)
                    await self._end()
                    raise GitError(
                        self.args,
                        -9,
                        f"fatal: git did not answer within {self.timeout:g} s and was killed",
                    )
                if len(said) == lines and (expect is None or said == expect):
                    return said
                # Ended, or said what was not asked for: it goes (its input closed, a
                # transaction left open is aborted) and the next question starts another.
                code, why = await self._end()
                if said or not again:
                    break
                # Not a word of this question: git had ended before it read it (killed by
                # a signal, say), so nothing of it was done; a new process takes it, as a
                # git process of its own per question would have.
        raise GitError(
            self.args, code or 1, why.strip() or f"fatal: git {self.args[0]} said {said!r}"
        )

    async def _start(self) -> None:
        self.git.calls += 1
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by _end, or below)
        try:
            self._process = await anyio.open_process(
                ["git", "-C", str(self.git.repo), *HARDENING, *self.args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=self.git.environment,
                # Not in the orchestrator's process group: a terminal's Ctrl-C (SIGINT to
                # the whole group), which the orchestrator takes as "stop and clean up",
                # would kill it and fail the clean-up's own ref updates and commits.
                start_new_session=True,
            )
        except BaseException:
            stderr.close()
            raise
        self._stderr = stderr
        assert self._process.stdout is not None
        self._stdout = BufferedByteReceiveStream(self._process.stdout)

    async def _end(self) -> tuple[int, str]:
        """End the process (its input closed); its exit status and the end of what it wrote
        on its standard error."""
        process, stderr = self._process, self._stderr
        self._process = self._stdout = self._stderr = None
        if process is None or stderr is None:
            return 0, ""
        if process.stdin is not None:
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                await process.stdin.aclose()
        # A git blocked on a FIFO does not see its input close: it is killed, after a grace.
        with anyio.move_on_after(END_GRACE_S):
            await process.wait()
        stall.signal_child(process, signal.SIGKILL)
        code = await process.wait()
        with stderr:
            size = stderr.seek(0, os.SEEK_END)
            stderr.seek(max(0, size - 4096))
            why = stderr.read().decode(errors="replace")
        return code, why

    async def aclose(self) -> None:
        async with self._lock:
            self.closed = True
            await self._end()
            if self._scratch is not None:
                with contextlib.suppress(OSError):
                    shutil.rmtree(self._scratch)
                self._scratch = None
            if self._scratch_lock is not None:
                os.close(self._scratch_lock)
                self._scratch_lock = None


async def _read_lines(stdout: BufferedByteReceiveStream, said: list[bytes], lines: int) -> None:
    """Read lines (without their newlines) into *said* until it holds *lines*. Cancelled,
    it may be called again and goes on where it was: the stream keeps what it read."""
    while len(said) < lines:
        said.append(await stdout.receive_until(b"\n", 4096))


#: The kept hash-object's scratch directories, one per process writing commits, each locked
#: (``flock`` on the directory) while its process lives: one a killed process left is known
#: by its lock being free, and removed by the next process that makes one.
_SCRATCH = "orchestrator-objects-"
_left_scratches_removed = False


def _new_scratch() -> tuple[Path, int]:
    """A directory of this process's own for the commits' bytes, and the descriptor that
    holds its lock. First (once per process) the scratch directories of dead processes
    are removed: those whose lock nobody holds (a process of an earlier version took none)."""
    global _left_scratches_removed
    top = tempfile.gettempdir()
    if not _left_scratches_removed:
        _left_scratches_removed = True
        _remove_left_scratches(top)
    # Made under a name the removal passes over, and renamed once locked.
    made = Path(tempfile.mkdtemp(prefix="." + _SCRATCH, dir=top))
    fd = os.open(made, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try_flock(fd)
        scratch = made.with_name(made.name[1:])
        os.rename(made, scratch)
    except BaseException:
        os.close(fd)
        shutil.rmtree(made, ignore_errors=True)
        raise
    return scratch, fd


def _remove_left_scratches(top: str) -> None:
    """Remove the scratch directories in *top* that no live process holds: this user's."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(top):
            if not entry.name.startswith(_SCRATCH):
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                    continue
                fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                try:
                    # Unlocked, and still what is at that name (never a directory swapped in).
                    if try_flock(fd) and os.path.samestat(os.fstat(fd), os.lstat(entry.path)):
                        shutil.rmtree(entry.path)
                finally:
                    os.close(fd)


def _write_new(directory: Path, data: bytes) -> Path:
    """*data* in a file of *directory* this process makes (``O_EXCL``, ``O_NOFOLLOW``, a
    random name): never written through a link or into a file someone put there first."""
    fd, name = tempfile.mkstemp(dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    return Path(name)


class _LoopLock:
    """An anyio.Lock made when first needed and let go once nobody holds or waits on it: a
    lock belongs to its event loop, and a Git can outlive the loop it was first used in (a
    library caller's second ``anyio.run``, under trio, after a cancel left it made)."""

    def __init__(self) -> None:
        self._lock: anyio.Lock | None = None

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        lock = self._lock = self._lock or anyio.Lock()
        try:
            async with lock:
                yield
        finally:
            held = lock.statistics()
            if self._lock is lock and not held.locked and not held.tasks_waiting:
                self._lock = None
