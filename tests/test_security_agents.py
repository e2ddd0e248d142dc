"""An agent is hostile: it cannot hang the run, plant what git runs, or pass off a sibling's work
(issue 10, findings 4-6), without a sandbox.

Each agent below is a real command doing what the adversarial review's agents did; each test
asserts the safe outcome: the run ends, the attacking task fails with a clear kind, what it
planted never ran and is put back, and the victim's result is not silently trusted.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import Plan, Report, TaskResult
from orchestrator import orchestrate_parallel, verify_report

from .conftest import MakeRepo, git


def run_plan(
    repo: Path, agents: dict[str, str], tasks: list[dict[str, Any]], **options: Any
) -> Report:
    scripts = repo.parent / "agents"
    scripts.mkdir(exist_ok=True)
    specs = {}
    for name, source in agents.items():
        path = scripts / f"{name}.py"
        path.write_text(source)
        specs[name] = {"command": [sys.executable, str(path)]}
    plan = Plan.model_validate(
        {
            "agents": specs,
            "defaults": {"venv": False, "timeout": 60, **options.pop("defaults", {})},
            "tasks": tasks,
        }
    )
    report: Report = anyio.run(lambda: orchestrate_parallel(plan, repo=repo, **options))
    return report


def one_result(repo: Path, source: str, **defaults: Any) -> TaskResult:
    """The result of one task whose agent runs *source*."""
    report = run_plan(
        repo, {"a": source}, [{"id": "t", "agent": "a", "task": "t"}], defaults=defaults
    )
    return report.result("t")


FIFO_OUTPUT = """
import os
os.mkfifo(os.environ["ORCHESTRATOR_OUTPUT"])
"""

LINKED_OUTPUT = """
import os
os.symlink("/dev/zero", os.environ["ORCHESTRATOR_OUTPUT"])
"""

LINKED_STDOUT = """
import os
log = os.readlink("/proc/self/fd/1")
os.unlink(log)
os.symlink("/dev/zero", log)
"""

DEEP_OUTPUT = """
import os
with open(os.environ["ORCHESTRATOR_OUTPUT"], "w") as f:
    f.write('{"a": ' + "[" * 100000 + "]" * 100000 + "}")
"""

HUGE_NUMBER = """
import os
with open(os.environ["ORCHESTRATOR_OUTPUT"], "w") as f:
    f.write('{"a": ' + "9" * 5000 + "}")
"""


@pytest.mark.parametrize(
    ("source", "kind", "says"),
    [
        (FIFO_OUTPUT, "invalid_output", "not a regular file"),
        (LINKED_OUTPUT, "invalid_output", "symbolic link"),
        (LINKED_STDOUT, "tamper", "symbolic link"),
        (DEEP_OUTPUT, "invalid_output", "nested more than"),
        (HUGE_NUMBER, "invalid_output", "a number of 5000 characters"),
    ],
    ids=["fifo-output", "linked-output", "linked-stdout", "deep-output", "huge-number"],
)
def test_what_an_agent_leaves_cannot_hang_or_exhaust_the_run(
    source: str, kind: str, says: str, make_repo: MakeRepo
) -> None:
    """Finding 4: a FIFO or /dev/zero where the orchestrator reads hung the run forever."""
    repo = make_repo()
    report = run_plan(
        repo,
        {"evil": source, "good": "open('good.txt', 'w').write('ok')\n"},
        [
            {"id": "evil", "agent": "evil", "task": "t"},
            {"id": "good", "agent": "good", "task": "t"},
        ],
    )
    evil, good = report.result("evil"), report.result("good")
    assert evil.status == "failed"
    assert evil.error is not None
    assert (evil.error.kind, evil.attempts) == (kind, 1)
    assert says in evil.error.message
    assert good.status == "succeeded"
    assert anyio.run(lambda: verify_report(Path(report.run_dir) / "report.json")).ok


PLANT = """
import os, pathlib, subprocess
common = pathlib.Path(subprocess.run(
    ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
    capture_output=True, text=True, check=True).stdout.strip())
marks = pathlib.Path(os.environ["MARKS"])
with open(common / "config", "a") as f:
    f.write(f"[core]\\n\\tfsmonitor = touch {marks}/fsmonitor-ran; echo\\n")
    f.write(f"[filter \\"evil\\"]\\n\\tclean = sh -c 'touch {marks}/filter-ran; cat'\\n")
