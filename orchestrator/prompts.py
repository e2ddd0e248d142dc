"""Prompts: what a coding agent is told, rendered from its task's envelope by Jinja2.

A template is the plan's (``defaults.prompt`` or a task's ``prompt``), or, when none is
given, :data:`DEFAULT_TEMPLATE`. It is rendered once per attempt in Jinja2's sandboxed
environment, with undefined names an error, from these variables (the default template is
written by :func:`default_prompt` instead, the same text without importing Jinja2):

``task``, ``task_id``
    The task's description and id.
``inputs``, ``acceptance_criteria``
    The task's inputs (a mapping) and acceptance criteria (a list of strings).
``upstream``
    What each dependency produced, by task id: ``output`` (its output, whole), ``branch``,
    ``result_commit``, ``changed_files`` (the paths its result changed, at most
    ``envelopes.MAX_CHANGED_FILES``) and ``changed_files_omitted`` (how many more).
``attempt``
    The attempt's number, from 1.
``feedback``
    Why the previous attempt failed (its error's kind and message), or None on the first.

Besides Jinja2's own filters: ``tojson`` writes plain JSON (keys sorted, unicode and
``<>&'`` as they are: Jinja2's escapes them for HTML), and ``excerpt(n)`` cuts a text to at
most *n* bytes, saying how much it left out (the default template so bounds what each
dependency's output adds).

A plan's template is checked when the plan is loaded (:func:`template_problem`): a syntax
error, an unknown variable, filter or test, or a tag that loads another template (there is
none to load) is a plan error, located in the file. What the template is given comes partly
from other agents (a dependency's output): it is data to the template, never code, and the
rendered prompt is bounded (:data:`MAX_PROMPT_BYTES`); a template that cannot be rendered
fails the attempt with kind ``prompt``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from typing import TYPE_CHECKING, Any

from envelopes import ErrorInfo, HandoffEnvelope

if TYPE_CHECKING:  # Jinja2 is imported when a template is first checked or rendered
    import jinja2
    from jinja2 import nodes
    from jinja2.sandbox import SandboxedEnvironment

__all__ = [
    "DEFAULT_TEMPLATE",
    "MAX_PROMPT_BYTES",
    "UPSTREAM_OUTPUTS_BYTES",
    "UPSTREAM_OUTPUT_BYTES",
    "VARIABLES",
    "PromptError",
    "default_prompt",
    "excerpt",
    "render_prompt",
    "template_problem",
]

#: The names a template may use.
VARIABLES = frozenset(
    {"task", "task_id", "inputs", "acceptance_criteria", "upstream", "attempt", "feedback"}
)

#: Largest rendered prompt, in bytes (UTF-8).
MAX_PROMPT_BYTES = 1 << 20
#: Most of one dependency's output (its JSON) the default template includes, in bytes.
UPSTREAM_OUTPUT_BYTES = 4096
#: Most the default template includes of all the dependencies' outputs together: with many
#: dependencies, each output gets its share of it (and each list of changed files a quarter
#: of that share).
UPSTREAM_OUTPUTS_BYTES = 256 * 1024

#: What a preset's agent is told when the plan gives no template.
DEFAULT_TEMPLATE = (
    """\
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
"""
    # Each dependency's output and changed files get a share of what the prompt may hold.
    f"{{% set share = [{UPSTREAM_OUTPUT_BYTES}, "
    f"{UPSTREAM_OUTPUTS_BYTES} // ([1, upstream | length] | max)] | min %}}\n"
    """\
{% if upstream %}

It builds on tasks already done (their results are in the repository you start from):
{% for id, done in upstream | dictsort %}
- {{ id }}{% if done.branch %} (branch {{ done.branch }}){% endif %}

