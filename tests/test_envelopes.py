"""The contract: canonical JSON and digests, ids, envelopes, schemas, sealing and auditing."""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from envelopes import (
    TASK_ID_PATTERN,
    AgentInfo,
    AgentSummary,
    Attempt,
    Environment,
    ErrorInfo,
    HandoffEnvelope,
    LogFile,
    Plan,
    Provenance,
    Report,
    ReportError,
    Summary,
    TaskResult,
    TaskStatus,
    Timings,
    audit_report,
    build_envelope,
    canonical_json,
    digest,
    digest_without,
    json_line,
    json_schemas,
    load_report_json,
    new_run_id,
    new_task_id,
    report_digest,
    report_layout,
    seal_report,
    seal_result,
    sha256_hex,
    task_id_problem,
)

SHA256_EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


# canonical JSON and digests


def test_canonical_json_sorts_keys_at_every_level() -> None:
    value = {"b": 1, "a": [3, {"z": None, "m": True}], "c": {"y": 2, "x": 1}}
    assert canonical_json(value) == b'{"a":[3,{"m":true,"z":null}],"b":1,"c":{"x":1,"y":2}}'


def test_canonical_json_has_no_insignificant_whitespace() -> None:
    text = canonical_json({"key": "a value with spaces", "list": [1, 2, 3], "n": {"m": 1.5}})
    assert text == b'{"key":"a value with spaces","list":[1,2,3],"n":{"m":1.5}}'


def test_canonical_json_is_utf8_and_does_not_escape_non_ascii() -> None:
    value = {"text": "café ✓ 日本 \U0001f600"}
    assert canonical_json(value) == '{"text":"café ✓ 日本 \U0001f600"}'.encode()
    assert b"\\u" not in canonical_json(value)
    # Control characters still must be escaped to be JSON at all.
    assert canonical_json("a\nb\x00") == b'"a\\nb\\u0000"'


def test_canonical_json_is_independent_of_insertion_order() -> None:
    one = {"a": 1, "b": {"c": 2, "d": [1, 2]}}
    two = {"b": {"d": [1, 2], "c": 2}, "a": 1}
    assert canonical_json(one) == canonical_json(two)
    assert digest(one) == digest(two)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_canonical_json_refuses_nan_and_infinity(bad: float) -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": [1, bad]})
    with pytest.raises(ValueError):
        digest(bad)


def test_a_result_line_is_compact_in_its_own_key_order_with_characters_as_they_are() -> None:
    """How the journal and a version 2 report write a result (docs/report-format.md):
    ``json.dumps(result, separators=(",", ":"), ensure_ascii=False)``, one line."""
    value = {"z": "café ✓ 日本", "a": [1, 1.0, {"y": None, "b": True}], "m": "a\nb"}
    line = json_line(value)
    assert line == '{"z":"café ✓ 日本","a":[1,1.0,{"y":null,"b":true}],"m":"a\\nb"}'
    assert "\n" not in line and json.loads(line) == value


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_a_result_line_refuses_nan_and_infinity(bad: float) -> None:
    """What no other JSON reader would read back (``NaN`` is not JSON)."""
    with pytest.raises(ValueError):
        json_line({"x": [1, bad]})


def test_canonical_json_keeps_int_and_float_apart() -> None:
    assert canonical_json([1, 1.0, 0.5]) == b"[1,1.0,0.5]"
    assert digest(1) != digest(1.0)


def test_digest_is_sha256_of_canonical_json() -> None:
    value = {"z": [1, "é"], "a": None}
    assert digest(value) == hashlib.sha256(canonical_json(value)).hexdigest()
    assert digest({}) == hashlib.sha256(b"{}").hexdigest()
    assert sha256_hex(b"") == SHA256_EMPTY
    assert re.fullmatch(r"[0-9a-f]{64}", digest([1, 2, 3]))


def test_digest_without_drops_a_top_level_field() -> None:
    value = {"a": 1, "b": 2, "self": "whatever"}
    assert digest_without(value, "self") == digest({"a": 1, "b": 2})
    # The field's own value does not matter: that is what makes it self-describing.
    assert digest_without({**value, "self": "other"}, "self") == digest_without(value, "self")


