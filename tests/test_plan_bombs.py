"""Hostile plans: alias bombs, endless or special files, deep nesting and huge numbers.

Each ends, through ``orchestrator validate`` and ``orchestrator run`` alike, in one located line
per problem on stderr and exit code 2: never a traceback, a hang or gigabytes of memory. The
limits are those of ``orchestrator.plan`` (MAX_PLAN_BYTES, MAX_PLAN_NODES, MAX_PLAN_DEPTH,
ALIAS_GROWTH); a plan with a few aliases, as people write them, still loads.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import plan as plan_module
from orchestrator.errors import PlanError
from orchestrator.plan import (
    ALIAS_ALLOWANCE_CHARS,
    ALIAS_ALLOWANCE_NODES,
    MAX_PLAN_BYTES,
    MAX_PLAN_DEPTH,
    load_plan,
    parse_plan,
)

from .conftest import MakeRepo, Outcome, cli

COMMANDS = pytest.mark.parametrize("command", ["validate", "run"])

PLAN = """\
agents:
  w: {command: [python, agent.py]}
tasks:
  - {id: a, agent: w, task: do it}
"""


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in tmp_path: a plan that got through would find no repository to touch."""
    monkeypatch.chdir(tmp_path)


def alias_bomb(levels: int, width: int) -> str:
    """``x-a`` lists *width* ones; each next level lists *width* aliases of the one before."""
    names = string.ascii_lowercase[:levels]
    lines = [f"x-a: &a [{', '.join(['1'] * width)}]"]
    for before, name in itertools.pairwise(names):
        lines.append(f"x-{name}: &{name} [{', '.join([f'*{before}'] * width)}]")
    return "\n".join(lines) + "\n"


def merge_bomb(levels: int, width: int) -> str:
    """Each level merges *width* times the mapping before it, and adds a key of its own."""
    names = string.ascii_lowercase[:levels]
    keys = ", ".join(f"k{i}: 1" for i in range(width))
    lines = [f"x-a: &a {{{keys}}}"]
    for before, name in itertools.pairwise(names):
        lines.append(f"x-{name}: &{name} {{<<: [{', '.join([f'*{before}'] * width)}], {name}: 1}}")
    return "\n".join(lines) + "\n"


def nested_aliases(levels: int, width: int) -> str:
    """Each level is a mapping of *width* keys, each an alias of the level before; no lists."""
    names = string.ascii_lowercase[:levels]
    lines = [f"x-a: &a {{{', '.join(f'k{i}: 1' for i in range(width))}}}"]
    for before, name in itertools.pairwise(names):
        keys = ", ".join(f"k{i}: *{before}" for i in range(width))
        lines.append(f"x-{name}: &{name} {{{keys}}}")
    return (
        "\n".join(lines)
        + "\n"
        + PLAN.replace("do it}", "do it, inputs: {all: *" + names[-1] + "}}")
    )


def refused(outcome: Outcome) -> list[str]:
    """The lines of a refused plan: exit code 2, nothing on stdout, and no traceback."""
    assert outcome.code == 2, outcome
    assert outcome.out == ""
    assert "Traceback" not in outcome.err
    return outcome.err.splitlines()


# Alias bombs: the expansion is counted as the plan is walked, and stopped.


def test_the_nine_by_nine_bomb_is_a_few_hundred_bytes() -> None:
    text = alias_bomb(10, 9)
    assert len(text.encode()) < 460
    assert text.count("*") == 81  # 9**10 ones once expanded


