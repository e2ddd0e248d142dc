"""What comes out: TaskResult with its Provenance, and the Report of a whole run.

Digests are filled in by :func:`seal_result` and :func:`seal_report`, which hash the JSON form
of the model with the digest field removed; :mod:`envelopes._audit` recomputes them from a
report file without trusting these models.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, overload

from pydantic import (
    AfterValidator,
    AwareDatetime,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    SerializerFunctionWrapHandler,
)
from pydantic_core import SchemaSerializer, core_schema

from ._added import unset_addition
from ._bounded import relative_path_problem
from ._canonical import digest_without, json_line
from ._ids import BranchName, Digest, ObjectId, RunId, Seal, TaskId
from ._lean import SharedFieldNames
from ._plan import Rates, Select
from ._usage import Usage, UsageTotals

__all__ = [
    "NOT_RETRIED",
    "REPORT_SCHEMA",
    "REPORT_SCHEMAS",
    "REPORT_SCHEMA_V1",
    "SUCCESSFUL",
    "AgentInfo",
    "AgentSummary",
    "Attempt",
    "CachedFrom",
    "CopiedFile",
    "Environment",
    "ErrorInfo",
    "ErrorKind",
    "GroupMember",
    "GroupReport",
    "LeftOutTask",
    "LogFile",
    "MergeCheck",
    "MergeConflict",
    "MergeRecord",
    "MergeStatus",
    "MergedTask",
    "Metrics",
    "Provenance",
    "Report",
    "ReportError",
    "SealedResults",
    "Summary",
    "TaskResult",
    "TaskStatus",
    "Timings",
    "report_digest",
    "seal_report",
    "seal_result",
    "sealed_result_line",
]

#: The first report format: every result indented, ``report_sha256`` over the whole report.
REPORT_SCHEMA_V1 = "worktree-orchestrator/report/v1"
#: The format written now (docs/report-format.md, "Versions"): a result a line, and
#: ``report_sha256`` over the report with each result replaced by its ``result_sha256``.
REPORT_SCHEMA = "worktree-orchestrator/report/v2"
#: The formats ``verify`` reads.
REPORT_SCHEMAS: tuple[str, ...] = (REPORT_SCHEMA_V1, REPORT_SCHEMA)

#: Largest offset a LogFile may name (beyond any file a run writes).
MAX_OFFSET = 1 << 62

TaskStatus = Literal["succeeded", "failed", "timed_out", "cancelled", "skipped", "cached"]
#: The statuses that count as success: ``cached`` is an earlier success, reused.
SUCCESSFUL: frozenset[str] = frozenset({"succeeded", "cached"})
ErrorKind = Literal[
    "dependency",
    "dependency_conflict",
    "not_needed",
    "exit_code",
    "limit",
    "timeout",
    "invalid_output",
    "spawn",
    "agent_exception",
    "install",
    "worktree",
    "commit",
    "cancelled",
    "internal",
    "tamper",
    "secret_leak",
    "too_large",
    # A coding agent's own failures, as its preset reads them (docs/agents.md):
    "auth",  # not logged in, no or a bad API key: never retried
    "rate_limited",  # the provider's rate limit or quota: retried with backoff
    "turn_limit",  # the agent ran out of turns
    "agent_error",  # the agent said it failed, for any other reason
    "stalled",  # no output for stall_timeout seconds: killed
    "budget",  # the run's budget was spent: not started, or cancelled (on_exceed: cancel)
    "patch",  # an HTTP agent's patch does not apply to the worktree
    "prompt",  # the prompt template could not be rendered, or rendered too much
    "setup",  # a required setup step failed: the agent did not run
    "check",  # a required check failed on what the agent did (after its repair turns)
    "hook",  # a required hook (after_create, before_run) failed
    # Where the task runs (the Dask executor, docs/distributed.md):
    "worker_lost",  # the worker running the task left the cluster: run again elsewhere
    "placement",  # no worker of the cluster has the resources the task's agent needs
    "transfer",  # the task's work could not be brought back from its worker intact
]

#: Error kinds a retry cannot help with: not logged in, and a prompt template that the
#: same envelope would render the same way again.
NOT_RETRIED: frozenset[str] = frozenset({"auth", "prompt"})


def _run_dir_path(value: str) -> str:
    if why := relative_path_problem(value):
        raise ValueError(why)
    return value


#: A path relative to the run directory that stays inside it (see relative_path_problem).
RunDirPath = Annotated[str, AfterValidator(_run_dir_path)]


class _Model(SharedFieldNames):
    model_config = ConfigDict(extra="forbid")


class _Additions(_Model):
    """A model with fields added after reports were first written: left out of the JSON while
    unset (None or empty), so that a report written before them reads back in its written
    form, and results without them hash as they did. Each such field is named in ``_ADDED``
    and says so itself (``exclude_if=unset_addition``): pydantic's own serializer leaves it
    out, with no Python serializer around the whole model (40 us a result before)."""

    _ADDED: ClassVar[frozenset[str]] = frozenset()


class ErrorInfo(_Model):
    """Why a task or attempt did not succeed."""

    kind: ErrorKind
    message: str
    paths: list[str] = Field(default_factory=list)


class LogFile(_Additions):
    """A file in the run directory, named by its path relative to it, with its digest; or,
    with an ``offset``, the *size* bytes from there of a file that holds many records (the
    run's ``envelopes.jsonl``)."""

    _ADDED = frozenset({"offset"})

    path: RunDirPath
    sha256: Digest
    size: int = Field(ge=0)
    offset: int | None = Field(default=None, ge=0, le=MAX_OFFSET, exclude_if=unset_addition)


class CheckResult(_Model):
    """One setup step, check or hook as it ran (docs/report-format.md, "Setup and checks",
    "Hooks").

    ``turn`` is the number of the attempt it belongs to: a setup step runs before that
    attempt's agent, a check after it; a hook (``phase`` ``hook``, ``name`` the hook's) around
    it. ``command`` is what ran, placeholders filled in (a shell string as ``["/bin/sh",
    "-c", ...]``). ``passed``: it exited with 0 in its time.
    """

    name: str
    phase: Literal["setup", "check", "hook"]
    turn: int = Field(ge=1)
    command: list[str]
    exit_code: int | None = None
    passed: bool
    required: bool
    timed_out: bool = False
    duration_s: float = Field(ge=0)
    stdout: LogFile | None = None
    stderr: LogFile | None = None


class CopiedFile(_Additions):
    """A file of the main checkout copied into the task's worktree (the plan's ``copy``):
    its path there, and the SHA-256 and size of what was copied. A symbolic link is copied
    as a link (``symlink``): its digest and size are those of its target's text."""

    _ADDED = frozenset({"symlink"})

    path: str = Field(min_length=1)
    sha256: Digest
    size: int = Field(ge=0)
    symlink: bool | None = Field(default=None, exclude_if=unset_addition)


class InputFile(_Model):
    """A file the task ran from, hashed when the run first used it: one of the plan's own files
    that the task's commands name (``kind`` ``plan``: its path relative to the plan's
    directory), or the program its agent ran (``program``: the executable's path)."""

    kind: Literal["plan", "program"]
    path: str = Field(min_length=1, max_length=4096)
    sha256: Digest
    size: int = Field(ge=0)


def checks_trailer(checks: Sequence[Mapping[str, Any]]) -> str | None:
    """What a result commit's ``Checks:`` trailer says of *checks* (``CheckResult``s as JSON):
    how the last turn's checks went, ``tests passed, lint failed (not required)``; None when
    that turn ran none. The commit step writes it; ``verify`` reads it back."""
    if not checks:
        return None
    turn = checks[-1]["turn"]
    told = [
        f"{c['name']} {'passed' if c['passed'] else 'failed'}"
        + ("" if c["required"] else " (not required)")
        for c in checks
        if c["phase"] == "check" and c["turn"] == turn
    ]
    return ", ".join(told) or None


class Attempt(_Additions):
    """One try at running the agent, or a repair turn after a failed check (``repair``)."""

    _ADDED = frozenset({"usage", "repair", "worker"})

    number: int
    status: TaskStatus
    started_at: datetime
    finished_at: datetime
    duration_s: float
    exit_code: int | None = None
    error: ErrorInfo | None = None
    stdout: LogFile | None = None
    stderr: LogFile | None = None
    #: What the agent spent on this attempt, where it says so (its cost estimated from the
    #: run's ``pricing`` when it reported none).
    usage: Usage | None = Field(default=None, exclude_if=unset_addition)
    #: True for a repair turn: the agent run again in the same worktree after a required
    #: check failed (unset for an attempt from a clean worktree).
    repair: bool | None = Field(default=None, exclude_if=unset_addition)
    #: The Dask worker that ran it (its address), when the run had the ``dask`` executor.
    worker: Annotated[str, Field(max_length=256)] | None = Field(
        default=None, exclude_if=unset_addition
    )


#: The phases of a task, as ``Timings`` names their totals (``<phase>_s``).
PhaseName = Literal["worktree", "venv", "setup", "agent", "checks", "hooks", "commit", "cleanup"]


class PhaseSpan(_Model):
    """One stretch of one phase of a task, in seconds from the task's ``started_at``.

    A phase may come more than once (an agent phase per attempt, a worktree phase for the
    worktree and again for its copy files); the lengths of a phase's stretches add up to its
    ``<phase>_s`` total.
    """

    name: PhaseName
    start_s: float = Field(ge=0)
    end_s: float = Field(ge=0)


class Timings(_Additions):
    """Wall-clock times of the task's phases, in seconds."""

    _ADDED = frozenset({"setup_s", "checks_s", "hooks_s", "queued_at", "slot", "phases"})

    started_at: AwareDatetime
    finished_at: AwareDatetime
    duration_s: float
    worktree_s: float = 0.0
    venv_s: float = 0.0
    agent_s: float = 0.0
    commit_s: float = 0.0
    cleanup_s: float = 0.0
    #: Setup steps' and checks' time (unset when the task has none).
    setup_s: float | None = Field(default=None, exclude_if=unset_addition)
    checks_s: float | None = Field(default=None, exclude_if=unset_addition)
    #: The plan's hooks' time (unset when none ran).
    hooks_s: float | None = Field(default=None, exclude_if=unset_addition)
    #: When the task was queued: its dependencies done, it waited for a slot from then (unset
    #: in reports from before it was recorded, and for a task served from the cache).
    queued_at: AwareDatetime | None = Field(default=None, exclude_if=unset_addition)
    #: The slot it ran in (``ORCHESTRATOR_SLOT``; on a Dask worker, a slot of that worker).
    slot: int | None = Field(default=None, ge=0, exclude_if=unset_addition)
    #: Each phase as it happened, in order (see PhaseSpan).
    phases: list[PhaseSpan] = Field(default_factory=list, exclude_if=unset_addition)


class Metrics(_Model):
    """Resource use of the agent's processes (the last attempt), where the platform reports it."""

    cpu_user_s: float | None = None
    cpu_system_s: float | None = None
    max_rss_kb: int | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0


class Environment(_Model):
    """The task's Python environment; ``env_sha256`` is the digest of this object."""

    python: str
    implementation: str
    packages: list[str] = Field(default_factory=list)
    installer: str | None = None


class AgentInfo(_Model):
    """What ran: a command, or a callable's qualified name. ``agent_sha256`` hashes this.

    ``command`` is the command as the plan writes it (placeholders unfilled, so the same for
    every task of the agent); ``program`` is the executable it resolved to, symlinks followed
    (a task venv's ``python`` is the interpreter behind it).
    """

    #: The agent's kind: ``command``, ``callable``, or a kind added to the engine's table.
    kind: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$")]
    command: list[str] | None = None
    program: str | None = None
    qualname: str | None = None


class CachedFrom(_Model):
    """Where a ``cached`` result was first produced, and under which cache key."""

    run_id: RunId
    task_id: TaskId
    key: Digest


class Provenance(_Additions):
    """Digests that tie a result to what went in and what came out."""

    _ADDED = frozenset({"prompt_sha256", "copied", "inputs", "sparse"})

    envelope_sha256: Digest
    base_commit: ObjectId | None = None
    result_commit: ObjectId | None = None
    result_tree: ObjectId | None = None
    environment: Environment | None = None
    env_sha256: Digest | None = None
    agent: AgentInfo
    agent_sha256: Digest
    output_sha256: Digest
    stdout_sha256: Digest | None = None
    stderr_sha256: Digest | None = None
    commands: list[list[str]] = Field(default_factory=list)
    #: The digest of the last attempt's rendered prompt (its file: ``logs/<task>.attempt-<n>.prompt``).
    prompt_sha256: Digest | None = Field(default=None, exclude_if=unset_addition)
    cached_from: CachedFrom | None = None
    #: The files of the plan's ``copy`` put into the worktree (when it was last made ready).
    copied: list[CopiedFile] = Field(default_factory=list, exclude_if=unset_addition)
    #: The plan's files the task's commands name and the program its agent ran, hashed.
    inputs: list[InputFile] = Field(default_factory=list, exclude_if=unset_addition)
    #: The directories the task's worktree held (a sparse worktree; None: all of them).
    sparse: list[str] | None = Field(default=None, exclude_if=unset_addition)
    result_sha256: Seal = ""


class TaskResult(_Additions):
    """The outcome of one task."""

    _ADDED = frozenset({"usage", "checks", "hooks"})

    task_id: TaskId
    agent: str
    status: TaskStatus
    attempts: int = Field(ge=0)
    exit_code: int | None = None
    output: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    timings: Timings
    metrics: Metrics = Field(default_factory=Metrics)
    usage: Usage | None = Field(default=None, exclude_if=unset_addition)
    branch: BranchName | None = None
    worktree: str | None = None
    envelope: LogFile | None = None
    attempt_log: list[Attempt] = Field(default_factory=list)
    #: Every setup step and check that ran, in order, each turn's.
    checks: list[CheckResult] = Field(default_factory=list, exclude_if=unset_addition)
    #: Every hook of the plan that ran for the task, in order (phase ``hook``).
    hooks: list[CheckResult] = Field(default_factory=list, exclude_if=unset_addition)
    group: TaskId | None = None
    depends_on: list[TaskId] = Field(default_factory=list)
    resumed: bool = False
    provenance: Provenance

    @property
    def succeeded(self) -> bool:
        """True when the task succeeded: status ``succeeded``, or ``cached`` (reused)."""
        return self.status in SUCCESSFUL


class SealedResults(Sequence[TaskResult]):
    """A run's results held as their sealed JSON lines, each made a :class:`TaskResult` when
    it is read: what ``Report.results`` is for a report a run made.

    A run of 100,000 tasks would hold some 5 KB of models a result to the end; a line is a
    third of that, and the models are made only for the results a caller reads. Read-only:
    each result is the one the report's line and ``result_sha256`` say, and a model read from
    it and changed changes neither. A model is made again when none made before is still in
    use (``results[i] is results[i]`` while one is held); ``==`` compares the results.
    """

    __slots__ = ("_cache", "_index", "_lines", "_seals", "_task_ids")

    def __init__(
        self, lines: Sequence[str], *, task_ids: Sequence[str], seals: Sequence[str]
    ) -> None:
        if not len(lines) == len(task_ids) == len(seals):
            raise ValueError("SealedResults needs a task id and a seal for each line")
        self._lines = list(lines)
        self._task_ids = list(task_ids)
        self._seals = list(seals)
        self._cache: weakref.WeakValueDictionary[int, TaskResult] = weakref.WeakValueDictionary()
        self._index: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self._lines)

    @overload
    def __getitem__(self, index: int) -> TaskResult: ...
    @overload
    def __getitem__(self, index: slice) -> list[TaskResult]: ...
    def __getitem__(self, index: int | slice) -> TaskResult | list[TaskResult]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = range(len(self._lines))[index]  # IndexError, negative indices, like a list's
        result = self._cache.get(i)
        if result is None:
            result = TaskResult.model_validate_json(self._lines[i])
            self._cache[i] = result
        return result

    def __iter__(self) -> Iterator[TaskResult]:
        for i in range(len(self._lines)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SealedResults) and self._lines == other.lines:
            return True
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # like a list's

    def __repr__(self) -> str:
        return f"SealedResults(<{len(self)} results>)"

    def __copy__(self) -> SealedResults:
        return self  # nothing in it changes

    def __deepcopy__(self, memo: dict[int, Any]) -> SealedResults:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (_sealed_results, (self._lines, self._task_ids, self._seals))

    @property
    def lines(self) -> Sequence[str]:
        """Each result's JSON line (``json_line`` of its JSON form), in order."""
        return self._lines

    @property
    def seals(self) -> Sequence[str]:
        """Each result's ``provenance.result_sha256``, in order, without reading the result."""
        return self._seals

    @property
    def task_ids(self) -> Sequence[str]:
        """Each result's task id, in order, without reading the result."""
        return self._task_ids

    def position(self, task_id: str) -> int:
        """Where *task_id*'s result is; KeyError when there is none."""
        if self._index is None:
            self._index = {t: i for i, t in enumerate(self._task_ids)}
        return self._index[task_id]

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        # As a field: a list of TaskResult read and written as such (the JSON Schema is that
        # list's), where a SealedResults is taken as it is and written as the list it reads.
        # JSON is read as the list it is (never a SealedResults): through a Python function,
        # ``strict`` would refuse the JSON's datetimes.
        listed = handler.generate_schema(list[TaskResult])
        return core_schema.json_or_python_schema(
            json_schema=listed,
            python_schema=core_schema.no_info_wrap_validator_function(_as_given, listed),
            serialization=core_schema.wrap_serializer_function_ser_schema(_listed, schema=listed),
        )


