"""Re-check a report's digests from its JSON alone (and the files it names).

Nothing here trusts the models: digests are recomputed over the raw JSON objects as read, so a
changed byte in any value is caught. Git checks (do the commits exist?) are the engine's job;
see ``orchestrator.verify_report``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ._bounded import (
    MAX_JSON_DEPTH,
    hash_file,
    hash_span,
    loads_bounded,
    read_bounded,
    read_span,
    unique_keys,
)
from ._canonical import digest, digest_without, json_line
from ._result import REPORT_SCHEMA_V1, REPORT_SCHEMAS, SUCCESSFUL, Report, report_digest
from ._timeline import audit_timings
from ._usage import add_usage, estimate_cost, usage_by_model, usage_totals

__all__ = [
    "ENVELOPE_RECORDS",
    "MAX_ENVELOPE_BYTES",
    "MAX_LOG_BYTES",
    "MAX_REPORT_BYTES",
    "Finding",
    "NotAReport",
    "audit_report",
    "load_report_file",
    "load_report_json",
    "read_logged",
    "report_chunks",
    "report_layout",
]

#: The file of the envelopes that are records (see LogFile.offset), in the run directory.
ENVELOPE_RECORDS = "envelopes.jsonl"
#: Largest report file read (a 100,000-task report is about 250 MB).
MAX_REPORT_BYTES = 1 << 30
#: Largest envelope file read back (it holds the outputs of the task's dependencies).
MAX_ENVELOPE_BYTES = 256 << 20
#: Most bytes hashed of one log file or plan.json, whatever size the report claims.
MAX_LOG_BYTES = 16 << 30


class NotAReport(ValueError):
    """The file cannot be read, is not JSON, or does not have the shape of a report."""


class Finding(BaseModel):
    """One thing that does not hold in a report."""

    model_config = ConfigDict(frozen=True)

    task_id: str | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"task {self.task_id}: " if self.task_id else ""
        return f"{where}{self.field}: {self.message}"


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    try:
        return unique_keys(pairs)
    except ValueError as exc:
        raise NotAReport(str(exc)) from None


def load_report_json(
    path: Path, *, max_bytes: int = MAX_REPORT_BYTES
) -> tuple[dict[str, Any], Report]:
    """Read a report file: its raw JSON object and the validated model.

    See :func:`load_report_file`, which also returns the bytes read.
    """
    raw, report, _ = load_report_file(path, max_bytes=max_bytes)
    return raw, report


def load_report_file(
    path: Path, *, max_bytes: int = MAX_REPORT_BYTES
) -> tuple[dict[str, Any], Report, bytes]:
    """Read a report file: its raw JSON object, the validated model, and the file's bytes.

    The file must be a regular file of at most *max_bytes* (a FIFO or a device is refused
    without blocking), nested at most MAX_JSON_DEPTH deep, with no number longer than
    MAX_NUMBER_CHARS characters. Every field is validated (object ids, digests, ids, paths)
    before anything acts on it. Raises NotAReport with a one-line reason when any of it fails.
    """
    try:
        source = read_bounded(path, max_bytes)
    except OSError as exc:
        raise NotAReport(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        raw = loads_bounded(source, object_pairs_hook=_no_duplicate_keys)
    except NotAReport:
        raise
    except ValueError as exc:
        raise NotAReport(f"{path} is not JSON: {_one_line(exc)}") from exc
    if not isinstance(raw, dict) or raw.get("schema") not in REPORT_SCHEMAS:
        raise NotAReport(f"{path} is not a worktree-orchestrator report (no report schema tag)")
    try:
        report = Report.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise NotAReport(f"{path} is not a valid report: {where}: {first['msg']}") from exc
    # Every field must be present as written by the orchestrator: a missing field that has a
    # default, or a value pydantic coerced, would otherwise be audited as something it is not.
    written = report.to_json_dict()
    for name in _ADDED_LATER:
        if name not in raw and written[name] == Report.model_fields[name].get_default(
            call_default_factory=True
        ):
            del written[name]  # a report of an earlier version, which did not have it
    if (missing := _first_difference(raw, written)) is not None:
        raise NotAReport(
            f"{path} is not a complete report: {missing} is missing or not in its written form"
        )
    if _SURROGATE_ESCAPE.search(source):
        # A \ud800 escape alone is no character: nothing could write it back as UTF-8.
        try:
            report_layout(raw)
        except UnicodeEncodeError as exc:
            raise NotAReport(
                f"{path} holds a lone surrogate escape, which is no character"
            ) from exc
    return raw, report, source


#: A JSON escape of a UTF-16 surrogate (the orchestrator never writes one: it writes UTF-8).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


#: Report fields added after version 0.1.0: a report without them means their default.
_ADDED_LATER = ("warnings",)


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def _first_difference(found: Any, expected: Any, path: str = "") -> str | None:
    if isinstance(found, dict) and isinstance(expected, dict):
        for key in expected.keys() | found.keys():
            if key not in found or key not in expected:
                return f"{path}.{key}".lstrip(".")
            if (inner := _first_difference(found[key], expected[key], f"{path}.{key}")) is not None:
                return inner
        return None
    if isinstance(found, list) and isinstance(expected, list) and len(found) == len(expected):
        for i, (a, b) in enumerate(zip(found, expected, strict=True)):
            if (inner := _first_difference(a, b, f"{path}[{i}]")) is not None:
                return inner
        return None
    if found != expected or type(found) is not type(expected):
        return path.lstrip(".") or "<report>"
    return None


#: Error kinds that come from an attempt of the agent (others come from set-up or after).
_ATTEMPT_KINDS = frozenset(
    {
        "exit_code",
        "timeout",
        "invalid_output",
        "spawn",
        "agent_exception",
        "auth",
        "rate_limited",
        "turn_limit",
        "agent_error",
        "stalled",
        "patch",
        "prompt",
    }
)


def _check(task_id: str | None, field: str, expected: Any, found: Any) -> Iterator[Finding]:
    if expected != found:
        yield Finding(
            task_id=task_id, field=field, message=f"expected {expected!r}, found {found!r}"
        )


def _check_file(
    task_id: str | None,
    field: str,
    entry: Mapping[str, Any] | None,
    run_dir: Path,
    *,
    record: bool = False,
) -> Iterator[Finding]:
    """The file (or, where *record*, the record of envelopes.jsonl) an entry names is there,
    with its digest and size; hashed as it is read, at most MAX_LOG_BYTES of it."""
    if entry is None:
        return
    offset = entry.get("offset")
    if offset is not None and not (record and entry["path"] == ENVELOPE_RECORDS):
        message = f"only an envelope is a record (of {ENVELOPE_RECORDS}), not {entry['path']!r}"
        yield Finding(task_id=task_id, field=f"{field}.offset", message=message)
        return
    try:
        limit = min(entry["size"], MAX_LOG_BYTES)
        if offset is None:
            found, size = hash_file(entry["path"], limit, within=run_dir)
        else:
            found, size = hash_span(entry["path"], offset, limit, within=run_dir)
    except OSError as exc:
        yield Finding(
            task_id=task_id,
            field=field,
            message=f"cannot read {entry['path']!r} in {run_dir}: {exc.strerror or exc}",
        )
        return
    yield from _check(task_id, f"{field}.sha256", entry["sha256"], found)
    yield from _check(task_id, f"{field}.size", entry["size"], size)


def _audit_result(raw: Mapping[str, Any], run_dir: Path | None) -> Iterator[Finding]:
    tid = raw["task_id"]
    prov = raw["provenance"]
    yield from _check(
        tid,
        "provenance.result_sha256",
        digest_without(raw, "provenance", "result_sha256"),
        prov["result_sha256"],
    )
    yield from _check(tid, "provenance.output_sha256", digest(raw["output"]), prov["output_sha256"])
    yield from _check(tid, "provenance.agent_sha256", digest(prov["agent"]), prov["agent_sha256"])
    if prov["environment"] is not None or prov["env_sha256"] is not None:
        yield from _check(
            tid, "provenance.env_sha256", digest(prov["environment"]), prov["env_sha256"]
        )
    for field, message in audit_timings(raw):
        yield Finding(task_id=tid, field=field, message=message)
    attempts = raw["attempt_log"]
    yield from _check(tid, "attempts", len(attempts), raw["attempts"])
    if attempts:
        last = attempts[-1]
        # The task's status is its last attempt's, unless something after the attempts decided
        # it (a failed commit, a cancellation during clean-up or a retry wait).
        error = raw["error"]
        if error is None or error["kind"] in _ATTEMPT_KINDS:
            yield from _check(tid, "status", last["status"], raw["status"])
        for stream in ("stdout", "stderr"):
            logged = last[stream]["sha256"] if last[stream] else None
            yield from _check(tid, f"provenance.{stream}_sha256", logged, prov[f"{stream}_sha256"])
    if raw["status"] in SUCCESSFUL and raw["error"] is not None:
        yield Finding(task_id=tid, field="error", message="a succeeded task carries an error")
    if raw["status"] not in SUCCESSFUL and raw["error"] is None:
        yield Finding(
            task_id=tid, field="error", message=f"a {raw['status']} task carries no error"
        )
    if run_dir is None:
        return
    if raw["envelope"] is not None:
        yield from _check_file(tid, "envelope", raw["envelope"], run_dir, record=True)
        if "sha256" in raw["envelope"]:
            yield from _check_envelope(tid, raw["envelope"], prov, run_dir)
            yield from _checks_as_told(raw, run_dir)
    for attempt in attempts:
        for stream in ("stdout", "stderr"):
            yield from _check_file(
                tid, f"attempt_log[{attempt['number']}].{stream}", attempt[stream], run_dir
            )
    if prov.get("prompt_sha256") is not None and attempts and attempts[-1]["stdout"]:
        yield from _check_prompt(
            tid, attempts[-1]["stdout"]["path"], prov["prompt_sha256"], run_dir
        )


def _audit_checks(raw: Mapping[str, Any], run_dir: Path | None) -> Iterator[Finding]:
    """Each setup step and check: ``passed`` is what its exit code says, its logs are what
    it recorded, and the task's status agrees with its last turn's required steps (a
    succeeded task passed them all; one failed with kind ``check`` or ``setup`` did not)."""
    tid, checks = raw["task_id"], raw.get("checks") or []
    yield from _step_records(tid, "checks", checks, run_dir)
    if not checks:
        return
    last_turn = max(check["turn"] for check in checks)
    failed = [
        c["name"] for c in checks if c["turn"] == last_turn and c["required"] and not c["passed"]
    ]
    kind = (raw["error"] or {}).get("kind")
    if raw["status"] == "succeeded" and failed:
        yield Finding(
            task_id=tid,
            field="status",
            message=f"succeeded, but its required {', '.join(failed)} did not pass",
        )
    if kind in ("check", "setup") and not failed:
        yield Finding(
            task_id=tid,
            field="error",
            message=f"failed with kind {kind}, but every required step of its last turn passed",
        )


def _step_records(
    tid: str, name: str, records: list[Any], run_dir: Path | None
) -> Iterator[Finding]:
    """Each of *records* (``checks`` or ``hooks``): ``passed`` is what its exit code says,
    and its logs are what it recorded."""
    for index, record in enumerate(records):
        field = f"{name}[{index}]"
        passed = record["exit_code"] == 0 and not record["timed_out"]
        yield from _check(tid, f"{field}.passed", passed, record["passed"])
        if run_dir is not None:
            for stream in ("stdout", "stderr"):
                yield from _check_file(tid, f"{field}.{stream}", record[stream], run_dir)


def _audit_hooks(raw: Mapping[str, Any], run_dir: Path | None) -> Iterator[Finding]:
    """Each hook as a step (see :func:`_step_records`), and the task's status against its
    required hooks (``after_create``, ``before_run``) of the last turn they ran for: a
    succeeded task passed them; one failed with kind ``hook`` did not."""
    tid, hooks = raw["task_id"], raw.get("hooks") or []
    yield from _step_records(tid, "hooks", hooks, run_dir)
    required = [h for h in hooks if h["required"]]
    last_turn = max((h["turn"] for h in required), default=0)
    failed = [h["name"] for h in required if h["turn"] == last_turn and not h["passed"]]
    if raw["status"] == "succeeded" and failed:
        message = f"succeeded, but its hook {', '.join(failed)} did not pass"
        yield Finding(task_id=tid, field="status", message=message)
    if (raw["error"] or {}).get("kind") == "hook" and not failed:
        message = "failed with kind hook, but every required hook of its last turn passed"
        yield Finding(task_id=tid, field="error", message=message)


def _audit_usage(raw: Mapping[str, Any], pricing: Mapping[str, Any]) -> Iterator[Finding]:
    """The task's usage is its attempts' added up, and each estimated cost is what the
    report's ``pricing`` makes of its tokens.

    Results written before attempts recorded their usage (only the last attempt counted
    then) have no attempt's usage to add up: their own estimated cost is recomputed when the
    report records rates (older reports record none)."""
    tid = raw["task_id"]
    attempts = raw["attempt_log"]
    if any("usage" in a for a in attempts):
        added = add_usage(a.get("usage") for a in attempts)
        yield from _check(tid, "usage", added, raw.get("usage"))
        for attempt in attempts:
            usage = attempt.get("usage") or {}
            field = f"attempt_log[{attempt['number']}].usage"
            if usage.get("cost_source") == "partial":
                yield Finding(
                    task_id=tid,
                    field=f"{field}.cost_source",
                    message="an attempt's cost is reported or estimated, never partial",
                )
            if usage.get("cost_source") == "estimated":
                yield from _check_estimate(tid, field, usage, pricing)
    elif (usage := raw.get("usage")) and usage.get("cost_source") == "estimated" and pricing:
        yield from _check_estimate(tid, "usage", usage, pricing)


def _check_estimate(
    tid: str, field: str, usage: Mapping[str, Any], pricing: Mapping[str, Any]
) -> Iterator[Finding]:
    """An estimated cost is what the report's rates for its model make of its tokens."""
    rates = pricing.get(usage.get("model") or "")
    if rates is None:
        yield Finding(
            task_id=tid,
            field=f"{field}.cost_usd",
            message=f"estimated, but the report records no rates for model {usage.get('model')!r}",
        )
        return
    yield from _check(tid, f"{field}.cost_usd", estimate_cost(usage, rates), usage.get("cost_usd"))


