"""A run's provenance as in-toto attestations, signed, and checked against the report.

For each task with a result commit, ``orchestrator attest`` writes an in-toto Statement v1
whose subject is the result (digests ``gitCommit`` and ``gitTree``) with a SLSA Provenance v1
predicate, and, where the task ran checks, a second Statement with the in-toto test-result
predicate. Each goes in a DSSE envelope signed with Ed25519 (orchestrator/audit/dsse.py), in a
file of its own (``<task>.provenance.json``, ``<task>.test-result.json``) and as one line of the
run's bundle ``<run_id>.intoto.jsonl``.

One more statement covers the run as a whole (``run.provenance.json``): its subject is the
report file itself (its SHA-256), so that a report with a task removed, a status changed or a
merge left out no longer matches what was signed, even when its own digests were recomputed.

A statement is a pure function of the report and its file's digest (:func:`statements_for`):
the report is verified before anything is signed, and ``verify --attestations`` recomputes each
statement from the verified report and compares it whole, so a statement for another commit,
another run, another dependency or another check outcome is named, as is one that is missing
or signed by another key. What goes in each statement is described in docs/audit.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from envelopes import (
    MAX_REPORT_BYTES,
    Finding,
    Report,
    TaskResult,
    hash_file,
    loads_bounded,
    open_regular,
    read_bounded,
    ref_safe,
    unique_keys,
    upstream_tasks,
)

from .._fs import replace_file
from .._version import __version__
from ..errors import AttestationError
from .dsse import dumps, sign_envelope, verified_payload

__all__ = [
    "BUILDER_ID",
    "BUILD_TYPE",
    "MAX_ENVELOPE_BYTES",
    "PAYLOAD_TYPE",
    "RUN_BUILD_TYPE",
    "SLSA_PROVENANCE",
    "STATEMENT_TYPE",
    "TEST_RESULT",
    "Attestation",
    "check_attestations",
    "report_digest",
    "statements_for",
    "write_attestations",
]

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE = "https://slsa.dev/provenance/v1"
TEST_RESULT = "https://in-toto.io/attestation/test-result/v0.1"
#: What ran a task: one agent in its own worktree and venv, from a plan (docs/audit.md says
#: what its parameters mean).
BUILD_TYPE = "urn:worktree-orchestrator:buildtype:task:v1"
#: What ran a whole run: a plan's tasks, fanned out; its subject is the report file.
RUN_BUILD_TYPE = "urn:worktree-orchestrator:buildtype:run:v1"
BUILDER_ID = "urn:worktree-orchestrator:builder"

#: Which statement a file holds, by predicate type (the part of its name after the task).
_KINDS = {SLSA_PROVENANCE: "provenance", TEST_RESULT: "test-result"}

#: Largest envelope read back (one line of a bundle, or one file).
MAX_ENVELOPE_BYTES = 16 << 20
#: Most lines of a bundle read: two statements per task, the run's, and some slack.
_SLACK_LINES = 16
#: Most installed distributions listed one by one in a statement (all are in the
#: environment's digest, which is listed too): a venv an agent filled with a hundred thousand
#: entries must not make a statement too large to check.
MAX_LISTED_PACKAGES = 2000


@dataclass(frozen=True)
class Attestation:
    """One statement of a run: which task (``""`` for the run's own), which kind
    (``provenance``, ``test-result``)."""

    task_id: str
    kind: str
    statement: dict[str, Any]

    @property
    def file_name(self) -> str:
        if not self.task_id:
            return f"run.{self.kind}.json"
        return f"{ref_safe(self.task_id)}.{self.kind}.json"


def _time(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _subject(result: TaskResult) -> list[dict[str, Any]]:
    prov = result.provenance
    assert prov.result_commit is not None and prov.result_tree is not None
    return [
        {
            "name": result.branch or result.task_id,
            "digest": {"gitCommit": prov.result_commit, "gitTree": prov.result_tree},
        }
    ]


def _dependencies(
    report: Report, result: TaskResult, by_id: Mapping[str, TaskResult]
) -> list[dict[str, Any]]:
    prov = result.provenance
    deps: list[dict[str, Any]] = []
    if report.base_commit is not None:
        deps.append({"name": "base", "digest": {"gitCommit": report.base_commit}})
    if prov.base_commit is not None and prov.base_commit != report.base_commit:
        # A dependent task starts from its dependencies' results merged onto the base.
        deps.append({"name": "start", "digest": {"gitCommit": prov.base_commit}})
    groups = {name: g.model_dump(mode="json") for name, g in report.groups.items()}
    for task_id in upstream_tasks({"depends_on": result.depends_on}, groups):
        if task_id not in by_id:
            continue  # a report that names no such task does not verify: never signed
        up = by_id[task_id].provenance
        if up.result_commit is not None and up.result_tree is not None:
            digest = {"gitCommit": up.result_commit, "gitTree": up.result_tree}
            deps.append({"name": f"task:{task_id}", "digest": digest})
    agent: dict[str, Any] = {
        "name": f"agent:{result.agent}",
        "digest": {"sha256": prov.agent_sha256},
        "annotations": prov.agent.model_dump(mode="json", exclude_none=True),
    }
    deps.append(agent)
    deps.append({"name": "plan", "digest": {"sha256": report.plan_sha256}})
    for item in prov.inputs:  # the plan's scripts the task named, the agent's program
        deps.append({"name": f"{item.kind}:{item.path}", "digest": {"sha256": item.sha256}})
    for copied in prov.copied:
        deps.append({"name": f"copy:{copied.path}", "digest": {"sha256": copied.sha256}})
    if prov.environment is not None and prov.env_sha256 is not None:
        env = prov.environment
        deps.append(
            {
                "name": "environment",
                "digest": {"sha256": prov.env_sha256},
                "annotations": {
                    "python": env.python,
                    "implementation": env.implementation,
                    "installer": env.installer or "",
                },
            }
        )
        deps[-1]["annotations"]["packages"] = str(len(env.packages))
        for package in env.packages[:MAX_LISTED_PACKAGES]:
            name, _, version = package.partition("==")
            deps.append({"name": package, "uri": f"pkg:pypi/{name.lower()}@{version}"})
    return deps


def _byproducts(result: TaskResult) -> list[dict[str, Any]]:
    prov = result.provenance
    out: list[dict[str, Any]] = [{"name": "output", "digest": {"sha256": prov.output_sha256}}]
    if (entry := result.envelope) is not None:
        # A record of the run's envelopes.jsonl is named by where it starts in that file.
        name = entry.path if entry.offset is None else f"{entry.path}#{entry.offset}"
        out.append({"name": name, "digest": {"sha256": entry.sha256}})
    for attempt in result.attempt_log:
        for log in (attempt.stdout, attempt.stderr):
            if log is not None:
                out.append({"name": log.path, "digest": {"sha256": log.sha256}})
    for check in [*result.checks, *result.hooks]:
        for log in (check.stdout, check.stderr):
            if log is not None:
                out.append({"name": log.path, "digest": {"sha256": log.sha256}})
    return out


def _provenance(
    report: Report, result: TaskResult, by_id: Mapping[str, TaskResult]
) -> dict[str, Any]:
    prov = result.provenance
    external: dict[str, Any] = {
        "plan": report.plan_name,
        "plan_sha256": report.plan_sha256,
        "task_id": result.task_id,
        "agent": result.agent,
        "envelope_sha256": prov.envelope_sha256,
        "depends_on": result.depends_on,
    }
    if result.group is not None:
        external["group"] = result.group
    internal: dict[str, Any] = {
        "run_id": report.run_id,
        "status": result.status,
        "attempts": result.attempts,
        "result_sha256": prov.result_sha256,
    }
    if report.base_ref is not None:
        internal["base_ref"] = report.base_ref
    return {
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": external,
            "internalParameters": internal,
            "resolvedDependencies": _dependencies(report, result, by_id),
        },
        "runDetails": {
            "builder": {
                "id": BUILDER_ID,
                "version": {"worktree-orchestrator": report.tool.get("version", __version__)},
            },
            "metadata": {
                "invocationId": f"{report.run_id}/{result.task_id}",
                "startedOn": _time(result.timings.started_at),
                "finishedOn": _time(result.timings.finished_at),
            },
            "byproducts": _byproducts(result),
        },
    }


def _test_result(result: TaskResult) -> dict[str, Any] | None:
    checks = [c for c in result.checks if c.phase == "check"]
    if not checks:
        return None
    last = max(c.turn for c in checks)
    checks = [c for c in checks if c.turn == last]
    passed = [c.name for c in checks if c.passed]
    failed = [c.name for c in checks if not c.passed and c.required]
    warned = [c.name for c in checks if not c.passed and not c.required]
    return {
        "result": "FAILED" if failed else "WARNED" if warned else "PASSED",
        "configuration": [
            {"name": "envelope", "digest": {"sha256": result.provenance.envelope_sha256}}
        ],
        "passedTests": passed,
        "warnedTests": warned,
        "failedTests": failed,
    }


def _run_provenance(report: Report, report_digest: str) -> dict[str, Any]:
    """The run's own statement: its subject the report file, so that what was signed for
    the run (every task, status, merge) is what the report file says, byte for byte."""
    products: list[dict[str, Any]] = []
    for result in report.results:
        prov = result.provenance
        if prov.result_commit is not None and prov.result_tree is not None:
            digest = {"gitCommit": prov.result_commit, "gitTree": prov.result_tree}
            products.append({"name": f"task:{result.task_id}", "digest": digest})
    deps: list[dict[str, Any]] = [{"name": "plan", "digest": {"sha256": report.plan_sha256}}]
    if report.base_commit is not None:
        deps.insert(0, {"name": "base", "digest": {"gitCommit": report.base_commit}})
    internal: dict[str, Any] = {"run_id": report.run_id, "report_sha256": report.report_sha256}
    if report.base_ref is not None:
        internal["base_ref"] = report.base_ref
    predicate = {
        "buildDefinition": {
            "buildType": RUN_BUILD_TYPE,
            "externalParameters": {
                "plan": report.plan_name,
                "plan_sha256": report.plan_sha256,
                "tasks": [r.task_id for r in report.results],
            },
            "internalParameters": internal,
            "resolvedDependencies": deps,
        },
        "runDetails": {
            "builder": {
                "id": BUILDER_ID,
                "version": {"worktree-orchestrator": report.tool.get("version", __version__)},
            },
            "metadata": {
                "invocationId": report.run_id,
                "startedOn": _time(report.started_at),
                "finishedOn": _time(report.finished_at),
            },
            "byproducts": products,
        },
    }
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": f"{report.run_id}/report.json", "digest": {"sha256": report_digest}}],
        "predicateType": SLSA_PROVENANCE,
        "predicate": predicate,
    }


def statements_for(report: Report, report_digest: str) -> list[Attestation]:
    """Every statement the run's report makes: the run's own (its subject the report file,
    whose SHA-256 is *report_digest*), then per task with a result commit its SLSA provenance
    and, where it ran checks, its test result. A pure function of its arguments."""
    out = [Attestation("", "provenance", _run_provenance(report, report_digest))]
    by_id = {r.task_id: r for r in report.results}
    for result in report.results:
        if result.provenance.result_commit is None or result.provenance.result_tree is None:
            continue
        subject = _subject(result)
        predicates = [(SLSA_PROVENANCE, _provenance(report, result, by_id))]
        if (tested := _test_result(result)) is not None:
            predicates.append((TEST_RESULT, tested))
        for predicate_type, predicate in predicates:
            statement = {
                "_type": STATEMENT_TYPE,
                "subject": subject,
                "predicateType": predicate_type,
                "predicate": predicate,
            }
            out.append(Attestation(result.task_id, _KINDS[predicate_type], statement))
    return out


def report_digest(path: Path) -> str:
    """The SHA-256 of the report file at *path* (what the run's statement is about)."""
    try:
        found, size = hash_file(path, MAX_REPORT_BYTES)
    except OSError as exc:
        raise AttestationError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if size > MAX_REPORT_BYTES:
        raise AttestationError(f"{path} is larger than {MAX_REPORT_BYTES} bytes")
    return found


def write_attestations(
    report: Report, report_file_sha256: str, key: Ed25519PrivateKey, out: Path
) -> list[Path]:
    """Sign every statement of *report* (which the caller has verified; its file's SHA-256
    is *report_file_sha256*) with *key* into *out*: one file per statement and the bundle
    ``<run_id>.intoto.jsonl``. Blocking. Returns the files written, the bundle last. Each
    file is written under a new name and renamed over the old one: a link or a FIFO at its
    name is replaced, never followed or opened."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AttestationError(f"cannot create {out}: {exc.strerror or exc}") from exc
    written: list[Path] = []
    lines: list[bytes] = []
    for attestation in statements_for(report, report_file_sha256):
        envelope = sign_envelope(PAYLOAD_TYPE, dumps(attestation.statement), key)
        data = json.dumps(envelope, indent=2).encode() + b"\n"
        written.append(_write(out / attestation.file_name, data))
        lines.append(json.dumps(envelope, separators=(",", ":")).encode() + b"\n")
    written.append(_write(out / f"{report.run_id}.intoto.jsonl", b"".join(lines)))
    return written


def _write(path: Path, data: bytes) -> Path:
    try:
        replace_file(path, data)
    except OSError as exc:
        raise AttestationError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


# -- checking ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Expected:
    """The statements a report makes, by (task, kind), and how to tell which one a signed
    statement claims to be."""

    run_id: str
    statements: dict[tuple[str, str], Attestation]
    #: A test result names no task: its subject's name (the task's branch, or id) says which.
    by_subject: dict[str, str]

    @classmethod
    def of(cls, report: Report, digest: str) -> _Expected:
        statements = {(a.task_id, a.kind): a for a in statements_for(report, digest)}
        by_subject = {
            a.statement["subject"][0]["name"]: a.task_id for a in statements.values() if a.task_id
        }
        return cls(report.run_id, statements, by_subject)

    def identify(self, statement: Any) -> tuple[str, str] | str:
        """The (task, kind) *statement* claims to be, or why it is none of this run's."""
        if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
            return "not an in-toto Statement v1"
        predicate_type = str(statement.get("predicateType"))
        kind = _KINDS.get(predicate_type)
        if kind is None:
            return f"predicateType {predicate_type[:100]!r} is not one attest writes"
        try:
            if kind == "provenance":
                invocation = statement["predicate"]["runDetails"]["metadata"]["invocationId"]
                run_id, slash, task_id = str(invocation).partition("/")
                if run_id != self.run_id:
                    return f"a statement of run {run_id[:100]!r}, not of {self.run_id}"
                if not slash:
                    return "", kind  # the run's own
                if not task_id:
                    return f"invocationId {str(invocation)[:200]!r} names no task"
                return task_id, kind
            name = str(statement["subject"][0]["name"])
        except (KeyError, IndexError, TypeError):
            return f"a {kind} statement without the fields that say which task it is about"
        by_name = self.by_subject.get(name)
        if by_name is None:
            return f"a {kind} statement about {name[:200]!r}, no result of this run"
        return by_name, kind


def check_attestations(
    report: Report, report_file_sha256: str, directory: Path, public: Ed25519PublicKey
) -> list[Finding]:
    """Check the attestations in *directory* against *report* (verified by the caller; its
    file's SHA-256 is *report_file_sha256*) and *public*: every envelope's signature, every
    statement equal to the one the report makes, every statement the report makes present
    once in the bundle and in its own file. Blocking. One Finding per thing that fails,
    naming the file (and line)."""
    expected = _Expected.of(report, report_file_sha256)
    findings: list[Finding] = []
    in_bundle: dict[tuple[str, str], list[str]] = {}
    bundle = directory / f"{report.run_id}.intoto.jsonl"
    limit = 2 * len(report.results) + _SLACK_LINES
    try:
        for number, line in _lines(bundle, limit):
            where = f"{bundle.name}:{number}"
            if line is None:
                message = f"longer than {MAX_ENVELOPE_BYTES} bytes"
                findings.append(Finding(task_id=None, field=where, message=message))
                continue
            found = _check_one(line, where, expected, public, findings)
            if found is not None:
                in_bundle.setdefault(found, []).append(where)
    except AttestationError as exc:
        findings.append(Finding(task_id=None, field=bundle.name, message=str(exc)))
    for (task_id, kind), places in in_bundle.items():
        if len(places) > 1:
            message = f"appears {len(places)} times in the bundle ({', '.join(places)})"
            findings.append(Finding(task_id=task_id or None, field=kind, message=message))
    for key, attestation in expected.statements.items():
        task_id, kind = key
        which = f"{kind} statement" if task_id else f"run's {kind} statement"
        if key not in in_bundle:
            message = f"no {which} in {bundle.name}"
            findings.append(Finding(task_id=task_id or None, field=kind, message=message))
        path = directory / attestation.file_name
        try:
            data = _read(path)
        except AttestationError as exc:
            findings.append(Finding(task_id=task_id or None, field=kind, message=str(exc)))
            continue
        found = _check_one(data, path.name, expected, public, findings)
        if found is not None and found != key:
            whose = f"task {found[0]}" if found[0] else "the run"
            message = f"{path.name} holds the {found[1]} statement of {whose}"
            findings.append(Finding(task_id=task_id or None, field=kind, message=message))
    return findings


def _check_one(
    data: bytes,
    where: str,
    expected: _Expected,
    public: Ed25519PublicKey,
    findings: list[Finding],
) -> tuple[str, str] | None:
    """The (task, kind) of the envelope *data* when its signature verifies and its statement
    is the report's; else a finding is added and None returned."""
    try:
        envelope = loads_bounded(data, object_pairs_hook=unique_keys)
        payload = verified_payload(envelope, PAYLOAD_TYPE, public)
        statement = loads_bounded(payload, object_pairs_hook=unique_keys)
    except (AttestationError, ValueError) as exc:
        findings.append(Finding(task_id=None, field=where, message=_short(exc)))
        return None
    key = expected.identify(statement)
    if isinstance(key, str):
        findings.append(Finding(task_id=None, field=where, message=key))
        return None
    task_id, kind = key
    wanted = expected.statements.get(key)
    if wanted is None:
        message = f"a {kind} statement for a task the report makes none for"
        findings.append(Finding(task_id=task_id[:200], field=where, message=message))
        return None
    if statement != wanted.statement:
        difference = _difference(statement, wanted.statement)
        message = f"the {kind} statement differs from the report's: {difference}"
        findings.append(Finding(task_id=task_id or None, field=where, message=message))
        return None
    return key


def _difference(found: Any, expected: Any, path: str = "") -> str:
    if isinstance(found, dict) and isinstance(expected, dict):
        for name in sorted(set(found) | set(expected)):
            if name not in found:
                return f"{path}{name} is missing"
            if name not in expected:
                return f"{path}{name} is not in the report's statement"
            if found[name] != expected[name]:
                return _difference(found[name], expected[name], f"{path}{name}.")
    if isinstance(found, list) and isinstance(expected, list) and len(found) == len(expected):
        for i, (a, b) in enumerate(zip(found, expected, strict=True)):
            if a != b:
                return _difference(a, b, f"{path.rstrip('.')}[{i}].")
    shown = json.dumps(found)[:120]
    return f"{path.rstrip('.') or 'the statement'} is {shown}, the report says {json.dumps(expected)[:120]}"


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _read(path: Path) -> bytes:
    try:
        return read_bounded(path, MAX_ENVELOPE_BYTES)
    except OSError as exc:
        raise AttestationError(f"cannot read {path.name}: {exc.strerror or exc}") from exc


def _lines(path: Path, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """The non-empty lines of *path* (regular, not followed if a link), numbered, each at most
    MAX_ENVELOPE_BYTES (a longer one is read past and given as None), at most *limit* of them
    (AttestationError past that)."""
    try:
        fd = open_regular(path)
    except OSError as exc:
        raise AttestationError(f"cannot read {path.name}: {exc.strerror or exc}") from exc
    with open(fd, "rb") as handle:
        number = counted = 0
        while line := handle.readline(MAX_ENVELOPE_BYTES + 1):
            number += 1
            if len(line) > MAX_ENVELOPE_BYTES:
                while line and not line.endswith(b"\n"):  # the rest of it, a part at a time
                    line = handle.readline(1 << 20)
                yield number, None
                continue
            if not line.strip():
                continue
            counted += 1
            if counted > limit:
                raise AttestationError(f"more than {limit} statements for a run of this size")
            yield number, line