def _as_given(value: Any, handler: core_schema.ValidatorFunctionWrapHandler) -> Any:
    return value if isinstance(value, SealedResults) else handler(value)


def _listed(value: Any, handler: SerializerFunctionWrapHandler) -> Any:
    return handler(list(value) if isinstance(value, SealedResults) else value)


def _sealed_results(lines: list[str], task_ids: list[str], seals: list[str]) -> SealedResults:
    return SealedResults(lines, task_ids=task_ids, seals=seals)


# ``serialize_as_any`` writes a field by what its value is, not by the field's schema: a
# SealedResults as the list it reads.
SealedResults.__pydantic_serializer__ = SchemaSerializer(  # type: ignore[attr-defined]
    core_schema.any_schema(
        serialization=core_schema.wrap_serializer_function_ser_schema(
            _listed, schema=core_schema.list_schema(core_schema.any_schema())
        )
    )
)


class Summary(_Additions):
    """Counts over the run, under the keys users of the seed orchestrator know."""

    _ADDED = frozenset({"usage"})

    total_tasks: int
    successful: int
    failed: int
    timeout: int
    cancelled: int
    skipped: int = 0
    cached: int = 0
    success_rate: float
    total_execution_time: float
    #: What the run's agents spent, where known (None: no task's usage is known).
    usage: UsageTotals | None = Field(default=None, exclude_if=unset_addition)


