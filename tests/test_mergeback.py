"""orchestrator/mergeback.py, called directly on reports built from real commits: branch names
and selections it refuses, the repository it acts on, conflict prediction, the merge commits it
makes, cancellation, and recording the merge in a report file.

tests/test_merge.py runs real tasks and merges their report (the all-or-nothing move, a
checkout moving along, verify); this file covers what that one does not."""

from __future__ import annotations

import contextlib
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import (
    AgentInfo,
    ErrorInfo,
    Event,
    MergeConflict,
    MergePredicted,
    MergeRecord,
    Provenance,
    Report,
    TaskResult,
    Timings,
    audit_report,
    digest,
    seal_result,
)
from orchestrator._git import FALLBACK_IDENTITY, Git
from orchestrator.errors import GitError, MergeError, ReportUnreadable
from orchestrator.mergeback import (
    merge_results,
    open_merge_repository,
    predict_conflicts,
    record_merge,
)
from orchestrator.repo import Repository
from orchestrator.report import aggregate_results, write_report

from .conftest import MakeRepo, git, plumbing_commit

RUN_ID = "20261122-055431-8c6b7f"
STARTED = datetime(2026, 11, 22, 5, 54, 31, tzinfo=UTC)


def commit_files(repo: Path, parent: str, files: dict[str, str], message: str) -> str:
    """A commit on *parent* with *files* written, made with plumbing (no checkout touched)."""
    env = {**os.environ, "GIT_INDEX_FILE": str(repo / ".git" / "scratch-index")}
    env |= {"GIT_AUTHOR_NAME": "T", "GIT_AUTHOR_EMAIL": "t@example.com"}
    env |= {"GIT_COMMITTER_NAME": "T", "GIT_COMMITTER_EMAIL": "t@example.com"}

    return plumbing_commit(repo, env, parent, files, message)


def task_result(
    repo: Path,
    task_id: str,
    files: dict[str, str] | None,
    *,
    status: str = "succeeded",
    depends_on: list[str] | None = None,
    group: str | None = None,
    worktree: bool = True,
) -> TaskResult:
    """A sealed result of *task_id*: its branch made in *repo* at a commit writing *files*
    (``{}``: no change, the base itself)."""
    base = git(repo, "rev-parse", "main")
    commit = branch = None
    if worktree:
        commit = commit_files(repo, base, files, f"a: {task_id}") if files else base
        branch = f"orchestrator/{RUN_ID}/{task_id}"
        git(repo, "branch", branch, commit)
    error = None if status == "succeeded" else ErrorInfo(kind="exit_code", message="exit 1")
    info = AgentInfo(kind="callable", qualname="agent")
    output = {"ok": True} if status == "succeeded" else None
    return seal_result(
        TaskResult(
            task_id=task_id,
            agent="a",
            status=status,  # type: ignore[arg-type]
            attempts=0,
            output=output,
            error=error,
            timings=Timings(started_at=STARTED, finished_at=STARTED, duration_s=0.0),
            branch=branch,
            group=group,
            depends_on=depends_on or [],
            provenance=Provenance(
                envelope_sha256="e" * 64,
                base_commit=base if worktree else None,
                result_commit=commit,
                agent=info,
                agent_sha256=digest(info.model_dump(mode="json")),
                output_sha256=digest(output),
            ),
        )
    )


def report_of(repo: Path, results: list[TaskResult], **options: Any) -> Report:
    settings: dict[str, Any] = {
        "run_id": RUN_ID,
        "plan_name": "p",
        "plan_sha256": "a" * 64,
        "repo": str(repo),
        "base_ref": "main",
        "base_commit": git(repo, "rev-parse", "main"),
        "run_dir": repo / ".git" / "orchestrator" / "runs" / RUN_ID,
        "started_at": STARTED,
        "finished_at": STARTED + timedelta(seconds=1),
    }
    return aggregate_results(results, **(settings | options))


@pytest.fixture
def repo(make_repo: MakeRepo) -> Path:
    """A repository whose HEAD is detached: ``main`` is checked out nowhere."""
    path = make_repo()
    git(path, "checkout", "--quiet", "--detach")
    return path


