"""The scheduler: which task starts next, and every task's state in one place.

A task is ``pending`` until everything in its ``depends_on`` has succeeded; its start commit
is then resolved (the coordinator merges its dependencies' results) and it is ``ready``. Among
ready tasks the highest ``priority`` starts first, ties in plan order, within the run's
concurrency limit and each agent's own ``max_concurrency``. A task whose dependency did not
succeed is ``skipped``, and so, in turn, are its own dependents. Every state change goes
through :class:`TaskBook`, which refuses a transition the lifecycle does not allow: such a
transition is a bug in the orchestrator, and it raises.

    pending -> ready -> running -> succeeded | failed | timed_out | cancelled
    pending -> skipped        running -> retrying -> running
    pending | ready -> cancelled      (the run was cancelled before the task started)
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol

import anyio
from anyio.abc import TaskGroup

from envelopes import (
    SUCCESSFUL,
    Budget,
    ErrorInfo,
    HandoffEnvelope,
    Select,
    TaskResult,
    Usage,
    dependency_cycles,
)

from .errors import IllegalTransition

__all__ = [
    "GroupState",
    "IllegalTransition",
    "Scheduler",
    "SchedulerHooks",
    "TaskBook",
    "TaskState",
    "graph_problems",
]

TaskState = Literal[
    "pending",
    "ready",
    "running",
    "retrying",
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
    "skipped",
    "cached",
]

_FINAL: frozenset[TaskState] = frozenset(
    {"succeeded", "failed", "timed_out", "cancelled", "skipped", "cached"}
)
TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    "pending": frozenset({"ready", "skipped", "cancelled"}),
    # ready -> skipped: the run's budget was spent before the task got a slot.
    "ready": frozenset({"running", "cancelled", "skipped"}),
    # running -> cached: the result cache had the task's result, so it ran no agent.
    "running": frozenset({"retrying", "succeeded", "failed", "timed_out", "cancelled", "cached"}),
    # retrying -> failed: the on_event handler raised on TaskRetrying, which stops the run.
    "retrying": frozenset({"running", "cancelled", "failed"}),
    **{state: frozenset() for state in _FINAL},
}


class TaskBook:
    """The state of every task of a run."""

    def __init__(
        self,
        task_ids: Sequence[str],
        on_move: Callable[[str, TaskState], None] | None = None,
    ) -> None:
        self.states: dict[str, TaskState] = dict.fromkeys(task_ids, "pending")
        #: Told of every change, after it is made (the run's journal listens here).
        self.on_move = on_move

    def move(self, task_id: str, new: TaskState) -> None:
        """Change *task_id*'s state to *new*; IllegalTransition if the lifecycle forbids it."""
        old = self.states[task_id]
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(f"task {task_id}: {old} -> {new} is not a valid transition")
        self.states[task_id] = new
        if self.on_move is not None:
            self.on_move(task_id, new)

    def restore(self, task_id: str, state: TaskState) -> None:
        """Put a task straight into the final *state* it reached in an earlier, interrupted
        session of the run (resume); only from ``pending``."""
        old = self.states[task_id]
        if old != "pending" or state not in _FINAL:
            raise IllegalTransition(f"task {task_id}: cannot restore {old} -> {state}")
        self.states[task_id] = state

    def count(self, state: TaskState) -> int:
        """How many tasks are in *state*."""
        return sum(1 for s in self.states.values() if s == state)


#: The dependencies a task without any waits for.
_NONE: frozenset[str] = frozenset()

_WORDS = {
    "failed": "failed",
    "timed_out": "timed out",
    "cancelled": "was cancelled",
    "skipped": "was skipped",
}


_Message = tuple[str, str, HandoffEnvelope | ErrorInfo | None]


@dataclass
class GroupState:
    """A matrix group while it runs: its members in plan order and, once decided, the selected."""

    select: Select
    members: list[str]
    decided: bool = False
    selected: list[str] = field(default_factory=list)


