"""orchestrator/results.py and envelopes.SealedResults: a run's results held as their sealed
lines, read back as the results they are, and a run that ends holding few models."""

from __future__ import annotations

import copy
import gc
import pickle
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import (
    CheckResult,
    Report,
    SealedResults,
    TaskResult,
    audit_report,
    json_line,
    load_report_json,
    seal_report,
    sealed_result_line,
)
from orchestrator import Workspace, build_envelope, orchestrate_parallel
from orchestrator.report import aggregate_results, report_bytes
from orchestrator.results import RECENT, Brief, ResultStore
from tests.test_report import FINISHED, STARTED, aggregate, task_result


def stored(*results: TaskResult) -> ResultStore:
    store = ResultStore()
    for result in results:
        store[result.task_id] = result
    return store


def count_models_made(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A list that grows by one each time a TaskResult is made from JSON."""
    made: list[str] = []
    real = TaskResult.model_validate_json.__func__  # type: ignore[attr-defined]

    def counted(cls: type[TaskResult], data: Any, **kwargs: Any) -> TaskResult:
        made.append("x")
        return real(cls, data, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(TaskResult, "model_validate_json", classmethod(counted))
    return made


def forget(store: ResultStore) -> None:
    """Push every model out of the store's recent ones, so that reads make them again."""
    store._recent.clear()
    gc.collect()


# -- ResultStore ------------------------------------------------------------------------


def test_a_stored_result_is_the_same_object_while_in_use_and_an_equal_one_after() -> None:
    result = task_result("a", "succeeded")
    store = stored(result)
    assert store["a"] is result
    expected = result.model_dump(mode="json")
    del result
    forget(store)
    again = store["a"]
    assert again.model_dump(mode="json") == expected
    assert store["a"] is again  # made once, while it is held


def test_the_line_a_result_was_sealed_with_is_the_one_kept() -> None:
    sealed, line = sealed_result_line(task_result("a", "failed"))
    store = ResultStore()
    store.seal(sealed, line)
    assert store.line_of(sealed) is line
    store["a"] = sealed
    assert store.line_of(sealed) is line
    assert store.sealed(["a"]).lines == [line]


def test_a_line_sealed_for_another_result_of_the_task_is_not_used() -> None:
    first, line = sealed_result_line(task_result("a", "failed"))
    second = task_result("a", "succeeded")
    store = ResultStore()
    store.seal(first, line)
    store["a"] = second
    assert store.sealed(["a"]).lines == [json_line(second.model_dump(mode="json"))]
    assert store.brief("a").status == "succeeded"


def test_a_result_replaced_goes_last_and_one_under_another_id_is_refused() -> None:
    store = stored(task_result("a", "failed"), task_result("b", "succeeded"))
    store["a"] = task_result("a", "succeeded")
    assert list(store) == ["b", "a"]
    assert [b.status for b in store.briefs()] == ["succeeded", "succeeded"]
    with pytest.raises(ValueError, match="result of 'b' stored as 'c'"):
        store["c"] = task_result("b", "failed")
    del store["b"]
    assert "b" not in store
    assert len(store) == 1
    with pytest.raises(KeyError):
        store.sealed(["a", "b"])


def test_a_brief_holds_what_the_end_of_a_run_reads() -> None:
    result = task_result("a", "failed", agent="beta", group="g")
    brief = Brief.of(result)
    assert (brief.task_id, brief.agent, brief.status, brief.group) == ("a", "beta", "failed", "g")
    assert brief.error == result.error
    assert (brief.branch, brief.result_commit, brief.ignored_hooks) == (None, None, False)
    committed = task_result("b", "succeeded").model_copy(update={"branch": "orchestrator/r/b"})
    committed.provenance.result_commit = "c" * 40
    brief = Brief.of(committed)
    assert (brief.branch, brief.result_commit) == ("orchestrator/r/b", "c" * 40)


@pytest.mark.parametrize(
    ("hooks", "ignored"),
    [
        ([], False),
        ([(True, False)], False),  # a required hook that failed failed the task instead
        ([(False, True)], False),  # an optional hook that passed
        ([(True, True), (False, False)], True),  # an optional hook that failed: ignored
    ],
)
def test_a_brief_says_whether_a_hook_failed_and_was_ignored(
    hooks: list[tuple[bool, bool]], ignored: bool
) -> None:
    made = [
        CheckResult(
            name=f"h{i}",
            phase="hook",
            turn=1,
            command=["true"],
            required=required,
            passed=passed,
            exit_code=0 if passed else 1,
            duration_s=0.0,
        )
        for i, (required, passed) in enumerate(hooks)
    ]
    result = task_result("a", "succeeded").model_copy(update={"hooks": made})
    assert Brief.of(result).ignored_hooks is ignored


@pytest.mark.parametrize("sealed", [False, True], ids=["stored", "sealed-then-stored"])
def test_the_store_keeps_only_its_recent_models(sealed: bool) -> None:
    """Neither the stored results nor the lines they were sealed with keep every model."""
    store = ResultStore()
    for i in range(RECENT + 50):
        result, line = sealed_result_line(task_result(f"t{i}", "succeeded"))
        if sealed:
            store.seal(result, line)
            store.seal(task_result(f"t{i}", "failed"), "{}")  # an earlier one, never stored
        store[f"t{i}"] = result
    gc.collect()
    alive = [o for o in gc.get_objects() if isinstance(o, TaskResult)]
    assert RECENT <= len(alive) < RECENT + 10


def test_a_result_read_back_is_made_once_while_it_is_recent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = stored(*(task_result(f"t{i}", "succeeded") for i in range(3)))
    forget(store)
    made = count_models_made(monkeypatch)
    assert store["t1"].status == "succeeded"
    assert store["t1"].status == "succeeded"  # the model above is no longer held
    assert len(made) == 1


def test_briefs_come_in_the_order_asked() -> None:
    store = stored(task_result("a", "succeeded"), task_result("b", "failed"))
    assert [b.task_id for b in store.briefs()] == ["a", "b"]
    assert [b.task_id for b in store.briefs(["b", "a"])] == ["b", "a"]
    assert [b.task_id for b in store.briefs(["b"])] == ["b"]


# -- SealedResults ----------------------------------------------------------------------

RESULTS = [task_result(t, s) for t, s in [("a", "succeeded"), ("b", "failed"), ("c", "cached")]]


def sealed_results(results: list[TaskResult] = RESULTS) -> SealedResults:
    return stored(*results).sealed([r.task_id for r in results])


def test_sealed_results_read_as_the_list_they_were_made_from() -> None:
    results = sealed_results()
    assert len(results) == 3
    assert results == RESULTS
    assert RESULTS == results  # noqa: SIM300  (list.__eq__ defers to SealedResults)
    assert [r.task_id for r in results] == ["a", "b", "c"]
    assert results[-1] == RESULTS[-1]
    assert results[1:] == RESULTS[1:]
    assert results.task_ids == ["a", "b", "c"]
    assert results.seals == [r.provenance.result_sha256 for r in RESULTS]
    assert results != RESULTS[:2]
    assert results != "abc"
    with pytest.raises(IndexError):
        results[3]
    assert repr(results) == "SealedResults(<3 results>)"


def test_sealed_results_need_an_id_and_a_seal_per_line() -> None:
    with pytest.raises(ValueError, match="a task id and a seal for each line"):
        SealedResults(["{}"], task_ids=[], seals=[])


def test_sealed_results_pickle_and_copy() -> None:
    results = sealed_results()
    assert pickle.loads(pickle.dumps(results)) == results
    assert copy.copy(results) is results
    assert copy.deepcopy(results) is results


def test_a_report_of_sealed_results_is_the_report_of_the_list() -> None:
    listed = aggregate(RESULTS)
    lazy = aggregate(sealed_results(), briefs=[Brief.of(r) for r in RESULTS])  # as a run makes it
    assert isinstance(lazy.results, SealedResults)
    assert lazy.report_sha256 == listed.report_sha256
    assert lazy == listed
    assert lazy.to_json_dict() == listed.to_json_dict()
    assert report_bytes(lazy) == report_bytes(listed)
    assert lazy.result("b") == RESULTS[1]
    with pytest.raises(KeyError):
        lazy.result("nope")
    assert seal_report(lazy).report_sha256 == listed.report_sha256
    copied = Report.model_validate(lazy.model_dump(by_alias=True))
    assert isinstance(copied.results, list)
    assert copied == lazy


def test_a_brief_per_result_is_required() -> None:
    with pytest.raises(ValueError, match="a brief for each result"):
        aggregate_results(
            sealed_results(),
            briefs=[],
            run_id="20261122-055431-8c6b7f",
            plan_name="p",
            plan_sha256="a" * 64,
            repo=None,
            base_ref=None,
            base_commit=None,
            run_dir=Path("/tmp/x"),
            started_at=STARTED,
            finished_at=FINISHED,
        )


# -- a run ------------------------------------------------------------------------------


def test_a_run_keeps_its_results_as_lines_and_makes_no_model_for_its_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """600 no-op tasks: the report is made from the lines and briefs (no result is read
    back into a model), the run ends holding no more models than the store's recent ones,
    and the report on disk is the report returned."""
    made = count_models_made(monkeypatch)

    async def noop(envelope: Any, workspace: Workspace) -> dict[str, Any]:
        return {"n": envelope.task_id}

    n = RECENT + 344
    envelopes = [
        build_envelope("n", "t", task_id=f"t{i}", worktree=False, venv=False) for i in range(n)
    ]
    report = anyio.run(
        lambda: orchestrate_parallel(envelopes, agents={"n": noop}, state_dir=tmp_path)
    )
    assert made == []
    assert isinstance(report.results, SealedResults)
    assert report.summary.successful == n
    gc.collect()
    alive = sum(1 for o in gc.get_objects() if isinstance(o, TaskResult))
    assert alive <= RECENT
    path = Path(report.run_dir) / "report.json"
    raw, _ = load_report_json(path)
    assert raw == report.to_json_dict()
    assert audit_report(raw, run_dir=Path(report.run_dir)) == []
    made.clear()
    assert report.results[7].output == {"n": "t7"}
    assert report.result("t9").output == {"n": "t9"}
    assert made == ["x", "x"]


def test_a_report_reads_strictly_from_its_json_and_dumps_as_any(tmp_path: Path) -> None:
    """SealedResults took the field's JSON validation through Python (so ``strict`` refused
    every datetime a result holds), and ``serialize_as_any`` could not write one."""

    async def noop(envelope: Any, workspace: Workspace) -> dict[str, Any]:
        return {"n": envelope.task_id}

    envelopes = [
        build_envelope("n", "t", task_id=f"t{i}", worktree=False, venv=False) for i in range(2)
    ]
    report = anyio.run(
        lambda: orchestrate_parallel(envelopes, agents={"n": noop}, state_dir=tmp_path)
    )
    assert isinstance(report.results, SealedResults)
    text = (Path(report.run_dir) / "report.json").read_text()
    strict = Report.model_validate_json(text, strict=True)
    assert strict == report
    assert Report.model_validate_json(report.model_dump_json(by_alias=True), strict=True) == report
    as_any = report.model_dump_json(by_alias=True, serialize_as_any=True)
    assert Report.model_validate_json(as_any) == report
    assert report.model_dump(mode="json", by_alias=True, serialize_as_any=True) == (
        report.to_json_dict()
    )
