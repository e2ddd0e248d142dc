"""A report as one self-contained HTML page for auditing a run: a timeline, the tasks, details.

``orchestrator report REPORT --html PAGE`` writes it. :func:`page_facts` (orchestrator/audit/
facts.py) gathers what the report does not hold (the files each result changed, the last lines
of its logs) from the repository and the run directory; :func:`render_html` makes the page.

The page opens from disk and loads nothing: its style and its one script are inline, and its
Content-Security-Policy lets that script (by its hash) and that style run and nothing else,
no request leave and no image load but a ``data:`` one, so that even a mistake in escaping
could not run a script that a report smuggled in. Every piece of text that came from a plan,
an agent or a log is hostile. What the page shows as it is goes through Jinja2 with
autoescaping; what the script draws (the timeline, the table, each task's details) is embedded
as JSON in a data block with ``<``, ``>`` and ``&`` written as ``\\u`` escapes, so that nothing
in it can end the block, and the script makes only text nodes and attributes of a fixed list
of names from it, never markup.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import re
import shlex
from collections.abc import Iterable
from datetime import UTC, datetime
from importlib import resources
from typing import Any, get_args

import jinja2

from envelopes import (
    CheckResult,
    PhaseSpan,
    Report,
    TaskResult,
    UsageTotals,
)

from .facts import (
    LOG_BYTES,
    LOG_LINES,
    MAX_FILES,
    Diffstat,
    FileChange,
    LogTail,
    PageFacts,
    page_facts,
)

__all__ = [
    "HIDDEN",
    "LOG_BYTES",
    "LOG_LINES",
    "MAX_FILES",
    "Diffstat",
    "FileChange",
    "LogTail",
    "PageFacts",
    "page_facts",
    "render_html",
    "visible",
]

#: Most characters of an error message or an output shown (then ``…``).
MAX_TEXT = 4000
PHASES: tuple[str, ...] = get_args(PhaseSpan.model_fields["name"].annotation)
STATUSES = ("succeeded", "cached", "failed", "timed_out", "cancelled", "skipped")


def render_html(
    report: Report,
    *,
    verified: str | None,
    facts: PageFacts | None = None,
    repo: str | None = None,
) -> str:
    """The page for *report*: *verified* (plain text, one line) says what ``verify`` found
    when it was made (None: not verified); *facts* (see :func:`page_facts`) adds the files
    changed and the logs (None: not available); *repo* is the repository the auditor named,
    for the commands that check a branch out (None: the report's own, when its path is plain
    text: no control, format or bidirectional character that could change what a pasted
    command does)."""
    facts = facts or PageFacts()
    css, js = _asset("report.css"), _asset("report.js")
    said = None if verified is None else _cut(" ".join(verified.split()), 1000)
    counts = {s: sum(r.status == s for r in report.results) for s in STATUSES}
    page = (
        _environment()
        .get_template("report.html.j2")
        .render(
            csp=_policy(css, js),
            css=css,
            js=js,
            data=_script_json(visible(_page_data(report, facts, repo or report.repo))),
            report=report,
            verified=said,
            wall=_duration((_utc(report.finished_at) - _utc(report.started_at)).total_seconds()),
            tool=" ".join(report.tool.get(k, "") for k in ("name", "version")).strip(),
            counts={s: n for s, n in counts.items() if n},
            groups=_groups(report, facts),
            phases=PHASES,
            statuses=STATUSES,
            agents=sorted({r.agent for r in report.results}),
        )
    )
    # A lone surrogate (a ``\ud800`` escape in a report's JSON) cannot be written as UTF-8.
    return page.encode("utf-8", "replace").decode("utf-8")


def _policy(css: str, js: str) -> str:
    """The page's policy: the inline style and script of these texts only, no request."""
    return (
        f"default-src 'none'; style-src '{_sha256(css)}'; script-src '{_sha256(js)}'; "
        "img-src data:; base-uri 'none'; form-action 'none'"
    )


def _script_json(value: Any) -> str:
    """*value* as JSON that can sit in a ``<script type="application/json">`` block: ASCII
    only (U+2028 and U+2029 escaped too), and ``<``, ``>``, ``&`` as ``\\u`` escapes."""
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


