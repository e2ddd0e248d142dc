"""Sparse worktrees (``sparse:``; orchestrator/sparse.py), on real repositories.

What a task sees is compared with what git's own cone mode would check out; what it commits
with the whole tree it started from; a pool slot is lent across sparse sets and full
worktrees and must hold exactly each borrower's set. The attacks: a file left at a tracked
path the cone skips (neither ``diff-files`` nor ``ls-files -o`` reports one), a widened cone,
links out of the worktree, and bad paths in a plan.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import Plan, Report
from orchestrator import orchestrate_parallel
from orchestrator.errors import PlanError
from orchestrator.plan import envelopes_of, validate_plan_data
from orchestrator.sparse import agent_git_config, cone_patterns, remove_outside_cone, write_patterns

from .conftest import MakeRepo, cli, git
from .test_sandbox import needs_bwrap
from .test_security_reports import reseal

# The files of the layout below: top-level files, directories at two depths.
LAYOUT = {
    "README.md": "readme\n",
    "setup.cfg": "cfg\n",
    "a/top.txt": "a top\n",
    "a/b/one.txt": "one\n",
    "a/b/deep/two.txt": "two\n",
    "a/c/three.txt": "three\n",
    "d/four.txt": "four\n",
    "e/f/five.txt": "five\n",
}


def layout_repo(make_repo: MakeRepo) -> Path:
    return make_repo(files=0, extra=LAYOUT)


def in_cone(path: str, sparse: list[str] | None) -> bool:
    """Whether cone mode checks out *path* for the directories *sparse*."""
    if sparse is None:
        return True
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent == "":
        return True
    if any(path.startswith(d + "/") for d in sparse):
        return True
    # Files directly in an ancestor of a named directory.
    return any(d == parent or d.startswith(parent + "/") for d in sparse)


def files_of(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if rel != ".git":
                out[rel] = path.read_text() if not path.is_symlink() else "->link"
    return out


def test_the_cone_patterns_are_gits_own(tmp_path: Path, make_repo: MakeRepo) -> None:
    repo = layout_repo(make_repo)
    sparse = ["a/b", "e/f", "a/b/deep", "d"]
    git(repo, "sparse-checkout", "set", "--cone", *sparse)
    written = (repo / ".git" / "info" / "sparse-checkout").read_text()
    assert sorted(cone_patterns(sparse).splitlines()) == sorted(written.splitlines())
    # ... and the files git checked out with them are those in_cone says.
    expected = {p for p in LAYOUT if in_cone(p, sparse)}
    assert set(files_of(repo)) == expected


def test_remove_outside_cone_keeps_the_cone_and_never_follows_a_link(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    for d in ("a/b/deep", "a/c", "a/x", "d", "stray/deeper", "outside-link-target"):
        (root / d).mkdir(parents=True, exist_ok=True)
    outside.mkdir()
    (outside / "keep").write_text("keep\n")
    (root / "a/c/skipped.txt").write_text("a file at a path the cone skips\n")
    (root / "linked").symlink_to(outside)
    (root / "a/link").symlink_to(outside)
    (root / "top.txt").write_text("top\n")
    removed = remove_outside_cone(root, ["a/b", "d"])
    assert removed == ["a/c", "a/x", "outside-link-target", "stray"]
    assert (root / "a/b/deep").is_dir() and (root / "d").is_dir() and (root / "top.txt").is_file()
    assert (root / "linked").is_symlink() and (root / "a/link").is_symlink()  # git's to report
    assert (outside / "keep").read_text() == "keep\n"
    assert remove_outside_cone(root, None) == []


def test_the_agent_gets_the_two_settings_after_any_it_has() -> None:
    assert agent_git_config({}, None) == {}
    assert agent_git_config({"GIT_CONFIG_COUNT": "1"}, ("a",)) == {
        "GIT_CONFIG_COUNT": "3",
        "GIT_CONFIG_KEY_1": "core.sparseCheckout",
        "GIT_CONFIG_VALUE_1": "true",
        "GIT_CONFIG_KEY_2": "core.sparseCheckoutCone",
        "GIT_CONFIG_VALUE_2": "true",
    }
    assert agent_git_config({"GIT_CONFIG_COUNT": "x"}, ("a",))["GIT_CONFIG_COUNT"] == "2"


# Records what the task sees (files, git's status and its idea of the cone), then leaves a
# mess: a file inside the cone changed, one added outside it (a new directory), a file put
# at a tracked path the cone skips, a stray directory, and a widened cone in its admin dir.
SNOOP = """
import json, os, pathlib, subprocess