def _check_prompt(tid: str, stdout_path: str, expected: str, run_dir: Path) -> Iterator[Finding]:
    """The last attempt's prompt file (beside its stdout log) hashes to ``prompt_sha256``."""
    path = stdout_path.removesuffix(".stdout") + ".prompt"
    try:
        found, _ = hash_file(path, MAX_LOG_BYTES, within=run_dir)
    except OSError as exc:
        yield Finding(
            task_id=tid,
            field="provenance.prompt_sha256",
            message=f"cannot read {path}: {exc.strerror or exc}",
        )
        return
    yield from _check(tid, "provenance.prompt_sha256", found, expected)


def _read_envelope(entry: Mapping[str, Any], run_dir: Path) -> Any:
    """The envelope's JSON (a file, or a record of the run's envelopes.jsonl), or None when
    it cannot be read safely (the file check says why)."""
    try:
        data = read_logged(
            entry["path"],
            size=entry["size"],
            offset=entry.get("offset"),
            limit=MAX_ENVELOPE_BYTES,
            within=run_dir,
        )
        return loads_bounded(data, max_depth=MAX_JSON_DEPTH)
    except (OSError, ValueError):
        return None


def read_logged(path: str, *, size: int, offset: int | None, limit: int, within: Path) -> bytes:
    """The bytes a LogFile names in the run directory *within*: the whole file (at most
    *limit* bytes: UnsafeFile beyond), or its record of *size* bytes from *offset* (at most
    *limit* of them). OSError when it cannot be read safely."""
    if offset is None:
        return read_bounded(path, limit, within=within)
    return read_span(path, offset, min(size, limit), within=within)