@functools.cache
def _asset(name: str) -> str:
    text = (resources.files("orchestrator.audit") / "templates" / name).read_text("utf-8")
    if "</script" in text.lower() or "</style" in text.lower() or "<!--" in text:
        raise RuntimeError(f"templates/{name} would end its own element early")
    return text


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("orchestrator.audit", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        # What the template prints of the report is made visible too (then escaped).
        finalize=lambda value: visible(value) if isinstance(value, str) else value,
    )
    env.filters.update(when=_when, cut=_cut, spent=_spent, steps=_steps_said)
    return env


def _page_data(report: Report, facts: PageFacts, checkout_repo: str | None) -> dict[str, Any]:
    """What the script draws: every task, times in seconds from the earliest one; every
    string in it made visible (:func:`visible`)."""
    times = [_utc(report.started_at), _utc(report.finished_at)]
    for r in report.results:
        times += [_utc(r.timings.started_at), _utc(r.timings.finished_at)]
        times += [_utc(r.timings.queued_at)] if r.timings.queued_at else []
    t0 = min(times)
    return {
        "t0": t0.isoformat(),
        "start": _seconds(_utc(report.started_at), t0),
        "end": _seconds(max(times), t0),
        "phases": PHASES,
        "notes": {"files": facts.diffstats_note, "logs": facts.logs_note},
        "tasks": [_task_data(r, t0, facts, checkout_repo) for r in report.results],
    }


#: What a task's details show of its provenance, as the report names them.
_PROVENANCE = (
    "envelope_sha256",
    "base_commit",
    "result_commit",
    "result_tree",
    "env_sha256",
    "agent_sha256",
    "output_sha256",
    "stdout_sha256",
    "stderr_sha256",
    "prompt_sha256",
    "result_sha256",
)
_STEP = {"name", "phase", "turn", "passed", "required", "timed_out", "exit_code", "duration_s"}


def _task_data(r: TaskResult, t0: datetime, facts: PageFacts, repo: str | None) -> dict[str, Any]:
    """One task for the script: short keys for what every task has many times over."""
    t, p = r.timings, r.provenance
    start = _seconds(_utc(t.started_at), t0)
    queued = None if t.queued_at is None else min(start, _seconds(_utc(t.queued_at), t0))
    last = r.attempt_log[-1] if r.attempt_log else None
    stat = facts.diffstats.get(r.task_id)
    logs = facts.logs.get(r.task_id, {})
    provenance = {k: getattr(p, k) or None for k in _PROVENANCE}
    provenance["agent"] = p.agent.program or p.agent.qualname or p.agent.kind
    if p.cached_from:
        provenance["cached_from"] = f"{p.cached_from.run_id} {p.cached_from.task_id}"
    return {
        "id": r.task_id,
        "agent": r.agent,
        "status": r.status,
        "tries": r.attempts,
        "group": r.group,
        "deps": r.depends_on,
        "q": queued,
        "s": start,
        "e": max(start, _seconds(_utc(t.finished_at), t0)),
        "slot": t.slot,
        "worker": last.worker if last else None,
        "ph": [[PHASES.index(s.name), _round(s.start_s), _round(s.end_s)] for s in t.phases],
        "err": [r.error.kind, _cut(r.error.message)] if r.error else None,
        "exit": r.exit_code,
        "usage": r.usage.model_dump(exclude={"session_id"}) if r.usage else None,
        "files": None
        if stat is None
        else {
            "n": stat.count,
            "add": stat.added,
            "del": stat.deleted,
            "bin": stat.binary,
            "more": stat.more,
            "list": [[f.path, f.added, f.deleted] for f in stat.files],
        },
        "logs": {k: {"lines": v.lines, "cut": v.cut, "size": v.size} for k, v in logs.items()},
        "logPaths": {
            "stdout": last.stdout.path if last and last.stdout else None,
            "stderr": last.stderr.path if last and last.stderr else None,
        },
        "branch": r.branch,
        "worktree": r.worktree,
        "checkout": _checkout(repo, r.branch),
        "checks": [c.model_dump(include=_STEP) for c in r.checks],
        "hooks": [c.model_dump(include=_STEP) for c in r.hooks],
        "attempts": [
            {
                "n": a.number,
                "status": a.status,
                "s": _seconds(_utc(a.started_at), t0),
                "took": _round(a.duration_s),
                "exit": a.exit_code,
                "err": f"{a.error.kind}: {_cut(a.error.message, 300)}" if a.error else None,
                "worker": a.worker,
                "repair": bool(a.repair),
            }
            for a in r.attempt_log
        ],
        "output": None
        if r.output is None
        else _cut(json.dumps(r.output, indent=2, ensure_ascii=False), MAX_TEXT),
        "resumed": r.resumed,
        "prov": provenance,
    }