(common / "info").mkdir(exist_ok=True)
(common / "info" / "attributes").write_text("* filter=evil\\n")
for hook in ("reference-transaction", "post-index-change", "post-checkout"):
    path = common / "hooks" / hook
    path.write_text(f"#!/bin/sh\\ntouch {marks}/{hook}-ran\\n")
    path.chmod(0o755)
pathlib.Path("planted.txt").write_text("x")
"""


def test_a_planted_config_filter_or_hook_never_runs_and_is_put_back(
    make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 5: an agent's fsmonitor, clean filter and hooks ran in the orchestrator's git."""
    repo = make_repo()
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("MARKS", str(marks))
    config = (repo / ".git" / "config").read_bytes()
    slow = "import time, pathlib\ntime.sleep(1.5)\npathlib.Path('slow.txt').write_text('s')\n"
    report = run_plan(
        repo,
        {"evil": PLANT, "slow": slow},
        [
            {"id": "evil", "agent": "evil", "task": "t"},
            *({"id": f"s{i}", "agent": "slow", "task": "t"} for i in range(3)),
        ],
        concurrency=4,
    )
    evil = report.result("evil")
    assert evil.status == "failed"
    assert evil.error is not None and evil.error.kind == "tamper"
    assert str(repo / ".git" / "config") in evil.error.paths
    assert sorted(p.name for p in marks.iterdir()) == []  # nothing planted ever ran
    assert (repo / ".git" / "config").read_bytes() == config
    assert not (repo / ".git" / "info" / "attributes").exists()
    assert not (repo / ".git" / "hooks" / "reference-transaction").exists()
    # git run by the user afterwards runs nothing planted either.
    git(repo, "status")
    assert sorted(p.name for p in marks.iterdir()) == []


SIBLING = """
import os, pathlib, subprocess, time
run = os.environ["ORCHESTRATOR_RUN_ID"]
victim = f"refs/heads/orchestrator/{run}/victim"
def git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
# Wait for the victim's worktree (up to 30 s: a loaded machine makes it late), then write
# into it and move its branch and main.
for _ in range(1500):
    blocks = git("worktree", "list", "--porcelain").split(chr(10) * 2)
    found = [b.splitlines()[0][9:] for b in blocks if f"branch {victim}" in b]
    if found:
        break
    time.sleep(0.02)
pathlib.Path(found[0], "backdoor.py").write_text("evil()\\n")
tree = git("mktree", "--missing")  # an empty tree
base = git("rev-parse", victim)
evil = git("-c", "user.name=e", "-c", "user.email=e@e", "commit-tree", tree, "-p", base, "-m", "evil")
git("update-ref", victim, evil)
git("update-ref", "refs/heads/main", evil)
"""

VICTIM = """
import pathlib, time
time.sleep(1.5)
pathlib.Path("honest.txt").write_text("honest work\\n")
"""


def test_a_sibling_that_moves_the_victims_branch_is_caught(make_repo: MakeRepo) -> None:
    """Finding 6: an agent rewrote a sibling's result; the CAS compared against HEAD."""
    repo = make_repo()
    report = run_plan(
        repo,
        {"attacker": SIBLING, "honest": VICTIM},
        [
            {"id": "attacker", "agent": "attacker", "task": "t"},
            {"id": "victim", "agent": "honest", "task": "t"},
        ],
        concurrency=2,
    )
    victim = report.result("victim")
    assert victim.status == "failed"
    assert victim.error is not None and victim.error.kind == "tamper"
    assert "moved to" in victim.error.message and "by another process" in victim.error.message
    # The attacker's commit is not under the victim's provenance: the victim's branch holds
    # the victim's worktree committed on its base.
    commit = victim.provenance.result_commit
    assert commit is not None
    assert git(repo, "rev-parse", f"{commit}^") == victim.provenance.base_commit
    assert "honest.txt" in git(repo, "ls-tree", "--name-only", commit)
    outcome = anyio.run(lambda: verify_report(Path(report.run_dir) / "report.json"))
    assert outcome.ok, outcome.findings
    assert json.loads((Path(report.run_dir) / "report.json").read_text())["errors"]
    # main, moved by the attacker, is reported; the victim's branch holds its own result.
    assert [w for w in report.warnings if w.startswith("refs/heads/main moved during the run")]
    assert not [w for w in report.warnings if "victim" in w]


