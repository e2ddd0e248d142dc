"""The plan: which agents exist and which tasks to hand them.

A plan is data (YAML or JSON); these models are its schema. Checks that span several fields
(duplicate ids, undefined agents) live in :func:`plan_problems`, which reports each problem
with the path of the field at fault so that a loader can point at the line in the file.
"""

from __future__ import annotations

import graphlib
import itertools
import math
import re
import shlex
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    Tag,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)

from ._added import unset_addition
from ._bounded import relative_path_problem
from ._ids import MATRIX_VALUE_PATTERN, task_id_problem
from ._lean import SharedFieldNames

__all__ = [
    "MATRIX_FIELDS",
    "AgentSpec",
    "EnvSpec",
    "ExecutorSpec",
    "ExpandedTask",
    "KeepWorktrees",
    "Limits",
    "MergeSpec",
    "NotifyEvent",
    "NotifySpec",
    "Plan",
    "PlanDefaults",
    "PlanProblem",
    "Resources",
    "Sandbox",
    "Select",
    "Sparse",
    "SparsePath",
    "TaskSpec",
    "env_values",
    "expand_tasks",
    "plan_problems",
]

KeepWorktrees = Literal["never", "failed", "always"]

#: Longest an agent's attempt may run, in seconds, unless a task or the plan says otherwise.
DEFAULT_TIMEOUT_S = 600.0

#: Most tasks a run may run at once, however it is asked for (plan, CLI, API).
MAX_CONCURRENCY = 1024
Concurrency = Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)]
Select = Literal["first_success", "all"]
#: Fields a ``matrix`` may vary: these as they are, and ``inputs.<name>``, ``env.<name>`` and
#: ``metadata.<name>``.
MATRIX_FIELDS = ("agent", "task", "requirements", "timeout", "retries", "priority")
_MATRIX_DICTS = ("inputs", "env", "metadata")
_MATRIX_VALUE_RE = re.compile(MATRIX_VALUE_PATTERN)
PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(gt=0)]
#: ``bwrap``: each agent command runs in a bubblewrap sandbox (see docs/plan-format.md).
Sandbox = Literal["none", "bwrap"]
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


def _env_name(value: str) -> str:
    if not re.fullmatch(_ENV_NAME, value):
        raise ValueError(f"{value!r} is not a variable name (letters, digits and _)")
    return value


#: The name of an environment variable.
EnvName = Annotated[str, AfterValidator(_env_name), Field(json_schema_extra={"pattern": _ENV_NAME})]


def finite_json(value: Any) -> Any:
    """*value* unchanged, or ValueError if it holds NaN or an infinity (not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must not contain NaN or infinity (not representable in JSON)")
    if isinstance(value, dict):
        for item in value.values():
            finite_json(item)
    elif isinstance(value, list):
        for item in value:
            finite_json(item)
    return value


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required field missing",
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "too_short": "must not be empty",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
    "literal_error": "must be one of {expected}",
    "too_long": "must have at most {max_length} items, found {actual_length}",
    "finite_number": "must be a finite number",
}


#: Errors whose message names what was found, besides type errors.
_SHOWS_INPUT = frozenset(
    {"literal_error", "greater_than", "greater_than_equal", "less_than", "less_than_equal"}
)


def validation_message(error: Mapping[str, Any]) -> str:
    """A pydantic error as a plan's reader wants it: ``must be > 0``, ``must be a string, found 3``."""
    template = _MESSAGES.get(error["type"])
    if template is None:
        return str(error["msg"]).removeprefix("Value error, ")
    ctx = {
        k: (f"{v:g}" if isinstance(v, float) else v) for k, v in (error.get("ctx") or {}).items()
    }
    try:
        text = template.format(**ctx)
    except (KeyError, IndexError):
        text = error["msg"]
    if error["type"].endswith("_type") or error["type"] in _SHOWS_INPUT:
        text += (
            f", found {error['input']!r}"
            if not isinstance(error["input"], dict | list)
            else f", found {type(error['input']).__name__}"
        )
    return text


class _Strict(BaseModel):
    # An error's text does not repeat the value refused: a credential written where a ${NAME}
    # belongs, say. (Plan errors are worded from the error's parts: see validation_message.)
    model_config = ConfigDict(extra="forbid", strict=True, hide_input_in_errors=True)


class _Additions(_Strict):
    """A model whose newer fields are left out of its JSON while unset (None or empty), so
    that plans, envelopes and their digests from before those fields existed stay the same.
    Each such field is named in ``_ADDED`` and says so itself (``exclude_if=unset_addition``):
    pydantic's own serializer leaves it out (a Python serializer around every task's model
    was 25 us of each task's dump)."""

    _ADDED: ClassVar[frozenset[str]] = frozenset()


#: A Jinja2 template (docs/agents.md, "Prompts"); checked when a plan is loaded.
PromptTemplate = Annotated[str, Field(min_length=1, max_length=1_000_000)]


class Limits(_Strict, SharedFieldNames):
    """Resource limits of an agent's processes, set with setrlimit before the agent starts.

    Each is per process (the kernel's rule), except ``processes``, which counts every process
    of the user the agent runs as.
    """

    memory_mb: PositiveInt | None = None
    cpu_s: PositiveInt | None = None
    open_files: PositiveInt | None = None
    file_size_mb: PositiveInt | None = None
    processes: PositiveInt | None = None


