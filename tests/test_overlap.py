"""orchestrator/overlap.py: which results may conflict, from each one's changes read once.

Every prediction here is compared with the old way (``git merge-tree`` on every pair) on
real commits: the new one must give the same conflicts, running fewer merges.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import anyio
import pytest

from envelopes import MergeConflict, Report
from orchestrator._git import Git
from orchestrator.errors import GitError
from orchestrator.mergeback import merge_results, predict_conflicts
from orchestrator.overlap import (
    Touched,
    candidate_pairs,
    may_conflict,
    touched,
    touched_together,
)

from .conftest import MakeRepo, git

ENV = {
    "GIT_AUTHOR_NAME": "T",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "T",
    "GIT_COMMITTER_EMAIL": "t@example.com",
}


def change(
    repo: Path,
    parent: str,
    write: dict[str, str] | None = None,
    remove: tuple[str, ...] = (),
    *,
    parents: tuple[str, ...] = (),
) -> str:
    """A commit on *parent* (and *parents*, for a merge) with *write* written and *remove*
    removed, made with plumbing (no checkout touched)."""
    env = {**os.environ, **ENV, "GIT_INDEX_FILE": str(repo / ".git" / "overlap-index")}

    def run(*args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            ["git", *args], cwd=repo, env=env, input=stdin, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    run("read-tree", parent)
    for name in remove:
        run("update-index", "--force-remove", name)
    for name, text in (write or {}).items():
        blob = run("hash-object", "-w", "--stdin", stdin=text)
        run("update-index", "--add", "--cacheinfo", f"100644,{blob},{name}")
    tree = run("write-tree")
    Path(env["GIT_INDEX_FILE"]).unlink()
    flags = [f for p in (parent, *parents) for f in ("-p", p)]
    return run("commit-tree", tree, *flags, "-m", "change")


@pytest.fixture
def repo(make_repo: MakeRepo) -> Path:
    path = make_repo()
    base = git(path, "rev-parse", "HEAD")
    lines = "".join(f"line {i}\n" for i in range(1, 21))
    files = {"shared.txt": lines, "d/one.txt": "one\n", "d/two.txt": "two\n", "old.txt": lines}
    git(path, "update-ref", "refs/heads/base", change(path, base, files))
    return path


def predict(
    repo: Path, commits: list[tuple[str, str]], target: str, base: str | None
) -> tuple[list[MergeConflict], int]:
    """The prediction, and the git processes it ran."""

    async def main() -> tuple[list[MergeConflict], int]:
        runner = Git(repo)
        found = await predict_conflicts(runner, commits, target=("main", target), base=base)
        return found, runner.calls

    return anyio.run(main)


def both_ways(
    repo: Path, commits: list[tuple[str, str]], target: str | None = None
) -> list[MergeConflict]:
    """The prediction with the base (linear) and without (every pair): the same."""
    base = git(repo, "rev-parse", "base")
    fast, _ = predict(repo, commits, target or base, base)
    slow, _ = predict(repo, commits, target or base, None)
    assert fast == slow
    return fast


def test_compatible_edits_of_one_file_merge_and_the_same_lines_conflict(repo: Path) -> None:
    base = git(repo, "rev-parse", "base")
    text = git(repo, "show", "base:shared.txt") + "\n"
    top = change(repo, base, {"shared.txt": text.replace("line 1\n", "line one\n")})
    bottom = change(repo, base, {"shared.txt": text.replace("line 20\n", "line twenty\n")})
    again = change(repo, base, {"shared.txt": text.replace("line 1\n", "line ONE\n")})
    found = both_ways(repo, [("top", top), ("bottom", bottom), ("again", again)])
    assert found == [MergeConflict(left="top", right="again", paths=["shared.txt"])]


def test_a_rename_against_an_edit_is_merged_as_git_merges_it(repo: Path) -> None:
    base = git(repo, "rev-parse", "base")
    text = git(repo, "show", "base:old.txt") + "\n"
    renamed = change(repo, base, {"new.txt": text}, ("old.txt",))
    edited = change(repo, base, {"old.txt": text.replace("line 5\n", "line five\n")})
    removed = change(repo, base, remove=("old.txt",))
    found = both_ways(repo, [("renamed", renamed), ("edited", edited), ("removed", removed)])
    # git follows the rename with the edit (no conflict there); an edit against a removal,
    # and a rename against a removal, conflict: found by the linear way as by the old one.
    assert {(c.left, c.right) for c in found} == {("edited", "removed"), ("renamed", "removed")}


def test_a_file_against_a_directory_and_a_directory_renamed_are_caught(repo: Path) -> None:
    base = git(repo, "rev-parse", "base")
    as_file = change(repo, base, {"e": "a file\n"})
    as_directory = change(repo, base, {"e/inner.txt": "inside\n"})
    moved = change(
        repo, base, {"moved/one.txt": "one\n", "moved/two.txt": "two\n"}, ("d/one.txt", "d/two.txt")
    )
    added = change(repo, base, {"d/three/new.txt": "new\n"})
    found = both_ways(
        repo,
        [("as_file", as_file), ("as_directory", as_directory), ("moved", moved), ("added", added)],
    )
    assert {(c.left, c.right) for c in found} >= {("as_file", "as_directory")}
    # git may move the addition along with the directory it renamed: what that gives is
    # git's to say, so the pair is merged (the answer is the old way's, above).
    moves, adds = (anyio.run(touched, Git(repo), base, c) for c in (moved, added))
    assert moves is not None and adds is not None and may_conflict(moves, adds)


def test_results_that_share_a_commit_or_leave_the_base_are_checked_the_old_way(
    repo: Path,
) -> None:
    base = git(repo, "rev-parse", "base")
    text = git(repo, "show", "base:shared.txt") + "\n"
    first = change(repo, base, {"shared.txt": text.replace("line 3\n", "three\n")})
    # An agent that merged another task's branch, then changed the line back: its changes
    # since the base name no path of the first's, but the merge base of the two is not the
    # base, so they are merged to be sure.
    merged = change(repo, first, {"shared.txt": text}, parents=(base,))
    elsewhere = change(repo, git(repo, "rev-parse", "main"), {"other.txt": "x\n"})
    both_ways(repo, [("first", first), ("merged", merged), ("elsewhere", elsewhere)])
    items = [anyio.run(touched, Git(repo), base, commit) for commit in (first, merged, elsewhere)]
    assert items[2] is None  # does not descend from the base
    assert items[0] is not None and items[1] is not None
    assert may_conflict(items[0], items[1])  # they share a commit


def test_against_a_target_that_moved_only_overlapping_results_are_merged(repo: Path) -> None:
    base = git(repo, "rev-parse", "base")
    target = change(repo, base, {"d/one.txt": "main's one\n"})
    hits = change(repo, base, {"d/one.txt": "task's one\n"})
    misses = change(repo, base, {"elsewhere.txt": "x\n"})
    found = both_ways(repo, [("hits", hits), ("misses", misses)], target)
    assert found == [MergeConflict(left="hits", right="main", paths=["d/one.txt"])]


@pytest.mark.slow  # about 13 s: 200 results
def test_200_disjoint_results_are_read_in_one_git_process_and_merge_none(repo: Path) -> None:
    base = git(repo, "rev-parse", "base")
    commits = [(f"t{i}", change(repo, base, {f"out/t{i}.txt": f"{i}\n"})) for i in range(200)]
    found, calls = predict(repo, commits, base, base)
    assert found == []
    assert calls == 1  # one log of them all (the target is the base): no merge-tree
    # Eight of them also touching one file: the 28 pairs among them, and no other, merged.
    text = git(repo, "show", "base:shared.txt") + "\n"
    for i in range(8):
        commits[i] = (f"t{i}", change(repo, commits[i][1], {"shared.txt": text + f"{i}\n"}))
    found, calls = predict(repo, commits, base, base)
    assert calls == 1 + 28
    assert len(found) == 28 and all(c.paths == ["shared.txt"] for c in found)


def test_candidate_pairs_are_the_pairs_that_may_conflict() -> None:
    def t(*changes: tuple[str, str], commits: tuple[str, ...] = ("c",)) -> Touched:
        return Touched.of(commits, changes)

    items: list[Touched | None] = [
        t(("A", "a/x.txt"), commits=("1",)),
        t(("M", "a/x.txt"), commits=("2",)),
        t(("A", "a"), commits=("3",)),  # a file where the others have a directory
        t(("D", "b/old.txt"), commits=("4",)),
        t(("A", "b/c/new.txt"), commits=("5",)),  # an addition where 3 removed
        t(("A", "z.txt"), commits=("6", "7")),
        t(("A", "y.txt"), commits=("7",)),  # shares commit 7 with the one before
        None,  # unknown: every pair
        t(("A", "lonely.txt"), commits=("8",)),
        # After the unknown one, indexed as well: a file where 0 and 1 have a directory, a
        # removal from where 4 added, a removal from where nobody added.
        t(("A", "b/c"), commits=("9",)),
        t(("D", "a/gone.txt"), commits=("10",)),
        t(("D", "nobody/adds/here.txt"), commits=("11",)),
    ]
    expected = {
        (i, j)
        for i in range(len(items))
        for j in range(i + 1, len(items))
        if items[i] is None or items[j] is None or may_conflict(items[i], items[j])  # type: ignore[arg-type]
    }
    assert set(candidate_pairs(items)) == expected
    assert {(0, 1), (0, 2), (1, 2), (3, 4), (5, 6), (4, 9), (0, 10), (2, 10)} <= expected
    assert (0, 8) not in expected and (3, 8) not in expected


def test_no_byte_of_a_path_passes_for_a_commit_in_the_log(repo: Path) -> None:
    """An agent names a file with a \\x01 and another result's commit after it: it must not
    make that result look merged already, nor hide its own changes, nor fake descent."""
    base = git(repo, "rev-parse", "base")
    text = git(repo, "show", "base:shared.txt") + "\n"
    b = change(repo, base, {"b.txt": "b\n", "shared.txt": text.replace("line 9\n", "nine\n")})
    a = change(repo, base, {f"note\x01>{b} {base}": "x\n", "a\x01-": "y\n"})
    a2 = change(repo, a, {"shared.txt": text.replace("line 9\n", "NINE\n")})
    elsewhere = change(repo, git(repo, "rev-parse", "main"), {f"\x01-{base}": "z\n"})
    found = both_ways(repo, [("a", a2), ("b", b), ("elsewhere", elsewhere)])
    assert {(c.left, c.right) for c in found} >= {("a", "b")}
    logs = [anyio.run(touched, Git(repo), base, c) for c in (a2, b, elsewhere)]
    assert logs[0] is not None and b not in logs[0].commits
    assert {f"note\x01>{b} {base}", "a\x01-", "shared.txt"} <= logs[0].paths
    assert logs[2] is None  # does not descend from the base, whatever its paths say


@pytest.mark.parametrize("where", ["gitmodules", "config"])
def test_submodule_settings_hide_no_change_from_the_prediction(repo: Path, where: str) -> None:
    """A .gitmodules with ignore = all (the repository's own content, checked out) or
    diff.ignoreSubmodules = all in the config hides gitlink changes from git log by default;
    merge-tree still sees them, so the prediction must too."""
    base = git(repo, "rev-parse", "base")
    modules = '[submodule "lib"]\n\tpath = lib\n\turl = ./lib\n\tignore = all\n'
    start = change(repo, base, {".gitmodules": modules})
    git(repo, "update-ref", "refs/heads/base", start)
    if where == "gitmodules":
        (repo / ".gitmodules").write_text(modules)  # git log reads the checkout's
    else:
        git(repo, "config", "diff.ignoreSubmodules", "all")

    def gitlink(parent: str, target: str) -> str:
        env = {**os.environ, **ENV, "GIT_INDEX_FILE": str(repo / ".git" / "link-index")}
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", *a], cwd=repo, env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        run("read-tree", parent)
        run("update-index", "--add", "--cacheinfo", f"160000,{target},lib")
        tree = run("write-tree")
        Path(env["GIT_INDEX_FILE"]).unlink()
        return run("commit-tree", tree, "-p", parent, "-m", "link")

    first, other = base, git(repo, "rev-parse", "main")
    a, b = gitlink(start, first), gitlink(start, other)
    found = both_ways(repo, [("a", a), ("b", b)])
    assert [(c.left, c.right, c.paths) for c in found] == [("a", "b", ["lib"])]


def test_a_result_that_is_the_base_is_held_by_the_target_and_gets_no_merge(repo: Path) -> None:
    """A dependent task that reset its work to the base: its result is the base, which the
    target holds; no merge commit is made for it (as git's own ancestry check says)."""
    base = git(repo, "rev-parse", "base")
    assert anyio.run(touched, Git(repo), base, base) == Touched.of((), ())
    other = change(repo, base, {"other.txt": "x\n"})
    git(repo, "update-ref", "refs/heads/target", base)  # checked out nowhere
    elsewhere = change(repo, base, {"tried.txt": "t\n"})  # where the task started
    report = merge_report(repo, base, {"reset": base, "other": other}, {"reset": elsewhere})
    record = anyio.run(lambda: merge_results(report, into="target", repo=repo))
    assert record.status == "merged", record.message
    made = {t.task_id: t.merge_commit for t in record.tasks}
    assert made["reset"] is None and made["other"] is not None


def merge_report(
    repo: Path, base: str, results: dict[str, str], starts: dict[str, str] | None = None
) -> Report:
    """A sealed report whose tasks' results are *results* (task id to commit), each on its
    branch, started from *starts* (else the base)."""
    from datetime import UTC, datetime

    from envelopes import AgentInfo, Provenance, TaskResult, Timings, digest, seal_result
    from orchestrator.report import aggregate_results

    run_id = "20261206-000000-abcdef"
    stamp = datetime.now(UTC)
    info = AgentInfo(kind="callable", qualname="agent")
    made = []
    for task_id, commit in results.items():
        git(repo, "update-ref", f"refs/heads/orchestrator/{run_id}/{task_id}", commit)
        made.append(
            seal_result(
                TaskResult(
                    task_id=task_id,
                    agent="a",
                    status="succeeded",
                    attempts=1,
                    output={},
                    timings=Timings(started_at=stamp, finished_at=stamp, duration_s=0.0),
                    branch=f"orchestrator/{run_id}/{task_id}",
                    provenance=Provenance(
                        envelope_sha256="e" * 64,
                        base_commit=(starts or {}).get(task_id, base),
                        result_commit=commit,
                        agent=info,
                        agent_sha256=digest(info.model_dump(mode="json")),
                        output_sha256=digest({}),
                    ),
                )
            )
        )
    return aggregate_results(
        made,
        run_id=run_id,
        plan_name="p",
        plan_sha256="a" * 64,
        repo=str(repo),
        base_ref="main",
        base_commit=base,
        run_dir=repo / ".git" / "orchestrator" / "runs" / run_id,
        started_at=stamp,
        finished_at=stamp,
    )


def test_a_case_insensitive_config_changes_no_merged_tree(repo: Path) -> None:
    """core.ignorecase (git init sets it on macOS and Windows) must not make the one-process
    build match paths by case: the target's LICENSE and a result's License both stay."""
    git(repo, "config", "core.ignorecase", "true")
    base = git(repo, "rev-parse", "base")
    target = change(repo, base, {"LICENSE": "the target's\n"})
    result = change(repo, base, {"License": "the result's\n"})
    git(repo, "update-ref", "refs/heads/target", target)
    report = merge_report(repo, base, {"r": result})
    record = anyio.run(lambda: merge_results(report, into="target", repo=repo))
    assert record.status == "merged", record.message
    assert git(repo, "show", "target:LICENSE") == "the target's"
    assert git(repo, "show", "target:License") == "the result's"


def test_a_hand_made_tree_fast_import_refuses_is_merged_the_other_way(repo: Path) -> None:
    """A result whose tree holds a name git would never write ("..") is merged as
    merge-tree merges it, and fast-import's crash report (the stream) is not left behind."""
    base = git(repo, "rev-parse", "base")
    blob = git(repo, "rev-parse", "base:d/one.txt")
    entry = b"100644 ..\0" + bytes.fromhex(blob)
    inner = (
        subprocess.run(
            ["git", "hash-object", "-w", "--literally", "-t", "tree", "--stdin"],
            cwd=repo,
            input=entry,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .strip()
    )
    listing = git(repo, "ls-tree", "base").splitlines()
    top = "\n".join([*listing, f"040000 tree {inner}\tweird"]) + "\n"
    tree = (
        subprocess.run(
            ["git", "mktree"], cwd=repo, input=top.encode(), capture_output=True, check=True
        )
        .stdout.decode()
        .strip()
    )
    env = {**os.environ, **ENV}
    odd = subprocess.run(
        ["git", "commit-tree", tree, "-p", base, "-m", "odd"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    other = change(repo, base, {"other.txt": "x\n"})
    git(repo, "update-ref", "refs/heads/target", base)
    report = merge_report(repo, base, {"odd": odd, "other": other})
    record = anyio.run(lambda: merge_results(report, into="target", repo=repo))
    assert record.status == "merged", record.message
    assert git(repo, "rev-parse", "target:weird") == inner
    assert not list((repo / ".git").glob("fast_import_crash_*"))


def test_a_log_longer_than_the_bound_is_not_held_and_falls_back_the_old_way(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent's result with a log too long to hold (many paths, many commits) is read only
    up to the bound; it is then checked the old way (merge-tree), the prediction the same."""
    import orchestrator.overlap as overlap

    base = git(repo, "rev-parse", "base")
    long = change(repo, base, {f"many/{i:04d}.txt": f"{i}\n" for i in range(200)})
    short = change(repo, base, {"b.txt": "b\n"})
    assert anyio.run(touched, Git(repo), base, long) is not None
    monkeypatch.setattr(overlap, "MAX_LOG_BYTES", 4096)
    held: list[int] = []
    read = Git.read

    async def reading(self: Git, *args: str, **kwargs: object) -> tuple[bytes, bool]:
        out, cut = await read(self, *args, **kwargs)  # type: ignore[arg-type]
        held.append(len(out))
        return out, cut

    monkeypatch.setattr(Git, "read", reading)
    assert anyio.run(touched, Git(repo), base, long) is None
    assert held == [4096]
    assert anyio.run(touched, Git(repo), base, short) is not None
    assert both_ways(repo, [("long", long), ("short", short)]) == []


def test_a_revision_that_is_no_object_id_never_reaches_git(repo: Path) -> None:
    base = git(repo, "rev-parse", "base")
    runner = Git(repo)
    for args in (("--output=/tmp/x", base), (base, "HEAD")):
        with pytest.raises(GitError, match="not an object id"):
            anyio.run(touched, runner, *args)
    assert runner.calls == 0


def test_a_change_made_by_a_merge_commit_itself_is_seen(repo: Path) -> None:
    """A result whose merge commit adds a file of its own (a conflict resolved by hand, an
    "evil" merge): that file is among its changes, and a result adding it too conflicts."""
    base = git(repo, "rev-parse", "base")
    side = change(repo, base, {"side.txt": "side\n"})
    merged = change(repo, side, {"resolved.txt": "the merge's own\n"}, parents=(base,))
    other = change(repo, base, {"resolved.txt": "another\n"})
    log = anyio.run(touched, Git(repo), base, merged)
    assert log is not None and {"side.txt", "resolved.txt"} <= log.paths
    found = both_ways(repo, [("merged", merged), ("other", other)])
    assert [(c.left, c.right, c.paths) for c in found] == [("merged", "other", ["resolved.txt"])]


def test_a_file_name_that_is_not_utf8_is_compared_as_its_bytes(repo: Path) -> None:
    """File names are bytes to git: one that is not UTF-8 is read, compared and merged as
    any other."""
    base = git(repo, "rev-parse", "base")
    name = b"caf\xe9.txt".decode("utf-8", "surrogateescape")
    first = change(repo, base, {name: "first\n"})
    second = change(repo, base, {name: "second\n"})
    log = anyio.run(touched, Git(repo), base, first)
    assert log is not None and log.paths == {name}
    found = both_ways(repo, [("first", first), ("second", second)])
    assert [(c.left, c.right) for c in found] == [("first", "second")]


def test_disjoint_results_that_remove_files_are_merged_in_a_bounded_number_of_processes(
    repo: Path,
) -> None:
    """Results that remove files (in a directory no other adds to) and add others, none
    touching another's: merged in one build from their logs, the removals applied."""
    from orchestrator import Repository

    base = git(repo, "rev-parse", "base")
    results = {
        "drop": change(repo, base, remove=("old.txt",)),
        "inner": change(repo, base, remove=("d/one.txt",)),
        **{f"add{i}": change(repo, base, {f"new/{i}.txt": f"{i}\n"}) for i in range(6)},
    }
    git(repo, "update-ref", "refs/heads/target", base)
    report = merge_report(repo, base, results)

    async def main() -> tuple[int, str]:
        repository = await Repository.open(repo)
        before = repository.git.calls
        record = await merge_results(report, into="target", repo=repository)
        repository.lock.close()
        return repository.git.calls - before, record.status

    calls, status = anyio.run(main)
    assert status == "merged"
    listed = git(repo, "ls-tree", "-r", "--name-only", "target").split()
    assert "old.txt" not in listed and "d/one.txt" not in listed and "d/two.txt" in listed
    assert {f"new/{i}.txt" for i in range(6)} <= set(listed)
    assert calls <= len(results) + 10, calls


def test_in_a_sha256_repository_only_overlapping_results_are_merged(tmp_path: Path) -> None:
    """Object ids of 64 digits are read as those of 40: the prediction stays linear."""
    repo = tmp_path / "sha256"
    made = subprocess.run(
        ["git", "init", "--quiet", "--object-format=sha256", str(repo)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip("this git cannot make a SHA-256 repository")
    git(repo, "commit", "--quiet", "--allow-empty", "-m", "initial")
    base = change(repo, git(repo, "rev-parse", "HEAD"), {"shared.txt": "one\ntwo\n"})
    assert len(base) == 64
    commits = [(f"t{i}", change(repo, base, {f"out/{i}.txt": f"{i}\n"})) for i in range(6)]
    commits += [(f"s{i}", change(repo, base, {"shared.txt": f"{i}\ntwo\n"})) for i in range(2)]
    log = anyio.run(touched, Git(repo), base, commits[0][1])
    assert log is not None and log.paths == {"out/0.txt"}
    found, calls = predict(repo, commits, base, base)
    assert [(c.left, c.right, c.paths) for c in found] == [("s0", "s1", ["shared.txt"])]
    assert calls == 1 + 1  # one log of them all, and one merge-tree
    assert predict(repo, commits, base, None)[0] == found


def test_a_log_that_is_not_what_was_asked_for_is_not_trusted() -> None:
    """Another git, or a setting, that prints the log otherwise makes the result be checked
    the old way (None), never misread: a mark, an id or a change header out of format, or a
    change with no path."""
    from orchestrator.overlap import _parse_log

    base, result, blob = "b" * 40, "c" * 40, "d" * 40
    head = f"\x01>{result} {base}\0".encode()
    entry = f"\n:000000 100644 {'0' * 40} {blob} A\0a.txt\0".encode()
    tail = f"\x01-{base}\0".encode()
    assert _parse_log(head + entry + tail, base) == (
        [result],
        [("A", "a.txt")],
        {b"a.txt": (b"100644", blob.encode())},
    )
    broken = [
        head.replace(b">", b"<") + entry + tail,  # a mark not asked for
        head.replace(result.encode(), result[:12].encode()) + entry + tail,  # an id cut short
        b"\x01>\0" + entry + tail,  # no id at all
        head + entry.replace(b" A\0", b"\0") + tail,  # a header of four fields
        head + tail + entry.split(b"\0")[0],  # a header and no path after it
    ]
    assert [_parse_log(data, base) for data in broken] == [None] * len(broken)


def is_ancestor(repo: Path, commit: str, of: str) -> bool:
    done = subprocess.run(["git", "-C", str(repo), "merge-base", "--is-ancestor", commit, of])
    return done.returncode == 0


def each_and_together(repo: Path, base: str, commits: list[str]) -> list[Touched | None]:
    """touched_together of *commits*, checked against touched of each: the same, final
    states included (which Touched's equality leaves out); and one git process."""
    runner = Git(repo)
    together = anyio.run(touched_together, runner, base, commits)
    # One more for each that is an ancestor of the base (a log of its own says so).
    ancestors = {c for c in set(commits) - {base} if is_ancestor(repo, c, base)}
    assert runner.calls == (1 + len(ancestors) if set(commits) - {base} else 0)
    each = [anyio.run(touched, Git(repo), base, commit) for commit in commits]
    assert together == each
    assert [t and t.final for t in together] == [t and t.final for t in each]
    return together


def test_one_log_of_all_results_says_what_a_log_of_each_says(repo: Path) -> None:
    """Results that share commits (one built on another, one that merged another), a merge
    that makes a change of its own, a file removed, results that do not descend from the
    base (another line of history, one of the base's ancestors, a root commit), the base
    itself, and a result named twice: each gets from the one log what its own log says."""
    base = git(repo, "rev-parse", "base")
    text = git(repo, "show", "base:shared.txt")
    first = change(repo, base, {"a.txt": "a\n", "shared.txt": text + "first\n"})
    on_first = change(repo, first, {"b.txt": "b\n", "a.txt": "a again\n"}, remove=("old.txt",))
    side = change(repo, base, {"side.txt": "side\n"})
    merged = change(repo, on_first, {"own.txt": "the merge's own\n"}, parents=(side,))
    elsewhere = change(repo, git(repo, "rev-parse", "main"), {"other.txt": "x\n"})
    ancestor = git(repo, "rev-parse", "base~1")
    tree = git(repo, "rev-parse", "base^{tree}")
    root = subprocess.run(
        ["git", "commit-tree", tree, "-m", "root"],
        cwd=repo,
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    commits = [first, on_first, merged, side, elsewhere, ancestor, root, base, first]
    together = each_and_together(repo, base, commits)
    assert [t is None for t in together] == [False] * 4 + [True] * 3 + [False] * 2
    assert together[1] is not None and together[1].commits == {first, on_first}
    assert together[1].final is not None and together[1].final[b"old.txt"] is None
    assert together[2] is not None and together[2].final is None  # a merge among them
    assert together[7] == Touched.of((), ())
    # Only what is not the base, or named, costs nothing.
    assert each_and_together(repo, base, [base, base]) == [Touched.of((), ())] * 2
    assert each_and_together(repo, base, [side]) == [anyio.run(touched, Git(repo), base, side)]


def test_a_log_of_all_too_long_to_hold_reads_each_on_its_own(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the one log of every result is longer than the bound, none of it is trusted:
    each result's own log is read, so only a result whose own log is too long goes unknown
    (checked the old way); the prediction is the same."""
    import orchestrator.overlap as overlap

    base = git(repo, "rev-parse", "base")
    small = [change(repo, base, {f"s{i}.txt": f"{i}\n"}) for i in range(3)]
    big = change(repo, base, {f"many/{i:04d}.txt": f"{i}\n" for i in range(60)})
    single = anyio.run(touched, Git(repo), base, big)
    monkeypatch.setattr(overlap, "MAX_LOG_BYTES", 4096)
    runner = Git(repo)
    assert anyio.run(touched_together, runner, base, [*small, big]) is None
    assert runner.calls == 1
    assert anyio.run(touched_together, Git(repo), base, small) is not None  # within the bound
    found, calls = predict(
        repo, [(f"s{i}", c) for i, c in enumerate(small)] + [("big", big)], base, base
    )
    assert found == [] and single is not None
    # The log of all, one of each, and merge-tree of the big one against each other result
    # and the target.
    assert calls == 1 + 4 + 4


def test_one_log_of_all_refuses_a_name_that_is_no_object_id(repo: Path) -> None:
    base = git(repo, "rev-parse", "base")
    runner = Git(repo)
    for names in (["--output=/tmp/x"], [base, "HEAD"], [base, "^" + base]):
        with pytest.raises(GitError, match="not an object id"):
            anyio.run(touched_together, runner, base, names)
    assert runner.calls == 0


def test_one_log_of_all_says_what_each_says_of_an_annotated_tag(repo: Path) -> None:
    """A result named by an annotated tag's id (an object id, so check_ids lets it by, and
    git log peels it): its own log reads its commits; the one log lists the commit, not
    the tag, so the walk finds no such commit and says None (unknown)."""
    base = git(repo, "rev-parse", "base")
    first = change(repo, base, {"a.txt": "a\n"})
    git(repo, "tag", "-a", "-m", "t", "result-tag", first)
    tag = git(repo, "rev-parse", "result-tag")
    assert tag != first and git(repo, "cat-file", "-t", tag) == "tag"
    each = [anyio.run(touched, Git(repo), base, c) for c in (first, tag)]
    together = anyio.run(touched_together, Git(repo), base, [first, tag])
    assert each[1] is not None and each[1].paths == {"a.txt"}
    assert together == each


def test_one_log_of_tens_of_thousands_of_results_is_no_oserror(repo: Path) -> None:
    """Every result an argument of one git: 60,000 ids (41 bytes each) pass Linux's 2 MiB
    bound on a command's arguments, and open_process raised OSError (E2BIG), which
    _touched_all does not catch: the merge failed where a log each had worked."""
    import secrets

    base = git(repo, "rev-parse", "base")
    ids = [secrets.token_hex(20) for _ in range(60_000)]  # none in the repository: git says so
    assert anyio.run(touched_together, Git(repo), base, ids) is None


def test_one_log_of_all_that_is_not_what_was_asked_for_is_not_trusted() -> None:
    """As for one result's log: a mark, an id or a change header out of format, a change
    with no path, or a change before any commit makes the one log of them all unused
    (None: each result's own log is read instead), never misread."""
    from orchestrator.overlap import _parse_union

    base, result, blob = "b" * 40, "c" * 40, "d" * 40
    head = f"\x01>{result} {base}\0".encode()
    entry = f"\n:000000 100644 {'0' * 40} {blob} A\0a.txt\0".encode()
    tail = f"\x01-{base}\0".encode()
    graph = _parse_union(head + entry + tail)
    assert graph is not None and list(graph) == [result]
    assert graph[result].parents == [base]
    assert graph[result].changes == [(b"A", b"a.txt", b"100644", blob.encode())]
    broken = [
        head.replace(b">", b"<") + entry + tail,  # a mark not asked for
        head.replace(result.encode(), result[:12].encode()) + entry + tail,  # an id cut short
        head.replace(f" {base}".encode(), b" HEAD") + entry + tail,  # a parent that is no id
        b"\x01>\0" + entry + tail,  # no id at all
        head + entry.replace(b" A\0", b"\0") + tail,  # a header of four fields
        head + tail + entry.split(b"\0")[0],  # a header and no path after it
        entry + head + tail,  # a change before any commit
    ]
    assert [_parse_union(data) for data in broken] == [None] * len(broken)
    # A boundary commit's changes are the base's side, not a result's: skipped, even when
    # the boundary comes before any commit listed, and never taken for a malformed log.
    assert _parse_union(tail + entry + head + entry) == {
        result: _parse_union(head + entry)[result]  # type: ignore[index]
    }
    assert _parse_union(tail + entry) == {}


def test_one_log_of_all_gives_a_path_changed_by_many_commits_its_last_state(repo: Path) -> None:
    """A result of many commits that each rewrote one file: its final state is the last
    commit's (the log's order, a child before its parents), whatever order their ids sort
    in; and a base that is no object id never reaches git."""
    base = git(repo, "rev-parse", "base")
    tip = base
    for i in range(12):
        tip = change(repo, tip, {"same.txt": f"{i}\n"})
    [found] = each_and_together(repo, base, [tip])
    assert found is not None and found.final is not None
    last = git(repo, "rev-parse", f"{tip}:same.txt")
    assert found.final[b"same.txt"] == (b"100644", last.encode())
    runner = Git(repo)
    with pytest.raises(GitError, match="not an object id"):
        anyio.run(touched_together, runner, "HEAD", [tip])
    assert runner.calls == 0


def test_a_log_longer_than_its_bound_is_not_returned_in_part(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import orchestrator.overlap as overlap

    base = git(repo, "rev-parse", "base")
    tip = change(repo, base, {f"many/{i:03d}.txt": f"{i}\n" for i in range(20)})
    assert anyio.run(overlap._log, Git(repo), base, [tip]) is not None
    monkeypatch.setattr(overlap, "MAX_LOG_BYTES", 64)
    assert anyio.run(overlap._log, Git(repo), base, [tip]) is None
