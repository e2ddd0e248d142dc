"""Plans as a user meets them: every problem on its own line as ``PLAN:LINE:COL: path: message``,
exit code 2, and nothing run; valid plans (YAML or JSON) with their defaults and generated ids.

The bad plans go through ``orchestrator.cli.main`` in-process, for both ``validate`` and ``run``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestrator.plan import envelopes_of, load_plan

from .conftest import MakeRepo, Outcome, cli, git, task_worktrees

FIXTURES = Path(__file__).parent / "fixtures" / "plans"
ID_PATTERN = "[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
COMMANDS = pytest.mark.parametrize("command", ["validate", "run"])

# The plans below are written as plan.yaml next to a repository called "repo"; with this
# prefix their tasks start on line 5.
PREFIX = """\
repo: repo
agents:
  w: {command: [python, agent.py]}
tasks:
"""
TASK = """\
  - id: a
    agent: w
    task: do it
"""


@pytest.fixture
def repo(make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository called "repo" in the current directory (tmp_path)."""
    monkeypatch.chdir(tmp_path)
    return make_repo(name="repo")


def assert_nothing_ran(repo: Path) -> None:
    assert not (repo / ".git" / "orchestrator").exists()
    assert git(repo, "branch", "--format=%(refname:short)") == "main"
    assert task_worktrees(repo) == []