class EnvSpec(_Strict):
    """``env`` in its structured form: ``{inherit: false, pass: [NAMES], set: {NAME: value}}``.

    ``inherit`` unset means: inherit the orchestrator's environment, unless the task is
    sandboxed. A plain mapping ``{NAME: value}`` is the same as ``{set: {NAME: value}}``.
    """

    inherit: bool | None = None
    pass_: list[EnvName] = Field(default_factory=list, alias="pass")
    set: dict[str, str] = Field(default_factory=dict)

    @model_serializer(mode="wrap")
    def _by_alias(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        # Always written as it is read ("pass", not "pass_"): plan.json is read back on resume.
        data: dict[str, Any] = handler(self)
        if "pass_" in data:
            data["pass"] = data.pop("pass_")
        return data


_ENV_KEYS = frozenset({"inherit", "pass", "set"})


def _env_form(value: Any) -> str:
    """Which form an ``env`` value is written in: a key of the structured form with a value
    that is not a string says structured (``{set: "x"}`` is a variable named ``set``)."""
    if isinstance(value, EnvSpec):
        return "structured"
    if isinstance(value, Mapping) and any(
        k in _ENV_KEYS and not isinstance(v, str) for k, v in value.items()
    ):
        return "structured"
    return "mapping"


def _any_of(schema: dict[str, Any]) -> None:
    # An empty mapping is valid in both forms: "oneOf" would refuse it.
    if "oneOf" in schema:
        schema["anyOf"] = schema.pop("oneOf")


#: Where a pydantic error's location names the form of ``env`` it was checked as.
ENV_FORMS = ("mapping", "structured")
Env = Annotated[
    Annotated[dict[str, str], Tag("mapping")] | Annotated[EnvSpec, Tag("structured")],
    Discriminator(_env_form),
    Field(json_schema_extra=_any_of),
]


def env_values(env: dict[str, str] | EnvSpec) -> dict[str, str]:
    """The variables an ``env`` sets, in either form."""
    return dict(env.set) if isinstance(env, EnvSpec) else dict(env)


class _Isolation(_Strict):
    """The isolation fields an agent or a task may set; unset (None) means: from the level above."""

    sandbox: Sandbox | None = None
    network: bool | None = None
    secrets: list[EnvName] = Field(default_factory=list)
    limits: Limits | None = None
    max_commit_mb: PositiveInt | None = None
    allow_secrets_in_commit: bool | None = None


#: ``${NAME}`` in an http header's value: the variable ``NAME`` of the agent's environment.
HEADER_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: Header names whose values are credentials: Authorization, Cookie, ``*-Token``, ``*-Key``
#: (``X-Api-Key``), ``*-Secret``, ``*-Password``, ``*-Auth``.
_CREDENTIAL_HEADER = re.compile(
    r"^(?:proxy-)?authorization$|^cookie$"
    r"|(?:^|[-_])(?:token|key|apikey|secret|password|passwd|auth|credentials?)$",
    re.IGNORECASE,
)
#: What a credential header's value may hold besides ``${NAME}``: an auth scheme
#: (``Bearer ``) or cookie names (``session=``), and separators.
_CREDENTIAL_FRAME = re.compile(r"^(?:[A-Za-z][A-Za-z0-9._-]{0,63}[ =]|[;,\s])*$")


class HttpSpec(_Strict):
    """An agent behind an HTTP endpoint (``agents.<name>.http``): the envelope is POSTed to
    ``url`` as JSON; see docs/agents.md, "HTTP agents". Header values may name variables of
    the agent's environment (which inherits the orchestrator's unless the task says otherwise)
    as ``${NAME}``: filled in when the request is sent, never written to a log, an event or
    the report. A credential header's (Authorization, Cookie, a name ending in ``-Token``,
    ``-Key``, ``-Secret``, ``-Password`` or ``-Auth``) must take its secret from there: its
    value may hold nothing else but an auth scheme (``Bearer ${TOKEN}``) or cookie names
    (``session=${SESSION}``). Written in the plan, it would be in ``plan.json`` in the run
    directory."""

    url: Annotated[str, Field(pattern=r"^https?://[^\s]+$", max_length=2000)]
    headers: dict[str, str] = Field(default_factory=dict)
    #: Seconds between polls of a ``202 Accepted`` task's ``Location``.
    poll_interval: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] = 2.0

    @field_validator("headers")
    @classmethod
    def _credentials_from_the_environment(cls, value: dict[str, str]) -> dict[str, str]:
        for name, template in value.items():
            literal = HEADER_VARIABLE.sub("", template)
            uses_variable = literal != template
            if _CREDENTIAL_HEADER.search(name) and not (
                uses_variable and _CREDENTIAL_FRAME.match(literal)
            ):
                scheme = "Bearer " if name.lower().endswith("authorization") else ""
                raise ValueError(
                    f"{name} holds a credential written in the plan, which plan.json would "
                    "keep: write it as ${NAME}, a variable of the agent's environment "
                    f'({name}: "{scheme}${{AGENT_TOKEN}}")'
                )
        return value


def _split_command(value: Any) -> Any:
    """A command written as a string, split as a shell would (nothing runs through one)."""
    return shlex.split(value) if isinstance(value, str) else value


def _program_given(value: list[str]) -> list[str]:
    if value and not value[0].strip():
        raise ValueError("the program (first element) must not be empty")
    return value


#: A program and its arguments (a string is split like a shell would).
Command = Annotated[list[str], BeforeValidator(_split_command), AfterValidator(_program_given)]


#: The kinds of tool call an Agent Client Protocol agent may ask permission for.
ToolKind = Literal[
    "read", "edit", "delete", "move", "search", "execute", "think", "fetch", "switch_mode", "other"
]


#: What an ACP agent is allowed unless its ``allow`` says otherwise: changing files.
DEFAULT_ACP_ALLOW: tuple[ToolKind, ...] = ("edit", "delete", "move")


class AcpSpec(_Strict):
    """An Agent Client Protocol agent (``agents.<name>.acp``), run over stdio in the task's
    worktree; see docs/agents.md, "ACP agents". ``command`` starts it (a string is split like
    a shell would; placeholders as a command's). ``allow`` is the permission policy: the kinds
    of tool call granted when the agent asks, and then only when every place the call names is
    inside the worktree; everything else is refused."""

    command: Command = Field(min_length=1, max_length=1000)
    allow: list[ToolKind] = Field(default_factory=lambda: list(DEFAULT_ACP_ALLOW))


