"""orchestrator/recovery.py: what a dead orchestrator left running is found by its tag and killed.

Real processes: "agents" carrying a run's tag in their environment (one of them escaped its
group with setsid), and bystanders that must survive: another run's agents, a run whose id
merely starts like this one's, a process with no tag.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from orchestrator import process as process_module
from orchestrator._git import Git
from orchestrator.errors import JournalCorrupt, OrchestratorError
from orchestrator.journal import Journal, JournalContents, read_journal
from orchestrator.process import TAG_VARIABLE, find_tagged, kill_tagged
from orchestrator.recovery import clear_task_leftovers, kill_orphans, replay
from orchestrator.repo import Repository

from .conftest import MakeRepo, git

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]

Spawn = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Factory: a sleeping process, with *tag* as its TAG_VARIABLE when given; killed after."""
    started: list[subprocess.Popen[bytes]] = []

    def start(tag: str | None = None, *, new_session: bool = False) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k != TAG_VARIABLE}
        if tag is not None:
            env[TAG_VARIABLE] = tag
        proc = subprocess.Popen(SLEEPER, env=env, start_new_session=new_session)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def ended(proc: subprocess.Popen[bytes]) -> bool:
    """Whether *proc* ended, waiting for it as long as it takes (a SIGKILL is not instant)."""
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return True


def wait_for_tags(prefix: str, count: int) -> None:
    """Until *count* processes carry a tag starting with *prefix* (a fresh exec takes a moment)."""
    deadline = time.monotonic() + 30
    while len(find_tagged(prefix)) < count:
        assert time.monotonic() < deadline, find_tagged(prefix)
        time.sleep(0.01)


def test_kill_orphans_kills_the_runs_agents_and_nothing_else(spawn: Spawn) -> None:
    run = "20260101-000000-aaaa"
    agents = [spawn(f"{run}/t1/1"), spawn(f"{run}/t2/3", new_session=True)]
    bystanders = [
        spawn("20260101-000000-bbbb/t1/1"),  # another run's agent
        spawn(f"{run}x/t1/1"),  # a run whose id starts like this one's
        spawn(run),  # the run id without the slash: not a tag of this run
        spawn(),  # no tag at all
    ]
    wait_for_tags(f"{run}/", 2)
    assert sorted(find_tagged(f"{run}/")) == sorted(
        [(agents[0].pid, f"{run}/t1/1"), (agents[1].pid, f"{run}/t2/3")]
    )
    assert kill_orphans(run) == 2
    assert all(ended(agent) for agent in agents)
    assert all(agent.returncode == -signal.SIGKILL for agent in agents)
    assert all(b.poll() is None for b in bystanders)
    assert find_tagged(f"{run}/") == []
    assert kill_orphans(run) == 0  # nothing left: nothing to do


def test_an_exact_tag_kills_one_attempt_only(spawn: Spawn) -> None:
    mine, later = spawn("r/t/1"), spawn("r/t/10")
    wait_for_tags("r/t/", 2)
    assert kill_tagged("r/t/1") == 1
    assert ended(mine)
    assert later.poll() is None
    assert kill_tagged("r/t/", prefix=True) == 1
    assert ended(later)


