"""Signed in-toto attestations of a run: made by ``attest``, checked by ``verify
--attestations``, and checked again by implementations that are not ours (securesystemslib's
DSSE, the in-toto-attestation package's statement and predicate schemas). Every tampering an
auditor could meet is tried: a changed byte, a statement for another commit or another run, a
missing or repeated one, a wrong key, and input that is not an attestation at all."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from envelopes import load_report_json, report_layout
from orchestrator.audit.attest import (
    PAYLOAD_TYPE,
    SLSA_PROVENANCE,
    TEST_RESULT,
    check_attestations,
    report_digest,
    statements_for,
)
from orchestrator.audit.dsse import (
    dumps,
    key_id,
    load_private_key,
    load_public_key,
    pae,
    sign_envelope,
)
from orchestrator.cli import main
from orchestrator.errors import AttestationError

from .conftest import cli, git

AGENT = """
import json, os, pathlib, sys
envelope = json.load(open(os.environ["ORCHESTRATOR_ENVELOPE"]))
pathlib.Path(envelope["task_id"] + ".txt").write_text(envelope["task"] + "\\n")
json.dump({"wrote": envelope["task_id"]}, open(os.environ["ORCHESTRATOR_OUTPUT"], "w"))
sys.exit(1 if envelope["task"] == "fail" else 0)
"""


@dataclass
class Run:
    repo: Path
    report: Path
    key: Path
    public: Path
    attestations: Path


def _plan(directory: Path) -> Path:
    (directory / "agent.py").write_text(AGENT)
    plan = {
        "name": "attested",
        "agents": {"coder": {"command": [sys.executable, "{plan_dir}/agent.py"]}},
        "defaults": {"venv": False},
        "tasks": [
            {
                "id": "tested",
                "agent": "coder",
                "task": "write",
                "checks": [
                    {"name": "has-file", "run": "test -f tested.txt"},
                    {"name": "lint", "run": "exit 7", "required": False},
                ],
            },
            {"id": "after", "agent": "coder", "task": "write", "depends_on": ["tested"]},
            {"id": "broken", "agent": "coder", "task": "fail"},
        ],
    }
    path = directory / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


@pytest.fixture(scope="module")
def attested(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One real run (a task with checks, a dependent, a failing task), signed once."""
    base = tmp_path_factory.mktemp("attested")
    repo = base / "repo"
    repo.mkdir()
    (repo / "README").write_text("hello\n")
    git(repo, "init", "--quiet", "--initial-branch=main")
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "-m", "initial")
    plan = _plan(base)
    assert main(["run", str(plan), "--repo", str(repo), "--json"]) == 1  # "broken" failed
    (report,) = (repo / ".git" / "orchestrator" / "runs").glob("*/report.json")
    assert main(["keygen", "--out", str(base / "key")]) == 0
    out = base / "attestations"
    assert main(["attest", str(report), "--key", str(base / "key.pem"), "--out", str(out)]) == 0
    return Run(repo, report, base / "key.pem", base / "key.pub.pem", out)


def _copy(run: Run, tmp_path: Path) -> Path:
    target = tmp_path / "attestations"
    shutil.copytree(run.attestations, target)
    return target


def _verify(capsys: pytest.CaptureFixture[str], run: Run, directory: Path, key: Path) -> Any:
    return cli(
        capsys, "verify", str(run.report), "--attestations", str(directory), "--key", str(key)
    )


def _bundle(directory: Path) -> Path:
    (bundle,) = directory.glob("*.intoto.jsonl")
    return bundle