root = pathlib.Path.cwd()
files = {}
for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d != ".git"]
    for name in filenames:
        rel = pathlib.Path(dirpath, name).relative_to(root).as_posix()
        if rel != ".git":
            files[rel] = pathlib.Path(dirpath, name).read_text()
def run(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True).stdout
seen = {
    "files": files,
    "status": run("status", "--porcelain", "--ignored", "--untracked-files=all"),
    "cone": run("sparse-checkout", "list").split(),
}
if os.environ.get("MESS"):
    task = os.environ["ORCHESTRATOR_TASK_ID"]
    pathlib.Path("README.md").write_text("readme by " + task + "\\n")
    pathlib.Path("new-dir").mkdir(exist_ok=True)
    pathlib.Path("new-dir/made.txt").write_text(task + "\\n")
    pathlib.Path("d").mkdir(exist_ok=True)
    pathlib.Path("d/four.txt").write_text("four, written where the cone skips\\n")
    pathlib.Path("stray/deeper").mkdir(parents=True, exist_ok=True)
    pathlib.Path("stray/deeper/x.bin").write_text("x")
    admin = pathlib.Path(pathlib.Path(".git").read_text().strip().removeprefix("gitdir: "))
    (admin / "info").mkdir(exist_ok=True)
    (admin / "info" / "sparse-checkout").write_text("/*\\n")
