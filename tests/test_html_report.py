"""The HTML page of a report: the facts it gathers (one git process, log tails read safely),
what it embeds and escapes, its policy, its size at 1,000 tasks, and the page itself in a
real browser (Chromium, through Playwright), opened from disk."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from envelopes import (
    AgentInfo,
    AgentSummary,
    Attempt,
    CheckResult,
    ErrorInfo,
    GroupMember,
    GroupReport,
    HandoffEnvelope,
    LogFile,
    PhaseSpan,
    Provenance,
    Report,
    Summary,
    TaskResult,
    TaskStatus,
    Timings,
    Usage,
    UsageTotals,
    report_layout,
)
from orchestrator import Repository, Workspace, orchestrate_parallel
from orchestrator.audit.html import LOG_BYTES, LOG_LINES, page_facts, render_html

from .conftest import MakeRepo

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "orchestrator" / "audit" / "templates"

PAYLOADS = [
    '<img src=x onerror="window.__pwned=1">',
    "</script><script>window.__pwned=1</script>",
    '"><svg onload=window.__pwned=1>',
    "javascript:window.__pwned=1",
]
PAYLOAD = " ".join(PAYLOADS)

NOISY = f"""
import json, os, sys
PAYLOAD = {PAYLOAD!r}
for i in range(60):
    print("out", i, PAYLOAD)
    print("err", i, PAYLOAD, file=sys.stderr)
with open("noisy.txt", "w") as f:
    f.write("a\\nb\\nc\\n")
with open("blob.bin", "wb") as f:
    f.write(bytes(range(256)))
with open(os.environ["ORCHESTRATOR_OUTPUT"], "w") as f:
    json.dump({{"said": PAYLOAD, "link": "javascript:alert(1)"}}, f)
"""


async def write(envelope: HandoffEnvelope, workspace: Workspace) -> dict[str, Any]:
    """A callable agent: fails with the payload (task ``fail``), or when ``inputs.n`` is 1;
    otherwise writes a 3-line file named after its task (``n`` 2: a moment later)."""
    if envelope.task == "fail":
        raise RuntimeError(PAYLOAD)
    if envelope.inputs.get("n") == 1:
        raise RuntimeError("one gives up")
    if envelope.inputs.get("n") == 2:
        await anyio.sleep(0.3)  # after its sibling failed: first_success cancels no one
    assert workspace.path is not None
    name = envelope.task_id.replace("[", "-").replace("]", "")
    (workspace.path / f"{name}.txt").write_text("one\ntwo\nthree\n")
    return {"done": True}


@dataclass
class Audited:
    repo: Path
    report: Report


def audited_run(make_repo: MakeRepo, write_agent: Callable[[str, str], Path]) -> Audited:
    """A run with a bit of everything: a success, a failure whose message is the payload, a
    command agent whose logs and output hold it, a matrix group, dependencies (on a task, on
    a group, on a failure: skipped), checks, and the plan's merge (a train) at the end."""
    repo = make_repo()
    script = write_agent("noisy", NOISY)
    checks = [
        {"name": "tests", "run": [sys.executable, "-c", "pass"]},
        {"name": "lint", "run": [sys.executable, "-c", "raise SystemExit(3)"], "required": False},
    ]
    plan = {
        "name": "<script>window.__pwned=1</script>",
        "defaults": {"venv": False, "checks": checks},
        "merge": {"into": "main", "train": True},
        "tasks": [
            {"id": "good", "agent": "w", "task": "write"},
            {"id": "bad", "agent": "w", "task": "fail"},
            {"id": "noisy", "agent": "py", "task": "talk"},
            {
                "id": "impl",
                "agent": "w",
                "task": "write",
                "matrix": {"inputs.n": [1, 2]},
                "select": "first_success",
            },
            {"id": "after", "agent": "w", "task": "write", "depends_on": ["good", "impl"]},
            {"id": "never", "agent": "w", "task": "write", "depends_on": ["bad"]},
        ],
    }
    report: Report = anyio.run(
        lambda: orchestrate_parallel(
            plan, repo=repo, agents={"w": write, "py": [sys.executable, str(script)]}
        )
    )
    return Audited(repo, report)


def facts_of(audited: Audited, *, repo: bool = True, run_dir: bool = True) -> Any:
    async def gather() -> Any:
        repository = await Repository.open(audited.repo) if repo else None
        where = Path(audited.report.run_dir) if run_dir else None
        return await page_facts(audited.report, repo=repository, run_dir=where)

    return anyio.run(gather)