def merge(report: Report, **options: Any) -> MergeRecord:
    """merge_results run from inside the report's repository."""
    with contextlib.chdir(report.repo or "."):
        record: MergeRecord = anyio.run(lambda: merge_results(report, **options))
    return record


def test_a_refs_heads_prefix_names_the_same_branch(repo: Path) -> None:
    report = report_of(repo, [task_result(repo, "a", {"a.txt": "a\n"})])
    record = merge(report, into="refs/heads/main")
    assert record.into == "main" and record.status == "merged"
    assert git(repo, "rev-parse", "main") == record.new_commit
    assert not git(repo, "for-each-ref", "refs/heads/refs/")  # no branch named refs/heads/...


@pytest.mark.parametrize(
    ("into", "message"),
    [
        ("-x", "'-x' is not a valid branch name"),
        ("--output=/tmp/x", "'--output=/tmp/x' is not a valid branch name"),
        ("main.lock", "'main.lock' is not a valid branch name"),
        ("a b", "'a b' is not a valid branch name"),
        ("HEAD", "branch 'HEAD' does not exist in "),
        ("orchestrator", "branch 'orchestrator' does not exist in "),
    ],
)
def test_a_target_that_is_no_existing_branch_is_refused(
    repo: Path, into: str, message: str
) -> None:
    report = report_of(repo, [task_result(repo, "a", {"a.txt": "a\n"})])
    refs = git(repo, "for-each-ref")
    with pytest.raises(MergeError) as caught:
        merge(report, into=into)
    assert str(caught.value).startswith(message)
    assert git(repo, "for-each-ref") == refs


def test_a_run_with_no_success_has_nothing_to_merge(repo: Path) -> None:
    report = report_of(
        repo,
        [
            task_result(repo, "broke", {"x.txt": "x\n"}, status="failed"),
            task_result(repo, "nowhere", None, worktree=False),
        ],
    )
    with pytest.raises(MergeError) as caught:
        merge(report, into="main")
    assert str(caught.value) == (
        f"nothing to merge: no task of run {RUN_ID} succeeded with a result commit"
    )


def test_selections_that_cannot_be_merged_are_refused(repo: Path) -> None:
    results = [
        task_result(repo, "ok", {"ok.txt": "ok\n"}),
        task_result(repo, "nowhere", None, worktree=False),
        task_result(repo, "fix-a", {"f.txt": "a\n"}, status="failed", group="fix"),
    ]
    report = report_of(repo, results, groups={"fix": ("first_success", None)})
    cases = {
        (): "no task named to merge",
        ("nowhere",): "task nowhere has no result commit (it ran without a worktree)",
        ("fix",): "group fix has no selected member: none of its tasks succeeded",
    }
    main = git(repo, "rev-parse", "main")
    for tasks, message in cases.items():
        with pytest.raises(MergeError) as caught:
            merge(report, into="main", tasks=list(tasks))
        assert str(caught.value) == message
    assert git(repo, "rev-parse", "main") == main
    # Without a selection, the task that ran without a worktree is simply not merged.
    assert [t.task_id for t in merge(report, into="main").tasks] == ["ok"]


def test_a_task_named_twice_is_merged_once(repo: Path) -> None:
    report = report_of(repo, [task_result(repo, "a", {"a.txt": "a\n"})])
    record = merge(report, into="main", tasks=["a", "a"])
    assert [t.task_id for t in record.tasks] == ["a"]
    assert record.status == "merged"


def test_a_result_commit_that_is_no_object_id_never_reaches_git(repo: Path) -> None:
    sound = task_result(repo, "a", {"a.txt": "a\n"})
    # A report built in code is not validated again: a name git would resolve, or read as
    # an option, must still not reach it.
    for forged in ("main", "--output=/tmp/x"):
        provenance = sound.provenance.model_copy(update={"result_commit": forged})
        report = report_of(repo, [sound.model_copy(update={"provenance": provenance})])
        with pytest.raises(MergeError) as caught:
            merge(report, into="main")
        assert str(caught.value) == f"not merged: fatal: not an object id: {forged!r}"


