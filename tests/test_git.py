"""orchestrator/_git.py: the git runner. What a repository's config says never runs, revisions
from elsewhere are checked, a hanging git is killed, git's environment is cleaned, and a failure
is a GitError that says what failed."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from orchestrator import _git as git_module
from orchestrator._git import (
    FALLBACK_IDENTITY,
    REPOSITORY_VARIABLES,
    Git,
    check_ids,
    clean_environment,
)
from orchestrator.errors import GitError, OrchestratorError

from .conftest import MakeRepo, git, head_and_tree, live_processes_with, with_kept_gits
from .test_kept_commits import by_commit_tree

EMPTY_BLOB = "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"


def marker_script(path: Path, marker: Path, *, code: int = 0) -> Path:
    """An executable that records that it ran (in *marker*) and exits with *code*."""
    path.write_text(f"#!/bin/sh\necho ran >> '{marker}'\nexit {code}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def run_git(repo: Path, *args: str, **options: object) -> subprocess.CompletedProcess[bytes]:
    result: subprocess.CompletedProcess[bytes] = anyio.run(
        lambda: Git(repo).run(*args, **options)  # type: ignore[arg-type]
    )
    return result


# HARDENING: whatever the repository's config says, none of it runs.


def test_hooks_in_the_repository_or_named_by_its_config_never_run(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    marker = tmp_path / "hook-ran"
    marker_script(repo / ".git" / "hooks" / "pre-commit", marker, code=1)
    marker_script(repo / ".git" / "hooks" / "commit-msg", marker, code=1)
    elsewhere = tmp_path / "planted-hooks"
    elsewhere.mkdir()
    marker_script(elsewhere / "pre-commit", marker, code=1)
    git(repo, "config", "core.hooksPath", str(elsewhere))
    # Plain git runs the planted hook (and stops):
    ident = ["-c", "user.name=U", "-c", "user.email=u@example.com"]
    plain = ["git", "-C", str(repo), *ident, "commit", "--allow-empty", "-qm", "plain"]
    assert subprocess.run(plain, capture_output=True).returncode == 1
    assert marker.read_text() == "ran\n"
    marker.unlink()
    ident = {"GIT_AUTHOR_NAME": "U", "GIT_AUTHOR_EMAIL": "u@example.com"}
    ident |= {"GIT_COMMITTER_NAME": "U", "GIT_COMMITTER_EMAIL": "u@example.com"}
    run_git(repo, "commit", "--allow-empty", "-qm", "hardened", env=ident)
    assert git(repo, "log", "-1", "--format=%s") == "hardened"
    assert not marker.exists()


def test_an_fsmonitor_program_in_the_config_never_runs(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = make_repo()
    marker = tmp_path / "fsmonitor-ran"
    program = marker_script(tmp_path / "fsmonitor", marker, code=1)
    git(repo, "config", "core.fsmonitor", str(program))
    subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True)
    assert marker.exists()  # plain git runs it
    marker.unlink()
    assert run_git(repo, "status", "--porcelain").returncode == 0
    assert not marker.exists()


def test_a_signing_program_in_the_config_never_runs(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = make_repo()
    marker = tmp_path / "gpg-ran"
    program = marker_script(tmp_path / "gpg", marker, code=1)
    git(repo, "config", "commit.gpgSign", "true")
    git(repo, "config", "gpg.program", str(program))

    async def commit() -> None:
        runner = Git(repo)
        identity = await runner.identity_env()
        await runner.run("commit", "--allow-empty", "-qm", "unsigned", env=identity)

    anyio.run(commit)
    assert not marker.exists()
    assert git(repo, "log", "-1", "--format=%s %G?") == "unsigned N"


def test_an_ssh_command_in_the_config_never_runs(
    make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo()
    for name in ("GIT_SSH", "GIT_SSH_COMMAND"):  # the user's own would win over any config
        monkeypatch.delenv(name, raising=False)
    marker = tmp_path / "ssh-ran"
    program = marker_script(tmp_path / "ssh", marker, code=1)
    git(repo, "config", "core.sshCommand", str(program))
    remote = "ssh://example.invalid/repo.git"
    subprocess.run(["git", "-C", str(repo), "fetch", "-q", remote], capture_output=True)
    assert marker.exists()  # plain git runs it
    marker.unlink()
    with pytest.raises(GitError):
        run_git(repo, "fetch", "--quiet", remote)
    assert not marker.exists()


# Revisions from elsewhere.


@pytest.mark.parametrize("value", ["a" * 40, "0123456789abcdef" * 4])
def test_check_ids_accepts_full_sha1_and_sha256_ids(value: str) -> None:
    check_ids(value, value)
    check_ids()


@pytest.mark.parametrize(
    "value",
    [
        "HEAD",
        "main",
        "--output=/tmp/x",
        "A" * 40,  # upper case
        "a" * 39,
        "a" * 41,
        "a" * 40 + "\n",
        "",
        None,
    ],
)
def test_check_ids_refuses_anything_but_a_full_object_id(value: str | None) -> None:
    with pytest.raises(GitError) as caught:
        check_ids("b" * 40, value)
    error = caught.value
    assert error.returncode == 128
    assert error.stderr == f"fatal: not an object id: {value!r}"
    assert str(error) == f"git <check>: fatal: not an object id: {value!r}"


def test_end_of_options_keeps_an_option_shaped_revision_from_being_an_option(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """Why every revision the engine passes comes after ``--end-of-options``."""
    repo = make_repo()
    planted = tmp_path / "written-by-git"
    hostile = f"--output={planted}"
    # Taken as an option, the "revision" makes git write a file of the attacker's choosing.
    run_git(repo, "log", "-1", hostile)
    assert planted.exists()
    planted.unlink()
    # After it, git refuses the same text instead of acting on it.
    with pytest.raises(GitError, match="must come before non-option arguments"):
        run_git(repo, "log", "-1", "--end-of-options", hostile)
    assert not planted.exists()


# run(timeout=), check, out, ok, calls.


def test_a_hanging_git_is_killed_at_its_timeout_whatever_check_says(
    make_repo: MakeRepo,
) -> None:
    repo = make_repo()
    fifo = repo / "blocking-fifo"
    os.mkfifo(fifo)  # git blocks opening it for reading: no writer ever comes
    runner = Git(repo)

    async def main() -> None:
        with pytest.raises(GitError) as caught:
            await runner.run("hash-object", str(fifo), timeout=0.3, check=False)
        assert caught.value.returncode == -9
        assert caught.value.command == ["hash-object", str(fifo)]
        assert str(caught.value) == (
            f"git hash-object {fifo}: fatal: git did not finish within 0.3 s and was killed"
        )

    anyio.run(main)
    assert runner.calls == 1
    assert live_processes_with(str(fifo)) == []


def test_failures_are_git_errors_naming_the_command_and_gits_last_line(
    make_repo: MakeRepo,
) -> None:
    repo = make_repo()
    runner = Git(repo)

    async def main() -> None:
        with pytest.raises(GitError) as caught:
            await runner.run("rev-parse", "--verify", "no-such-branch")
        error = caught.value
        assert isinstance(error, OrchestratorError)
        assert error.command == ["rev-parse", "--verify", "no-such-branch"]
        assert error.returncode == 128
        # LC_ALL=C: git's message is the English one, whatever the user's locale.
        assert (
            str(error) == "git rev-parse --verify no-such-branch: fatal: Needed a single revision"
        )
        unchecked = await runner.run("rev-parse", "--verify", "no-such-branch", check=False)
        assert unchecked.returncode == 128
        assert await runner.ok("rev-parse", "--verify", "HEAD")
        assert not await runner.ok("rev-parse", "--verify", "no-such-branch")
        assert await runner.out("rev-parse", "--abbrev-ref", "HEAD") == "main"

    anyio.run(main)
    assert runner.calls == 5


def test_a_git_error_with_nothing_on_stderr_names_the_exit_code() -> None:
    error = GitError(["status"], 3, "  \n")
    assert (error.stderr, str(error)) == ("", "git status: exit code 3")
    many = GitError(["merge"], 1, "warning: one\nerror: two\nfatal: the last one\n")
    assert str(many) == "git merge: fatal: the last one"


def test_a_started_git_command_runs_to_its_end_and_the_cancel_comes_after(
    make_repo: MakeRepo,
) -> None:
    repo = make_repo()
    head = git(repo, "rev-parse", "HEAD")
    after: list[str] = []

    async def main() -> None:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await Git(repo).run("update-ref", "refs/heads/made-while-cancelled", head)
            after.append("not reached")
        assert scope.cancelled_caught

    anyio.run(main)
    assert after == []
    assert git(repo, "rev-parse", "refs/heads/made-while-cancelled") == head
    assert not (repo / ".git" / "refs" / "heads" / "made-while-cancelled.lock").exists()


@pytest.fixture
def stdin_with_data() -> Iterator[bytes]:
    """The test process's own stdin (fd 0) replaced by a pipe holding some bytes."""
    data = b"the orchestrator's own stdin\n"
    read, write = os.pipe()
    os.write(write, data)
    os.close(write)
    saved = os.dup(0)
    os.dup2(read, 0)
    os.close(read)
    try:
        yield data
    finally:
        os.dup2(saved, 0)
        os.close(saved)


