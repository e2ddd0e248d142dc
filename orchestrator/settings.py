"""Run settings: every knob of a run in one frozen object, resolved once.

Where a value comes from, later sources winning:

1. the built-in defaults (this class's fields; those a plan has too, ``concurrency``,
   ``keep_worktrees``, ``fail_fast`` and ``base``, taken from the plan's model, so that
   each has one default);
2. the plan's top-level values (``concurrency``, ``keep_worktrees``, ``fail_fast``, ``base``,
   ``budget``, ``pricing``, ``hooks``, ``copy`` as ``copy_paths``, ``ports``, ``executor``)
   and each agent's ``max_concurrency`` (into ``agent_limits``); on a resume, the settings the
   run started with, as its journal recorded them, take the plan's place;
3. what the caller passes: CLI options, or keyword arguments of ``orchestrate_parallel``
   (``None`` means "not given").

The result is validated once, with the plan's bounds and wording (``concurrency: must be <=
1024, found 2000``): a bad value raises :class:`SettingsError` naming the setting, which the
CLI turns into exit 2 naming its option. The run reads its settings from this object only
(``ctx.settings``), and journals it as one record (:meth:`RunSettings.journal_form`) that a
resume reads back as one (:meth:`RunSettings.from_journal`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Protocol, TypedDict, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
)

from envelopes import (
    Budget,
    Concurrency,
    CopyPath,
    ExecutorSpec,
    Hooks,
    KeepWorktrees,
    Plan,
    Ports,
    Rates,
    Resources,
    validation_message,
)

from .errors import SettingsError
from .venv import ALL_BACKENDS, VenvBackend, get_backend

__all__ = [
    "FALLBACK_STATE_DIR",
    "RunSettings",
    "SettingsOverrides",
    "plan_settings",
    "resolve_settings",
    "state_root",
]

#: Where runs live when there is no repository to keep them in its git directory.
FALLBACK_STATE_DIR = Path(".orchestrator")

#: The defaults of the settings a plan has too, as the plan's model gives them.
_PLAN_DEFAULTS: dict[str, Any] = {
    name: Plan.model_fields[name].default
    for name in ("concurrency", "keep_worktrees", "fail_fast", "base")
}


class ExecutorChoice(Protocol):
    """An executor made in code with its own options (``DaskExecutor(scheduler=...)``): what
    the ``executor`` setting holds when it is not just an ``ExecutorSpec``."""

    @property
    def spec(self) -> ExecutorSpec:
        """Its kind and options, as the journal records them."""
        ...

    def bind(self, ctx: Any) -> Any:
        """The executor of one run (orchestrator/executor.py's ``Executor``)."""
        ...


def _executor_form(value: Any) -> dict[str, Any]:
    spec = value if isinstance(value, ExecutorSpec) else value.spec
    return spec.model_dump(mode="json", exclude_unset=True) or {"kind": "local"}


Seconds = Annotated[float, Field(ge=0, le=86_400, allow_inf_nan=False)]


class SettingsOverrides(TypedDict, total=False):
    """The settings a caller may pass to ``orchestrate_parallel`` as keyword arguments."""

    concurrency: int | None
    pool: int | None
    keep_worktrees: KeepWorktrees | None
    fail_fast: bool | None
    base: str | None
    venv_backend: str | VenvBackend | None
    kill_grace: float | None
    backoff: tuple[float, float] | None
    agent_limits: Mapping[str, int] | None
    state_dir: Path | str | None
    executor: str | ExecutorSpec | Mapping[str, Any] | ExecutorChoice | None
    budget: Budget | Mapping[str, Any] | None
    pricing: Mapping[str, Rates | Mapping[str, float]] | None
    hooks: Hooks | Mapping[str, Any] | None
    copy_paths: Sequence[str] | None
    ports: Ports | Mapping[str, int] | None


def _revision(value: str) -> str:
    """A base (``--base``, ``base=``) that git could never resolve, refused before it
    reaches git: a newline or a NUL would split or cut its command."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(
            "holds a control character (a newline, a NUL...), which no git revision has"
        )
    return value


class RunSettings(BaseModel):
    """How one run runs. Frozen: a run's settings never change while it runs."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    # The settings a plan has too take their defaults from the plan's model: one default each.

    #: At most this many tasks at once.
    concurrency: Concurrency = _PLAN_DEFAULTS["concurrency"]
    #: Worktrees (and venvs per requirement set) kept for later tasks; None: ``concurrency``.
    pool: Annotated[int, Field(ge=0, le=1024)] | None = None
    #: Which tasks' worktrees stay after the run.
    keep_worktrees: KeepWorktrees = _PLAN_DEFAULTS["keep_worktrees"]
    #: Cancel everything at the first failed task.
    fail_fast: bool = _PLAN_DEFAULTS["fail_fast"]
    #: The commit or ref every task starts from (dependents start from their dependencies').
    base: Annotated[str, Field(min_length=1), AfterValidator(_revision)] = _PLAN_DEFAULTS["base"]
    #: How venvs are made: ``auto``, ``uv``, ``stdlib``, or a VenvBackend object (in code).
    venv_backend: Annotated[Any, PlainSerializer(lambda b: b if isinstance(b, str) else b.name)] = (
        "auto"
    )
    #: Seconds between SIGTERM and SIGKILL when an agent is stopped.
    kill_grace: Seconds = 2.0
    #: First and longest wait between a task's attempts, in seconds.
    backoff: tuple[Seconds, Seconds] = (1.0, 30.0)
    #: At most this many tasks of one agent at once, by agent name.
    agent_limits: dict[str, Annotated[int, Field(ge=1, le=1024)]] = Field(default_factory=dict)
    #: What each task of an agent holds on a Dask worker while it runs, by agent name
    #: (each agent's ``resources``).
    agent_resources: dict[str, Resources] = Field(default_factory=dict)
    #: Where runs, worktrees and venvs live; None: ``<git-dir>/orchestrator``, or
    #: ``./.orchestrator`` without a repository.
    state_dir: Path | None = None
    #: Where tasks run: an ``ExecutorSpec`` (its ``kind`` one of orchestrator/executor.py's
    #: ``EXECUTORS``; a plan's ``executor``, ``--executor``), or in code an executor object
    #: made with its own options (``DaskExecutor(scheduler=...)``), which has a ``spec``.
    executor: Annotated[Any, PlainSerializer(_executor_form)] = ExecutorSpec()
    #: The most the run's agents may spend (see ``envelopes.Budget``); None: no limit.
    budget: Budget | None = None
    #: Rates by model, for agents that do not report what they cost (``envelopes.Rates``).
    pricing: dict[str, Rates] = Field(default_factory=dict)
    #: Commands run around each task's worktree and agent (the plan's ``hooks``).
    hooks: Hooks | None = None
    #: Untracked or ignored files of the main checkout copied into each worktree (``copy``).
    copy_paths: list[CopyPath] = Field(default_factory=list, max_length=1000)
    #: A block of ports for each running task (``ORCHESTRATOR_PORT_BASE``).
    ports: Ports | None = None

    @field_validator("venv_backend", mode="plain")
    @classmethod
    def _backend(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value != "auto" and value not in ALL_BACKENDS:
                names = [repr(n) for n in ("auto", *ALL_BACKENDS)]
                choices = f"{', '.join(names[:-1])} or {names[-1]}"
                raise ValueError(f"must be one of {choices}, found {value!r}")
            return value
        if not (hasattr(value, "name") and hasattr(value, "create")):
            raise ValueError(f"must be a backend name or a VenvBackend, found {value!r}")
        return value

    @field_validator("executor", mode="plain")
    @classmethod
    def _executor(cls, value: Any) -> Any:
        if isinstance(value, ExecutorSpec):
            return value
        if value is None:
            return ExecutorSpec()
        if isinstance(value, str):
            kinds = get_args(ExecutorSpec.model_fields["kind"].annotation)
            if value not in kinds:
                choices = " or ".join(", ".join(repr(k) for k in kinds).rsplit(", ", 1))
                raise ValueError(f"must be one of {choices}, found {value!r}")
            return ExecutorSpec.model_validate({"kind": value})
        if isinstance(value, Mapping):
            return ExecutorSpec.model_validate(value)
        if not (isinstance(getattr(value, "spec", None), ExecutorSpec) and hasattr(value, "bind")):
            raise ValueError(f"must be an executor's kind, options or object, found {value!r}")
        return value

    @property
    def executor_spec(self) -> ExecutorSpec:
        """The executor's kind and options (an executor object's own)."""
        value = self.executor
        return value if isinstance(value, ExecutorSpec) else value.spec

    @field_validator("backoff")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] > value[1]:
            raise ValueError(f"the first wait must not be longer than the longest, found {value}")
        return value

    @property
    def pool_size(self) -> int:
        """How many worktrees the pool keeps (0: no pool)."""
        return self.concurrency if self.pool is None else self.pool

    def backend(self) -> VenvBackend:
        """The venv backend object (``auto`` chooses uv when it is installed)."""
        if isinstance(self.venv_backend, str):
            return get_backend(self.venv_backend)
        return self.venv_backend  # type: ignore[no-any-return]

    def state_root(self, repository_state_dir: Path | None) -> Path:
        """Where this run's state lives (see :func:`state_root`)."""
        return state_root(repository_state_dir, self.state_dir)

    def journal_form(self) -> dict[str, Any]:
        """As the journal records it (``state_dir`` is where the journal is: not recorded)."""
        return self.model_dump(mode="json", exclude={"state_dir"})

    @classmethod
    def from_journal(cls, record: Mapping[str, Any]) -> RunSettings:
        """The settings a journal recorded (older journals recorded fewer: the rest default)."""
        known = {k: v for k, v in record.items() if k in cls.model_fields}
        if "backoff" in known and isinstance(known["backoff"], list):
            known["backoff"] = tuple(known["backoff"])
        return _validated(known)


def state_root(repository_state_dir: Path | None, state_dir: Path | str | None) -> Path:
    """Where runs live: the repository's state directory (``<git-dir>/orchestrator`` unless
    *state_dir* moved it), else *state_dir*, else ``./.orchestrator``."""
    if repository_state_dir is not None:
        return repository_state_dir
    return Path(state_dir or FALLBACK_STATE_DIR).absolute()


def plan_settings(plan: Plan | None) -> dict[str, Any]:
    """The settings a plan sets, as values for :class:`RunSettings`."""
    if plan is None:
        return {}
    # Only what the plan sets: a default is RunSettings' (which takes the plan's own).
    values: dict[str, Any] = {
        name: getattr(plan, name)
        for name in (
            *("concurrency", "keep_worktrees", "fail_fast", "base", "budget", "pricing"),
            *("hooks", "copy_paths", "ports", "executor"),
        )
        if name in plan.model_fields_set
    }
    values["agent_limits"] = {
        name: spec.max_concurrency
        for name, spec in plan.agents.items()
        if spec.max_concurrency is not None
    }
    resources = {name: spec.resources for name, spec in plan.agents.items() if spec.resources}
    if resources:
        values["agent_resources"] = resources
    return values


def resolve_settings(
    plan: Plan | None,
    overrides: Mapping[str, Any] | SettingsOverrides,
    *,
    recorded: RunSettings | None = None,
) -> RunSettings:
    """Defaults, then the plan's values, then the fields *recorded* sets (a resumed run's
    settings as its journal has them, or a RunSettings given in code), then *overrides* (None
    values are not given); validated once. SettingsError names the setting."""
    values = plan_settings(plan)
    if recorded is not None:
        for name in recorded.model_fields_set:
            value = getattr(recorded, name)
            values[name] = (
                {**values.get("agent_limits", {}), **value} if name == "agent_limits" else value
            )
    given: Mapping[str, Any] = overrides
    for name, value in given.items():
        if name not in RunSettings.model_fields:
            raise TypeError(f"unknown setting {name!r}")
        if value is None:
            continue
        if name == "agent_limits":
            value = {**values.get("agent_limits", {}), **dict(value)}
        elif name == "state_dir":
            value = Path(value)
        elif name == "backoff":
            value = tuple(value)
        elif name == "executor" and isinstance(value, Mapping):
            value = _over_executor(values.get("executor"), value)
        values[name] = value
    return _validated(values)


def _over_executor(earlier: Any, given: Mapping[str, Any]) -> Mapping[str, Any]:
    """Executor options *given* (``--workers 8``) over the plan's, when of the same kind: an
    address given drops the embedded cluster's options, and the other way round."""
    if not isinstance(earlier, ExecutorSpec) or earlier.kind != given.get("kind", earlier.kind):
        return given
    merged = earlier.model_dump(exclude_unset=True) | dict(given)
    if "scheduler" in given:
        for name in ("workers", "slots", "resources"):
            merged.pop(name, None)
    elif {"workers", "slots", "resources"} & set(given):
        merged.pop("scheduler", None)
    return merged


def _validated(values: Mapping[str, Any]) -> RunSettings:
    try:
        settings = RunSettings.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = ".".join(str(part) for part in error["loc"]) or "settings"
        raise SettingsError(name, validation_message(error)) from None
    if settings.ports is not None and (why := settings.ports.overflow(settings.concurrency)):
        # A plan's own ports and concurrency were checked with the plan: a concurrency given
        # on top of them is what went too far.
        raise SettingsError("concurrency", f"ports: {why}")
    return settings