#: A Dask worker resource's name (``gpu``, ``licence.matlab``): an agent's ``resources`` and
#: an embedded worker's.
ResourceName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")]
#: Amounts of resources by name: what an agent's task holds while it runs on a worker, or
#: what a worker has.
Resources = Annotated[
    dict[ResourceName, Annotated[float, Field(gt=0, le=1e9, allow_inf_nan=False)]],
    Field(max_length=32),
]


class AgentSpec(_Isolation, _Additions):
    """How to start an agent: a command run in the task's worktree, or a coding agent's preset.

    ``command`` is a list of arguments (a string is split like a shell would). Placeholders
    ``{plan_dir}``, ``{worktree}``, ``{task_id}`` and ``{run_id}`` in arguments are replaced
    when the task starts. ``preset`` names a coding agent the orchestrator knows how to run
    headless (``claude-code``, ``codex``, ``gemini``, ``aider``): ``program`` (default: the
    preset's, looked up on the task's PATH), ``model`` and ``args`` (appended) go with it.
    ``http`` is an agent behind an HTTP endpoint (:class:`HttpSpec`), ``acp`` one that speaks
    the Agent Client Protocol (:class:`AcpSpec`). Exactly one of ``command``, ``preset``,
    ``http`` and ``acp``.
    """

    _ADDED = frozenset({"preset", "program", "model", "args", "http", "acp", "resources", "sparse"})

    command: Command | None = Field(default=None, min_length=1)
    #: The directories the worktrees of this agent's tasks hold (see PlanDefaults.sparse).
    sparse: Sparse | None = Field(default=None, exclude_if=unset_addition)
    http: HttpSpec | None = Field(default=None, exclude_if=unset_addition)
    acp: AcpSpec | None = Field(default=None, exclude_if=unset_addition)
    preset: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,63}$")] | None = Field(
        default=None, exclude_if=unset_addition
    )
    program: Annotated[str, Field(min_length=1)] | None = Field(
        default=None, exclude_if=unset_addition
    )
    model: Annotated[str, Field(min_length=1, max_length=200)] | None = Field(
        default=None, exclude_if=unset_addition
    )
    args: list[str] = Field(default_factory=list, exclude_if=unset_addition)
    env: Env = Field(default_factory=dict)
    max_concurrency: Concurrency | None = None
    #: What each of its tasks holds on a Dask worker while it runs (``{gpu: 1}``): it runs
    #: only on a worker that has them free. The local executor has no resources to count.
    resources: Resources = Field(default_factory=dict, exclude_if=unset_addition)

    @model_validator(mode="after")
    def _one_way_to_start(self) -> AgentSpec:
        ways = (self.command, self.preset, self.http, self.acp)
        if sum(way is not None for way in ways) != 1:
            raise ValueError("an agent needs exactly one of command, preset, http and acp")
        if self.preset is None and (self.program or self.model or self.args):
            raise ValueError("program, model and args go with a preset")
        return self


#: The placeholders a step's or hook's command, and a requirement, may use.
PLACEHOLDERS = ("worktree", "repo_root", "plan_dir", "task_id")
#: ``{name}`` where *name* looks like one (an identifier); ``{{name}}`` is its escape, and a
#: shell's ``${NAME}`` is not one. Other braces (``{}``, ``{print $1}``) are left alone.
_PLACEHOLDER = re.compile(r"(?<![${])\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")
_ESCAPED = re.compile(r"\{\{([A-Za-z_][A-Za-z0-9_]*)\}\}")


def placeholder_problem(text: str) -> str | None:
    """Why *text* uses a placeholder that does not exist (None when it does not).

    ``{worktree}``, ``{repo_root}``, ``{plan_dir}`` and ``{task_id}`` are filled in; another
    ``{name}`` is an error. ``{{name}}`` is the text ``{name}``; a shell's ``${NAME}`` and
    braces around anything but a name (``{}``, ``{print $1}``) are left as they are.
    """
    for match in _PLACEHOLDER.finditer(text):
        if match.group(1) not in PLACEHOLDERS:
            known = ", ".join("{" + name + "}" for name in PLACEHOLDERS)
            return f"unknown placeholder {{{match.group(1)}}} (known: {known})"
    return None


def fill_placeholders(
    text: str, values: Mapping[str, str], quote: Callable[[str], str] = str
) -> str:
    """*text* with each placeholder replaced by its value in *values* (passed through
    *quote*: ``shlex.quote`` for a shell string), in one pass (a value holding ``{plan_dir}``
    stays as it is), and ``{{name}}`` made ``{name}``."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        return quote(values[name]) if name in values else match.group(0)

    filled = _PLACEHOLDER.sub(value, text)
    return _ESCAPED.sub(lambda match: "{" + match.group(1) + "}", filled)


def _placeholders_known(value: str) -> str:
    if why := placeholder_problem(value):
        raise ValueError(why)
    return value


def _step_command(value: Any) -> str | list[str]:
    """A step's ``run``: a shell string, or an argv list of at most 1000 strings; not empty
    (nor its program blank), and no unknown placeholder."""
    if isinstance(value, list) and all(isinstance(arg, str) for arg in value):
        if not value:
            raise ValueError("must not be empty")
        if len(value) > 1000:
            raise ValueError(f"must have at most 1000 arguments, found {len(value)}")
        texts: list[str] = value
    elif isinstance(value, str):
        texts = [value]
    else:
        raise ValueError("must be a string (run by /bin/sh -c) or a list of strings (an argv)")
    if not texts[0].strip():
        raise ValueError("must not be empty")
    for text in texts:
        _placeholders_known(text)
    return texts if isinstance(value, list) else texts[0]


#: A command a step or hook runs: a shell string (run by ``/bin/sh -c``) or an argv list.
StepCommand = Annotated[
    str | list[str],
    PlainValidator(_step_command),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1000},
            ]
        }
    ),
]


def _known_placeholders(value: str) -> str:
    if why := placeholder_problem(value):
        raise ValueError(why)
    return value


#: A requirement: an installer's argument, ``{worktree}`` and the other placeholders filled in
#: when the task's venv is made.
Requirement = Annotated[str, AfterValidator(_known_placeholders)]

StepName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
#: Default seconds a setup step or a check may take.
DEFAULT_STEP_TIMEOUT_S = 600.0
#: Default seconds a hook may take.
DEFAULT_HOOK_TIMEOUT_S = 60.0


class Step(_Strict):
    """A setup step (before the agent) or a check (after it): see docs/plan-format.md,
    "Setup and checks". A required one that fails fails the task."""

    name: StepName
    run: StepCommand
    timeout: PositiveSeconds = DEFAULT_STEP_TIMEOUT_S
    required: bool = True


def _unique_names(steps: list[Step] | None) -> list[Step] | None:
    seen: set[str] = set()
    for step in steps or []:
        if step.name in seen:
            raise ValueError(f"two steps are named {step.name!r}")
        seen.add(step.name)
    return steps


Steps = Annotated[list[Step], Field(max_length=100), AfterValidator(_unique_names)]


class VenvOptions(_Strict):
    """``venv`` in its structured form: ``{seed: true}`` puts pip (and setuptools) in it."""

    seed: bool = False


class Hooks(_Strict):
    """Commands run around each task's worktree (cwd: the worktree), like other workspace
    managers' hooks: see docs/plan-format.md, "Hooks"."""

    after_create: StepCommand | None = None
    before_run: StepCommand | None = None
    after_run: StepCommand | None = None
    before_remove: StepCommand | None = None
    timeout: PositiveSeconds = DEFAULT_HOOK_TIMEOUT_S