def test_a_report_of_another_repository_is_refused_unless_named(
    repo: Path, make_repo: MakeRepo
) -> None:
    other = make_repo(name="elsewhere")
    report = report_of(repo, [task_result(repo, "a", {"a.txt": "a\n"})])
    with contextlib.chdir(other), pytest.raises(MergeError) as caught:
        anyio.run(lambda: merge_results(report, into="main"))
    assert str(caught.value) == (
        f"the report of run {RUN_ID} was made in {repo}, not in {other} where merge runs; "
        f"merge there, or pass --repo {other} to merge into this repository anyway"
    )
    # Named, the other repository is used, and what it lacks is said.
    with pytest.raises(MergeError) as named:
        anyio.run(lambda: merge_results(report, into="main", repo=other))
    assert str(named.value).startswith(f"task a: branch orchestrator/{RUN_ID}/a was deleted")
    assert str(named.value).endswith("is not in the repository either")
    assert git(other, "rev-parse", "main") == git(other, "rev-parse", "HEAD")


def test_the_repository_is_recognised_by_its_git_directory_or_a_subdirectory(
    repo: Path,
) -> None:
    report = report_of(repo, [task_result(repo, "a", {"a.txt": "a\n"})])
    by_git_dir = report.model_copy(update={"repo": str(repo / ".git")})
    with contextlib.chdir(repo / "src"):
        record = anyio.run(lambda: merge_results(by_git_dir, into="main", dry_run=True))
    assert record.status == "skipped"


def test_open_merge_repository_returns_a_given_repository_as_it_is(repo: Path) -> None:
    report = report_of(repo, [task_result(repo, "a", {"a.txt": "a\n"})])

    async def main() -> tuple[bool, int, bool]:
        repository = await Repository.open(repo)
        same = await open_merge_repository(report, repository) is repository
        await merge_results(report, into="main", repo=repository)
        # The caller's lock is the caller's to close: still open, and usable.
        still_open = repository.lock._fd is not None
        repository.lock.close()
        return same, repository.lock.acquisitions, still_open

    same, acquisitions, still_open = anyio.run(main)
    assert same and still_open
    assert acquisitions == 1  # the move, under the lock, once


def open_lock_files() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").endswith("metadata.mutex"):
                found.append(fd)
    return found


def test_a_repository_it_opened_itself_is_closed_afterwards(repo: Path) -> None:
    before = open_lock_files()
    report = report_of(repo, [task_result(repo, "a", {"a.txt": "a\n"})])
    assert merge(report, into="main").status == "merged"
    with pytest.raises(MergeError):
        merge(report, into="no-such-branch")
    assert open_lock_files() == before


def test_predict_conflicts_every_pair_and_each_against_the_target(repo: Path) -> None:
    base = git(repo, "rev-parse", "main")
    a = commit_files(repo, base, {"src/file0000.txt": "a\n", "a.txt": "a\n"}, "a")
    b = commit_files(repo, base, {"src/file0000.txt": "b\n"}, "b")
    c = commit_files(repo, base, {"src/file0001.txt": "c\n"}, "c")
    d = commit_files(repo, base, {"d.txt": "d\n"}, "d")
    target = commit_files(repo, base, {"src/file0001.txt": "main moved\n"}, "main")

    async def main() -> list[list[MergeConflict]]:
        runner = Git(repo)
        commits = [("a", a), ("b", b), ("c", c), ("d", d)]
        return [
            await predict_conflicts(runner, commits, target=("main", target)),
            await predict_conflicts(runner, [("d", d)], target=("main", target)),
            await predict_conflicts(runner, [], target=("main", target)),
        ]

    everything, alone, nothing = anyio.run(main)
    assert everything == [
        MergeConflict(left="a", right="b", paths=["src/file0000.txt"]),
        MergeConflict(left="c", right="main", paths=["src/file0001.txt"]),
    ]
    assert alone == [] and nothing == []
    assert git(repo, "rev-parse", "main") == base  # nothing moved


def test_predict_conflicts_with_a_commit_that_is_not_there_is_a_git_error(repo: Path) -> None:
    base = git(repo, "rev-parse", "main")
    missing = "0" * 40

    async def main() -> None:
        await predict_conflicts(Git(repo), [("ghost", missing)], target=("main", base))

    with pytest.raises(GitError):  # one GitError, not an exception group
        anyio.run(main)