PLAN_ERRORS = [
    pytest.param(
        PREFIX + "  - id: a\n    agent: w\n    task: do: it\n",
        ["plan.yaml:7:13: <plan>: malformed YAML: mapping values are not allowed in this context"],
        id="malformed-yaml",
    ),
    pytest.param(
        "repo: repo\nagents:\n  w: {command: [python, agent.py}\n",
        [
            "plan.yaml:3:33: <plan>: malformed YAML: did not find expected ',' or ']' "
            "(while parsing a flow sequence at line 3, column 16)"
        ],
        id="malformed-yaml-unbalanced-brackets",
    ),
    pytest.param(
        "repo: repo\nagents:\n\tw: {command: [python]}\n",
        ["plan.yaml:3:1: <plan>: malformed YAML: found character that cannot start any token"],
        id="malformed-yaml-tab",
    ),
    pytest.param(
        "colour: blue\n" + PREFIX + TASK,
        ["plan.yaml:1:1: colour: unknown key"],
        id="unknown-key-top-level",
    ),
    pytest.param(
        PREFIX + TASK + "    urgency: high\n",
        ["plan.yaml:8:5: tasks[0].urgency: unknown key"],
        id="unknown-key-in-task",
    ),
    pytest.param(
        "defaults:\n  retry: 2\n" + PREFIX + TASK,
        ["plan.yaml:2:3: defaults.retry: unknown key"],
        id="unknown-key-in-defaults",
    ),
    pytest.param(
        "repo: repo\nagents:\n  w: {command: [python, agent.py], cwd: src}\ntasks:\n" + TASK,
        ["plan.yaml:3:36: agents.w.cwd: unknown key"],
        id="unknown-key-in-agent",
    ),
    pytest.param(
        PREFIX + TASK + '    timeout: "abc"\n',
        ["plan.yaml:8:5: tasks[0].timeout: must be a number, found 'abc'"],
        id="timeout-not-a-number",
    ),
    pytest.param(
        PREFIX + TASK + "    retries: 1.5\n",
        ["plan.yaml:8:5: tasks[0].retries: must be an integer, found 1.5"],
        id="retries-not-an-integer",
    ),
    pytest.param(
        PREFIX + TASK + "    inputs: [module, utils]\n",
        ["plan.yaml:8:5: tasks[0].inputs: must be a mapping, found list"],
        id="inputs-a-list",
    ),
    pytest.param(
        PREFIX + "  id: a\n  agent: w\n  task: do it\n",
        ["plan.yaml:4:1: tasks: must be a list, found dict"],
        id="tasks-not-a-list",
    ),
    pytest.param(
        "repo: repo\nagents:\n  w: {command: [python]}\ntasks: []\n",
        ["plan.yaml:4:1: tasks: must not be empty"],
        id="no-tasks",
    ),
    pytest.param(
        "repo: repo\nagents:\n  w: {command: [python]}\n",
        ["plan.yaml:1:1: tasks: required field missing"],
        id="tasks-missing",
    ),
    pytest.param(
        PREFIX + "  - id: a\n    agent: w\n",
        ["plan.yaml:5:5: tasks[0].task: required field missing"],
        id="task-field-missing",
    ),
    pytest.param(
        "- repo: repo\n- tasks: []\n",
        ["plan.yaml:1:1: <plan>: the plan must be a mapping, found list"],
        id="plan-not-a-mapping",
    ),
    pytest.param(
        PREFIX + TASK + TASK,
        ["plan.yaml:8:5: tasks[1].id: duplicate task id 'a' (first at tasks[0])"],
        id="duplicate-task-ids",
    ),
    pytest.param(
        PREFIX + "  - {id: task-002, agent: w, task: one}\n  - {agent: w, task: two}\n",
        [
            "plan.yaml:6:5: tasks[1].id: the generated id 'task-002' is already used by "
            "tasks[0]; give this task an id"
        ],
        id="generated-id-collides",
    ),
    pytest.param(
        PREFIX + "  - id: a\n    agent: writer\n    task: do it\n",
        ["plan.yaml:6:5: tasks[0].agent: agent 'writer' is not defined (defined: w)"],
        id="agent-not-defined",
    ),
    pytest.param(
        "repo: repo\ntasks:\n" + TASK,
        ["plan.yaml:4:5: tasks[0].agent: agent 'w' is not defined (defined: none)"],
        id="no-agents-at-all",
    ),
    pytest.param(
        PREFIX + TASK + "    timeout: 0\n",
        ["plan.yaml:8:5: tasks[0].timeout: must be > 0, found 0"],
        id="timeout-zero",
    ),
    pytest.param(
        PREFIX + TASK + "    timeout: -5\n",
        ["plan.yaml:8:5: tasks[0].timeout: must be > 0, found -5"],
        id="timeout-negative",
    ),
    pytest.param(
        "defaults: {timeout: 0}\n" + PREFIX + TASK,
        ["plan.yaml:1:12: defaults.timeout: must be > 0, found 0"],
        id="default-timeout-zero",
    ),
    pytest.param(
        PREFIX + TASK + "    retries: -1\n",
        ["plan.yaml:8:5: tasks[0].retries: must be >= 0, found -1"],
        id="retries-negative",
    ),
    pytest.param(
        "defaults:\n  retries: -2\n" + PREFIX + TASK,
        ["plan.yaml:2:3: defaults.retries: must be >= 0, found -2"],
        id="default-retries-negative",
    ),
    pytest.param(
        "concurrency: 0\nkeep_worktrees: sometimes\n" + PREFIX + TASK,
        [
            "plan.yaml:1:1: concurrency: must be >= 1, found 0",
            "plan.yaml:2:1: keep_worktrees: must be one of 'never', 'failed' or 'always', found 'sometimes'",
        ],
        id="concurrency-and-policy",
    ),
    pytest.param("", ["plan.yaml:1:1: <plan>: the plan is empty"], id="empty-file"),
    pytest.param(
        "# nothing but a comment\n",
        ["plan.yaml:1:1: <plan>: the plan is empty"],
        id="only-comments",
    ),
    pytest.param(
        PREFIX + TASK + "    agent: w\n",
        ["plan.yaml:8:5: tasks[0].agent: duplicate key 'agent' (first at line 6)"],
        id="duplicate-yaml-key-in-task",
    ),
    pytest.param(
        PREFIX + TASK + "repo: elsewhere\n",
        ["plan.yaml:8:1: repo: duplicate key 'repo' (first at line 1)"],
        id="duplicate-yaml-key-top-level",
    ),
    pytest.param(
        PREFIX + TASK + '    requirements: [six, "-e {worktree}", "-e {wat}"]\n',
        [
            "plan.yaml:8:42: tasks[0].requirements[2]: unknown placeholder {wat} "
            "(known: {worktree}, {repo_root}, {plan_dir}, {task_id})"
        ],
        id="requirement-placeholder",
    ),
    pytest.param(
        PREFIX
        + TASK
        + "    matrix:\n      requirements: [[six], ['{plan_dir}/x.whl', '{nope}']]\n",
        [
            "plan.yaml:9:29: tasks[0].matrix.requirements[1]: unknown placeholder {nope} "
            "(known: {worktree}, {repo_root}, {plan_dir}, {task_id})"
        ],
        id="matrix-requirement-placeholder",
    ),
    pytest.param(
        PREFIX + TASK + "    install_project: true\n    venv: false\n",
        [
            "plan.yaml:8:5: tasks[0].install_project: install_project needs the task's venv, "
            "and venv is false"
        ],
        id="install-project-without-venv",
    ),
    pytest.param(
        "defaults: {install_project: true}\n" + PREFIX + TASK + "    venv: false\n"
        "  - {id: b, agent: w, task: t, venv: {seed: true}}\n",
        ["plan.yaml:9:5: tasks[0].venv: install_project needs the task's venv, and venv is false"],
        id="default-install-project-without-venv",
    ),
    pytest.param(
        "defaults: {install_project: true, venv: false}\n"
        + PREFIX
        + TASK
        + "  - {id: b, agent: w, task: t}\n",
        [
            "plan.yaml:1:12: defaults.install_project: install_project needs the task's venv, "
            "and venv is false"
        ],
        id="defaults-install-project-without-venv",
    ),
]


