"""Findings of the review of d46dce0..ff557c8 (overlap's one log; the kept update-ref)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from orchestrator._git import Git
from orchestrator.overlap import touched, touched_together

from .conftest import MakeRepo, git
from .test_overlap import change
from .test_overlap import repo as repo


def test_one_log_of_all_says_what_each_says_of_an_annotated_tag(repo: Path) -> None:
    """A result named by an annotated tag's id (an object id, so check_ids lets it by, and
    git log peels it): its own log reads its commits; the one log lists the commit, not
    the tag, so the walk finds no such commit and says None (unknown)."""
    base = git(repo, "rev-parse", "base")
    first = change(repo, base, {"a.txt": "a\n"})
    git(repo, "tag", "-a", "-m", "t", "result-tag", first)
    tag = git(repo, "rev-parse", "result-tag")
    assert tag != first and git(repo, "cat-file", "-t", tag) == "tag"
    each = [anyio.run(touched, Git(repo), base, c) for c in (first, tag)]
    together = anyio.run(touched_together, Git(repo), base, [first, tag])
    assert each[1] is not None and each[1].paths == {"a.txt"}
    assert together == each


def kept_update_ref() -> int:
    """The pid of this process's kept ``git update-ref --stdin`` (a child of this process:
    other sessions on the machine run tests of their own)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == os.getpid() and stat[0] != b"Z" and b"update-ref\0--stdin" in cmdline:
            found.append(int(entry))
    (pid,) = found
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
        async with runner.ref_updates():
            await runner.update_ref("refs/heads/a", head, "")
            pid = kept_update_ref()
            assert os.getpgid(pid) != os.getpgrp(), "in our process group: Ctrl-C kills it"

    anyio.run(main)


def test_a_kept_update_ref_killed_by_a_signal_does_not_fail_the_next_update(
    make_repo: MakeRepo,
) -> None:
    """git said nothing of the transaction (not even 'start: ok'): nothing of it was applied,
    so it is safe to give it to a new process rather than fail an update the CLI would do."""
    repo = make_repo()
    head = git(repo, "rev-parse", "HEAD")

    async def main() -> None:
        runner = Git(repo)
        async with runner.ref_updates():
            await runner.update_ref("refs/heads/a", head, "")
            os.kill(kept_update_ref(), signal.SIGINT)
            await anyio.sleep(0.2)
            await runner.update_ref("refs/heads/b", head, "")

    anyio.run(main)
    assert git(repo, "rev-parse", "refs/heads/b") == head


CTRL_C_AGENT = """
import os, pathlib, sys, time
task = os.environ["ORCHESTRATOR_TASK_ID"]
pathlib.Path(task + ".txt").write_text(task + "\\n")
pathlib.Path(sys.argv[1]).touch()
time.sleep(60)
"""


@pytest.mark.slow  # about 3 s: a real run, interrupted
def test_ctrl_c_keeps_a_cancelled_tasks_work_on_its_branch(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """A run interrupted as a terminal's Ctrl-C does it (SIGINT to the whole process group):
    the running task's work is committed to its branch, as before the kept update-ref
    (at f9f820c the branch holds slow.txt; at ff557c8 the commit's branch move fails and
    the work is gone)."""
    import json

    repo = make_repo()
    agent, running = tmp_path / "agent.py", tmp_path / "running"
    agent.write_text(CTRL_C_AGENT)
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"repo: {json.dumps(str(repo))}\nconcurrency: 1\ndefaults: {{venv: false}}\n"
        f"agents: {{w: {{command: [{json.dumps(sys.executable)}, {json.dumps(str(agent))}, "
        f"{json.dumps(str(running))}]}}}}\n"
        "tasks:\n  - {id: slow, agent: w, task: t}\n"
    )
    run = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", str(plan)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a terminal of its own: its process group is its own
    )
    try:
        for _ in range(600):
            if running.exists():
                break
            assert run.poll() is None
            anyio.run(anyio.sleep, 0.05)
        anyio.run(anyio.sleep, 0.5)
        os.killpg(run.pid, signal.SIGINT)
        assert run.wait(timeout=60) == 130
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    branches = git(repo, "for-each-ref", "--format=%(refname)", "refs/heads/orchestrator/")
    assert branches, "the cancelled task's branch is gone"
    assert git(repo, "show", f"{branches.splitlines()[0]}:slow.txt") == "slow"


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


def test_one_log_of_tens_of_thousands_of_results_is_no_oserror(repo: Path) -> None:
    """Every result an argument of one git: 60,000 ids (41 bytes each) pass Linux's 2 MiB
    bound on a command's arguments, and open_process raised OSError (E2BIG), which
    _touched_all does not catch: the merge failed where a log each had worked."""
    import secrets

    base = git(repo, "rev-parse", "base")
    ids = [secrets.token_hex(20) for _ in range(60_000)]  # none in the repository: git says so
    assert anyio.run(touched_together, Git(repo), base, ids) is None