class Ports(_Strict):
    """A block of ports per running task: ``ORCHESTRATOR_PORT_BASE`` = base + slot x per_task."""

    base: Annotated[int, Field(ge=1024, le=65535)]
    per_task: Annotated[int, Field(ge=1, le=1000)] = 10

    def overflow(self, concurrency: int) -> str | None:
        """Why *concurrency* running tasks' blocks do not all fit below port 65536, or None."""
        end = self.base + concurrency * self.per_task
        if end <= 65536:
            return None
        return (
            f"base {self.base} + concurrency {concurrency} x per_task {self.per_task} = {end}, "
            "past the last port (65535): lower base, per_task or concurrency"
        )


def _copyable(value: str) -> str:
    if why := relative_path_problem(value):
        raise ValueError(why)
    return value


def _revision(value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(
            "holds a control character (a newline, a NUL...), which no git revision has"
        )
    return value


#: A git revision the plan names (``base``).
Revision = Annotated[str, Field(min_length=1), AfterValidator(_revision)]

#: A path of the main checkout copied into each worktree (``copy``).
CopyPath = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_copyable)]

#: Characters a cone-mode pattern would have to escape (and ``#`` starting a comment): not
#: in a ``sparse`` directory, nor control characters.
_CONE_SPECIAL = re.compile(r"[*?\[\]\\!#\x00-\x1f\x7f]")


def _sparse_directory(value: str) -> str:
    value = value.removesuffix("/")
    if why := relative_path_problem(value):
        raise ValueError(why)
    if value == ".git" or value.startswith(".git/"):
        raise ValueError(f"path {value!r} is git's own directory")
    if found := _CONE_SPECIAL.search(value):
        raise ValueError(f"path {value!r} holds {found.group()!r}, which a sparse cone cannot name")
    return value


#: A directory of a sparse worktree's cone (``sparse``), relative to the repository's root.
SparsePath = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_sparse_directory)]

_MAX_SPARSE = 1000


def _sparse(value: Any) -> list[str] | Literal[False]:
    """``sparse``: a list of directories, or ``false``; one plain message when neither."""
    if value is False:
        return False
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of directories, or false (all of them)")
    if len(value) > _MAX_SPARSE:
        raise ValueError(f"must name at most {_MAX_SPARSE} directories, found {len(value)}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not 0 < len(item) <= 4096:
            raise ValueError(f"[{i}] must be a directory's path, found {item!r:.80}")
        out.append(_sparse_directory(item))
    return out


#: ``sparse``: the directories a task's worktree holds (cone mode, and every file at the top
#: level); ``false`` (at an agent or a task) undoes a level above: a full worktree.
Sparse = Annotated[
    list[str] | Literal[False],
    PlainValidator(_sparse, json_schema_input_type=list[SparsePath] | Literal[False]),
]


#: The fields a task and the plan's defaults both got after plans were first written.
_TASK_FIELDS_ADDED = frozenset(
    {"prompt", "stall_timeout", "setup", "checks", "repair_attempts", "install_project", "sparse"}
)


class PlanDefaults(_Additions):
    """Values every task gets unless it sets its own."""

    _ADDED = _TASK_FIELDS_ADDED
    #: The prompt template of a preset's tasks (None: the preset's own default).
    prompt: PromptTemplate | None = Field(default=None, exclude_if=unset_addition)
    #: The directories every task's worktree holds (None: all of the repository).
    sparse: Sparse | None = Field(default=None, exclude_if=unset_addition)
    #: Steps run before the agent, in the worktree with the venv active.
    setup: Steps = Field(default_factory=list, exclude_if=unset_addition)
    #: Steps run after the agent, before the commit; a required one that fails fails the task.
    checks: Steps = Field(default_factory=list, exclude_if=unset_addition)
    #: More turns the agent gets, in the same worktree, after a required check failed.
    repair_attempts: Annotated[int, Field(ge=0, le=20)] | None = Field(
        default=None, exclude_if=unset_addition
    )
    #: Install the task's own worktree into its venv (editable).
    install_project: bool | None = Field(default=None, exclude_if=unset_addition)
    #: Seconds without a byte of an agent's output after which it is killed (kind
    #: ``stalled``); None: never.
    stall_timeout: PositiveSeconds | None = Field(default=None, exclude_if=unset_addition)

    timeout: PositiveSeconds = DEFAULT_TIMEOUT_S
    retries: Annotated[int, Field(ge=0, le=100)] = 0
    requirements: list[Requirement] = Field(default_factory=list)
    env: Env = Field(default_factory=dict)
    worktree: bool = True
    #: A venv per task (``{seed: true}``: with pip and setuptools in it).
    venv: bool | VenvOptions = True
    sandbox: Sandbox = "none"
    network: bool = False
    secrets: list[EnvName] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)
    max_commit_mb: PositiveInt = 100
    allow_secrets_in_commit: bool = False