@COMMANDS
@pytest.mark.parametrize(("text", "expected"), PLAN_ERRORS)
def test_plan_error_is_one_exact_line_and_nothing_runs(
    command: str, text: str, expected: list[str], repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("plan.yaml").write_text(text)
    outcome = cli(capsys, command, "plan.yaml")
    assert outcome == Outcome(2, "", "\n".join(expected) + "\n")
    assert_nothing_ran(repo)


BAD_IDS = [
    ("bad/id", f"must match {ID_PATTERN}"),
    ("has space", f"must match {ID_PATTERN}"),
    ("-leading-dash", f"must match {ID_PATTERN}"),
    (".hidden", f"must match {ID_PATTERN}"),
    ("", f"must match {ID_PATTERN}"),
    ("a" * 65, f"must match {ID_PATTERN}"),
    ("x..y", "must not contain '..' or end with '.' or '.lock'"),
    ("main.lock", "must not contain '..' or end with '.' or '.lock'"),
    ("trailing.", "must not contain '..' or end with '.' or '.lock'"),
]


@COMMANDS
@pytest.mark.parametrize(
    ("task_id", "reason"), BAD_IDS, ids=[i[:12] or "empty" for i, _ in BAD_IDS]
)
def test_invalid_task_id(
    command: str, task_id: str, reason: str, repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("plan.yaml").write_text(PREFIX + f'  - id: "{task_id}"\n    agent: w\n    task: t\n')
    outcome = cli(capsys, command, "plan.yaml")
    assert outcome == Outcome(
        2, "", f"plan.yaml:5:5: tasks[0].id: invalid id {task_id!r}: {reason}\n"
    )
    assert_nothing_ran(repo)


def test_longest_and_punctuated_ids_are_valid(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = ["a" * 64, "A.b_c-9", "7"]
    tasks = "".join(f'  - {{id: "{i}", agent: w, task: t}}\n' for i in ids)
    Path("plan.yaml").write_text(PREFIX + tasks)
    assert cli(capsys, "validate", "plan.yaml").code == 0
    assert [e.task_id for e in envelopes_of(load_plan("plan.yaml").plan)] == ids


def test_numeric_id_must_be_quoted(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Path("plan.yaml").write_text(PREFIX + "  - {id: 7, agent: w, task: t}\n")
    outcome = cli(capsys, "validate", "plan.yaml")
    assert outcome == Outcome(2, "", "plan.yaml:5:6: tasks[0].id: must be a string, found 7\n")


@COMMANDS
def test_several_problems_each_on_its_own_line_in_file_order(
    command: str, repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(FIXTURES / "several_errors.yaml", "several_errors.yaml")
    outcome = cli(capsys, command, "several_errors.yaml")
    assert outcome.code == 2
    assert outcome.err.splitlines() == [
        "several_errors.yaml:3:1: colour: unknown key",
        "several_errors.yaml:5:3: defaults.timeout: must be > 0, found 0",
        "several_errors.yaml:9:5: agents.writer.cwd: unknown key",
        "several_errors.yaml:14:5: tasks[0].retries: must be >= 0, found -1",
        "several_errors.yaml:18:5: tasks[1].inputs: must be a mapping, found list",
        "several_errors.yaml:19:5: tasks[1].agent: duplicate key 'agent' (first at line 16)",
    ]
    assert_nothing_ran(repo)


@COMMANDS
def test_several_cross_field_problems_reported_together(
    command: str, repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("plan.yaml").write_text(
        PREFIX
        + "  - {id: a, agent: w, task: one}\n"
        + "  - {id: b/c, agent: w, task: two}\n"
        + "  - {id: a, agent: nobody, task: three}\n"
    )
    outcome = cli(capsys, command, "plan.yaml")
    assert outcome.code == 2
    assert outcome.err.splitlines() == [
        f"plan.yaml:6:6: tasks[1].id: invalid id 'b/c': must match {ID_PATTERN}",
        "plan.yaml:7:6: tasks[2].id: duplicate task id 'a' (first at tasks[0])",
        "plan.yaml:7:13: tasks[2].agent: agent 'nobody' is not defined (defined: w)",
    ]
    assert_nothing_ran(repo)


def test_schema_and_cross_field_problems_reported_together(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("plan.yaml").write_text(
        PREFIX
        + "  - {id: a, agent: w, task: one, timeout: 0}\n  - {id: b, agent: nobody, task: two}\n"
    )
    assert cli(capsys, "validate", "plan.yaml").err.splitlines() == [
        "plan.yaml:5:34: tasks[0].timeout: must be > 0, found 0",
        "plan.yaml:6:13: tasks[1].agent: agent 'nobody' is not defined (defined: w)",
    ]


def test_invalid_agent_name(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Path("plan.yaml").write_text(
        "repo: repo\nagents:\n  my agent: {command: [python]}\ntasks:\n  - {agent: my agent, task: t}\n"
    )
    outcome = cli(capsys, "validate", "plan.yaml")
    assert outcome == Outcome(
        2,
        "",
        f"plan.yaml:3:3: agents.my agent: invalid agent name 'my agent': must match {ID_PATTERN}\n",
    )


def test_unconstructible_scalar_is_a_plan_error(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("plan.yaml").write_text(PREFIX + TASK + "    inputs: {released: 2020-13-45}\n")
    outcome = cli(capsys, "validate", "plan.yaml")
    assert outcome.code == 2
    [line] = outcome.err.splitlines()
    assert line.startswith("plan.yaml:8:")


def test_unknown_yaml_tag_is_one_located_line(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("plan.yaml").write_text(
        PREFIX + "  - id: a\n    agent: w\n    task: !!python/name:os.system x\n"
    )
    outcome = cli(capsys, "validate", "plan.yaml")
    assert outcome.code == 2
    assert len(outcome.err.splitlines()) == 1, outcome.err
    assert outcome.err.startswith("plan.yaml:7:")


def test_yaml_merge_keys_are_accepted(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Path("plan.yaml").write_text(
        "repo: repo\nagents:\n  w: {command: [python]}\nx-common: &common {agent: w, task: t}\n"
        "tasks:\n  - {<<: *common, id: a}\n"
    )
    assert cli(capsys, "validate", "plan.yaml").code == 0


# Problems that need the repository or the file system.


@COMMANDS
def test_repo_that_is_not_a_git_repository(
    command: str, repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "plain").mkdir()
    Path("plan.yaml").write_text(PREFIX.replace("repo: repo", "repo: plain") + TASK)
    outcome = cli(capsys, command, "plan.yaml")
    assert outcome == Outcome(
        2, "", f"plan.yaml:1:1: repo: not a git repository: {tmp_path / 'plain'}\n"
    )
    assert not (tmp_path / "plain").joinpath(".git").exists()
    assert_nothing_ran(repo)


@COMMANDS
def test_repo_that_does_not_exist(
    command: str, repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("plan.yaml").write_text(PREFIX.replace("repo: repo", "repo: gone") + TASK)
    outcome = cli(capsys, command, "plan.yaml")
    assert outcome == Outcome(
        2,
        "",
        f"plan.yaml:1:1: repo: not a git repository: {tmp_path / 'gone'} (no such directory)\n",
    )
    assert not (tmp_path / "gone").exists()


@COMMANDS
def test_repo_override_that_is_not_a_git_repository(
    command: str, repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "plain").mkdir()
    Path("plan.yaml").write_text(PREFIX + TASK)
    outcome = cli(capsys, command, "plan.yaml", "--repo", "plain")
    assert outcome.code == 2
    assert outcome.err.splitlines() == [f"--repo: not a git repository: {tmp_path / 'plain'}"]
    assert_nothing_ran(repo)


@COMMANDS
@pytest.mark.parametrize("base", ["no-such-branch", "HEAD~5", "--output=stolen"])
def test_base_that_does_not_resolve(
    command: str, base: str, repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("plan.yaml").write_text(f"base: {base!r}\n" + PREFIX + TASK)
    outcome = cli(capsys, command, "plan.yaml")
    root = git(repo, "rev-parse", "--show-toplevel")
    assert outcome == Outcome(
        2, "", f"plan.yaml:1:1: base: {base!r} does not resolve to a commit in {root}\n"
    )
    assert not (tmp_path / "stolen").exists()
    assert_nothing_ran(repo)


@COMMANDS
def test_missing_file(command: str, repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(capsys, command, "missing.yaml") == Outcome(
        2, "", "missing.yaml: <plan>: no such file\n"
    )
    assert_nothing_ran(repo)


@COMMANDS
def test_directory_given_as_plan(
    command: str, repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outcome = cli(capsys, command, "repo")
    assert outcome == Outcome(2, "", "repo: <plan>: is a directory, not a plan file\n")
    assert_nothing_ran(repo)


@COMMANDS
def test_file_that_is_not_utf8(
    command: str, repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("plan.yaml").write_bytes(b"name: caf\xe9\n")
    outcome = cli(capsys, command, "plan.yaml")
    assert outcome.code == 2
    [line] = outcome.err.splitlines()
    assert line.startswith("plan.yaml: <plan>: cannot read: 'utf-8' codec can't decode byte 0xe9")
    assert_nothing_ran(repo)


# Valid plans.


def test_valid_plan_passes_validate(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(FIXTURES / "valid.yaml", "valid.yaml")
    head = git(repo, "rev-parse", "HEAD")
    root = git(repo, "rev-parse", "--show-toplevel")
    outcome = cli(capsys, "validate", "valid.yaml")
    assert outcome == Outcome(0, f"valid.yaml: OK, 3 tasks, 1 agents, {root} at {head[:12]}\n", "")
    assert_nothing_ran(repo)


def test_json_plan_passes_validate(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(FIXTURES / "valid.json", "valid.json")
    outcome = cli(capsys, "validate", "valid.json")
    assert (outcome.code, outcome.err) == (0, "")
    assert outcome.out.startswith("valid.json: OK, 2 tasks, 1 agents, ")
    loaded = load_plan("valid.json")
    assert loaded.plan.agents["writer"].command == ["python", "agent.py", "--fast"]
    assert [e.task_id for e in envelopes_of(loaded.plan)] == ["one", "task-002"]
    assert envelopes_of(loaded.plan)[1].inputs == {"n": [1, 2]}


@COMMANDS
def test_json_plan_errors_are_located(
    command: str, repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("plan.json").write_text(
        '{"repo": "repo",\n'
        ' "agents": {"w": {"command": ["python"]}},\n'
        ' "tasks": [{"id": "a", "agent": "w", "task": "t", "timeout": 0}],\n'
        ' "repo": "again"}\n'
    )
    outcome = cli(capsys, command, "plan.json")
    assert outcome.code == 2
    assert outcome.err.splitlines() == [
        "plan.json:3:51: tasks[0].timeout: must be > 0, found 0",
        "plan.json:4:2: repo: duplicate key 'repo' (first at line 1)",
    ]
    assert_nothing_ran(repo)


def test_malformed_json_plan(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Path("plan.json").write_text('{"repo": "repo",\n "tasks": [}\n')
    outcome = cli(capsys, "validate", "plan.json")
    assert outcome.code == 2
    assert (
        outcome.err
        == "plan.json:2:12: <plan>: malformed YAML: did not find expected node content\n"
    )


def test_repo_is_relative_to_the_plan_file(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "plan.yaml").write_text(
        PREFIX.replace("repo: repo", "repo: ../repo") + TASK
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    outcome = cli(capsys, "validate", "../plans/plan.yaml")
    assert outcome.code == 0, outcome.err
    assert f"{git(repo, 'rev-parse', '--show-toplevel')} at " in outcome.out


def test_repo_option_overrides_the_plan(
    make_repo: MakeRepo, repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = make_repo(name="other")
    Path("plan.yaml").write_text(PREFIX + TASK)
    outcome = cli(capsys, "validate", "plan.yaml", "--repo", str(other))
    assert outcome.code == 0, outcome.err
    assert f"{git(other, 'rev-parse', '--show-toplevel')} at " in outcome.out


def test_generated_task_ids() -> None:
    plan = load_plan(FIXTURES / "valid.yaml").plan
    assert plan.task_ids() == ["add-utils", "task-002", "task-003"]
    envelopes = envelopes_of(plan, run_id="20260101-000000-abcdef")
    assert [e.task_id for e in envelopes] == ["add-utils", "task-002", "task-003"]
    assert {e.run_id for e in envelopes} == {"20260101-000000-abcdef"}


def test_defaults_applied_by_envelopes_of() -> None:
    own, defaulted, bare = envelopes_of(load_plan(FIXTURES / "valid.yaml").plan)
    # A task's own values win over the defaults; env is merged, the task's keys winning.
    assert (own.timeout, own.retries, own.requirements) == (120.0, 2, [])
    assert own.env == {"SHARED": "1", "MODE": "fast"}
    assert own.inputs == {"module": "utils", "depth": 2}
    assert own.acceptance_criteria == ["utils.slugify exists"]
    assert own.metadata == {"owner": "ada"}
    assert (own.agent, own.task) == ("writer", "Add string helpers")
    # Omitted values come from the defaults.
    assert (defaulted.timeout, defaulted.retries, defaulted.requirements) == (30.0, 1, ["six"])
    assert defaulted.env == {"SHARED": "1", "MODE": "default"}
    assert (defaulted.worktree, defaulted.venv) == (True, True)
    assert (defaulted.inputs, defaulted.acceptance_criteria, defaulted.metadata) == ({}, [], {})
    assert (bare.worktree, bare.venv) == (False, False)


def test_builtin_defaults_when_the_plan_sets_none(tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(PREFIX + TASK)
    loaded = load_plan(path)
    assert loaded.plan_dir == tmp_path
    assert (loaded.plan.base, loaded.plan.concurrency, loaded.plan.keep_worktrees) == (
        "HEAD",
        4,
        "failed",
    )
    [envelope] = envelopes_of(loaded.plan)
    assert (envelope.timeout, envelope.retries, envelope.requirements, envelope.env) == (
        600.0,
        0,
        [],
        {},
    )


def test_plan_digest_ignores_comments_and_layout(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(PREFIX + TASK)
    (tmp_path / "b.yaml").write_text(
        "# the same plan\n" + PREFIX + "  - {id: a, agent: w, task: do it}\n"
    )
    (tmp_path / "c.yaml").write_text(PREFIX + TASK.replace("do it", "do it now"))
    a, b, c = (load_plan(tmp_path / f"{n}.yaml").sha256 for n in "abc")
    assert a == b != c
