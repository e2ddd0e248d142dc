"""What a task ran from, by content: the plan's scripts its commands name and its agent's
program, hashed into ``provenance.inputs`` once per run, never through a link out of the
plan's directory."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest

from orchestrator import inputs, orchestrate_parallel, verify_report
from orchestrator.plan import load_plan

from .conftest import MakeRepo

AGENT = """
import json, os
json.dump({}, open(os.environ["ORCHESTRATOR_OUTPUT"], "w"))
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plan(plan_dir: Path, tasks: list[dict[str, Any]], **agent: Any) -> Path:
    """A plan file in *plan_dir*, with its agent script beside it."""
    (plan_dir / "agent.py").write_text(AGENT)
    path = plan_dir / "plan.json"
    path.write_text(
        json.dumps(
            {
                "agents": {
                    "coder": {"command": [sys.executable, "{plan_dir}/agent.py"], **agent},
                },
                "defaults": {"venv": False},
                "tasks": [{"agent": "coder", "task": "t", **t} for t in tasks],
            }
        )
    )
    return path


def _run(repo: Path, plan: Path, plan_dir: Path) -> Any:
    assert plan.parent == plan_dir
    return anyio.run(lambda: orchestrate_parallel(load_plan(plan), repo=repo))


def test_the_plans_scripts_and_the_program_are_recorded_by_content(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    plan_dir = tmp_path / "plan"
    (plan_dir / "tools").mkdir(parents=True)
    (plan_dir / "tools" / "a.txt").write_text("a\n")
    (plan_dir / "tools" / "b.txt").write_text("b\n")
    (plan_dir / "check.sh").write_text("exit 0\n")
    plan = _plan(
        plan_dir,
        [
            {
                "id": "uses-all",
                "inputs": {"data": "{plan_dir}/tools"},
                "checks": [{"name": "c", "run": "sh {plan_dir}/check.sh"}],
            }
        ],
    )
    report = _run(make_repo(), plan, plan_dir)
    result = report.results[0]
    assert result.status == "succeeded", result.error
    recorded = {(i.kind, i.path): i.sha256 for i in result.provenance.inputs}
    assert recorded == {
        ("plan", "agent.py"): _sha(plan_dir / "agent.py"),
        ("plan", "check.sh"): _sha(plan_dir / "check.sh"),
        ("plan", "tools/a.txt"): _sha(plan_dir / "tools" / "a.txt"),
        ("plan", "tools/b.txt"): _sha(plan_dir / "tools" / "b.txt"),
        ("program", os.path.realpath(sys.executable)): _sha(Path(os.path.realpath(sys.executable))),
    }
    assert anyio.run(verify_report, Path(report.run_dir) / "report.json").ok


def test_a_link_out_of_the_plans_directory_is_not_followed(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("not the plan's\n")
    (plan_dir / "link.txt").symlink_to(secret)
    (plan_dir / "missing-too.txt").symlink_to(tmp_path / "nowhere")
    plan = _plan(
        plan_dir, [{"id": "t", "inputs": {"x": "{plan_dir}/link.txt {plan_dir}/missing-too.txt"}}]
    )
    report = _run(make_repo(), plan, plan_dir)
    paths = [i.path for i in report.results[0].provenance.inputs]
    assert "link.txt" not in paths and "missing-too.txt" not in paths
    assert "agent.py" in paths


def test_each_file_is_hashed_once_per_run(
    make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    hashed: list[str] = []
    real = inputs.hash_file

    def counting(path: Any, limit: int, *, within: Path | None = None) -> tuple[str, int]:
        hashed.append(str(path))
        return real(path, limit, within=within)

    monkeypatch.setattr(inputs, "hash_file", counting)
    plan = _plan(plan_dir, [{"id": f"t{i}"} for i in range(6)])
    report = _run(make_repo(), plan, plan_dir)
    assert all(r.status == "succeeded" for r in report.results)
    # The script and the interpreter, once each, for six tasks.
    assert sorted(hashed) == sorted(["agent.py", os.path.realpath(sys.executable)])
    digests = {tuple((i.path, i.sha256) for i in r.provenance.inputs) for r in report.results}
    assert len(digests) == 1


def test_a_file_larger_than_the_cap_is_left_out(
    make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inputs, "MAX_INPUT_BYTES", 64)
    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    (plan_dir / "big.txt").write_text("x" * 65)
    (plan_dir / "small.txt").write_text("x" * 64)
    plan = _plan(
        plan_dir, [{"id": "t", "inputs": {"f": "{plan_dir}/big.txt {plan_dir}/small.txt"}}]
    )
    report = _run(make_repo(), plan, plan_dir)
    paths = {i.path for i in report.results[0].provenance.inputs}
    assert "small.txt" in paths and "big.txt" not in paths


def test_a_script_the_agent_rewrites_is_recorded_as_it_ran(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    path = _plan(plan_dir, [{"id": "t"}])
    script = plan_dir / "agent.py"
    script.write_text(AGENT + f"\nopen({str(script)!r}, 'a').write('# changed by the agent\\n')\n")
    before = _sha(script)
    report = _run(make_repo(), path, plan_dir)
    assert report.results[0].status == "succeeded", report.results[0].error
    assert _sha(script) != before  # the agent did change it
    recorded = {i.path: i.sha256 for i in report.results[0].provenance.inputs}
    assert recorded["agent.py"] == before


def test_a_directory_reached_through_a_link_is_not_walked(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "secret.txt").write_text("not the plan's\n")
    (plan_dir / "link").symlink_to(outside)
    path = _plan(plan_dir, [{"id": "t", "inputs": {"d": "{plan_dir}/link/deep"}}])
    report = _run(make_repo(), path, plan_dir)
    assert [i.path for i in report.results[0].provenance.inputs if i.kind == "plan"] == ["agent.py"]


def test_a_file_asked_for_while_it_is_being_hashed_is_hashed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two tasks starting side by side ask for the same program: the second waits for the
    first one's digest instead of hashing the file again (a race the per-run test lost at
    times on a loaded machine)."""
    import threading
    from types import SimpleNamespace

    release = threading.Event()
    hashed: list[str] = []
    real = inputs.hash_file

    def slow(path: Any, limit: int, *, within: Path | None = None) -> tuple[str, int]:
        hashed.append(str(path))
        anyio.from_thread.run_sync(started.set)
        release.wait(30)
        return real(path, limit, within=within)

    monkeypatch.setattr(inputs, "hash_file", slow)
    program = os.path.realpath(sys.executable)
    ctx = SimpleNamespace(input_files={}, inputs_hashing={}, plan_dir=tmp_path)
    got: list[Any] = []
    started: Any = None

    async def ask() -> None:
        got.append(await inputs.program_input(ctx, program))  # type: ignore[arg-type]

    async def main() -> None:
        nonlocal started
        started = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            await started.wait()  # the first is hashing
            tg.start_soon(ask)
            await anyio.wait_all_tasks_blocked()
            release.set()

    anyio.run(main)
    assert hashed == [program]
    assert len(got) == 2 and got[0] == got[1] and got[0][0].path == program
    assert ctx.inputs_hashing == {}
