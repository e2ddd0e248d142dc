"""Baselines for the worktree benchmarks: the shell floor and the seed's naive approach.

Both run N tasks of the same shape as the orchestrator's: ``git worktree add`` to a new
branch, a venv, a no-op agent that writes ``result-<i>.txt``, a commit, ``git worktree
remove``, and deletion of the venv. Each returns the wall seconds of just that work; setup
and the clean-up afterwards (leftover worktrees, and the task branches unless
``keep_branches``) are outside the timing. Any failing command raises :class:`RuntimeError`
with its stderr.

- :func:`shell_floor`: the plain script a careful engineer would write, run by
  ``xargs -P C``, with the worktree commands serialised by ``flock``.
- :func:`naive_seed`: the seed's way: ``python -m venv`` (with pip) per task, all tasks at
  once under ``asyncio.gather``, the worktree commands not serialised but retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

__all__ = ["cold", "make_repo", "median_spread", "naive_seed", "resident", "shell_floor"]

IDENTITY = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@localhost",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@localhost",
}

# Variables that would point git at some other repository than the one named by -C.
_REPOSITORY_VARIABLES = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_COMMON_DIR")

#: Times the naive seed retries a ``git worktree`` command that lost a race.
SEED_RETRIES = 5

FILES_PER_DIRECTORY = 50


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _REPOSITORY_VARIABLES}
    return {**env, **IDENTITY}


def cold(env: dict[str, str] | None = None) -> dict[str, str]:
    """*env* (default: this process's) for an ``orchestrator`` command that starts in its own
    process, whatever resident process the user may have running."""
    return {**(os.environ if env is None else env), "ORCHESTRATOR_NO_SERVER": "1"}


@contextlib.contextmanager
def resident(work: Path, cwd: Path, env: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """An ``orchestrator serve`` process for the benchmark's commands, and the environment
    that finds it. Start the commands as it is started (``python -m orchestrator``) and from
    *cwd*: ``-m`` puts the working directory on ``sys.path``, which the socket's name
    depends on. Its start is outside every timing, as a user starts it once."""
    sockets = work / f"sockets-{uuid.uuid4().hex[:8]}"
    served = {**(os.environ if env is None else env), "ORCHESTRATOR_SERVER_DIR": str(sockets)}
    served.pop("ORCHESTRATOR_NO_SERVER", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "serve", "--idle-timeout", "3600"],
        cwd=cwd,
        env=served,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(sockets.glob("*.sock")):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"orchestrator serve did not start: {process.stderr.read()!r}")
            time.sleep(0.02)
        yield served
    finally:
        process.terminate()
        process.communicate(timeout=60)
        shutil.rmtree(sockets, ignore_errors=True)


def base_python() -> str:
    """The absolute path of the interpreter this venv (if any) was made from."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def uv_binary() -> str:
    """The uv binary: the one the ``uv`` wheel ships, else the one on PATH."""
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            raise RuntimeError("uv not found: install the uv wheel or put uv on PATH") from None
        return found


def _run(argv: Sequence[str], *, stdin: str | None = None) -> str:
    """Run *argv*; return its stdout, or raise RuntimeError with its stderr."""
    try:
        done = subprocess.run(
            list(argv),
            env=_environment(),
            input=stdin,
            capture_output=True,
            text=True,
        )
    except OSError as exc:
        raise RuntimeError(f"{shlex.join(argv)}: {exc}") from exc
    if done.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(argv)} failed (exit {done.returncode}): {done.stderr.strip()}"
        )
    return done.stdout


def _git(repo: Path, *args: str) -> str:
    return _run(["git", "-C", str(repo), *args])


def make_repo(path: Path, files: int) -> Path:
    """Create a git repository at *path* with *files* small text files in one commit on ``main``.

    The files are deterministic, ~200 bytes each, 50 to a directory. No git identity needs
    to be configured. Returns the repository's absolute path.
    """
    repo = path.resolve()
    repo.mkdir(parents=True, exist_ok=True)
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "gc.auto", "0")
    for i in range(files):
        directory = repo / f"d{i // FILES_PER_DIRECTORY:04d}"
        if i % FILES_PER_DIRECTORY == 0:
            directory.mkdir(exist_ok=True)
        line = f"file {i:06d}: the quick brown fox jumps over the lazy dog\n"
        (directory / f"f{i:06d}.txt").write_text(line * 3)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "--allow-empty", "-m", f"bench: {files} files")
    return repo


