"""The fast way into a plan: the same data as the careful way for every plain plan, and no
answer at all (so the careful way decides) for anything that is not plain."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.errors import PlanError
from orchestrator.plan import MAX_PLAN_DEPTH, MAX_PLAN_NODES, _careful, parse_plan
from orchestrator.plan_events import plain_data

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"```ya?ml\n(.*?)```", re.S)


def _plans() -> list[tuple[str, str]]:
    found = [(p.name, p.read_text()) for p in sorted((ROOT / "plans").glob("*.y*ml"))]
    found += [(p.name, p.read_text()) for p in (ROOT / "orchestrator" / "demo").glob("*.yaml")]
    for doc in sorted((ROOT / "docs").glob("*.md")):
        for i, block in enumerate(FENCE.findall(doc.read_text())):
            if re.search(r"^tasks:", block, re.M):
                found.append((f"{doc.name}#{i}", block))
    return found


def fast(text: str) -> object:
    return plain_data(text, max_nodes=MAX_PLAN_NODES, max_depth=MAX_PLAN_DEPTH)


@pytest.mark.parametrize(("name", "text"), _plans(), ids=[n for n, _ in _plans()])
def test_every_plain_plan_reads_the_same_both_ways(name: str, text: str) -> None:
    data = fast(text)
    if data is None:
        return  # not plain (anchors, merge keys): only the careful way reads it
    try:
        careful = _careful(text, name)[0]
    except PlanError:
        pytest.fail("the fast way read a plan the careful way refuses")
    assert data == careful


SCALARS = """
a: plain
b: "quoted: yes"
c: 12
d: 1.5
e: true
f: null
g: ~
h: 0o17
i: 2026-01-02
j: 2026-01-02T03:04:05Z
k: '007'
l: 1e5
m: [1, "two", {n: 3}]
o: |
  block
  text
"""


def test_most_plans_are_plain() -> None:
    plain = [name for name, text in _plans() if fast(text) is not None]
    assert len(plain) >= len(_plans()) // 2, plain
    assert any(name == "demo.yaml" for name in plain)


def test_scalars_resolve_as_yaml_says() -> None:
    assert fast(SCALARS) == _careful(SCALARS, None)[0]


@pytest.mark.parametrize(
    "text",
    [
        "base: &b {x: 1}\ntasks: [*b]\n",  # anchor and alias
        "x-t: &t {agent: a}\ntasks:\n  - <<: *t\n    task: go\n",  # merge key
        "tasks: !!str 12\n",  # an explicit tag
        "a: 1\na: 2\n",  # a duplicate key
        "1: one\n",  # a key that is no string
        "a: 1\n---\nb: 2\n",  # two documents
        'a: "\\ud83d\\ude00"\n',  # a surrogate pair, joined the careful way
        "[" * (MAX_PLAN_DEPTH + 1) + "]" * (MAX_PLAN_DEPTH + 1),  # too deep
        "a: [1, 2\n",  # not YAML
        "a: 2020-13-45\n",  # a date that is none
    ],
)
def test_what_is_not_plain_is_left_to_the_careful_way(text: str) -> None:
    assert fast(text) is None


def test_too_many_values_is_left_to_the_careful_way() -> None:
    text = "tasks: [" + ", ".join(["1"] * 50) + "]\n"
    assert plain_data(text, max_nodes=40, max_depth=10) is None
    assert plain_data(text, max_nodes=60, max_depth=10) == {"tasks": [1] * 50}


PLAN = """\
agents:
  a: {command: [echo]}
tasks:
  - {id: one, agent: a, task: go}
  - {id: two, agent: nobody, task: go}
"""


def test_a_plain_plan_with_a_problem_is_placed_at_its_line() -> None:
    with pytest.raises(PlanError) as caught:
        parse_plan(PLAN, file="plan.yaml")
    (issue,) = caught.value.issues
    assert str(issue).startswith("plan.yaml:5:")


def test_problems_found_later_are_placed_too() -> None:
    """A plan read the fast way keeps its text: a problem found once it is loaded (its
    repository, say) is placed at its line all the same."""
    loaded = parse_plan(PLAN.replace("nobody", "a"), file="plan.yaml")
    assert loaded.positions == {} and loaded.source is not None
    issue = loaded.issue(("tasks", 1, "agent"), "not here")
    assert (issue.line, issue.column) == (5, 15)  # where its key is


SECRET_PLAN = """\
secrets: [TOP_VALUE]
defaults: {secrets: [DEFAULT_VALUE], env: {TOP_VALUE: a, DEFAULT_VALUE: b, PLAIN: c}}
agents:
  a: {command: [echo], secrets: [AGENT_VALUE], env: {AGENT_VALUE: d, API_KEY: e}}
  b: {command: [echo], env: {set: {AGENT_VALUE: f}}}
tasks:
  - {id: one, agent: a, task: go, env: {AGENT_VALUE: g, MINE: h}, secrets: [MINE]}
  - {id: two, agent: b, task: go, env: {AGENT_VALUE: i}}
  - {id: three, agent: a, task: go, matrix: {model: [x, y]}}
copy: [".env"]
"""


@pytest.mark.parametrize(
    ("name", "text"), [*_plans(), ("secrets", SECRET_PLAN)], ids=[*[n for n, _ in _plans()], "s"]
)
def test_plan_json_is_made_a_task_at_a_time_with_the_same_bytes(name: str, text: str) -> None:
    from envelopes import canonical_json, masked_plan
    from orchestrator.plan import plan_json

    try:
        loaded = parse_plan(text, file=name)
    except PlanError:
        return  # a plan the docs show as invalid
    whole = canonical_json(masked_plan(loaded.plan.model_dump(mode="json")))
    assert plan_json(loaded.plan) == whole
    if name == "secrets":
        assert b'"API_KEY":"***"' in whole and b'"MINE":"***"' in whole
        assert b'"PLAIN":"c"' in whole


@pytest.mark.parametrize(
    "text",
    [
        "a: !\nb: ! x\n",  # empty and non-specific tags
        "x-deep: " + "[" * (MAX_PLAN_DEPTH - 1) + "1" + "]" * (MAX_PLAN_DEPTH - 1) + "\n",
        "n: " + ":".join(["1"] + ["0"] * 60) + "\n",  # a long base-60 number
    ],
)
def test_edge_cases_a_review_found_are_left_to_the_careful_way(text: str) -> None:
    assert fast(text) is None


def test_a_long_base_60_number_is_refused_not_computed() -> None:
    text = PLAN.replace("go}", "go, inputs: {n: " + ":".join(["1"] + ["0"] * 50_000) + "}}")
    with pytest.raises(PlanError, match="base-60 number longer than 100"):
        parse_plan(text, file="plan.yaml")


def test_the_fast_way_keeps_nothing_between_plans() -> None:
    import gc

    text = "tasks: [" + ", ".join(str(i) for i in range(5000)) + "]\n"
    fast(text)
    gc.collect()
    before = len(gc.get_objects())
    for _ in range(3):
        fast(text)
    gc.collect()
    assert len(gc.get_objects()) - before < 1000


def test_both_ways_read_the_same_syntax() -> None:
    """libyaml is more lenient than PyYAML's own scanner (a tab after a colon, say): both ways
    read libyaml's events, so what one accepts the other does, alike."""
    for text in ["a:\tb\n", "a: [b? ]\n", '{\n\t"a": 1e+21\n}\n', "\ufeff{a: 1}\n"]:
        assert fast(text) == _careful(text, None)[0], text
