"""orchestrator/retry.py: how many attempts, what before_retry is told, that exceptions and
cancellation are never retried, and that tests can remove the waits (set_testing).

The conftest turns waits off for every test; the tests of the real backoff turn them back on
with bounds of 0 (or a few milliseconds, never slept in full), so nothing here waits."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

import anyio
import anyio.lowlevel
import pytest

from orchestrator.retry import retry_attempts, set_testing

BACKENDS = ["asyncio", "trio"]


class Recorder:
    """An attempt that returns ``outcomes[n - 1]`` (the last one after that), and what it saw."""

    def __init__(self, *outcomes: str) -> None:
        self.outcomes = outcomes
        self.numbers: list[int] = []
        self.retries: list[tuple[int, float]] = []

    async def attempt(self, number: int) -> str:
        await anyio.lowlevel.checkpoint()
        self.numbers.append(number)
        return self.outcomes[min(number, len(self.outcomes)) - 1]

    async def before_retry(self, number: int, wait: float) -> None:
        self.retries.append((number, wait))


def run(
    recorder: Recorder,
    *,
    retries: int,
    backend: str = "asyncio",
    before_retry: Callable[[int, float], Awaitable[None]] | None = None,
    **options: float,
) -> str:
    async def main() -> str:
        return await retry_attempts(
            recorder.attempt,
            retries=retries,
            should_retry=lambda outcome: outcome != "ok",
            before_retry=before_retry or recorder.before_retry,
            **{"initial": 1.0, "maximum": 30.0, **options},
        )

    result: str = anyio.run(main, backend=backend)
    return result


@pytest.fixture
def real_waits() -> Iterator[None]:
    """The backoff as in production (the conftest's autouse fixture puts testing back after)."""
    set_testing(False)
    yield
    set_testing(True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_retries_is_one_attempt_whatever_it_returns(backend: str) -> None:
    recorder = Recorder("failed")
    assert run(recorder, retries=0, backend=backend) == "failed"
    assert recorder.numbers == [1]
    assert recorder.retries == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_attempts_stop_at_the_first_that_needs_no_retry(backend: str) -> None:
    recorder = Recorder("failed", "timed_out", "ok", "never reached")
    assert run(recorder, retries=5, backend=backend) == "ok"
    assert recorder.numbers == [1, 2, 3]
    assert recorder.retries == [(2, 0.0), (3, 0.0)]


@pytest.mark.parametrize("retries", [1, 3, 7])
def test_attempts_run_out_after_retries_plus_one_and_the_last_value_is_returned(
    retries: int,
) -> None:
    recorder = Recorder(*[f"failed-{n}" for n in range(1, 20)])
    assert run(recorder, retries=retries) == f"failed-{retries + 1}"
    assert recorder.numbers == list(range(1, retries + 2))
    assert [number for number, _ in recorder.retries] == list(range(2, retries + 2))


def test_an_exception_from_an_attempt_is_not_retried() -> None:
    numbers: list[int] = []
    retried: list[int] = []

    async def attempt(number: int) -> str:
        numbers.append(number)
        if number == 2:
            raise OSError("the disk is full")
        return "failed"

    async def before_retry(number: int, wait: float) -> None:
        retried.append(number)

    async def main() -> str:
        return await retry_attempts(
            attempt,
            retries=5,
            should_retry=lambda _: True,
            before_retry=before_retry,
            initial=1.0,
            maximum=30.0,
        )

    with pytest.raises(OSError, match="the disk is full"):
        anyio.run(main)
    assert numbers == [1, 2]
    assert retried == [2]


def test_an_exception_from_before_retry_stops_the_attempts() -> None:
    recorder = Recorder("failed")

    async def before_retry(number: int, wait: float) -> None:
        raise RuntimeError(f"the handler refused attempt {number}")

    with pytest.raises(RuntimeError, match="the handler refused attempt 2"):
        run(recorder, retries=3, before_retry=before_retry)
    assert recorder.numbers == [1]


def test_should_retry_sees_each_attempts_value() -> None:
    seen: list[int] = []

    async def attempt(number: int) -> int:
        return number * 10

    def should_retry(value: int) -> bool:
        seen.append(value)
        return value < 30

    assert (
        anyio.run(
            lambda: retry_attempts(
                attempt, retries=9, should_retry=should_retry, initial=1.0, maximum=30.0
            )
        )
        == 30
    )
    assert seen == [10, 20, 30]


def test_a_wait_asked_for_by_the_last_value_is_kept_even_past_the_maximum(
    real_waits: None,
) -> None:
    recorder = Recorder("failed", "busy", "ok")
    asked = {"failed": None, "busy": 0.02}

    async def main() -> str:
        return await retry_attempts(
            recorder.attempt,
            retries=3,
            should_retry=lambda outcome: outcome != "ok",
            before_retry=recorder.before_retry,
            initial=0.0,
            maximum=0.0,
            wait_at_least=asked.get,
        )

    assert anyio.run(main) == "ok"
    # After "failed" the backoff (0 here); after "busy" what it asked, past the maximum.
    assert recorder.retries == [(2, 0.0), (3, 0.02)]


def test_testing_mode_removes_even_long_waits() -> None:
    recorder = Recorder("failed", "failed", "ok")
    assert run(recorder, retries=2, initial=3600.0, maximum=7200.0) == "ok"
    assert recorder.retries == [(2, 0.0), (3, 0.0)]


def test_backoff_bounds_of_zero_wait_nothing(real_waits: None) -> None:
    recorder = Recorder("failed", "failed", "failed", "ok")
    assert run(recorder, retries=3, initial=0.0, maximum=0.0) == "ok"
    assert recorder.retries == [(2, 0.0), (3, 0.0), (4, 0.0)]


def test_waits_never_exceed_the_maximum(real_waits: None) -> None:
    recorder = Recorder("failed")
    run(recorder, retries=8, initial=0.001, maximum=0.002)
    waits = [wait for _, wait in recorder.retries]
    assert len(waits) == 8
    # The first: initial plus a jitter of up to initial; then 0.001 * 2**n reaches the cap.
    assert 0.001 <= waits[0] <= 0.002, waits
    assert waits[1:] == [0.002] * 7


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancelled_during_a_retry_wait_no_further_attempt_runs(
    real_waits: None, backend: str
) -> None:
    recorder = Recorder("failed")
    outcome: dict[str, object] = {}

    async def main() -> None:
        with anyio.CancelScope() as scope:

            async def cancel_then_wait(number: int, wait: float) -> None:
                outcome["wait"] = wait
                scope.cancel()  # the hour-long wait that follows must end at once

            await retry_attempts(
                recorder.attempt,
                retries=3,
                should_retry=lambda _: True,
                before_retry=cancel_then_wait,
                initial=3600.0,
                maximum=3600.0,
            )
            outcome["returned"] = True
        outcome["cancelled"] = scope.cancelled_caught

    anyio.run(main, backend=backend)
    assert recorder.numbers == [1]
    assert outcome["cancelled"] is True and "returned" not in outcome
    assert outcome["wait"] == 3600.0


def test_the_backoff_raises_no_deprecation_warning(real_waits: None) -> None:
    recorder = Recorder("failed", "ok")
    assert run(recorder, retries=1, initial=0.0, maximum=0.0) == "ok"


def test_cancelled_during_an_attempt_it_is_not_retried() -> None:
    numbers: list[int] = []

    async def main() -> bool:
        with anyio.CancelScope() as scope:

            async def attempt(number: int) -> str:
                numbers.append(number)
                scope.cancel()
                await anyio.sleep_forever()
                return "unreachable"

            await retry_attempts(
                attempt, retries=3, should_retry=lambda _: True, initial=1.0, maximum=30.0
            )
        return scope.cancelled_caught

    assert anyio.run(main) is True
    assert numbers == [1]