class TaskSpec(_Isolation, _Additions):
    """One task of a plan, before defaults are applied."""

    _ADDED = _TASK_FIELDS_ADDED
    prompt: PromptTemplate | None = Field(default=None, exclude_if=unset_addition)
    sparse: Sparse | None = Field(default=None, exclude_if=unset_addition)
    stall_timeout: PositiveSeconds | None = Field(default=None, exclude_if=unset_addition)
    setup: Steps | None = Field(default=None, exclude_if=unset_addition)
    checks: Steps | None = Field(default=None, exclude_if=unset_addition)
    repair_attempts: Annotated[int, Field(ge=0, le=20)] | None = Field(
        default=None, exclude_if=unset_addition
    )
    install_project: bool | None = Field(default=None, exclude_if=unset_addition)

    id: str | None = None
    agent: str | None = None
    task: str
    inputs: dict[str, Any] = Field(default_factory=dict)
    requirements: list[Requirement] | None = None
    acceptance_criteria: list[str] = Field(default_factory=list)
    timeout: PositiveSeconds | None = None
    retries: Annotated[int, Field(ge=0, le=100)] | None = None
    env: Env = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    priority: int = 0
    worktree: bool | None = None
    venv: bool | VenvOptions | None = None
    depends_on: list[str] = Field(default_factory=list)
    cache: bool | None = None
    matrix: (
        Annotated[dict[str, Annotated[list[Any], Field(min_length=1)]], Field(min_length=1)] | None
    ) = None
    select: Select | None = None

    @field_validator("inputs", "metadata", "matrix")
    @classmethod
    def _finite(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return finite_json(value)  # type: ignore[no-any-return]


class Budget(_Strict):
    """The most a run may spend (``budget:``): once its agents' reported and estimated spend
    reaches a limit, no further task starts (each is ``skipped``, kind ``budget``); with
    ``on_exceed: cancel``, the running ones are cancelled too."""

    max_cost_usd: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    max_tokens: PositiveInt | None = None
    on_exceed: Literal["stop", "cancel"] = "stop"

    @model_validator(mode="after")
    def _a_limit(self) -> Budget:
        if self.max_cost_usd is None and self.max_tokens is None:
            raise ValueError("a budget needs max_cost_usd, max_tokens or both")
        return self


class Rates(_Strict):
    """What a model costs, in US dollars per million tokens (``pricing.<model>``)."""

    input: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    output: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    cache_read: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    cache_write: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


#: What a webhook may be sent (``notify[i].events``): the ``type`` of every event but
#: ``notification``, the record of a delivery (envelopes/_events.py has the models).
NotifyEvent = Literal[
    "run_started",
    "task_queued",
    "task_started",
    "task_phase",
    "attempt_failed",
    "task_retrying",
    "task_finished",
    "task_skipped",
    "group_decided",
    "merge_predicted",
    "merge_finished",
    "run_finished",
]
#: Most webhooks one plan may have.
MAX_NOTIFY = 16


class NotifySpec(_Strict):
    """A webhook (``notify[i]``): the run's events POSTed to ``url`` as JSON as they happen,
    signed with HMAC-SHA256 under the secret in the variable ``secret_env``; see
    docs/agents.md, "Webhooks". A delivery never holds the run up nor fails it. ``${NAME}``
    in ``url`` is the orchestrator's variable ``NAME``, filled in when the run starts (a
    token in a Slack-style path): written nowhere."""

    url: Annotated[str, Field(pattern=r"^https?://[^\s]+$", max_length=2000)]
    #: The events to send, by ``type``; None: every one.
    events: Annotated[list[NotifyEvent], Field(min_length=1)] | None = None
    #: The variable of the orchestrator's environment that holds the signing secret; None:
    #: deliveries are not signed.
    secret_env: EnvName | None = None
    #: Seconds one request may take, its answer read; a request past it is retried.
    timeout: Annotated[float, Field(gt=0, le=300, allow_inf_nan=False)] = 10.0

    @field_validator("url")
    @classmethod
    def _has_host(cls, value: str) -> str:
        # The value is not repeated: a URL may hold a credential.
        parts = urlsplit(value)
        if not parts.hostname:
            raise ValueError("names no host")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "must not hold a user or password, which plan.json would keep: write a secret "
                "part of a URL as ${NAME}, a variable of the orchestrator's environment"
            )
        return value


class MergeSpec(_Additions):
    """Merge the run's results into a branch when every task succeeded (see docs/plan-format.md)."""

    _ADDED = frozenset({"check", "train"})
    into: str = Field(min_length=1)
    tasks: list[str] | None = None
    #: Run the plan's required checks on the combined tree; move the branch only if they pass.
    check: bool | None = Field(default=None, exclude_if=unset_addition)
    #: Merge one result at a time, keeping each only if the combined tree still passes.
    train: bool | None = Field(default=None, exclude_if=unset_addition)


#: A Dask scheduler's address: ``tcp://host:port`` (``tls://`` with security set up).
SchedulerAddress = Annotated[
    str, Field(pattern=r"^(tcp|tls|inproc|ws|wss|ucx)://[^\s/]+$", max_length=500)
]