def test_an_agents_own_commits_are_kept(make_repo: MakeRepo) -> None:
    """The check above does not mistake an agent that commits in its own worktree."""
    repo = make_repo()
    own = (
        "import pathlib, subprocess\n"
        "pathlib.Path('a.txt').write_text('a')\n"
        "subprocess.run(['git', 'add', 'a.txt'], check=True)\n"
        "subprocess.run(['git', '-c', 'user.name=a', '-c', 'user.email=a@a', 'commit',"
        " '-q', '-m', 'mine'], check=True)\n"
        "pathlib.Path('b.txt').write_text('b')\n"
    )
    result = one_result(repo, own)
    assert result.status == "succeeded", result.error
    commit = result.provenance.result_commit
    assert git(
        repo, "log", "--format=%s", f"{result.provenance.base_commit}..{commit}"
    ).splitlines() == [
        "a: t [task t]",
        "mine",
    ]


COMMONDIR = """
import os, pathlib, subprocess
admin = pathlib.Path(subprocess.run(
    ["git", "rev-parse", "--path-format=absolute", "--git-dir"],
    capture_output=True, text=True, check=True).stdout.strip())
(admin / "commondir").write_text(os.environ["OTHER_GIT_DIR"] + "\\n")
pathlib.Path("work.txt").write_text("work\\n")
"""


