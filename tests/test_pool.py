"""The worktree pool and the venv pool (orchestrator/pool.py), end to end.

Real repositories, real uv venvs, real agent processes. What the pool does is observed from
outside: the files and admin directories agents see, git's worktree list, the reports, the
installer's counters and the repository's count of git subprocesses.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import Plan, Report, TaskResult
from orchestrator import Repository, orchestrate_parallel
from orchestrator.errors import OrchestratorError
from orchestrator.pool import Slots
from orchestrator.venv import UvBackend, Venv, describe_environment
from orchestrator.worktree import Worktree

from .conftest import MakeRepo, cli, git, task_worktrees
from .test_venv import PROJECT_AGENT, project_files

WriteAgent = Callable[[str, str], Path]

#: What a fresh ``git worktree add`` leaves in a worktree's admin directory.
FRESH_ADMIN = {"HEAD", "commondir", "gitdir", "index", "logs", "ORIG_HEAD"}

# Records what the task found in its worktree (every file and directory, a digest of the
# files, git's status, its admin directory), then leaves every kind of mess behind: a changed,
# a deleted and a re-moded tracked file, untracked and ignored files, an empty directory, a
# nested repository, and a merge, a rebase, sparse-checkout settings and config.worktree in
# its admin directory.
SNOOP_AND_MESS = """
import hashlib, json, os, pathlib, subprocess

root = pathlib.Path.cwd()
task = os.environ["ORCHESTRATOR_TASK_ID"]
admin = pathlib.Path((root / ".git").read_text().strip().removeprefix("gitdir: "))
files, dirs = [], []
for dirpath, dirnames, filenames in os.walk(root):
    rel = pathlib.Path(dirpath).relative_to(root)
    dirs += [(rel / d).as_posix() for d in dirnames]
    dirnames[:] = [d for d in dirnames if d != ".git"]
    files += [(rel / f).as_posix() for f in filenames if (rel / f).as_posix() != ".git"]
files.sort()
dirs.sort()
h = hashlib.sha256()
for name in files:
    path = root / name
    h.update(name.encode() + b"\\0" + oct(path.stat().st_mode & 0o111).encode() + b"\\0")
    h.update(path.read_bytes() + b"\\0")
status = subprocess.run(
    ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
    capture_output=True, text=True, check=True,
).stdout
head = subprocess.run(
    ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
).stdout.strip()
seen = {
    "cwd": str(root),
    "files": files,
    "dirs": dirs,
    "digest": h.hexdigest(),
    "status": status,
    "admin": sorted(os.listdir(admin)),
    "head_ref": (admin / "HEAD").read_text().strip(),
    "head": head,
}

pathlib.Path("src/file0000.txt").write_text("changed by " + task + "\\n")
pathlib.Path("src/file0001.txt").chmod(0o755)
pathlib.Path("src/file0002.txt").unlink()
pathlib.Path("untracked-" + task + ".txt").write_text(task + "\\n")
pathlib.Path("debug.log").write_text("ignored\\n")
pathlib.Path("build/deep").mkdir(parents=True, exist_ok=True)
pathlib.Path("build/deep/out.bin").write_bytes(b"ignored")
pathlib.Path("emptydir").mkdir(exist_ok=True)
subprocess.run(["git", "init", "--quiet", "build/nested"], check=True)
pathlib.Path("build/nested/inner.txt").write_text("inside a nested repository\\n")
(admin / "MERGE_HEAD").write_text(head + "\\n")
(admin / "MERGE_MSG").write_text("a merge in progress\\n")
(admin / "config.worktree").write_text("[core]\\n\\tsparseCheckout = true\\n")
(admin / "rebase-merge").mkdir(exist_ok=True)
(admin / "rebase-merge" / "head-name").write_text("refs/heads/elsewhere\\n")
(admin / "info").mkdir(exist_ok=True)
(admin / "info" / "sparse-checkout").write_text("/src/\\n")
pathlib.Path(os.environ["ORCHESTRATOR_OUTPUT"]).write_text(json.dumps(seen))
"""

# Writes out/<task>.txt and reports where it ran (and, with POOL_DIR, the pool's slots it
# saw). With LOG_DIR: waits (at most 10 s) until BARRIER tasks have started, then HOLD
# seconds, and records where it ran and when (wall clock, nanoseconds).
WRITER = """
import json, os, pathlib, time