class ExecutorSpec(_Strict):
    """Where the tasks run (``executor``): ``local`` (this machine, the default) or ``dask``
    (the workers of a Dask cluster; see docs/distributed.md). A plan may write just the kind
    (``executor: dask``).

    For ``dask``: ``scheduler`` is an existing cluster's address; without it, the run starts
    an embedded cluster of ``workers`` worker processes (default 2) on this machine, with
    ``slots`` tasks at once each (default: the run's concurrency shared out) and
    ``resources`` each. A task whose agent needs resources that no worker has fails (kind
    ``placement``) after ``placement_timeout`` seconds; ``connect_timeout`` bounds the wait
    for the scheduler.
    """

    kind: Literal["local", "dask"] = "local"
    scheduler: SchedulerAddress | None = None
    workers: Annotated[int, Field(ge=1, le=256)] | None = None
    slots: Annotated[int, Field(ge=1, le=256)] | None = None
    resources: Resources = Field(default_factory=dict)
    placement_timeout: Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)] = 60.0
    connect_timeout: Annotated[float, Field(gt=0, le=600, allow_inf_nan=False)] = 10.0

    @model_validator(mode="before")
    @classmethod
    def _kind_alone(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _fits_the_kind(self) -> ExecutorSpec:
        embedded = ("workers", "slots", "resources")
        if self.kind == "local":
            given = sorted(self.model_fields_set - {"kind"})
            if given:
                raise ValueError(f"{', '.join(given)} go with kind dask, not local")
        elif self.scheduler is not None:
            given = sorted(self.model_fields_set & set(embedded))
            if given:
                raise ValueError(
                    f"{', '.join(given)} describe an embedded cluster: not with scheduler "
                    "(an existing cluster's workers are started with their own)"
                )
        return self

    @property
    def described(self) -> str:
        """The executor in a few words: ``local``, ``dask tcp://...``, ``dask (4 workers)``."""
        if self.kind == "local":
            return "local"
        if self.scheduler is not None:
            return f"dask {self.scheduler}"
        return f"dask (embedded, {self.workers or 2} workers)"


class Plan(_Additions):
    """A whole plan file."""

    _ADDED = frozenset({"budget", "pricing", "notify", "hooks", "copy_paths", "ports", "executor"})

    @model_serializer(mode="wrap")
    def _copy_as_written(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        # Written as it is read ("copy", not "copy_paths"): plan.json is read back on resume.
        data: dict[str, Any] = handler(self)
        if "copy_paths" in data:
            data["copy"] = data.pop("copy_paths")
        return data

    version: Literal[1] = 1
    name: str = Field(default="plan", min_length=1)
    repo: str | None = None
    base: Revision = "HEAD"
    concurrency: Concurrency = 4
    keep_worktrees: KeepWorktrees = "failed"
    fail_fast: bool = False
    cache: bool = False
    merge: MergeSpec | None = None
    budget: Budget | None = Field(default=None, exclude_if=unset_addition)
    #: Rates by model, to estimate what an agent that does not report its cost spent.
    pricing: dict[str, Rates] = Field(default_factory=dict, exclude_if=unset_addition)
    #: Webhooks told of the run's events.
    notify: Annotated[list[NotifySpec], Field(max_length=MAX_NOTIFY)] = Field(
        default_factory=list, exclude_if=unset_addition
    )
    #: Commands run around each task's worktree.
    hooks: Hooks | None = Field(default=None, exclude_if=unset_addition)
    #: Untracked or ignored files of the main checkout copied into each worktree.
    copy_paths: Annotated[list[CopyPath], Field(max_length=1000)] = Field(
        default_factory=list, alias="copy", exclude_if=unset_addition
    )
    #: A block of ports for each running task.
    ports: Ports | None = Field(default=None, exclude_if=unset_addition)
    #: Where the tasks run: this machine (the default) or a Dask cluster.
    executor: ExecutorSpec | None = Field(default=None, exclude_if=unset_addition)
    defaults: PlanDefaults = Field(default_factory=PlanDefaults)
    agents: dict[str, AgentSpec] = Field(default_factory=dict)
    tasks: list[TaskSpec] = Field(min_length=1)

    def task_ids(self) -> list[str]:
        """Every task's id, generating ``task-001``-style ids where the plan has none."""
        return [t.id or f"task-{i + 1:03d}" for i, t in enumerate(self.tasks)]


class PlanProblem(BaseModel):
    """One thing wrong with a plan, at a field path such as ``("tasks", 2, "timeout")``."""

    model_config = ConfigDict(frozen=True)

    loc: tuple[str | int, ...]
    message: str

    @property
    def path(self) -> str:
        """The field path as users write it: ``tasks[2].timeout``."""
        out = ""
        for part in self.loc:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
        return out or "<plan>"


@dataclass(frozen=True)
class ExpandedTask:
    """One task to run: a task of the plan, or one combination of a matrix task's values.

    ``spec`` has the combination's values applied (and no ``matrix``); ``group`` is the plan
    task's id for a matrix task, with its ``select`` policy.
    """

    index: int
    task_id: str
    spec: TaskSpec
    group: str | None = None
    select: Select | None = None


def _value_text(value: Any, position: int) -> str:
    """How a matrix value appears in a task id: itself if it is short and id-safe, else its
    1-based position in the list."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        text = str(value)
        if (
            _MATRIX_VALUE_RE.fullmatch(text)
            and ".." not in text
            and not text.endswith((".", ".lock"))
        ):
            return text
    return str(position + 1)


def _apply(data: dict[str, Any], key: str, value: Any) -> None:
    if key in MATRIX_FIELDS:
        data[key] = value
    else:
        field, name = key.split(".", 1)
        current = data.get(field) or {}
        if field == "env" and _env_form(current) == "structured":
            structured = current.model_dump() if isinstance(current, EnvSpec) else dict(current)
            data[field] = {**structured, "set": {**(structured.get("set") or {}), name: value}}
        else:
            data[field] = {**current, name: value}


def _matrix_key_problem(key: str) -> str | None:
    if key in MATRIX_FIELDS:
        return None
    field, _, name = key.partition(".")
    if field in _MATRIX_DICTS and name:
        return None
    return (
        f"a matrix cannot vary {key!r}: it varies {', '.join(MATRIX_FIELDS)}, "
        "inputs.<name>, env.<name> or metadata.<name>"
    )


def _combinations(
    task_id: str, matrix: Mapping[str, list[Any]]
) -> Iterator[tuple[str, list[tuple[str, Any]]]]:
    keys = list(matrix)
    for combo in itertools.product(*(list(enumerate(matrix[k])) for k in keys)):
        member = f"{task_id}[{','.join(_value_text(v, i) for i, v in combo)}]"
        yield member, [(k, v) for k, (_, v) in zip(keys, combo, strict=True)]


def expand_tasks(plan: Plan) -> list[ExpandedTask]:
    """Every task to run, matrix tasks expanded, in plan order.

    A matrix task ``impl`` with ``matrix: {agent: [a, b]}`` becomes ``impl[a]`` and
    ``impl[b]``; with several keys, one task per combination (``impl[a,1]``, ...), keys in the
    order written. Assumes a plan without :func:`plan_problems`.
    """
    out: list[ExpandedTask] = []
    for index, (task, task_id) in enumerate(zip(plan.tasks, plan.task_ids(), strict=True)):
        if not task.matrix:
            out.append(ExpandedTask(index, task_id, task))
            continue
        for member, values in _combinations(task_id, task.matrix):
            data = task.model_dump(exclude={"matrix", "select"})
            for key, value in values:
                _apply(data, key, value)
            out.append(
                ExpandedTask(
                    index,
                    member,
                    TaskSpec.model_validate(data),
                    group=task_id,
                    select=task.select or "all",
                )
            )
    return out


#: Most dependency cycles told at once (each costs a look at the whole graph).
MAX_CYCLES = 10


def dependency_cycles(ids: list[str], needs: list[list[int]]) -> list[list[int]]:
    """Cycles among tasks, no two sharing a task: ``needs[i]`` lists the tasks task *i* needs.

    Each cycle starts at its first task in plan order and follows "is needed by"; they come
    in plan order of those tasks. graphlib finds one cycle at a time: its tasks are taken out
    and the rest looked at again, for at most MAX_CYCLES cycles.
    """
    graph = {i: dict.fromkeys(deps) for i, deps in enumerate(needs)}
    found: list[list[int]] = []
    while len(found) < MAX_CYCLES:
        try:
            graphlib.TopologicalSorter(graph).prepare()
        except graphlib.CycleError as exc:
            # [a, b, ..., a], each needed by the next (graphlib follows successors).
            cycle: list[int] = exc.args[1][:-1]
        else:
            break
        first = cycle.index(min(cycle))
        found.append(cycle[first:] + cycle[:first])
        for node in cycle:
            # A task that needs a removed one keeps it as a predecessor: graphlib adds it
            # back with no predecessors of its own, on no cycle.
            del graph[node]
    return sorted(found)


def plan_problems(
    plan: Plan | Mapping[str, Any], *, callable_agents: frozenset[str] = frozenset()
) -> list[PlanProblem]:
    """Problems that span fields: ids, duplicate ids, agents that are not defined.

    Works on a validated Plan or on raw plan data (where it skips values of the wrong type,
    which schema validation reports), so that a loader can report these problems together
    with schema errors. *callable_agents* names agents supplied in code rather than in the
    plan's ``agents``.
    """
    data = plan.model_dump(exclude_none=True) if isinstance(plan, Plan) else plan
    agents = data.get("agents")
    agent_names = (
        {name for name in agents if isinstance(name, str)} if isinstance(agents, Mapping) else set()
    )
    tasks = data.get("tasks")
    problems: list[PlanProblem] = []
    for name in sorted(agent_names):
        if why := task_id_problem(name, what="agent name"):
            problems.append(PlanProblem(loc=("agents", name), message=why))
    if not isinstance(tasks, list):
        return problems
    seen: dict[str, int] = {}
    for index, task in enumerate(tasks):
        if not isinstance(task, Mapping):
            continue
        written = task.get("id")
        task_id = written if written is not None else f"task-{index + 1:03d}"
        if not isinstance(task_id, str):
            pass
        elif written is not None and (why := task_id_problem(task_id)):
            problems.append(PlanProblem(loc=("tasks", index, "id"), message=why))
        elif task_id in seen:
            message = (
                f"duplicate task id {task_id!r} (first at tasks[{seen[task_id]}])"
                if written is not None
                else f"the generated id {task_id!r} is already used by tasks[{seen[task_id]}]; give this task an id"
            )
            problems.append(PlanProblem(loc=("tasks", index, "id"), message=message))
        else:
            seen[task_id] = index
        matrix = task.get("matrix")
        matrix = matrix if isinstance(matrix, Mapping) else None
        agent = task.get("agent")
        varied_agents = matrix.get("agent") if matrix is not None else None
        defined = ", ".join(sorted({*agent_names, *callable_agents})) or "none"
        if isinstance(varied_agents, list):
            for j, name in enumerate(varied_agents):
                if isinstance(name, str) and name not in agent_names | callable_agents:
                    problems.append(
                        PlanProblem(
                            loc=("tasks", index, "matrix", "agent", j),
                            message=f"agent {name!r} is not defined (defined: {defined})",
                        )
                    )
        elif agent is None:
            problems.append(
                PlanProblem(
                    loc=("tasks", index, "agent"),
                    message="required (name an agent, or vary it with matrix.agent)",
                )
            )
        elif isinstance(agent, str) and agent not in agent_names and agent not in callable_agents:
            problems.append(
                PlanProblem(
                    loc=("tasks", index, "agent"),
                    message=f"agent {agent!r} is not defined (defined: {defined})",
                )
            )
        if task.get("select") is not None and matrix is None:
            problems.append(
                PlanProblem(
                    loc=("tasks", index, "select"),
                    message="select chooses among a matrix task's results; this task has no matrix",
                )
            )
        if matrix is not None and isinstance(task_id, str):
            problems += _matrix_problems(index, task_id, task, matrix)
    problems += _graph_problems(data, tasks) + _install_problems(data) + _ports_problems(data)
    return problems


def _ports_problems(data: Mapping[str, Any]) -> list[PlanProblem]:
    """``ports`` whose blocks, one per running task, go past the last port."""
    concurrency = data.get("concurrency", Plan.model_fields["concurrency"].default)
    if not isinstance(data.get("ports"), Mapping) or not isinstance(concurrency, int):
        return []
    try:
        ports = Ports.model_validate(data["ports"])
    except ValidationError:
        return []  # told by schema validation
    why = ports.overflow(concurrency)
    return [PlanProblem(loc=("ports",), message=why)] if why else []


def _install_problems(data: Mapping[str, Any]) -> list[PlanProblem]:
    """``install_project`` on tasks without a venv, each located where the task says either
    (the defaults' own told once)."""
    tasks, defaults = data.get("tasks"), data.get("defaults")
    tasks = tasks if isinstance(tasks, list) else []
    defaults = defaults if isinstance(defaults, Mapping) else {}
    message = "install_project needs the task's venv, and venv is false"
    problems: list[PlanProblem] = []
    for index, task in enumerate(tasks):
        if not isinstance(task, Mapping):
            continue
        said = {
            name: task[name] if task.get(name) is not None else defaults.get(name, default)
            for name, default in (("install_project", False), ("venv", True))
        }
        if said["install_project"] is not True or said["venv"] is not False:
            continue
        field = next((f for f in ("install_project", "venv") if task.get(f) is not None), None)
        loc = ("tasks", index, field) if field else ("defaults", "install_project")
        problem = PlanProblem(loc=loc, message=message)
        if problem not in problems:
            problems.append(problem)
    return problems


#: Most members one matrix task may expand to (the product of its value counts).
MAX_MATRIX_MEMBERS = 10_000


def _matrix_problems(
    index: int, task_id: str, task: Mapping[str, Any], matrix: Mapping[str, Any]
) -> list[PlanProblem]:
    problems: list[PlanProblem] = []
    base = {k: v for k, v in task.items() if k not in ("matrix", "select")}
    base.setdefault("agent", "?")
    try:
        TaskSpec.model_validate(base)
    except ValidationError:
        base = {}  # the task's own fields are wrong: the schema errors say so
    for key, values in matrix.items():
        if why := _matrix_key_problem(key):
            problems.append(PlanProblem(loc=("tasks", index, "matrix", key), message=why))
            continue
        if not base or not isinstance(values, list):
            continue
        for j, value in enumerate(values):
            data = dict(base)
            _apply(data, key, value)
            try:
                TaskSpec.model_validate(data)
            except ValidationError as exc:
                problems.append(
                    PlanProblem(
                        loc=("tasks", index, "matrix", key, j),
                        message=validation_message(exc.errors()[0]),
                    )
                )
    if problems or not all(isinstance(v, list) and v for v in matrix.values()):
        return problems
    combinations = math.prod(len(v) for v in matrix.values())
    if combinations > MAX_MATRIX_MEMBERS:
        problems.append(
            PlanProblem(
                loc=("tasks", index, "matrix"),
                message=f"{combinations} combinations, more than {MAX_MATRIX_MEMBERS}; "
                "split the task or list fewer values",
            )
        )
        return problems
    seen: set[str] = set()
    for member, _ in _combinations(task_id, matrix):
        if member in seen:
            problems.append(
                PlanProblem(
                    loc=("tasks", index, "matrix"),
                    message=f"two combinations would both be {member!r}; make the values distinct",
                )
            )
            break
        seen.add(member)
    return problems


def _graph_problems(data: Mapping[str, Any], tasks: list[Any]) -> list[PlanProblem]:
    """Unknown or repeated ``depends_on`` entries, dependency cycles, unknown ``merge.tasks``."""
    problems: list[PlanProblem] = []
    ids: list[str] = []
    by_name: dict[str, int] = {}  # plan task ids and matrix members' ids -> plan index
    for index, task in enumerate(tasks):
        written = task.get("id") if isinstance(task, Mapping) else None
        task_id = written if isinstance(written, str) else f"task-{index + 1:03d}"
        ids.append(task_id)
        by_name.setdefault(task_id, index)
        matrix = task.get("matrix") if isinstance(task, Mapping) else None
        if (
            isinstance(matrix, Mapping)
            and all(isinstance(v, list) for v in matrix.values())
            and math.prod(len(v) for v in matrix.values()) <= MAX_MATRIX_MEMBERS
        ):
            for member, _ in _combinations(task_id, matrix):
                by_name.setdefault(member, index)
    needs: list[list[int]] = [[] for _ in tasks]
    for index, task in enumerate(tasks):
        deps = task.get("depends_on") if isinstance(task, Mapping) else None
        if not isinstance(deps, list):
            continue
        listed: set[str] = set()
        for j, name in enumerate(deps):
            if not isinstance(name, str):
                continue
            loc = ("tasks", index, "depends_on", j)
            if name not in by_name:
                problems.append(PlanProblem(loc=loc, message=f"unknown task id {name!r}"))
            elif name in listed:
                problems.append(PlanProblem(loc=loc, message=f"{name!r} is listed twice"))
            else:
                needs[index].append(by_name[name])
            listed.add(name)
    for cycle in dependency_cycles(ids, needs):
        names = " -> ".join(ids[i] for i in [*cycle, cycle[0]])
        problems.append(
            PlanProblem(loc=("tasks", cycle[0], "depends_on"), message=f"cycle {names}")
        )
    merge = data.get("merge")
    chosen = merge.get("tasks") if isinstance(merge, Mapping) else None
    if isinstance(chosen, list):
        for j, name in enumerate(chosen):
            if isinstance(name, str) and name not in by_name:
                problems.append(
                    PlanProblem(loc=("merge", "tasks", j), message=f"unknown task id {name!r}")
                )
    return problems