def _check_envelope(
    tid: str, entry: Mapping[str, Any], prov: Mapping[str, Any], run_dir: Path
) -> Iterator[Finding]:
    envelope = _read_envelope(entry, run_dir)
    if envelope is None:
        return  # already reported by the file check
    expected = prov["envelope_sha256"]
    yield from _check(tid, "provenance.envelope_sha256", digest(envelope), expected)
    if isinstance(envelope, dict):
        yield from _check(tid, "envelope.task_id", envelope.get("task_id"), tid)
        if prov.get("base_commit") is not None and digest(envelope) == expected:
            # The worktree held what the envelope asked for: the whole tree, or its cone.
            told = envelope.get("sparse")
            yield from _check(tid, "provenance.sparse", told, prov.get("sparse"))


def _checks_as_told(raw: Mapping[str, Any], run_dir: Path) -> Iterator[Finding]:
    """A succeeded task passed, on its last turn, every required check its envelope file
    names: the file (hashed into ``envelope_sha256``) is what the run was told to check, so
    a report whose check records were rewritten or dropped is caught here."""
    entry = raw["envelope"]
    if raw["status"] != "succeeded" or entry is None or "sha256" not in entry:
        return
    envelope = _read_envelope(entry, run_dir)
    steps = envelope.get("checks") if isinstance(envelope, dict) else None
    if digest(envelope) != raw["provenance"]["envelope_sha256"] or not isinstance(steps, list):
        return  # a mismatch is reported by the envelope's own check; no checks: nothing to do
    required = [s.get("name") for s in steps if isinstance(s, dict) and s.get("required", True)]
    checks = raw.get("checks") or []
    last = max((c["turn"] for c in checks), default=None)
    passed = {
        c["name"] for c in checks if c["turn"] == last and c["phase"] == "check" and c["passed"]
    }
    missing = [str(name) for name in required if name not in passed]
    if missing:
        yield Finding(
            task_id=raw["task_id"],
            field="checks",
            message=f"succeeded without passing its required {', '.join(missing)} "
            "(as its envelope names them) on its last turn",
        )