task = os.environ["ORCHESTRATOR_TASK_ID"]
run = os.environ["ORCHESTRATOR_RUN_ID"]
start = time.time_ns()
log_dir = os.environ.get("LOG_DIR")
if log_dir:
    pathlib.Path(log_dir, run + "." + task + ".start").touch()
    count = int(os.environ.get("BARRIER", "0"))
    deadline = time.monotonic() + 10
    while (
        len(list(pathlib.Path(log_dir).glob("*.start"))) < count and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    time.sleep(float(os.environ.get("HOLD", "0")))
pool = os.environ.get("POOL_DIR")
slots = sorted(p.name for p in pathlib.Path(pool).iterdir() if p.is_dir()) if pool else []
pathlib.Path("out", task + ".txt").write_text(task + "\\n")
end = time.time_ns()
if log_dir:
    record = {"cwd": os.getcwd(), "start": start, "end": end, "run": run, "task": task}
    pathlib.Path(log_dir, run + "." + task + ".json").write_text(json.dumps(record))
output = {"cwd": os.getcwd(), "venv": os.environ.get("VIRTUAL_ENV"), "slots": slots}
pathlib.Path(os.environ["ORCHESTRATOR_OUTPUT"]).write_text(json.dumps(output))
"""


def run(fn: Callable[[], Any]) -> Any:
    return anyio.run(fn, backend="asyncio")


def make_plan(
    agent: Path, tasks: list[dict[str, Any]], *, python: str = sys.executable, **top: Any
) -> Plan:
    """Tasks of one agent ``w``; ``python="python"`` runs it with the task venv's interpreter."""
    spec = {"w": {"command": [python, str(agent)]}}
    return Plan.model_validate(
        {"agents": spec, "tasks": [{"agent": "w", "task": "t", **t} for t in tasks], **top}
    )


def orchestrate(plan: Plan, repo: Path | Repository, **options: Any) -> Report:
    report: Report = run(lambda: orchestrate_parallel(plan, repo=repo, **options))
    return report


def state(repo: Path) -> Path:
    return repo / ".git" / "orchestrator"


def pool_root(repo: Path) -> Path:
    return state(repo) / "pool" / "worktrees"


def dirs_in(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def venv_slots(repo: Path) -> list[Path]:
    return [slot for key in dirs_in(state(repo) / "pool" / "venvs") for slot in dirs_in(key)]


def worktree_entries(repo: Path) -> list[dict[str, str]]:
    """``git worktree list --porcelain`` as one dict per worktree (``detached`` as a key)."""
    entries = []
    for block in git(repo, "worktree", "list", "--porcelain").split("\n\n"):
        entry: dict[str, str] = {}
        for line in block.splitlines():
            key, _, value = line.partition(" ")
            entry[key] = value
        if entry:
            entries.append(entry)
    return entries


def digest_of_commit(repo: Path, commit: str) -> tuple[list[str], str]:
    """The files of *commit* and their digest, as SNOOP_AND_MESS computes them on disk."""
    h = hashlib.sha256()
    files = []
    for line in git(repo, "ls-tree", "-r", commit).splitlines():
        meta, name = line.split("\t", 1)
        mode = meta.split()[0]
        files.append(name)
        data = subprocess.run(
            ["git", "-C", str(repo), "cat-file", "blob", f"{commit}:{name}"],
            check=True,
            capture_output=True,
        ).stdout
        h.update(name.encode() + b"\0" + oct(0o111 if mode == "100755" else 0).encode() + b"\0")
        h.update(data + b"\0")
    return sorted(files), h.hexdigest()


def verified(capsys: pytest.CaptureFixture[str], report: Report) -> bool:
    outcome = cli(capsys, "verify", str(Path(report.run_dir) / "report.json"))
    assert outcome.code == 0, outcome
    return True


def test_a_recycled_worktree_is_exactly_a_fresh_one(
    make_repo: MakeRepo, write_agent: WriteAgent
) -> None:
    repo = make_repo(files=4, extra={".gitignore": "*.log\nbuild/\n"})
    base = git(repo, "rev-parse", "HEAD")
    base_files, base_digest = digest_of_commit(repo, base)
    agent = write_agent("snoop", SNOOP_AND_MESS)
    plan = make_plan(agent, [{"id": f"t{i}", "venv": False} for i in range(3)], concurrency=1)

    fresh = orchestrate(plan, repo, pool=0)
    pooled = [orchestrate(plan, repo, pool=1) for _ in range(2)]

    # The last task's mess is still in the slot: each borrower, not the one giving back,
    # made it pristine.
    [slot] = dirs_in(pool_root(repo))
    admin = Path((slot / ".git").read_text().strip().removeprefix("gitdir: "))
    assert (slot / "debug.log").is_file() and (slot / "build" / "nested" / ".git").is_dir()
    assert (admin / "MERGE_HEAD").is_file()
    # ...but for the per-worktree config, which the commit step removes before its git runs.
    assert not (admin / "config.worktree").exists()
    for report in (fresh, *pooled):
        assert report.summary.successful == 3, report.errors
        for result in report.results:
            seen = result.output
            assert seen is not None
            assert (seen["files"], seen["digest"]) == (base_files, base_digest), seen
            assert seen["dirs"] == ["src"], seen
            assert seen["status"] == "", seen
            assert set(seen["admin"]) <= FRESH_ADMIN, seen["admin"]
            assert seen["head"] == base
            assert seen["head_ref"] == f"ref: refs/heads/{result.branch}"
    # Every pooled task ran in the one slot, across tasks and across runs.
    assert {r.output["cwd"] for p in pooled for r in p.results if r.output} == {str(slot)}
    trees = {r.task_id: r.provenance.result_tree for r in fresh.results}
    for report in pooled:
        assert {r.task_id: r.provenance.result_tree for r in report.results} == trees
        for result in report.results:
            commit = result.provenance.result_commit
            assert commit is not None and commit != base
            assert git(repo, "rev-parse", f"{commit}^{{tree}}") == result.provenance.result_tree
            assert git(repo, "rev-parse", f"refs/heads/{result.branch}") == commit
            names = git(repo, "ls-tree", "-r", "--name-only", commit).splitlines()
            assert f"untracked-{result.task_id}.txt" in names
            assert "src/file0002.txt" not in names and "debug.log" not in names
    assert task_worktrees(repo) == []


def test_provenance_with_the_pool_equals_provenance_without(
    make_repo: MakeRepo, write_agent: WriteAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = make_repo(extra={"out/.keep": ""})
    agent = write_agent("writer", WRITER)
    plan = make_plan(agent, [{"id": f"t{i}", "venv": False} for i in range(4)], concurrency=2)

    fresh = orchestrate(plan, repo, pool=0)
    orchestrate(plan, repo, pool=2)  # fills the pool
    recycled = orchestrate(plan, repo, pool=2)

    slots = {str(p) for p in dirs_in(pool_root(repo))}
    assert len(slots) == 2
    assert {r.output["cwd"] for r in recycled.results if r.output} <= slots
    for before, after in zip(fresh.results, recycled.results, strict=True):
        assert before.task_id == after.task_id and after.status == "succeeded"
        assert after.provenance.base_commit == before.provenance.base_commit
        assert after.provenance.result_tree == before.provenance.result_tree
        assert after.provenance.result_commit != before.provenance.result_commit  # another run
    assert verified(capsys, fresh) and verified(capsys, recycled)
    assert task_worktrees(repo) == []


def test_the_pool_is_bounded(make_repo: MakeRepo, write_agent: WriteAgent, tmp_path: Path) -> None:
    repo = make_repo(extra={"out/.keep": ""})
    agent = write_agent("writer", WRITER)
    logs = tmp_path / "logs"
    logs.mkdir()
    # The first three tasks wait for each other, so three run at once with room for two.
    env = {"LOG_DIR": str(logs), "BARRIER": "3", "POOL_DIR": str(pool_root(repo))}
    plan = make_plan(
        agent, [{"id": f"t{i}", "venv": False, "env": env} for i in range(6)], concurrency=3
    )

    report = orchestrate(plan, repo, pool=2)

    assert report.summary.successful == 6, report.errors
    assert len(dirs_in(pool_root(repo))) == 2
    assert max(len(r.output["slots"]) for r in report.results if r.output) <= 2
    outside = state(repo) / "worktrees" / report.run_id
    cwds = [Path(r.output["cwd"]) for r in report.results if r.output]
    assert any(c.parent == outside for c in cwds), cwds  # one of three found the pool full
    assert all(c.parent in (outside, pool_root(repo)) for c in cwds), cwds
    assert not outside.exists() or list(outside.iterdir()) == []
    assert task_worktrees(repo) == []
    slots = [e for e in worktree_entries(repo) if e["worktree"].startswith(str(pool_root(repo)))]
    assert len(slots) == 2
    assert all("detached" in e and "branch" not in e for e in slots), slots


def test_a_kept_worktree_leaves_the_pool(make_repo: MakeRepo, write_agent: WriteAgent) -> None:
    repo = make_repo(extra={"out/.keep": ""})
    good = write_agent("writer", WRITER)
    bad = write_agent(
        "bad", "import pathlib, sys\npathlib.Path('evidence.txt').write_text('x')\nsys.exit(1)\n"
    )
    plan = Plan.model_validate(
        {
            "agents": {
                "good": {"command": [sys.executable, str(good)]},
                "bad": {"command": [sys.executable, str(bad)]},
            },
            "tasks": [
                {"id": "ok", "agent": "good", "task": "t", "venv": False},
                {"id": "broken", "agent": "bad", "task": "t", "venv": False},
            ],
            "concurrency": 1,
        }
    )

    kept: list[Path] = []
    for _ in range(2):
        report = orchestrate(plan, repo, pool=1, keep_worktrees="failed")
        by_id = {r.task_id: r for r in report.results}
        assert by_id["ok"].status == "succeeded" and by_id["broken"].status == "failed"
        assert by_id["ok"].worktree is None
        where = by_id["broken"].worktree
        assert where is not None
        path = Path(where)
        assert path == state(repo) / "worktrees" / report.run_id / "broken"
        assert (path / "evidence.txt").read_text() == "x"
        assert (path / "src" / "file0000.txt").is_file()
        [entry] = [e for e in worktree_entries(repo) if e["worktree"] == str(path)]
        assert entry.get("branch") == f"refs/heads/{by_id['broken'].branch}"
        assert git(path, "status", "--porcelain") == ""  # its work is committed on its branch
        kept.append(path)
        # "ok" gave its slot back, "broken" took it and moved it out: the pool is empty.
        assert dirs_in(pool_root(repo)) == []
        assert list(pool_root(repo).glob("*.mutex")) == []
    assert all((p / "evidence.txt").is_file() for p in kept)
    assert sorted(str(p) for p in kept) == sorted(task_worktrees(repo))


def test_gc_removes_idle_slots_and_leaves_held_ones(
    make_repo: MakeRepo, write_agent: WriteAgent, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = make_repo(extra={"out/.keep": ""})
    agent = write_agent("writer", WRITER)
    backend = UvBackend()

    def plan(logs: Path) -> Plan:
        # The three tasks wait for each other: three worktree slots, and venv slots.
        logs.mkdir()
        env = {"LOG_DIR": str(logs), "BARRIER": "3"}
        return make_plan(agent, [{"id": f"t{i}", "env": env} for i in range(3)], concurrency=3)

    report = orchestrate(plan(tmp_path / "first"), repo, pool=3, venv_backend=backend)
    assert report.summary.successful == 3, report.errors
    slots, venvs = dirs_in(pool_root(repo)), venv_slots(repo)
    assert len(slots) == 3 and len(venvs) == 3
    assert len(worktree_entries(repo)) == 4
    outcome = cli(capsys, "gc", "--repo", str(repo), "--older-than", "0")
    assert outcome.code == 0, outcome
    lines = outcome.out.splitlines()
    assert sorted(x for x in lines if x.startswith("removed pool worktree ")) == [
        f"removed pool worktree {s}" for s in slots
    ]
    assert sorted(x for x in lines if x.startswith("removed pool venv ")) == [
        f"removed pool venv {v}" for v in venvs
    ]
    assert dirs_in(pool_root(repo)) == [] and list(pool_root(repo).glob("*.mutex")) == []
    assert venv_slots(repo) == []
    assert list((state(repo) / "pool" / "venvs").rglob("*.mutex")) == []
    assert [e["worktree"] for e in worktree_entries(repo)] == [str(repo)]
    assert dirs_in(repo / ".git" / "worktrees") == []

    # Again, with one worktree slot and one venv slot held by a live process (this one).
    report = orchestrate(plan(tmp_path / "second"), repo, pool=3, venv_backend=backend)
    assert report.summary.successful == 3, report.errors
    held, *idle = dirs_in(pool_root(repo))
    held_venv, *idle_venvs = venv_slots(repo)
    admin = Path((held / ".git").read_text().strip().removeprefix("gitdir: "))
    fds = [os.open(p.with_name(p.name + ".mutex"), os.O_RDWR) for p in (held, held_venv)]
    try:
        for fd in fds:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        outcome = cli(capsys, "gc", "--repo", str(repo), "--older-than", "0")
    finally:
        for fd in fds:
            os.close(fd)
    assert outcome.code == 0, outcome
    assert f"removed pool worktree {held}" not in outcome.out
    assert f"removed pool venv {held_venv}" not in outcome.out
    assert all(f"removed pool worktree {s}" in outcome.out for s in idle)
    assert all(f"removed pool venv {v}" in outcome.out for v in idle_venvs)
    assert dirs_in(pool_root(repo)) == [held] and venv_slots(repo) == [held_venv]
    assert held.with_name(held.name + ".mutex").exists()
    assert (held / "src" / "file0000.txt").is_file() and admin.is_dir()
    assert (held_venv / "pyvenv.cfg").is_file()
    assert [e["worktree"] for e in worktree_entries(repo)] == [str(repo), str(held)]


def test_two_runs_share_the_pool_without_sharing_a_slot(
    make_repo: MakeRepo, write_agent: WriteAgent, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = make_repo(extra={"out/.keep": ""})
    agent = write_agent("writer", WRITER)
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {"LOG_DIR": str(logs), "HOLD": "0.1"}
    plan = make_plan(
        agent, [{"id": f"t{i}", "venv": False, "env": env} for i in range(6)], concurrency=2
    )
    reports: list[Report] = []

    async def main() -> None:
        async def one(run_id: str) -> None:
            reports.append(await orchestrate_parallel(plan, repo=repo, pool=2, run_id=run_id))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "run-a")
            tg.start_soon(one, "run-b")

    run(main)

    assert sorted(r.run_id for r in reports) == ["run-a", "run-b"]
    assert all(r.summary.successful == 6 for r in reports), [r.errors for r in reports]
    records = [json.loads(p.read_text()) for p in logs.glob("*.json")]
    assert len(records) == 12
    by_path: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_path.setdefault(record["cwd"], []).append(record)
    for path, uses in by_path.items():
        uses.sort(key=lambda r: r["start"])
        for earlier, later in itertools.pairwise(uses):
            assert earlier["end"] <= later["start"], (path, earlier, later)
    pooled = [p for p in by_path if Path(p).parent == pool_root(repo)]
    assert pooled and {r["run"] for p in pooled for r in by_path[p]} == {"run-a", "run-b"}
    assert all(verified(capsys, r) for r in reports)
    assert task_worktrees(repo) == []


# Runs with its venv's interpreter: installs INSTALL into it if set, waits (at most 10 s) until
# WAIT_FOR has started if set, and reports whether idna can be imported.
VENV_AGENT = """
import json, os, pathlib, subprocess, sys, time

task = os.environ["ORCHESTRATOR_TASK_ID"]
log_dir = pathlib.Path(os.environ["LOG_DIR"])
if os.environ.get("INSTALL"):
    subprocess.run(
        [os.environ["UV"], "pip", "install", "--quiet", "--python", sys.executable,
         os.environ["INSTALL"]],
        check=True,
    )
wait_for = os.environ.get("WAIT_FOR")
deadline = time.monotonic() + 10
while wait_for and not (log_dir / wait_for).exists() and time.monotonic() < deadline:
    time.sleep(0.01)
try:
    import idna  # noqa: F401
    has_idna = True
except ImportError:
    has_idna = False
(log_dir / task).touch()
output = {"venv": os.environ["VIRTUAL_ENV"], "idna": has_idna}
pathlib.Path(os.environ["ORCHESTRATOR_OUTPUT"]).write_text(json.dumps(output))
"""


def packages(result: TaskResult) -> list[str]:
    """The distributions the task's venv held when it ended, as its report says."""
    environment = result.provenance.environment
    assert environment is not None, result.task_id
    return environment.packages


def test_venv_pool_installs_once_per_set_and_leaks_nothing(
    make_repo: MakeRepo, write_agent: WriteAgent, tmp_path: Path
) -> None:
    repo = make_repo()
    agent = write_agent("venv_agent", VENV_AGENT)
    uv = UvBackend().uv

    def venv_plan(name: str, tasks: list[dict[str, Any]]) -> Plan:
        logs = tmp_path / name
        logs.mkdir()
        for task in tasks:
            task["env"] = {"LOG_DIR": str(logs), "UV": uv, **task.get("env", {})}
        return make_plan(agent, tasks, python="python", concurrency=2)

    # t0 installs idna into its own venv. t1 runs until t2 has started, and t2 starts only
    # once t0 is done: so t2 borrows t0's venv (t1 holds the other slot).
    tasks: list[dict[str, Any]] = [{"id": f"t{i}", "requirements": ["six"]} for i in range(5)]
    tasks[0]["env"] = {"INSTALL": "idna"}
    tasks[1]["env"] = {"WAIT_FOR": "t2"}
    backend = UvBackend()
    report = orchestrate(venv_plan("first", tasks), repo, pool=2, venv_backend=backend)

    assert report.summary.successful == 5, report.errors
    assert backend.installs == 1
    by_id = {r.task_id: r for r in report.results}
    outputs = {r.task_id: r.output or {} for r in report.results}
    six = [p for p in packages(by_id["t1"]) if p.startswith("six==")]
    idna = [p for p in packages(by_id["t0"]) if p.startswith("idna==")]
    assert len(six) == len(idna) == 1
    assert packages(by_id["t0"]) == sorted([*idna, *six]) and outputs["t0"]["idna"] is True
    for task_id in ("t1", "t2", "t3", "t4"):
        assert packages(by_id[task_id]) == six, task_id
        assert outputs[task_id]["idna"] is False, task_id
    venvs = {Path(o["venv"]) for o in outputs.values()}
    assert len(venvs) == 2 and {v.parent.parent for v in venvs} == {state(repo) / "pool" / "venvs"}
    assert outputs["t2"]["venv"] == outputs["t0"]["venv"]
    # ... brought back from six and idna to six alone.
    assert any(c[1:3] == ["pip", "sync"] for c in by_id["t2"].provenance.commands)
    assert backend.syncs >= 1

    again = UvBackend()
    tasks = [{"id": f"t{i}", "requirements": ["six"]} for i in range(5)]
    report = orchestrate(venv_plan("second", tasks), repo, pool=2, venv_backend=again)
    assert report.summary.successful == 5, report.errors
    assert again.installs == 1
    assert all(packages(r) == six for r in report.results)

    two_sets = UvBackend()
    tasks = [{"id": f"t{i}", "requirements": ["six"]} for i in range(3)]
    tasks += [{"id": f"u{i}", "requirements": ["six", "idna"]} for i in range(3)]
    report = orchestrate(venv_plan("third", tasks), repo, pool=2, venv_backend=two_sets)
    assert report.summary.successful == 6, report.errors
    assert two_sets.installs == 2
    for result in report.results:
        wanted = six if result.task_id.startswith("t") else sorted([*idna, *six])
        assert packages(result) == wanted, result.task_id


class CountingUv(UvBackend):
    """uv, counting the venvs it makes, per path."""

    def __init__(self) -> None:
        super().__init__()
        self.created: Counter[Path] = Counter()

    async def create(self, path: Path, *, with_pip: bool) -> list[str]:
        self.created[path] += 1
        return await super().create(path, with_pip=with_pip)


def test_git_calls_and_venv_creations_per_task(
    make_repo: MakeRepo, write_agent: WriteAgent
) -> None:
    repo = make_repo(extra={"out/.keep": ""})
    agent = write_agent("writer", WRITER)
    n = 6
    plan = make_plan(
        agent, [{"id": f"t{i}", "requirements": ["six"]} for i in range(n)], concurrency=3
    )
    backend = CountingUv()

    async def measure() -> list[tuple[int, Report]]:
        repo_obj = await Repository.open(repo)
        runs = []
        try:
            for _ in range(2):
                before = repo_obj.git.calls
                report = await orchestrate_parallel(
                    plan, repo=repo_obj, pool=3, venv_backend=backend
                )
                assert report.summary.successful == n, report.errors
                runs.append((repo_obj.git.calls - before, report))
        finally:
            repo_obj.lock.close()
        return runs

    (first, _), (second, pooled) = run(measure)
    # The second run's tasks all ran in recycled worktrees, and in pooled venvs but for the
    # one task that installs the requirement set for this run.
    outputs = [r.output or {} for r in pooled.results]
    assert all(Path(o["cwd"]).parent == pool_root(repo) for o in outputs), outputs
    venv_pool = state(repo) / "pool" / "venvs"
    assert sum(venv_pool not in Path(o["venv"]).parents for o in outputs) <= 1, outputs
    # docs/architecture.md#git-calls-per-task: 5 per task with a new worktree, 5 with a
    # borrowed one whose previous task only added files (its catch-up: diff-files and
    # ls-files; nothing to check out again, the same start; the branch made by the kept
    # update-ref), and 8 per run on a Repository the caller opened (base and its tree, the
    # identity, every ref at the start and at the end, the two kept gits and git var twice).
    assert first <= 8 + 5 * n, f"{first} git calls on the first run (second: {second})"
    assert second <= 8 + 5 * n, f"{second} git calls on the pooled run (first: {first})"
    assert max(backend.created.values()) == 1, backend.created
    assert sum(backend.created.values()) <= n, backend.created
    assert backend.installs == 2  # one per run, for the one requirement set


def test_a_negative_pool_is_refused(
    make_repo: MakeRepo, write_agent: WriteAgent, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = make_repo(name="repo")
    agent = write_agent("writer", WRITER)
    plan = make_plan(agent, [{"id": "t0"}])
    with pytest.raises(OrchestratorError) as exc:
        orchestrate(plan, repo, pool=-1)
    assert str(exc.value) == "pool: must be >= 0, found -1"
    assert not (state(repo) / "runs").exists()

    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({**plan.model_dump(mode="json"), "repo": str(repo)}))
    outcome = cli(capsys, "run", str(plan_file), "--pool", "-1")
    assert (outcome.code, outcome.out) == (2, "")
    assert outcome.err.splitlines()[-1] == "orchestrator: --pool: must be >= 0, found -1"
    assert "Traceback" not in outcome.err
    assert not (state(repo) / "runs").exists()


# Replaces the worktree's .git file with a repository of its own: the commit fails, and the
# worktree is removed (keep_worktrees="never"), or with a pool, given back.
HIJACK = """
import os, subprocess
os.remove(".git")
subprocess.run(["git", "init", "--quiet", "."], check=True)
"""


def test_a_discarded_slot_leaves_no_worktree_entry(
    make_repo: MakeRepo, write_agent: WriteAgent
) -> None:
    repo = make_repo(extra={"out/.keep": ""})
    hijack = make_plan(write_agent("hijack", HIJACK), [{"id": "h", "venv": False}])
    good = make_plan(write_agent("writer", WRITER), [{"id": "g", "venv": False}])

    # Without a pool, the worktree goes with its entry.
    report = orchestrate(hijack, repo, pool=0, keep_worktrees="never")
    error = report.results[0].error
    assert error is not None and error.kind == "commit"
    assert [e["worktree"] for e in worktree_entries(repo)] == [str(repo)]

    # With a pool: the hijacked slot is given back, and the next run cannot reset it, so it
    # discards it and makes another.
    report = orchestrate(hijack, repo, pool=1, keep_worktrees="never")
    error = report.results[0].error
    assert error is not None and error.kind == "commit"
    [hijacked] = dirs_in(pool_root(repo))
    report = orchestrate(good, repo, pool=1)
    assert report.summary.successful == 1, report.errors
    [slot] = dirs_in(pool_root(repo))
    assert slot != hijacked and not hijacked.exists()
    assert not list(pool_root(repo).glob(hijacked.name + ".*"))  # its lock and private index
    entries = worktree_entries(repo)
    assert not [e for e in entries if "prunable" in e], entries
    assert [e["worktree"] for e in entries] == [str(repo), str(slot)]
    assert sorted(p.name for p in (repo / ".git" / "worktrees").iterdir()) == [slot.name]


class SlowToFillUv(UvBackend):
    """uv whose venv directory exists a while before it is a venv, as a slow installer's does.

    Every venv after the first is held, made directory but not yet venv, until a third one
    is asked for (at most 5 s): so two tasks ask for venvs at once, always.
    """

    def __init__(self) -> None:
        super().__init__()
        self.created: list[Path] = []
        self._third = anyio.Event()

    async def create(self, path: Path, *, with_pip: bool) -> list[str]:
        self.created.append(path)
        path.mkdir(parents=True, exist_ok=True)
        if len(self.created) >= 3:
            self._third.set()
        elif len(self.created) == 2:
            with anyio.move_on_after(5):
                await self._third.wait()
        return await super().create(path, with_pip=with_pip)


def test_a_slot_being_made_is_counted_once(
    make_repo: MakeRepo, write_agent: WriteAgent, tmp_path: Path
) -> None:
    repo = make_repo(extra={"out/.keep": ""})
    logs = tmp_path / "logs"
    logs.mkdir()
    # The three agents wait for each other: three venvs are held at once.
    env = {"LOG_DIR": str(logs), "BARRIER": "3"}
    tasks = [{"id": f"t{i}", "requirements": ["six"], "env": env} for i in range(3)]
    plan = make_plan(write_agent("writer", WRITER), tasks, concurrency=3)
    backend = SlowToFillUv()

    report = orchestrate(plan, repo, pool=3, venv_backend=backend)

    assert report.summary.successful == 3, report.errors
    assert len(backend.created) == 3
    pool = state(repo) / "pool" / "venvs"
    assert all(pool in p.parents for p in backend.created), backend.created
    assert len(venv_slots(repo)) == 3


FLAGGER = """
import os, subprocess
git = ["git", "-c", "user.name=a", "-c", "user.email=a@a"]
if os.environ["ORCHESTRATOR_TASK_ID"] == "first":
    # Hide a.txt from the index's view, and make edits of b.txt invisible to `git add`.
    subprocess.run(git + ["update-index", "--skip-worktree", "a.txt"], check=True)
    os.remove("a.txt")
    subprocess.run(git + ["update-index", "--assume-unchanged", "b.txt"], check=True)
else:
    assert os.path.exists("a.txt"), "a.txt is missing"
    with open("b.txt", "a") as f:
        f.write("edited by second\\n")
"""


def test_index_flags_a_task_set_do_not_reach_the_next(
    make_repo: MakeRepo, write_agent: WriteAgent
) -> None:
    repo = make_repo(extra={"a.txt": "a\n", "b.txt": "b\n"})
    plan = make_plan(
        write_agent("flagger", FLAGGER),
        [{"id": "first", "venv": False}, {"id": "second", "venv": False, "depends_on": []}],
        concurrency=1,
    )
    first = orchestrate(plan.model_copy(update={"tasks": plan.tasks[:1]}), repo, pool=1)
    assert first.summary.successful == 1, first.errors
    second = orchestrate(plan.model_copy(update={"tasks": plan.tasks[1:]}), repo, pool=1)
    assert second.summary.successful == 1, second.errors
    result = second.results[0]
    # The edit is in the result (an assume-unchanged bit would have hidden it from git add).
    assert git(repo, "show", f"{result.provenance.result_commit}:b.txt") == "b\nedited by second"
    assert git(repo, "show", f"{result.provenance.result_commit}:a.txt") == "a"


def test_a_slot_whose_holder_died_is_emptied_of_its_processes(tmp_path: Path) -> None:
    """A dead orchestrator's flock goes with it, its agents do not: the next borrower kills
    whatever still works in the slot before lending it."""

    holder = Slots(tmp_path / "slots", size=1)
    slot = holder.reserve()
    assert slot is not None
    slot.mkdir(parents=True)
    holder.made(slot)
    (slot / "deep" / "er").mkdir(parents=True)
    leftover = subprocess.Popen(["sleep", "60"], cwd=slot / ".")
    below = subprocess.Popen(["sleep", "60"], cwd=slot / "deep" / "er")
    elsewhere = subprocess.Popen(["sleep", "60"], cwd=tmp_path)
    try:
        os.close(holder._held.pop(slot))  # the holder dies: no give-back

        borrower = Slots(tmp_path / "slots", size=1)
        assert borrower.take_free() == slot
        assert leftover.wait(timeout=10) == -signal.SIGKILL
        assert below.wait(timeout=10) == -signal.SIGKILL
        assert elsewhere.poll() is None  # only what works in the slot
        borrower.release(slot)

        # Given back properly: the next borrower kills nothing.
        again = subprocess.Popen(["sleep", "60"], cwd=slot)
        try:
            assert Slots(tmp_path / "slots", size=1).take_free() == slot
            assert again.poll() is None
        finally:
            again.kill()
            again.wait()
    finally:
        for proc in (leftover, below, elsewhere):
            proc.kill()
            proc.wait()


def test_a_dead_runs_slot_naming_a_branch_does_not_block_a_new_worktree_on_it(
    make_repo: MakeRepo, write_agent: WriteAgent, tmp_path: Path
) -> None:
    """A crash leaves a slot's HEAD on its task's branch; resume deletes that branch and
    makes it again for the task's new attempt, whose new worktree git must not refuse."""
    from orchestrator.worktree import create_worktree, remove_worktree

    repo = make_repo(extra={"out/.keep": ""})
    plan = make_plan(write_agent("writer", WRITER), [{"id": "t", "venv": False}])
    assert orchestrate(plan, repo, pool=1).summary.successful == 1
    [slot] = dirs_in(pool_root(repo))
    admin = Path((slot / ".git").read_text().removeprefix("gitdir: ").strip())
    branch = "orchestrator/dead-run/t"
    (admin / "HEAD").write_text(f"ref: refs/heads/{branch}\n")  # as a crash leaves it

    async def fresh() -> None:
        repository = await Repository.open(repo)
        base = git(repo, "rev-parse", "HEAD")
        worktree = await create_worktree(repository, branch, tmp_path / "fresh", base)
        assert (worktree.path / "out" / ".keep").exists()
        await remove_worktree(repository, worktree, delete_branch=True)
        repository.lock.close()

    run(fresh)


def test_a_resume_detaches_the_slots_its_dead_run_left_on_its_branches(
    make_repo: MakeRepo, write_agent: WriteAgent
) -> None:
    """A crash can come after a slot was checked out on a task's branch and before the
    journal said where the task worked: the resume still finds the slot, by its HEAD."""
    from orchestrator.locks import try_lock
    from orchestrator.pool import detach_dead_slots, pool_dir

    repo = make_repo(extra={"out/.keep": ""})
    plan = make_plan(
        write_agent("writer", WRITER), [{"id": "a", "venv": False}, {"id": "b", "venv": False}]
    )
    assert orchestrate(plan, repo, pool=2, concurrency=2).summary.successful == 2
    slots = sorted(p for p in pool_dir(state(repo)).iterdir() if p.is_dir())
    assert len(slots) == 2
    head = git(repo, "rev-parse", "HEAD")
    dead = "20260101-000000-deadbe"
    admins = []
    for slot, name in zip(slots, ("t1", "t2"), strict=True):
        git(repo, "branch", f"orchestrator/{dead}/{name}", head)
        admin = Path((slot / ".git").read_text().removeprefix("gitdir:").strip())
        (admin / "HEAD").write_text(f"ref: refs/heads/orchestrator/{dead}/{name}\n")
        admins.append(admin)
    held = try_lock(slots[0].with_name(slots[0].name + ".mutex"))  # a live holder's slot
    assert held is not None
    try:
        assert detach_dead_slots(state(repo), "20260101-000000-other1") == []
        assert detach_dead_slots(state(repo), dead) == [slots[1]]
    finally:
        os.close(held)
    assert (admins[1] / "HEAD").read_text().strip() == head  # detached at the branch's tip
    assert (admins[0] / "HEAD").read_text().startswith("ref: ")  # left to its holder

    # Whatever comes first in the pool (a slot on another branch, one whose HEAD cannot be
    # read), every slot is looked at; one whose admin entry is broken is passed over.
    on_t2 = f"ref: refs/heads/orchestrator/{dead}/t2\n"
    (admins[0] / "HEAD").write_text("ref: refs/heads/main\n")
    (admins[1] / "HEAD").write_text(on_t2)
    assert detach_dead_slots(state(repo), dead) == [slots[1]]
    (admins[0] / "HEAD").rename(admins[0] / "HEAD.away")
    (admins[1] / "HEAD").write_text(on_t2)
    assert detach_dead_slots(state(repo), dead) == [slots[1]]
    gone = f"ref: refs/heads/orchestrator/{dead}/t9\n"  # a branch no longer there
    (admins[1] / "HEAD").write_text(gone)
    assert not (repo / ".git" / "packed-refs").exists()
    assert detach_dead_slots(state(repo), dead) == []
    assert (admins[1] / "HEAD").read_text() == gone  # nowhere to detach it to
    (admins[1] / "HEAD").write_text(on_t2)
    many = "".join(f"create refs/heads/many/{i:03} {head}\n" for i in range(100))
    subprocess.run(["git", "-C", str(repo), "update-ref", "--stdin"], input=many, text=True)
    git(repo, "pack-refs", "--all")  # the branch packed (a gc since the crash), among many
    assert (repo / ".git" / "packed-refs").stat().st_size > 4096  # longer than any ref
    assert detach_dead_slots(state(repo), dead) == [slots[1]]
    assert (admins[1] / "HEAD").read_text().strip() == head
    (admins[1] / "HEAD").write_text(on_t2)
    (admins[1] / "commondir").rename(admins[1] / "commondir.away")
    assert detach_dead_slots(state(repo), dead) == []
    assert (admins[1] / "HEAD").read_text() == on_t2
    (admins[1] / "commondir.away").rename(admins[1] / "commondir")

    # What an agent working in the slot could have left there: a HEAD that is not UTF-8, a
    # FIFO (a read would block the resume), a branch name reaching out of the refs to a
    # file (its content would become the HEAD), a ref that holds no commit id. The resume
    # goes on; such a slot is not detached, and nothing outside the refs is read.
    outside = repo / "outside"
    outside.write_text(head + "\n")  # would pass for a commit
    hostile = [
        b"ref: refs/heads/orchestrator/" + dead.encode() + b"/t2\xff\n",
        f"ref: refs/heads/orchestrator/{dead}/../../../../../outside\n".encode(),
        f"ref: refs/heads/orchestrator/{dead}/junk\n".encode(),
    ]
    git(repo, "update-ref", "-d", f"refs/heads/orchestrator/{dead}/t2")
    (repo / ".git" / f"refs/heads/orchestrator/{dead}").mkdir(parents=True, exist_ok=True)
    junk = repo / ".git" / f"refs/heads/orchestrator/{dead}/junk"
    junk.write_text("not a commit\n")
    for content in hostile:
        (admins[1] / "HEAD").write_bytes(content)
        assert detach_dead_slots(state(repo), dead) == []
        assert (admins[1] / "HEAD").read_bytes() == content
    junk.write_bytes(b"\xff" * 40 + b"\n")  # nor even UTF-8
    assert detach_dead_slots(state(repo), dead) == []
    assert (admins[1] / "HEAD").read_bytes() == hostile[-1]
    with (repo / ".git" / "packed-refs").open("a") as packed:  # nor a packed one
        packed.write(f"not-a-commit refs/heads/orchestrator/{dead}/packed\n")
    (admins[1] / "HEAD").write_text(f"ref: refs/heads/orchestrator/{dead}/packed\n")
    assert detach_dead_slots(state(repo), dead) == []
    assert (admins[1] / "HEAD").read_text().endswith("/packed\n")
    (admins[1] / "HEAD").unlink()
    os.mkfifo(admins[1] / "HEAD")
    assert detach_dead_slots(state(repo), dead) == []  # returns: the FIFO is never opened


#: Borrows a slot of the pool of the repository argv[1] for branch argv[2] at argv[3].
BORROW = """
import sys, anyio
from orchestrator import Repository
from orchestrator.pool import WorktreePool

async def main():
    pool = WorktreePool(await Repository.open(sys.argv[1]), 1)
    print(await pool.borrow(sys.argv[2], sys.argv[3]) is not None)

anyio.run(main)
"""


def test_a_borrower_killed_between_its_branch_and_its_files_leaves_the_slot_lendable(
    make_repo: MakeRepo,
) -> None:
    """An orchestrator killed in a borrow after it made the task's branch and before the
    slot's files are the start commit's (the crash point ``worktree``, which the resume
    tests kill at): the slot's HEAD names the dead run's branch, a resume detaches it, and
    the next borrower finds the slot exactly its start commit's, the last task's mess gone."""
    from orchestrator.pool import WorktreePool, detach_dead_slots

    repo_path = make_repo()
    head = git(repo_path, "rev-parse", "HEAD")

    async def give_back_messy() -> Path:
        pool = WorktreePool(await Repository.open(repo_path), 1)
        worktree = await pool.create("u/first", head)
        assert worktree is not None
        (worktree.path / "src" / "file0000.txt").write_text("changed\n")
        (worktree.path / "left.txt").write_text("untracked\n")
        await pool.give_back(worktree)
        return worktree.admin_dir

    admin = run(give_back_messy)
    branch = "orchestrator/20260101-000000-deadbe/t"
    killed = subprocess.run(
        [sys.executable, "-c", BORROW, str(repo_path), branch, head],
        env={**os.environ, "ORCHESTRATOR_CRASH_AT": "worktree:1"},
        capture_output=True,
        timeout=60,
    )
    assert killed.returncode == -signal.SIGKILL, killed
    assert (admin / "HEAD").read_text() == f"ref: refs/heads/{branch}\n"
    [slot] = detach_dead_slots(state(repo_path), "20260101-000000-deadbe")
    assert (admin / "HEAD").read_text() == f"{head}\n"

    async def borrow_again() -> Worktree | None:
        return await WorktreePool(await Repository.open(repo_path), 1).borrow("u/next", head)

    again = run(borrow_again)
    assert again is not None and again.path == slot
    assert not (slot / "left.txt").exists()
    assert (slot / "src" / "file0000.txt").read_text() == "line 0\n"
    assert git(slot, "status", "--porcelain", "--ignored") == ""


def test_a_borrowed_venv_gets_the_borrowers_own_worktree_installed(
    make_repo: MakeRepo, write_agent: WriteAgent
) -> None:
    repo = make_repo(extra=project_files())
    agent = write_agent("project", PROJECT_AGENT)
    plan = make_plan(agent, [{"id": "t", "install_project": True}], python="python")
    (first,) = orchestrate(plan, repo, pool=2).results
    assert first.status == "succeeded", first.error
    assert first.output is not None
    slot = Path(first.output["cwd"])
    # The first run's worktree held (as by another run): the second run's task works in
    # another worktree, with the venv the first run left, its project still installed from
    # the first worktree.
    fd = os.open(slot.with_name(slot.name + ".mutex"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (second,) = orchestrate(plan, repo, pool=2).results
    finally:
        os.close(fd)
    assert second.status == "succeeded", second.error
    assert second.output is not None
    worktree = Path(second.output["cwd"])
    assert worktree != slot and worktree.parent == pool_root(repo)
    assert second.output["venv"] == first.output["venv"]
    assert Path(second.output["module"]) == worktree / "src" / "tinypkg" / "__init__.py"
    # Brought back to an empty venv (the first worktree's project removed), then this one's.
    commands = second.provenance.commands
    assert [c[1:3] for c in commands[:2]] == [["pip", "sync"], ["pip", "install"]]
    assert commands[1][-2:] == ["-e", str(worktree)]

    # A venv that names its task's worktree in a requirement is the task's own, not pooled.
    plan = make_plan(agent, [{"id": "own", "requirements": ["-e {worktree}"]}], python="python")
    report = orchestrate(plan, repo, pool=2)
    (own,) = report.results
    assert own.status == "succeeded", own.error
    assert own.output is not None
    assert Path(own.output["venv"]) == state(repo) / "venvs" / report.run_id / "own"
    assert Path(own.output["module"]).is_relative_to(own.output["cwd"])


def test_a_seeded_venv_is_lent_only_to_tasks_that_asked_for_pip(
    make_repo: MakeRepo, write_agent: WriteAgent
) -> None:
    repo = make_repo(extra=project_files())
    agent = write_agent("project", PROJECT_AGENT)
    seeded = {"install_project": True, "venv": {"seed": True}}
    plain = {"install_project": True}
    tasks = [{"id": "s1", **seeded}, {"id": "p1", **plain}, {"id": "s2", **seeded}]
    tasks.append({"id": "p2", **plain})
    report = orchestrate(make_plan(agent, tasks, python="python", concurrency=1), repo, pool=2)
    assert report.summary.successful == 4, report.errors
    outputs = {r.task_id: r.output or {} for r in report.results}
    for task_id, output in outputs.items():
        assert output["pip"] is task_id.startswith("s"), task_id
    venvs = {task_id: Path(o["venv"]) for task_id, o in outputs.items()}
    # Each second task borrowed its kind's venv; the two kinds' slots are apart.
    assert venvs["s2"] == venvs["s1"] and venvs["p2"] == venvs["p1"]
    assert venvs["s1"].parent != venvs["p1"].parent
    assert {v.parent.parent for v in venvs.values()} == {state(repo) / "pool" / "venvs"}


def test_gc_goes_by_each_slots_last_give_back_and_removes_what_no_slot_owns(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slot idle for the limit or longer goes (its lock's time is its last give-back; no
    lock: idle forever), a younger or a held one stays, whatever order they come in; a lock
    and private index left without their slot go unless held, and so does an emptied set's
    directory. A dry run names the same slots and changes nothing. No lock is left open."""
    import time
    from types import SimpleNamespace

    from orchestrator import pool as pool_module
    from orchestrator.pool import collect_pool

    repo = make_repo()
    now = float(int(time.time()))
    monkeypatch.setattr(pool_module, "time", SimpleNamespace(time=lambda: now))
    venvs = state(repo) / "pool" / "venvs"
    young, edge, held, old = (venvs / "k1" / name for name in "abcd")
    unlocked = venvs / "k2" / "e"
    for slot, idle in ((young, 10), (edge, 50), (held, 1000), (old, 100), (unlocked, None)):
        (slot / "bin").mkdir(parents=True)
        if idle is not None:
            lock = slot.with_name(slot.name + ".mutex")
            lock.touch()
            os.utime(lock, (now - idle, now - idle))
    old.with_name("d.kept").touch()
    (venvs / "k3").mkdir()  # a set whose slots are all gone
    worktrees = pool_root(repo)
    worktrees.mkdir(parents=True)
    orphans = [worktrees / name for name in ("gone.mutex", "gone.index", "gone.tree")]
    for path in [*orphans, worktrees / "busy.mutex"]:
        path.touch()
    fds = [os.open(p, os.O_RDWR) for p in (held.with_name("c.mutex"), worktrees / "busy.mutex")]
    for fd in fds:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    everything = sorted(p.relative_to(state(repo)) for p in state(repo).rglob("*"))
    open_fds = len(os.listdir("/proc/self/fd"))

    async def collect(**options: Any) -> list[str]:
        return await collect_pool(await Repository.open(repo), idle_for=50, **options)

    try:
        planned = run(lambda: collect(dry_run=True))
        assert sorted(p.relative_to(state(repo)) for p in state(repo).rglob("*")) == everything
        done = run(collect)
        assert len(os.listdir("/proc/self/fd")) == open_fds
    finally:
        for fd in fds:
            os.close(fd)
    assert planned == [f"would remove pool venv {s}" for s in (edge, old, unlocked)]
    assert done == [f"removed pool venv {s}" for s in (edge, old, unlocked)]
    left = sorted(p.relative_to(venvs).as_posix() for p in venvs.rglob("*"))
    assert left == ["k1", "k1/a", "k1/a.mutex", "k1/a/bin", "k1/c", "k1/c.mutex", "k1/c/bin"]
    assert sorted(p.name for p in worktrees.iterdir()) == ["busy.mutex"]


def test_a_discarded_venv_goes_with_its_lock_and_a_kept_one_is_never_lent_again(
    tmp_path: Path,
) -> None:
    """A discarded venv (one a task may have written) is deleted with its lock; a kept one
    stays where it is, let go of but never lent again; one given back is lent again."""
    from orchestrator.locks import try_lock
    from orchestrator.pool import VenvPool

    pool = VenvPool(tmp_path / "state", UvBackend(), size=3)

    def lock_of(path: Path) -> Path:
        return path.with_name(path.name + ".mutex")

    async def acquire() -> Path:
        venv = await pool.acquire((), cwd=tmp_path, fallback=tmp_path / "outside")
        assert pool.owns(venv) and venv.backend == "uv"  # the installer its provenance names
        return venv.path

    async def main() -> None:
        discarded = await acquire()
        await pool.discard(Venv(discarded, "uv"))
        assert not discarded.exists() and not lock_of(discarded).exists()
        kept = await acquire()
        pool.keep(Venv(kept, "uv"))
        assert (kept / "pyvenv.cfg").is_file() and lock_of(kept).with_suffix(".kept").exists()
        fd = try_lock(lock_of(kept))  # let go of
        assert fd is not None
        os.close(fd)
        other = await acquire()
        assert other not in (discarded, kept)
        for _ in range(2):  # lent again, and again
            pool.give_back(Venv(other, "uv"))
            assert await acquire() == other
        pool.close()

    run(main)
    assert (pool.created, pool.recycled) == (3, 2)


def test_a_kept_slot_moves_out_with_its_entry_or_stays_never_lent_again(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """keep moves a lent slot (its files, admin entry and branch) to its target, beside what
    is kept there already; a slot that cannot be moved (the target taken) stays where it is,
    let go of and never lent again."""
    from orchestrator.locks import try_lock
    from orchestrator.pool import WorktreePool
    from orchestrator.worktree import Worktree

    repo_path = make_repo()
    head = git(repo_path, "rev-parse", "HEAD")
    kept = tmp_path / "kept"
    kept.mkdir()  # other worktrees of the run kept there already
    (kept / "two").write_text("taken\n")

    async def main() -> tuple[list[Worktree], Worktree | None]:
        pool = WorktreePool(await Repository.open(repo_path), 2)
        first, second = await pool.create("k/one", head), await pool.create("k/two", head)
        assert first is not None and second is not None
        moved = await pool.keep(first, kept / "one")
        stayed = await pool.keep(second, kept / "two")
        third = await pool.borrow("k/three", head)
        pool.close()
        return [first, moved, second, stayed], third

    (first, moved, second, stayed), third = run(main)
    assert moved == Worktree(kept / "one", "k/one", head, first.admin_dir)
    assert (moved.path / ".git").read_text().strip() == f"gitdir: {first.admin_dir}"
    assert git(moved.path, "symbolic-ref", "HEAD") == "refs/heads/k/one"
    assert stayed == second and (second.path / "src").is_dir()
    assert second.path.with_name(second.path.name + ".kept").exists()
    fd = try_lock(second.path.with_name(second.path.name + ".mutex"))
    assert fd is not None  # let go of
    os.close(fd)
    assert third is None  # no slot to lend: one moved out, the other kept


def test_which_sets_are_pooled_under_which_key(tmp_path: Path) -> None:
    """Only requirements named by name and version are pooled (not a path, URL or option);
    a set's slots are keyed as before (interpreter, backend, sorted requirements, and seed
    only when set), so that slots made by earlier runs are found again."""
    from envelopes import digest
    from orchestrator.pool import VenvPool, _poolable
    from orchestrator.venv import base_python

    assert _poolable(["six==1.16.0", "Foo>=1", "bar[extra]; python_version > '3'"])
    for odd in ("-rreq.txt", ".pkg", "~pkg", "/abs", "a/b", "name@1", "C:\\pkg"):
        assert not _poolable(["six", odd]), odd
    pool = VenvPool(tmp_path / "state", UvBackend(), size=1)
    identity: dict[str, object] = {"python": base_python(), "backend": "uv"}
    identity["requirements"] = ["a", "b"]
    assert pool._key(["b", "a"], False) == digest(identity)[:16]
    assert pool._key(["b", "a"], True) == digest({**identity, "seed": True})[:16]


def test_a_failed_install_leaves_no_slot_and_fails_its_set_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A set that cannot be installed: its slot and lock go, and every task of that set gets
    the error without installing again. A slot gone from a pool of one makes room for the
    next; without a pool, the venv is made at the task's own place."""
    from orchestrator.errors import VenvError
    from orchestrator.pool import VenvPool

    class Attempts(UvBackend):
        tried = 0

        async def install(self, *args: Any, **kwargs: Any) -> list[str]:
            self.tried += 1
            return await super().install(*args, **kwargs)

    backend = Attempts()
    pool = VenvPool(tmp_path / "state", backend, size=1)
    outside = tmp_path / "outside"

    async def main() -> None:
        with monkeypatch.context() as offline:
            offline.setenv("UV_OFFLINE", "1")
            errors = []
            for _ in range(2):
                with pytest.raises(VenvError) as failed:
                    await pool.acquire(
                        ["no-such-distribution-here"], cwd=tmp_path, fallback=outside
                    )
                errors.append(failed.value)
        assert backend.tried == 1 and pool.created == 0
        first, second = errors  # the same error: what failed, and the commands that ran
        assert str(second) == str(first) and "no-such-distribution-here" in str(first)
        assert second.commands == first.commands and first.commands[-1][1:3] == ["pip", "install"]
        assert not [p for p in pool.root.rglob("*") if not p.is_dir()]  # no slot, no lock
        venv = await pool.acquire(["six"], cwd=tmp_path, fallback=outside)
        assert pool.owns(venv) and pool.created == 1
        assert not (venv.path / "bin" / "pip").exists()  # no seed unless asked
        await pool.discard(venv)
        again = await pool.acquire(["six"], cwd=tmp_path, fallback=outside)
        assert pool.owns(again) and again.path != venv.path
        pool.close()
        alone = await VenvPool(tmp_path / "state", backend, size=0).acquire(
            ["six"], cwd=tmp_path, fallback=outside, seed=True
        )
        assert alone.path == outside and (outside / "bin" / "pip").exists()
        assert any(p.startswith("six==") for p in describe_environment(alone).packages)
        assert backend.tried == 3  # the failed one, six in the pool, six without: one backend

    run(main)


def test_a_retry_in_a_slot_that_cannot_be_made_pristine_is_a_git_error(
    make_repo: MakeRepo,
) -> None:
    """A slot whose private index cannot be written again (a directory in its place, which an
    agent running as the user can make beside its slot) fails its retry's reset with a
    GitError naming the slot and why, as a failed git command would."""
    from orchestrator.errors import GitError
    from orchestrator.pool import WorktreePool
    from orchestrator.recycle import private_index

    repo_path = make_repo()
    head = git(repo_path, "rev-parse", "HEAD")

    async def main() -> tuple[Path, GitError]:
        pool = WorktreePool(await Repository.open(repo_path), 1)
        worktree = await pool.create("k/one", head)
        assert worktree is not None
        index = private_index(worktree.path)
        index.unlink()
        index.mkdir()
        (index / "taken").write_text("x\n")
        try:
            with pytest.raises(GitError) as failed:
                await pool.reset(worktree)
        finally:
            pool.close()
        return worktree.path, failed.value

    slot, error = run(main)
    assert (error.command, error.returncode) == (["worktree"], 1)
    assert str(error).startswith(f"git worktree: fatal: cannot reset {slot}: [Errno 21] ")


def test_gc_and_a_discard_go_on_past_what_cannot_be_deleted(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """A file an agent made undeletable stays, with the directories above it; the rest goes.
    gc reports such a slot removed and goes on with the next ones, marks it never to be lent
    again, and leaves neither its lock nor its private index (kept, the lock would make the
    slot look just used to the next gc); an emptied set's directory that cannot be removed
    stays. A discarded venv holding such a file stays too, never lent again."""
    from orchestrator.pool import VenvPool, WorktreePool, collect_pool

    from .test_recovery import unremovable

    repo_path = make_repo()
    head = git(repo_path, "rev-parse", "HEAD")
    venvs = state(repo_path) / "pool" / "venvs"
    stuck_venv, emptied_set = venvs / "k1" / "a", venvs / "k2"
    (stuck_venv / "bin").mkdir(parents=True)
    emptied_set.mkdir()
    pool = VenvPool(tmp_path / "state", UvBackend(), size=1)

    async def main() -> tuple[Path, Path, list[str]]:
        repo = await Repository.open(repo_path)
        worktrees = WorktreePool(repo, 1)
        worktree = await worktrees.create("u/one", head)
        assert worktree is not None
        await worktrees.give_back(worktree)
        venv = await pool.acquire((), cwd=tmp_path, fallback=tmp_path / "outside")
        stuck = [worktree.path / "stuck", stuck_venv / "bin" / "stuck", venv.path / "stuck"]
        for file in stuck:
            file.write_text("x\n")
        with unremovable(*stuck, emptied_set):
            done = await collect_pool(repo, idle_for=0)
            await pool.discard(venv)
        return worktree.path, venv.path, done

    slot, venv, done = run(main)
    assert done == [f"removed pool worktree {slot}", f"removed pool venv {stuck_venv}"]
    assert sorted(p.name for p in slot.parent.iterdir()) == [slot.name, f"{slot.name}.kept"]
    assert sorted(p.name for p in stuck_venv.parent.iterdir()) == ["a", "a.kept"]
    assert (slot / "stuck").is_file() and (stuck_venv / "bin" / "stuck").is_file()
    assert emptied_set.is_dir()
    assert (venv / "stuck").is_file() and venv.with_name(venv.name + ".kept").exists()


async def _one_slot_given_back(repo_path: Path) -> tuple[Repository, Worktree]:
    """The repository opened, and a pool slot made at its HEAD and given back."""
    from orchestrator.pool import WorktreePool

    repo = await Repository.open(repo_path)
    pool = WorktreePool(repo, 1)
    worktree = await pool.create("u/one", git(repo_path, "rev-parse", "HEAD"))
    assert worktree is not None
    await pool.give_back(worktree)
    return repo, worktree


def test_a_private_index_that_cannot_be_deleted_does_not_stop_gc(make_repo: MakeRepo) -> None:
    """A slot's private index and its note that cannot be deleted (made immutable): gc
    removes the slot, its lock and its admin entry all the same, and reports it."""
    from orchestrator.pool import collect_pool
    from orchestrator.recycle import private_index

    from .test_recovery import unremovable

    repo_path = make_repo()

    async def main() -> tuple[Path, list[str]]:
        repo, worktree = await _one_slot_given_back(repo_path)
        index = private_index(worktree.path)
        with unremovable(index, index.with_suffix(".tree")):
            return worktree.path, await collect_pool(repo, idle_for=0)

    slot, done = run(main)
    assert done == [f"removed pool worktree {slot}"]
    assert not slot.exists() and not slot.with_name(slot.name + ".mutex").exists()
    assert [e["worktree"] for e in worktree_entries(repo_path)] == [str(repo_path)]


def test_gc_goes_on_past_a_slot_it_can_neither_remove_nor_mark(make_repo: MakeRepo) -> None:
    """A slot gc cannot remove whose never-lend mark cannot be written either (an agent
    running as the user put a link to nowhere in its place): gc reports it and goes on,
    without an error, and leaves no lock behind."""
    from orchestrator.pool import collect_pool

    from .test_recovery import unremovable

    repo_path = make_repo()

    async def main() -> tuple[Path, list[str]]:
        repo, worktree = await _one_slot_given_back(repo_path)
        (worktree.path / "stuck").write_text("x\n")
        mark = worktree.path.with_name(worktree.path.name + ".kept")
        mark.symlink_to(repo_path / "gone" / "mark")
        with unremovable(worktree.path / "stuck"):
            return worktree.path, await collect_pool(repo, idle_for=0)

    slot, done = run(main)
    assert done == [f"removed pool worktree {slot}"]
    assert (slot / "stuck").is_file() and not slot.with_name(slot.name + ".mutex").exists()


def test_a_cancelled_borrow_or_create_leaves_nothing_half_done(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancellation (a run's deadline) that comes while a borrow makes a slot pristine:
    the slot is removed and the branch made for it deleted all the same, so no branch is
    left that the task's retry could not make again; one that comes just as a slot with
    no ``.git`` is found: it is removed all the same. One that comes while a new slot's
    private index is recorded: the worktree, made and the task's, is returned, recorded."""
    import orchestrator.pool as pool_module
    from orchestrator.pool import WorktreePool
    from orchestrator.recycle import private_index

    repo_path = make_repo()
    head = git(repo_path, "rev-parse", "HEAD")

    def cancelling(real: Callable[..., Any], scope: anyio.CancelScope) -> Callable[..., Any]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            scope.cancel()
            return await real(*args, **kwargs)

        return call

    async def main() -> None:
        pool = WorktreePool(await Repository.open(repo_path), 1)
        with anyio.CancelScope() as scope:
            monkeypatch.setattr(pool_module, "record", cancelling(pool_module.record, scope))
            made = await pool.create("c/made", head)
        monkeypatch.undo()
        assert made is not None and pool.created == 1 and private_index(made.path).is_file()
        await pool.give_back(made)
        with anyio.CancelScope() as scope:
            monkeypatch.setattr(pool_module, "catch_up", cancelling(pool_module.catch_up, scope))
            await pool.borrow("c/cancelled", head)
        monkeypatch.undo()
        assert scope.cancelled_caught and not made.path.exists()
        assert git(repo_path, "branch", "--list", "c/*") == "c/made"
        again = await pool.create("c/again", head)
        assert again is not None
        await pool.give_back(again)
        (again.path / ".git").unlink()
        take_free = pool.slots.take_free

        def take_free_then_cancel() -> Path | None:
            anyio.from_thread.run_sync(scope.cancel)
            return take_free()

        with anyio.CancelScope() as scope:
            monkeypatch.setattr(pool.slots, "take_free", take_free_then_cancel)
            assert await pool.borrow("c/none", head) is None
        assert scope.cancel_called and not again.path.exists()
        pool.close()

    run(main)


def test_a_borrow_whose_catch_up_fails_removes_the_slot_and_only_its_own_branch(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A git command of the catch-up failing (a GitError once the task's branch is made)
    is no error of the caller's: the slot is removed and the borrow gives no worktree, so
    that the task starts in a fresh one. The branch made for it is deleted only if it is
    still where the borrow made it: one moved meanwhile (by another git) is left alone."""
    import orchestrator.pool as pool_module
    from orchestrator.errors import GitError
    from orchestrator.pool import WorktreePool

    repo_path = make_repo()
    head = git(repo_path, "rev-parse", "HEAD")
    git(repo_path, "commit", "--allow-empty", "-q", "-m", "elsewhere")
    elsewhere = git(repo_path, "rev-parse", "HEAD")

    async def moved_then_failed(*args: Any, **kwargs: Any) -> bool:
        git(repo_path, "update-ref", "refs/heads/f/moved", elsewhere)
        raise GitError(["checkout-index"], 128, "fatal: cannot write src/file0000.txt")

    async def main() -> Path:
        pool = WorktreePool(await Repository.open(repo_path), 1)
        made = await pool.create("f/made", head)
        assert made is not None
        await pool.give_back(made)
        monkeypatch.setattr(pool_module, "catch_up", moved_then_failed)
        assert await pool.borrow("f/moved", head) is None
        pool.close()
        return made.path

    slot = run(main)
    assert not slot.exists() and pool_root(repo_path).is_dir()
    assert git(repo_path, "rev-parse", "f/moved") == elsewhere


def test_closing_a_pool_detaches_what_it_still_holds_and_nothing_else(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """A run whose clean-up ran out of time closes its pool: every slot it still holds is
    let go of with its HEAD detached at its branch's commit (the branch checked out
    nowhere). A slot whose ``.git`` points at an admin entry outside this repository's is
    not touched there; one without a ``.git`` or whose HEAD is gone is let go of as it is."""
    import shutil

    from orchestrator.pool import WorktreePool

    repo_path = make_repo()
    head = git(repo_path, "rev-parse", "HEAD")
    common = repo_path / ".git"

    async def main() -> list[Worktree]:
        pool = WorktreePool(await Repository.open(repo_path), 4)
        held = [await pool.create(f"x/{name}", head) for name in ("a", "b", "c", "d")]
        assert all(w is not None for w in held)
        worktrees = [w for w in held if w is not None]
        _, foreign, no_git, no_head = worktrees
        other = tmp_path / "other" / "worktrees" / foreign.admin_dir.name
        shutil.copytree(foreign.admin_dir, other)
        (other / "commondir").write_text(f"{common}\n")  # its refs are this repository's
        (foreign.path / ".git").write_text(f"gitdir: {other}\n")
        (no_git.path / ".git").unlink()
        (no_head.admin_dir / "HEAD").unlink()
        assert pool.created == 4 and pool.recycled == 0
        pool.close()
        return worktrees

    on_branch, foreign, no_git, no_head = run(main)
    assert (on_branch.admin_dir / "HEAD").read_text() == f"{head}\n"
    other = tmp_path / "other" / "worktrees" / foreign.admin_dir.name
    assert (other / "HEAD").read_text() == "ref: refs/heads/x/b\n"
    assert (no_git.admin_dir / "HEAD").read_text() == "ref: refs/heads/x/c\n"
    assert not (no_head.admin_dir / "HEAD").exists()
    slots = Slots(pool_root(repo_path), 4)  # every one let go of
    taken = {slots.take_free() for _ in range(4)}
    assert taken == {w.path for w in (on_branch, foreign, no_git, no_head)}
    slots.close()


def test_a_slot_marked_kept_or_removed_as_it_is_locked_is_not_lent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process marks a slot kept (its task's worktree kept for inspection), or gc
    removes it, between a borrower's look at it and its lock: the borrower lets go of it
    and lends nothing."""
    import orchestrator.pool as pool_module
    from orchestrator.locks import try_lock

    slots = Slots(tmp_path / "slots", size=2)
    slot = slots.reserve()
    assert slot is not None
    slot.mkdir()
    slots.made(slot)
    slots.release(slot)
    lock_slot = pool_module._try_lock

    def meanwhile(change: Callable[[], object]) -> Callable[[Path], int | None]:
        def lock(path: Path) -> int | None:
            change()
            return lock_slot(path)

        return lock

    mark = slot.with_name(slot.name + ".kept")
    for change in (mark.touch, lambda: (mark.unlink(), slot.rmdir())):
        with monkeypatch.context() as patched:
            patched.setattr(pool_module, "_try_lock", meanwhile(change))
            assert slots.take_free() is None and slots.held() == []
        fd = try_lock(slot.with_name(slot.name + ".mutex"))  # let go of
        assert fd is not None
        os.close(fd)


def test_a_new_slot_whose_private_index_cannot_be_recorded_is_still_the_tasks(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new slot's worktree is made but its private index cannot be recorded (a full
    disk): the worktree is the task's all the same, what was written of the index goes,
    and the slot's next borrower writes its files whole."""
    import errno

    import orchestrator.pool as pool_module
    from orchestrator.pool import WorktreePool
    from orchestrator.recycle import private_index

    repo_path = make_repo()
    head = git(repo_path, "rev-parse", "HEAD")

    async def disk_full(worktree: Worktree, index: Path, tree: str | None = None) -> None:
        index.write_bytes(b"DIRC")  # a first part written
        raise OSError(errno.ENOSPC, "No space left on device")

    async def main() -> None:
        pool = WorktreePool(await Repository.open(repo_path), 1)
        with monkeypatch.context() as patched:
            patched.setattr(pool_module, "record", disk_full)
            made = await pool.create("r/made", head)
        assert made is not None and pool.created == 1
        assert not private_index(made.path).exists()
        (made.path / "left.txt").write_text("untracked\n")
        await pool.give_back(made)
        again = await pool.borrow("r/again", head)
        assert again is not None and again.path == made.path and pool.recycled == 1
        assert not (again.path / "left.txt").exists() and private_index(again.path).is_file()
        await pool.give_back(again)
        pool.close()

    run(main)


def test_a_new_slot_git_refuses_leaves_nothing_and_its_room(make_repo: MakeRepo) -> None:
    """A new slot whose worktree git refuses to add (its branch exists): the error is the
    caller's, nothing of the slot stays in the pool (no directory, no lock, not held), and
    its room goes to the next worktree."""
    from orchestrator.errors import GitError
    from orchestrator.pool import WorktreePool

    repo_path = make_repo()
    head = git(repo_path, "rev-parse", "HEAD")
    git(repo_path, "branch", "n/taken", head)

    async def main() -> None:
        pool = WorktreePool(await Repository.open(repo_path), 1)
        with pytest.raises(GitError):
            await pool.create("n/taken", head)
        assert list(pool_root(repo_path).iterdir()) == [] and pool.slots.held() == []
        made = await pool.create("n/next", head)
        assert made is not None and pool.created == 1
        await pool.give_back(made)
        pool.close()

    run(main)


def test_a_slot_kept_after_its_pool_was_deleted_is_let_go_of(tmp_path: Path) -> None:
    """The pool's directory deleted under a run (by hand, say): a slot it keeps cannot be
    marked, and is let go of all the same, without an error."""
    import shutil

    slots = Slots(tmp_path / "slots", size=1)
    slot = slots.reserve()
    assert slot is not None
    slot.mkdir()
    slots.made(slot)
    shutil.rmtree(tmp_path / "slots")
    slots.mark_kept(slot)
    assert slots.held() == [] and not (tmp_path / "slots").exists()


def test_a_pooled_install_runs_in_the_plans_directory(tmp_path: Path) -> None:
    """uv reads its settings (``uv.toml``) where it runs: an install runs in the plan's
    directory, in the pool as without it, so the plan's settings hold for both (here: no
    index, so nothing can be installed)."""
    from orchestrator.errors import VenvError
    from orchestrator.pool import VenvPool

    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    (plan_dir / "uv.toml").write_text("[pip]\nno-index = true\n")

    async def acquire(size: int) -> None:
        pool = VenvPool(tmp_path / "state", UvBackend(), size=size)
        try:
            await pool.acquire(["six"], cwd=plan_dir, fallback=tmp_path / "outside")
        finally:
            pool.close()

    for size in (1, 0):
        with pytest.raises(VenvError, match="six"):
            anyio.run(acquire, size, backend="asyncio")


def test_a_task_that_finds_the_pool_full_gets_its_venv_made_at_its_own_place(
    tmp_path: Path,
) -> None:
    """Every slot of its set held and the pool full: the venv is made at the task's own place,
    not lent, and installed as without a pool: with uv, synced to what the set came to; with
    pip (which cannot sync), from the task's requirements in the plan's directory, with pip
    in it when the task asked for it."""
    from orchestrator.pool import VenvPool
    from orchestrator.venv import StdlibBackend

    class RecordedPip(StdlibBackend):
        """python -m venv (without pip: seconds saved), its creations and pip's installs
        recorded (the installs not run)."""

        def __init__(self) -> None:
            self.creations: list[bool] = []
            self.installs: list[tuple[list[str], Path | None]] = []

        async def create(self, path: Path, *, with_pip: bool) -> list[str]:
            self.creations.append(with_pip)
            return await super().create(path, with_pip=False)

        async def install(
            self, venv: Path, requirements: Any, *, cwd: Path | None = None, what: Any = None
        ) -> list[str]:
            self.installs.append((list(requirements), cwd))
            return ["pip", "install", *requirements]

    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()

    async def main(backend: Any, name: str, wanted: list[str], seed: bool) -> tuple[Venv, Venv]:
        pool = VenvPool(tmp_path / name, backend, size=1)
        try:
            first, second = [
                await pool.acquire(wanted, cwd=plan_dir, fallback=tmp_path / at / name, seed=seed)
                for at in ("a", "b")
            ]
            assert pool.owns(first) and not pool.owns(second)
        finally:
            pool.close()
        return first, second

    first, second = anyio.run(main, UvBackend(), "uv", ["six"], False, backend="asyncio")
    assert second.path == tmp_path / "b" / "uv" and (first.backend, second.backend) == ("uv",) * 2
    assert describe_environment(second).packages == describe_environment(first).packages
    assert any(p.startswith("six==") for p in describe_environment(second).packages)
    assert [c[1:3] for c in second.commands] == [["venv", "--quiet"], ["pip", "sync"]]
    first, second = anyio.run(main, UvBackend(), "uv-seeded", [], True, backend="asyncio")
    assert second.commands[0][1:4] == ["venv", "--quiet", "--seed"]  # made as the first was
    assert describe_environment(second).packages == describe_environment(first).packages

    pip = RecordedPip()
    first, second = anyio.run(main, pip, "pip", ["six"], False, backend="asyncio")
    assert second.path == tmp_path / "b" / "pip" and (second.path / "pyvenv.cfg").is_file()
    assert pip.installs == [(["six"], plan_dir), (["six"], plan_dir)]
    seeded = RecordedPip()
    anyio.run(main, seeded, "seeded", [], True, backend="asyncio")
    assert seeded.creations == [True, True] and seeded.installs == []


def test_a_venv_a_task_added_to_is_synced_back_before_it_is_lent_again(tmp_path: Path) -> None:
    """A venv given back with a distribution more than its set's (a task's ``pip install``)
    is synced back to the set's, and counted so, each time; then it is lent as it is."""
    from orchestrator.pool import VenvPool

    pool = VenvPool(tmp_path / "state", UvBackend(), size=1)

    def add_a_distribution(venv: Venv) -> None:
        [site] = venv.path.glob("lib/python*/site-packages")
        info = site / "extra_thing-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: extra-thing\nVersion: 1.0\n")
        (info / "INSTALLER").write_text("pip\n")
        (info / "RECORD").write_text(
            "".join(
                f"extra_thing-1.0.dist-info/{n},,\n" for n in ("METADATA", "INSTALLER", "RECORD")
            )
        )

    async def main() -> list[Venv]:
        lent = [await pool.acquire(["six"], cwd=tmp_path, fallback=tmp_path / "outside")]
        for _ in range(2):
            add_a_distribution(lent[-1])
            pool.give_back(lent[-1])
            lent.append(await pool.acquire(["six"], cwd=tmp_path, fallback=tmp_path / "outside"))
        pool.give_back(lent[-1])
        lent.append(await pool.acquire(["six"], cwd=tmp_path, fallback=tmp_path / "outside"))
        # Another set (six with pip): installed in a slot of its own, counted as made.
        seeded = await pool.acquire(["six"], cwd=tmp_path, fallback=tmp_path / "out", seed=True)
        assert pool.owns(seeded)
        pool.close()
        return lent

    first, *again = run(main)
    assert (pool.created, pool.synced, pool.recycled) == (2, 2, 1)
    assert all(venv.path == first.path and venv.backend == "uv" for venv in again)
    assert [venv.commands[0][1:3] for venv in again[:2]] == [["pip", "sync"]] * 2
    assert again[2].commands == []  # lent as it was
    assert "extra-thing==1.0" not in describe_environment(first).packages


def test_a_venv_that_cannot_be_brought_back_nor_removed_is_never_lent_again(
    tmp_path: Path,
) -> None:
    """A venv given back broken (its ``pyvenv.cfg`` gone: nothing can say what is in it) is
    removed and a new one made; one holding a file that cannot be deleted stays, never lent
    again (no borrower loops over it), and gc's to remove."""
    from orchestrator.pool import VenvPool

    from .test_recovery import unremovable

    pool = VenvPool(tmp_path / "state", UvBackend(), size=3)

    async def acquire() -> Venv:
        with anyio.fail_after(120):  # a guard: a borrower that loops over a slot never returns
            return await pool.acquire(["six"], cwd=tmp_path, fallback=tmp_path / "outside")

    async def main() -> list[Venv]:
        first = await acquire()
        pool.give_back(first)
        (first.path / "pyvenv.cfg").unlink()
        second = await acquire()  # first removed, second made
        pool.give_back(second)
        (second.path / "pyvenv.cfg").unlink()
        (second.path / "stuck").write_text("x\n")
        with unremovable(second.path / "stuck"):
            third = await acquire()
            pool.close()
        return [first, second, third]

    first, second, third = run(main)
    assert not first.path.exists() and not first.path.with_name(first.path.name + ".mutex").exists()
    assert (second.path / "stuck").is_file() and second.path.with_name(
        second.path.name + ".kept"
    ).exists()
    assert len({first.path, second.path, third.path}) == 3 and pool.created == 3


def test_without_a_pool_every_task_installs_its_own_venv(tmp_path: Path) -> None:
    """A pool of size 0: every task's venv is made at its own place and installed from its
    requirements, as the first one's was (nothing synced to what another task's came to)."""
    from orchestrator.pool import VenvPool

    pool = VenvPool(tmp_path / "state", UvBackend(), size=0)

    async def main() -> list[Venv]:
        return [
            await pool.acquire(["six"], cwd=tmp_path, fallback=tmp_path / name)
            for name in ("a", "b")
        ]

    venvs = run(main)
    assert [venv.path for venv in venvs] == [tmp_path / "a", tmp_path / "b"]
    made = [[command[1:3] for command in venv.commands] for venv in venvs]
    assert made == [[["venv", "--quiet"], ["pip", "install"]]] * 2
    assert (pool.created, pool.synced, pool.recycled) == (0, 0, 0)


def test_a_venv_that_cannot_be_made_in_a_new_slot_leaves_room_for_the_next(
    tmp_path: Path,
) -> None:
    """A task that finds its set's slot held makes a new one; when that install fails, the
    task gets the error, and the new slot goes with its lock: the next task makes its own."""
    from orchestrator.errors import VenvError
    from orchestrator.pool import VenvPool
    from orchestrator.venv import StdlibBackend

    class SecondInstallFails(StdlibBackend):
        """python -m venv without pip; installs not run, the second one failing."""

        installs = 0

        async def create(self, path: Path, *, with_pip: bool) -> list[str]:
            return await super().create(path, with_pip=False)

        async def install(self, venv: Path, requirements: Any, **_: Any) -> list[str]:
            self.installs += 1
            if self.installs == 2:
                raise VenvError("the index is down", commands=[["pip", "install"]])
            return ["pip", "install", *requirements]

    pool = VenvPool(tmp_path / "state", SecondInstallFails(), size=2)

    async def main() -> tuple[Venv, Venv]:
        first = await pool.acquire(["six"], cwd=tmp_path, fallback=tmp_path / "a")
        with pytest.raises(VenvError, match="the index is down"):
            await pool.acquire(["six"], cwd=tmp_path, fallback=tmp_path / "b")
        third = await pool.acquire(["six"], cwd=tmp_path, fallback=tmp_path / "c")
        pool.close()
        return first, third

    first, third = run(main)
    assert third.path.parent == first.path.parent and third.path != first.path
    names = sorted(p.name for p in first.path.parent.iterdir())
    assert names == sorted(
        f"{p.name}{end}" for p in (first.path, third.path) for end in ("", ".mutex")
    )
    assert pool.created == 2


def test_a_slot_lent_again_has_only_what_differs_written(make_repo: MakeRepo) -> None:
    """What the pool is for: a slot lent again is caught up from its private index, writing
    only what differs from the commit (the file the task changed); every other file is the
    same file on disk, not written anew, whether the start's tree is known or not."""
    from orchestrator.pool import WorktreePool

    repo_path = make_repo(files=3)
    head = git(repo_path, "rev-parse", "HEAD")
    tree = git(repo_path, "rev-parse", "HEAD^{tree}")

    def inodes(root: Path) -> dict[str, int]:
        return {p.name: p.stat().st_ino for p in (root / "src").iterdir()}

    async def main() -> list[tuple[dict[str, int], dict[str, int], str]]:
        pool = WorktreePool(await Repository.open(repo_path), 1)
        worktree = await pool.create("t/made", head)
        seen = []
        for name, base_tree in (("t/again", None), ("t/known", tree)):
            assert worktree is not None
            before = inodes(worktree.path)
            (worktree.path / "src" / "file0001.txt").write_text("changed\n")
            await pool.give_back(worktree)
            worktree = await pool.borrow(name, head, base_tree)
            assert worktree is not None
            content = (worktree.path / "src" / "file0001.txt").read_text()
            seen.append((before, inodes(worktree.path), content))
        pool.close()
        assert pool.recycled == 2
        return seen

    for before, after, content in run(main):
        assert content == git(repo_path, "show", "HEAD:src/file0001.txt") + "\n"
        assert {n for n in before if before[n] != after[n]} <= {"file0001.txt"}
        assert after.keys() == before.keys()


def test_a_slot_that_cannot_be_detached_is_removed_and_no_pool_lends_nothing(
    make_repo: MakeRepo,
) -> None:
    """A slot whose HEAD cannot be written back (a directory in its place, which an agent
    running as the user can make) is removed when given back, lock and all, rather than
    left on its task's branch. A pool of size 0 lends no slot, even one left by a run with a
    pool."""
    from orchestrator.pool import WorktreePool

    repo_path = make_repo()
    head = git(repo_path, "rev-parse", "HEAD")

    async def main() -> tuple[Path, Worktree | None]:
        repo = await Repository.open(repo_path)
        pool = WorktreePool(repo, 2)
        broken, kept = await pool.create("d/broken", head), await pool.create("d/kept", head)
        assert broken is not None and kept is not None
        (broken.admin_dir / "HEAD").unlink()
        (broken.admin_dir / "HEAD").mkdir()
        await pool.give_back(broken)
        await pool.give_back(kept)
        pool.close()
        return broken.path, await WorktreePool(repo, 0).borrow("d/none", head)

    broken, lent = run(main)
    assert not broken.exists() and not broken.with_name(broken.name + ".mutex").exists()
    assert lent is None and len(dirs_in(pool_root(repo_path))) == 1


def test_a_borrow_refuses_a_slot_pointed_at_another_and_an_existing_branch(
    make_repo: MakeRepo,
) -> None:
    """A slot whose ``.git`` names another slot's admin entry is let go of, not lent (the
    other slot untouched); a branch that exists already is the caller's error, with the
    branch left as it was and the slot lent next time; a sparse borrower gets its set."""
    from orchestrator.errors import GitError
    from orchestrator.pool import WorktreePool
    from orchestrator.recycle import private_index

    repo_path = make_repo(extra={"docs/a.md": "a\n"})
    head = git(repo_path, "rev-parse", "HEAD")
    git(repo_path, "branch", "b/taken", head)

    async def main() -> None:
        pool = WorktreePool(await Repository.open(repo_path), 2)
        one, two = await pool.create("b/one", head), await pool.create("b/two", head)
        assert one is not None and two is not None
        first = min(one, two, key=lambda w: w.path)  # the one a borrower looks at first
        other = two if first is one else one
        await pool.give_back(first)
        (first.path / ".git").write_text(f"gitdir: {other.admin_dir}\n")
        other_head = (other.admin_dir / "HEAD").read_text()
        assert await pool.borrow("b/three", head) is None
        assert (other.admin_dir / "HEAD").read_text() == other_head
        probe = Slots(pool_root(repo_path), 2)
        assert probe.take_free() == first.path  # let go of
        probe.release(first.path)
        (first.path / ".git").write_text(f"gitdir: {first.admin_dir}\n")
        with pytest.raises(GitError):
            await pool.borrow("b/taken", head)
        assert git(repo_path, "rev-parse", "b/taken") == head
        sparse = await pool.borrow("b/sparse", head, sparse=("docs",))
        assert sparse is not None and sparse.path == first.path and sparse.sparse == ("docs",)
        assert (sparse.path / "docs" / "a.md").is_file() and not (sparse.path / "src").exists()
        assert git(sparse.path, "symbolic-ref", "HEAD") == "refs/heads/b/sparse"
        await pool.give_back(sparse)
        # A slot that cannot be made pristine (its private index a directory): it goes, and
        # so does the branch made for it, so that the task can start in a fresh worktree.
        private_index(sparse.path).unlink()
        private_index(sparse.path).mkdir()
        assert await pool.borrow("b/unmade", head) is None
        assert git(repo_path, "branch", "--list", "b/unmade") == ""
        assert not sparse.path.exists()
        pool.close()

    run(main)