class AgentSummary(_Additions):
    """Counts per agent."""

    _ADDED = frozenset({"usage"})

    total: int
    successful: int
    failed: int
    timeout: int
    cancelled: int
    skipped: int = 0
    cached: int = 0
    task_ids: list[str]
    usage: UsageTotals | None = Field(default=None, exclude_if=unset_addition)


class ReportError(_Model):
    """One failed task in the report's ``errors`` list."""

    task_id: str
    agent: str
    kind: ErrorKind
    message: str


class GroupMember(_Model):
    """One task of a matrix group and how it ended."""

    task_id: str
    status: TaskStatus


class GroupReport(_Model):
    """A matrix task's group: its members and which of them were selected."""

    select: Select
    members: list[GroupMember]
    selected: list[str]


class MergeConflict(_Model):
    """Two results (or a result and the target branch) that cannot be merged cleanly."""

    left: str
    right: str
    paths: list[str]


class MergedTask(_Model):
    """One task's result in a merge, and the merge commit that brought it in.

    ``merge_commit`` is None when the target already contained the result (a dependency
    merged before its dependent, say).
    """

    task_id: TaskId
    result_commit: ObjectId
    merge_commit: ObjectId | None


#: ``check_failed``: a checked merge whose combined tree failed a required check (with
#: ``mode: train``, every result was left out); the target did not move.
MergeStatus = Literal["merged", "conflict", "refused", "skipped", "check_failed"]