def test_a_rewritten_commondir_cannot_send_the_commit_elsewhere(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 5: rewriting the admin dir's commondir made the orchestrator write objects
    into another repository."""
    repo, other = make_repo(name="repo"), make_repo(name="other")
    monkeypatch.setenv("OTHER_GIT_DIR", str(other / ".git"))
    refs_before = git(other, "for-each-ref")
    objects_before = git(other, "count-objects", "-v")
    result = one_result(repo, COMMONDIR)
    assert result.status == "failed"
    assert result.error is not None and result.error.kind == "tamper"
    assert result.error.paths[0].endswith("/commondir")
    # Put back: the work is committed in this repository, for the record.
    assert git(repo, "show", f"{result.provenance.result_commit}:work.txt") == "work"
    assert git(other, "for-each-ref") == refs_before
    assert git(other, "count-objects", "-v") == objects_before


def test_an_agent_that_removes_and_moves_files_with_git_still_commits(make_repo: MakeRepo) -> None:
    """`git rm` and `git mv` leave staged deletions that are in neither index nor worktree."""
    repo = make_repo()
    source = (
        "import subprocess\n"
        "subprocess.run(['git', 'rm', '-q', 'src/file0000.txt'], check=True)\n"
        "subprocess.run(['git', 'mv', 'src/file0001.txt', 'moved.txt'], check=True)\n"
    )
    result = one_result(repo, source)
    assert result.status == "succeeded", result.error
    files = git(repo, "ls-tree", "-r", "--name-only", str(result.provenance.result_commit)).split()
    assert "src/file0000.txt" not in files and "src/file0001.txt" not in files
    assert "moved.txt" in files


@pytest.mark.parametrize("where", [".gitignore", "sub/data"])
def test_a_fifo_left_in_the_worktree_does_not_hang_the_commit(
    where: str, make_repo: MakeRepo
) -> None:
    """git reads .gitignore (and, to hash it, any new file): a FIFO there blocks git forever.
    The commit step's git is bounded by the task's timeout."""
    repo = make_repo()
    source = (
        "import os, pathlib\n"
        f"pathlib.Path({where!r}).parent.mkdir(parents=True, exist_ok=True)\n"
        f"os.mkfifo({where!r})\n"
    )
    report = run_plan(
        repo,
        {"f": source, "good": "open('good.txt', 'w').write('ok')\n"},
        [{"id": "f", "agent": "f", "task": "t"}, {"id": "good", "agent": "good", "task": "t"}],
        defaults={"timeout": 3},
    )
    result = report.result("f")
    if where == ".gitignore":
        assert result.status == "failed"
        assert result.error is not None and "did not finish within 3 s" in result.error.message
    else:  # git skips a FIFO it finds as an untracked file
        assert result.status == "succeeded", result.error
    assert report.result("good").status == "succeeded"


def test_an_index_replaced_by_a_fifo_is_put_right(make_repo: MakeRepo) -> None:
    repo = make_repo()
    source = (
        "import os, pathlib, subprocess\n"
        "admin = subprocess.run(['git', 'rev-parse', '--path-format=absolute', '--git-dir'],"
        " capture_output=True, text=True, check=True).stdout.strip()\n"
        "os.unlink(os.path.join(admin, 'index'))\n"
        "os.mkfifo(os.path.join(admin, 'index'))\n"
        "pathlib.Path('work.txt').write_text('work')\n"
    )
    result = one_result(repo, source, timeout=5)
    assert result.status == "failed"
    assert result.error is not None and result.error.kind == "tamper"
    assert git(repo, "show", f"{result.provenance.result_commit}:work.txt") == "work"


FIFO_REFS = """
import os, subprocess, time
common = subprocess.run(
    ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
    capture_output=True, text=True, check=True,
).stdout.strip()
heads = os.path.join(common, "refs", "heads")
os.mkfifo(os.path.join(heads, "planted"))
# Where the next task's branch is about to be made.
run = os.path.join(heads, "orchestrator", os.environ["ORCHESTRATOR_RUN_ID"])
os.makedirs(run, exist_ok=True)
os.mkfifo(os.path.join(run, "victim"))
time.sleep(1.5)  # the next task starts more than the guard's 1 s of slack later
"""


def test_fifos_an_agent_puts_among_the_refs_are_removed_and_it_is_blamed(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """git opens a loose ref to read it: a FIFO in its place blocks git for ever. The
    guard's sweep after the attempt finds them, removes them and fails the agent's task;
    the task whose branch was to be made there runs as if nothing had happened. (Without
    the sweep: tests/test_git.py and tests/test_guard.py, a ref's files checked before git
    is asked, and every listing of refs bounded.)"""
    from orchestrator import _git

    monkeypatch.setattr(_git, "REF_TIMEOUT_S", 1.0)
    monkeypatch.setattr(_git, "LIST_REFS_TIMEOUT_S", 1.0)
    repo = make_repo()

    report = run_plan(
        repo,
        {"planter": FIFO_REFS, "honest": VICTIM},
        [
            {"id": "planter", "agent": "planter", "task": "t", "priority": 1},
            {"id": "victim", "agent": "honest", "task": "t"},
        ],
        concurrency=1,
    )
    planter = report.result("planter")
    heads = repo / ".git" / "refs" / "heads"
    planted = [heads / "orchestrator" / Path(report.run_dir).name / "victim", heads / "planted"]
    assert planter.status == "failed" and planter.error is not None
    assert planter.error.kind == "tamper"
    assert planter.error.paths == sorted(str(p) for p in planted)
    assert report.result("victim").status == "succeeded"
    # The FIFOs went: the victim's branch was made where one of them was.
    assert not os.path.lexists(planted[1]) and planted[0].is_file()
    assert report.warnings == []
    assert (Path(report.run_dir) / "report.json").is_file()


FIFO_PACKED_REFS = """
import os, subprocess, time
common = subprocess.run(
    ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
    capture_output=True, text=True, check=True,
).stdout.strip()
path = os.path.join(common, "packed-refs")
if os.path.exists(path):
    os.unlink(path)
os.mkfifo(path)
open("work.txt", "w").write("done")
time.sleep(1.5)  # the next task starts more than the guard's 1 s of slack later
"""


def test_packed_refs_made_a_fifo_is_put_back_and_the_agent_blamed(make_repo: MakeRepo) -> None:
    """Every git command reads packed-refs: a FIFO there would block them all for ever."""
    repo = make_repo()
    git(repo, "branch", "packed-before")
    git(repo, "pack-refs", "--all")
    report = run_plan(
        repo,
        {"fifo": FIFO_PACKED_REFS, "honest": "open('honest.txt', 'w').write('ok')\n"},
        [
            {"id": "fifo", "agent": "fifo", "task": "t", "priority": 1},
            {"id": "honest", "agent": "honest", "task": "t"},
        ],
        concurrency=1,
    )
    result = report.result("fifo")
    assert result.status == "failed"
    assert result.error is not None and result.error.kind == "tamper"
    assert "packed-refs made something other than a regular file" in result.error.message
    assert report.result("honest").status == "succeeded"
    packed = repo / ".git" / "packed-refs"
    assert packed.is_file() and b"refs/heads/packed-before" in packed.read_bytes()
    assert git(repo, "rev-parse", "packed-before") == git(repo, "rev-parse", "main")
