"""Prompts: what a coding agent is told, rendered from its task's envelope by Jinja2.

A template is the plan's (``defaults.prompt`` or a task's ``prompt``), or, when none is
given, :data:`DEFAULT_TEMPLATE`. It is rendered once per attempt in Jinja2's sandboxed
environment, with undefined names an error, from these variables:

``task``, ``task_id``
    The task's description and id.
``inputs``, ``acceptance_criteria``
    The task's inputs (a mapping) and acceptance criteria (a list of strings).
``upstream``
    What each dependency produced, by task id: ``output``, ``result_commit``, ``branch``.
``attempt``
    The attempt's number, from 1.
``feedback``
    Why the previous attempt failed (its error's kind and message), or None on the first.

A plan's template is checked when the plan is loaded (:func:`template_problem`): a syntax
error, an unknown variable or an unknown filter is a plan error, located in the file. What
the template is given comes partly from other agents (a dependency's output): it is data to
the template, never code, and the rendered prompt is bounded (:data:`MAX_PROMPT_BYTES`).
"""

from __future__ import annotations

import json
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import SandboxedEnvironment

from envelopes import HandoffEnvelope

__all__ = [
    "DEFAULT_TEMPLATE",
    "MAX_PROMPT_BYTES",
    "VARIABLES",
    "PromptError",
    "render_prompt",
    "template_problem",
]

#: The names a template may use.
VARIABLES = frozenset(
    {"task", "task_id", "inputs", "acceptance_criteria", "upstream", "attempt", "feedback"}
)

#: Largest rendered prompt, in bytes (UTF-8).
MAX_PROMPT_BYTES = 1 << 20

#: What a preset's agent is told when the plan gives no template.
DEFAULT_TEMPLATE = """\
{{ task }}
{% if inputs %}

Inputs:
{% for name, value in inputs | dictsort %}
- {{ name }}: {{ value | tojson }}
{% endfor %}
{% endif %}
{% if acceptance_criteria %}

The work is done when:
{% for criterion in acceptance_criteria %}
- {{ criterion }}
{% endfor %}
{% endif %}
{% if upstream %}

It builds on tasks already done (their results are in the repository you start from):
{% for id, done in upstream | dictsort %}
- {{ id }} (branch {{ done.branch }}){% if done.output %}: {{ done.output | tojson }}{% endif %}

{% endfor %}
{% endif %}
{% if feedback %}

This is attempt {{ attempt }}. The previous attempt failed: {{ feedback }}
Fix that first.
{% endif %}

Work in the current directory, which is a git checkout made for this task: change files there
and leave them; do not commit, push or switch branches (the orchestrator commits your changes).
"""


class PromptError(ValueError):
    """A template that cannot be rendered (or renders too much); one line."""


def _environment() -> SandboxedEnvironment:
    env = SandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    # JSON as a prompt reads it: unicode as is, keys in order given (dictsort sorts them).
    env.policies["json.dumps_kwargs"] = {"ensure_ascii": False, "sort_keys": True}
    return env


_ENV = _environment()


def template_problem(template: str) -> str | None:
    """What is wrong with *template*, in one line, or None: a syntax error (with its line),
    a variable that is not one of :data:`VARIABLES`, an unknown filter or test."""
    try:
        parsed = _ENV.parse(template)
        unknown = sorted(meta.find_undeclared_variables(parsed) - VARIABLES)
        if unknown:
            known = ", ".join(sorted(VARIABLES))
            return f"unknown variable {unknown[0]!r} in the prompt template (known: {known})"
        # Jinja2 finds an unknown filter or test only when it is reached while rendering.
        for node in parsed.find_all((nodes.Filter, nodes.Test)):
            what, table = (
                ("filter", _ENV.filters) if isinstance(node, nodes.Filter) else ("test", _ENV.tests)
            )
            if node.name not in table:
                return f"prompt template, line {node.lineno}: no {what} named {node.name!r}"
        _ENV.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        return f"prompt template, line {exc.lineno}: {exc.message}"
    except jinja2.TemplateError as exc:
        return f"prompt template: {exc}"
    return None


def variables(envelope: HandoffEnvelope, *, attempt: int, feedback: str | None) -> dict[str, Any]:
    """The variables a template is rendered with (plain JSON values)."""
    return {
        "task": envelope.task,
        "task_id": envelope.task_id,
        "inputs": json.loads(json.dumps(envelope.inputs)),
        "acceptance_criteria": list(envelope.acceptance_criteria),
        "upstream": {
            task_id: done.model_dump(mode="json") for task_id, done in envelope.upstream.items()
        },
        "attempt": attempt,
        "feedback": feedback,
    }


def render_prompt(
    envelope: HandoffEnvelope, *, attempt: int = 1, feedback: str | None = None
) -> str:
    """The envelope's prompt: its template (else the default) rendered; PromptError if not."""
    template = envelope.prompt if envelope.prompt is not None else DEFAULT_TEMPLATE
    try:
        text = _ENV.from_string(template).render(
            variables(envelope, attempt=attempt, feedback=feedback)
        )
    except jinja2.TemplateError as exc:
        raise PromptError(f"the prompt template cannot be rendered: {exc}") from None
    if len(text.encode("utf-8", "surrogatepass")) > MAX_PROMPT_BYTES:
        raise PromptError(f"the rendered prompt is larger than {MAX_PROMPT_BYTES} bytes")
    return text
