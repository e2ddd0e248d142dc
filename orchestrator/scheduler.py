"""The scheduler: which task starts next, and every task's state in one place.

Among ready tasks the highest ``priority`` starts first, ties in plan order, within the run's
concurrency limit and each agent's own ``max_concurrency``. Every state change goes through
:class:`TaskBook`, which refuses a transition the lifecycle does not allow: such a
transition is a bug in the orchestrator, and it raises.

    pending -> ready -> running -> succeeded | failed | timed_out | cancelled
    pending -> skipped        running -> retrying -> running
    pending | ready -> cancelled      (the run was cancelled before the task started)
"""

from __future__ import annotations

import contextlib
import heapq
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Literal

import anyio

from envelopes import HandoffEnvelope

__all__ = ["IllegalTransition", "TaskBook", "TaskState", "schedule"]

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
]

_FINAL: frozenset[TaskState] = frozenset(
    {"succeeded", "failed", "timed_out", "cancelled", "skipped"}
)
TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    "pending": frozenset({"ready", "skipped", "cancelled"}),
    "ready": frozenset({"running", "cancelled"}),
    "running": frozenset({"retrying", "succeeded", "failed", "timed_out", "cancelled"}),
    "retrying": frozenset({"running", "cancelled"}),
    **{state: frozenset() for state in _FINAL},
}


class IllegalTransition(AssertionError):
    """A state change the lifecycle does not allow: a bug in the orchestrator."""


class TaskBook:
    """The state of every task of a run."""

    def __init__(self, task_ids: Sequence[str]) -> None:
        self.states: dict[str, TaskState] = dict.fromkeys(task_ids, "pending")

    def move(self, task_id: str, new: TaskState) -> None:
        """Change *task_id*'s state to *new*; IllegalTransition if the lifecycle forbids it."""
        old = self.states[task_id]
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(f"task {task_id}: {old} -> {new} is not a valid transition")
        self.states[task_id] = new

    def count(self, state: TaskState) -> int:
        """How many tasks are in *state*."""
        return sum(1 for s in self.states.values() if s == state)


async def schedule(
    envelopes: Sequence[HandoffEnvelope],
    run_task: Callable[[HandoffEnvelope], Awaitable[None]],
    *,
    limit: int,
    agent_limits: Mapping[str, int],
    book: TaskBook,
    on_ready: Callable[[HandoffEnvelope], Awaitable[None]],
) -> None:
    """Run every envelope through *run_task*, highest priority first, within the limits.

    *run_task* must not raise for a task's own failure (``run_subagent`` turns those into
    results); whatever it raises stops the whole schedule. Cancellation cancels every running
    task; tasks not yet started stay ``ready``.
    """
    heap = [(-e.priority, index, e) for index, e in enumerate(envelopes)]
    heapq.heapify(heap)
    for envelope in envelopes:
        book.move(envelope.task_id, "ready")
        await on_ready(envelope)
    running = 0
    by_agent: Counter[str] = Counter()
    send, receive = anyio.create_memory_object_stream[str](math.inf)

    async def worker(envelope: HandoffEnvelope) -> None:
        try:
            await run_task(envelope)
        finally:
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                send.send_nowait(envelope.agent)

    async with send, receive, anyio.create_task_group() as tg:
        while heap or running:
            waiting = []
            while heap and running < limit:
                item = heapq.heappop(heap)
                agent = item[2].agent
                if by_agent[agent] >= agent_limits.get(agent, math.inf):
                    waiting.append(item)  # its agent is at its limit: the next one may start
                    continue
                running += 1
                by_agent[agent] += 1
                book.move(item[2].task_id, "running")
                tg.start_soon(worker, item[2], name=f"task {item[2].task_id}")
            for item in waiting:
                heapq.heappush(heap, item)
            if not running:
                break
            finished_agent = await receive.receive()
            running -= 1
            by_agent[finished_agent] -= 1