def median_spread(values: Sequence[float]) -> tuple[float, float]:
    """The median of *values* and their spread (max - min); *values* must not be empty."""
    if not values:
        raise ValueError("median_spread() needs at least one value")
    return statistics.median(values), max(values) - min(values)


def _clean_up(repo: Path, run_dir: Path, namespace: str, *, keep_branches: bool) -> None:
    """Remove this run's worktrees and venvs, and its branches unless *keep_branches*."""
    listing = _git(repo, "worktree", "list", "--porcelain")
    for line in listing.splitlines():
        path = line.removeprefix("worktree ")
        if path != line and Path(path).is_relative_to(run_dir):
            # Twice forced: a worktree whose ``add`` failed half-way is still locked.
            with contextlib.suppress(RuntimeError):  # then the prune below drops it
                _git(repo, "worktree", "remove", "--force", "--force", path)
    for sub in ("wt", "venv"):
        shutil.rmtree(run_dir / sub, ignore_errors=True)
    _git(repo, "worktree", "prune")
    if not keep_branches:
        refs = _git(repo, "for-each-ref", "--format=%(refname)", f"refs/heads/{namespace}/")
        if refs.split():
            deletions = "".join(f"delete {ref}\n" for ref in refs.split())
            _run(["git", "-C", str(repo), "update-ref", "--stdin"], stdin=deletions)


def _start_run(repo: Path, work: Path, kind: str) -> tuple[Path, Path, str, str]:
    """(repository, run directory, branch namespace, base commit) for one call."""
    repo = repo.resolve()
    token = uuid.uuid4().hex[:12]
    run_dir = work.resolve() / f"{kind}-{token}"
    base = _git(repo, "rev-parse", "HEAD").strip()
    (run_dir / "wt").mkdir(parents=True)
    (run_dir / "venv").mkdir()
    return repo, run_dir, f"bench/{kind}/{token}", base


_TASK_SCRIPT = """\
#!/usr/bin/env bash
# One shell-floor task; run as: seq 1 N | xargs -P C -n 1 bash {script}
set -euo pipefail
i=$1
trap 'echo "task $i: exit $?: $BASH_COMMAND" >&2' ERR
export {identity}
repo={repo}
wt={run_dir}/wt/$i
venv={run_dir}/venv/$i
lock={run_dir}/lock
flock "$lock" git -C "$repo" worktree add -q -b {namespace}/"$i" "$wt" {base}
{uv} venv -q --python {python} "$venv"
echo done > "$wt/result-$i.txt"
git -C "$wt" add -A
git -C "$wt" commit -q -m "bench: task $i"
flock "$lock" git -C "$repo" worktree remove --force "$wt"
rm -rf "$venv"
"""


def shell_floor(
    repo: Path, n: int, concurrency: int, work: Path, *, keep_branches: bool = False
) -> float:
    """Run *n* tasks as a bash script under ``xargs -P concurrency``; return the wall seconds.

    Per task: ``git worktree add`` to branch ``bench/floor/<token>/<i>`` (under ``flock``,
    since parallel ``worktree add`` in one repository fails), ``uv venv`` from the base
    interpreter, ``echo done > result-<i>.txt``, ``git add -A && git commit``, ``git
    worktree remove --force`` (under the same lock) and ``rm -rf`` of the venv. Only the
    ``xargs`` run is timed. The branches are deleted afterwards unless *keep_branches*.
    """
    repo, run_dir, namespace, base = _start_run(repo, work, "floor")
    script = run_dir / "task.sh"
    script.write_text(
        _TASK_SCRIPT.format(
            script=shlex.quote(str(script)),
            identity=" ".join(f"{k}={shlex.quote(v)}" for k, v in IDENTITY.items()),
            repo=shlex.quote(str(repo)),
            run_dir=shlex.quote(str(run_dir)),
            namespace=shlex.quote(namespace),
            base=base,
            uv=shlex.quote(uv_binary()),
            python=shlex.quote(base_python()),
        )
    )
    argv = ["xargs", "-P", str(concurrency), "-n", "1", shutil.which("bash") or "bash", str(script)]
    tasks = "".join(f"{i}\n" for i in range(1, n + 1))
    try:
        start = time.perf_counter()
        _run(argv, stdin=tasks)
        return time.perf_counter() - start
    finally:
        _clean_up(repo, run_dir, namespace, keep_branches=keep_branches)