class MergeCheck(_Model):
    """The setup steps and required checks of the tasks run on one combined tree of a merge.

    ``commit`` is the combined commit checked; ``task_id`` the result a train step added to
    it (None for a ``check`` merge: the tree of every result). ``passed``: every required
    step passed. Each step's ``turn`` is the check's number in the merge, from 1.
    """

    task_id: TaskId | None = None
    commit: ObjectId
    passed: bool
    checks: list[CheckResult] = Field(default_factory=list)


class LeftOutTask(_Model):
    """A result a train did not merge, and why (its check failed, it conflicts, it did not
    succeed, or it contains a result left out)."""

    task_id: TaskId
    reason: str


class MergeRecord(_Additions):
    """One merge of results into a branch: ``old_commit`` moved to ``new_commit`` at ``at``.

    A checked merge (``mode``: ``check`` or ``train``) records the checks of its combined
    trees in ``checks`` and, for a train, the results it did not merge in ``left_out``.
    """

    _ADDED = frozenset({"mode", "checks", "left_out"})

    into: BranchName
    status: MergeStatus
    old_commit: ObjectId | None = None
    new_commit: ObjectId | None = None
    tasks: list[MergedTask] = Field(default_factory=list)
    conflicts: list[MergeConflict] = Field(default_factory=list)
    message: str = ""
    at: datetime
    #: How the combined tree was checked before the target moved (unset: it was not).
    mode: Literal["check", "train"] | None = Field(default=None, exclude_if=unset_addition)
    checks: list[MergeCheck] = Field(default_factory=list, exclude_if=unset_addition)
    left_out: list[LeftOutTask] = Field(default_factory=list, exclude_if=unset_addition)