pathlib.Path(os.environ["ORCHESTRATOR_OUTPUT"]).write_text(json.dumps(seen))
"""


def plan_of(agent: Path, tasks: list[dict[str, Any]], **top: Any) -> Plan:
    return Plan.model_validate(
        {
            "agents": {"s": {"command": [sys.executable, str(agent)]}},
            "tasks": [{"agent": "s", "task": "t", "venv": False, **t} for t in tasks],
            **top,
        }
    )


def orchestrate(plan: Plan, repo: Path, **options: Any) -> Report:
    report: Report = anyio.run(lambda: orchestrate_parallel(plan, repo=repo, **options))
    return report


@pytest.mark.parametrize("sandbox", ["none", pytest.param("bwrap", marks=needs_bwrap)])
def test_a_sparse_task_sees_its_cone_and_commits_on_the_whole_tree(
    make_repo: MakeRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str], sandbox: str
) -> None:
    repo = layout_repo(make_repo)
    base = git(repo, "rev-parse", "HEAD")
    agent = tmp_path / "snoop.py"
    agent.write_text(SNOOP)
    plan = plan_of(
        agent,
        [{"id": "t", "env": {"MESS": "1"}, "sandbox": sandbox}],
        defaults={"sparse": ["a/b", "e/f/"]},
    )
    report = orchestrate(plan, repo, pool=0)
    [result] = report.results
    assert result.status == "succeeded", result.error
    seen = result.output
    assert seen is not None
    assert set(seen["files"]) == {p for p in LAYOUT if in_cone(p, ["a/b", "e/f"])}
    assert seen["status"] == ""
    assert seen["cone"] == ["a/b", "e/f"]  # the agent's git knows its worktree is sparse
    assert result.provenance.sparse == ["a/b", "e/f"]
    # The commit holds the whole tree: every skipped file as it was at the base, the change
    # inside the cone, the new directory, and the file written at a skipped path.
    commit = result.provenance.result_commit
    assert commit is not None
    names = set(git(repo, "ls-tree", "-r", "--name-only", commit).splitlines())
    assert names == set(LAYOUT) | {"new-dir/made.txt", "stray/deeper/x.bin"}
    assert git(repo, "show", f"{commit}:README.md") == "readme by t"
    assert git(repo, "show", f"{commit}:d/four.txt") == "four, written where the cone skips"
    for path in ("a/c/three.txt", "a/top.txt", "setup.cfg"):
        assert git(repo, "show", f"{commit}:{path}") == git(repo, "show", f"{base}:{path}")
    report_path = Path(report.run_dir) / "report.json"
    outcome = cli(capsys, "verify", str(report_path))
    assert outcome.code == 0, outcome
    # A report re-sealed to say the worktree held the whole tree does not verify.
    raw = json.loads(report_path.read_text())
    del raw["results"][0]["provenance"]["sparse"]
    report_path.write_bytes(reseal(raw))
    outcome = cli(capsys, "verify", str(report_path))
    assert outcome.code == 1
    assert "provenance.sparse: expected ['a/b', 'e/f'], found None" in outcome.out, outcome
    assert result.envelope is not None
    envelope = json.loads((Path(report.run_dir) / result.envelope.path).read_text())
    assert envelope["sparse"] == ["a/b", "e/f"]


def test_a_pool_slot_holds_exactly_each_borrowers_set(
    make_repo: MakeRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = layout_repo(make_repo)
    agent = tmp_path / "snoop.py"
    agent.write_text(SNOOP)
    sets: list[list[str] | None] = [
        None,
        ["a/b"],
        ["a/b"],
        ["d", "e/f"],
        None,
        ["a"],
        ["a/b"],
    ]
    tasks = [
        {"id": f"t{i}", "env": {"MESS": "1"}, "sparse": s if s is not None else False}
        for i, s in enumerate(sets)
    ]
    plan = plan_of(agent, tasks)
    report = orchestrate(plan, repo, pool=1, concurrency=1)
    assert report.summary.successful == len(sets), report.errors
    slots = {r.worktree for r in report.results}
    assert len(slots) == 1, slots  # one slot, lent seven times
    for result, sparse in zip(report.results, sets, strict=True):
        seen = result.output
        assert seen is not None
        expected = {p: text for p, text in LAYOUT.items() if in_cone(p, sparse)}
        assert seen["files"] == expected, (result.task_id, sparse)
        assert seen["status"] == "", (result.task_id, seen["status"])
        assert result.provenance.sparse == sparse
    outcome = cli(capsys, "verify", str(Path(report.run_dir) / "report.json"))
    assert outcome.code == 0, outcome


@pytest.mark.parametrize(
    ("levels", "expected"),
    [
        ({"defaults": ["a"]}, ["a"]),
        ({"defaults": ["a"], "agent": ["d"]}, ["d"]),
        ({"defaults": ["a"], "agent": ["d"], "task": ["e/f"]}, ["e/f"]),
        ({"defaults": ["a"], "task": False}, None),
        ({"agent": False, "task": ["d", "a/b", "d"]}, ["a/b", "d"]),
        ({"defaults": ["a"], "worktree": False}, None),
    ],
)
def test_sparse_comes_from_the_task_else_its_agent_else_the_plan(
    levels: dict[str, Any], expected: list[str] | None, tmp_path: Path
) -> None:

    agent: dict[str, Any] = {"command": ["x"]}
    task: dict[str, Any] = {"agent": "a", "task": "t"}
    data: dict[str, Any] = {"agents": {"a": agent}, "tasks": [task]}
    if "defaults" in levels:
        data["defaults"] = {"sparse": levels["defaults"]}
    if "agent" in levels:
        agent["sparse"] = levels["agent"]
    if "task" in levels:
        task["sparse"] = levels["task"]
    if "worktree" in levels:
        task["worktree"] = levels["worktree"]
    [envelope] = envelopes_of(validate_plan_data(data, plan_dir=tmp_path).plan)
    assert envelope.sparse == expected
    assert ("sparse" in envelope.to_json_dict()) == (expected is not None)


@pytest.mark.parametrize(
    ("sparse", "message"),
    [
        (["../x"], "tasks[0].sparse: path '../x' leaves its directory"),
        (["/etc"], "tasks[0].sparse: path '/etc' is absolute"),
        (["a/*"], "tasks[0].sparse: path 'a/*' holds '*', which a sparse cone cannot name"),
        (["!a"], "tasks[0].sparse: path '!a' holds '!'"),
        (["a\nb"], "tasks[0].sparse: path 'a\\nb' holds '\\n'"),
        ([".git"], "tasks[0].sparse: path '.git' is git's own directory"),
        ([], "tasks[0].sparse: "),
        ("src", "tasks[0].sparse: "),
        (True, "tasks[0].sparse: "),
    ],
)
def test_a_bad_sparse_is_a_plan_error(sparse: Any, message: str, tmp_path: Path) -> None:
    data = {
        "agents": {"a": {"command": ["x"]}},
        "tasks": [{"agent": "a", "task": "t", "sparse": sparse}],
    }
    with pytest.raises(PlanError) as caught:
        validate_plan_data(data, plan_dir=tmp_path)
    assert any(str(issue).startswith(message) for issue in caught.value.issues), str(caught.value)


def test_validate_names_the_line_of_a_bad_sparse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "agents:\n  a:\n    command: [x]\ntasks:\n  - agent: a\n    task: t\n"
        "    sparse: [src, ../up]\n"
    )
    outcome = cli(capsys, "validate", str(plan))
    assert outcome.code != 0
    lines = [line for line in outcome.err.splitlines() if "sparse" in line]
    assert lines and "../up" in lines[0] and ":7:" in lines[0], outcome.err
    assert "Traceback" not in outcome.err


def test_a_sparse_retry_starts_from_its_cone_again(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = layout_repo(make_repo)
    agent = tmp_path / "retry.py"
    agent.write_text(
        "import os, pathlib, sys\n"
        "if os.environ['ORCHESTRATOR_ATTEMPT'] == '1':\n"
        "    pathlib.Path('d').mkdir()\n"
        "    pathlib.Path('d/four.txt').write_text('left by attempt 1\\n')\n"
        "    pathlib.Path('a/b/one.txt').write_text('changed by attempt 1\\n')\n"
        "    sys.exit(1)\n"
        "seen = sorted(str(p) for p in pathlib.Path('.').rglob('*') if '.git' not in p.parts)\n"
        "text = pathlib.Path('a/b/one.txt').read_text()\n"
        "import json\n"
        "pathlib.Path(os.environ['ORCHESTRATOR_OUTPUT']).write_text("
        "json.dumps({'seen': seen, 'one': text}))\n"
    )
    for pool in (0, 1):
        plan = plan_of(agent, [{"id": f"p{pool}", "retries": 1, "sparse": ["a/b"]}])
        [result] = orchestrate(plan, repo, pool=pool).results
        assert result.status == "succeeded", result.error
        assert result.output is not None
        assert "d" not in result.output["seen"] and "d/four.txt" not in result.output["seen"]
        assert result.output["one"] == "one\n"


@pytest.mark.parametrize("sparse", [["src"], None])
def test_cone_patterns_an_agent_made_a_directory_are_put_back(
    tmp_path: Path, sparse: list[str] | None
) -> None:
    """A directory where the worktree's cone patterns go (info/sparse-checkout) is removed:
    the orchestrator's patterns are written (or, for a full worktree, none is left)."""
    target = tmp_path / "info" / "sparse-checkout"
    (target / "deep").mkdir(parents=True)
    (target / "deep" / "file").write_text("/*\n")
    write_patterns(tmp_path, sparse)
    if sparse is None:
        assert not os.path.lexists(target)
    else:
        assert target.read_text() == cone_patterns(sparse)


@pytest.mark.parametrize("sparse", [["src"], None])
def test_cone_patterns_through_a_planted_link_touch_nothing_it_leads_to(
    tmp_path: Path, sparse: list[str] | None
) -> None:
    """The admin directory's ``info`` made a link to elsewhere: the link goes, never what
    it leads to (its ``sparse-checkout`` directory and files stay)."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sparse-checkout" / "deep").mkdir(parents=True)
    (elsewhere / "sparse-checkout" / "deep" / "file").write_text("precious\n")
    admin = tmp_path / "admin"
    admin.mkdir()
    (admin / "info").symlink_to(elsewhere)
    write_patterns(admin, sparse)
    assert (elsewhere / "sparse-checkout" / "deep" / "file").read_text() == "precious\n"
    assert not (admin / "info").is_symlink()
    if sparse is not None:
        assert (admin / "info" / "sparse-checkout").read_text() == cone_patterns(sparse)
