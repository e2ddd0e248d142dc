"""The event stream: a run's events as an async iterator, and how its errors come out.

Events themselves are models of the contract (``envelopes.Event``); the run's context logs each
one to ``events.jsonl`` and hands it to the caller's ``on_event`` handler
(``RunContext.emit``). This module holds what sits between that and the caller:
:class:`RunEvents` (``async for event in events``), :func:`emit_run_event` for the run's own
events, and :func:`unwrapped`, which turns a task group's exception group into the exception a
caller wants to catch.
"""

from __future__ import annotations

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from envelopes import Event, Report

from .context import RunContext
from .errors import EventHandlerFailed, OrchestratorError

__all__ = ["RunEvents", "emit_run_event", "unwrapped"]


class RunEvents:
    """The events of a run, as an async iterator; ``report`` is set once the run has ended."""

    def __init__(self, receive: MemoryObjectReceiveStream[Event]) -> None:
        self._receive = receive
        self.report: Report | None = None

    def __aiter__(self) -> RunEvents:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None


async def emit_run_event(ctx: RunContext, event: Event) -> None:
    """Emit a run-level event; a failing handler's own exception propagates."""
    try:
        await ctx.emit(event)
    except EventHandlerFailed as exc:
        raise (exc.__cause__ or exc) from None


def unwrapped(exc: BaseException) -> BaseException:
    """What a task group raised, as callers want to catch it.

    A lone exception comes out of its group; a failed ``on_event`` handler comes out as the
    handler's own exception (the first, if several tasks' handlers failed together); several
    tasks stopped by the orchestrator's own errors (a full disk, met by two tasks at once)
    come out as the first of them.
    """
    leaves = _leaves(exc)
    failed = [e for e in leaves if isinstance(e, EventHandlerFailed)]
    if failed and failed[0].__cause__ is not None:
        return failed[0].__cause__
    if len(leaves) > 1 and all(isinstance(e, OrchestratorError) for e in leaves):
        return leaves[0]
    return leaves[0] if len(leaves) == 1 else exc


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