class Report(_Additions):
    """The results report of one run."""

    _ADDED = frozenset({"usage_by_model", "pricing"})

    schema_: Literal["worktree-orchestrator/report/v1", "worktree-orchestrator/report/v2"] = Field(
        default="worktree-orchestrator/report/v2", alias="schema"
    )
    tool: dict[str, str] = Field(default_factory=dict)
    run_id: RunId
    plan_name: str
    plan_sha256: Digest
    repo: str | None
    base_ref: str | None
    base_commit: ObjectId | None
    run_dir: str
    started_at: AwareDatetime
    finished_at: AwareDatetime
    summary: Summary
    #: Every task's result, in plan order. A list when read from a file or given; for a
    #: report a run made, a :class:`SealedResults` (made from each result's line when read).
    results: Annotated[Sequence[TaskResult], SealedResults]
    results_by_agent: dict[str, AgentSummary]
    errors: list[ReportError]
    groups: dict[str, GroupReport] = Field(default_factory=dict)
    merge: list[MergeRecord] = Field(default_factory=list)
    #: Usage totals per model (``unknown``: the agent did not say which).
    usage_by_model: dict[str, UsageTotals] = Field(default_factory=dict, exclude_if=unset_addition)
    #: The rates by model the run estimated costs with (its ``pricing`` setting): ``verify``
    #: recomputes every ``estimated`` cost from them.
    pricing: dict[str, Rates] = Field(default_factory=dict, exclude_if=unset_addition)
    #: What the run noticed that is not one task's result: a ref outside the run's own that
    #: moved while it ran, a task branch no longer holding its result (see docs/security.md).
    warnings: list[str] = Field(default_factory=list)
    report_sha256: Seal = ""

    def __repr__(self) -> str:
        # Short: asyncio formats the main task's result (a Report, for anyio.run of
        # orchestrate_parallel) when the run ends, and the full repr of 10,000 results takes
        # seconds.
        return (
            f"Report(run_id={self.run_id!r}, plan_name={self.plan_name!r}, "
            f"results=<{len(self.results)} results>, summary={self.summary!r})"
        )

    def to_json_dict(self) -> dict[str, Any]:
        """The report as a JSON object, as written to disk."""
        return self.model_dump(mode="json", by_alias=True)

    def result(self, task_id: str) -> TaskResult:
        """The result of *task_id*; KeyError when the run had no such task."""
        if isinstance(self.results, SealedResults):
            return self.results[self.results.position(task_id)]
        for result in self.results:
            if result.task_id == task_id:
                return result
        raise KeyError(task_id)