class SchedulerHooks(Protocol):
    """What the scheduler asks of the run (the coordinator implements it)."""

    async def queued(self, envelope: HandoffEnvelope) -> None:
        """*envelope* is ready and waits for a slot."""

    async def resolve(
        self, envelope: HandoffEnvelope, upstream: list[str]
    ) -> HandoffEnvelope | ErrorInfo:
        """Prepare the start of a task whose dependencies (*upstream*, task ids) succeeded.

        Returns the envelope to run, or why the task must be skipped.
        """

    async def run(self, envelope: HandoffEnvelope) -> None:
        """Run the task to its result (stored in ``results``), moving it out of ``running``."""

    async def never_started(
        self, envelope: HandoffEnvelope, status: Literal["skipped", "cancelled"], error: ErrorInfo
    ) -> None:
        """Record the result of a task that will not run (the scheduler has moved its state)."""

    def cancelling(self, task_id: str, error: ErrorInfo) -> None:
        """*task_id* is about to be cancelled while it runs; *error* says why."""

    async def group_decided(self, name: str, group: GroupState) -> None:
        """The selection of group *name* is known."""


def spend(usage: Usage | None) -> tuple[float, float]:
    """What *usage* spent toward a budget: its cost in USD (reported or estimated) and its
    tokens (the total, or input and output where an agent gave no total)."""
    if usage is None:
        return 0.0, 0.0
    tokens = usage.total_tokens or (usage.input_tokens or 0) + (usage.output_tokens or 0)
    return usage.cost_usd or 0.0, float(tokens)


def budget_reached(budget: Budget, cost: float, tokens: float) -> str | None:
    """Which limit of *budget* a spend of *cost* USD and *tokens* has reached, or None."""
    if budget.max_cost_usd is not None and cost >= budget.max_cost_usd:
        return f"the run's budget max_cost_usd {budget.max_cost_usd:g} is spent ({cost:.4g} USD)"
    if budget.max_tokens is not None and tokens >= budget.max_tokens:
        return f"the run's budget max_tokens {budget.max_tokens} is spent ({tokens:.0f} tokens)"
    return None


def graph_problems(envelopes: Sequence[HandoffEnvelope]) -> list[str]:
    """What is wrong with the envelopes' ``depends_on``: unknown names and cycles."""
    index = {e.task_id: i for i, e in enumerate(envelopes)}
    for i, e in enumerate(envelopes):
        if e.group is not None:
            index.setdefault(e.group, i)
    problems: list[str] = []
    needs: list[list[int]] = [[] for _ in envelopes]
    for i, e in enumerate(envelopes):
        for name in e.depends_on:
            if name not in index:
                problems.append(f"task {e.task_id}: depends on unknown task {name!r}")
            elif e.group is not None and name == e.group:
                problems.append(f"task {e.task_id}: depends on its own group {name!r}")
            else:
                needs[i].append(index[name])
    ids = [e.task_id for e in envelopes]
    for cycle in dependency_cycles(ids, needs):
        problems.append("cycle " + " -> ".join(ids[i] for i in [*cycle, cycle[0]]))
    return problems


