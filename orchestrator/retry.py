"""Retrying attempts: exponential backoff with jitter, behind one small helper.

tenacity does the work; this module fixes the policy (an attempt cap, waits that grow from
``initial`` to ``max``) and lets tests remove the waits, as stamina's ``set_testing`` does.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

if TYPE_CHECKING:
    # Imported when a task is retried (40 ms where tornado is installed, which tenacity
    # then imports too): most tasks are not, and a small plan's run is mostly start-up.
    from tenacity import RetryCallState

__all__ = ["retry_attempts", "set_testing"]

T = TypeVar("T")
_testing = False


def _backoff(
    initial: float, maximum: float, at_least: Callable[[Any], float | None] | None = None
) -> Callable[[RetryCallState], float]:
    """Waits of ``initial * 2**(n - 1)`` plus up to ``initial`` of jitter, capped at *maximum*
    (what tenacity's ``wait_exponential_jitter`` does, whose ``initial`` is deprecated in
    tenacity 9 and whose replacement, ``multiplier``, tenacity 8 lacks); at least what
    *at_least* says of the last attempt's value (a server's ``Retry-After``), if anything."""

    def wait(state: RetryCallState) -> float:
        exponential: float = initial * 2.0 ** (state.attempt_number - 1)
        backoff = max(0.0, min(maximum, exponential + random.uniform(0, initial)))
        outcome = state.outcome
        if at_least is None or outcome is None or outcome.failed:
            return backoff
        asked = at_least(outcome.result())
        return backoff if asked is None else max(backoff, asked)

    return wait


def set_testing(testing: bool) -> None:
    """With *testing* true, retries happen without waiting."""
    global _testing
    _testing = testing


async def retry_attempts(
    attempt: Callable[[int], Awaitable[T]],
    *,
    retries: int,
    should_retry: Callable[[T], bool],
    before_retry: Callable[[int, float], Awaitable[None]] | None = None,
    initial: float,
    maximum: float,
    wait_at_least: Callable[[T], float | None] | None = None,
) -> T:
    """Call ``attempt(n)`` for n = 1, 2, ... until ``should_retry`` is false or attempts run out.

    Returns the last attempt's value. ``before_retry(next_number, wait_seconds)`` runs before
    each retry. Exceptions from *attempt* are not retried: they propagate. A retry waits at
    least ``wait_at_least(value)`` seconds when that is not None (the caller bounds it), even
    past *maximum*.
    """

    if retries == 0:
        return await attempt(1)  # the common case, without tenacity's machinery
    from tenacity import AsyncRetrying, retry_if_result, stop_after_attempt, wait_none

    async def notify(state: RetryCallState) -> None:
        if before_retry is not None:
            wait = state.next_action.sleep if state.next_action else 0.0
            await before_retry(state.attempt_number + 1, wait)

    retrying = AsyncRetrying(
        stop=stop_after_attempt(retries + 1),
        wait=wait_none() if _testing else _backoff(initial, maximum, wait_at_least),
        retry=retry_if_result(should_retry),
        before_sleep=notify,
        retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
        sleep=anyio.sleep,
        reraise=True,
    )
    number = 0

    async def call() -> T:
        nonlocal number
        number += 1
        return await attempt(number)

    return await retrying(call)