{% if done.changed_files %}
  changed: {{ done.changed_files | map("tojson") | join(", ") | excerpt(share // 4) }}\
{% if done.changed_files_omitted %} and {{ done.changed_files_omitted }} more{% endif %}

{% endif %}
{% if done.output %}
  output: {{ done.output | tojson | excerpt(share) }}
{% endif %}
{% endfor %}
{% endif %}
{% if feedback and feedback.step is defined and feedback.step %}

This is turn {{ attempt }}. Your changes so far are still in the current directory, but the
check `{{ feedback.step }}` failed on them (exit code {{ feedback.exit_code }}). The end of its
output:

{{ feedback.output_tail }}

Fix what makes it fail, keeping what was right.
{% elif feedback %}

This is attempt {{ attempt }}. The previous attempt failed: {{ feedback }}
Fix that first.
{% endif %}

Work in the current directory, which is a git checkout made for this task: change files there
and leave them; do not commit, push or switch branches (the orchestrator commits your changes).
"""
)


class Feedback(str):
    """Why the previous turn failed, as the next one's prompt is told (``feedback``).

    It is the text ``<kind>: <message>`` (what a template written for the plain string gets
    with ``{{ feedback }}``), and its parts are attributes: ``kind``, ``message``, ``attempt``
    (the turn that failed) and, when a check failed, ``step``, ``exit_code`` and
    ``output_tail`` (the end of the check's output, masked); else those are None.
    """

    kind: str
    message: str
    attempt: int
    step: str | None
    exit_code: int | None
    output_tail: str | None

    @classmethod
    def of_error(cls, error: ErrorInfo, *, attempt: int) -> Feedback:
        """The feedback of a failed attempt: its error."""
        return cls._made(error.kind, error.message, attempt, None, None, None)

    @classmethod
    def of_check(
        cls, error: ErrorInfo, *, attempt: int, step: str, exit_code: int | None, output_tail: str
    ) -> Feedback:
        """The feedback of a failed check: its error, the step, its exit code and output."""
        return cls._made(error.kind, error.message, attempt, step, exit_code, output_tail)

    def parts(self) -> dict[str, str | int | None]:
        """Its parts, as JSON (``ORCHESTRATOR_FEEDBACK`` for a command agent)."""
        return {
            "kind": self.kind,
            "message": self.message,
            "attempt": self.attempt,
            "step": self.step,
            "exit_code": self.exit_code,
            "output_tail": self.output_tail,
        }

    @classmethod
    def _made(
        cls,
        kind: str,
        message: str,
        attempt: int,
        step: str | None,
        exit_code: int | None,
        output_tail: str | None,
    ) -> Feedback:
        made = cls(f"{kind}: {message}")
        made.kind, made.message, made.attempt = kind, message, attempt
        made.step, made.exit_code, made.output_tail = step, exit_code, output_tail
        return made


class PromptError(ValueError):
    """A template that cannot be rendered (or renders too much); one line."""

    def info(self) -> ErrorInfo:
        """The attempt's error: kind ``prompt``."""
        return ErrorInfo(kind="prompt", message=str(self))


def excerpt(text: Any, limit: int = UPSTREAM_OUTPUT_BYTES) -> str:
    """*text* cut to at most *limit* bytes of UTF-8 (a character cut in two is left out),
    with a note saying how much of it that is; *text* itself when it is no longer."""
    whole = str(text)
    data = whole.encode("utf-8", "surrogatepass")
    limit = max(0, int(limit))
    if len(data) <= limit:
        return whole
    kept = data[:limit].decode("utf-8", "ignore")
    shown = len(kept.encode("utf-8"))
    return f"{kept} [... cut: {shown} of {len(data)} bytes shown]"


def _tojson(value: Any, indent: int | None = None) -> str:
    """JSON as a prompt reads it: keys sorted, unicode and ``<>&'`` as they are (Jinja2's
    own ``tojson`` escapes those for HTML, which an agent would read as ``\\u003c``)."""
    import jinja2

    if isinstance(value, jinja2.Undefined):
        str(value)  # StrictUndefined: the error that names what is undefined
    try:
        text: str = json.dumps(value, ensure_ascii=False, sort_keys=True, indent=indent)
    except (TypeError, ValueError) as exc:
        raise jinja2.TemplateRuntimeError(f"tojson: {exc}") from None
    return text


_ENV_LOCK = threading.RLock()
_ENV: SandboxedEnvironment | None = None


def _env() -> SandboxedEnvironment:
    """The sandboxed environment every template is checked and rendered in, made once, when
    first needed (attempts render in worker threads: the first ones wait for it): a run
    whose agents are given no prompt (commands, callables) never imports Jinja2 (20 to 40
    ms of its start)."""
    if _ENV is None:
        with _ENV_LOCK:
            return _env_unlocked()
    return _ENV


def _env_unlocked() -> SandboxedEnvironment:
    """:func:`_env`, for a caller that holds ``_ENV_LOCK``."""
    global _ENV
    if _ENV is None:
        _ENV = _made_env()
    return _ENV


def _made_env() -> SandboxedEnvironment:
    import jinja2
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["tojson"] = _tojson
    env.filters["excerpt"] = excerpt
    return env


def _loading() -> dict[type[nodes.Node], str]:
    """Tags that load another template: a prompt template is one string, with none to load."""
    from jinja2 import nodes

    return {
        nodes.Extends: "{% extends %}",
        nodes.Include: "{% include %}",
        nodes.Import: "{% import %}",
        nodes.FromImport: "{% from ... import %}",
    }


def _parse(template: str) -> nodes.Template:
    """*template* parsed; PromptError for a syntax error or a tag that loads a template."""
    import jinja2

    try:
        parsed = _env().parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise PromptError(f"prompt template, line {exc.lineno}: {exc.message}") from None
    loading = _loading()
    for node in parsed.find_all(tuple(loading)):
        raise PromptError(
            f"prompt template, line {node.lineno}: {loading[type(node)]} is not supported: "
            "a prompt template is one self-contained text, with no other template to load"
        )
    return parsed


def _compiled(template: str) -> jinja2.Template:
    """*template* parsed and compiled, once: compiling the default template takes
    milliseconds, and every attempt of a preset's agent renders it. The first attempts of a
    run render at once, each in a worker thread: one compiles, the others wait for it (four
    compiling side by side took four times as long)."""
    key = hashlib.sha256(template.encode("utf-8", "surrogatepass")).hexdigest()
    with _ENV_LOCK:
        # A lock per template: a big one compiling (seconds, for a megabyte) holds up no other.
        lock = _COMPILING.setdefault(key, threading.Lock())
    with lock:
        return _compiled_once(template)


#: The lock of each template compiled (by digest), while this process lives.
_COMPILING: dict[str, threading.Lock] = {}


@functools.lru_cache(maxsize=8)
def _compiled_once(template: str) -> jinja2.Template:
    return _env_unlocked().from_string(_parse(template))


@functools.lru_cache(maxsize=32)
def template_problem(template: str) -> str | None:
    """What is wrong with *template*, in one line, or None: a syntax error (with its line),
    a variable that is not one of :data:`VARIABLES`, an unknown filter or test, a tag that
    loads another template (``include``, ``import``, ``extends``). Each distinct template is
    checked once (a plan of many tasks often gives each the same)."""
    import jinja2
    from jinja2 import meta, nodes

    env = _env()
    try:
        parsed = _parse(template)
        unknown = sorted(meta.find_undeclared_variables(parsed) - VARIABLES)
        if unknown:
            known = ", ".join(sorted(VARIABLES))
            return f"unknown variable {unknown[0]!r} in the prompt template (known: {known})"
        # Jinja2 finds an unknown filter or test only when it is reached while rendering.
        for node in parsed.find_all((nodes.Filter, nodes.Test)):
            what, table = (
                ("filter", env.filters) if isinstance(node, nodes.Filter) else ("test", env.tests)
            )
            if node.name not in table:
                return f"prompt template, line {node.lineno}: no {what} named {node.name!r}"
        _compiled(template)
    except PromptError as exc:
        return str(exc)
    except jinja2.TemplateSyntaxError as exc:
        return f"prompt template, line {exc.lineno}: {exc.message}"
    except jinja2.TemplateError as exc:
        return f"prompt template: {exc}"
    return None


def variables(
    envelope: HandoffEnvelope, *, attempt: int, feedback: Feedback | None
) -> dict[str, Any]:
    """The variables a template is rendered with (plain JSON values, and ``feedback``: a
    string with its parts as attributes)."""
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


def default_prompt(values: dict[str, Any]) -> str:
    """:data:`DEFAULT_TEMPLATE` rendered from *values* (:func:`variables`) without Jinja2:
    the same text, character for character (tests/test_prompts.py compares the two on
    hundreds of generated envelopes), for the plans that give no template, which are most.
    Importing Jinja2 and compiling the template cost a run 30 ms of its start."""
    lines = [f"{values['task']}\n"]
    if values["inputs"]:
        lines.append("\nInputs:\n")
        lines.extend(f"- {name}: {_json(value)}\n" for name, value in _by_key(values["inputs"]))
    if values["acceptance_criteria"]:
        lines.append("\nThe work is done when:\n")
        lines.extend(f"- {criterion}\n" for criterion in values["acceptance_criteria"])
    upstream = values["upstream"]
    share = min(UPSTREAM_OUTPUT_BYTES, UPSTREAM_OUTPUTS_BYTES // max(1, len(upstream)))
    if upstream:
        lines.append(
            "\nIt builds on tasks already done "
            "(their results are in the repository you start from):\n"
        )
        for task_id, done in _by_key(upstream):
            branch = f" (branch {done['branch']})" if done["branch"] else ""
            lines.append(f"- {task_id}{branch}\n")
            if done["changed_files"]:
                changed = ", ".join(_json(path) for path in done["changed_files"])
                more = done["changed_files_omitted"]
                omitted = f" and {more} more" if more else ""
                lines.append(f"  changed: {excerpt(changed, share // 4)}{omitted}\n")
            if done["output"]:
                lines.append(f"  output: {excerpt(_json(done['output']), share)}\n")
    feedback = values["feedback"]
    attempt = values["attempt"]
    if feedback and getattr(feedback, "step", None):
        lines.append(
            f"\nThis is turn {attempt}. Your changes so far are still in the current directory,"
            f" but the\ncheck `{feedback.step}` failed on them (exit code {feedback.exit_code})."
            f" The end of its\noutput:\n\n{feedback.output_tail}\n\n"
            "Fix what makes it fail, keeping what was right.\n"
        )
    elif feedback:
        lines.append(
            f"\nThis is attempt {attempt}. The previous attempt failed: {feedback}\n"
            "Fix that first.\n"
        )
    lines.append(
        "\nWork in the current directory, which is a git checkout made for this task: change"
        " files there\nand leave them; do not commit, push or switch branches (the orchestrator"
        " commits your changes).\n"
    )
    return "".join(lines)


def _by_key(mapping: dict[str, Any]) -> list[tuple[str, Any]]:
    """Jinja2's ``dictsort``: the items by key, case ignored, in their order where equal."""
    return sorted(mapping.items(), key=lambda item: item[0].lower())


def _json(value: Any) -> str:
    """The ``tojson`` filter's text (the values are JSON already: :func:`variables`)."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def render_prompt(
    envelope: HandoffEnvelope, *, attempt: int = 1, feedback: Feedback | None = None
) -> str:
    """The envelope's prompt: its template (else the default) rendered; PromptError if not,
    or if it is larger than :data:`MAX_PROMPT_BYTES`."""
    template = envelope.prompt if envelope.prompt is not None else DEFAULT_TEMPLATE
    values = variables(envelope, attempt=attempt, feedback=feedback)
    if template == DEFAULT_TEMPLATE:
        try:
            text = default_prompt(values)
        except AttributeError as exc:  # a feedback without the parts it says it has
            raise PromptError(f"the prompt template cannot be rendered: {exc}") from None
    else:
        import jinja2

        try:
            text = _compiled(template).render(values)
        except jinja2.TemplateError as exc:
            raise PromptError(f"the prompt template cannot be rendered: {exc}") from None
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_PROMPT_BYTES:
        raise PromptError(
            f"the rendered prompt is larger than the {MAX_PROMPT_BYTES >> 20} MiB a prompt may "
            f"be ({size} bytes): make the template include less (`| excerpt(4096)` cuts a "
            "value, as the default template cuts each dependency's output)"
        )
    return text