def test_empty_stdin_is_empty_not_the_orchestrators_own(
    make_repo: MakeRepo, stdin_with_data: bytes
) -> None:
    repo = make_repo()
    result = run_git(repo, "hash-object", "--stdin", stdin=b"")
    assert result.stdout.decode().strip() == EMPTY_BLOB


# The environment git runs in.


def test_clean_environment_drops_what_ties_git_to_one_repository() -> None:
    env = {name: "/somewhere" for name in REPOSITORY_VARIABLES}
    env |= {"GIT_CONFIG_KEY_0": "core.hooksPath", "GIT_CONFIG_VALUE_0": "/evil"}
    kept = {
        "PATH": "/usr/bin",
        "HOME": "/home/u",
        "GIT_AUTHOR_NAME": "Ann",
        "GIT_SSH_COMMAND": "ssh -i key",
        "GIT_TRACE": "0",
        "GIT_CONFIG_GLOBAL": "/home/u/.gitconfig",
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    original = {**env, **kept}
    assert clean_environment(original) == kept
    assert len(original) == len(env) + len(kept)  # the input is not changed


def test_repository_variables_cover_what_git_itself_lists() -> None:
    listed = subprocess.run(
        ["git", "rev-parse", "--local-env-vars"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert set(listed) <= REPOSITORY_VARIABLES


def test_inherited_git_dir_index_and_config_do_not_reach_the_runner(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    theirs = make_repo(name="theirs")
    ours = make_repo(name="ours", extra={"only-ours.txt": "x\n"})
    # As inside a hook of *theirs*, or a wrapper that pinned it.
    monkeypatch.setenv("GIT_DIR", str(theirs / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(theirs))
    monkeypatch.setenv("GIT_INDEX_FILE", str(tmp_path / "foreign-index"))
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", "user.name")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", "Injected")
    runner = Git(ours)

    async def main() -> tuple[str, str, bool]:
        top = await runner.out("rev-parse", "--show-toplevel")
        files = await runner.out("ls-files")
        injected = await runner.ok("config", "user.name")
        return top, files, injected

    top, files, injected = anyio.run(main)
    assert top == str(ours)
    assert "only-ours.txt" in files.splitlines()
    assert not injected
    assert not (tmp_path / "foreign-index").exists()


def test_a_replace_ref_does_not_change_what_the_runner_sees(make_repo: MakeRepo) -> None:
    repo = make_repo()
    real = git(repo, "rev-parse", "HEAD")
    tree = git(repo, "rev-parse", "HEAD^{tree}")
    fake = git(repo, "commit-tree", tree, "-m", "what an agent wants shown")
    git(repo, "replace", real, fake)
    assert git(repo, "log", "-1", "--format=%s", real) == "what an agent wants shown"
    shown = anyio.run(lambda: Git(repo).out("log", "-1", "--format=%s", real))
    assert shown == "initial"


# The identity for the orchestrator's commits.


def test_identity_falls_back_on_a_fresh_machine_and_is_asked_once(make_repo: MakeRepo) -> None:
    runner = Git(make_repo())

    async def twice() -> list[dict[str, str]]:
        return [await runner.identity_env(), await runner.identity_env()]

    first, second = anyio.run(twice)
    name, email = FALLBACK_IDENTITY
    assert second is first
    assert first == {
        "GIT_AUTHOR_NAME": name,
        "GIT_AUTHOR_EMAIL": email,
        "GIT_COMMITTER_NAME": name,
        "GIT_COMMITTER_EMAIL": email,
    }
    assert runner.calls == 1


def test_identity_is_asked_once_by_tasks_committing_at_the_same_moment(
    make_repo: MakeRepo,
) -> None:
    runner = Git(make_repo())
    got: list[dict[str, str]] = []

    async def many() -> None:
        async def one() -> None:
            got.append(await runner.identity_env())

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(one)

    anyio.run(many)
    assert len(got) == 8 and all(g is got[0] for g in got)
    assert runner.calls == 1


def test_the_users_identity_wins_and_only_what_is_missing_is_filled(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo()
    git(repo, "config", "user.name", "Configured Name")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "committer@example.com")
    env = anyio.run(Git(repo).identity_env)
    assert env == {"GIT_AUTHOR_EMAIL": FALLBACK_IDENTITY[1]}


def test_git_ending_before_it_reads_its_input_is_a_git_error(make_repo: MakeRepo) -> None:
    """More input than a pipe holds, to a git that stops at a bad option: a GitError with
    git's own word (whether the writer saw the pipe close first or not), not the writer's
    broken pipe (an exception group) escaping to the caller."""
    repo = make_repo()
    big = b"x" * (4 << 20)
    for _ in range(5):  # (the race went either way)
        with pytest.raises(GitError, match="no-such-option") as failed:
            anyio.run(
                lambda: Git(repo).run("hash-object", "--no-such-option", "--stdin", stdin=big)
            )
        assert failed.value.returncode == 129


def test_a_quiet_read_fails_on_a_word_on_stderr(make_repo: MakeRepo) -> None:
    """ls-files and diff-files say on stderr that they could not read a directory, and exit
    0: a catch-up that read past that would miss what the directory holds."""
    repo = make_repo()

    async def read(quiet: bool) -> tuple[bytes, bool]:
        return await Git(repo).read(
            "ls-files", stdin=b"", limit=1 << 20, timeout=30, env={"GIT_TRACE": "2"}, quiet=quiet
        )

    out, cut = anyio.run(read, False)
    assert b"src/file0000.txt" in out and not cut
    with pytest.raises(GitError, match="trace"):
        anyio.run(read, True)


def test_a_cancelled_read_leaves_at_once_and_its_git_is_killed(make_repo: MakeRepo) -> None:
    """Cancelled while git hangs, the caller does not wait for the read's timeout, and git
    is killed (a read leaves no lock behind)."""
    repo = make_repo()
    fifo = repo / "read-fifo"
    os.mkfifo(fifo)  # git blocks opening it: no writer ever comes
    runner = Git(repo)

    async def main() -> None:
        with anyio.move_on_after(0.5) as scope:
            await runner.read("hash-object", str(fifo), stdin=b"", limit=1 << 10, timeout=600)
        assert scope.cancelled_caught
        for _ in range(100):
            if not live_processes_with(str(fifo)):
                break
            await anyio.sleep(0.05)

    anyio.run(main)
    assert live_processes_with(str(fifo)) == []
    assert runner.calls == 1


def test_a_read_gives_more_input_than_a_pipe_holds_while_git_writes_more_than_one(
    make_repo: MakeRepo,
) -> None:
    """Input and output each far past a pipe's 64 KiB, written and read at once (a writer
    that waited for git to read all its input before reading any output would deadlock)."""
    repo = make_repo()
    head = git(repo, "rev-parse", "HEAD")
    lines = (head + "\n").encode() * 20_000  # 820 KB in; about 1.1 MB out

    async def main() -> tuple[bytes, bool]:
        return await Git(repo).read(
            "cat-file", "--batch-check", stdin=lines, limit=4 << 20, timeout=60
        )

    out, cut = anyio.run(main)
    assert not cut
    assert out.count(b"\n") == 20_000
    assert out.splitlines()[-1].startswith(head.encode() + b" commit ")


def test_a_read_past_its_limit_is_cut_there_and_its_git_killed(make_repo: MakeRepo) -> None:
    repo = make_repo()
    head = git(repo, "rev-parse", "HEAD")
    lines = (head + "\n").encode() * 20_000

    async def main() -> tuple[bytes, bool]:
        return await Git(repo).read(
            "cat-file", "--batch-check", stdin=lines, limit=1000, timeout=60
        )

    out, cut = anyio.run(main)
    assert cut and len(out) == 1000
    assert out.startswith(head.encode() + b" commit ")
    assert live_processes_with(str(repo)) == []


def test_a_read_that_hangs_is_killed_at_its_timeout(make_repo: MakeRepo) -> None:
    repo = make_repo()
    fifo = repo / "timeout-fifo"
    os.mkfifo(fifo)

    async def main() -> None:
        await Git(repo).read("hash-object", str(fifo), stdin=b"", limit=1 << 10, timeout=0.3)

    with pytest.raises(GitError, match=r"did not finish within 0\.3 s") as caught:
        anyio.run(main)
    assert caught.value.returncode == -9
    assert live_processes_with(str(fifo)) == []


def test_git_commands_wait_for_no_worker_thread(make_repo: MakeRepo) -> None:
    """Every default worker thread taken (by file work, say) holds up no git command."""
    repo = make_repo()
    runner = Git(repo)

    async def main() -> str:
        default = anyio.to_thread.current_default_thread_limiter()
        borrowers = [object() for _ in range(int(default.total_tokens))]
        for borrower in borrowers:
            await default.acquire_on_behalf_of(borrower)
        try:
            with anyio.fail_after(30):
                out, _ = await runner.read("rev-parse", "HEAD", stdin=b"", limit=100, timeout=30)
                done = await runner.run("rev-parse", "HEAD")
        finally:
            for borrower in borrowers:
                default.release_on_behalf_of(borrower)
        assert done.stdout == out
        return out.decode().strip()

    assert anyio.run(main) == git(repo, "rev-parse", "HEAD")


def two_commits(repo: Path) -> tuple[str, str]:
    """The repository's HEAD, and a second commit made on it (HEAD now)."""
    head = git(repo, "rev-parse", "HEAD")
    git(repo, "commit", "--allow-empty", "-qm", "second")
    return head, git(repo, "rev-parse", "HEAD")


def ref(repo: Path, name: str) -> str | None:
    done = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", name],
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() or None


def test_a_ref_made_a_fifo_fails_its_own_update_and_holds_up_no_other(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kept update-ref reads a ref's value to check it: a FIFO put in the ref's place
    (by an agent, in the shared refs/) would block it, and every ref update of the run
    after it, for ever. Past its timeout that update fails, git having removed its lock
    (SIGTERM), and the next update goes to another process."""
    monkeypatch.setattr(git_module, "REF_TIMEOUT_S", 0.5)
    repo = make_repo()
    head, second = two_commits(repo)
    git(repo, "branch", "victim", head)
    fifo = repo / ".git" / "refs" / "heads" / "victim"
    fifo.unlink()
    os.mkfifo(fifo)
    runner = Git(repo)

    async def main() -> None:
        with anyio.fail_after(30):
            async with runner.kept():
                with pytest.raises(GitError, match=r"did not answer within 0\.5 s"):
                    await runner.update_ref("refs/heads/victim", second, head)
                assert await runner.update_ref("refs/heads/other", second, "")

    anyio.run(main)
    assert not (repo / ".git" / "refs" / "heads" / "victim.lock").exists()
    assert ref(repo, "refs/heads/other") == second
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # left as it is: not the orchestrator's
    assert live_processes_with(str(repo)) == []


def test_a_refs_file_made_a_fifo_is_found_before_git_is_asked_and_removed(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """A FIFO, or a link to one, at a ref's loose file or its reflog: the update fails at
    once (no git waits on it) and the git directory's own file goes; nothing outside the
    git directory is removed, whatever a link in refs/ leads to."""
    repo = make_repo()
    head, second = two_commits(repo)
    common = repo / ".git"
    runner = Git(repo)
    runner.common_dir = common
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mkfifo(outside / "fifo")
    os.mkfifo(common / "refs" / "heads" / "fifo-ref")
    (common / "logs" / "refs" / "heads").mkdir(parents=True, exist_ok=True)
    os.mkfifo(common / "logs" / "refs" / "heads" / "fifo-log")
    (common / "refs" / "heads" / "linked").symlink_to(outside / "fifo")
    (common / "refs" / "heads" / "elsewhere").symlink_to(outside, target_is_directory=True)

    async def main() -> list[str]:
        said = []
        with anyio.fail_after(20):
            async with runner.kept():
                for ref in ("fifo-ref", "fifo-log", "linked", "elsewhere/fifo"):
                    with pytest.raises(GitError, match="was not a regular file") as caught:
                        await runner.update_ref(f"refs/heads/{ref}", second, "")
                    said.append(str(caught.value))
                # The places freed: the same updates now simply work.
                assert await runner.update_ref("refs/heads/fifo-ref", second, "")
                assert await runner.update_ref("refs/heads/fifo-log", second, "")
                assert not await runner.update_ref("refs/heads/x", second, head, check=False)
        return said

    said = anyio.run(main)
    assert [s.endswith("and was removed") for s in said] == [True, True, True, False]
    assert ref(repo, "refs/heads/fifo-ref") == second and ref(repo, "refs/heads/fifo-log") == second
    assert not os.path.lexists(common / "refs" / "heads" / "linked")
    assert stat.S_ISFIFO(os.lstat(outside / "fifo").st_mode)  # not the git directory's
    assert runner.calls == 1  # the kept update-ref; the four refused cost no git at all


def test_ref_updates_go_through_one_git_process_and_do_what_update_ref_does(
    make_repo: MakeRepo,
) -> None:
    """While ref_updates is open, branches are made, moved and deleted (each only from the
    value given) by one git process; outside it, each takes a git process of its own."""
    repo = make_repo()
    head, second = two_commits(repo)

    async def main() -> int:
        runner = Git(repo)
        async with runner.kept():
            assert kept_children() == []  # started when first needed
            await runner.update_ref("refs/heads/made", head, "")  # only if it does not exist
            await runner.update_ref("refs/heads/made", second, head)  # only from head
            await runner.update_ref("refs/heads/any", second)  # from whatever it was
            await runner.update_ref("refs/heads/any", head)
            await runner.update_ref("refs/heads/gone", head, "")
            await runner.update_ref("refs/heads/gone", None, head)  # deleted, only from head
            await runner.update_ref("refs/heads/gone2", head, "")
            await runner.update_ref("refs/heads/gone2", None)  # deleted, whatever it was at
            assert len(kept_children()) == 1
        assert kept_children() == []  # closed, it ends
        inside = runner.calls
        await runner.update_ref("refs/heads/outside", head, "")
        await runner.update_ref("refs/heads/outside", second, head)
        assert runner.calls == inside + 2
        return inside

    assert anyio.run(main) == 1
    assert ref(repo, "refs/heads/made") == second
    assert ref(repo, "refs/heads/any") == head
    assert ref(repo, "refs/heads/gone") is None and ref(repo, "refs/heads/gone2") is None
    assert ref(repo, "refs/heads/outside") == second
    assert not list((repo / ".git").rglob("*.lock"))


def test_a_ref_update_git_refuses_fails_with_its_reason_and_the_next_one_works(
    make_repo: MakeRepo,
) -> None:
    """A branch that exists, or is not at the value given, is refused as ``git update-ref``
    refuses it (git ends, saying why); the update after it starts a new process."""
    repo = make_repo()
    head, second = two_commits(repo)

    async def main() -> int:
        runner = Git(repo)
        async with runner.kept():
            await runner.update_ref("refs/heads/b", head, "")
            with pytest.raises(GitError, match="already exists"):
                await runner.update_ref("refs/heads/b", second, "")
            with pytest.raises(GitError, match="but expected"):
                await runner.update_ref("refs/heads/b", second, second)
            assert not await runner.update_ref("refs/heads/b", None, second, check=False)
            assert await runner.update_ref("refs/heads/b", second, head, check=False)
        return runner.calls

    assert anyio.run(main) == 4  # one process, and one after each of the three refusals
    assert ref(repo, "refs/heads/b") == second
    assert not list((repo / ".git").rglob("*.lock"))


def test_many_ref_updates_at_once_are_each_one_transaction(make_repo: MakeRepo) -> None:
    repo = make_repo()
    head = git(repo, "rev-parse", "HEAD")

    async def main() -> int:
        runner = Git(repo)
        async with runner.kept(), anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(runner.update_ref, f"refs/heads/t{i}", head, "")
        return runner.calls

    assert anyio.run(main) == 1
    assert git(repo, "for-each-ref", "--count=100", "--format=%(refname)", "refs/heads/t*")
    assert len(git(repo, "for-each-ref", "--format=x", "refs/heads/").split()) == 41


def test_a_ref_update_cancelled_is_done_or_not_started_never_half_done(
    make_repo: MakeRepo,
) -> None:
    """A caller cancelled while its transaction runs gets the cancellation after it (git
    is never cut short: a killed git can leave a ref locked); a transaction git was given
    only in part when its input closed is aborted by git, nothing of it applied."""
    repo = make_repo()
    head = git(repo, "rev-parse", "HEAD")
    done: list[str] = []

    async def main() -> None:
        runner = Git(repo)

        async def caller() -> None:
            await runner.update_ref("refs/heads/second", head, "")
            done.append("after")  # not reached: the cancel is delivered once git is done

        async with runner.kept():
            await runner.update_ref("refs/heads/first", head, "")  # the process started
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(caller)
                    await anyio.lowlevel.checkpoint()  # it holds the lock and has written its lines
                    scope.cancel()
                done.append("not reached")
            assert scope.cancelled_caught

    anyio.run(main)
    assert done == []
    assert ref(repo, "refs/heads/second") == head
    half = subprocess.run(
        ["git", "-C", str(repo), "update-ref", "--stdin"],
        input=f"start\nupdate refs/heads/half {head}\n".encode(),
        capture_output=True,
    )
    assert half.returncode == 0 and ref(repo, "refs/heads/half") is None
    assert not list((repo / ".git").rglob("*.lock"))


def test_a_kept_git_that_died_is_started_again_and_what_it_never_read_is_done(
    make_repo: MakeRepo,
) -> None:
    """Killed between two questions (by anyone), a kept git has read nothing of the next:
    a new process takes it, so neither the update nor the commit fails for it."""
    repo = make_repo()
    head, tree = head_and_tree(repo)

    async def main(runner: Git) -> int:
        await runner.update_ref("refs/heads/a", head, "")
        await runner.commit_tree(tree, [head], "first", known=True)
        calls = runner.calls
        os.kill(kept_child(), signal.SIGKILL)
        os.kill(kept_child(b"hash-object"), signal.SIGKILL)
        await anyio.sleep(0.1)
        await runner.update_ref("refs/heads/b", head, "")
        commit = await runner.commit_tree(tree, [head], "second", known=True)
        assert git(repo, "log", "-1", "--format=%s", commit) == "second"
        return runner.calls - calls

    assert with_kept_gits(repo, main) == 2  # each started again, once
    assert git(repo, "rev-parse", "refs/heads/b") == head


def test_what_the_kept_update_ref_cannot_take_as_a_word_never_reaches_its_input(
    make_repo: MakeRepo,
) -> None:
    """Values that are not object ids are refused before git; a ref name with a space or
    a control character (never one the orchestrator makes) goes to a git process of its
    own as an argument, where git refuses it, instead of being read as two words."""
    repo = make_repo()
    head = git(repo, "rev-parse", "HEAD")

    async def main() -> int:
        runner = Git(repo)
        async with runner.kept():
            for bad in ("HEAD", "--stdin", f"{head} {head}", f"{head}\ncommit"):
                with pytest.raises(GitError, match="not an object id"):
                    await runner.update_ref("refs/heads/x", bad, "")
            assert runner.calls == 0
            for name in (f"refs/heads/a {head}", "refs/heads/a\ncommit"):
                with pytest.raises(GitError):
                    await runner.update_ref(name, head, "")
            await runner.update_ref("refs/heads/é", head, "")  # a name git takes, as an argument
        return runner.calls

    assert anyio.run(main) == 3
    assert git(repo, "for-each-ref", "--format=%(refname)", "refs/heads/") == (
        "refs/heads/main\nrefs/heads/é"
    )


@pytest.mark.parametrize(
    "message",
    [
        "agent: subject [task t1]\n\nTask-Id: t1\n",
        "no newline at the end",
        "café ✓ and a \x7f",
        "two\n\nparagraphs\n\n\n",
    ],
    ids=["trailers", "no-newline", "non-ascii", "blank-lines"],
)
def test_a_commit_written_by_the_kept_hash_object_is_the_one_commit_tree_makes(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch, message: str
) -> None:
    """The same bytes, so the same id, as ``git commit-tree`` with the same identity at the
    same second: one parent or two, the identity from the fallback or from git config."""
    repo = make_repo()
    head, second = two_commits(repo)
    tree = git(repo, "rev-parse", "HEAD^{tree}")
    for key in ("AUTHOR", "COMMITTER"):
        monkeypatch.delenv(f"GIT_{key}_NAME", raising=False)
        monkeypatch.delenv(f"GIT_{key}_EMAIL", raising=False)
        monkeypatch.delenv(f"GIT_{key}_DATE", raising=False)

    async def made(parents: list[str]) -> tuple[str, int, dict[str, str]]:
        runner = Git(repo)
        async with runner.kept():
            commit = await runner.commit_tree(tree, parents, message, known=True)
            calls = runner.calls
            await runner.commit_tree(tree, parents, message + "again", known=True)
            assert runner.calls == calls  # the second: no git process more
        return commit, calls, await runner.identity_env()

    for parents in ([head], [second, head]):
        for config in (None, ("Dana Q. Example, Jr.", "dana@example.com")):
            if config:
                git(repo, "config", "user.name", config[0])
                git(repo, "config", "user.email", config[1])
            commit, calls, identity = anyio.run(made, parents)
            assert calls == 4  # hash-object, git config, and git var twice: once per run
            when = git(repo, "show", "-s", "--format=%ad", "--date=raw", commit)
            assert commit == by_commit_tree(repo, tree, parents, message, identity, when)
            assert git(repo, "cat-file", "-t", commit) == "commit"


def test_a_commit_with_a_date_set_in_the_environment_is_made_by_commit_tree(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """git parses dates in many forms: with GIT_AUTHOR_DATE or GIT_COMMITTER_DATE set, git
    commit-tree makes the commit, as outside a run."""
    repo = make_repo()
    head, tree = head_and_tree(repo)
    monkeypatch.setenv("GIT_AUTHOR_DATE", "2001-02-03 04:05:06 +0100")

    async def made() -> str:
        runner = Git(repo)
        async with runner.kept():
            return await runner.commit_tree(tree, [head], "dated", known=True)

    commit = anyio.run(made)
    assert git(repo, "show", "-s", "--format=%ad", "--date=raw", commit) == "981169506 +0100"


def test_a_commit_file_changed_under_the_kept_hash_object_is_refused(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit's bytes go to git through a file: whatever git wrote is checked against
    the id of the bytes this process made, so a file swapped meanwhile (another tree, say)
    makes no commit the task takes for its own."""
    from orchestrator import _git

    repo = make_repo()
    head, tree = head_and_tree(repo)
    write = _git._write_new

    def swapped(directory: Path, data: bytes) -> Path:
        return write(directory, data.replace(b"dated", b"other"))

    async def made() -> str:
        runner = Git(repo)
        async with runner.kept():
            monkeypatch.setattr(_git, "_write_new", swapped)
            with pytest.raises(GitError, match=r"fatal: wrote '[0-9a-f]{40}', not [0-9a-f]{40}"):
                await runner.commit_tree(tree, [head], "dated", known=True)
            monkeypatch.setattr(_git, "_write_new", write)
            return await runner.commit_tree(tree, [head], "dated", known=True)

    commit = anyio.run(made)
    assert git(repo, "log", "-1", "--format=%s", commit) == "dated"


def kept_children(command: bytes = b"update-ref\0--stdin") -> list[int]:
    """The pids of this process's kept gits running *command* (children of this process
    only: other sessions on the machine run tests of their own)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != b"Z" and command in cmdline:
            found.append(int(entry))
    return found


def kept_child(command: bytes = b"update-ref\0--stdin") -> int:
    (pid,) = kept_children(command)
    return pid


def test_ctrl_c_at_the_terminal_does_not_reach_the_kept_update_ref(make_repo: MakeRepo) -> None:
    """Ctrl-C sends SIGINT to the terminal's foreground process group: the orchestrator
    takes it as 'stop the run and clean up' (cli.py), but a kept git in the same group
    dies of it, and the clean-up's first ref update (a cancelled task's work committed to
    its branch) then fails. A ``git update-ref`` started per update after the signal did not."""
    repo = make_repo()
    head = git(repo, "rev-parse", "HEAD")

    async def main() -> None:
        runner = Git(repo)
        async with runner.kept():
            await runner.update_ref("refs/heads/a", head, "")
            pid = kept_child()
            assert os.getpgid(pid) != os.getpgrp(), "in our process group: Ctrl-C kills it"

    anyio.run(main)


def test_identity_asked_under_another_event_loop_after_a_cancel(make_repo: MakeRepo) -> None:
    """A Git outlives the event loop it was used in (a test, a library caller running
    anyio.run twice): the identity lock made under asyncio, left by a cancelled first
    ask, broke the next ask under trio (RuntimeError: no running event loop)."""
    runner = Git(make_repo())

    async def cancelled() -> None:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await runner.identity_env()

    async def again() -> dict[str, str]:
        return await runner.identity_env()

    anyio.run(cancelled, backend="asyncio")
    assert isinstance(anyio.run(again, backend="trio"), dict)


def test_ident_lines_are_what_git_var_gives_and_a_set_date_is_gits_own(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit's author and committer lines: the names git var gives (asked once), the time
    and zone now; with a date set in the environment, git var's own answer each time."""
    import time

    repo = make_repo()
    for key in ("AUTHOR_DATE", "COMMITTER_DATE"):
        monkeypatch.delenv(f"GIT_{key}", raising=False)
    runner = Git(repo)

    def by_git(name: str, env: dict[str, str]) -> bytes:
        return subprocess.run(
            ["git", "-C", str(repo), "var", name],
            env={**os.environ, **env},
            capture_output=True,
            check=True,
        ).stdout.strip()

    async def lines() -> tuple[dict[str, str], tuple[bytes, bytes], tuple[bytes, bytes], int]:
        identity = await runner.identity_env()
        first = await runner.ident_lines(identity)
        calls = runner.calls
        second = await runner.ident_lines(identity)
        return identity, first, second, runner.calls - calls

    identity, (author, committer), again, asked = anyio.run(lines)
    assert asked == 0 and again[0].rsplit(b" ", 2)[0] == author.rsplit(b" ", 2)[0]
    for line, name in ((author, "GIT_AUTHOR_IDENT"), (committer, "GIT_COMMITTER_IDENT")):
        gits = by_git(name, identity).rsplit(b" ", 2)
        ours = line.rsplit(b" ", 2)
        assert ours[0] == gits[0] and ours[2] == gits[2]  # the names, and the zone
        assert abs(int(ours[1]) - time.time()) < 60
    monkeypatch.setenv("GIT_AUTHOR_DATE", "@1000000000 +0200")
    dated = anyio.run(Git(repo).ident_lines, identity)
    assert dated[0] == by_git("GIT_AUTHOR_IDENT", identity)
    assert dated[0].endswith(b" 1000000000 +0200")


def test_a_fifo_put_where_the_kept_hash_object_reads_fails_the_commit_not_the_run(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit's bytes reach the kept hash-object through a file: one replaced by a FIFO
    (an agent running as the user could) would block git's read forever. Past its time the
    process is killed and that commit fails; the next is written by a new one."""
    from orchestrator import _git

    repo = make_repo()
    head, tree = head_and_tree(repo)
    write = _git._write_new

    def fifo(directory: Path, data: bytes) -> Path:
        path = directory / "fifo"
        os.mkfifo(path)
        return path

    monkeypatch.setattr(_git, "OBJECT_TIMEOUT_S", 1.0)

    async def made() -> str:
        runner = Git(repo)
        async with runner.kept():
            monkeypatch.setattr(_git, "_write_new", fifo)
            with pytest.raises(GitError, match="did not answer within 1 s"):
                await runner.commit_tree(tree, [head], "blocked", known=True)
            monkeypatch.setattr(_git, "_write_new", write)
            return await runner.commit_tree(tree, [head], "after", known=True)

    commit = anyio.run(made)
    assert git(repo, "log", "-1", "--format=%s", commit) == "after"
    assert kept_children(b"hash-object") == []


def test_scratch_directories_killed_runs_left_are_removed_and_live_ones_kept(
    make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kept hash-object reads each commit's bytes from a directory of the process's own
    in TMPDIR, removed at the end; a process killed leaves it. The next process to make one
    removes those whose lock nobody holds (a killed process's, or an older version's)."""
    import fcntl
    import tempfile

    top = tmp_path / "tmp"
    top.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(top))
    monkeypatch.setattr(git_module, "_left_scratches_removed", False)
    dead = top / "orchestrator-objects-dead"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "leftover").write_text("x")
    live = top / "orchestrator-objects-live"
    live.mkdir()
    holder = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # as a live process holds its own
    other = top / "orchestrator-objects-file"
    other.write_text("not a directory: not ours to judge")
    (top / "unrelated").mkdir()
    repo = make_repo()
    head, tree = head_and_tree(repo)
    seen: list[list[str]] = []

    async def main(runner: Git) -> None:
        await runner.commit_tree(tree, [head], "first", known=True)
        seen.append(sorted(p.name for p in top.iterdir()))

    try:
        with_kept_gits(repo, main)
    finally:
        os.close(holder)
    [during] = seen
    ours = [n for n in during if n not in {live.name, other.name, "unrelated"}]
    assert len(ours) == 1 and ours[0].startswith("orchestrator-objects-")  # its own, locked
    assert sorted(p.name for p in top.iterdir()) == sorted([live.name, other.name, "unrelated"])
    # Removed once per process: a later run does not look again.
    dead.mkdir()
    with_kept_gits(repo, main)
    assert dead.is_dir()