@COMMANDS
@pytest.mark.parametrize(
    "text",
    [
        pytest.param(alias_bomb(10, 9), id="nine-by-nine"),
        pytest.param(alias_bomb(20, 20), id="twenty-by-twenty"),
        pytest.param(
            alias_bomb(10, 9) + PLAN + "  - {id: b, agent: w, task: *j}\n", id="in-a-task"
        ),
        pytest.param(nested_aliases(10, 9), id="mappings-under-inputs"),
        pytest.param(merge_bomb(10, 9), id="merge-keys"),
    ],
)
def test_alias_bombs_are_stopped(
    command: str, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("plan.yaml").write_text(text)
    [line] = refused(cli(capsys, command, "plan.yaml"))
    found = re.fullmatch(
        r"plan\.yaml:\d+:\d+: <plan>: aliases expand the plan past ([\d,]+) values "
        r"\(([\d,]+) in the file itself\)",
        line,
    )
    assert found, line
    limit, own = (int(n.replace(",", "")) for n in found.groups())
    assert limit == own + ALIAS_ALLOWANCE_NODES


def test_a_bomb_stops_at_the_allowance() -> None:
    text = alias_bomb(10, 9)
    own = 1 + 10 * 2 + 9  # the root, ten keys and ten lists, nine ones: aliases are no values
    with pytest.raises(PlanError) as caught:
        parse_plan(text, file="plan.yaml")
    [issue] = caught.value.issues
    assert issue.line == 1  # inside x-a, the list every alias leads back to
    limit = own + ALIAS_ALLOWANCE_NODES
    assert (
        issue.message == f"aliases expand the plan past {limit:,} values ({own} in the file itself)"
    )


def test_strings_repeated_by_aliases_count_as_text() -> None:
    text = "x-s: &s '" + "x" * 1000 + "'\n"
    for before, name in itertools.pairwise("sbcde"):
        text += f"x-{name}: &{name} [{', '.join([f'*{before}'] * 10)}]\n"
    with pytest.raises(PlanError) as caught:
        parse_plan(text + PLAN, file="plan.yaml")
    [issue] = caught.value.issues
    assert (issue.line, issue.column) == (1, 6)  # the string
    assert issue.message.startswith("aliases expand the plan past ")
    assert issue.message.endswith(f"characters of text ({len(text + PLAN):,} in the file itself)")
    assert f"{len(text + PLAN) + ALIAS_ALLOWANCE_CHARS:,} characters" in issue.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "x-a: &a [*a]\n" + PLAN,
            f"plan.yaml:1:6: <plan>: nested too deeply: more than {MAX_PLAN_DEPTH} levels",
            id="list-in-itself",
        ),
        pytest.param(
            "x-a: &a {b: *a}\n" + PLAN,
            f"plan.yaml:1:6: <plan>: nested too deeply: more than {MAX_PLAN_DEPTH} levels",
            id="mapping-in-itself",
        ),
        pytest.param(
            "x-a: &a {<<: *a}\n" + PLAN,
            "plan.yaml:1:6: <plan>: malformed YAML: a merge key (<<) merges the mapping it is in",
            id="mapping-merging-itself",
        ),
    ],
)
def test_an_alias_inside_what_it_names(
    text: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("plan.yaml").write_text(text)
    assert refused(cli(capsys, "validate", "plan.yaml")) == [expected]


def test_a_problem_aliases_repeat_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    Path("plan.yaml").write_text(
        "x-a: &a [2020-13-45]\nx-b: &b {k: 1, k: 2}\nx-c: [*a, *a, *a, *b, *b, *b]\n" + PLAN
    )
    lines = refused(cli(capsys, "validate", "plan.yaml"))
    assert [line.split(": ", 2)[:2] for line in lines] == [
        ["plan.yaml:1:10", "x-a[0]"],
        ["plan.yaml:2:16", "x-b.k"],
    ]


def test_a_key_must_be_a_scalar(capsys: pytest.CaptureFixture[str]) -> None:
    """Not constructed, so a key that holds a bomb is not expanded into one."""
    bomb = alias_bomb(10, 9).replace("\nx-", ", ").replace("x-a: ", "[").rstrip() + "]"
    Path("plan.yaml").write_text(f"x-k: {{? {bomb} : 1}}\n" + PLAN)
    assert refused(cli(capsys, "validate", "plan.yaml")) == [
        "plan.yaml:1:9: <plan>: a key must be a string, found a sequence"
    ]


def test_aliases_may_grow_a_large_plan_tenfold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the allowance, a plan's aliases may add ALIAS_GROWTH times its own values."""
    monkeypatch.setattr(plan_module, "ALIAS_ALLOWANCE_NODES", 10)
    template = "x-t: &t {agent: w, timeout: 30, retries: 1, env: {A: '1', B: '2'}}\n"
    tasks = "".join(f"  - {{<<: *t, id: t{i}, task: do it}}\n" for i in range(20))
    text = template + "agents:\n  w: {command: [python, agent.py]}\ntasks:\n" + tasks
    assert len(parse_plan(text).plan.tasks) == 20  # 240 values merged in, 145 of its own
    monkeypatch.setattr(plan_module, "ALIAS_GROWTH", 1)
    with pytest.raises(PlanError, match="aliases expand the plan past"):
        parse_plan(text)


def test_a_plan_with_a_few_aliases_still_loads(
    make_repo: MakeRepo, capsys: pytest.CaptureFixture[str]
) -> None:
    make_repo(name="repo")
    Path("plan.yaml").write_text(
        "repo: repo\n"
        "x-env: &env {LOG: info, MODE: fast}\n"
        "x-task: &task {agent: w, timeout: 30, env: *env}\n"
        "x-slow: &slow {timeout: 600, retries: 2}\n"
        "agents:\n"
        "  w: {command: [python, agent.py], env: *env}\n"
        "tasks:\n"
        "  - {<<: *task, id: a, task: first}\n"
        "  - {<<: *task, id: b, task: second, timeout: 5}\n"
        "  - {<<: [*slow, *task], id: c, task: third, inputs: {env: *env}}\n"
    )
    outcome = cli(capsys, "validate", "plan.yaml")
    assert outcome.code == 0 and outcome.err == "", outcome
    tasks = {t.id: t for t in load_plan("plan.yaml").plan.tasks}
    assert (tasks["a"].agent, tasks["a"].timeout) == ("w", 30)
    assert tasks["b"].timeout == 5  # the task's own key wins over the merged one
    assert (tasks["c"].timeout, tasks["c"].retries) == (600, 2)  # the first listed wins
    assert tasks["c"].inputs == {"env": {"LOG": "info", "MODE": "fast"}}


def test_a_duplicate_key_of_its_own_is_still_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    task = "  - {id: a, agent: w, task: do it, timeout: 5, timeout: 6, <<: *task}"
    Path("plan.yaml").write_text(
        "x-task: &task {agent: w, timeout: 30}\n" + PLAN.replace(PLAN.splitlines()[-1], task)
    )
    column = task.index("timeout: 6") + 1
    assert refused(cli(capsys, "validate", "plan.yaml")) == [
        f"plan.yaml:5:{column}: tasks[0].timeout: duplicate key 'timeout' (first at line 5)"
    ]


# Files that are not plans: refused before a byte is read.


@COMMANDS
def test_dev_zero(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert refused(cli(capsys, command, "/dev/zero")) == [
        "/dev/zero: <plan>: is not a regular file"
    ]


@COMMANDS
def test_a_link_to_dev_zero(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    Path("plan.yaml").symlink_to("/dev/zero")
    assert refused(cli(capsys, command, "plan.yaml")) == [
        "plan.yaml: <plan>: is not a regular file"
    ]


@COMMANDS
@pytest.mark.timeout(30)
def test_a_fifo_with_no_writer(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    os.mkfifo("plan.yaml")
    assert refused(cli(capsys, command, "plan.yaml")) == [
        "plan.yaml: <plan>: is not a regular file"
    ]


@COMMANDS
def test_a_directory(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    Path("plans").mkdir()
    assert refused(cli(capsys, command, "plans")) == [
        "plans: <plan>: is a directory, not a plan file"
    ]


@COMMANDS
def test_a_file_over_the_size_cap(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with open("plan.yaml", "wb") as f:
        f.truncate(MAX_PLAN_BYTES + 1)  # sparse: nothing is written
    assert refused(cli(capsys, command, "plan.yaml")) == [
        f"plan.yaml: <plan>: is {MAX_PLAN_BYTES + 1:,} bytes, "
        f"more than the {MAX_PLAN_BYTES:,} bytes a plan may be"
    ]


def test_a_file_at_the_size_cap_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    Path("plan.yaml").write_text(PLAN)
    monkeypatch.setattr(plan_module, "MAX_PLAN_BYTES", len(PLAN))
    assert load_plan("plan.yaml").plan.tasks[0].id == "a"
    monkeypatch.setattr(plan_module, "MAX_PLAN_BYTES", len(PLAN) - 1)
    with pytest.raises(PlanError, match="more than the"):
        load_plan("plan.yaml")


def test_a_link_to_a_plan_is_read(capsys: pytest.CaptureFixture[str]) -> None:
    Path("real.yaml").write_text(PLAN)
    Path("plan.yaml").symlink_to("real.yaml")
    assert load_plan("plan.yaml").plan.tasks[0].id == "a"


def test_plan_text_over_the_size_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_module, "MAX_PLAN_BYTES", len(PLAN) - 1)
    with pytest.raises(PlanError) as caught:
        parse_plan(PLAN, file="plan.yaml")
    assert str(caught.value) == (
        f"plan.yaml: <plan>: is {len(PLAN)} characters, "
        f"more than the {len(PLAN) - 1} characters a plan may be"
    )


def test_too_many_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_module, "MAX_PLAN_NODES", 50)
    text = PLAN + "x-many: [" + ", ".join(["1"] * 50) + "]\n"
    with pytest.raises(PlanError) as caught:
        parse_plan(text, file="plan.yaml")
    [issue] = caught.value.issues
    assert (issue.line, issue.message) == (5, "more than 50 values: too big for a plan")


# Deep nesting and huge numbers, in YAML and in JSON.


@COMMANDS
@pytest.mark.parametrize(
    ("text", "where"),
    [
        # libyaml's scanner stops it at its own limit of 1,000 levels, ahead of ours.
        pytest.param("[" * 100_000 + "]" * 100_000, ":1:1001", id="json"),
        pytest.param(
            json.dumps({"x-deep": 1}, indent="\t").replace("1", "[" * 100_000 + "]" * 100_000),
            ":2:1011",  # libyaml reads JSON's tabs, and stops at its 1,000 levels
            id="json-with-tabs",
        ),
        pytest.param(
            "".join(f"{' ' * i}k{i}:\n" for i in range(MAX_PLAN_DEPTH + 5)) + " " * 200 + "v\n",
            f":{MAX_PLAN_DEPTH}:{MAX_PLAN_DEPTH}",  # the first key past the limit
            id="yaml-block",
        ),
    ],
)
def test_deep_nesting(
    command: str, text: str, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("plan.json").write_text(text)
    assert refused(cli(capsys, command, "plan.json")) == [
        f"plan.json{where}: <plan>: nested too deeply: more than {MAX_PLAN_DEPTH} levels"
    ]


def test_nesting_up_to_the_limit_is_fine() -> None:
    inner = MAX_PLAN_DEPTH - 4  # the plan, tasks, the task and inputs are four levels
    deep = "[" * inner + "]" * inner
    parse_plan(PLAN.replace("do it}", "do it, inputs: {x: " + deep + "}}"))
    with pytest.raises(PlanError, match="nested too deeply"):
        parse_plan(PLAN.replace("do it}", "do it, inputs: {x: [" + deep + "]}}"))


@COMMANDS
def test_a_5000_digit_integer(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    task = {"id": "a", "agent": "w", "task": "t", "inputs": {"n": 0}}
    data = {"agents": {"w": {"command": ["python"]}}, "tasks": [task]}
    Path("plan.json").write_text(json.dumps(data).replace('"n": 0', '"n": ' + "9" * 5000))
    [line] = refused(cli(capsys, command, "plan.json"))
    assert line.startswith("plan.json:1:")
    assert "cannot read value '99999" in line and "(5,000 chars)" in line
    assert "set_int_max_str_digits" not in line
    assert len(line) < 300


# The real command, once.


@pytest.mark.parametrize("command", ["validate", "run"])
def test_the_command_prints_one_line_and_exits_2(command: str) -> None:
    Path("plan.yaml").write_text(alias_bomb(10, 9))
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", command, "plan.yaml"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result
    [line] = result.stderr.splitlines()
    assert line.startswith("plan.yaml:1:")
    assert "aliases expand the plan past" in line


def test_a_matrix_bomb_is_refused_before_it_is_expanded(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Eight keys of ten values: 100,000,000 members, from a few hundred bytes."""
    values = "[" + ", ".join(str(i) for i in range(10)) + "]"
    matrix = ", ".join(f"inputs.k{i}: {values}" for i in range(8))
    Path("plan.yaml").write_text(
        "agents: {w: {command: [echo]}}\n"
        f"tasks:\n  - {{id: t, agent: w, task: x, matrix: {{{matrix}}}}}\n"
    )
    assert refused(cli(capsys, "validate", "plan.yaml")) == [
        "plan.yaml:3:32: tasks[0].matrix: 100000000 combinations, more than 10000; "
        "split the task or list fewer values"
    ]