class Scheduler:
    """Runs a run's tasks through their lifecycle; see the module's docstring.

    *results* is where the hooks store each task's result (the scheduler reads statuses from
    it). With *fail_fast*, the first task that fails or times out cancels the running tasks
    and every task not yet started. *restored* names tasks whose result (already in
    *results*) comes from an earlier session of the run: they are final from the start.
    """

    def __init__(
        self,
        envelopes: Sequence[HandoffEnvelope],
        hooks: SchedulerHooks,
        *,
        limit: int,
        agent_limits: Mapping[str, int],
        book: TaskBook,
        results: Mapping[str, TaskResult],
        fail_fast: bool = False,
        restored: Sequence[str] = (),
        budget: Budget | None = None,
    ) -> None:
        self.hooks = hooks
        self.budget = budget
        #: Why no further task starts, once the budget is spent (and when it was).
        self.budget_spent: ErrorInfo | None = None
        self.budget_spent_at: datetime | None = None
        #: The spend of the tasks ended so far (USD, tokens): added to as each ends, so that
        #: a task's end costs the same with 10 results before it as with 100,000.
        self.spent = (0.0, 0.0)
        self.limit = limit
        self.agent_limits = agent_limits
        self.book = book
        self.results = results
        self.fail_fast = fail_fast
        self.restored = list(restored)
        self.envelopes = {e.task_id: e for e in envelopes}
        self.order = {e.task_id: i for i, e in enumerate(envelopes)}
        self.groups: dict[str, GroupState] = {}
        for e in envelopes:
            if e.group is not None:
                group = self.groups.setdefault(e.group, GroupState(e.select or "all", []))
                group.members.append(e.task_id)
        # A task without dependencies shares one empty set (never changed: only a task's
        # dependencies are discarded from its set).
        self.waiting: dict[str, set[str] | frozenset[str]] = {
            e.task_id: set(e.depends_on) if e.depends_on else _NONE for e in envelopes
        }
        self.dependents: dict[str, list[str]] = {}
        for e in envelopes:
            for name in dict.fromkeys(e.depends_on):
                self.dependents.setdefault(name, []).append(e.task_id)
        self.heap: list[tuple[int, int, str]] = []
        self.running = 0
        self.by_agent: Counter[str] = Counter()
        self.resolving: set[str] = set()
        self.abandoned: dict[str, ErrorInfo] = {}  # resolving tasks not to start after all
        self.scopes: dict[str, anyio.CancelScope] = {}
        self.cancel_errors: dict[str, ErrorInfo] = {}
        self.outcomes: deque[tuple[str, bool, str]] = deque()
        self.stopped: ErrorInfo | None = None
        self._tg: TaskGroup | None = None

    async def run(self) -> None:
        """Run every task to a final state.

        A hook's exception stops the whole schedule. Cancellation cancels every running task;
        tasks not yet started stay as they are (the caller records them).
        """
        self._send, receive = anyio.create_memory_object_stream[_Message](math.inf)
        async with self._send, receive, anyio.create_task_group() as tg:
            self._tg = tg
            for task_id in self.restored:
                self.book.restore(task_id, self.results[task_id].status)
            for task_id in self.restored:
                await self._final(task_id)
            for task_id, envelope in self.envelopes.items():
                if self.book.states[task_id] == "pending" and not self.waiting[task_id]:
                    await self._ready(envelope)
            await self._propagate()
            while True:
                self._start_what_can()
                if not self.running and not self.resolving:
                    break
                try:
                    # What is queued is taken at once: receive() yields to every other task
                    # first even then, which made each task's successor wait a full turn of
                    # the event loop behind 64 running tasks' work.
                    kind, task_id, value = receive.receive_nowait()
                except anyio.WouldBlock:
                    kind, task_id, value = await receive.receive()
                if kind == "finished":
                    self.running -= 1
                    self.by_agent[self.envelopes[task_id].agent] -= 1
                    await self._final(task_id)
                else:
                    await self._resolved(task_id, value)
                await self._propagate()
        stuck = [t for t, state in self.book.states.items() if state not in _FINAL]
        if stuck:
            raise IllegalTransition(f"tasks never reached a final state: {', '.join(stuck)}")

    # -- starting tasks ---------------------------------------------------------------

    async def _ready(self, envelope: HandoffEnvelope) -> None:
        self.envelopes[envelope.task_id] = envelope
        if self.budget_spent is not None:
            await self._never_started(envelope.task_id, "skipped", self.budget_spent)
            return
        self.book.move(envelope.task_id, "ready")
        await self.hooks.queued(envelope)
        heapq.heappush(
            self.heap, (-envelope.priority, self.order[envelope.task_id], envelope.task_id)
        )

    def _start_what_can(self) -> None:
        assert self._tg is not None
        blocked = []
        # A task whose dependencies all succeeded is as good as ready while its start is
        # resolved (milliseconds): nothing of lower priority takes its place meanwhile.
        hold = min(
            ((-self.envelopes[t].priority, self.order[t]) for t in self.resolving), default=None
        )
        while self.heap and self.running < self.limit:
            item = heapq.heappop(self.heap)
            task_id = item[2]
            if self.book.states[task_id] != "ready":
                continue  # cancelled while it waited
            if hold is not None and (item[0], item[1]) > hold:
                blocked.append(item)
                break
            agent = self.envelopes[task_id].agent
            if self.by_agent[agent] >= self.agent_limits.get(agent, math.inf):
                blocked.append(item)  # its agent is at its limit: the next one may start
                continue
            self.running += 1
            self.by_agent[agent] += 1
            self.book.move(task_id, "running")
            # The scope exists before the task does, so that it can be cancelled at once.
            self.scopes[task_id] = anyio.CancelScope()
            self._tg.start_soon(self._worker, self.envelopes[task_id], name=f"task {task_id}")
        for item in blocked:
            heapq.heappush(self.heap, item)

    async def _worker(self, envelope: HandoffEnvelope) -> None:
        task_id = envelope.task_id
        with self.scopes[task_id]:
            await self.hooks.run(envelope)
        del self.scopes[task_id]
        if task_id not in self.results:
            # Cancelled before the task could record anything (while TaskStarted was
            # delivered to a slow handler, say): it never started.
            error = self.cancel_errors.get(task_id) or ErrorInfo(
                kind="cancelled", message="cancelled before this task started"
            )
            self.book.move(task_id, "cancelled")
            await self.hooks.never_started(envelope, "cancelled", error)
        self._send.send_nowait(("finished", task_id, None))

    async def _resolver(self, envelope: HandoffEnvelope, upstream: list[str]) -> None:
        outcome = await self.hooks.resolve(envelope, upstream)
        self._send.send_nowait(("resolved", envelope.task_id, outcome))

    async def _resolved(self, task_id: str, outcome: HandoffEnvelope | ErrorInfo | None) -> None:
        self.resolving.discard(task_id)
        if task_id in self.abandoned:
            await self._never_started(task_id, "cancelled", self.abandoned.pop(task_id))
        elif isinstance(outcome, HandoffEnvelope):
            await self._ready(outcome)
        else:
            assert outcome is not None
            await self._never_started(task_id, "skipped", outcome)

    # -- tasks that end ---------------------------------------------------------------

    async def _never_started(
        self, task_id: str, status: Literal["skipped", "cancelled"], error: ErrorInfo
    ) -> None:
        self.book.move(task_id, status)
        await self.hooks.never_started(self.envelopes[task_id], status, error)
        await self._final(task_id)

    async def _final(self, task_id: str) -> None:
        """*task_id* has its result: tell its group, its dependents, and fail-fast."""
        status = self.results[task_id].status
        envelope = self.envelopes[task_id]
        self.outcomes.append(
            (task_id, status in SUCCESSFUL, f"{task_id} {_WORDS.get(status, status)}")
        )
        if envelope.group is not None:
            await self._member_final(envelope.group, task_id, status)
        elif self.fail_fast and status in ("failed", "timed_out"):
            await self._stop(f"{task_id} {_WORDS[status]}")
        if self.budget is not None:
            cost, tokens = spend(self.results[task_id].usage)
            self.spent = (self.spent[0] + cost, self.spent[1] + tokens)
            if (
                self.budget_spent is None
                and (why := budget_reached(self.budget, *self.spent)) is not None
            ):
                await self._out_of_budget(why)
        # Not needed any more (its dependents and group go by its id): a run of 100,000
        # tasks does not hold 100,000 envelopes to its end.
        del self.envelopes[task_id]

    async def _member_final(self, name: str, task_id: str, status: str) -> None:
        group = self.groups[name]
        if group.decided:
            return
        statuses = {m: self.book.states[m] for m in group.members}
        if group.select == "first_success" and status in SUCCESSFUL:
            group.decided, group.selected = True, [task_id]
            await self.hooks.group_decided(name, group)
            self.outcomes.append((name, True, ""))
            reason = ErrorInfo(
                kind="not_needed", message=f"not needed: {task_id} succeeded first in group {name}"
            )
            for member in group.members:
                await self._cancel(member, reason)
            return
        if not all(state in _FINAL for state in statuses.values()):
            return
        succeeded = [m for m, state in statuses.items() if state in SUCCESSFUL]
        group.decided = True
        if group.select == "all":
            group.selected = succeeded
            ok = len(succeeded) == len(group.members)
            why = f"{name}: {len(group.members) - len(succeeded)} of {len(group.members)} members did not succeed"
        else:
            ok, why = False, f"{name}: no member succeeded"
        await self.hooks.group_decided(name, group)
        self.outcomes.append((name, ok, why))
        if (
            not ok
            and self.fail_fast
            and any(s in ("failed", "timed_out") for s in statuses.values())
        ):
            await self._stop(f"group {why}")

    async def _cancel(self, task_id: str, error: ErrorInfo) -> None:
        """Stop *task_id* if it has not ended: cancel it if it runs, else never start it."""
        state = self.book.states[task_id]
        if state in ("running", "retrying"):
            scope = self.scopes.get(task_id)
            if scope is not None and not scope.cancel_called:
                self.cancel_errors[task_id] = error
                self.hooks.cancelling(task_id, error)
                scope.cancel()
        elif task_id in self.resolving:
            self.abandoned.setdefault(task_id, error)
        elif state in ("pending", "ready"):
            await self._never_started(task_id, "cancelled", error)

    async def _stop(self, why: str) -> None:
        """Fail fast: cancel every task that has not ended."""
        if self.stopped is not None:
            return
        self.stopped = ErrorInfo(
            kind="cancelled", message=f"cancelled: {why}, and the run stops at the first failure"
        )
        for task_id in list(self.envelopes):
            await self._cancel(task_id, self.stopped)

    async def _out_of_budget(self, why: str) -> None:
        """The budget is spent: no task starts any more; with ``on_exceed: cancel``, the
        running ones are cancelled too."""
        assert self.budget is not None
        self.budget_spent_at = datetime.now(UTC)
        self.budget_spent = ErrorInfo(kind="budget", message=f"not started: {why}")
        cancel = self.budget.on_exceed == "cancel"
        cancelled = ErrorInfo(kind="budget", message=f"cancelled: {why}")
        for task_id in list(self.book.states):
            # Read afresh: ending one task can end others (a group decided, fail-fast).
            state = self.book.states[task_id]
            if state in ("running", "retrying"):
                if cancel:
                    await self._cancel(task_id, cancelled)
            elif task_id in self.resolving:
                pass  # skipped by _ready once its start is resolved, like the others
            elif state in ("pending", "ready"):
                await self._never_started(task_id, "skipped", self.budget_spent)

    async def _propagate(self) -> None:
        """Let dependents know about the tasks and groups that ended."""
        assert self._tg is not None
        while self.outcomes:
            name, ok, why = self.outcomes.popleft()
            for task_id in self.dependents.get(name, ()):
                if self.book.states[task_id] != "pending" or task_id in self.resolving:
                    continue
                if not ok:
                    error = ErrorInfo(kind="dependency", message=f"dependency {why}")
                    await self._never_started(task_id, "skipped", error)
                    continue
                waiting = self.waiting[task_id]
                assert isinstance(waiting, set)  # it depends on *name*
                waiting.discard(name)
                if not waiting:
                    upstream = self._upstream(self.envelopes[task_id])
                    self.resolving.add(task_id)
                    self._tg.start_soon(self._resolver, self.envelopes[task_id], upstream)

    def _upstream(self, envelope: HandoffEnvelope) -> list[str]:
        """The tasks whose results *envelope* starts from, in ``depends_on`` order."""
        out: list[str] = []
        for name in envelope.depends_on:
            out += self.groups[name].selected if name in self.groups else [name]
        return list(dict.fromkeys(out))