def test_merge_commits_name_the_task_and_run_and_keep_the_targets_own_work(
    repo: Path,
) -> None:
    report = report_of(
        repo,
        [task_result(repo, "a", {"a.txt": "a\n"}), task_result(repo, "b", {"b.txt": "b\n"})],
    )
    # The target moves on after the run, without conflict.
    theirs = commit_files(repo, git(repo, "rev-parse", "main"), {"main.txt": "mine\n"}, "theirs")
    git(repo, "update-ref", "refs/heads/main", theirs)
    record = merge(report, into="main")
    assert record.status == "merged" and record.old_commit == theirs
    first, second = (t.merge_commit for t in record.tasks)
    assert record.new_commit == second
    assert git(repo, "log", "-1", "--format=%B", str(first)) == (
        f"Merge task a of run {RUN_ID} into main\n\n"
        f"Orchestrator-Run: {RUN_ID}\nOrchestrator-Task: a"
    )
    assert git(repo, "log", "-1", "--format=%P", str(first)) == (
        f"{theirs} {report.result('a').provenance.result_commit}"
    )
    name, email = FALLBACK_IDENTITY  # the conftest's machine has no git identity
    assert git(repo, "log", "-1", "--format=%an <%ae>|%cn <%ce>", str(second)) == (
        f"{name} <{email}>|{name} <{email}>"
    )
    for path, text in {"main.txt": "mine", "a.txt": "a", "b.txt": "b"}.items():
        assert git(repo, "show", f"main:{path}") == text


def test_a_dry_run_of_what_is_already_merged_is_skipped(repo: Path) -> None:
    report = report_of(repo, [task_result(repo, "a", {"a.txt": "a\n"})])
    done = merge(report, into="main")
    again = merge(report, into="main", dry_run=True)
    assert again.status == "skipped" and again.new_commit is None
    assert again.message == "dry run: nothing to merge: main already contains every result"
    assert git(repo, "rev-parse", "main") == done.new_commit


def test_a_cancelled_merge_leaves_the_target_where_it_was(repo: Path) -> None:
    report = report_of(
        repo,
        [task_result(repo, "a", {"a.txt": "a\n"}), task_result(repo, "b", {"b.txt": "b\n"})],
    )
    old = git(repo, "rev-parse", "main")
    reflog = git(repo, "reflog", "show", "refs/heads/main")

    async def main() -> bool:
        with anyio.CancelScope() as scope:

            def cancel(event: Event) -> None:
                if isinstance(event, MergePredicted):
                    scope.cancel()

            await merge_results(report, into="main", repo=repo, on_event=cancel)
        return scope.cancelled_caught

    assert anyio.run(main)
    assert git(repo, "rev-parse", "main") == old
    assert git(repo, "reflog", "show", "refs/heads/main") == reflog


# record_merge: the record into the report file, and into the run directory's copy.


def written_report(repo: Path, path: Path, results: list[TaskResult]) -> Report:
    report = report_of(repo, results)
    anyio.run(write_report, report, path)
    return report


def record(into: str, **fields: Any) -> MergeRecord:
    return MergeRecord(into=into, status="skipped", at=STARTED, **fields)


def test_records_are_appended_in_order_and_the_report_resealed(repo: Path, tmp_path: Path) -> None:
    path = tmp_path / "copy.json"
    written_report(repo, path, [task_result(repo, "a", {"a.txt": "a\n"})])
    anyio.run(record_merge, path, record("first"))
    new = anyio.run(record_merge, str(path), record("second", message="again"))
    assert [m.into for m in new.merge] == ["first", "second"]
    raw = json.loads(path.read_bytes())
    assert [m["into"] for m in raw["merge"]] == ["first", "second"]
    assert audit_report(raw, source=path.read_bytes()) == []
    assert (tmp_path / "report.mutex").exists()  # the lock beside a copy with no run dir