def seal_result(result: TaskResult) -> TaskResult:
    """Return *result* with ``provenance.result_sha256`` computed."""
    return sealed_result_line(result)[0]


def sealed_result_line(result: TaskResult) -> tuple[TaskResult, str]:
    """*result* sealed (see :func:`seal_result`), and its JSON as a line (``json_line``): one model dump
    serves both, so a run need not dump a result again to journal it or write its report."""
    data = result.model_dump(mode="json")
    sealed = digest_without(data, "provenance", "result_sha256")
    provenance = result.provenance.model_copy(update={"result_sha256": sealed})
    data["provenance"]["result_sha256"] = sealed
    return result.model_copy(update={"provenance": provenance}), json_line(data)


def report_digest(raw: Mapping[str, Any]) -> str:
    """What ``report_sha256`` should be for the report *raw* (its JSON object).

    Version 1: the digest of everything but ``report_sha256``. Version 2: the same, with each
    result replaced by its ``result_sha256`` (which covers the rest of the result), so a run
    seals its report without serialising every result again.
    """
    if raw.get("schema") == REPORT_SCHEMA_V1:
        return digest_without(raw, "report_sha256")
    results = raw.get("results")
    if isinstance(results, list):
        seals = [_seal_of(r) for r in results]
        raw = {**raw, "results": seals}
    return digest_without(raw, "report_sha256")


def _seal_of(result: Any) -> Any:
    """A result's ``result_sha256``; the result itself when it has none (which then fails
    its own check, and the report's)."""
    if isinstance(result, Mapping):
        provenance = result.get("provenance")
        if isinstance(provenance, Mapping) and isinstance(provenance.get("result_sha256"), str):
            return provenance["result_sha256"]
    return result


def seal_report(report: Report) -> Report:
    """Return *report* with ``report_sha256`` computed over everything else."""
    if report.schema_ == REPORT_SCHEMA_V1:
        return report.model_copy(
            update={"report_sha256": digest_without(report.to_json_dict(), "report_sha256")}
        )
    raw = report.model_dump(mode="json", by_alias=True, exclude={"results"})
    results = report.results
    if isinstance(results, SealedResults):
        raw["results"] = list(results.seals)
    else:
        raw["results"] = [r.provenance.result_sha256 for r in results]
    return report.model_copy(update={"report_sha256": digest_without(raw, "report_sha256")})
