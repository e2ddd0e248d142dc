"""Secrets never reach what the orchestrator writes or shows (issue 10, finding 8).

Three secrets: one inherited from the orchestrator's environment under a secret-looking name,
one set by the plan under a secret-looking name, one set under a plain name and declared in
``secrets:``. The agent plants them in ten places: stdout, stderr (its last line becomes the
error message), its output's keys and values, a file in its worktree, a file in a
subdirectory, a symlink's target, the events (through the error), the journal and the report
(through the result). None of them appears in any file of the run directory, the report, the
terminal, or any commit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
import yaml

from envelopes import Plan
from orchestrator import orchestrate_parallel

from .conftest import MakeRepo, cli, git

INHERITED = "sk-inherited-0123456789abcdef"
SET_IN_PLAN = "plan-set-secret-value-42"
DECLARED = "declared-plain-name-value"
SECRETS = (INHERITED, SET_IN_PLAN, DECLARED)

LEAKY = """
import json, os, pathlib, sys
secrets = [os.environ["SERVICE_API_TOKEN"], os.environ["DEPLOY_KEY"], os.environ["PLAIN"]]
print("stdout:", *secrets)
print("stderr:", *secrets, file=sys.stderr)
task = os.environ["ORCHESTRATOR_TASK_ID"]
if task == "files":
    pathlib.Path("leak.txt").write_text(secrets[0])
    pathlib.Path("sub").mkdir()
    pathlib.Path("sub/deep.txt").write_text("x" + secrets[2] + "y")
    os.symlink(secrets[1], "link")
    pathlib.Path("clean.txt").write_text("nothing to hide")
if task == "output":
    with open(os.environ["ORCHESTRATOR_OUTPUT"], "w") as f:
        json.dump({secrets[0]: secrets[1], "list": [secrets[2]]}, f)
if task == "fails":
    print("failed with", secrets[1], file=sys.stderr)
    sys.exit(3)
"""


@pytest.fixture
def planted(make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    repo = make_repo()
    agent = tmp_path / "leaky.py"
    agent.write_text(LEAKY)
    plan = {
        "name": "secrets",
        "agents": {"leaky": {"command": [sys.executable, str(agent)]}},
        "defaults": {
            "venv": False,
            "env": {"DEPLOY_KEY": SET_IN_PLAN, "PLAIN": DECLARED},
            "secrets": ["PLAIN"],
        },
        "keep_worktrees": "never",
        "tasks": [
            {"id": t, "agent": "leaky", "task": f"leak {t}"} for t in ("files", "output", "fails")
        ],
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    monkeypatch.setenv("SERVICE_API_TOKEN", INHERITED)
    monkeypatch.chdir(repo)
    return path


def everything_written(repo: Path) -> dict[str, bytes]:
    files = {}
    for path in (repo / ".git" / "orchestrator" / "runs").rglob("*"):
        if path.is_file() and not path.is_symlink():
            files[str(path)] = path.read_bytes()
    files["git log --all -p"] = subprocess.run(
        ["git", "-C", str(repo), "log", "--all", "-p", "--format=%H %s%n%b"],
        capture_output=True,
        check=True,
    ).stdout
    return files


def test_secrets_planted_in_ten_places_never_appear(
    planted: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = Path.cwd()
    outcome = cli(capsys, "run", str(planted))
    assert outcome.code == 1  # two tasks fail: one leaks into files, one exits 3
    for secret in SECRETS:
        assert secret not in outcome.out + outcome.err
    written = everything_written(repo)
    assert any(name.endswith("report.json") for name in written)
    for name, content in written.items():
        for secret in SECRETS:
            assert secret.encode() not in content, f"{secret} in {name}"
    # What was masked is visibly masked, not dropped.
    report = next(c for n, c in written.items() if n.endswith("report.json")).decode()
    assert "failed with ***" in report
    assert "secret_leak" in report and "leak.txt" in report and "sub/deep.txt" in report
    logs = [c for n, c in written.items() if n.endswith(".stdout")]
    assert logs and all(b"stdout: *** *** ***" in c for c in logs)
    # The leaking files were not committed; the clean one was.
    branch = f"orchestrator/{Path(next(n for n in written if n.endswith('report.json'))).parent.name}/files"
    committed = git(repo, "ls-tree", "-r", "--name-only", branch).split()
    assert "clean.txt" in committed
    assert not {"leak.txt", "sub/deep.txt", "link"} & set(committed)
    assert cli(capsys, "verify", next(n for n in written if n.endswith("report.json"))).code == 0


def test_plan_json_and_envelopes_mask_secret_values(
    planted: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = Path.cwd()
    cli(capsys, "run", str(planted))
    run_dir = next((repo / ".git" / "orchestrator" / "runs").iterdir())
    plan_json = (run_dir / "plan.json").read_text()
    assert '"DEPLOY_KEY":"***"' in plan_json and '"PLAIN":"***"' in plan_json
    for envelope in (run_dir / "envelopes").iterdir():
        assert '"DEPLOY_KEY":"***"' in envelope.read_text()
    # Resuming or re-running compares plans by the masked digest: the same plan matches.
    assert cli(capsys, "validate", str(planted)).code == 0


@pytest.fixture
def repo(make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository, the current directory, as a user running `orchestrator run` has."""
    path = make_repo()
    monkeypatch.chdir(path)
    return path


