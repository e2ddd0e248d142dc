"""envelopes/_usage.py: estimates from a plan's rates, a task's usage from its attempts', and
the run's totals."""

from __future__ import annotations

from typing import Any

import pytest

from envelopes import (
    Rates,
    Usage,
    add_usage,
    estimate_cost,
    usage_totals,
    with_estimated_cost,
)


def test_a_plans_rates_estimate_what_an_agent_did_not_report() -> None:
    rates = {"m": Rates(input=3.0, output=15.0, cache_read=0.3)}
    usage = Usage(input_tokens=1_000_000, output_tokens=100_000, cache_read_tokens=10, model="m")
    cost = with_estimated_cost(usage, rates)
    assert cost is not None and cost.cost_source == "estimated"
    assert cost.cost_usd == round(3.0 + 1.5 + 10 * 0.3 / 1_000_000, 6)
    reported = usage.model_copy(update={"cost_usd": 9.0, "cost_source": "reported"})
    assert with_estimated_cost(reported, rates) is reported  # a reported cost stays
    other = usage.model_copy(update={"model": "other"})
    assert with_estimated_cost(other, rates) == other  # no rates for its model
    assert with_estimated_cost(Usage(model="m", turns=3), rates) == Usage(model="m", turns=3)


def test_cache_tokens_cost_the_input_rate_unless_the_rates_say_otherwise() -> None:
    rates = {"input": 2.0, "output": 0.0, "cache_read": None, "cache_write": 4.0}
    usage = {"cache_read_tokens": 1_000_000, "cache_write_tokens": 1_000_000}
    assert estimate_cost(usage, rates) == 6.0
    assert estimate_cost({"turns": 2}, rates) is None


def u(**fields: Any) -> dict[str, Any]:
    return Usage(**fields).model_dump(mode="json")


def test_a_tasks_usage_adds_up_its_attempts() -> None:
    added = add_usage(
        [
            u(input_tokens=100, cost_usd=0.5, cost_source="reported", model="a", session_id="1"),
            u(input_tokens=10, output_tokens=7, cost_usd=0.25, cost_source="estimated", turns=2),
            u(input_tokens=1, cost_usd=0.125, cost_source="reported", model="b", turns=1),
        ]
    )
    assert added == u(
        input_tokens=111,
        output_tokens=7,
        turns=3,
        cost_usd=0.875,
        cost_source="estimated",  # one of the three was an estimate
        model="b",
        session_id="1",
    )
    assert add_usage([None, None]) is None
    assert add_usage([]) is None
    single = u(input_tokens=3, cost_usd=0.1, cost_source="reported")
    assert add_usage([single]) == single


@pytest.mark.parametrize(
    ("attempts", "cost", "source"),
    [
        ([None, u(cost_usd=0.5, cost_source="reported")], 0.5, "partial"),
        ([u(input_tokens=9), u(cost_usd=0.5, cost_source="reported")], 0.5, "partial"),
        ([u(input_tokens=9), u(output_tokens=1)], None, None),
        ([u(cost_usd=0.5, cost_source="reported")] * 2, 1.0, "reported"),
    ],
    ids=["an attempt said nothing", "an attempt gave no cost", "no cost", "all reported"],
)
def test_a_cost_not_known_for_every_attempt_is_partial(
    attempts: list[dict[str, Any] | None], cost: float | None, source: str | None
) -> None:
    added = add_usage(attempts)
    assert added is not None and (added["cost_usd"], added["cost_source"]) == (cost, source)


def test_a_partial_cost_counts_in_the_total_and_as_not_known() -> None:
    totals = usage_totals(
        [
            u(input_tokens=1, cost_usd=0.5, cost_source="partial"),
            u(input_tokens=2, cost_usd=0.25, cost_source="reported"),
            u(input_tokens=4),
            None,
        ]
    )
    assert totals == {
        "tasks": 3,
        "input_tokens": 7,
        "output_tokens": 0,
        "cache_read_tokens": 0,
        "cache_write_tokens": 0,
        "total_tokens": 0,
        "cost_usd": 0.75,
        "cost_unknown": 2,
    }