def embedded(page: str) -> dict[str, Any]:
    """The JSON data block of *page*, parsed."""
    found = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page)
    assert found is not None
    data: dict[str, Any] = json.loads(found.group(1))
    return data


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, attrs))


def elements(page: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """Every start tag of *page* with its attributes, as an HTML parser reads them."""
    parser = _Elements()
    parser.feed(page)
    parser.close()
    return parser.found


def scripts(page: str) -> list[str]:
    """The text of every script element of *page* that runs (not a data block)."""
    return re.findall(r"<script>(.*?)</script>", page, re.DOTALL)


def task(data: dict[str, Any], task_id: str) -> dict[str, Any]:
    found: dict[str, Any] = next(t for t in data["tasks"] if t["id"] == task_id)
    return found


def test_facts_come_from_two_git_processes_and_the_logs_tails(
    make_repo: MakeRepo,
    write_agent: Callable[[str, str], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    audited = audited_run(make_repo, write_agent)
    spawned: list[list[str]] = []

    class Counting(subprocess.Popen):  # type: ignore[type-arg]
        """Every process started, however (asyncio's and the git runner's threads alike)."""

        def __init__(self, args: Any, *more: Any, **options: Any) -> None:
            spawned.append(list(args))
            super().__init__(args, *more, **options)

    monkeypatch.setattr(subprocess, "Popen", Counting)

    async def gather() -> tuple[Any, int]:
        repository = await Repository.open(audited.repo)
        before, spawned[:] = repository.git.calls, []
        facts = await page_facts(
            audited.report, repo=repository, run_dir=Path(audited.report.run_dir)
        )
        return facts, repository.git.calls - before

    facts, calls = anyio.run(gather)
    # One lookup of which ids are commits, one diff-tree for every task: whatever their number.
    assert calls == 2 and len(spawned) == 2, spawned
    assert "cat-file" in spawned[0] and "diff-tree" in spawned[1], spawned
    good = facts.diffstats["good"]
    assert [(f.path, f.added, f.deleted) for f in good.files] == [("good.txt", 3, 0)]
    assert (good.count, good.added, good.deleted, good.binary) == (1, 3, 0, 0)
    noisy = facts.diffstats["noisy"]
    assert [(f.path, f.added, f.deleted) for f in noisy.files] == [
        ("blob.bin", None, None),
        ("noisy.txt", 3, 0),
    ]
    assert (noisy.added, noisy.binary) == (3, 1)
    # after started from good's and impl[2]'s results: only its own file is its change.
    assert [f.path for f in facts.diffstats["after"].files] == ["after.txt"]
    assert "never" not in facts.diffstats  # it never ran: no commits to compare
    # The last 40 lines of each log of the noisy task, read from its tail.
    logs = facts.logs["noisy"]
    assert logs["stdout"].lines[-1] == f"out 59 {PAYLOAD}" and len(logs["stdout"].lines) == 40
    assert logs["stderr"].lines[0] == f"err 20 {PAYLOAD}" and logs["stderr"].cut
    assert logs["stdout"].path.startswith("logs/")
    assert set(facts.logs) == {"noisy"}  # callable agents write no logs
    assert facts.diffstats_note is None and facts.logs_note is None

    without = facts_of(audited, repo=False, run_dir=False)
    assert (without.diffstats, without.logs) == ({}, {})
    assert without.diffstats_note == "no repository given"
    page = render_html(audited.report, verified=None, facts=without)
    data = embedded(page)
    assert task(data, "good")["files"] is None and task(data, "noisy")["logs"] == {}
    assert data["notes"] == {"files": "no repository given", "logs": "no run directory given"}
    with_facts = embedded(render_html(audited.report, verified=None, facts=facts))
    assert task(with_facts, "good")["files"] == {
        "n": 1,
        "add": 3,
        "del": 0,
        "bin": 0,
        "more": 0,
        "list": [["good.txt", 3, 0]],
    }
    assert task(with_facts, "noisy")["logs"]["stderr"]["lines"][-1] == f"err 59 {PAYLOAD}"


def test_what_cannot_be_read_is_left_out_never_raised(
    make_repo: MakeRepo, write_agent: Callable[[str, str], Path], tmp_path: Path
) -> None:
    audited = audited_run(make_repo, write_agent)
    run_dir = Path(audited.report.run_dir)
    noisy = audited.report.result("noisy").attempt_log[-1]
    assert noisy.stdout is not None and noisy.stderr is not None
    # A log turned into a link to a file outside the run directory, and a huge log.
    secret = tmp_path / "secret.txt"
    secret.write_text("secret\n")
    (run_dir / noisy.stdout.path).unlink()
    (run_dir / noisy.stdout.path).symlink_to(secret)
    with (run_dir / noisy.stderr.path).open("w") as f:
        for i in range(200_000):
            f.write(f"{i} {'x' * 40}\n")
    # Another repository: none of the run's commits are in it. (Made with the same files
    # in the same second, its first commit would be the run's base: the content differs.)
    elsewhere = make_repo(extra={"elsewhere.txt": "another history\n"})
    facts = facts_of(Audited(elsewhere, audited.report))
    assert facts.diffstats == {} and facts.diffstats_note is None
    # Neither the link nor the changed log is the file the report recorded: neither is shown.
    assert "noisy" not in facts.logs
    # A huge log that is the one recorded: only its tail is read and shown.
    from orchestrator.audit.facts import _tail

    data = (run_dir / noisy.stderr.path).read_bytes()
    recorded = LogFile(
        path=noisy.stderr.path, sha256=hashlib.sha256(data).hexdigest(), size=len(data)
    )
    tail = _tail(run_dir, recorded, LOG_BYTES)
    assert tail is not None
    assert tail.cut and len(tail.lines) == LOG_LINES and tail.size > 8_000_000
    assert tail.lines[-1] == f"199999 {'x' * 40}"
    assert sum(len(line) + 1 for line in tail.lines) <= LOG_BYTES
    # A repository git cannot read at all; a run directory that is gone.
    broken = make_repo()
    repository = anyio.run(Repository.open, broken)
    shutil.rmtree(broken / ".git" / "objects")
    gone = anyio.run(
        lambda: page_facts(audited.report, repo=repository, run_dir=tmp_path / "nowhere")
    )
    assert gone.diffstats == {} and gone.logs == {}
    assert gone.diffstats_note == "git could not compare the commits"
    page = render_html(audited.report, verified=None, facts=gone)
    assert embedded(page)["notes"]["files"] == "git could not compare the commits"


def test_hostile_text_is_escaped_and_never_raw(
    make_repo: MakeRepo, write_agent: Callable[[str, str], Path]
) -> None:
    audited = audited_run(make_repo, write_agent)
    facts = facts_of(audited)
    page = render_html(audited.report, verified='OK <b onclick="x()">bold</b>', facts=facts)
    for payload in [*PAYLOADS[:3], "<script>window.__pwned=1</script>", "<b onclick"]:
        assert payload not in page
    # As the browser parses it: no handler, no link but the icon's, no script but the two.
    found = elements(page)
    assert not [a for _, attrs in found for a, _ in attrs if a.startswith("on")]
    assert [v for _, attrs in found for a, v in attrs if a in ("href", "src", "action")] == [
        "data:,"
    ]
    tags = [tag for tag, _ in found]
    assert tags.count("script") == 2
    assert not {"img", "iframe", "object", "embed", "base", "form"} & set(tags)
    # Shown as text where the page writes it itself: the plan's name, the verify line.
    assert "<title>Run " in page and "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in page
    assert "OK &lt;b onclick=&#34;x()&#34;&gt;bold&lt;/b&gt;" in page
    # In the data block: no <, > or & at all, and every payload intact once parsed.
    block = re.search(r'id="report-data">(.*?)</script>', page, re.DOTALL)
    assert block is not None and not set("<>&") & set(block.group(1))
    data = embedded(page)
    bad, noisy = task(data, "bad"), task(data, "noisy")
    assert bad["err"] == ["agent_exception", f"RuntimeError: {PAYLOAD}"]
    assert json.loads(noisy["output"])["said"] == PAYLOAD
    assert f"out 59 {PAYLOAD}" in noisy["logs"]["stdout"]["lines"]
    # The one place a payload reaches the server side's markup: an error in a group card.
    assert "impl[1]" in page and "agent_exception: RuntimeError: one gives up" in page
    # Line separators would end a line of script in older parsers: escaped too.
    odd = render_html(
        audited.report.model_copy(update={"plan_name": "a\u2028b\u2029c"}), verified=None
    )
    assert "\u2028" not in embedded_text(odd) and "\u2029" not in embedded_text(odd)


def embedded_text(page: str) -> str:
    block = re.search(r'id="report-data">(.*?)</script>', page, re.DOTALL)
    assert block is not None
    return block.group(1)


def test_the_policy_lets_only_the_inline_script_and_style_run(
    make_repo: MakeRepo, write_agent: Callable[[str, str], Path]
) -> None:
    audited = audited_run(make_repo, write_agent)
    page = render_html(audited.report, verified="OK")
    (policy,) = [
        dict(attrs)["content"]
        for tag, attrs in elements(page)
        if tag == "meta" and dict(attrs).get("http-equiv") == "Content-Security-Policy"
    ]
    assert policy is not None
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    (script,) = scripts(page)
    styles = re.findall(r"<style>(.*?)</style>", page, re.DOTALL)
    assert len(styles) == 1

    def sha(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    assert directives == {
        "default-src": "'none'",
        "style-src": sha(styles[0]),
        "script-src": sha(script),
        "img-src": "data:",
        "base-uri": "'none'",
        "form-action": "'none'",
    }
    assert script == (TEMPLATES / "report.js").read_text()
    # The policy comes before anything it governs.
    assert page.index("Content-Security-Policy") < page.index("<style>") < page.index("<script")
    assert "style=" not in page  # an inline style attribute would be refused by the policy


def test_nothing_is_loaded_from_the_network(
    make_repo: MakeRepo, write_agent: Callable[[str, str], Path]
) -> None:
    audited = audited_run(make_repo, write_agent)
    page = render_html(audited.report, verified=None, facts=facts_of(audited))
    # The SVG namespace is a name, never fetched; no other URL is in the page.
    assert set(re.findall(r"https?://[^\s\"'<>)]+", page)) == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"\b(?:src|href|action|poster|srcset)\s*=\s*[\"']?\s*(?:https?:)?//", page)
    assert re.findall(r"\bhref=\"([^\"]*)\"", page) == ["data:,"]
    assert set(re.findall(r"url\(([^)]*)\)", page)) == {"#hatch"}
    assert "@import" not in page and "@font-face" not in page


def test_the_script_builds_nodes_without_markup() -> None:
    js = (TEMPLATES / "report.js").read_text()
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "createContextualFragment",
        "DOMParser",
        "srcdoc",
        "eval(",
        "Function(",
        "setAttributeNS",
        ".href",
        ".src",
        "location",
        "window.open",
        "import(",
        "fetch(",
        "XMLHttpRequest",
    ):
        assert sink not in js, sink
    # Attributes are set in one place, and only those of a fixed list of names.
    calls = re.findall(r"setAttribute\(([^,]*),", js)
    assert calls == ["name"], calls
    assert "if (!SAFE_ATTRS.has(name)) throw" in js
    assert re.search(r"setTimeout\(\s*[\"'`]", js) is None  # never a string of code


# ---- 1,000 tasks, built in code ----

LONG_ID = "x" * 64 + "[" + ",".join(["v" * 32] * 4 + ["vv"]) + "]"


def synthetic_report(n: int = 1000, *, repo: str = "/work/repo") -> Report:
    """*n* results as a big run's: 8 slots, 4 agents, phases, queues, checks, failures,
    skipped tasks that never started, cached ones without a slot, dependencies, a group, and
    one task with the longest id."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def at(seconds: float) -> datetime:
        return t0 + timedelta(seconds=seconds)

    results = []
    for i in range(n):
        task_id = LONG_ID if i == 7 else f"task-{i:04d}"
        status: TaskStatus = (
            "skipped"
            if i % 37 == 5
            else "cached"
            if i % 53 == 6
            else "failed"
            if i % 10 == 3
            else "succeeded"
        )
        start = (i // 8) * 10.0
        never = status in ("skipped", "cached")
        spans = [("worktree", 0, 0.5), ("venv", 0.5, 1.5), ("agent", 1.5, 6), ("checks", 6, 7)]
        spans += [("commit", 7, 7.5), ("cleanup", 7.5, 8)]
        phases = [
            PhaseSpan.model_validate({"name": n, "start_s": a, "end_s": b}) for n, a, b in spans
        ]
        timings = Timings(
            started_at=at(start),
            finished_at=at(start if never else start + 8),
            duration_s=0 if never else 8,
            queued_at=None if never else at(max(0, start - i % 5)),
            slot=None if never else i % 8,
            phases=[] if never else phases,
        )
        check = CheckResult(
            name="tests",
            phase="check",
            turn=1,
            command=["pytest", "-q"],
            exit_code=0,
            passed=True,
            required=True,
            duration_s=1.0,
        )
        results.append(
            TaskResult(
                task_id=task_id,
                agent=f"agent-{i % 4}",
                status=status,
                attempts=0 if never else 1,
                output=None if never else {"summary": f"did task {i}"},
                error=ErrorInfo(kind="exit_code", message=f"exited with code 1: <b>{i}</b>")
                if status == "failed"
                else None,
                timings=timings,
                usage=None
                if never
                else Usage(input_tokens=900, output_tokens=300, total_tokens=1200, cost_usd=0.012),
                branch=None if never else f"orchestrator/20260101-000000-abcdef/task-{i:04d}",
                attempt_log=[]
                if never
                else [
                    Attempt(
                        number=1,
                        status=status,
                        started_at=at(start),
                        finished_at=at(start + 8),
                        duration_s=8,
                        stdout=LogFile(path=f"logs/task-{i:04d}.stdout", sha256="2" * 64, size=9),
                    )
                ],
                checks=[] if never else [check],
                group="grid" if 100 <= i < 104 else None,
                depends_on=[f"task-{i - 8:04d}"] if i >= 8 and i % 3 == 0 else [],
                provenance=Provenance(
                    envelope_sha256="a" * 64,
                    base_commit="b" * 40,
                    result_commit=None if never else "c" * 40,
                    result_tree=None if never else "d" * 40,
                    env_sha256="e" * 64,
                    agent=AgentInfo(kind="command", command=["agent"], program="/usr/bin/agent"),
                    agent_sha256="f" * 64,
                    output_sha256="0" * 64,
                    result_sha256="1" * 64,
                ),
            )
        )
    by_agent = {}
    for name in sorted({r.agent for r in results}):
        mine = [r for r in results if r.agent == name]
        by_agent[name] = AgentSummary(
            total=len(mine),
            successful=sum(r.succeeded for r in mine),
            failed=sum(r.status == "failed" for r in mine),
            timeout=0,
            cancelled=0,
            skipped=sum(r.status == "skipped" for r in mine),
            cached=sum(r.status == "cached" for r in mine),
            task_ids=[r.task_id for r in mine],
        )
    return Report(
        run_id="20260101-000000-abcdef",
        plan_name="big",
        plan_sha256="3" * 64,
        repo=repo,
        base_ref="main",
        base_commit="b" * 40,
        run_dir=f"{repo}/.git/orchestrator/runs/20260101-000000-abcdef",
        started_at=t0,
        finished_at=at((n // 8) * 10.0 + 8),
        summary=Summary(
            total_tasks=n,
            successful=sum(r.succeeded for r in results),
            failed=sum(r.status == "failed" for r in results),
            timeout=0,
            cancelled=0,
            skipped=sum(r.status == "skipped" for r in results),
            cached=sum(r.status == "cached" for r in results),
            success_rate=0.9,
            total_execution_time=8.0 * n,
        ),
        results=results,
        results_by_agent=by_agent,
        errors=[],
        groups={
            "grid": GroupReport(
                select="all",
                members=[GroupMember(task_id=r.task_id, status=r.status) for r in results[100:104]],
                selected=[r.task_id for r in results[100:104]],
            )
        },
    )


def test_a_thousand_tasks_make_a_page_under_3_mb() -> None:
    assert len(LONG_ID) == 200
    report = synthetic_report()
    page = render_html(report, verified="OK, 900 commit(s) checked, every digest recomputed")
    size = len(page.encode())
    print(f"\n1,000-task page: {size:,} bytes")
    assert size < 3_000_000
    data = embedded(page)
    assert len(data["tasks"]) == 1000 and data["tasks"][7]["id"] == LONG_ID
    assert "<b>13</b>" not in page and task(data, "task-0013")["err"][1].endswith("<b>13</b>")


def test_the_checkout_command_is_quoted_for_a_shell() -> None:
    report = synthetic_report(12, repo="/tmp/my repo; rm -rf ~")
    data = embedded(render_html(report, verified=None))
    branch = "orchestrator/20260101-000000-abcdef/task-0000"
    assert shlex.split(task(data, "task-0000")["checkout"]) == [
        "git",
        "-C",
        "/tmp/my repo; rm -rf ~",
        "worktree",
        "add",
        "--",
        "/tmp/my repo; rm -rf ~-review-task-0000",
        branch,
    ]
    assert task(data, "task-0005")["checkout"] is None  # skipped: no branch


def test_a_pasted_checkout_command_cannot_do_other_than_it_shows() -> None:
    """Ctrl-U and a newline in the report's repository path would erase the command in a
    shell and run another: no command is offered for such a path, or for one the auditor did
    not name that holds bidirectional overrides; the auditor's own path is used when given."""
    for repo in ["/home/me/project\x15touch PWNED\n", "/srv/\u202erepo", "/a\x1b[201~b"]:
        data = embedded(render_html(synthetic_report(3, repo=repo), verified=None))
        assert task(data, "task-0000")["checkout"] is None, repo
    mine = embedded(
        render_html(synthetic_report(3, repo="/x\x15y"), verified=None, repo="/home/me/repo")
    )
    assert shlex.split(task(mine, "task-0000")["checkout"])[:3] == ["git", "-C", "/home/me/repo"]


def test_text_that_would_reorder_the_page_is_shown_as_code_points() -> None:
    report = synthetic_report(3, repo="/srv/\u202egpj.exe")
    page = render_html(report, verified="OK \u2066hidden\u2069")
    for char in ("\u202e", "\u2066", "\u2069"):
        assert char not in page
    assert "&lt;U+202E&gt;gpj.exe" in page  # the header, escaped after being made visible
    assert "OK &lt;U+2066&gt;hidden&lt;U+2069&gt;" in page


def test_dates_at_the_ends_of_the_calendar_render() -> None:
    from datetime import timezone

    report = synthetic_report(2)
    early = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5)))
    first = report.results[0]
    odd = first.model_copy(
        update={"timings": first.timings.model_copy(update={"queued_at": early})}
    )
    page = render_html(
        report.model_copy(update={"results": [odd, *report.results[1:]]}), verified=None
    )
    assert "<!DOCTYPE html>" in page