async def _run_async(argv: Sequence[str]) -> None:
    """Run *argv* as the seed does, or raise RuntimeError with its stderr."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            env=_environment(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise RuntimeError(f"{shlex.join(argv)}: {exc}") from exc
    _, stderr = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(argv)} failed (exit {process.returncode}): "
            f"{stderr.decode(errors='replace').strip()}"
        )


async def _retried(
    argv: Sequence[str], retries: list[int], *, done: Callable[[], bool] = lambda: False
) -> None:
    """Run a ``git worktree`` command, retrying it when it loses a race with another.

    A failed attempt after which *done* holds counts as a success.
    """
    for attempt in range(SEED_RETRIES + 1):
        try:
            await _run_async(argv)
            return
        except RuntimeError:
            if done():
                return
            if attempt == SEED_RETRIES:
                raise
            retries.append(1)
            await asyncio.sleep(0.05)


async def _seed_task(
    repo: Path, run_dir: Path, branch: str, base: str, i: int, retries: list[int]
) -> None:
    worktree = run_dir / "wt" / str(i)
    venv = run_dir / "venv" / str(i)
    git = ["git", "-C", str(repo)]
    # -f -B: a lost race may leave the branch made or the worktree half-registered.
    await _retried(
        [*git, "worktree", "add", "-q", "-f", "-B", branch, str(worktree), base], retries
    )
    await _run_async([base_python(), "-m", "venv", str(venv)])
    (worktree / f"result-{i}.txt").write_text("done\n")
    await _run_async(["git", "-C", str(worktree), "add", "-A"])
    await _run_async(["git", "-C", str(worktree), "commit", "-q", "-m", f"bench: task {i}"])
    # A remove that lost its race may have deleted the worktree before failing.
    await _retried(
        [*git, "worktree", "remove", "--force", str(worktree)],
        retries,
        done=lambda: not worktree.exists(),
    )
    shutil.rmtree(venv)


def naive_seed(
    repo: Path,
    n: int,
    work: Path,
    *,
    keep_branches: bool = False,
    stats: dict[str, int] | None = None,
) -> float:
    """Run *n* tasks the seed's way, all at once; return the wall seconds of the gather.

    Per task: ``git worktree add`` to branch ``bench/seed/<token>/<i>`` (not serialised:
    a command that loses a race is retried up to ``SEED_RETRIES`` times), ``python -m venv``
    with pip, the no-op agent, ``git add -A`` and ``git commit``, ``git worktree remove
    --force`` (retried the same way), and deletion of the venv. The retries are counted in
    ``stats["worktree_retries"]`` when *stats* is given. The branches are deleted afterwards
    unless *keep_branches*.
    """
    repo, run_dir, namespace, base = _start_run(repo, work, "seed")
    retries: list[int] = []

    async def gather() -> list[BaseException | None]:
        return await asyncio.gather(
            *(
                _seed_task(repo, run_dir, f"{namespace}/{i}", base, i, retries)
                for i in range(1, n + 1)
            ),
            return_exceptions=True,
        )

    try:
        start = time.perf_counter()
        outcomes = asyncio.run(gather())
        wall = time.perf_counter() - start
        if stats is not None:
            stats["worktree_retries"] = len(retries)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return wall
    finally:
        _clean_up(repo, run_dir, namespace, keep_branches=keep_branches)