def test_digest_without_drops_a_nested_field_and_leaves_the_input_alone() -> None:
    value = {"a": 1, "inner": {"keep": [1, 2], "self": "x"}, "other": {"self": "y"}}
    before = json.loads(json.dumps(value))
    assert digest_without(value, "inner", "self") == digest(
        {"a": 1, "inner": {"keep": [1, 2]}, "other": {"self": "y"}}
    )
    assert value == before


def test_digest_without_a_missing_field_is_the_digest_of_the_whole() -> None:
    value = {"a": 1, "inner": {"b": 2}}
    assert digest_without(value, "absent") == digest(value)
    assert digest_without(value, "inner", "absent") == digest(value)
    assert digest_without(value, "nowhere", "absent") == digest(value)
    assert digest_without({"a": 1, "inner": [1]}, "inner", "x") == digest({"a": 1, "inner": [1]})


# ids


@pytest.mark.parametrize(
    "good", ["a", "A", "0", "task-001", "x.y_z-1", "Z" * 64, "a.b", "a-", "a_"]
)
def test_valid_task_ids(good: str) -> None:
    assert task_id_problem(good) is None
    assert re.fullmatch(TASK_ID_PATTERN, good)


BAD_IDS = [
    "",
    "-lead",
    ".hidden",
    "_under",
    "a b",
    "a/b",
    "a\\b",
    "a:b",
    "a~b",
    "a^b",
    "a*b",
    "a?b",
    "a[b",
    "a@{b",
    "a..b",
    "end.",
    "x.lock",
    "é",
    "a\n",
    "Z" * 65,
]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_invalid_task_ids_are_explained(bad: str) -> None:
    problem = task_id_problem(bad)
    assert problem is not None and repr(bad) in problem


@pytest.mark.parametrize("bad", BAD_IDS)
def test_handoff_envelope_rejects_bad_ids(bad: str) -> None:
    with pytest.raises(ValidationError, match="task_id"):
        HandoffEnvelope(task_id=bad, agent="a", task="t")
    if bad:  # an empty id: see test_build_envelope_refuses_an_empty_id
        with pytest.raises(ValidationError, match="task_id"):
            build_envelope("a", "t", task_id=bad)


def test_build_envelope_refuses_an_empty_id() -> None:
    with pytest.raises(ValidationError, match="task_id"):
        build_envelope("a", "t", task_id="")


def test_new_task_ids_are_valid_and_unique() -> None:
    ids = [new_task_id() for _ in range(500)]
    assert len(set(ids)) == len(ids)
    assert all(task_id_problem(i) is None for i in ids)