def _statement(envelope: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(base64.b64decode(envelope["payload"]))
    return result


# -- the encoding and the keys ----------------------------------------------------------


def test_pae_is_the_dsse_specs_test_vector() -> None:
    assert (
        pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    # Lengths are bytes, not characters.
    assert pae("t", "é".encode()) == b"DSSEv1 1 t 2 \xc3\xa9"


def test_keygen_writes_a_private_key_only_its_owner_reads(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    outcome = cli(capsys, "keygen", "--out", str(tmp_path / "key"))
    assert outcome.code == 0, outcome.err
    private, public = tmp_path / "key.pem", tmp_path / "key.pub.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    key = load_private_key(str(private))
    assert key_id(key.public_key()) == key_id(load_public_key(public))
    assert key_id(load_public_key(public)) in outcome.out
    # Never over an existing key (the private half is what would be lost).
    before = private.read_bytes()
    again = cli(capsys, "keygen", "--out", str(tmp_path / "key.pem"))
    assert again.code == 2 and "exists" in again.err and "Traceback" not in again.err
    assert private.read_bytes() == before


def test_keys_that_are_not_ed25519_pem_are_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    other = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.pem").write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "junk.pem").write_text("not a key")
    locked = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (tmp_path / "locked.pem").write_bytes(locked)
    with pytest.raises(AttestationError, match="not an Ed25519 key"):
        load_private_key(str(tmp_path / "ec.pem"))
    with pytest.raises(AttestationError, match="not a PEM private key"):
        load_private_key(str(tmp_path / "junk.pem"))
    with pytest.raises(AttestationError, match="encrypted"):
        load_private_key(str(tmp_path / "locked.pem"))
    with pytest.raises(AttestationError, match="cannot read"):
        load_private_key(str(tmp_path / "missing.pem"))
    os.mkfifo(tmp_path / "fifo.pem")  # never blocks
    with pytest.raises(AttestationError, match="cannot read"):
        load_public_key(tmp_path / "fifo.pem")


# -- what attest writes -----------------------------------------------------------------


def test_a_run_is_attested_and_verifies(attested: Run, capsys: pytest.CaptureFixture[str]) -> None:
    names = sorted(p.name for p in attested.attestations.iterdir())
    run_id = attested.report.parent.name
    assert names == sorted(
        [
            "after.provenance.json",
            "broken.provenance.json",
            "run.provenance.json",
            "tested.provenance.json",
            "tested.test-result.json",
            f"{run_id}.intoto.jsonl",
        ]
    )
    lines = _bundle(attested.attestations).read_text().splitlines()
    assert len(lines) == 5
    outcome = _verify(capsys, attested, attested.attestations, attested.public)
    assert outcome.code == 0, outcome.out
    assert "attestations checked" in outcome.out


def test_the_provenance_statement_says_what_the_report_says(attested: Run) -> None:
    _, report = load_report_json(attested.report)
    tested, after = report.result("tested"), report.result("after")
    envelope = json.loads((attested.attestations / "after.provenance.json").read_text())
    assert envelope["payloadType"] == PAYLOAD_TYPE
    statement = _statement(envelope)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == SLSA_PROVENANCE
    assert statement["subject"] == [
        {
            "name": after.branch,
            "digest": {
                "gitCommit": after.provenance.result_commit,
                "gitTree": after.provenance.result_tree,
            },
        }
    ]
    build = statement["predicate"]["buildDefinition"]
    assert build["buildType"].startswith("urn:worktree-orchestrator:")
    assert build["externalParameters"]["task_id"] == "after"
    assert build["externalParameters"]["envelope_sha256"] == after.provenance.envelope_sha256
    deps = {d["name"]: d for d in build["resolvedDependencies"]}
    assert deps["base"]["digest"] == {"gitCommit": report.base_commit}
    assert deps["start"]["digest"] == {"gitCommit": after.provenance.base_commit}
    assert deps["task:tested"]["digest"] == {
        "gitCommit": tested.provenance.result_commit,
        "gitTree": tested.provenance.result_tree,
    }
    # The plan's script the agent ran, and the program that ran it, by content.
    assert deps["plan:agent.py"]["digest"]["sha256"] == _sha256(
        Path(report.run_dir).parents[4] / "agent.py"
    )
    assert any(name.startswith("program:") for name in deps)
    details = statement["predicate"]["runDetails"]
    assert details["metadata"]["invocationId"] == f"{report.run_id}/after"
    assert details["metadata"]["startedOn"].endswith("Z")
    logs = {b["name"]: b["digest"]["sha256"] for b in details["byproducts"]}
    stdout = after.attempt_log[-1].stdout
    assert stdout is not None and logs[stdout.path] == stdout.sha256


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_test_result_statement_names_each_check(attested: Run) -> None:
    envelope = json.loads((attested.attestations / "tested.test-result.json").read_text())
    statement = _statement(envelope)
    assert statement["predicateType"] == TEST_RESULT
    predicate = statement["predicate"]
    # The required check passed; the one that is not required failed: a warning.
    assert predicate["result"] == "WARNED"
    assert predicate["passedTests"] == ["has-file"]
    assert predicate["warnedTests"] == ["lint"]
    assert predicate["failedTests"] == []


# -- checked by implementations that are not ours ---------------------------------------


def test_signatures_verify_with_securesystemslib(attested: Run) -> None:
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    public = load_public_key(attested.public)
    key = SSlibKey.from_crypto(public, keyid=key_id(public))
    for line in _bundle(attested.attestations).read_text().splitlines():
        envelope = Envelope.from_dict(json.loads(line))
        assert envelope.payload_type == PAYLOAD_TYPE
        assert set(envelope.verify([key], 1)) == {key.keyid}
    # A key it was not signed with does not verify it.
    other = Ed25519PrivateKey.generate().public_key()
    stranger = SSlibKey.from_crypto(other, keyid=key_id(public))
    from securesystemslib.exceptions import VerificationError

    with pytest.raises(VerificationError):
        envelope.verify([stranger], 1)


def test_statements_validate_against_the_in_toto_attestation_schemas(attested: Run) -> None:
    from google.protobuf import json_format
    from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
    from in_toto_attestation.predicates.test_result.v0 import test_result_pb2
    from in_toto_attestation.v1 import statement_pb2
    from in_toto_attestation.v1.statement import Statement

    kinds = {SLSA_PROVENANCE: provenance_pb2.Provenance, TEST_RESULT: test_result_pb2.TestResult}
    seen = set()
    for line in _bundle(attested.attestations).read_text().splitlines():
        statement = _statement(json.loads(line))
        # Strict: a field the schema does not know fails the parse.
        message = json_format.ParseDict(statement, statement_pb2.Statement())
        Statement.copy_from_pb(message).validate()
        json_format.ParseDict(statement["predicate"], kinds[statement["predicateType"]]())
        seen.add(statement["predicateType"])
    assert seen == {SLSA_PROVENANCE, TEST_RESULT}


# -- what verify --attestations catches -------------------------------------------------


def test_a_changed_byte_in_an_envelope_is_caught(
    attested: Run, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    directory = _copy(attested, tmp_path)
    path = directory / "after.provenance.json"
    envelope = json.loads(path.read_text())
    payload = bytearray(base64.b64decode(envelope["payload"]))
    payload[payload.index(b"after")] = ord("A")
    envelope["payload"] = base64.b64encode(bytes(payload)).decode()
    path.write_text(json.dumps(envelope))
    outcome = _verify(capsys, attested, directory, attested.public)
    assert outcome.code == 1
    assert "after.provenance.json: no signature verifies with the given public key" in outcome.out
    # The bundle's copy still verifies: only the file is named.
    assert outcome.out.count("no signature verifies") == 1


def test_a_changed_signature_in_the_bundle_is_caught(
    attested: Run, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    directory = _copy(attested, tmp_path)
    bundle = _bundle(directory)
    lines = bundle.read_text().splitlines()
    first = json.loads(lines[0])
    sig = bytearray(base64.b64decode(first["signatures"][0]["sig"]))
    sig[0] ^= 1
    first["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    lines[0] = json.dumps(first)
    bundle.write_text("\n".join(lines) + "\n")
    outcome = _verify(capsys, attested, directory, attested.public)
    assert outcome.code == 1
    assert f"{bundle.name}:1: no signature verifies" in outcome.out
    # ... and the statement it carried is now missing from the bundle.
    assert f"statement in {bundle.name}" in outcome.out


def test_a_statement_for_another_commit_is_caught_even_when_signed_by_the_key(
    attested: Run, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    directory = _copy(attested, tmp_path)
    path = directory / "tested.provenance.json"
    statement = _statement(json.loads(path.read_text()))
    statement["subject"][0]["digest"]["gitCommit"] = "0" * 40
    key = load_private_key(str(attested.key))
    path.write_text(json.dumps(sign_envelope(PAYLOAD_TYPE, dumps(statement), key)))
    outcome = _verify(capsys, attested, directory, attested.public)
    assert outcome.code == 1
    assert "task tested: tested.provenance.json: the provenance statement differs" in outcome.out
    assert "subject[0].digest.gitCommit" in outcome.out


def test_a_statement_of_another_run_or_task_is_caught(
    attested: Run, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    directory = _copy(attested, tmp_path)
    key = load_private_key(str(attested.key))
    path = directory / "after.provenance.json"
    statement = _statement(json.loads(path.read_text()))
    statement["predicate"]["runDetails"]["metadata"]["invocationId"] = (
        "20200101-000000-abcdef/after"
    )
    path.write_text(json.dumps(sign_envelope(PAYLOAD_TYPE, dumps(statement), key)))
    # The file of one task holding another task's (valid) statement.
    shutil.copy(directory / "tested.provenance.json", directory / "broken.provenance.json")
    outcome = _verify(capsys, attested, directory, attested.public)
    assert outcome.code == 1
    assert "after.provenance.json: a statement of run '20200101-000000-abcdef'" in outcome.out
    assert "broken.provenance.json holds the provenance statement of task tested" in outcome.out


def test_a_missing_or_repeated_statement_is_caught(
    attested: Run, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    directory = _copy(attested, tmp_path)
    (directory / "tested.test-result.json").unlink()
    bundle = _bundle(directory)
    lines = bundle.read_text().splitlines()
    kept = [line for line in lines if _statement(json.loads(line))["predicateType"] != TEST_RESULT]
    bundle.write_text("\n".join([*kept, kept[0]]) + "\n")
    outcome = _verify(capsys, attested, directory, attested.public)
    assert outcome.code == 1
    assert f"task tested: test-result: no test-result statement in {bundle.name}" in outcome.out
    assert "task tested: test-result: cannot read tested.test-result.json" in outcome.out
    assert "appears 2 times in the bundle" in outcome.out


def test_a_wrong_key_fails_every_envelope(
    attested: Run, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli(capsys, "keygen", "--out", str(tmp_path / "other")).code == 0
    outcome = _verify(capsys, attested, attested.attestations, tmp_path / "other.pub.pem")
    assert outcome.code == 1
    assert outcome.out.count("no signature verifies with the given public key") == 10


def test_what_is_not_an_attestation_is_named_not_crashed_on(
    attested: Run, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    directory = _copy(attested, tmp_path)
    bundle = _bundle(directory)
    good = bundle.read_text().splitlines()
    envelope = json.loads(good[0])
    bad = [
        "not json",
        json.dumps({**envelope, "extra": 1}),
        json.dumps({**envelope, "payloadType": "text/plain"}),
        json.dumps({**envelope, "payload": "%%%"}),
        json.dumps({**envelope, "signatures": []}),
        "[" * 10_000 + "]" * 10_000,
    ]
    bundle.write_text("\n".join([*good, *bad]) + "\n")
    key = load_private_key(str(attested.key))
    other = {"_type": "https://in-toto.io/Statement/v1", "predicateType": "x", "subject": []}
    (directory / "broken.provenance.json").write_text(
        json.dumps(sign_envelope(PAYLOAD_TYPE, dumps(other), key))
    )
    outcome = _verify(capsys, attested, directory, attested.public)
    assert outcome.code == 1 and "Traceback" not in outcome.err
    for line in range(len(good) + 1, len(good) + 1 + len(bad)):
        assert f"{bundle.name}:{line}: " in outcome.out
    assert "not a DSSE envelope" in outcome.out
    assert "payloadType is 'text/plain'" in outcome.out
    assert "payload is not base64" in outcome.out
    assert "no signatures" in outcome.out
    assert "broken.provenance.json: predicateType 'x' is not one attest writes" in outcome.out


def test_a_bundle_too_long_for_its_run_is_refused(attested: Run, tmp_path: Path) -> None:
    directory = _copy(attested, tmp_path)
    bundle = _bundle(directory)
    bundle.write_text("{}\n" * 1000)  # 3 tasks: at most 2 * 3 + 16 statements
    _, report = load_report_json(attested.report)
    digest = report_digest(attested.report)
    findings = check_attestations(report, digest, directory, load_public_key(attested.public))
    assert any("more than" in f.message and "statements" in f.message for f in findings)


def test_verify_attestations_needs_both_options_and_readable_input(
    attested: Run, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    report = str(attested.report)
    only = cli(capsys, "verify", report, "--attestations", str(attested.attestations))
    assert only.code == 2 and "go together" in only.err
    (tmp_path / "junk.pem").write_text("junk")
    junk = _verify(capsys, attested, attested.attestations, tmp_path / "junk.pem")
    assert junk.code == 2 and "not a PEM public key" in junk.err
    missing = _verify(capsys, attested, tmp_path / "nowhere", attested.public)
    assert missing.code == 2 and "not a directory" in missing.err


# -- attest's own input ------------------------------------------------------------------


def test_attest_takes_its_key_from_the_environment(
    attested: Run,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SIGNING_KEY", attested.key.read_text())
    out = tmp_path / "from-env"
    made = cli(
        capsys, "attest", str(attested.report), "--key", "env:SIGNING_KEY", "--out", str(out)
    )
    assert made.code == 0, made.err
    assert _verify(capsys, attested, out, attested.public).code == 0
    # Once read, it is gone from the environment the verify's git processes inherit.
    assert "SIGNING_KEY" not in os.environ
    unset = cli(
        capsys, "attest", str(attested.report), "--key", "env:SIGNING_KEY", "--out", str(out)
    )
    assert unset.code == 2 and "SIGNING_KEY is not set" in unset.err


def test_a_report_that_does_not_verify_is_not_signed(
    attested: Run, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    raw = json.loads(attested.report.read_text())
    raw["results"][0]["task_id"] = "someone-else"
    tampered = tmp_path / "report.json"
    tampered.write_text(json.dumps(raw))
    out = tmp_path / "never"
    made = cli(capsys, "attest", str(tampered), "--key", str(attested.key), "--out", str(out))
    assert made.code == 1 and "nothing signed" in made.err
    assert not out.exists()
    (tmp_path / "notes.txt").write_text("hello")
    other = cli(
        capsys, "attest", str(tmp_path / "notes.txt"), "--key", str(attested.key), "--out", str(out)
    )
    assert other.code == 2 and "Traceback" not in other.err


def test_statements_are_a_pure_function_of_the_report(attested: Run) -> None:
    _, report = load_report_json(attested.report)
    digest = report_digest(attested.report)
    first = [(a.task_id, a.kind, dumps(a.statement)) for a in statements_for(report, digest)]
    again = [(a.task_id, a.kind, dumps(a.statement)) for a in statements_for(report, digest)]
    assert first == again
    # The run's own, then each task with a result commit (here all: even the failing task
    # committed what it changed).
    assert first[0][0] == ""
    assert {t for t, _, _ in first} == {"", "tested", "after", "broken"}


def test_the_run_statement_binds_the_report_file(
    attested: Run, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A task dropped from the report, its digests recomputed and its statements removed,
    verifies as a report; the run's statement, whose subject is the report file, names it."""
    from envelopes import seal_report
    from orchestrator.report import aggregate_results, report_bytes

    _, report = load_report_json(attested.report)
    statement = _statement(json.loads((attested.attestations / "run.provenance.json").read_text()))
    assert statement["subject"] == [
        {
            "name": f"{report.run_id}/report.json",
            "digest": {"sha256": _sha256(attested.report)},
        }
    ]
    assert statement["predicate"]["buildDefinition"]["externalParameters"]["tasks"] == [
        "tested",
        "after",
        "broken",
    ]
    # Drop "broken": summary, by-agent and errors recomputed, sealed again, as anyone can.
    rebuilt = aggregate_results(
        [r for r in report.results if r.task_id != "broken"],
        run_id=report.run_id,
        plan_name=report.plan_name,
        plan_sha256=report.plan_sha256,
        repo=report.repo,
        base_ref=report.base_ref,
        base_commit=report.base_commit,
        run_dir=Path(report.run_dir),
        started_at=report.started_at,
        finished_at=report.finished_at,
    ).model_copy(update={"tool": report.tool})
    path = tmp_path / "report.json"
    path.write_bytes(report_bytes(seal_report(rebuilt)))
    assert cli(capsys, "verify", str(path), "--run-dir", str(attested.report.parent)).code == 0
    directory = _copy(attested, tmp_path)
    (directory / "broken.provenance.json").unlink()
    bundle = _bundle(directory)
    lines = [
        line
        for line in bundle.read_text().splitlines()
        if "/broken" not in json.dumps(_statement(json.loads(line)))
    ]
    bundle.write_text("\n".join(lines) + "\n")
    outcome = cli(
        capsys,
        "verify",
        str(path),
        "--run-dir",
        str(attested.report.parent),
        "--repo",
        str(attested.repo),
        "--attestations",
        str(directory),
        "--key",
        str(attested.public),
    )
    assert outcome.code == 1
    assert "run.provenance.json: the provenance statement differs from the report's" in outcome.out
    assert "externalParameters.tasks" in outcome.out


def test_attest_replaces_what_is_at_its_file_names_never_follows_it(
    attested: Run, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    (out / "tested.provenance.json").symlink_to(victim)
    os.mkfifo(out / "after.provenance.json")  # would block an open for writing
    made = cli(
        capsys, "attest", str(attested.report), "--key", str(attested.key), "--out", str(out)
    )
    assert made.code == 0, made.err
    assert victim.read_text() == "keep me\n"
    assert not (out / "tested.provenance.json").is_symlink()
    assert stat.S_ISREG((out / "after.provenance.json").lstat().st_mode)
    assert _verify(capsys, attested, out, attested.public).code == 0


@pytest.mark.parametrize("name", ["", ".", "..", "key.pub", "key.pub.pem", ".pem", "nodir/key"])
def test_keygen_refuses_a_name_that_is_no_keys(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.chdir(tmp_path)
    outcome = cli(capsys, "keygen", "--out", name)
    assert outcome.code == 2 and "Traceback" not in outcome.err
    assert outcome.err.startswith("orchestrator: ")
    assert list(tmp_path.iterdir()) == []


def test_one_good_signature_among_others_is_enough(
    attested: Run, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """DSSE: several signatures are as good as several envelopes; a co-signer's that is not
    ours (or not in the base64 we read) does not spoil ours."""
    directory = _copy(attested, tmp_path)
    path = directory / "tested.provenance.json"
    envelope = json.loads(path.read_text())
    envelope["signatures"] = [
        {"keyid": "other", "sig": "-_-_" * 16},  # URL-safe alphabet
        {"keyid": "other", "sig": base64.b64encode(b"x" * 64).decode()},
        *envelope["signatures"],
    ]
    path.write_text(json.dumps(envelope))
    assert _verify(capsys, attested, directory, attested.public).code == 0


def test_a_line_too_long_is_named_and_the_rest_still_checked(
    attested: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.audit import attest

    monkeypatch.setattr(attest, "MAX_ENVELOPE_BYTES", 64 << 10)
    directory = _copy(attested, tmp_path)
    bundle = _bundle(directory)
    lines = bundle.read_text().splitlines()
    bundle.write_text("\n".join([lines[0], "x" * (200 << 10), "", "", *lines[1:]]) + "\n")
    _, report = load_report_json(attested.report)
    digest = report_digest(attested.report)
    findings = check_attestations(report, digest, directory, load_public_key(attested.public))
    assert [str(f) for f in findings] == [f"{bundle.name}:2: longer than {64 << 10} bytes"]


def test_a_payload_with_a_repeated_key_is_refused(
    attested: Run, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Two parsers could read two different statements from it: neither is taken."""
    directory = _copy(attested, tmp_path)
    path = directory / "after.provenance.json"
    payload = base64.b64decode(json.loads(path.read_text())["payload"])
    doubled = payload[:-1] + b',"predicateType":"https://slsa.dev/provenance/v1"}'
    key = load_private_key(str(attested.key))
    path.write_text(json.dumps(sign_envelope(PAYLOAD_TYPE, doubled, key)))
    outcome = _verify(capsys, attested, directory, attested.public)
    assert outcome.code == 1
    assert "after.provenance.json: duplicate key 'predicateType'" in outcome.out


def test_attestations_of_a_report_that_does_not_verify_are_not_checked(
    attested: Run, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    raw = json.loads(attested.report.read_text())
    raw["results"][1]["depends_on"] = ["no-such-task"]
    tampered = tmp_path / "report.json"
    tampered.write_bytes(report_layout(raw))
    outcome = cli(
        capsys,
        "verify",
        str(tampered),
        "--run-dir",
        str(attested.report.parent),
        "--attestations",
        str(attested.attestations),
        "--key",
        str(attested.public),
    )
    assert outcome.code == 1 and "Traceback" not in outcome.err
    assert "attestations: not checked: the report does not verify" in outcome.out