def _expected_summary(results: list[Mapping[str, Any]]) -> dict[str, Any]:
    counts = Counter(r["status"] for r in results)
    total = len(results)
    return {
        "total_tasks": total,
        "successful": counts["succeeded"] + counts["cached"],
        "failed": counts["failed"],
        "timeout": counts["timed_out"],
        "cancelled": counts["cancelled"],
        "skipped": counts["skipped"],
        "cached": counts["cached"],
        "success_rate": round(100.0 * (counts["succeeded"] + counts["cached"]) / total, 2)
        if total
        else 0.0,
    }


def upstream_tasks(result: Mapping[str, Any], groups: Mapping[str, Any]) -> list[str]:
    """The tasks whose results *result* started from: its dependencies, a group standing for
    its selected members, in the order the dependencies are listed."""
    out: list[str] = []
    for name in result.get("depends_on", []):
        out += groups[name]["selected"] if name in groups else [name]
    return list(dict.fromkeys(out))


def _audit_start(
    result: Mapping[str, Any],
    raw: Mapping[str, Any],
    by_id: Mapping[str, Mapping[str, Any]],
    groups: Mapping[str, Any],
    run_dir: Path | None,
) -> Iterator[Finding]:
    """The commit a task started from: the run's base, or what its dependencies produced."""
    tid = result["task_id"]
    base = result["provenance"]["base_commit"]
    upstream = upstream_tasks(result, groups)
    unknown = [name for name in upstream if name not in by_id]
    if unknown:
        yield Finding(
            task_id=tid, field="depends_on", message=f"names tasks not in the report: {unknown}"
        )
        return
    commits = list(
        dict.fromkeys(
            by_id[name]["provenance"]["result_commit"]
            for name in upstream
            if by_id[name]["provenance"]["result_commit"] is not None
        )
    )
    if base is not None and raw["base_commit"] is not None and not commits:
        yield from _check(tid, "provenance.base_commit", raw["base_commit"], base)
    elif base is not None and len(commits) == 1:
        yield from _check(tid, "provenance.base_commit", commits[0], base)
    # With several, the base is a merge of them: verify_report checks its parents in git.
    if upstream and run_dir is not None and result["envelope"] is not None:
        try:
            envelope = _read_envelope(result["envelope"], run_dir)
            told = {k: v["result_commit"] for k, v in envelope["upstream"].items()}
        except (TypeError, KeyError, AttributeError):
            return  # the envelope file check reports an unreadable or altered file
        expected = {name: by_id[name]["provenance"]["result_commit"] for name in upstream}
        yield from _check(tid, "envelope.upstream", expected, told)