def test_the_run_directorys_copy_gets_the_record_too_but_never_another_runs(
    repo: Path, tmp_path: Path
) -> None:
    results = [task_result(repo, "a", {"a.txt": "a\n"})]
    run_dir = repo / ".git" / "orchestrator" / "runs" / RUN_ID
    original = written_report(repo, run_dir / "report.json", results)
    copy = tmp_path / "copy.json"
    anyio.run(write_report, original, copy)

    async def record_with_repo(path: Path, entry: MergeRecord) -> None:
        repository = await Repository.open(repo)
        try:
            await record_merge(path, entry, repo=repository)
        finally:
            repository.lock.close()

    anyio.run(record_with_repo, copy, record("main"))
    for path in (copy, run_dir / "report.json"):
        assert [m["into"] for m in json.loads(path.read_bytes())["merge"]] == ["main"]
    assert (run_dir / "report.mutex").exists()

    # A report of the same run id with other results (an edited copy, sealed anew) is another
    # run's: the run directory's file is left alone.
    forged = report_of(repo, [*results, task_result(repo, "b", {"b.txt": "b\n"})])
    other = tmp_path / "other.json"
    anyio.run(write_report, forged, other)
    before = (run_dir / "report.json").read_bytes()
    anyio.run(record_with_repo, other, record("release"))
    assert (run_dir / "report.json").read_bytes() == before
    assert [m["into"] for m in json.loads(other.read_bytes())["merge"]] == ["release"]


def test_the_run_dir_a_report_names_is_never_written(repo: Path, tmp_path: Path) -> None:
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    results = [task_result(repo, "a", {"a.txt": "a\n"})]
    report = report_of(repo, results, run_dir=victim_dir)
    anyio.run(write_report, report, victim_dir / "report.json")
    before = (victim_dir / "report.json").read_bytes()
    copy = tmp_path / "copy.json"
    anyio.run(write_report, report, copy)
    anyio.run(record_merge, copy, record("main"))
    assert (victim_dir / "report.json").read_bytes() == before
    assert not (victim_dir / "report.mutex").exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"not json", b'{"schema": "something else"}', b"[]"],
    ids=["empty", "not-json", "other-schema", "array"],
)
def test_a_file_that_is_not_a_report_is_unreadable_and_left_alone(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "report.json"
    path.write_bytes(content)
    with pytest.raises(ReportUnreadable):
        anyio.run(record_merge, path, record("main"))
    assert path.read_bytes() == content


def test_a_fifo_in_place_of_the_report_does_not_block(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    os.mkfifo(path)
    with pytest.raises(ReportUnreadable, match="not a regular file"):
        anyio.run(record_merge, path, record("main"))


def test_a_merge_of_n_disjoint_results_runs_git_a_bounded_number_of_times(repo: Path) -> None:
    """Predicting and building the merge of N results that touch different files: one log
    of them all and a constant (the build is one fast-import, fed from that log), no
    merge-tree, whatever N; merged for real, the same, and every result is in the target."""
    results = [task_result(repo, f"t{i}", {f"out/t{i}.txt": f"{i}\n"}) for i in range(60)]
    report = report_of(repo, results)

    async def main(dry_run: bool) -> tuple[int, MergeRecord]:
        repository = await Repository.open(repo)
        before = repository.git.calls
        record = await merge_results(report, into="main", repo=repository, dry_run=dry_run)
        repository.lock.close()
        return repository.git.calls - before, record

    calls, record = anyio.run(main, True)
    assert record.status == "skipped" and "would merge 60 result(s)" in record.message
    assert calls <= 12, calls  # 9 here
    calls, record = anyio.run(main, False)
    assert record.status == "merged" and calls <= 16, calls  # 10 here
    listed = git(repo, "ls-tree", "-r", "--name-only", "main", "out/").split()
    assert sorted(listed) == sorted(f"out/t{i}.txt" for i in range(60))
    chain = [t.merge_commit for t in record.tasks]
    assert chain[-1] == record.new_commit == git(repo, "rev-parse", "main")
    # Each merge commit on the one before, with the task's result as its second parent.
    for i, task in enumerate(record.tasks):
        parents = git(repo, "log", "-1", "--format=%P", str(task.merge_commit)).split()
        assert parents == [chain[i - 1] if i else record.old_commit, task.result_commit]
