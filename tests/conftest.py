"""Shared fixtures: real git repositories in temporary directories, with no git identity.

Every test runs as on a fresh machine: the global and system git config are hidden and no
GIT_AUTHOR_*/GIT_COMMITTER_* variable is set, so the orchestrator's identity fallback is what
makes its commits work. Fixture repositories are committed with an explicit ``-c user.*``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import pytest

from orchestrator.cli import main
from orchestrator.retry import set_testing


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Fast tests first: the tests marked ``slow`` (end-to-end runs that kill and resume,
    clusters, real venvs in numbers) run after all the others, in their order, so that a
    broken core fails in seconds rather than after minutes of end-to-end runs."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


PYTHON = sys.executable


@pytest.fixture(autouse=True)
def fresh_machine_git(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hide the user's git config and identity, as on a fresh machine."""
    home = tmp_path_factory.mktemp("home")
    empty = home / "gitconfig"
    empty.write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(empty))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for role in ("AUTHOR", "COMMITTER"):
        for what in ("NAME", "EMAIL"):
            monkeypatch.delenv(f"GIT_{role}_{what}", raising=False)
    monkeypatch.delenv("EMAIL", raising=False)


@pytest.fixture(autouse=True)
def no_retry_waits() -> Iterator[None]:
    """Retries happen at once in tests."""
    set_testing(True)
    yield
    set_testing(False)


@pytest.fixture
def result_dumps(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """How many times a TaskResult has been dumped (``model_dump``) since the fixture was
    made; ``monkeypatch.undo()`` stops the counting."""
    from envelopes import TaskResult

    count = 0
    dump = TaskResult.model_dump

    def counting(self: TaskResult, **kwargs: Any) -> dict[str, Any]:
        nonlocal count
        count += 1
        return dump(self, **kwargs)

    monkeypatch.setattr(TaskResult, "model_dump", counting)
    return lambda: count


def git(repo: Path, *args: str) -> str:
    """Run git in *repo* with a fixture identity; return stdout."""
    result = subprocess.run(
        [
            "git",
            "-c",
            "user.name=Fixture",
            "-c",
            "user.email=fixture@example.com",
            "-C",
            str(repo),
            *args,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout.strip()


MakeRepo = Callable[..., Path]


def head_and_tree(repo: Path) -> tuple[str, str]:
    """The commit *repo*'s HEAD names, and its tree."""
    return git(repo, "rev-parse", "HEAD"), git(repo, "rev-parse", "HEAD^{tree}")


def with_kept_gits(repo: Path, steps: Callable[[Any], Any], *, backend: str = "asyncio") -> Any:
    """What ``await steps(runner)`` returns, *runner* being *repo*'s git runner with its
    kept processes running (``Git.kept``), under *backend*."""
    from orchestrator._git import Git

    async def main() -> Any:
        runner = Git(repo)
        async with runner.kept():
            return await steps(runner)

    import anyio

    return anyio.run(main, backend=backend)


def plumbing_commit(
    cwd: Path, env: dict[str, str], parent: str, files: dict[str, str], message: str
) -> str:
    """A commit on *parent* with *files* written, made with plumbing: no checkout is touched.
    The index is ``env["GIT_INDEX_FILE"]``, a scratch file removed afterwards."""

    def run(*args: str, stdin: str | None = None) -> str:
        return subprocess.run(
            ["git", *args],
            cwd=cwd,
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    run("read-tree", parent)
    for name, text in files.items():
        blob = run("hash-object", "-w", "--stdin", stdin=text)
        run("update-index", "--add", "--cacheinfo", f"100644,{blob},{name}")
    tree = run("write-tree")
    Path(env["GIT_INDEX_FILE"]).unlink()
    return run("commit-tree", tree, "-p", parent, "-m", message)


def task_worktrees(repo: Path) -> list[str]:
    """The repository's worktrees other than its main one and the pool's idle slots.

    Pool slots stay between runs by design (orchestrator/pool.py); an idle one must be
    detached, so that no branch is checked out in it.
    """
    entries = git(repo, "worktree", "list", "--porcelain").split("\n\n")
    pool = f"worktree {repo / '.git' / 'orchestrator' / 'pool'}/"
    others = []
    for entry in entries[1:]:
        if not entry.strip():
            continue
        if entry.startswith(pool):
            assert "\ndetached" in entry, entry
        else:
            others.append(entry.splitlines()[0].removeprefix("worktree "))
    return others


@pytest.fixture
def make_repo(tmp_path: Path) -> MakeRepo:
    """Factory: a git repository with *files* small files (plus any *extra* files), one commit."""
    counter = iter(range(1000))

    def make(
        files: int = 3, *, name: str | None = None, extra: dict[str, str] | None = None
    ) -> Path:
        repo = tmp_path / (name or f"repo{next(counter)}")
        repo.mkdir()
        for i in range(files):
            path = repo / "src" / f"file{i:04d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"line {i}\n")
        for rel, text in (extra or {}).items():
            path = repo / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        git(repo, "init", "--quiet", "--initial-branch=main")
        git(repo, "add", "--all")
        git(repo, "commit", "--quiet", "-m", "initial")
        return repo

    return make


@pytest.fixture
def write_agent(tmp_path: Path) -> Callable[[str, str], Path]:
    """Factory: write a Python agent script (dedented) under tmp_path/agents; return its path."""

    def write(name: str, source: str) -> Path:
        path = tmp_path / "agents" / f"{name}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
        return path

    return write


def live_processes_with(marker: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line or environment contains *marker*."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            if state == b"Z":
                continue
            blobs = []
            for name in ("cmdline", "environ"):
                with open(f"/proc/{entry}/{name}", "rb") as f:
                    blobs.append(f.read())
        except OSError:
            continue
        if any(marker.encode() in blob for blob in blobs):
            found.append(int(entry))
    return found


class Outcome(NamedTuple):
    """What a CLI command returned and printed."""

    code: int
    out: str
    err: str


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Outcome:
    """Run ``orchestrator ARGV...`` in-process and capture what it printed."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return Outcome(code, out, err)


class LocalServer(ThreadingHTTPServer):
    """A real HTTP server on 127.0.0.1, on a free port, for tests of what talks HTTP.

    ``lock`` guards what a handler records; ``release`` is set when the test ends, to let a
    handler that waits (a slow endpoint) give up. A client that hangs up is expected.
    """

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.lock = threading.Lock()
        self.release = threading.Event()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (a body over a cap, a slow endpoint given up on) is expected."""


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that does not log each request to stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


Server = TypeVar("Server", bound=LocalServer)


@contextlib.contextmanager
def serving(server: Server) -> Iterator[Server]:
    """*server*, serving in a thread until the block ends; then released and closed."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        thread.join()
        server.server_close()