def _one_task(repo: Path, tmp_path: Path, source: str, **defaults: object) -> Path:
    agent = tmp_path / "agent.py"
    agent.write_text(source)
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        yaml.safe_dump(
            {
                "agents": {"a": {"command": [sys.executable, str(agent)]}},
                "defaults": {"venv": False, **defaults},
                "tasks": [{"id": "t", "agent": "a", "task": "write"}],
            }
        )
    )
    return plan


def test_the_agent_still_gets_the_real_values(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = f"import os, sys\nsys.exit(0 if os.environ['DEPLOY_KEY'] == {SET_IN_PLAN!r} else 7)\n"
    plan = _one_task(repo, tmp_path, source, env={"DEPLOY_KEY": SET_IN_PLAN})
    assert cli(capsys, "run", str(plan)).code == 0


def test_a_plan_may_allow_secrets_in_commits(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source = "import os, pathlib\npathlib.Path('token.txt').write_text(os.environ['MY_TOKEN'])\n"
    monkeypatch.setenv("MY_TOKEN", INHERITED)
    refused = _one_task(repo, tmp_path, source)
    assert cli(capsys, "run", str(refused)).code == 1
    allowed = _one_task(repo, tmp_path, source, allow_secrets_in_commit=True)
    done = cli(capsys, "run", str(allowed))
    assert done.code == 0, done
    results = [
        json.loads((run / "report.json").read_text())["results"][0]
        for run in (repo / ".git" / "orchestrator" / "runs").iterdir()
    ]
    [result] = [r for r in results if r["status"] == "succeeded"]
    assert git(repo, "show", f"{result['provenance']['result_commit']}:token.txt") == INHERITED


def test_changes_over_max_commit_mb_are_not_stored(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = "import pathlib\npathlib.Path('big.bin').write_bytes(b'x' * (2 * 1024 * 1024 + 1))\n"
    objects = git(repo, "count-objects", "-v")
    outcome = cli(capsys, "run", str(_one_task(repo, tmp_path, source, max_commit_mb=2)))
    assert outcome.code == 1
    report = next((repo / ".git" / "orchestrator" / "runs").iterdir()) / "report.json"
    result = json.loads(report.read_text())["results"][0]
    assert result["error"]["kind"] == "too_large"
    assert result["error"]["paths"] == ["big.bin"]
    assert result["provenance"]["result_commit"] is None
    # git add never ran on it: no new object in the repository.
    loose = [
        line for line in git(repo, "count-objects", "-v").splitlines() if line.startswith("size:")
    ]
    assert loose == [line for line in objects.splitlines() if line.startswith("size:")]


SNEAKY = """
import os, pathlib, subprocess
secret = os.environ["MY_API_KEY"]
def git(*args):
    subprocess.run(["git", "-c", "user.name=a", "-c", "user.email=a@a", *args], check=True)
if os.environ["ORCHESTRATOR_TASK_ID"] == "commits":
    pathlib.Path("in-commit.txt").write_text(secret)
    git("add", "in-commit.txt")
    git("commit", "-q", "-m", "message holds " + secret)
elif os.environ["ORCHESTRATOR_TASK_ID"] == "labelled":
    # Only the message holds it, labelled as EBCDIC: git log converts it to nonsense.
    pathlib.Path("plain.txt").write_text("nothing to see\\n")
    git("add", "plain.txt")
    git("-c", "i18n.commitEncoding=IBM037", "commit", "-q", "-m", "message holds " + secret)
elif os.environ["ORCHESTRATOR_TASK_ID"] == "staged":
    pathlib.Path("README.md").write_text(secret)
    git("add", "README.md")
    git("update-index", "--assume-unchanged", "README.md")
    pathlib.Path("README.md").write_text("clean\\n")
else:
    pathlib.Path(f"leak-{secret}.txt").write_text("innocent")
"""


def test_secrets_in_the_agents_own_commits_staged_files_and_names_are_caught(
    make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(extra={"README.md": "readme\\n"})
    monkeypatch.setenv("MY_API_KEY", INHERITED)
    agent = tmp_path / "sneaky.py"
    agent.write_text(SNEAKY)
    plan = Plan.model_validate(
        {
            "agents": {"s": {"command": [sys.executable, str(agent)]}},
            "defaults": {"venv": False},
            "tasks": [
                {"id": t, "agent": "s", "task": "t"}
                for t in ("commits", "labelled", "staged", "names")
            ],
        }
    )
    report = anyio.run(lambda: orchestrate_parallel(plan, repo=repo))
    for result in report.results:
        assert result.status == "failed", result.task_id
        assert result.error is not None and result.error.kind == "secret_leak", result.error
    log = subprocess.run(
        ["git", "-C", str(repo), "log", "--all", "-p", "--format=%H %B", "--name-only"],
        capture_output=True,
        check=True,
    ).stdout
    assert INHERITED.encode() not in log