def _audit_groups(
    groups: Mapping[str, Any], by_id: Mapping[str, Mapping[str, Any]]
) -> Iterator[Finding]:
    for name, group in groups.items():
        field = f"groups.{name}"
        for member in group["members"]:
            found = by_id.get(member["task_id"])
            if found is None:
                yield Finding(
                    task_id=None,
                    field=field,
                    message=f"member {member['task_id']} is not in the report",
                )
                continue
            yield from _check(
                member["task_id"], f"{field}.status", found["status"], member["status"]
            )
            if found.get("group") != name:
                yield Finding(
                    task_id=member["task_id"],
                    field="group",
                    message=f"listed in group {name} but its result says {found.get('group')!r}",
                )
        members = {m["task_id"] for m in group["members"]}
        grouped = {tid for tid, r in by_id.items() if r.get("group") == name}
        if grouped != members:
            yield Finding(
                task_id=None,
                field=f"{field}.members",
                message=f"expected {sorted(grouped)}, found {sorted(members)}",
            )
        succeeded = [m["task_id"] for m in group["members"] if m["status"] in SUCCESSFUL]
        selected = group["selected"]
        if group["select"] == "all":
            yield from _check(None, f"{field}.selected", succeeded, selected)
        elif len(selected) > 1 or not set(selected) <= set(succeeded):
            yield Finding(
                task_id=None,
                field=f"{field}.selected",
                message=f"first_success selects one succeeded member, found {selected}",
            )
        elif succeeded and not selected:
            yield Finding(
                task_id=None,
                field=f"{field}.selected",
                message="a member succeeded but none is selected",
            )