def test_processes_that_vanish_or_cannot_be_read_are_passed_over(
    spawn: Spawn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that ends mid-scan, or whose environment may not be read, is skipped (the
    psutil path, taken where /proc and pidfds are not)."""
    monkeypatch.setattr(process_module, "_proc_scan", lambda: False)
    run = "20260101-000000-cccc"
    vanishing, unreadable, agent = (spawn(f"{run}/t{i}/1") for i in range(3))
    wait_for_tags(f"{run}/", 3)
    real_environ = psutil.Process.environ

    def environ(self: psutil.Process) -> dict[str, str]:
        if self.pid == vanishing.pid:
            raise psutil.NoSuchProcess(self.pid)
        if self.pid == unreadable.pid:
            raise psutil.AccessDenied(self.pid)
        return real_environ(self)

    monkeypatch.setattr(psutil.Process, "environ", environ)
    assert find_tagged(f"{run}/") == [(agent.pid, f"{run}/t2/1")]
    assert kill_orphans(run) == 1
    assert ended(agent)
    assert vanishing.poll() is None and unreadable.poll() is None


def test_a_zombie_carrying_the_tag_is_not_counted(spawn: Spawn) -> None:
    """An agent that died but was not reaped yet has no environment left to read."""
    zombie = spawn("r/zombie/1")
    wait_for_tags("r/zombie/", 1)
    zombie.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 30
    while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert find_tagged("r/zombie/") == []
    assert kill_tagged("r/zombie/", prefix=True) == 0


def test_a_refused_kill_is_tried_again_in_the_next_pass(
    spawn: Spawn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """psutil refuses to signal a pid that no longer names the process it first saw there (a
    reused pid): the next pass looks at the pid afresh."""
    monkeypatch.setattr(process_module, "_proc_scan", lambda: False)
    agent = spawn("r/reused/1")
    wait_for_tags("r/reused/", 1)
    real_kill = psutil.Process.kill
    refused: list[int] = []

    def kill(self: psutil.Process) -> None:
        if not refused:
            refused.append(self.pid)
            raise psutil.NoSuchProcess(self.pid, msg="its PID has been reused")
        real_kill(self)

    monkeypatch.setattr(psutil.Process, "kill", kill)
    assert kill_tagged("r/reused/", prefix=True) == 1
    assert refused == [agent.pid]
    assert ended(agent)


needs_pidfds = pytest.mark.skipif(
    not process_module._proc_scan(), reason="no /proc or pidfds: the psutil path is taken"
)


@needs_pidfds
def test_through_proc_a_process_unreadable_or_gone_is_passed_over_and_a_failed_signal_retried(
    spawn: Spawn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read from /proc and signalled through a pidfd: a process whose environment cannot be
    read is not killed; a signal that fails (the process gone between the read and the
    signal) is sent again in the next pass."""
    run = "20260101-000000-dddd"
    unreadable, agent = spawn(f"{run}/t0/1"), spawn(f"{run}/t1/1")
    wait_for_tags(f"{run}/", 2)
    real_tags, real_signal = process_module._proc_tags, signal.pidfd_send_signal
    refused: list[int] = []

    def tags(pid: int) -> list[str]:
        return [] if pid == unreadable.pid else real_tags(pid)

    def send(pidfd: int, sig: int, *args: Any) -> None:
        if not refused:
            refused.append(pidfd)
            raise ProcessLookupError("gone")
        real_signal(pidfd, sig, *args)

    monkeypatch.setattr(process_module, "_proc_tags", tags)
    monkeypatch.setattr(signal, "pidfd_send_signal", send)
    assert find_tagged(f"{run}/") == [(agent.pid, f"{run}/t1/1")]
    assert kill_orphans(run) == 1
    assert len(refused) == 1 and ended(agent)
    assert unreadable.poll() is None


@needs_pidfds
def test_through_proc_only_an_entry_of_its_own_is_a_tag(spawn: Spawn) -> None:
    """The tag is the variable's own entry in the environment: the same text inside another
    variable's value is not a tag, and each entry of the variable is read."""
    env = {k: v for k, v in os.environ.items() if k != TAG_VARIABLE}
    env["OTHER"] = f"{TAG_VARIABLE}=r/inside/1"
    disguised = subprocess.Popen(SLEEPER, env=env)
    try:
        agent = spawn("r/own/1")
        wait_for_tags("r/own/", 1)
        assert process_module._proc_tags(disguised.pid) == []
        assert process_module._proc_tags(agent.pid) == ["r/own/1"]
        assert kill_tagged("r/inside/1") == 0 and kill_tagged("r/", prefix=True) == 1
        assert ended(agent) and disguised.poll() is None
    finally:
        disguised.kill()
        disguised.wait()


@needs_pidfds
def test_through_proc_a_pid_is_signalled_only_if_its_process_carries_the_tag_now(
    spawn: Spawn,
) -> None:
    """The scan and the kill are two moments: a pid found tagged, then reused by another
    process, is read again through the pidfd before the signal. Here the pid names a process
    without the tag: it is not signalled."""
    bystander = spawn()
    assert not process_module._kill_if_tagged(bystander.pid, lambda tag: True)
    assert bystander.poll() is None
    tagged = spawn("r/now/1")
    wait_for_tags("r/now/", 1)
    assert process_module._kill_if_tagged(tagged.pid, lambda tag: tag == "r/now/1")
    assert ended(tagged)


@needs_pidfds
def test_through_proc_an_environment_is_read_up_to_a_bound(
    spawn: Spawn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process can make its environment as large as it likes (prctl): what is read of it
    is bounded; a tag past the bound is not found."""
    env = {k: v for k, v in os.environ.items() if k != TAG_VARIABLE}
    env["PADDING"] = "x" * 100_000
    env[TAG_VARIABLE] = "r/far/1"  # after the padding: environments keep insertion order
    far = subprocess.Popen(SLEEPER, env=env)
    try:
        wait_for_tags("r/far/", 1)
        monkeypatch.setattr(process_module, "MAX_ENVIRON_BYTES", 64 << 10)
        assert process_module._proc_tags(far.pid) == []
        assert kill_tagged("r/far/1") == 0 and far.poll() is None
    finally:
        far.kill()
        far.wait()


def test_replay_reads_what_the_journal_says(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.jsonl")
    journal.open()

    async def write() -> None:
        await journal.write({"type": "run", "at": "2026-01-01T00:00:00+00:00", "plan_name": "p"})
        await journal.write({"type": "worktree", "task": "a", "base_commit": "0" * 40})
        await journal.write({"type": "resumed", "pid": 1})
        await journal.write({"type": "finished"})

    anyio.run(write)
    journal.close()
    record = replay(read_journal(tmp_path / "journal.jsonl"), "r")
    assert record.settings["plan_name"] == "p"
    assert record.worktrees["a"]["base_commit"] == "0" * 40
    assert record.sessions == 2
    assert record.finished


def test_replay_refuses_a_journal_without_its_run_record() -> None:
    """A run killed before its first record (or made by an older orchestrator) has nothing
    to resume from; a worktree record that names no task is damage, not data."""
    why = r"\(it never got going, or an older orchestrator made it\)$"
    with pytest.raises(OrchestratorError, match=rf"^run r1 has no journal to resume from {why}"):
        replay(JournalContents(records=[{"type": "worktree", "task": "a"}]), "r1")
    damaged = JournalContents(records=[{"type": "run"}, {"type": "worktree", "base_commit": "0"}])
    with pytest.raises(JournalCorrupt, match=r"^run r1's journal has a worktree record without"):
        replay(damaged, "r1")


def test_replay_keeps_the_last_word_on_each_task_and_who_took_the_run_over() -> None:
    first = {"type": "worktree", "task": "a", "base_commit": "1" * 40}
    again = {"type": "worktree", "task": "a", "base_commit": "2" * 40}
    contents = JournalContents(
        records=[
            {"type": "run", "plan_name": "first"},
            first,
            {"type": "run", "plan_name": "not the settings"},
            {"type": "state", "task": "a", "state": "running"},  # not replayed
            again,
            {"type": "superseded", "by": "r2"},
        ]
    )
    record = replay(contents, "r1")
    assert record.settings == {"type": "run", "plan_name": "first"}
    assert record.worktrees == {"a": again}
    assert record.superseded_by == "r2"
    assert not record.finished and record.sessions == 1 and record.results == {}


# -- what an unfinished task of a dead run left behind --------------------------------------

RUN = "20260101-000000-dddd"
TASK = "impl[a,b]"  # its branch and directories are named ``impl@a@b``
NAME = "impl@a@b"
BRANCH = f"orchestrator/{RUN}/{NAME}"


def leftovers(repo: Path, *, commits: int = 0) -> tuple[Path, str]:
    """What a dead run left of TASK in *repo*: its worktree on its branch (with *commits*
    of the agent's on it), its venv and a stale lock of the branch; (worktree, base)."""
    base = git(repo, "rev-parse", "HEAD")
    state = repo / ".git" / "orchestrator"
    path = state / "worktrees" / RUN / NAME
    git(repo, "worktree", "add", "--quiet", "-b", BRANCH, str(path), base)
    for i in range(commits):
        (path / f"work{i}.txt").write_text(f"work {i}\n")
        git(path, "add", "--all")
        git(path, "commit", "--quiet", "-m", f"work {i}")
    (state / "venvs" / RUN / NAME / "bin").mkdir(parents=True)
    (repo / ".git" / "refs" / "heads" / f"{BRANCH}.lock").write_text("")
    return path, base


def clear(repo: Path, worktree: dict[str, str] | None, *, keep_branch: bool = False) -> list[str]:
    async def go() -> list[str]:
        opened = await Repository.open(repo)
        try:
            if keep_branch:
                return await clear_task_leftovers(
                    opened, opened.state_dir, RUN, TASK, worktree, keep_branch=True
                )
            # By default the branch goes (or is moved aside).
            return await clear_task_leftovers(opened, opened.state_dir, RUN, TASK, worktree)
        finally:
            opened.lock.close()

    return anyio.run(go)


def refs(repo: Path) -> list[str]:
    return git(repo, "for-each-ref", "--format=%(refname) %(objectname)").splitlines()


def test_leftovers_of_a_task_that_did_no_work_are_removed_with_its_branch(
    make_repo: MakeRepo,
) -> None:
    repo = make_repo()
    path, base = leftovers(repo)
    admin = Path(git(path, "rev-parse", "--path-format=absolute", "--git-dir"))
    state = repo / ".git" / "orchestrator"
    lock = repo / ".git" / "refs" / "heads" / f"{BRANCH}.lock"
    done = clear(repo, {"task": TASK, "base_commit": base})
    assert done == [
        f"removed worktree {path}",
        f"removed worktree entry {admin}",
        f"removed stale lock {lock}",
        f"deleted branch {BRANCH} (no work on it)",
        f"removed venv {state / 'venvs' / RUN / NAME}",
    ]
    assert not path.exists() and not admin.exists() and not lock.exists()
    assert not (state / "venvs" / RUN / NAME).exists()
    assert refs(repo) == [f"refs/heads/main {base}"]
    assert git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1
    assert clear(repo, {"task": TASK, "base_commit": base}) == []  # nothing left to do


def test_a_worktree_whose_directory_is_gone_still_loses_its_entry(make_repo: MakeRepo) -> None:
    """The crash came after the directory went but before git's admin entry did: the entry
    is found by what it points at."""
    repo = make_repo()
    path, base = leftovers(repo)
    admin = Path(git(path, "rev-parse", "--path-format=absolute", "--git-dir"))
    git(repo, "worktree", "add", "--quiet", "--detach", str(repo.parent / "bystander"), base)
    shutil.rmtree(path)
    done = clear(repo, {"task": TASK, "base_commit": base})
    assert done[0] == f"removed worktree entry {admin}"
    assert not admin.exists()
    assert str(repo.parent / "bystander") in git(repo, "worktree", "list")


def test_a_branch_holding_commits_is_moved_aside_each_time_under_a_new_number(
    make_repo: MakeRepo,
) -> None:
    repo = make_repo()
    kept = f"refs/orchestrator/interrupted/{RUN}/{NAME}"
    tips = []
    for attempt in (1, 2):
        path, base = leftovers(repo, commits=attempt)
        tips.append(git(path, "rev-parse", "HEAD"))
        done = clear(repo, {"task": TASK, "base_commit": base})
        assert f"moved branch {BRANCH} (it holds commits) to {kept}/{attempt}" in done
        assert not path.exists()
    assert refs(repo) == [
        f"refs/heads/main {base}",
        f"{kept}/1 {tips[0]}",
        f"{kept}/2 {tips[1]}",
    ]


def test_a_branch_that_cannot_be_moved_aside_is_left_where_it_is(make_repo: MakeRepo) -> None:
    repo = make_repo()
    path, base = leftovers(repo, commits=1)
    tip = git(path, "rev-parse", "HEAD")
    kept = f"refs/orchestrator/interrupted/{RUN}/{NAME}"
    git(repo, "update-ref", f"{kept}/2", base)  # the number the next one would take
    with pytest.raises(OrchestratorError, match=f"^cannot move the interrupted branch {BRANCH} "):
        clear(repo, {"task": TASK, "base_commit": base})
    assert f"refs/heads/{BRANCH} {tip}" in refs(repo)
    assert f"{kept}/2 {base}" in refs(repo)


def test_a_task_with_no_worktree_recorded_loses_its_branch(make_repo: MakeRepo) -> None:
    """The crash came before the agent could run: whatever the branch holds is not its work."""
    repo = make_repo()
    _, base = leftovers(repo, commits=1)
    done = clear(repo, None)
    assert f"deleted branch {BRANCH} (no work on it)" in done
    assert refs(repo) == [f"refs/heads/main {base}"]


def test_a_finished_tasks_leftovers_go_but_its_branch_stays(make_repo: MakeRepo) -> None:
    repo = make_repo()
    path, base = leftovers(repo, commits=1)
    tip = git(path, "rev-parse", "HEAD")
    done = clear(repo, {"task": TASK, "base_commit": base}, keep_branch=True)
    assert not any("branch" in line for line in done), done
    assert not path.exists()
    assert refs(repo) == [f"refs/heads/main {base}", f"refs/heads/{BRANCH} {tip}"]


def test_a_stale_lock_that_goes_while_it_is_looked_at_is_no_error(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A git of the user's ends and removes its lock of the branch just after recovery saw it:
    recovery goes on as if it had removed it itself."""
    repo = make_repo()
    _, base = leftovers(repo)
    lock = repo / ".git" / "refs" / "heads" / f"{BRANCH}.lock"
    real_exists = Path.exists

    def exists(self: Path, **kwargs: bool) -> bool:
        seen = real_exists(self, **kwargs)
        if self == lock:
            lock.unlink()  # the other git's, in the instant after the look
        return seen

    monkeypatch.setattr(Path, "exists", exists)
    done = clear(repo, {"task": TASK, "base_commit": base})
    assert f"deleted branch {BRANCH} (no work on it)" in done
    assert refs(repo) == [f"refs/heads/main {base}"]


def move_branch_after_its_read(repo: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Have another git commit on BRANCH just after recovery read its tip: the new tip."""
    tree = git(repo, "rev-parse", "HEAD^{tree}")
    newer = git(repo, "commit-tree", "-p", "HEAD", "-m", "the user's, meanwhile", tree)
    real_run = Git.run

    async def run(self: Git, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        result = await real_run(self, *args, **kwargs)
        if args[0] == "rev-parse" and f"refs/heads/{BRANCH}" in args:
            git(repo, "update-ref", f"refs/heads/{BRANCH}", newer)
        return result

    monkeypatch.setattr(Git, "run", run)
    return newer


@pytest.mark.parametrize("commits", [0, 1], ids=["no-work", "holding-commits"])
def test_a_branch_that_moves_while_it_is_cleared_is_not_deleted(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch, commits: int
) -> None:
    """Recovery deletes the tip it read, never one another git put there since: the newer
    commit stays on the branch (and recovery says it could not clear it)."""
    repo = make_repo()
    _, base = leftovers(repo, commits=commits)
    newer = move_branch_after_its_read(repo, monkeypatch)
    with pytest.raises(OrchestratorError):
        clear(repo, {"task": TASK, "base_commit": base})
    assert f"refs/heads/{BRANCH} {newer}" in refs(repo)


@contextlib.contextmanager
def unremovable(*files: Path) -> Iterator[None]:
    """*files* cannot be deleted while the block runs: immutable (``chattr +i``) for root,
    in a directory without write permission otherwise; skips the test where neither works."""
    if os.geteuid() == 0:
        made = subprocess.run(["chattr", "+i", *map(str, files)], capture_output=True)
        if made.returncode != 0:
            pytest.skip(f"cannot make a file immutable here: {made.stderr.decode().strip()}")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", *map(str, files)], check=True)
        return
    for file in files:
        file.parent.chmod(0o500)
    try:
        yield
    finally:
        for file in files:
            file.parent.chmod(0o700)


def test_a_leftover_that_cannot_be_removed_does_not_stop_the_rest(make_repo: MakeRepo) -> None:
    """What stays (a file nobody may delete) is left where it is; the branch, the worktree
    entry and the lock are still cleared."""
    repo = make_repo()
    path, base = leftovers(repo)
    stuck = [path / "src" / "stuck.txt", repo / ".git/orchestrator/venvs" / RUN / NAME / "bin/x"]
    for file in stuck:
        file.write_text("stuck\n")
    with unremovable(*stuck):
        done = clear(repo, {"task": TASK, "base_commit": base})
        assert all(file.exists() for file in stuck)
    assert f"deleted branch {BRANCH} (no work on it)" in done
    assert refs(repo) == [f"refs/heads/main {base}"]
    assert git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1
