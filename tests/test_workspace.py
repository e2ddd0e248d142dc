"""The plan's ``hooks``, ``copy`` and ``ports`` (orchestrator/workspace.py), end to end: real
git repositories, real hook processes, real pool slots, and reports that verify (and that fail
to, once tampered with)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import CopiedFile, Hooks, Ports
from orchestrator import PlanError, SettingsError, orchestrate_parallel, verify_report
from orchestrator.plan import load_plan, validate_plan_data
from orchestrator.settings import resolve_settings
from orchestrator.workspace import (
    PortSlots,
    copy_into,
    hook_step,
    missing_copies,
    slot_env,
    unchanged_copies,
)

from .conftest import MakeRepo, cli, git, live_processes_with

#: An agent that notes that it ran (in the hooks' log), and does what its inputs say.
AGENT = """
import json, os, pathlib, sys, time
envelope = json.load(open(os.environ["ORCHESTRATOR_ENVELOPE"]))
inputs = envelope["inputs"]
with open(inputs["log"], "a") as f:
    f.write(f"agent {envelope['task_id']} {os.getcwd()}\\n")
time.sleep(inputs.get("sleep", 0))
for name, text in inputs.get("write", {}).items():
    pathlib.Path(name).write_text(text)
seen = {name: os.path.lexists(name) for name in inputs.get("look", [])}
env = pathlib.Path(".env").read_text() if os.path.exists(".env") else None
json.dump({"seen": seen, "env": env}, open(os.environ["ORCHESTRATOR_OUTPUT"], "w"))
"""

HOOKS = ("after_create", "before_run", "after_run", "before_remove")


def noting(log: Path, name: str) -> str:
    """A hook that appends its name, placeholders, cwd and port block to *log*."""
    fields = "{task_id} {worktree} {repo_root} {plan_dir} $(pwd -P)"
    return f"echo {name} {fields} $ORCHESTRATOR_SLOT:$ORCHESTRATOR_PORT_BASE >> {log}"


def write_plan(tmp_path: Path, repo: Path, *tasks: dict[str, Any], **top: Any) -> Path:
    """A plan file in *tmp_path* (its ``{plan_dir}``) running AGENT on *repo*."""
    agent = tmp_path / "agent.py"
    agent.write_text(AGENT)
    log = tmp_path / "hooks.log"
    plan = {
        "repo": str(repo),
        "agents": {"coder": {"command": [sys.executable, str(agent)]}},
        "defaults": {"venv": False},
        **top,
        "tasks": [
            {
                "agent": "coder",
                "task": "work",
                **task,
                "inputs": {"log": str(log), **task.get("inputs", {})},
            }
            for task in tasks
        ],
    }
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps(plan))
    return path


def run(path: Path) -> Any:
    return anyio.run(lambda: orchestrate_parallel(load_plan(path)))


def verified(report: Any) -> Any:
    return anyio.run(verify_report, Path(report.run_dir) / "report.json")


def log_lines(tmp_path: Path) -> list[list[str]]:
    return [line.split() for line in (tmp_path / "hooks.log").read_text().splitlines()]


def test_each_hook_runs_when_it_should_in_the_worktree(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = make_repo()
    hooks = {name: noting(tmp_path / "hooks.log", name) for name in HOOKS}
    ports = {"base": 30000, "per_task": 5}
    report = run(write_plan(tmp_path, repo, {"id": "t1"}, hooks=hooks, ports=ports))
    result = report.results[0]
    assert result.status == "succeeded", result.error
    lines = log_lines(tmp_path)
    assert [line[0] for line in lines] == [
        "after_create",
        "before_run",
        "agent",
        "after_run",
        "before_remove",
    ]
    worktree = os.path.realpath(lines[0][2])
    assert lines[2][2] == worktree  # the agent's cwd: the same worktree
    for name, task_id, *paths, block in (line for line in lines if line[0] != "agent"):
        real = [os.path.realpath(p) for p in paths]
        expected = [worktree, os.path.realpath(repo), os.path.realpath(tmp_path), worktree]
        assert (task_id, real, block) == ("t1", expected, "0:30000"), name
    assert [(h.name, h.phase, h.turn, h.passed, h.required) for h in result.hooks] == [
        ("after_create", "hook", 1, True, True),
        ("before_run", "hook", 1, True, True),
        ("after_run", "hook", 1, True, False),
        ("before_remove", "hook", 1, True, False),
    ]
    assert result.hooks[0].stdout.path == "logs/t1.hook-after_create.1.stdout"
    assert result.timings.hooks_s is not None
    assert report.warnings == []
    assert verified(report).ok


def test_after_run_and_before_remove_run_when_the_run_is_cancelled(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    hooks = {name: noting(tmp_path / "hooks.log", name) for name in HOOKS}
    path = write_plan(tmp_path, repo, {"id": "t1", "inputs": {"sleep": 60}}, hooks=hooks)

    async def main() -> None:
        with anyio.move_on_after(60) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(orchestrate_parallel, load_plan(path))
                for _ in range(1200):  # until the agent runs
                    if "agent" in _read(tmp_path / "hooks.log"):
                        break
                    await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
        assert not scope.cancelled_caught

    anyio.run(main)
    assert [line[0] for line in log_lines(tmp_path)] == [
        "after_create",
        "before_run",
        "agent",
        "after_run",
        "before_remove",
    ]


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_a_failing_after_create_fails_the_task_before_its_agent(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    log = tmp_path / "hooks.log"
    hooks = {
        "after_create": "echo no env here >&2; exit 3",
        "before_remove": noting(log, "before_remove"),
    }
    report = run(write_plan(tmp_path, repo, {"id": "t1"}, hooks=hooks))
    result = report.results[0]
    assert result.status == "failed"
    assert result.error.kind == "hook"
    assert result.error.message == "hook after_create failed with exit code 3: no env here"
    assert result.attempts == 0 and not log.exists()  # no agent; the worktree is kept
    assert result.worktree is not None
    assert verified(report).ok


def test_a_failing_before_run_fails_each_attempt_and_is_retried(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    log = tmp_path / "hooks.log"
    hooks = {"before_run": "exit 5", "after_run": noting(log, "after_run")}
    path = write_plan(
        tmp_path, repo, {"id": "t1", "retries": 1}, hooks=hooks, keep_worktrees="never"
    )
    result = run(path).results[0]
    assert result.status == "failed"
    assert result.error.kind == "hook"
    assert result.error.message == "hook before_run failed with exit code 5"
    assert [a.error.kind for a in result.attempt_log] == ["hook", "hook"]
    assert [(h.name, h.turn) for h in result.hooks] == [("before_run", 1), ("before_run", 2)]
    assert not log.exists()  # neither the agent nor after_run: the turn never began


def test_failing_after_run_and_before_remove_are_warnings(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    hooks = {"after_run": "exit 4", "before_remove": "echo stuck >&2; exit 6"}
    report = run(write_plan(tmp_path, repo, {"id": "t1"}, hooks=hooks))
    result = report.results[0]
    assert result.status == "succeeded", result.error
    assert [(h.name, h.exit_code, h.passed) for h in result.hooks] == [
        ("after_run", 4, False),
        ("before_remove", 6, False),
    ]
    assert report.warnings == [
        "task t1: hook after_run failed with exit code 4 (ignored)",
        "task t1: hook before_remove failed with exit code 6 (ignored)",
    ]
    assert verified(report).ok


def test_a_hook_that_runs_too_long_is_ended(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = make_repo()
    marker = f"hook-timeout-{uuid.uuid4().hex}"
    hooks = {"before_run": "echo waiting; sleep 300 & sleep 300", "timeout": 1}
    path = write_plan(tmp_path, repo, {"id": "t1", "env": {"MARK": marker}}, hooks=hooks)
    result = run(path).results[0]
    assert result.status == "failed"
    assert result.error.message == "hook before_run timed out: waiting"
    assert result.hooks[0].timed_out and result.hooks[0].duration_s < 30
    assert live_processes_with(marker) == []


def test_after_create_and_copy_run_on_a_borrowed_pool_slot(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo(extra={".gitignore": ".env\n"})
    (repo / ".env").write_text("TOKEN=abc\n")
    hooks = {"after_create": noting(tmp_path / "hooks.log", "after_create")}
    path = write_plan(tmp_path, repo, {"id": "t1"}, hooks=hooks, copy=[".env"])
    first, second = run(path), run(path)
    created = [line for line in log_lines(tmp_path) if line[0] == "after_create"]
    assert len(created) == 2
    slot = created[0][2]
    assert created[1][2] == slot  # the second run borrowed the first one's worktree
    assert "/.git/orchestrator/pool/" in slot
    for report in (first, second):
        result = report.results[0]
        assert result.status == "succeeded", result.error
        assert result.output["env"] == "TOKEN=abc\n"  # copied again after the pool's reset
        assert verified(report).ok


def test_copy_lands_in_the_worktree_and_is_committed_only_when_changed(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo(extra={".gitignore": ".env\n", "tracked.txt": "from git\n"})
    (repo / ".env").write_text("TOKEN=abc\n")
    config = repo / "config"
    (config / "sub").mkdir(parents=True)
    (config / "local.yaml").write_text("port: 1\n")
    (config / "sub" / "deep.txt").write_text("deep\n")
    (config / "sub" / "run.sh").write_text("#!/bin/sh\n")
    (config / "sub" / "run.sh").chmod(0o755)
    (config / "inside").symlink_to("local.yaml")
    (config / "absolute").symlink_to(tmp_path / "outside.txt")
    (config / "escaping").symlink_to("../../outside.txt")
    (tmp_path / "outside.txt").write_text("outside\n")
    (repo / "notes.txt").write_text("untracked notes\n")
    task = {
        "id": "t1",
        "inputs": {
            "write": {"notes.txt": "changed by the agent\n", ".env": "TOKEN=changed\n"},
            "look": ["config/inside", "config/absolute", "config/escaping"],
        },
    }
    copy = [".env", "config", "notes.txt", "missing.txt", "tracked.txt"]
    result = run(write_plan(tmp_path, repo, task, copy=copy)).results[0]
    assert result.status == "succeeded", result.error
    assert result.output["seen"] == {
        "config/inside": True,  # a link inside the repository: copied as a link
        "config/absolute": False,  # pointing out of it: skipped
        "config/escaping": False,
    }
    copied = {c.path: c for c in result.provenance.copied}
    assert sorted(copied) == [
        ".env",
        "config/inside",
        "config/local.yaml",
        "config/sub/deep.txt",
        "config/sub/run.sh",
        "notes.txt",
    ]
    assert copied[".env"].sha256 == hashlib.sha256(b"TOKEN=abc\n").hexdigest()
    assert copied["config/inside"].symlink and copied["config/inside"].size == len("local.yaml")
    committed = git(repo, "ls-tree", "-r", "--name-only", result.provenance.result_commit)
    assert committed.split() == [".gitignore", "notes.txt", *_src(), "tracked.txt"]
    show = f"{result.provenance.result_commit}:notes.txt"
    assert git(repo, "show", show) == "changed by the agent"
    assert (repo / "notes.txt").read_text() == "untracked notes\n"  # the main checkout's stays


def _src() -> list[str]:
    return [f"src/file{i:04d}.txt" for i in range(3)]


def test_copy_into_keeps_modes_never_overwrites_nor_goes_beyond_links(tmp_path: Path) -> None:
    source, target = tmp_path / "main", tmp_path / "worktree"
    (source / "d").mkdir(parents=True)
    (source / "d" / "tool").write_text("#!/bin/sh\n")
    (source / "d" / "tool").chmod(0o750)
    (source / "d" / "kept").write_text("main's\n")
    (source / "beyond").symlink_to(source / "d")
    (target / "d").mkdir(parents=True)
    (target / "d" / "kept").write_text("the checkout's\n")
    (target / "linked").symlink_to(tmp_path)
    (source / "linked").mkdir()
    (source / "linked" / "x").write_text("x\n")
    os.mkfifo(source / "d" / "fifo")
    copied = copy_into(source, target, ["d", "beyond/tool", "linked/x", "linked"])
    assert [c.path for c in copied] == ["d/tool"]
    assert (target / "d" / "tool").stat().st_mode & 0o777 == 0o750
    assert (target / "d" / "kept").read_text() == "the checkout's\n"
    assert not (tmp_path / "x").exists()  # nothing written through the worktree's link
    assert not (target / "d" / "fifo").exists()
    assert unchanged_copies(target, copied, {"d/tool"}) == {"d/tool"}
    (target / "d" / "tool").write_text("changed\n")
    assert unchanged_copies(target, copied, {"d/tool"}) == set()
    link = CopiedFile(path="l", sha256=hashlib.sha256(b"d").hexdigest(), size=1, symlink=True)
    (target / "l").symlink_to("d")
    assert unchanged_copies(target, [link], {"l"}) == {"l"}
    assert missing_copies(source, ["d", "nope", "beyond/tool"]) == [
        f"copy: nope does not exist in {source}",
        f"copy: beyond/tool is beyond a symbolic link in {source}: not copied",
    ]


def test_validate_warns_of_a_missing_copy_path(
    make_repo: MakeRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = make_repo()
    path = write_plan(tmp_path, repo, {"id": "t1"}, copy=[".env"])
    outcome = cli(capsys, "validate", str(path))
    assert outcome.code == 0
    assert f"warning: copy: .env does not exist in {repo}" in outcome.err


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ({"copy": ["../x"]}, "copy[0]: path '../x' leaves its directory"),
        ({"copy": ["/etc/passwd"]}, "copy[0]: path '/etc/passwd' is absolute"),
        ({"hooks": {"before_run": "x {nope}"}}, "hooks.before_run: unknown placeholder {nope}"),
        ({"hooks": {"timeout": 0}}, "hooks.timeout: must be > 0"),
        (
            {"ports": {"base": 65000, "per_task": 100}, "concurrency": 8},
            "ports: base 65000 + concurrency 8 x per_task 100 = 65800, past the last port",
        ),
    ],
)
def test_bad_hooks_copy_and_ports_are_plan_errors(
    tmp_path: Path, top: dict[str, Any], message: str
) -> None:
    data = {"agents": {"a": {"command": ["x"]}}, "tasks": [{"agent": "a", "task": "t"}], **top}
    with pytest.raises(PlanError) as caught:
        validate_plan_data(data, plan_dir=tmp_path)
    assert any(str(issue).startswith(message) for issue in caught.value.issues), str(caught.value)


def test_a_concurrency_past_the_ports_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="ports: base 60000 \\+ concurrency 1000") as caught:
        resolve_settings(None, {"ports": {"base": 60000}, "concurrency": 1000})
    assert caught.value.name == "concurrency"
    settings = resolve_settings(None, {"ports": Ports(base=60000), "concurrency": 553})
    assert settings.ports == Ports(base=60000, per_task=10)


def test_slots_and_hook_steps() -> None:
    assert slot_env(None, Ports(base=20000)) == {}
    assert slot_env(3, None) == {"ORCHESTRATOR_SLOT": "3"}
    assert slot_env(3, Ports(base=20000, per_task=5)) == {
        "ORCHESTRATOR_SLOT": "3",
        "ORCHESTRATOR_PORT_BASE": "20015",
    }
    hooks = Hooks(after_run=["make", "stop"], timeout=5)
    assert hook_step(hooks, "before_run") is None
    step = hook_step(hooks, "after_run")
    assert step is not None and (step.name, step.timeout, step.required) == ("after_run", 5, False)

    async def main() -> list[int]:
        slots = PortSlots(2)
        a, b = await slots.take(), await slots.take()
        taken: list[int] = []

        async def third() -> None:
            taken.append(await slots.take())

        async with anyio.create_task_group() as tg:
            tg.start_soon(third)
            await anyio.wait_all_tasks_blocked()
            assert taken == []  # both slots are held: it waits
            slots.give_back(b)
        slots.give_back(a)
        return [a, b, *taken, await slots.take()]

    assert anyio.run(main) == [0, 1, 1, 0]


PORTS_AGENT = """
import json, os, time
start = time.time()
time.sleep(0.05)
json.dump(
    {
        "slot": int(os.environ["ORCHESTRATOR_SLOT"]),
        "port_base": int(os.environ["ORCHESTRATOR_PORT_BASE"]),
        "start": start,
        "end": time.time(),
    },
    open(os.environ["ORCHESTRATOR_OUTPUT"], "w"),
)
"""


def test_tasks_running_at_once_never_share_a_port_block(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    agent = tmp_path / "ports.py"
    agent.write_text(PORTS_AGENT)
    plan = {
        "concurrency": 8,
        "ports": {"base": 20000, "per_task": 10},
        "agents": {"a": {"command": [sys.executable, str(agent)]}},
        "defaults": {"venv": False, "worktree": False},
        "tasks": [{"id": f"t{i:02d}", "agent": "a", "task": "listen"} for i in range(64)],
    }
    report = anyio.run(lambda: orchestrate_parallel(plan, repo=repo))
    assert all(r.status == "succeeded" for r in report.results)
    outputs = [r.output or {} for r in report.results]
    assert {o["slot"] for o in outputs} <= set(range(8))
    assert all(o["port_base"] == 20000 + 10 * o["slot"] for o in outputs)
    overlapping = 0
    for a, b in itertools.combinations(outputs, 2):
        if a["start"] < b["end"] and b["start"] < a["end"]:
            overlapping += 1
            assert a["slot"] != b["slot"], (a, b)
    assert overlapping > 8  # they did run at the same time


def test_verify_catches_a_changed_hook_record_and_a_deleted_hook_log(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    report = run(write_plan(tmp_path, repo, {"id": "t1"}, hooks={"before_run": "exit 2"}))
    assert report.results[0].error.kind == "hook"
    path = Path(report.run_dir) / "report.json"
    data = json.loads(path.read_text())
    data["results"][0]["hooks"][0]["exit_code"] = 0
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(data))
    fields = {f.field for f in anyio.run(verify_report, tampered).findings}
    assert "provenance.result_sha256" in fields  # the result's seal
    assert "hooks[0].passed" in fields  # exit code 0, yet not passed
    data["results"][0]["hooks"][0]["passed"] = True
    tampered.write_text(json.dumps(data))
    fields = {f.field for f in anyio.run(verify_report, tampered).findings}
    assert "error" in fields  # kind hook, yet every required hook passed
    (Path(report.run_dir) / report.results[0].hooks[0].stderr.path).unlink()
    outcome = anyio.run(verify_report, path)
    assert [f.field for f in outcome.findings] == ["hooks[0].stderr"]
