"""The ``preset`` kind end to end: a plan naming a coding agent's preset, a fake of that CLI on
PATH printing the agent's documented output, and what the run makes of it: the prompt given,
the files committed, usage and cost, error kinds, retries, provenance that verifies."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import Plan, load_report_file
from orchestrator import PlanError, orchestrate_parallel, verify_report
from orchestrator.plan import missing_programs, validate_plan_data

from .conftest import MakeRepo, git

FIXTURES = Path(__file__).parent / "fixtures" / "presets"

#: A fake ``claude``: records its argv and stdin (the prompt), edits a file, prints a fixture.
FAKE = """#!{python}
import json, os, pathlib, sys
record = pathlib.Path(os.environ["FAKE_RECORD"])
prompt = sys.stdin.read()
with record.open("a") as f:
    f.write(json.dumps({{"argv": sys.argv, "prompt": prompt}}) + "\\n")
pathlib.Path("made-by-agent.txt").write_text("hello from the agent\\n")
sys.stdout.write(pathlib.Path(os.environ["FAKE_FIXTURE"]).read_text())
sys.stdout.flush()
if os.environ.get("FAKE_KILL"):
    os.kill(os.getpid(), 9)
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


@pytest.fixture
def fake_claude(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "claude"
    program.write_text(FAKE.format(python=sys.executable))
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("FAKE_RECORD", str(record))
    return record


def plan(**defaults: Any) -> Plan:
    return Plan.model_validate(
        {
            "agents": {"claude": {"preset": "claude-code", "model": "sonnet", "args": ["--x"]}},
            "defaults": {"venv": False, **defaults},
            "tasks": [
                {
                    "id": "greet",
                    "agent": "claude",
                    "task": "Write a greeting",
                    "inputs": {"name": "Ada"},
                }
            ],
        }
    )


def run(repo: Path, p: Plan) -> Any:
    return anyio.run(lambda: orchestrate_parallel(p, repo=repo))


def test_a_preset_agent_is_told_its_prompt_and_its_report_is_read(
    make_repo: MakeRepo, fake_claude: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FIXTURE", str(FIXTURES / "claude-code" / "success.jsonl"))
    repo = make_repo()
    report = run(repo, plan())
    [result] = report.results
    assert result.status == "succeeded", result.error
    [call] = [json.loads(line) for line in fake_claude.read_text().splitlines()]
    assert call["prompt"].startswith("Write a greeting\n") and '- name: "Ada"' in call["prompt"]
    assert "--x" in call["argv"] and "sonnet" in call["argv"]
    # The agent's file is committed on the task's branch.
    assert git(repo, "show", f"{result.branch}:made-by-agent.txt") == "hello from the agent"
    # Usage and provenance: the prompt file in the run directory hashes to prompt_sha256.
    assert result.usage is not None and result.usage.cost_source == "reported"
    assert result.usage.cost_usd is not None and result.usage.cost_usd > 0
    assert result.provenance.agent.kind == "preset"
    run_dir = Path(report.run_dir)
    prompt = run_dir / "logs" / "greet.attempt-1.prompt"
    assert prompt.read_text() == call["prompt"]
    assert report.summary.usage is not None and report.summary.usage.tasks == 1
    assert anyio.run(verify_report, run_dir / "report.json").ok
    # A changed prompt file is caught.
    prompt.write_text("something else")
    outcome = anyio.run(verify_report, run_dir / "report.json")
    assert "provenance.prompt_sha256" in {f.field for f in outcome.findings}


def test_a_preset_agent_given_no_template_is_told_its_prompt_without_jinja2(
    make_repo: MakeRepo, fake_claude: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Most plans give no template: the default prompt is written without importing Jinja2
    (its import and compile were 30 ms of a run's start); a plan's own template still is
    Jinja2's, rendered in its sandbox."""
    import subprocess

    monkeypatch.setenv("FAKE_FIXTURE", str(FIXTURES / "claude-code" / "success.jsonl"))
    code = (
        "import json, sys\nfrom envelopes import Plan\n"
        "from orchestrator import orchestrate_parallel\nimport anyio\n"
        "p = Plan.model_validate(json.loads(sys.argv[1]))\n"
        "report = anyio.run(lambda: orchestrate_parallel(p, repo=sys.argv[2]))\n"
        "print(report.results[0].status, 'jinja2' in sys.modules)\n"
    )
    for defaults, imported in (({}, "False"), ({"prompt": "Do: {{ task | upper }}"}, "True")):
        data = plan(**defaults).model_dump(mode="json", exclude_unset=True, by_alias=True)
        done = subprocess.run(
            [sys.executable, "-c", code, json.dumps(data), str(make_repo())],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["succeeded", imported]
    first, second = [json.loads(line)["prompt"] for line in fake_claude.read_text().splitlines()]
    assert first.startswith('Write a greeting\n\nInputs:\n- name: "Ada"\n')
    assert second == "Do: WRITE A GREETING"


def test_an_auth_failure_is_not_retried(
    make_repo: MakeRepo, fake_claude: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FIXTURE", str(FIXTURES / "claude-code" / "invalid-api-key.jsonl"))
    monkeypatch.setenv("FAKE_EXIT", "1")
    repo = make_repo()
    report = run(repo, plan(retries=2))
    [result] = report.results
    assert result.status == "failed" and result.error is not None
    assert result.error.kind == "auth"
    assert result.attempts == 1  # another try cannot log it in
    _, raw, _ = load_report_file(Path(report.run_dir) / "report.json")
    assert raw.results[0].error == result.error


def test_a_rate_limited_agent_is_retried_with_the_failure_as_feedback(
    make_repo: MakeRepo, fake_claude: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FIXTURE", str(FIXTURES / "claude-code" / "rate-limited.jsonl"))
    monkeypatch.setenv("FAKE_EXIT", "1")
    repo = make_repo()
    report = run(repo, plan(retries=1))
    [result] = report.results
    assert result.error is not None and result.error.kind == "rate_limited"
    assert result.attempts == 2
    calls = [json.loads(line) for line in fake_claude.read_text().splitlines()]
    assert "previous attempt failed" not in calls[0]["prompt"]
    assert "The previous attempt failed: rate_limited" in calls[1]["prompt"]


def test_plans_name_known_presets_and_their_programs_are_looked_for(tmp_path: Path) -> None:
    data = {
        "agents": {"x": {"preset": "cursor"}},
        "tasks": [{"agent": "x", "task": "t"}],
    }
    with pytest.raises(PlanError, match=r"agents\.x\.preset: unknown preset 'cursor'"):
        validate_plan_data(data)
    with pytest.raises(PlanError, match="exactly one of command, preset, http and acp"):
        validate_plan_data({**data, "agents": {"x": {"preset": "codex", "command": ["c"]}}})
    with pytest.raises(PlanError, match="go with a preset"):
        validate_plan_data({**data, "agents": {"x": {"command": ["c"], "model": "m"}}})
    loaded = validate_plan_data(
        {**data, "agents": {"x": {"preset": "codex", "program": str(tmp_path / "no-codex")}}}
    )
    assert missing_programs(loaded) == [f"agent x: program {tmp_path / 'no-codex'} does not exist"]


def test_an_agent_killed_after_its_report_did_not_succeed(
    make_repo: MakeRepo, fake_claude: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report printed, then the process killed (a limit, an OOM): the kill decides."""
    monkeypatch.setenv("FAKE_FIXTURE", str(FIXTURES / "claude-code" / "success.jsonl"))
    monkeypatch.setenv("FAKE_KILL", "1")
    report = run(make_repo(), plan())
    [result] = report.results
    assert result.status == "failed" and result.error is not None
    assert result.error.message == "killed by SIGKILL"


def test_pricing_applies_to_an_agent_that_names_no_model_by_the_plans_model(
    make_repo: MakeRepo, fake_claude: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The agent reports tokens but no cost and no model: the plan's model: prices it."""
    fixture = tmp_path / "no-cost.jsonl"
    result_line = {
        "type": "result",
        "subtype": "success",
        "is_error": False,
        "result": "done",
        "session_id": "s",
        "num_turns": 1,
        "usage": {"input_tokens": 1_000_000, "output_tokens": 0},
    }
    fixture.write_text(json.dumps(result_line) + "\n")
    monkeypatch.setenv("FAKE_FIXTURE", str(fixture))
    from envelopes import Rates

    p = plan().model_copy(update={"pricing": {"sonnet": Rates(input=2.0, output=8.0)}})
    report = run(make_repo(), p)
    usage = report.results[0].usage
    assert usage is not None and usage.model == "sonnet"
    assert (usage.cost_usd, usage.cost_source) == (2.0, "estimated")


def test_a_prompt_that_cannot_be_rendered_fails_with_kind_prompt_and_no_retry(
    make_repo: MakeRepo, fake_claude: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The template passes the plan's checks (``inputs.nope`` is known only when rendered):
    the attempt fails before the agent starts, as kind ``prompt``, and is not tried again."""
    monkeypatch.setenv("FAKE_FIXTURE", str(FIXTURES / "claude-code" / "success.jsonl"))
    report = run(make_repo(), plan(retries=2, prompt="Use {{ inputs.nope }}"))
    [result] = report.results
    assert result.status == "failed" and result.error is not None
    assert result.error.kind == "prompt"
    assert "has no attribute 'nope'" in result.error.message
    assert result.attempts == 1
    assert not fake_claude.exists()  # the agent never started
    assert report.errors[0].kind == "prompt"
    assert anyio.run(verify_report, Path(report.run_dir) / "report.json").ok


#: A fake ``aider``: reads its --message-file, leaves its repo-map cache as aider 0.86.2
#: does, edits a file, prints aider's real output.
FAKE_AIDER = """#!{python}
import pathlib, sys
prompt = pathlib.Path(sys.argv[sys.argv.index("--message-file") + 1]).read_text()
assert prompt.startswith("Write a greeting"), prompt
cache = pathlib.Path(".aider.tags.cache.v4")
cache.mkdir()
for name in ("cache.db", "cache.db-shm", "cache.db-wal"):
    (cache / name).write_bytes(b"SQLite format 3\\0")
pathlib.Path("hello.txt").write_text("hello\\n")
sys.stdout.write(pathlib.Path({fixture!r}).read_text())
"""


def test_aiders_repo_map_cache_is_never_committed(
    make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No aider flag moves ``.aider.tags.cache.v4/`` out of the worktree: the preset's
    scratch, removed when the attempt ends, so the task's commit holds only the edit."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "aider"
    fixture = FIXTURES / "aider" / "success.txt"
    program.write_text(FAKE_AIDER.format(python=sys.executable, fixture=str(fixture)))
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    p = Plan.model_validate(
        {
            "agents": {"aider": {"preset": "aider", "model": "gpt-4.1"}},
            "defaults": {"venv": False},
            "tasks": [{"id": "greet", "agent": "aider", "task": "Write a greeting"}],
        }
    )
    repo = make_repo()
    report = run(repo, p)
    [result] = report.results
    assert result.status == "succeeded", result.error
    files = git(repo, "ls-tree", "-r", "--name-only", result.branch or "").splitlines()
    assert "hello.txt" in files
    assert not [f for f in files if f.startswith(".aider")]


def test_scratch_that_was_there_before_the_attempt_stays(tmp_path: Path) -> None:
    from orchestrator.preset_agent import remove_scratch, scratch_names

    (tmp_path / ".aider.tags.cache.v3").mkdir()  # the repository tracks it, say
    before = scratch_names(tmp_path, (".aider.tags.cache.v*",))
    (tmp_path / ".aider.tags.cache.v4").mkdir()
    (tmp_path / ".aider.tags.cache.v4" / "cache.db").write_text("x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (tmp_path / ".aider.tags.cache.v5").symlink_to(outside)  # a link is unlinked, not followed
    remove_scratch(tmp_path, (".aider.tags.cache.v*",), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".aider.tags.cache.v3", "outside"]
    assert (outside / "keep.txt").read_text() == "keep"
    assert scratch_names(tmp_path / "missing", ("*",)) == set()
