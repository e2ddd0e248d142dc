"""A run's results, held as their sealed JSON lines rather than as models.

A no-op task's :class:`~envelopes.TaskResult` is some 5 KB of pydantic models; its line (the
JSON the journal and the report write) is a third of that. A run of 100,000 tasks keeps every
result to its end, for the report: as models that is half a gigabyte. :class:`ResultStore`
keeps each result's line, its seal and the few facts the run reads of every result (its
:class:`Brief`), and makes the model again only when asked for it, which a run does for a
task's dependents and for its hooks, not once per result at the end.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass

from envelopes import ErrorInfo, SealedResults, TaskResult, TaskStatus, Usage, json_line

__all__ = ["Brief", "ResultStore"]

#: How many of the results stored last stay as models: the scheduler reads a task's result
#: right after it is stored, and a dependent its dependencies' soon after.
RECENT = 256


@dataclass(frozen=True, slots=True)
class Brief:
    """What the end of a run reads of every result: counts, costs, warnings, moved refs."""

    task_id: str
    agent: str
    status: TaskStatus
    group: str | None
    usage: Usage | None
    error: ErrorInfo | None
    branch: str | None
    result_commit: str | None
    #: Whether a hook failed and was ignored (the report's warnings name each such hook).
    ignored_hooks: bool

    @classmethod
    def of(cls, result: TaskResult) -> Brief:
        return cls(
            task_id=result.task_id,
            agent=result.agent,
            status=result.status,
            group=result.group,
            usage=result.usage,
            error=result.error,
            branch=result.branch,
            result_commit=result.provenance.result_commit,
            ignored_hooks=any(not h.required and not h.passed for h in result.hooks),
        )


class _Entry:
    __slots__ = ("brief", "line", "model", "seal")

    def __init__(self, line: str, seal: str, brief: Brief, model: TaskResult) -> None:
        self.line = line
        self.seal = seal
        self.brief = brief
        self.model = weakref.ref(model)


class ResultStore(MutableMapping[str, TaskResult]):
    """A run's results by task id (``RunContext.results``), in the order they were stored.

    Each is kept as its sealed line (the one :meth:`seal` was told of, or a new dump), its
    ``result_sha256`` and its :class:`Brief`. Reading one gives the model that was stored
    while it is in use (or among the last :data:`RECENT` stored), else one made from the
    line: equal to it, not the same object. So a result changed after it is stored is not
    changed here, as it was never changed in the report (written from the line).
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        #: Lines of sealed results not stored yet, by task id, with the result they are of.
        self._sealed: dict[str, tuple[TaskResult, str]] = {}
        self._recent: deque[TaskResult] = deque(maxlen=RECENT)

    def seal(self, result: TaskResult, line: str) -> None:
        """*line* is sealed *result*'s JSON line (see ``envelopes.sealed_result_line``): to be
        used for it, by :meth:`line_of` and when it is stored, instead of a new dump."""
        self._sealed[result.task_id] = (result, line)

    def line_of(self, result: TaskResult) -> str:
        """*result*'s JSON line: the one made when it was sealed, if it is that result."""
        known = self._sealed.get(result.task_id)
        if known is not None and known[0] is result:
            return known[1]
        entry = self._entries.get(result.task_id)
        if entry is not None and entry.model() is result:
            return entry.line
        return json_line(result.model_dump(mode="json"))

    def __setitem__(self, task_id: str, result: TaskResult) -> None:
        if task_id != result.task_id:
            raise ValueError(f"result of {result.task_id!r} stored as {task_id!r}")
        line = self.line_of(result)
        self._sealed.pop(task_id, None)  # used, or of another result of the task: not kept
        self._entries.pop(task_id, None)  # a replaced result goes to the end, as in a dict
        seal = result.provenance.result_sha256
        self._entries[task_id] = _Entry(line, seal, Brief.of(result), result)
        self._recent.append(result)

    def __getitem__(self, task_id: str) -> TaskResult:
        entry = self._entries[task_id]
        result = entry.model()
        if result is None:
            result = TaskResult.model_validate_json(entry.line)
            entry.model = weakref.ref(result)
            self._recent.append(result)
        return result

    def __delitem__(self, task_id: str) -> None:
        del self._entries[task_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._entries

    def brief(self, task_id: str) -> Brief:
        """What the run reads of *task_id*'s result, without making its model."""
        return self._entries[task_id].brief

    def briefs(self, task_ids: Iterable[str] | None = None) -> list[Brief]:
        """The briefs of *task_ids* (default: every result, in the order stored)."""
        ids = self._entries if task_ids is None else task_ids
        return [self._entries[t].brief for t in ids]

    def sealed(self, task_ids: Iterable[str]) -> SealedResults:
        """The results of *task_ids*, in that order, as a report holds them (KeyError for
        one not stored)."""
        entries = [(t, self._entries[t]) for t in task_ids]
        return SealedResults(
            [e.line for _, e in entries],
            task_ids=[t for t, _ in entries],
            seals=[e.seal for _, e in entries],
        )