def _audit_merges(
    merges: list[Mapping[str, Any]],
    by_id: Mapping[str, Mapping[str, Any]],
    run_dir: Path | None,
) -> Iterator[Finding]:
    for number, merge in enumerate(merges):
        field = f"merge[{number}]"
        yield from _audit_merge_checks(field, merge, by_id, run_dir)
        for entry in merge["tasks"]:
            found = by_id.get(entry["task_id"])
            if found is None:
                yield Finding(
                    task_id=None,
                    field=field,
                    message=f"task {entry['task_id']} is not in the report",
                )
                continue
            yield from _check(
                entry["task_id"],
                f"{field}.result_commit",
                found["provenance"]["result_commit"],
                entry["result_commit"],
            )
            if merge["status"] == "merged" and found["status"] not in SUCCESSFUL:
                yield Finding(
                    task_id=entry["task_id"],
                    field=field,
                    message=f"merged, but the task's status is {found['status']}",
                )
        for task_id, count in Counter(e["task_id"] for e in merge["tasks"]).items():
            if count > 1:
                yield Finding(task_id=task_id, field=field, message=f"listed {count} times")
        if merge["status"] == "merged" and (
            merge["new_commit"] is None or merge["old_commit"] is None
        ):
            yield Finding(
                task_id=None, field=field, message="a merged record without its old and new commit"
            )
        elif merge["status"] == "merged":
            # The merge commits chain from old_commit: the last one is where the target went.
            made = [e["merge_commit"] for e in merge["tasks"] if e["merge_commit"] is not None]
            expected = made[-1] if made else merge["old_commit"]
            yield from _check(None, f"{field}.new_commit", expected, merge["new_commit"])


def _audit_merge_checks(
    field: str,
    merge: Mapping[str, Any],
    by_id: Mapping[str, Mapping[str, Any]],
    run_dir: Path | None,
) -> Iterator[Finding]:
    """A checked merge's record (``mode``, ``checks``, ``left_out``): each step's ``passed``
    is what its exit code says and its logs are what it recorded; each check's ``passed`` is
    its required steps'; a result left out is in the report and was not merged."""
    mode, checks, left_out = merge.get("mode"), merge.get("checks", []), merge.get("left_out", [])
    if mode is None and (checks or left_out or merge["status"] == "check_failed"):
        yield Finding(
            task_id=None, field=f"{field}.mode", message="checks recorded, but no check mode"
        )
    for index, check in enumerate(checks):
        where = f"{field}.checks[{index}]"
        for step_index, step in enumerate(check["checks"]):
            step_field = f"{where}.checks[{step_index}]"
            passed = step["exit_code"] == 0 and not step["timed_out"]
            yield from _check(check["task_id"], f"{step_field}.passed", passed, step["passed"])
            if run_dir is not None:
                for stream in ("stdout", "stderr"):
                    yield from _check_file(
                        check["task_id"], f"{step_field}.{stream}", step[stream], run_dir
                    )
        passed = all(step["passed"] for step in check["checks"] if step["required"])
        yield from _check(check["task_id"], f"{where}.passed", passed, check["passed"])
    merged = {e["task_id"] for e in merge["tasks"]}
    for entry in left_out:
        if entry["task_id"] not in by_id:
            message = f"task {entry['task_id']} is not in the report"
            yield Finding(task_id=None, field=f"{field}.left_out", message=message)
        elif entry["task_id"] in merged:
            message = "left out, but listed among the tasks merged"
            yield Finding(task_id=entry["task_id"], field=f"{field}.left_out", message=message)
    if mode is not None:
        yield from _audit_checked_outcome(field, merge)


