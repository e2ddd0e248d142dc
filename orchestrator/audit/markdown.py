"""A report as Markdown: a summary for a pull request's comment or a CI step's summary.

``orchestrator report REPORT --markdown`` prints it. What it says comes from the report (see
docs/audit.md): the run, whether the report verified when the summary was made, counts by
status, what each agent did and spent, one row per task, the failures with their reasons,
the merges.

Every piece of text that came from a plan, an agent or a log (task ids, agent names, error
messages, branch names) is hostile: it is made inert before it is written (:func:`inert`),
so that it cannot open a link, an image, HTML, a code span or a table cell of its own, nor
start a heading or a list, wherever Markdown is rendered (GitHub's, GitLab's).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from envelopes import Report, TaskResult, UsageTotals

__all__ = ["MAX_CELL", "inert", "render_markdown"]

#: Most characters of one value in a table cell or a failure's line (then ``…``).
MAX_CELL = 200

#: Characters that mean something to Markdown or HTML inside a line (emphasis, code, links,
#: images, HTML, entities, table cells, math, and the ``:``, ``@`` and ``.`` of autolinked
#: URLs, addresses and ``www.`` names): each is written as a numeric character reference,
#: which every renderer shows as the character itself. A value never starts a line, so ``-``,
#: which means something only there, is left as it is.
_SPECIAL = re.compile(r"[\\`*_{}\[\]()<>#+.!|~&\"'=:@$^]")


#: The bidirectional overrides and isolates, which reorder what is shown around them.
_BIDI = frozenset(map(chr, (*range(0x202A, 0x202F), *range(0x2066, 0x206A))))


def inert(text: object, limit: int = MAX_CELL) -> str:
    """*text* as Markdown that shows it and does nothing else: one line (line breaks, other
    control characters and bidirectional overrides as spaces), at most *limit* characters (then ``…``), and every
    character that could start markup, a link, HTML or a table cell written as a numeric
    character reference (``&#124;`` for ``|``)."""
    value = "".join(
        " " if ord(c) < 32 or 0x7F <= ord(c) < 0xA0 or c in _BIDI else c for c in str(text)
    )
    value = value.strip()
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    return _SPECIAL.sub(lambda m: f"&#{ord(m.group())};", value)


def render_markdown(report: Report, *, verified: str | None = None) -> str:
    """The Markdown summary of *report*; *verified* (Markdown, safe as it is) says what
    ``verify`` found when it was made (None: not checked)."""
    lines = [f"## Run {inert(report.run_id)}: {inert(report.plan_name)}", ""]
    lines += _facts(report, verified)
    lines += ["", *_counts(report)]
    lines += ["", "### Agents", "", *_agents(report)]
    lines += ["", "### Tasks", "", *_tasks(report.results)]
    failures = [r for r in report.results if r.error is not None and r.status != "succeeded"]
    if failures:
        lines += ["", "### Failures", ""]
        lines += [
            f"- **{inert(r.task_id)}** ({inert(r.status)}, {inert(r.error.kind)}): "
            f"{inert(r.error.message)}"
            for r in failures
            if r.error is not None
        ]
    if report.merge:
        lines += ["", "### Merges", ""]
        for merge in report.merge:
            moved = (
                f"`{merge.old_commit[:12] if merge.old_commit else 'none'}` → "
                f"`{merge.new_commit[:12]}`"
                if merge.new_commit
                else "not moved"
            )
            lines.append(
                f"- into **{inert(merge.into)}**: {inert(merge.status)}, {moved}, "
                f"{len(merge.tasks)} task(s)"
            )
    if report.warnings:
        lines += ["", "### Warnings", "", *(f"- {inert(w, 500)}" for w in report.warnings)]
    return "\n".join(lines) + "\n"


def _facts(report: Report, verified: str | None) -> list[str]:
    wall = (report.finished_at - report.started_at).total_seconds()
    base = f"`{report.base_commit[:12]}`" if report.base_commit else "none"
    facts = [
        f"- Plan digest: `{report.plan_sha256[:16]}`",
        f"- Base commit: {base}",
        f"- Started: {report.started_at.isoformat(timespec='seconds')}, wall time {wall:.1f} s",
    ]
    if report.repo:
        facts.insert(0, f"- Repository: {inert(report.repo, 500)}")
    if verified is not None:  # the caller's words, what it quotes of a finding made inert
        facts.append(f"- Verified when this summary was made: {verified}")
    return facts


def _counts(report: Report) -> list[str]:
    s = report.summary
    counts = [
        ("succeeded", s.successful - s.cached),
        ("cached", s.cached),
        ("failed", s.failed),
        ("timed out", s.timeout),
        ("cancelled", s.cancelled),
        ("skipped", s.skipped),
    ]
    said = ", ".join(f"{n} {what}" for what, n in counts if n)
    line = f"**{s.total_tasks} task(s)**: {said or 'none ran'}"
    if s.usage is not None:
        line += f"; {_spent(s.usage)}"
    return [line]


def _spent(usage: UsageTotals) -> str:
    spent = f"{usage.total_tokens:,} tokens, ${usage.cost_usd:.2f}"
    if usage.cost_unknown:
        spent += f" (cost unknown for {usage.cost_unknown} task(s))"
    return spent


def _agents(report: Report) -> list[str]:
    rows = [
        "| Agent | Tasks | Succeeded | Failed | Timed out | Cancelled | Skipped | Spent |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, a in sorted(report.results_by_agent.items()):
        spent = _spent(a.usage) if a.usage is not None else ""
        rows.append(
            f"| {inert(name)} | {a.total} | {a.successful} | {a.failed} | {a.timeout} "
            f"| {a.cancelled} | {a.skipped} | {spent} |"
        )
    return rows


def _tasks(results: Sequence[TaskResult]) -> list[str]:
    rows = [
        "| Task | Agent | Status | Tries | Time | Commit | Error |",
        "|---|---|---|---:|---:|---|---|",
    ]
    for r in results:
        commit = r.provenance.result_commit
        cells = [
            inert(r.task_id),
            inert(r.agent),
            inert(r.status),
            str(r.attempts),
            f"{r.timings.duration_s:.2f} s",
            f"`{commit[:10]}`" if commit else "",
            inert(r.error.kind) if r.error is not None else "",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows
