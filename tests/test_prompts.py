"""Prompt templates: rendered in Jinja2's sandbox from the envelope, checked at plan time."""

from __future__ import annotations

from pathlib import Path

import pytest

from envelopes import Upstream, build_envelope
from orchestrator.prompts import (
    DEFAULT_TEMPLATE,
    MAX_PROMPT_BYTES,
    VARIABLES,
    PromptError,
    render_prompt,
    template_problem,
)

from .conftest import cli


def envelope(**extra: object) -> object:
    return build_envelope(
        "claude",
        "Add a slugify helper",
        task_id="slug",
        inputs={"module": "textkit/slug.py", "n": 3},
        acceptance_criteria=["tests pass", "no new dependency"],
        **extra,  # type: ignore[arg-type]
    )


def test_the_default_template_tells_the_task_its_inputs_criteria_and_where_to_work() -> None:
    assert template_problem(DEFAULT_TEMPLATE) is None
    text = render_prompt(envelope())  # type: ignore[arg-type]
    assert text.startswith("Add a slugify helper\n")
    assert '- module: "textkit/slug.py"' in text and "- n: 3" in text
    assert "- tests pass" in text and "- no new dependency" in text
    assert "do not commit" in text
    assert "previous attempt" not in text


def test_upstream_and_feedback_reach_the_prompt() -> None:
    env = envelope().model_copy(  # type: ignore[attr-defined]
        update={
            "upstream": {
                "design": Upstream(output={"api": "slugify(text)"}, branch="orchestrator/r/design")
            }
        }
    )
    text = render_prompt(env, attempt=2, feedback="exit_code: exited with code 1: boom")
    assert "design (branch orchestrator/r/design)" in text and '"api": "slugify(text)"' in text
    assert (
        "This is attempt 2. The previous attempt failed: exit_code: exited with code 1: boom"
        in text
    )


def test_a_plans_template_sees_every_variable() -> None:
    template = " | ".join(f"{{{{ {name} }}}}" for name in sorted(VARIABLES))
    assert template_problem(template) is None
    text = render_prompt(envelope(prompt=template), attempt=3, feedback="f")  # type: ignore[arg-type]
    assert text.startswith("['tests pass', 'no new dependency'] | 3 | f | {'module'")
    assert "| Add a slugify helper | slug | {}" in text


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{{ task }", "prompt template, line 1: unexpected '}'"),
        ("{% for x in inputs %}{{ x }}", "prompt template, line 1: Unexpected end of template"),
        ("{{ secrets }}", "unknown variable 'secrets' in the prompt template"),
        ("{{ task | shout }}", "line 1: no filter named 'shout'"),
        ("{% if task is shouting %}x{% endif %}", "line 1: no test named 'shouting'"),
    ],
)
def test_a_bad_template_is_one_line_naming_what_is_wrong(template: str, problem: str) -> None:
    found = template_problem(template)
    assert found is not None and problem.lower() in found.lower() and "\n" not in found


def test_the_sandbox_refuses_reaching_into_python() -> None:
    attack = "{{ task.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(PromptError, match="cannot be rendered"):
        render_prompt(envelope(prompt=attack))  # type: ignore[arg-type]


def test_an_agents_output_is_data_to_the_template_never_code() -> None:
    """A dependency's output (another agent wrote it) holding template syntax stays text."""
    env = envelope().model_copy(  # type: ignore[attr-defined]
        update={"upstream": {"a": Upstream(output={"note": "{{ task.__class__ }}"}, branch="b")}}
    )
    assert '"note": "{{ task.__class__ }}"' in render_prompt(env)


def test_a_prompt_too_large_is_refused() -> None:
    big = envelope().model_copy(  # type: ignore[attr-defined]
        update={"inputs": {"blob": "x" * (MAX_PROMPT_BYTES + 10)}}
    )
    with pytest.raises(PromptError, match="larger than"):
        render_prompt(big)


def test_validate_reports_a_bad_template_at_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "defaults:\n"
        "  worktree: false\n"
        "  prompt: 'Do {{ taks }}'\n"
        "agents: {a: {command: ['true']}}\n"
        "tasks:\n"
        "  - {id: t, agent: a, task: x, prompt: '{{ task | nope }}'}\n"
    )
    outcome = cli(capsys, "validate", str(plan))
    assert outcome.code == 2
    lines = outcome.err.splitlines()
    assert lines[0].startswith(f"{plan}:3:3: defaults.prompt: unknown variable 'taks'")
    assert lines[1].startswith(f"{plan}:6:") and "tasks[0].prompt" in lines[1]
    assert "no filter named 'nope'" in lines[1].lower()
