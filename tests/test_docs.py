"""The examples in docs/*.md stay true: runnable code runs, plans parse, plan errors match.

Conventions in the Markdown files (an HTML comment on the line right before a fence):

- ``<!-- run -->`` before a ```python block: the block is a complete program. It is run with
  this interpreter in an empty temporary directory, against this checkout, and must exit 0.
- ``<!-- run: report -->`` before a ```python block: the same, with the path of a fresh report
  as its only argument; it must exit 0 on that report and non-zero once the report is tampered
  with.
- ``<!-- run: webhook -->`` before a ```python block: the block defines ``signed(body,
  signature, secret)``, a webhook receiver's check of ``X-Orchestrator-Signature``; it must
  accept the orchestrator's signature of a body and refuse a changed body or another secret
  (tests/test_notify.py's server checks real deliveries with it too).
- Every ```yaml block with a top-level ``tasks:`` key is a full plan and must pass
  ``parse_plan``, unless it is marked ``<!-- invalid-plan: NAME -->``: then it must fail, and
  the problems must be exactly the lines of the next ```text block that starts with
  ``$ orchestrator validate NAME``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import (
    REPORT_SCHEMA_V1,
    HandoffEnvelope,
    Report,
    build_envelope,
    digest_without,
    report_layout,
)
from orchestrator import PlanError, Workspace, orchestrate_parallel
from orchestrator.plan import parse_plan

from .conftest import MakeRepo

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MARKER = re.compile(r"^<!--\s*(.+?)\s*-->$")


@dataclass(frozen=True)
class Block:
    """A fenced code block of a doc, with the marker comment right before it, if any."""

    doc: str
    line: int
    lang: str
    marker: str | None
    text: str

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def read_blocks() -> list[Block]:
    blocks: list[Block] = []
    for path in sorted(DOCS.glob("*.md")):
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            if lines[i].startswith("```") and lines[i] != "```":
                lang = lines[i][3:].strip()
                found = MARKER.match(lines[i - 1].strip()) if i else None
                end = lines.index("```", i + 1)
                text = "\n".join(lines[i + 1 : end]) + "\n"
                blocks.append(
                    Block(path.name, i + 1, lang, found.group(1) if found else None, text)
                )
                i = end
            i += 1
    return blocks


BLOCKS = read_blocks()
RUNNABLE = [b for b in BLOCKS if b.lang == "python" and b.marker == "run"]
REPORT_SNIPPETS = [b for b in BLOCKS if b.lang == "python" and b.marker == "run: report"]
WEBHOOK_SNIPPETS = [b for b in BLOCKS if b.lang == "python" and b.marker == "run: webhook"]
ATTESTATION_SNIPPETS = [b for b in BLOCKS if b.lang == "python" and b.marker == "run: attestations"]
PLANS = [
    b
    for b in BLOCKS
    if b.lang == "yaml" and re.search(r"^tasks:", b.text, re.M) and b.marker is None
]
INVALID_PLANS = [b for b in BLOCKS if b.marker and b.marker.startswith("invalid-plan:")]


def test_examples_are_found() -> None:
    docs = {p.name for p in DOCS.glob("*.md")}
    assert {"plan-format.md", "report-format.md", "cli.md", "library.md", "architecture.md"} <= docs
    assert len(RUNNABLE) >= 3
    assert len(REPORT_SNIPPETS) == 1
    assert len(WEBHOOK_SNIPPETS) == 1
    assert len(ATTESTATION_SNIPPETS) == 1
    assert PLANS and len(INVALID_PLANS) >= 2
    unknown = {b.marker for b in BLOCKS if b.marker} - {
        "run",
        "run: report",
        "run: webhook",
        "run: attestations",
    }
    assert all(m.startswith("invalid-plan:") for m in unknown), unknown


def run_python(source: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run *source* as a script with this interpreter, importing this checkout's packages."""
    script = cwd / "snippet.py"
    script.write_text(source, encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_runnable_python_blocks(block: Block, tmp_path: Path) -> None:
    result = run_python(block.text, tmp_path)
    assert result.returncode == 0, f"{block.id} failed:\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("block", PLANS, ids=lambda b: b.id)
def test_full_plans_parse(block: Block) -> None:
    loaded = parse_plan(block.text, file=block.id)
    assert loaded.plan.tasks


def expected_problems(block: Block, name: str) -> list[str]:
    """The lines of the first ```text block after *block* that shows ``validate NAME``."""
    command = f"$ orchestrator validate {name}"
    for later in BLOCKS:
        if later.doc == block.doc and later.line > block.line and later.lang == "text":
            lines = later.text.splitlines()
            if lines and lines[0] == command:
                return lines[1:]
    raise AssertionError(f"{block.id}: no ```text block starting with {command!r}")


@pytest.mark.parametrize("block", INVALID_PLANS, ids=lambda b: b.id)
def test_invalid_plans_give_the_documented_problems(block: Block) -> None:
    assert block.marker is not None
    name = block.marker.removeprefix("invalid-plan:").strip()
    with pytest.raises(PlanError) as caught:
        parse_plan(block.text, file=name)
    assert [str(issue) for issue in caught.value.issues] == expected_problems(block, name)


def fresh_report(repo: Path) -> Path:
    """A real report: a callable agent with non-ASCII output and a command agent."""

    async def greet(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
        assert workspace.path is not None
        await anyio.Path(workspace.path / "greeting.txt").write_text("grüß dich\n")
        return {"text": "grüß dich", "n": 1.5}

    command = [sys.executable, "-c", "open('made.txt', 'w').write('made')"]
    envelopes = [
        build_envelope("greet", "Greet", task_id="greet", venv=False),
        build_envelope("make", "Make a file", task_id="make", venv=False),
    ]

    async def main() -> Report:
        return await orchestrate_parallel(
            envelopes, repo=repo, agents={"greet": greet, "make": command}
        )

    report: Report = anyio.run(main)
    assert report.summary.successful == 2, report.errors
    return Path(report.run_dir) / "report.json"


def test_report_sha256_snippet(make_repo: MakeRepo, tmp_path: Path) -> None:
    (block,) = REPORT_SNIPPETS
    assert len(block.text.splitlines()) <= 11
    path = fresh_report(make_repo())
    ok = run_python(block.text, tmp_path, str(path))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip() == "report_sha256 OK"

    raw = json.loads(path.read_text(encoding="utf-8"))
    raw["results"][0]["output"]["text"] = "grüß euch"
    tampered = tmp_path / "tampered.json"
    tampered.write_bytes(report_layout(raw))
    bad = run_python(block.text, tmp_path, str(tampered))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "MISMATCH" in bad.stdout
    # A version 1 report, sealed over every byte, checks out too.
    old = json.loads(path.read_text(encoding="utf-8"))
    old["schema"] = REPORT_SCHEMA_V1
    old["report_sha256"] = digest_without(old, "report_sha256")
    (tmp_path / "v1.json").write_bytes(report_layout(old))
    ok = run_python(block.text, tmp_path, str(tmp_path / "v1.json"))
    assert (ok.returncode, ok.stdout.strip()) == (0, "report_sha256 OK"), ok.stderr


def webhook_check() -> Callable[[bytes, str, str], bool]:
    """The docs' ``signed(body, signature, secret)``, defined by running its block."""
    (block,) = WEBHOOK_SNIPPETS
    namespace: dict[str, Any] = {}
    exec(compile(block.text, block.id, "exec"), namespace)
    check: Callable[[bytes, str, str], bool] = namespace["signed"]
    return check


def test_webhook_signature_snippet() -> None:
    from orchestrator.notify import signature

    (block,) = WEBHOOK_SNIPPETS
    assert len([line for line in block.text.splitlines() if line.strip()]) <= 5
    signed = webhook_check()
    body = b'{"type":"run_finished","run_id":"r","gr\xc3\xbc\xc3\x9f":1}'
    header = signature(b"s3cret", body)
    assert signed(body, header, "s3cret")
    assert not signed(body.replace(b"1", b"2"), header, "s3cret")
    assert not signed(body, header, "another")
    assert not signed(body, header.removeprefix("sha256="), "s3cret")


def test_attestation_check_snippet(make_repo: MakeRepo, tmp_path: Path) -> None:
    """docs/audit.md's check of a bundle with other in-toto tooling: it accepts what
    ``attest`` wrote and refuses a bundle with a changed byte."""
    from orchestrator.cli import main

    (block,) = ATTESTATION_SNIPPETS
    path = fresh_report(make_repo())
    assert main(["keygen", "--out", str(tmp_path / "key")]) == 0
    out = tmp_path / "attestations"
    assert main(["attest", str(path), "--key", str(tmp_path / "key.pem"), "--out", str(out)]) == 0
    (bundle,) = out.glob("*.intoto.jsonl")
    ok = run_python(block.text, tmp_path, str(bundle), str(tmp_path / "key.pub.pem"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count("https://slsa.dev/provenance/v1") == 3  # two tasks and the run
    lines = bundle.read_text().splitlines()
    envelope = json.loads(lines[0])
    payload = envelope["payload"]
    middle = len(payload) // 2  # one base64 character of the statement, changed
    changed = "A" if payload[middle] != "A" else "B"
    envelope["payload"] = payload[:middle] + changed + payload[middle + 1 :]
    bundle.write_text("\n".join([json.dumps(envelope), *lines[1:]]) + "\n")
    bad = run_python(block.text, tmp_path, str(bundle), str(tmp_path / "key.pub.pem"))
    assert bad.returncode != 0
    assert "VerificationError" in bad.stderr
