"""Envelopes and results share their ``model_fields_set`` (envelopes/_lean.py), and no
caller can tell: what a model says was given stays exactly what was given."""

from __future__ import annotations

import copy
import pickle
import tracemalloc
from pathlib import Path
from typing import Any

import anyio
import pytest

import envelopes._lean as lean
from envelopes import (
    HandoffEnvelope,
    Limits,
    Metrics,
    TaskResult,
    Timings,
    build_envelope,
    sealed_result_line,
)
from orchestrator import Workspace, orchestrate_parallel


def test_models_given_the_same_fields_share_one_set() -> None:
    one = build_envelope("a", "t", task_id="one")
    two = build_envelope("b", "u", task_id="two")
    assert one.model_fields_set is two.model_fields_set
    assert one.limits.model_fields_set is two.limits.model_fields_set
    # What was given, exactly: build_envelope gives everything but these.
    assert set(HandoffEnvelope.model_fields) - one.model_fields_set == {"schema_", "upstream"}


def test_a_model_given_fewer_fields_says_so() -> None:
    full = Metrics(cpu_user_s=1.0, cpu_system_s=0.5, max_rss_kb=10, stdout_bytes=1, stderr_bytes=2)
    few = Metrics(cpu_user_s=1.0)
    assert few.model_fields_set == {"cpu_user_s"}
    assert full.model_fields_set == set(Metrics.model_fields)
    assert few.model_dump(exclude_unset=True) == {"cpu_user_s": 1.0}


def test_assigning_a_field_not_given_changes_only_that_model() -> None:
    one, two = Metrics(cpu_user_s=1.0), Metrics(cpu_user_s=2.0)
    assert one.model_fields_set is two.model_fields_set
    one.max_rss_kb = 5
    assert one.model_fields_set == {"cpu_user_s", "max_rss_kb"}
    assert two.model_fields_set == {"cpu_user_s"}
    assert Metrics(cpu_user_s=3.0).model_fields_set == {"cpu_user_s"}
    # A field already given: nothing to add, the set stays shared.
    two.cpu_user_s = 4.0
    assert two.model_fields_set is Metrics(cpu_user_s=5.0).model_fields_set


@pytest.mark.parametrize("deep", [False, True])
def test_a_copy_with_an_update_changes_only_the_copy(deep: bool) -> None:
    one, two = Metrics(cpu_user_s=1.0), Metrics(cpu_user_s=2.0)
    copied = one.model_copy(update={"stdout_bytes": 7}, deep=deep)
    assert copied.model_fields_set == {"cpu_user_s", "stdout_bytes"}
    assert one.model_fields_set == two.model_fields_set == {"cpu_user_s"}
    # And the copy shares the set of its kind.
    assert copied.model_fields_set is Metrics(cpu_user_s=1.0, stdout_bytes=1).model_fields_set


def test_copies_and_pickles_keep_what_was_given() -> None:
    envelope = build_envelope("a", "t", task_id="one", limits=Limits(memory_mb=64))
    for other in (
        copy.copy(envelope),
        copy.deepcopy(envelope),
        pickle.loads(pickle.dumps(envelope)),
    ):
        assert other == envelope
        assert other.model_fields_set == envelope.model_fields_set
        assert other.limits.model_fields_set == {"memory_mb"}
    # Read back from its JSON, where every field is written, every field was given.
    read = HandoffEnvelope.model_validate_json(envelope.model_dump_json(by_alias=True))
    assert read == envelope and read.model_fields_set == set(HandoffEnvelope.model_fields)


def test_past_the_bound_a_model_keeps_a_set_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A report read in could give its results every mix of fields: the shared sets are
    bounded, and past the bound each model keeps its own, as any pydantic model does."""
    monkeypatch.setattr(lean, "_SHARED", {})
    monkeypatch.setattr(lean, "_MAX_SHARED", 2)
    a, b = Metrics(cpu_user_s=1.0), Metrics(max_rss_kb=1)
    c1, c2 = Metrics(stdout_bytes=1), Metrics(stdout_bytes=2)
    assert len(lean._SHARED) == 2
    assert c1.model_fields_set == c2.model_fields_set == {"stdout_bytes"}
    assert c1.model_fields_set is not c2.model_fields_set
    assert Metrics(cpu_user_s=2.0).model_fields_set is a.model_fields_set
    assert b.model_fields_set == {"max_rss_kb"}


def a_result_line(state_dir: Path) -> str:
    """The line of a result of a real (worktree-less) run."""

    async def noop(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        return {"done": True}

    envelope = build_envelope("n", "t", task_id="one", worktree=False, venv=False)
    report = anyio.run(
        lambda: orchestrate_parallel([envelope], agents={"n": noop}, state_dir=state_dir)
    )
    return sealed_result_line(report.results[0])[1]


def test_a_result_read_back_holds_no_set_of_its_own(tmp_path: Path) -> None:
    """What the sharing is for: a run's results, read back, cost memory for their values,
    not for a copy of their field names each (nine sets per result)."""
    line = a_result_line(tmp_path)
    first, second = TaskResult.model_validate_json(line), TaskResult.model_validate_json(line)
    assert first.model_fields_set is second.model_fields_set
    assert first.provenance.model_fields_set is second.provenance.model_fields_set
    assert first.timings.model_fields_set is second.timings.model_fields_set
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = [TaskResult.model_validate_json(line) for _ in range(200)]
        each = (tracemalloc.get_traced_memory()[0] - before) / len(held)
    finally:
        tracemalloc.stop()
    unshared = sum(
        len(m.model_fields_set) for m in (first, first.provenance, first.timings, first.metrics)
    )
    assert unshared > 40  # the names that would otherwise be held again by every result
    assert each < 8_000, each
    assert isinstance(held[0].timings, Timings)


def test_an_extra_attribute_of_a_loose_subclass_changes_only_that_model() -> None:
    """A caller's subclass with ``extra="allow"``: pydantic adds an extra attribute's name
    to the set too."""
    from pydantic import ConfigDict

    class Loose(Metrics):
        model_config = ConfigDict(extra="allow")

    one, two = Loose(cpu_user_s=1.0), Loose(cpu_user_s=2.0)
    one.note = "mine"
    assert one.model_fields_set == {"cpu_user_s", "note"}
    assert two.model_fields_set == Loose(cpu_user_s=3.0).model_fields_set == {"cpu_user_s"}