def _audit_checked_outcome(field: str, merge: Mapping[str, Any]) -> Iterator[Finding]:
    """What a checked merge's status says agrees with its checks: the target moved only to a
    tree whose checks passed (for a train, each result kept passed on the tree it made), and
    a result whose check failed was left out (or, for ``check``, nothing moved)."""
    # A checked merge that checked nothing (the target held every result already, or the
    # results conflicted) is written without ``checks``, as without ``left_out``.
    checks, status = merge.get("checks", []), merge["status"]
    left = {e["task_id"] for e in merge.get("left_out", [])}

    def wrong(message: str, task_id: str | None = None) -> Finding:
        return Finding(task_id=task_id, field=f"{field}.checks", message=message)

    if merge["mode"] == "check":
        moved = status == "merged" and merge["new_commit"] != merge["old_commit"]
        if moved and not any(c["passed"] and c["commit"] == merge["new_commit"] for c in checks):
            yield wrong(f"merged into {merge['new_commit']}, but no passing check of that tree")
        if status == "check_failed" and all(c["passed"] for c in checks):
            yield wrong("check_failed, but no check failed")
        return
    for entry in merge["tasks"]:
        made = entry["merge_commit"]
        if made is not None and not any(
            c["passed"] and c["commit"] == made and c["task_id"] == entry["task_id"] for c in checks
        ):
            yield wrong(f"merged as {made}, but no passing check of that tree", entry["task_id"])
    for check in checks:
        if not check["passed"] and check["task_id"] not in left:
            yield wrong("its check failed, but it is not left out", check["task_id"])
        if check["passed"] and check["task_id"] in left:
            yield wrong("its check passed, but it is left out", check["task_id"])
    if status == "check_failed" and (
        merge["new_commit"] is not None or any(e["merge_commit"] for e in merge["tasks"])
    ):
        yield wrong("check_failed, but a result was merged")


