"""What a report's page shows beyond the report: the files each result changed, the last
lines of its logs; gathered with bounded work from the repository and the run directory.

The report is hostile, and so is what it names. Diffstats come from one git command for every
task, with object ids checked first. A log's tail is shown only when the file is the one the
report recorded: regular, inside the run directory, reached through no link, and of the size
and SHA-256 the report gives (hashed in full, within a budget per page): a report naming
someone's private key as a task's log, in a run directory of its choosing, gets nothing
shown, as its author cannot know the key's digest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread

from envelopes import LogFile, Report, TaskResult, is_object_id, open_regular

from ..errors import GitError
from ..repo import Repository

__all__ = [
    "LOG_BYTES",
    "LOG_LINES",
    "MAX_FILES",
    "PAGE_HASH_BYTES",
    "Diffstat",
    "FileChange",
    "LogTail",
    "PageFacts",
    "page_facts",
]

#: Most files listed for one task (then "and N more"), and for the whole page.
MAX_FILES = 200
MAX_PAGE_FILES = 20_000
#: Of each log of a task's last attempt: the last lines shown, from at most its last bytes.
LOG_LINES = 40
LOG_BYTES = 16 * 1024
#: Most bytes of logs read for one page; tasks that did not succeed are read first.
PAGE_LOG_BYTES = 2 * 1024 * 1024
#: Most bytes of git's diffstat output read for one page (then the rest is left out).
MAX_GIT_OUTPUT = 64 << 20
#: Most bytes of logs hashed for one page, to check that each shown is the one recorded.
PAGE_HASH_BYTES = 1 << 30
#: Longest the one git command of :func:`page_facts` may run.
GIT_TIMEOUT_S = 120.0
#: Terminal escape sequences and the control characters other than a tab, left out of logs.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b.?")
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True)
class FileChange:
    """A file a result changed: lines added and deleted, both None for a binary file."""

    path: str
    added: int | None
    deleted: int | None


@dataclass(frozen=True)
class Diffstat:
    """What a result changed against its base: the first files (``files``), how many more,
    and totals over all of them."""

    files: tuple[FileChange, ...]
    more: int
    added: int
    deleted: int
    binary: int

    @property
    def count(self) -> int:
        """How many files changed."""
        return len(self.files) + self.more


@dataclass(frozen=True)
class LogTail:
    """The last lines of a log in the run directory (``cut``: lines before them left out)."""

    path: str
    size: int
    lines: tuple[str, ...]
    cut: bool


@dataclass(frozen=True)
class PageFacts:
    """What the page shows beyond the report, by task id; a missing entry is not available.

    ``diffstats_note`` and ``logs_note`` say why a kind of fact is missing for every task
    (None: gathered wherever it could be).
    """

    diffstats: Mapping[str, Diffstat] = field(default_factory=dict)
    logs: Mapping[str, Mapping[str, LogTail]] = field(default_factory=dict)
    diffstats_note: str | None = "no repository given"
    logs_note: str | None = "no run directory given"


async def page_facts(report: Report, *, repo: Repository | None, run_dir: Path | None) -> PageFacts:
    """The files each result changed (from *repo*, one git command for every task) and the
    last lines of each task's last attempt's logs (from *run_dir*, read safely, tails only).

    Never raises for what is missing or unreadable: a fact that cannot be had is left out,
    a git failure leaves out every diffstat. Cancellation: the git command, once started,
    runs to its end (see ``Git.run``), and the log reading thread finishes the file it reads.
    """
    diffstats: dict[str, Diffstat] = {}
    diffstats_note: str | None = "no repository given"
    if repo is not None:
        try:
            diffstats, diffstats_note = await _diffstats(repo, report.results), None
        except GitError:
            diffstats_note = "git could not compare the commits"
    logs: dict[str, dict[str, LogTail]] = {}
    logs_note: str | None = "no run directory given"
    if run_dir is not None:
        logs = await anyio.to_thread.run_sync(_log_tails, run_dir, report.results)
        logs_note = None
    return PageFacts(diffstats, logs, diffstats_note, logs_note)


async def _diffstats(repo: Repository, results: Sequence[TaskResult]) -> dict[str, Diffstat]:
    """One ``git diff-tree --stdin`` for every task's ``result base`` pair (ids checked): each
    pair's section starts with a ``%H %P`` line, so that a pair git skips (a missing commit)
    shifts nothing. Trees are compared only: no textconv, external diff or filter runs."""
    pairs: dict[tuple[str, str], list[str]] = {}
    for r in results:
        base, result = r.provenance.base_commit, r.provenance.result_commit
        if is_object_id(base) and is_object_id(result):
            pairs.setdefault((str(result), str(base)), []).append(r.task_id)
    if not pairs:
        return {}
    # Only pairs of two commits: a tree or a missing object would make git stop for all.
    ids = sorted({i for pair in pairs for i in pair})
    kinds = await repo.git.run(
        "cat-file", "--batch-check=%(objecttype)", stdin=("\n".join(ids) + "\n").encode()
    )
    commits = {
        i
        for i, kind in zip(ids, kinds.stdout.decode().splitlines(), strict=False)
        if kind == "commit"
    }
    pairs = {pair: tasks for pair, tasks in pairs.items() if set(pair) <= commits}
    if not pairs:
        return {}
    args = ["diff-tree", "--stdin", "--always", "--format=%H %P", "-r", "--numstat", "-z"]
    args += ["--no-renames", "--no-textconv", "--no-ext-diff"]
    stdin = "".join(f"{result} {base}\n" for result, base in pairs).encode()
    # A repository a partial clone made would fetch missing blobs on demand (running its
    # remote's programs); git 2.44 and later are told not to.
    out, cut = await repo.git.read(
        *args,
        stdin=stdin,
        limit=MAX_GIT_OUTPUT,
        timeout=GIT_TIMEOUT_S,
        env={"GIT_NO_LAZY_FETCH": "1"},
    )
    sections = _numstat_sections(out, MAX_FILES)
    if cut and sections:
        sections.popitem()  # the one it was writing when cut short
    found: dict[str, Diffstat] = {}
    room = MAX_PAGE_FILES
    for key, stat in sections.items():
        if len(stat.files) > room:  # the page names at most MAX_PAGE_FILES in all
            dropped = len(stat.files) - max(room, 0)
            stat = dataclasses.replace(
                stat, files=stat.files[: max(room, 0)], more=stat.more + dropped
            )
        room -= len(stat.files)
        for task_id in pairs.get(key, ()):
            found[task_id] = stat
    return found


def _numstat_sections(data: bytes, named: int) -> dict[tuple[str, str], Diffstat]:
    """``--numstat -z`` output by its ``commit parent`` header lines, each section's first
    *named* files kept and every file counted. An entry is ``added TAB deleted TAB path``
    (``-`` for a binary file's counts); a header has no tab."""
    sections: dict[tuple[str, str], Diffstat] = {}
    key: tuple[str, str] | None = None
    files: list[FileChange] = []
    more = added = deleted = binary = 0

    def close() -> None:
        if key is not None:
            sections[key] = Diffstat(tuple(files), more, added, deleted, binary)

    for token in data.split(b"\0"):
        token = token.lstrip(b"\n")
        if not token:
            continue
        if b"\t" not in token:
            close()
            ids = token.decode("ascii", "replace").split()
            ok = len(ids) == 2 and all(is_object_id(i) for i in ids)
            key = (ids[0], ids[1]) if ok else None
            files, more, added, deleted, binary = [], 0, 0, 0, 0
            continue
        fields = token.split(b"\t", 2)
        if key is None or len(fields) != 3:
            continue
        plus, minus = _count(fields[0]), _count(fields[1])
        if plus is None or minus is None:
            binary += 1
            plus = minus = None
        else:
            added, deleted = added + plus, deleted + minus
        if len(files) < named:
            files.append(FileChange(fields[2].decode("utf-8", "replace"), plus, minus))
        else:
            more += 1
    close()
    return sections


def _count(field: bytes) -> int | None:
    return int(field) if field.isdigit() else None


def _log_tails(run_dir: Path, results: Sequence[TaskResult]) -> dict[str, dict[str, LogTail]]:
    """The tails of each task's last attempt's stdout and stderr, within PAGE_LOG_BYTES shown
    and PAGE_HASH_BYTES hashed; the failures' first."""
    tails: dict[str, dict[str, LogTail]] = {}
    room, budget = PAGE_LOG_BYTES, PAGE_HASH_BYTES
    for r in sorted(results, key=lambda r: r.succeeded):
        if not r.attempt_log:
            continue
        last = r.attempt_log[-1]
        for stream, log in (("stdout", last.stdout), ("stderr", last.stderr)):
            if log is None or room <= 0 or log.size > budget:
                continue
            budget -= log.size
            tail = _tail(run_dir, log, min(LOG_BYTES, room))
            if tail is not None:
                tails.setdefault(r.task_id, {})[stream] = tail
                room -= sum(len(line) + 1 for line in tail.lines)
    return tails


def _tail(run_dir: Path, log: LogFile, limit: int) -> LogTail | None:
    """The last LOG_LINES lines in the last *limit* bytes of *log*, when it is a regular file
    inside *run_dir* reached without following a link, whose size and SHA-256 are the ones
    the report records (None otherwise: the report named another file, or it changed)."""
    try:
        fd = open_regular(log.path, within=run_dir)
    except OSError:
        return None
    try:
        if not _is_recorded(fd, log):
            return None
        size = log.size
        start = max(0, size - limit)
        data = os.pread(fd, limit, start)
    except OSError:
        return None
    finally:
        os.close(fd)
    cut = start > 0
    if cut and (newline := data.find(b"\n")) >= 0:
        data = data[newline + 1 :]  # the line it starts inside of
    text = _ESCAPES.sub("", data.decode("utf-8", "replace"))
    # Lines end at a newline only (str.splitlines would also break at U+2028, form feeds...).
    lines = (
        [_CONTROLS.sub("", line) for line in text.removesuffix("\n").split("\n")] if text else []
    )
    if len(lines) > LOG_LINES:
        lines, cut = lines[-LOG_LINES:], True
    return LogTail(path=log.path, size=size, lines=tuple(lines), cut=cut)


def _is_recorded(fd: int, log: LogFile) -> bool:
    """Whether the file open on *fd* holds exactly *log*'s size bytes with its SHA-256."""
    digest, offset = hashlib.sha256(), 0
    while offset <= log.size:
        chunk = os.pread(fd, min(1 << 20, log.size + 1 - offset), offset)
        if not chunk:
            break
        digest.update(chunk)
        offset += len(chunk)
    return offset == log.size and digest.hexdigest() == log.sha256
