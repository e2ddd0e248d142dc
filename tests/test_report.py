"""orchestrator/report.py: the summary, per-agent counts, errors and groups of a run, sealed;
and the report written atomically to every path, where an auditor with ``envelopes`` alone
finds nothing wrong with it."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import (
    REPORT_SCHEMA,
    REPORT_SCHEMA_V1,
    AgentInfo,
    ErrorInfo,
    NotAReport,
    Provenance,
    Report,
    TaskResult,
    Timings,
    audit_report,
    digest,
    digest_without,
    json_line,
    load_report_json,
    report_chunks,
    report_digest,
    report_layout,
    seal_report,
    seal_result,
    sealed_result_line,
)
from orchestrator._version import __version__
from orchestrator.errors import RunDirError
from orchestrator.report import aggregate_results, report_bytes, write_report

STARTED = datetime(2026, 11, 22, 5, 54, 31, tzinfo=UTC)
FINISHED = STARTED + timedelta(seconds=12.5)
BASE = "b" * 40
#: The error kind each unsuccessful status gets.
KIND = {"failed": "exit_code", "timed_out": "timeout", "cancelled": "cancelled"}


def task_result(
    task_id: str,
    status: str,
    *,
    agent: str = "coder",
    group: str | None = None,
    error: ErrorInfo | None = None,
) -> TaskResult:
    """A sealed TaskResult whose digests hold, as the orchestrator makes them."""
    if error is None and status in KIND:
        error = ErrorInfo(kind=KIND[status], message=f"{task_id} did not make it")
    if error is None and status == "skipped":
        error = ErrorInfo(kind="dependency", message="a dependency failed")
    output = {"task": task_id} if status in ("succeeded", "cached") else None
    info = AgentInfo(kind="command", command=["python", f"{agent}.py"])
    result = TaskResult(
        task_id=task_id,
        agent=agent,
        status=status,  # type: ignore[arg-type]
        attempts=0,
        output=output,
        error=error,
        timings=Timings(started_at=STARTED, finished_at=FINISHED, duration_s=12.5),
        group=group,
        provenance=Provenance(
            envelope_sha256="e" * 64,
            base_commit=BASE,
            agent=info,
            agent_sha256=digest(info.model_dump(mode="json")),
            output_sha256=digest(output),
        ),
    )
    return seal_result(result)


def aggregate(results: list[TaskResult], **options: Any) -> Report:
    settings: dict[str, Any] = {
        "run_id": "20261122-055431-8c6b7f",
        "plan_name": "demo",
        "plan_sha256": "a" * 64,
        "repo": "/srv/repo",
        "base_ref": "HEAD",
        "base_commit": BASE,
        "run_dir": Path("/srv/repo/.git/orchestrator/runs/20261122-055431-8c6b7f"),
        "started_at": STARTED,
        "finished_at": FINISHED,
    }
    return aggregate_results(results, **(settings | options))


ONE_OF_EACH = [
    ("ok", "succeeded"),
    ("reused", "cached"),
    ("broke", "failed"),
    ("slow", "timed_out"),
    ("stopped", "cancelled"),
    ("after", "skipped"),
]


def test_every_status_is_counted_in_the_summary() -> None:
    report = aggregate([task_result(t, s) for t, s in ONE_OF_EACH])
    summary = report.summary
    assert summary.total_tasks == 6
    assert summary.successful == 2  # succeeded and cached
    assert (summary.failed, summary.timeout, summary.cancelled) == (1, 1, 1)
    assert (summary.skipped, summary.cached) == (1, 1)
    assert summary.success_rate == 33.33
    assert summary.total_execution_time == 12.5


def test_counts_per_agent_keep_their_task_ids_in_order() -> None:
    results = [
        task_result("a1", "succeeded", agent="alpha"),
        task_result("b1", "failed", agent="beta"),
        task_result("a2", "cached", agent="alpha"),
        task_result("a3", "timed_out", agent="alpha"),
        task_result("b2", "skipped", agent="beta"),
    ]
    by_agent = aggregate(results).results_by_agent
    assert list(by_agent) == ["alpha", "beta"]
    alpha, beta = by_agent["alpha"], by_agent["beta"]
    assert (alpha.total, alpha.successful, alpha.cached, alpha.timeout) == (3, 2, 1, 1)
    assert (alpha.failed, alpha.cancelled, alpha.skipped) == (0, 0, 0)
    assert alpha.task_ids == ["a1", "a2", "a3"]
    assert (beta.total, beta.failed, beta.skipped, beta.successful) == (2, 1, 1, 0)
    assert beta.task_ids == ["b1", "b2"]


def test_errors_list_the_unsuccessful_tasks_in_order() -> None:
    report = aggregate([task_result(t, s) for t, s in ONE_OF_EACH])
    assert [(e.task_id, e.kind) for e in report.errors] == [
        ("broke", "exit_code"),
        ("slow", "timeout"),
        ("stopped", "cancelled"),
        ("after", "dependency"),
    ]
    assert report.errors[0].message == "broke did not make it"
    assert report.errors[0].agent == "coder"


def test_an_empty_run_has_a_zero_rate_not_a_division_error() -> None:
    report = aggregate([], finished_at=STARTED)
    assert report.summary.total_tasks == 0
    assert report.summary.success_rate == 0.0
    assert report.summary.total_execution_time == 0.0
    assert report.results_by_agent == {} and report.errors == [] and report.groups == {}


def test_undecided_groups_select_by_their_policy() -> None:
    results = [
        task_result("fix[a]", "failed", group="fix"),
        task_result("fix[b]", "succeeded", group="fix"),
        task_result("fix[c]", "cached", group="fix"),
        task_result("try[a]", "succeeded", group="try"),
        task_result("try[b]", "succeeded", group="try"),
        task_result("plain", "succeeded"),
    ]
    report = aggregate(results, groups={"fix": ("first_success", None)})
    fix, tried = report.groups["fix"], report.groups["try"]
    assert fix.select == "first_success" and fix.selected == ["fix[b]"]
    assert [(m.task_id, m.status) for m in fix.members] == [
        ("fix[a]", "failed"),
        ("fix[b]", "succeeded"),
        ("fix[c]", "cached"),
    ]
    # A group the mapping does not name selects every succeeded member.
    assert tried.select == "all" and tried.selected == ["try[a]", "try[b]"]
    assert set(report.groups) == {"fix", "try"}


def test_a_group_decided_by_the_run_keeps_its_decision() -> None:
    results = [
        task_result("fix[a]", "succeeded", group="fix"),
        task_result("fix[b]", "succeeded", group="fix"),
    ]
    # The run decided fix[b] (it finished first), though fix[a] comes first in plan order.
    report = aggregate(results, groups={"fix": ("first_success", ["fix[b]"])})
    assert report.groups["fix"].selected == ["fix[b]"]
    nobody = aggregate(
        [task_result("g[a]", "failed", group="g")], groups={"g": ("first_success", None)}
    )
    assert nobody.groups["g"].selected == []


def test_the_report_carries_the_run_and_is_sealed() -> None:
    report = aggregate(
        [task_result("ok", "succeeded")], warnings=["the pool was turned off: no room"]
    )
    assert report.tool == {"name": "worktree-orchestrator", "version": __version__}
    assert (report.run_id, report.plan_name, report.base_ref) == (
        "20261122-055431-8c6b7f",
        "demo",
        "HEAD",
    )
    assert report.run_dir == "/srv/repo/.git/orchestrator/runs/20261122-055431-8c6b7f"
    assert report.warnings == ["the pool was turned off: no room"]
    raw = report.to_json_dict()
    assert report.report_sha256 == report_digest(raw)


def test_a_non_finite_number_never_reaches_the_file_as_nan(tmp_path: Path) -> None:
    """A report must be JSON to any parser: NaN and Infinity are not JSON."""
    sealed = task_result("ok", "succeeded")
    hostile = sealed.model_copy(update={"output": {"score": math.nan, "big": -math.inf}})
    path = anyio.run(write_report, aggregate([hostile]), tmp_path / "report.json")

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in the report file")

    raw = json.loads(path.read_bytes(), parse_constant=refuse)
    assert raw["results"][0]["output"] == {"score": None, "big": None}
    assert raw["report_sha256"] == report_digest(raw)


def written(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_bytes())
    return data


def test_write_report_writes_the_same_sealed_bytes_to_every_path(tmp_path: Path) -> None:
    report = aggregate([task_result(t, s) for t, s in ONE_OF_EACH])
    main = tmp_path / "run" / "report.json"
    copies = [tmp_path / "copy.json", tmp_path / "deep" / "er" / "copy.json"]
    copies[0].write_text("an older report, replaced whole\n" * 100)
    returned = anyio.run(write_report, report, main, *copies)
    assert returned == main
    data = main.read_bytes()
    assert all(copy.read_bytes() == data for copy in copies)
    raw = written(main)
    assert raw == report.to_json_dict()
    # An auditor with envelopes alone: every digest and count holds, and the layout is the
    # orchestrator's own, byte for byte.
    assert audit_report(raw, source=data) == []
    for directory in (main.parent, tmp_path, copies[1].parent):
        assert not [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_a_written_report_changed_afterwards_no_longer_verifies(tmp_path: Path) -> None:
    report = aggregate([task_result("ok", "succeeded"), task_result("broke", "failed")])
    path = anyio.run(write_report, report, tmp_path / "report.json")
    raw = written(path)
    raw["summary"]["failed"] = 0
    raw["summary"]["successful"] = 2
    findings = [f.field for f in audit_report(raw)]
    assert "report_sha256" in findings
    assert "summary.failed" in findings and "summary.successful" in findings


def test_write_report_names_a_copy_it_cannot_write(tmp_path: Path) -> None:
    report = aggregate([task_result("ok", "succeeded")])
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file\n")
    bad = blocker / "copy.json"
    with pytest.raises(RunDirError, match=f"^cannot write {bad}: "):
        anyio.run(write_report, report, tmp_path / "report.json", bad)
    # The main path, written first, is whole.
    assert written(tmp_path / "report.json") == report.to_json_dict()


def test_usage_is_added_up_per_run_agent_and_model_and_verifies(tmp_path: Path) -> None:
    """Agents report usage in their output; the report adds it up, and the audit agrees."""
    import anyio

    from envelopes import HandoffEnvelope, audit_report, build_envelope, load_report_file
    from orchestrator import Workspace, orchestrate_parallel

    spent = {
        "a": {"input_tokens": 100, "output_tokens": 10, "cost_usd": 0.25, "model": "m1"},
        "b": {"input_tokens": 50, "cache_read_tokens": 5, "model": "m2"},
        "c": {"input_tokens": "many"},  # not a Usage: ignored
    }

    async def agent(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, object]:
        return {"usage": spent.get(envelope.task_id)}

    envelopes = [
        build_envelope("w" if t != "b" else "v", t, task_id=t, worktree=False, venv=False)
        for t in ("a", "b", "c", "d")
    ]
    report = anyio.run(
        lambda: orchestrate_parallel(
            envelopes, agents={"w": agent, "v": agent}, state_dir=tmp_path / "s"
        )
    )
    by_id = {r.task_id: r for r in report.results}
    assert by_id["a"].usage is not None and by_id["a"].usage.cost_usd == 0.25
    assert by_id["c"].usage is None and by_id["d"].usage is None
    total = report.summary.usage
    assert total is not None
    assert (total.tasks, total.input_tokens, total.cost_usd, total.cost_unknown) == (
        2,
        150,
        0.25,
        1,
    )
    assert report.results_by_agent["w"].usage is not None
    assert report.results_by_agent["w"].usage.input_tokens == 100
    assert sorted(report.usage_by_model) == ["m1", "m2"]
    raw, _, source = load_report_file(Path(report.run_dir) / "report.json")
    assert audit_report(raw, run_dir=Path(report.run_dir), source=source) == []
    # A forged total is caught.
    raw["summary"]["usage"]["cost_usd"] = 0.0
    fields = {f.field for f in audit_report(raw, run_dir=Path(report.run_dir))}
    assert "summary.usage" in fields


def test_a_version_2_report_holds_a_result_a_line_and_seals_their_seals(tmp_path: Path) -> None:
    results = [task_result(t, s) for t, s in ONE_OF_EACH]
    report = aggregate(results)
    assert report.schema_ == REPORT_SCHEMA == "worktree-orchestrator/report/v2"
    data = anyio.run(write_report, report, tmp_path / "report.json").read_bytes()
    lines = data.decode().splitlines()
    # Each result on a line of its own, as json_line writes it, between the indented rest.
    start = lines.index('  "results": [')
    for i, result in enumerate(results):
        line = lines[start + 1 + i]
        assert line == "    " + json_line(result.model_dump(mode="json")) + ("," if i < 5 else "")
    assert lines[start + 1 + len(results)] in ("  ],", "  ]")
    raw = json.loads(data)
    assert report_layout(raw) == data
    assert audit_report(raw, source=data) == []
    # report_sha256 covers each result through its result_sha256 ...
    seals = [r["provenance"]["result_sha256"] for r in raw["results"]]
    assert raw["report_sha256"] == digest_without({**raw, "results": seals}, "report_sha256")
    # ... which covers the rest of it: a result changed and the report re-sealed is still
    # caught, by that result's own seal.
    raw["results"][1]["exit_code"] = 0
    raw["report_sha256"] = report_digest(raw)
    edited = report_layout(raw)
    assert [(f.task_id, f.field) for f in audit_report(raw, source=edited)] == [
        (results[1].task_id, "provenance.result_sha256")
    ]


def test_report_chunks_lay_out_any_object_as_indented_json() -> None:
    """Outside ``results``, a version 2 file is 2-space indented JSON: an empty object too."""
    assert b"".join(report_chunks({}, None)) == b"{}\n"
    raw = {"a": {"b": [1, "\u00e9"]}, "\u00e9": 2, "results": []}
    expected = json.dumps(raw, indent=2, ensure_ascii=False) + "\n"
    assert b"".join(report_chunks(raw, None)) == expected.encode()


def test_a_version_1_report_is_still_read_and_verified(tmp_path: Path) -> None:
    """Reports written before version 2: indented throughout, sealed over every byte."""
    report = aggregate([task_result(t, s) for t, s in ONE_OF_EACH])
    # A name beyond ASCII: version 1 is UTF-8 too, not \u escapes.
    update = {"schema_": REPORT_SCHEMA_V1, "report_sha256": "", "plan_name": "caf\u00e9 \u2713"}
    old = seal_report(report.model_copy(update=update))
    assert old.report_sha256 == digest_without(old.to_json_dict(), "report_sha256")
    path = anyio.run(write_report, old, tmp_path / "report.json")
    data = path.read_bytes()
    raw = json.loads(data)
    assert data == (json.dumps(raw, indent=2, ensure_ascii=False) + "\n").encode()
    assert '"plan_name": "caf\u00e9 \u2713"'.encode() in data
    assert load_report_json(path)[1] == old
    assert audit_report(raw, source=data) == []
    # Written in the other version's layout, it is a finding.
    other = b"".join(report_chunks(raw, [json_line(r) for r in raw["results"]]))
    assert [f.field for f in audit_report(raw, source=other)] == ["<file>"]
    # A report of a schema nobody wrote is not a report.
    (tmp_path / "v9.json").write_text(
        json.dumps({**raw, "schema": "worktree-orchestrator/report/v9"})
    )
    with pytest.raises(NotAReport, match="not a worktree-orchestrator report"):
        load_report_json(tmp_path / "v9.json")


def test_writing_a_report_serialises_no_result_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, result_dumps: Callable[[], int]
) -> None:
    """The lines a run made when it sealed each result are the ones written."""
    made = [sealed_result_line(task_result(f"t{i}", "succeeded")) for i in range(5)]
    results = [result for result, _ in made]
    lines = {result.task_id: (result, line) for result, line in made}
    report = aggregate(results)
    before = result_dumps()
    data = anyio.run(
        functools.partial(write_report, report, tmp_path / "report.json", lines=lines)
    ).read_bytes()
    assert result_dumps() == before
    # A line is used only for the very result it was made from.
    changed = results[0].model_copy(update={"exit_code": 3})
    report_bytes(report.model_copy(update={"results": [changed, *results[1:]]}), lines)
    assert result_dumps() == before + 1
    monkeypatch.undo()
    assert data == report_bytes(report)
    assert all(line == json_line(r.model_dump(mode="json")) for r, line in made)


def test_every_field_added_since_the_first_reports_is_left_out_while_unset() -> None:
    """Each model's ``_ADDED`` fields carry ``exclude_if``: a field added later without it
    would change every older result's digest once set to its empty default."""
    import envelopes._plan as plan_module
    import envelopes._result as result_module
    from envelopes._added import unset_addition

    classes = [
        c
        for module in (result_module, plan_module)
        for c in vars(module).values()
        if isinstance(c, type) and issubclass(c, module._Additions)
    ]
    assert len(classes) >= 15
    for cls in classes:
        for name in cls._ADDED:
            assert cls.model_fields[name].exclude_if is unset_addition, (cls, name)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    unset = result_module.Timings(started_at=at, finished_at=at, duration_s=0)
    assert not result_module.Timings._ADDED & unset.model_dump().keys()
    assert not result_module.Timings._ADDED & json.loads(unset.model_dump_json()).keys()
    told = unset.model_copy(update={"slot": 0, "setup_s": 0.0})
    assert {"slot": 0, "setup_s": 0.0}.items() <= told.model_dump().items()
