"""What agents spent: :class:`Usage` per attempt and per task, and the run's totals.

A task's usage is the sum of its attempts' (:func:`add_usage`): a task retried three times
spent what its three attempts did. A cost an agent did not report may be estimated from a
plan's rates (:func:`with_estimated_cost`, :func:`estimate_cost`), per attempt. The functions that add
up work on Usage objects as JSON (mappings), so that the engine writes, and
``audit_report`` recomputes from a report's JSON, with the same code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

from ._lean import SharedFieldNames
from ._plan import Rates

__all__ = [
    "CostSource",
    "Usage",
    "UsageTotals",
    "add_usage",
    "estimate_cost",
    "usage_by_model",
    "usage_totals",
    "with_estimated_cost",
]

#: Whence a cost comes. ``reported``: the agent said what it cost. ``estimated``: computed
#: from a plan's rates (for a task: at least one of its attempts' costs was). ``partial``:
#: a task's attempts whose cost is known, added up, while another attempt's is not known
#: (it reported none, or nothing at all): what the task spent is at least ``cost_usd``.
CostSource = Literal["reported", "estimated", "partial"]

_TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
#: The fields a task's usage adds up over its attempts (where known).
_SUMMED = (*_TOKENS, "total_tokens", "turns")


class Usage(SharedFieldNames):
    """What an agent spent, where it says so (null: not known): on one attempt
    (``Attempt.usage``), or on a task, its attempts' added up (``TaskResult.usage``).

    ``cost_source`` says whence ``cost_usd`` comes (see :data:`CostSource`); never a
    built-in price.
    """

    model_config = ConfigDict(extra="forbid")

    input_tokens: NonNegativeInt | None = None
    output_tokens: NonNegativeInt | None = None
    cache_read_tokens: NonNegativeInt | None = None
    cache_write_tokens: NonNegativeInt | None = None
    total_tokens: NonNegativeInt | None = None
    cost_usd: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    cost_source: CostSource | None = None
    turns: NonNegativeInt | None = None
    model: Annotated[str, Field(max_length=200)] | None = None
    session_id: Annotated[str, Field(max_length=200)] | None = None


class UsageTotals(BaseModel):
    """What the tasks whose usage is known spent, added up (see :func:`usage_totals`)."""

    model_config = ConfigDict(extra="forbid")

    tasks: NonNegativeInt
    input_tokens: NonNegativeInt = 0
    output_tokens: NonNegativeInt = 0
    cache_read_tokens: NonNegativeInt = 0
    cache_write_tokens: NonNegativeInt = 0
    total_tokens: NonNegativeInt = 0
    #: The sum of the costs known (reported or estimated; a ``partial`` one's known part).
    cost_usd: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    #: How many of those tasks' cost is not known, or known only in part (``partial``):
    #: Codex and Gemini never say what they cost.
    cost_unknown: NonNegativeInt = 0


def estimate_cost(usage: Mapping[str, Any], rates: Mapping[str, Any]) -> float | None:
    """What *usage*'s tokens cost at *rates* (``Rates`` as JSON: USD per million tokens),
    rounded to 6 decimals; None when it has no token count. Cache reads and writes cost the
    input rate unless the rates say otherwise."""
    parts = [
        (usage.get("input_tokens"), rates["input"]),
        (usage.get("output_tokens"), rates["output"]),
        (usage.get("cache_read_tokens"), _or_input(rates, "cache_read")),
        (usage.get("cache_write_tokens"), _or_input(rates, "cache_write")),
    ]
    if all(tokens is None for tokens, _ in parts):
        return None
    cost: float = sum((tokens or 0) * rate for tokens, rate in parts) / 1_000_000
    return round(cost, 6)


def _or_input(rates: Mapping[str, Any], key: str) -> Any:
    value = rates.get(key)
    return rates["input"] if value is None else value


def with_estimated_cost(usage: Usage | None, pricing: Mapping[str, Rates]) -> Usage | None:
    """*usage* with its cost estimated from *pricing* when the agent did not report one and
    the plan has rates for its model (``cost_source: estimated``); else *usage* as it is."""
    if usage is None or usage.cost_usd is not None or usage.model not in pricing:
        return usage
    cost = estimate_cost(usage.model_dump(), pricing[usage.model or ""].model_dump())
    if cost is None:
        return usage
    return usage.model_copy(update={"cost_usd": cost, "cost_source": "estimated"})


def add_usage(attempts: Iterable[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """A task's usage (as JSON) from its attempts' (None: an attempt that said nothing).

    None when no attempt said anything. Tokens and turns are the sums of the counts known
    (null when no attempt gave one); ``model`` and ``session_id`` are the last ones given.
    ``cost_usd`` is the sum of the costs known, and ``cost_source``: ``reported`` when every
    attempt reported its cost, ``estimated`` when every attempt's cost is known and one was
    estimated, ``partial`` when some attempt's cost is not known (then the sum is what the
    task spent at least), null when no cost is known.
    """
    every = list(attempts)
    known = [u for u in every if u]
    if not known:
        return None
    usage: dict[str, Any] = {}
    for key in _SUMMED:
        counts = [u[key] for u in known if u.get(key) is not None]
        usage[key] = sum(counts) if counts else None
    costs = [u for u in every if u and u.get("cost_usd") is not None]
    usage["cost_usd"] = round(sum(u["cost_usd"] for u in costs), 6) if costs else None
    if not costs:
        usage["cost_source"] = None
    elif len(costs) < len(every):
        usage["cost_source"] = "partial"
    elif any(u.get("cost_source") == "estimated" for u in costs):
        usage["cost_source"] = "estimated"
    else:
        usage["cost_source"] = costs[-1].get("cost_source")
    for key in ("model", "session_id"):
        usage[key] = next((u[key] for u in reversed(known) if u.get(key) is not None), None)
    return usage


def usage_totals(usages: Iterable[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """The totals of *usages* (``Usage`` objects as JSON; None: not known), None when no
    usage is known. The engine writes them and ``audit_report`` recomputes them with this."""
    known = [u for u in usages if u]
    if not known:
        return None
    totals: dict[str, Any] = {"tasks": len(known)}
    for key in (*_TOKENS, "total_tokens"):
        totals[key] = sum(u.get(key) or 0 for u in known)
    totals["cost_usd"] = round(sum(u.get("cost_usd") or 0.0 for u in known), 6)
    totals["cost_unknown"] = sum(
        1 for u in known if u.get("cost_usd") is None or u.get("cost_source") == "partial"
    )
    return totals


def usage_by_model(results: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Usage totals per model (``unknown`` when the agent did not say), of results as JSON."""
    by_model: dict[str, list[Mapping[str, Any]]] = {}
    for result in results:
        usage = result.get("usage")
        if usage:
            by_model.setdefault(usage.get("model") or "unknown", []).append(usage)
    return {model: usage_totals(usages) or {} for model, usages in sorted(by_model.items())}