def test_spending_and_warnings_are_shown_as_text() -> None:
    report = synthetic_report(20)
    spent = UsageTotals(tasks=3, input_tokens=1500, output_tokens=500, total_tokens=2000)
    summary = report.summary.model_copy(
        update={"usage": spent.model_copy(update={"cost_usd": 1.5})}
    )
    report = report.model_copy(
        update={
            "summary": summary,
            "usage_by_model": {PAYLOADS[0]: spent},
            "warnings": [f"branch moved: {PAYLOADS[1]}"],
        }
    )
    page = render_html(report, verified=None)
    assert "Spent: 2,000 tokens, $1.5000" in page
    assert "<td>&lt;img src=x onerror=&#34;window.__pwned=1&#34;&gt;</td>" in page
    assert '<td class="num">1,500</td>' in page
    assert (
        "<li>branch moved: &lt;/script&gt;&lt;script&gt;window.__pwned=1&lt;/script&gt;</li>"
        in page
    )
    assert "<strong>Not verified</strong> when this page was made." in page
    assert PAYLOADS[0] not in page and PAYLOADS[1] not in page


def test_a_report_naming_someone_elses_file_as_a_log_shows_nothing_of_it(
    make_repo: MakeRepo,
    write_agent: Callable[[str, str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A hostile report points its run directory at a home and a log at a private key:
    ``report --html`` must not copy the key into a page someone will publish. Its author
    cannot know the key's digest, so the file is not the one recorded, and is not shown."""
    from orchestrator.cli import main

    audited = audited_run(make_repo, write_agent)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nSECRET\n")
    raw = json.loads((Path(audited.report.run_dir) / "report.json").read_text())
    raw["run_dir"] = str(home)
    last = raw["results"][0]["attempt_log"][-1]
    last["stdout"] = {"path": ".ssh/id_ed25519", "sha256": "0" * 64, "size": 44}
    hostile = tmp_path / "hostile.json"
    hostile.write_bytes(report_layout(raw))
    page = tmp_path / "page.html"
    assert main(["report", str(hostile), "--html", str(page)]) == 0
    capsys.readouterr()
    text = page.read_text()
    assert "SECRET" not in text and "PRIVATE KEY" not in text
    assert "finding(s)" in text  # and the page says the report did not verify


# ---- in a browser ----


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Chromium, once for the module; skipped when it or Playwright is missing, unless
    ORCHESTRATOR_REQUIRE_BROWSER=1 (CI) says the tests must run."""
    required = os.environ.get("ORCHESTRATOR_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("playwright is not installed (pip install playwright)")
    if not CHROMIUM.exists():
        if required:
            pytest.fail(f"ORCHESTRATOR_REQUIRE_BROWSER=1 but there is no {CHROMIUM}")
        pytest.skip(f"no Chromium at {CHROMIUM}")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


def open_page(browser: Browser, path: Path, *, width: int = 1280) -> tuple[Page, list[str]]:
    """*path* opened from disk, ready; and the list that collects what went wrong in it:
    console errors, page errors, and any request other than the file itself."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    url = path.as_uri()
    problems: list[str] = []
    page.on(
        "console",
        lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: problems.append(f"request {r.url}") if r.url != url else None)
    page.goto(url)
    page.wait_for_selector("html[data-ready='1']", timeout=30_000)
    return page, problems


def shown_ids(page: Page) -> list[str]:
    ids: list[str] = page.eval_on_selector_all(
        "#task-rows tr:not([hidden])", "rows => rows.map(r => r.cells[0].textContent)"
    )
    return ids


def artifacts() -> Path:
    where = Path(os.environ.get("ORCHESTRATOR_TEST_ARTIFACTS", str(ROOT / ".artifacts")))
    where.mkdir(parents=True, exist_ok=True)
    return where


def test_the_page_works_in_a_browser_and_runs_no_payload(
    browser: Browser,
    make_repo: MakeRepo,
    write_agent: Callable[[str, str], Path],
    tmp_path: Path,
) -> None:
    # Playwright's sync API keeps an event loop running in this thread: the run goes elsewhere.
    with ThreadPoolExecutor(1) as pool:
        audited = pool.submit(audited_run, make_repo, write_agent).result()
        facts = pool.submit(facts_of, audited).result()
    path = tmp_path / "report.html"
    path.write_text(render_html(audited.report, verified="OK", facts=facts))
    ids = [r.task_id for r in audited.report.results]
    index = {task_id: i for i, task_id in enumerate(ids)}
    page, problems = open_page(browser, path)

    shot = artifacts() / "report-page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")
    assert shown_ids(page) == ids
    assert page.locator("#tl-chart g.bar").count() == len(ids) == 7
    assert page.locator("#tl-chart path.marker").count() == 1  # never: it never started
    # Filters: by status, by agent, by text; the timeline follows the table.
    for box in page.locator('#f-status input[name="status"]').all():
        if box.get_attribute("value") != "failed":
            box.uncheck()
    assert shown_ids(page) == ["bad", "impl[1]"]
    assert page.locator("#tl-chart g.bar").count() == 2
    page.locator('#f-status input[value="succeeded"]').check()
    page.select_option("#f-agent", "py")
    assert shown_ids(page) == ["noisy"]
    page.select_option("#f-agent", "")
    page.fill("#f-text", "impl")
    page.wait_for_function(
        "() => document.querySelectorAll('#task-rows tr:not([hidden])').length == 2"
    )
    assert shown_ids(page) == ["impl[1]", "impl[2]"]
    page.fill("#f-text", "")
    page.locator('#f-status input[value="skipped"]').check()
    page.wait_for_function(
        "() => document.querySelectorAll('#task-rows tr:not([hidden])').length == 7"
    )
    # Sorting by a column, then back.
    page.click('#tasks-table th[data-key="took"]')
    took = [
        t["e"] - t["s"]
        for t in page.evaluate("JSON.parse(document.getElementById('report-data').textContent)")[
            "tasks"
        ]
    ]
    order = [index[i] for i in shown_ids(page)]
    assert [took[i] for i in order] == sorted(took[i] for i in order)
    assert page.get_attribute('th[data-key="took"]', "aria-sort") == "ascending"
    page.click('#tasks-table th[data-key="id"]')
    page.click('#tasks-table th[data-key="id"]')
    assert shown_ids(page) == sorted(ids, reverse=True)
    # A failed task's details: its error, as text; every payload task's, and nothing runs.
    page.click(f'#task-rows tr[data-i="{index["bad"]}"]')
    details = page.locator("#details")
    assert details.is_visible()
    assert f"RuntimeError: {PAYLOAD}" in details.inner_text()
    assert "agent_exception" in details.inner_text()
    page.keyboard.press("Escape")
    assert not details.is_visible()
    page.click(f'#task-rows tr[data-i="{index["noisy"]}"]')
    text = details.inner_text()
    assert f"out 59 {PAYLOAD}" in text and f"err 59 {PAYLOAD}" in text  # the logs' tails
    assert "blob.bin" in text and "binary" in text and "noisy.txt" in text
    assert "tests" in text and "lint" in text  # its checks
    assert audited.report.result("noisy").provenance.envelope_sha256 in text
    command = details.locator(".cmd pre").inner_text()
    assert command.startswith(f"git -C {audited.repo} worktree add -- ")
    details.locator(".cmd button").click()
    page.wait_for_function("() => document.querySelector('.cmd button').textContent != 'copy'")
    assert details.locator(".cmd button").inner_text() in ("copied", "selected: press Ctrl+C")
    for task_id in ids:  # the panel covers the rows' right: a row is clicked on its left
        page.click(f'#task-rows tr[data-i="{index[task_id]}"]', position={"x": 20, "y": 8})
        assert details.locator("h2").inner_text() == task_id
    page.keyboard.press("Escape")
    for i in range(len(ids)):
        page.hover(f'#tl-chart g.bar[data-i="{i}"]')
    assert page.evaluate("typeof window.__pwned") == "undefined"
    # Selecting a task shows what it depends on (a task and a group) and what needs it.
    page.click(f'#tl-chart g.bar[data-i="{index["after"]}"]')
    assert details.locator("h2").inner_text() == "after"
    up = page.eval_on_selector_all("#tl-chart g.bar.up", "bars => bars.map(b => b.dataset.i)")
    assert sorted(int(i) for i in up) == sorted(index[t] for t in ("good", "impl[1]", "impl[2]"))
    assert page.locator("#tl-chart .links path").count() == 3
    page.keyboard.press("Escape")
    page.click(f'#task-rows tr[data-i="{index["bad"]}"]')
    down = page.eval_on_selector_all("#tl-chart g.bar.down", "bars => bars.map(b => b.dataset.i)")
    assert down == [str(index["never"])]
    page.keyboard.press("Escape")
    # Rows by slot, and back by agent.
    heads = "els => els.map(e => e.textContent)"
    assert page.eval_on_selector_all(".tl-ghead", heads) == ["py (1)", "w (6)"]
    page.check('input[name="groupby"][value="slot"]')
    by_slot = page.eval_on_selector_all(".tl-ghead", heads)
    slots = {r.timings.slot for r in audited.report.results if r.timings.slot is not None}
    assert [h for h in by_slot if h.startswith("slot ")] == [
        f"slot {s} ({sum(r.timings.slot == s for r in audited.report.results)})"
        for s in sorted(slots)
    ]
    assert by_slot[-1] == "no slot recorded · lane 1 (1)"  # never: packed into a lane
    assert page.locator("#tl-chart g.bar").count() == 7
    page.check('input[name="groupby"][value="agent"]')
    assert page.eval_on_selector_all(".tl-ghead", heads) == ["py (1)", "w (6)"]
    # Zooming in widens the bars; the whole run again puts them back.
    bar = f'#tl-chart g.bar[data-i="{index["noisy"]}"] rect.run'
    before = float(page.get_attribute(bar, "width") or 0)
    page.click("#zoom-in")
    page.click("#zoom-in")
    assert float(page.get_attribute(bar, "width") or 0) == pytest.approx(4 * before, rel=0.01)
    page.click("#zoom-reset")
    assert float(page.get_attribute(bar, "width") or 0) == pytest.approx(before, rel=0.01)
    assert page.locator("#tl-axis text").count() >= 3

    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert problems == []
    page.close()


def test_a_thousand_task_page_is_quick_and_keeps_its_width(
    browser: Browser, tmp_path: Path
) -> None:
    path = tmp_path / "big.html"
    path.write_text(render_html(synthetic_report(), verified="OK"))
    page, problems = open_page(browser, path, width=1280)
    ready_ms = page.evaluate("Number(document.documentElement.dataset.readyMs)")
    print(f"\n1,000-task page interactive {ready_ms} ms after navigation started")
    assert page.locator("#task-rows tr").count() == 1000
    assert page.locator("#tl-chart g.bar").count() == 1000
    viewport = page.evaluate("window.innerWidth")
    assert page.evaluate("document.documentElement.scrollWidth") <= viewport
    row = page.locator('#task-rows tr[data-i="7"]').bounding_box()
    assert row is not None and row["width"] <= viewport
    cell = page.locator('#task-rows tr[data-i="7"] td:first-child span')
    assert cell.get_attribute("title") == LONG_ID
    assert page.evaluate(  # cut with an ellipsis, not widened
        "(el => el.scrollWidth > el.clientWidth)(document.querySelector('#task-rows tr[data-i=\"7\"] span'))"
    )
    label = page.locator('.tl-label[data-i="7"]')
    assert label.get_attribute("title") == LONG_ID
    box = label.bounding_box()
    assert box is not None and box["width"] < 300
    page.click('#task-rows tr[data-i="7"]')
    heading = page.locator("#details h2")
    assert heading.inner_text() == LONG_ID
    assert page.evaluate(  # wrapped inside the panel
        "(el => el.scrollWidth <= el.clientWidth)(document.getElementById('details'))"
    )
    page.check('input[name="groupby"][value="slot"]')
    assert page.locator("#tl-chart g.bar").count() == 1000
    assert problems == []
    page.close()