def _checkout(repo: str | None, branch: str | None) -> str | None:
    """A command that checks *branch* out into a new worktree beside the repository; None
    when either holds a character that is not plain text (see :data:`HIDDEN`): pasted, a
    Ctrl-U or a newline would run something else than what the page shows."""
    if branch is None or HIDDEN.search(branch) or (repo is not None and HIDDEN.search(repo)):
        return None
    name = branch.rsplit("/", 1)[-1]
    if repo is None:
        return shlex.join(["git", "worktree", "add", "--", f"review-{name}", branch])
    target = f"{repo.rstrip('/')}-review-{name}"
    return shlex.join(["git", "-C", repo, "worktree", "add", "--", target, branch])


def _groups(report: Report, facts: PageFacts) -> list[dict[str, Any]]:
    """Each matrix group with, for each member, what its result says and changed."""
    by_id = {r.task_id: r for r in report.results}
    groups = []
    for name, group in report.groups.items():
        members = []
        for m in group.members:
            r = by_id.get(m.task_id)
            stat = facts.diffstats.get(m.task_id)
            cost = r.usage.cost_usd if r and r.usage else None
            members.append(
                {
                    "id": m.task_id,
                    "status": m.status,
                    "agent": r.agent if r else "",
                    "selected": m.task_id in group.selected,
                    "time": _duration(r.timings.duration_s) if r else "",
                    "cost": "not known" if cost is None else f"${cost:.4f}",
                    "changes": "not available"
                    if stat is None
                    else f"{stat.count} file(s), +{stat.added} \N{MINUS SIGN}{stat.deleted}",
                    "error": f"{r.error.kind}: {_cut(r.error.message, 300)}"
                    if r and r.error
                    else "",
                }
            )
        groups.append({"name": name, "group": group, "members": members})
    return groups


def _spent(usage: UsageTotals | None, tokens: bool = True) -> str:
    if usage is None:
        return ""
    said = f"{usage.total_tokens:,} tokens, " if tokens else ""
    said += f"${usage.cost_usd:.4f}"
    if usage.cost_unknown:
        said += f" (cost not known for {usage.cost_unknown} task(s))"
    return said


def _steps_said(steps: Iterable[CheckResult]) -> str:
    return ", ".join(
        f"{c.name} {'passed' if c.passed else 'failed'}" + ("" if c.required else " (not required)")
        for c in steps
    )


def _cut(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _utc(when: datetime) -> datetime:
    try:
        return when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
    except OverflowError:  # within hours of year 1 or 9999, with an offset: as written
        return when.replace(tzinfo=UTC)


#: Characters that are not plain text: controls (but tab and newline), C1 controls, format
#: characters (bidirectional overrides and isolates, zero-width ones, the BOM), line and
#: paragraph separators, surrogates, tags. In what a report says, they could reorder or hide
#: the page's own text; :func:`visible` shows each as ``<U+202E>``.
HIDDEN = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e"
    "\u2060-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff\U000e0000-\U000e007f]"
)


def visible(value: Any) -> Any:
    """*value* (JSON-like) with every :data:`HIDDEN` character of its strings (and keys)
    written as ``<U+XXXX>``."""
    if isinstance(value, str):
        return (
            HIDDEN.sub(lambda m: f"<U+{ord(m.group()):04X}>", value)
            if HIDDEN.search(value)
            else value
        )
    if isinstance(value, dict):
        return {visible(k): visible(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [visible(v) for v in value]
    return value


def _when(when: datetime) -> str:
    return _utc(when).strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(when: datetime, t0: datetime) -> float:
    return round((when - t0).total_seconds(), 3)


def _round(value: float) -> float | None:
    return round(value, 3) if math.isfinite(value) else None


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {rest:02d} s"