def test_run_ids_sort_by_time_and_are_valid_ref_components() -> None:
    early = new_run_id(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    late = new_run_id(datetime(2026, 11, 22, 23, 59, 59, tzinfo=UTC))
    assert re.fullmatch(r"20260102-030405-[0-9a-f]{6}", early)
    assert early < late
    assert task_id_problem(new_run_id()) is None


# envelopes


def test_build_envelope_generates_a_valid_id_when_none_is_given() -> None:
    envelope = build_envelope("writer", "write a thing")
    assert task_id_problem(envelope.task_id) is None
    assert re.fullmatch(TASK_ID_PATTERN, envelope.task_id)
    assert build_envelope("writer", "t", task_id=None).task_id != envelope.task_id


def test_built_envelopes_have_unique_ids() -> None:
    ids = {build_envelope("writer", "t").task_id for _ in range(300)}
    assert len(ids) == 300


def test_build_envelope_keeps_what_it_is_given() -> None:
    envelope = build_envelope(
        "writer",
        "write",
        task_id="given-id",
        run_id="r1",
        inputs={"k": [1, 2]},
        requirements=["six"],
        acceptance_criteria=["it works"],
        timeout=12.5,
        retries=2,
        env={"MODE": "fast"},
        metadata={"owner": "me"},
        priority=3,
        worktree=False,
        venv=False,
        depends_on=["first"],
        group="given",
        select="first_success",
        cache=True,
    )
    assert envelope.model_dump(by_alias=True) == {
        "schema": "worktree-orchestrator/envelope/v1",
        "task_id": "given-id",
        "run_id": "r1",
        "agent": "writer",
        "task": "write",
        "inputs": {"k": [1, 2]},
        "requirements": ["six"],
        "acceptance_criteria": ["it works"],
        "timeout": 12.5,
        "retries": 2,
        "env": {"MODE": "fast"},
        "metadata": {"owner": "me"},
        "priority": 3,
        "worktree": False,
        "venv": False,
        "depends_on": ["first"],
        "cache": True,
        "group": "given",
        "select": "first_success",
        "upstream": {},
        "sandbox": "none",
        "network": False,
        "inherit_env": True,
        "pass_env": [],
        "secrets": [],
        "limits": {
            "memory_mb": None,
            "cpu_s": None,
            "open_files": None,
            "file_size_mb": None,
            "processes": None,
        },
        "max_commit_mb": 100,
        "allow_secrets_in_commit": False,
        "prompt": None,
        "stall_timeout": None,
        "setup": [],
        "checks": [],
        "repair_attempts": 0,
        "install_project": False,
        "venv_seed": False,
        "sparse": None,
    }


def test_envelope_defaults_are_not_shared_between_envelopes() -> None:
    one = build_envelope("a", "t")
    two = build_envelope("a", "t")
    assert one.inputs is not two.inputs and one.metadata is not two.metadata


@pytest.mark.parametrize(
    "bad",
    [
        {"timeout": 0},
        {"timeout": -1},
        {"retries": -1},
        {"unknown": 1},
        {"schema": "worktree-orchestrator/envelope/v2"},
        {"inputs": [1, 2]},
    ],
    ids=str,
)
def test_handoff_envelope_rejects_bad_fields(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        HandoffEnvelope.model_validate({"task_id": "t", "agent": "a", "task": "x", **bad})


def test_envelope_is_frozen() -> None:
    envelope = build_envelope("a", "t", task_id="t")
    with pytest.raises(ValidationError):
        envelope.task = "changed"


def _full_envelope() -> HandoffEnvelope:
    return build_envelope(
        "writer",
        "write the module",
        task_id="full",
        run_id="20260102-030405-abcdef",
        inputs={"module": "utils", "n": 3},
        requirements=["six"],
        acceptance_criteria=["utils.slugify exists"],
        timeout=120,
        retries=1,
        env={"MODE": "fast"},
        metadata={"owner": "ada"},
    )


def test_envelope_sha256_is_the_digest_of_its_json() -> None:
    envelope = _full_envelope()
    data = envelope.to_json_dict()
    assert data["schema"] == "worktree-orchestrator/envelope/v1" and "schema_" not in data
    assert envelope.sha256() == digest(data) == sha256_hex(canonical_json(data))


def test_envelope_sha256_is_stable() -> None:
    envelope = _full_envelope()
    again = _full_envelope()
    assert envelope.sha256() == again.sha256() == envelope.sha256()
    # Through the file an agent reads, and back.
    reread = HandoffEnvelope.model_validate_json(canonical_json(envelope.to_json_dict()))
    assert reread.sha256() == envelope.sha256()
    # Dict order and int/float spelling of the same timeout do not matter.
    reordered = build_envelope(
        "writer",
        "write the module",
        task_id="full",
        run_id="20260102-030405-abcdef",
        inputs={"n": 3, "module": "utils"},
        requirements=["six"],
        acceptance_criteria=["utils.slugify exists"],
        timeout=120.0,
        retries=1,
        env={"MODE": "fast"},
        metadata={"owner": "ada"},
    )
    assert reordered.sha256() == envelope.sha256()


CHANGED = {
    "task_id": "other",
    "run_id": None,
    "agent": "reviewer",
    "task": "write the module!",
    "inputs": {"module": "utils", "n": 4},
    "requirements": ["six", "attrs"],
    "acceptance_criteria": [],
    "timeout": 121,
    "retries": 2,
    "env": {"MODE": "slow"},
    "metadata": {"owner": "bob"},
    "priority": 5,
    "worktree": False,
    "venv": False,
    "depends_on": ["first"],
    "cache": True,
    "group": "impl",
    "select": "all",
    "upstream": {"first": {"output": {"ok": True}, "result_commit": "ab" * 20, "branch": "b"}},
    "sandbox": "bwrap",
    "network": True,
    "inherit_env": False,
    "pass_env": ["HOME"],
    "secrets": ["API_TOKEN"],
    "limits": {"memory_mb": 512},
    "max_commit_mb": 5,
    "allow_secrets_in_commit": True,
    "prompt": "Do {{ task }}",
    "stall_timeout": 30,
    "setup": [{"name": "deps", "run": "pip install -e ."}],
    "checks": [{"name": "tests", "run": ["python", "-m", "pytest"], "required": False}],
    "repair_attempts": 2,
    "install_project": True,
    "venv_seed": True,
    "sparse": ["src"],
}


def test_every_envelope_field_is_covered_below() -> None:
    # schema_ has a single allowed value, so it cannot change.
    assert set(CHANGED) == set(HandoffEnvelope.model_fields) - {"schema_"}


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_envelope_sha256_changes_with_any_field(field: str) -> None:
    envelope = _full_envelope()
    changed = HandoffEnvelope.model_validate({**envelope.to_json_dict(), field: CHANGED[field]})
    assert getattr(changed, field) != getattr(envelope, field)
    assert changed.sha256() != envelope.sha256()


# JSON Schemas


def _plan_example() -> dict[str, Any]:
    return {
        "version": 1,
        "name": "demo",
        "repo": "./demo-repo",
        "base": "HEAD",
        "concurrency": 4,
        "keep_worktrees": "failed",
        "defaults": {"timeout": 600, "retries": 1, "requirements": []},
        "agents": {"writer": {"command": ["python", "agents/writer.py"], "env": {"MODE": "fast"}}},
        "tasks": [
            {
                "id": "add-utils",
                "agent": "writer",
                "task": "Add string helpers",
                "inputs": {"module": "utils"},
                "requirements": ["six"],
                "acceptance_criteria": ["utils.slugify exists"],
                "timeout": 120,
                "retries": 2,
            }
        ],
    }


def test_json_schemas_names_plan_envelope_and_report() -> None:
    schemas = json_schemas()
    assert set(schemas) == {"plan", "envelope", "report"}
    json.dumps(schemas)  # plain JSON, printable by `orchestrator schema`
    assert "schema" in schemas["envelope"]["properties"]
    assert "schema" in schemas["report"]["properties"]
    assert "schema_" not in schemas["report"]["properties"]
    assert {"tasks", "agents"} <= set(schemas["plan"]["properties"])
    Plan.model_validate(_plan_example())  # the example below is a real plan


def test_json_schemas_validate_real_documents(tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schemas = json_schemas()
    report = _sealed_report()
    examples = {
        "plan": _plan_example(),
        "envelope": _full_envelope().to_json_dict(),
        "report": json.loads(json.dumps(report.to_json_dict())),
    }
    for name, document in examples.items():
        validator_class = jsonschema.validators.validator_for(schemas[name])
        validator_class.check_schema(schemas[name])
        validator_class(schemas[name]).validate(document)
    # And they refuse what the models refuse.
    bad_envelope = {**examples["envelope"], "unexpected": 1}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad_envelope, schemas["envelope"])
    bad_report = {**examples["report"], "results": "none"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad_report, schemas["report"])


# sealing and auditing

NOW = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
STDOUT = b"hello\n"
STDERR = "caf\u00e9 warning\n".encode()


def _result(task_id: str, agent: str, *, succeeded: bool = True) -> TaskResult:
    envelope = build_envelope(agent, f"do {task_id}", task_id=task_id, run_id="run")
    output = {"answer": 42, "text": "café ✓", "ratio": 0.1 + 0.2} if succeeded else None
    info = AgentInfo(kind="command", command=["python", "agent.py"])
    environment = Environment(
        python="3.11.7", implementation="cpython", packages=["six==1.16.0"], installer="uv"
    )
    stdout = LogFile(
        path=f"logs/{task_id}.attempt-1.stdout", sha256=sha256_hex(STDOUT), size=len(STDOUT)
    )
    stderr = LogFile(
        path=f"logs/{task_id}.attempt-1.stderr", sha256=sha256_hex(STDERR), size=len(STDERR)
    )
    envelope_bytes = canonical_json(envelope.to_json_dict())
    error = None if succeeded else ErrorInfo(kind="exit_code", message="exited with code 3")
    status: TaskStatus = "succeeded" if succeeded else "failed"
    exit_code = 0 if succeeded else 3
    result = TaskResult(
        task_id=task_id,
        agent=agent,
        status=status,
        attempts=1,
        exit_code=exit_code,
        output=output,
        error=error,
        timings=Timings(started_at=NOW, finished_at=NOW, duration_s=1.25, agent_s=1.0),
        branch=f"orchestrator/run/{task_id}",
        envelope=LogFile(
            path=f"envelopes/{task_id}.json",
            sha256=sha256_hex(envelope_bytes),
            size=len(envelope_bytes),
        ),
        attempt_log=[
            Attempt(
                number=1,
                status=status,
                started_at=NOW,
                finished_at=NOW,
                duration_s=1.0,
                exit_code=exit_code,
                error=error,
                stdout=stdout,
                stderr=stderr,
            )
        ],
        provenance=Provenance(
            envelope_sha256=envelope.sha256(),
            base_commit="a" * 40,
            result_commit="b" * 40,
            result_tree="c" * 40,
            environment=environment,
            env_sha256=digest(environment.model_dump(mode="json")),
            agent=info,
            agent_sha256=digest(info.model_dump(mode="json")),
            output_sha256=digest(output),
            stdout_sha256=stdout.sha256,
            stderr_sha256=stderr.sha256,
            commands=[["python", "agent.py"]],
        ),
    )
    return seal_result(result)


def _sealed_report() -> Report:
    ok, failed = _result("t-ok", "writer"), _result("t-bad", "writer", succeeded=False)
    report = Report(
        tool={"name": "worktree-orchestrator", "version": "test"},
        run_id="run",
        plan_name="plan",
        plan_sha256=digest({"plan": 1}),
        repo="/nowhere",
        base_ref="HEAD",
        base_commit="a" * 40,
        run_dir="/nowhere/run",
        started_at=NOW,
        finished_at=NOW,
        summary=Summary(
            total_tasks=2,
            successful=1,
            failed=1,
            timeout=0,
            cancelled=0,
            success_rate=50.0,
            total_execution_time=2.5,
        ),
        results=[ok, failed],
        results_by_agent={
            "writer": AgentSummary(
                total=2, successful=1, failed=1, timeout=0, cancelled=0, task_ids=["t-ok", "t-bad"]
            )
        },
        errors=[
            ReportError(
                task_id="t-bad", agent="writer", kind="exit_code", message="exited with code 3"
            )
        ],
    )
    return seal_report(report)


def _write_run_dir(run_dir: Path, report: Report) -> None:
    (run_dir / "plan.json").write_bytes(canonical_json({"plan": 1}))  # its digest is plan_sha256
    for result in report.results:
        envelope = build_envelope(
            result.agent, f"do {result.task_id}", task_id=result.task_id, run_id="run"
        )
        path = run_dir / "envelopes" / f"{result.task_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(canonical_json(envelope.to_json_dict()))
        logs = run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{result.task_id}.attempt-1.stdout").write_bytes(STDOUT)
        (logs / f"{result.task_id}.attempt-1.stderr").write_bytes(STDERR)


def test_seal_result_digest_covers_everything_but_itself() -> None:
    result = _result("t-ok", "writer")
    data = result.model_dump(mode="json")
    assert re.fullmatch(r"[0-9a-f]{64}", result.provenance.result_sha256)
    assert result.provenance.result_sha256 == digest_without(data, "provenance", "result_sha256")
    assert seal_result(result) == result  # sealing again changes nothing
    changed = result.model_copy(update={"exit_code": 1})
    assert seal_result(changed).provenance.result_sha256 != result.provenance.result_sha256


def test_seal_report_digest_covers_everything_but_itself() -> None:
    report = _sealed_report()
    data = report.to_json_dict()
    assert data["schema"] == "worktree-orchestrator/report/v2"
    assert report.report_sha256 == report_digest(data)
    assert seal_report(report) == report
    renamed = report.model_copy(update={"plan_name": "other"})
    assert seal_report(renamed).report_sha256 != report.report_sha256


def test_audit_accepts_sealed_results_and_report() -> None:
    report = _sealed_report()
    assert audit_report(report.to_json_dict()) == []
    # As read back from a file: JSON text, not the models.
    assert audit_report(json.loads(json.dumps(report.to_json_dict(), indent=2))) == []


def test_audit_accepts_the_files_of_a_sealed_report(tmp_path: Path) -> None:
    report = _sealed_report()
    _write_run_dir(tmp_path, report)
    assert audit_report(report.to_json_dict(), run_dir=tmp_path) == []


def test_load_report_json_reads_back_a_sealed_report(tmp_path: Path) -> None:
    report = _sealed_report()
    path = tmp_path / "report.json"
    path.write_bytes(report_layout(report.to_json_dict()))
    raw, loaded = load_report_json(path)
    assert loaded == report
    assert raw == json.loads(json.dumps(report.to_json_dict()))
    assert audit_report(raw, run_dir=None) == []


def test_audit_rejects_an_unsealed_report_and_unsealed_results() -> None:
    report = _sealed_report()
    unsealed = report.to_json_dict()
    unsealed["report_sha256"] = ""
    assert [(f.task_id, f.field) for f in audit_report(unsealed)] == [(None, "report_sha256")]
    raw = report.to_json_dict()
    raw["results"][0]["provenance"]["result_sha256"] = ""
    fields = {(f.task_id, f.field) for f in audit_report(raw)}
    assert ("t-ok", "provenance.result_sha256") in fields


def test_audit_after_reseal_still_checks_inner_digests() -> None:
    # Changing the output and resealing the outer digests leaves output_sha256 wrong.
    report = _sealed_report()
    raw = report.to_json_dict()
    raw["results"][0]["output"]["answer"] = 41
    prov = raw["results"][0]["provenance"]
    prov["result_sha256"] = digest_without(raw["results"][0], "provenance", "result_sha256")
    raw["report_sha256"] = report_digest(raw)
    assert [(f.task_id, f.field) for f in audit_report(raw)] == [
        ("t-ok", "provenance.output_sha256")
    ]


def test_audit_finds_a_changed_log_file(tmp_path: Path) -> None:
    report = _sealed_report()
    _write_run_dir(tmp_path, report)
    (tmp_path / "logs" / "t-bad.attempt-1.stdout").write_bytes(b"hellO\n")
    findings = audit_report(report.to_json_dict(), run_dir=tmp_path)
    assert [(f.task_id, f.field) for f in findings] == [("t-bad", "attempt_log[1].stdout.sha256")]
    assert "expected" in findings[0].message and "found" in findings[0].message
    assert str(findings[0]).startswith("task t-bad: attempt_log[1].stdout.sha256: ")


def test_unset_newer_fields_leave_old_digests_alone() -> None:
    """An envelope or plan that sets none of the fields added later hashes as it did."""
    envelope = _full_envelope()
    data = envelope.to_json_dict()
    assert "prompt" not in data and "stall_timeout" not in data
    with_prompt = envelope.model_copy(update={"prompt": "Do {{ task }}"})
    assert with_prompt.to_json_dict()["prompt"] == "Do {{ task }}"
    plan = Plan.model_validate(_plan_example())
    dumped = plan.model_dump(mode="json")
    assert "prompt" not in dumped["defaults"] and "stall_timeout" not in dumped["defaults"]
    assert not {"preset", "program", "model", "args"} & set(dumped["agents"]["writer"])