def report_layout(raw: Mapping[str, Any]) -> bytes:
    """The bytes of a report file as the orchestrator writes it, UTF-8: version 1 all
    2-space indented JSON; version 2 the same but for ``results``, a result a line (see
    :func:`report_chunks`)."""
    if raw.get("schema") == REPORT_SCHEMA_V1:
        return (json.dumps(raw, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    results = raw.get("results")
    lines = [json_line(r) for r in results] if isinstance(results, list) else None
    return b"".join(report_chunks(raw, lines))


def report_chunks(raw: Mapping[str, Any], lines: Sequence[str] | None) -> Iterator[bytes]:
    """A version 2 report file, in pieces to write one after the other: *raw* 2-space
    indented, except its ``results``, given as *lines* (each its ``json_line``; the
    value of ``results`` in *raw* is then not read), which are written one a line. A writer
    never holds the whole file, nor every result's JSON object, at once."""
    if not raw:
        yield b"{}\n"
        return
    last = len(raw) - 1
    yield b"{\n"
    for i, (key, value) in enumerate(raw.items()):
        end = ",\n" if i < last else "\n"
        head = f"  {json.dumps(key, ensure_ascii=False)}: "
        if key == "results" and lines is not None:
            if not lines:
                yield f"{head}[]{end}".encode()
                continue
            yield f"{head}[\n".encode()
            final = len(lines) - 1
            for j, line in enumerate(lines):
                yield f"    {line}{',' if j < final else ''}\n".encode()
            yield f"  ]{end}".encode()
        else:
            text = json.dumps(value, indent=2, ensure_ascii=False).replace("\n", "\n  ")
            yield f"{head}{text}{end}".encode()
    yield b"}\n"


def _expected_by_agent(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``results_by_agent`` as the results say it should be."""
    by_agent: dict[str, dict[str, Any]] = {}
    for result in results:
        entry = by_agent.setdefault(
            result["agent"],
            {
                "total": 0,
                "successful": 0,
                "failed": 0,
                "timeout": 0,
                "cancelled": 0,
                "skipped": 0,
                "cached": 0,
                "task_ids": [],
            },
        )
        entry["total"] += 1
        key = {
            "succeeded": "successful",
            "cached": "successful",
            "failed": "failed",
            "timed_out": "timeout",
            "cancelled": "cancelled",
            "skipped": "skipped",
        }[result["status"]]
        entry[key] += 1
        if result["status"] == "cached":
            entry["cached"] += 1
        entry["task_ids"].append(result["task_id"])
    return by_agent


def _audit_plan_file(run_dir: Path, plan_sha256: Any) -> list[Finding]:
    """``plan.json`` in the run directory hashes to the report's ``plan_sha256``."""
    try:
        plan_sha, _ = hash_file("plan.json", MAX_LOG_BYTES, within=run_dir)
    except OSError as exc:
        return [
            Finding(
                task_id=None,
                field="plan_sha256",
                message=f"cannot read {run_dir / 'plan.json'}: {exc.strerror or exc}",
            )
        ]
    return list(_check(None, "plan_sha256", plan_sha, plan_sha256))


def audit_report(
    raw: Mapping[str, Any], *, run_dir: Path | None = None, source: bytes | None = None
) -> list[Finding]:
    """Every digest and count of a report, recomputed; one Finding per mismatch.

    *raw* is the report's JSON object as read (see :func:`load_report_json`). With *run_dir*,
    the envelope and log files it names are hashed too; a missing file is a finding. With
    *source* (the file's bytes), a file whose layout differs from what the orchestrator writes
    is a finding too, so that not even a changed space goes unnoticed.
    """
    findings: list[Finding] = []
    if source is not None and source != report_layout(raw):
        findings.append(
            Finding(
                task_id=None,
                field="<file>",
                message="the file's bytes differ from the layout the orchestrator writes (re-formatted or edited)",
            )
        )
    findings += _check(None, "report_sha256", report_digest(raw), raw["report_sha256"])
    results = list(raw["results"])
    ids = [r["task_id"] for r in results]
    for task_id, count in Counter(ids).items():
        if count > 1:
            findings.append(
                Finding(task_id=task_id, field="results", message=f"appears {count} times")
            )
    by_id = {r["task_id"]: r for r in results}
    groups = raw.get("groups", {})
    pricing = raw.get("pricing", {})
    for result in results:
        findings += _audit_result(result, run_dir)
        findings += _audit_usage(result, pricing)
        findings += _audit_checks(result, run_dir)
        findings += _audit_hooks(result, run_dir)
        findings += _audit_start(result, raw, by_id, groups, run_dir)
    findings += _audit_groups(groups, by_id)
    findings += _audit_merges(raw.get("merge", []), by_id, run_dir)
    summary = raw["summary"]
    for key, value in _expected_summary(results).items():
        findings += _check(None, f"summary.{key}", value, summary[key])
    # Usage totals (reports made before they existed have none, and no usage either).
    usages = [r.get("usage") for r in results]
    findings += _check(None, "summary.usage", usage_totals(usages), summary.get("usage"))
    findings += _check(
        None, "usage_by_model", usage_by_model(results), raw.get("usage_by_model", {})
    )
    by_agent = _expected_by_agent(results)
    for name, entry in by_agent.items():
        if "usage" in raw["results_by_agent"].get(name, {}):
            entry["usage"] = usage_totals(r.get("usage") for r in results if r["agent"] == name)
    findings += _check(None, "results_by_agent", by_agent, raw["results_by_agent"])
    errors = [
        {
            "task_id": r["task_id"],
            "agent": r["agent"],
            "kind": r["error"]["kind"],
            "message": r["error"]["message"],
        }
        for r in results
        if r["status"] not in SUCCESSFUL and r["error"] is not None
    ]
    findings += _check(None, "errors", errors, raw["errors"])
    if run_dir is not None:
        findings += _audit_plan_file(run_dir, raw["plan_sha256"])
    return findings
