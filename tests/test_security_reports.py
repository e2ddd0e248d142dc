"""A report from elsewhere is hostile: verify and merge of crafted reports (issue 10, findings 1-3).

Each test is an attack as the adversarial review described it, re-sealed so that only the
hostile field is wrong, and asserts the safe outcome: no file touched outside the run
directory, no hang, no traceback, one clear line and exit 2 (or a finding and exit 1), and no
ref of any repository moved.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import build_envelope, digest_without, report_digest, report_layout
from orchestrator import orchestrate_parallel

from .conftest import MakeRepo, cli, git


async def _write(envelope: Any, workspace: Any) -> dict[str, Any]:
    (workspace.path / f"{envelope.task_id}.txt").write_text(f"{envelope.task_id}\n")
    return {"ok": True}


def run_report(repo: Path, ids: tuple[str, ...] = ("a", "b")) -> Path:
    """A real run in *repo* (callable agents, no venv); the path of its report.json."""
    envelopes = [build_envelope("w", f"write {i}", task_id=i, venv=False) for i in ids]
    report = anyio.run(lambda: orchestrate_parallel(envelopes, repo=repo, agents={"w": _write}))
    assert report.summary.successful == len(ids)
    return Path(report.run_dir) / "report.json"


def reseal(raw: dict[str, Any]) -> bytes:
    """Recompute every digest as a forger would; the bytes as the orchestrator lays them out."""
    for result in raw["results"]:
        result["provenance"]["result_sha256"] = digest_without(
            result, "provenance", "result_sha256"
        )
    raw["report_sha256"] = report_digest(raw)
    return report_layout(raw)


def forge(path: Path, target: Path, edit: Any) -> Path:
    raw = json.loads(path.read_text())
    edit(raw)
    target.write_bytes(reseal(raw))
    return target


def no_traceback(outcome: Any) -> None:
    assert "Traceback" not in outcome.err + outcome.out
    assert len(outcome.err.strip().splitlines()) <= 1, outcome.err


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


def test_verify_never_passes_a_revision_from_a_report_to_git_as_an_option(
    make_repo: MakeRepo, tmp_path: Path, victim: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 1 (critical): ``--output=VICTIM`` as a base commit truncated VICTIM."""
    repo = make_repo()
    path = run_report(repo, ("a", "b", "c"))

    def attack(raw: dict[str, Any]) -> None:
        raw["repo"] = "."
        a, b, c = raw["results"]
        a["provenance"]["result_commit"] = "HEAD"
        b["provenance"]["result_commit"] = "HEAD~0"
        c["depends_on"] = ["a", "b"]
        c["provenance"]["base_commit"] = f"--output={victim}"

    forged = forge(path, tmp_path / "forged.json", attack)
    with contextlib.chdir(repo):
        outcome = cli(capsys, "verify", str(forged))
    assert outcome.code == 2
    assert "is not a valid report" in outcome.err
    assert "results.0.provenance.result_commit" in outcome.err
    no_traceback(outcome)
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("base_commit", "--output={victim}"),
        ("results.0.provenance.base_commit", "--output={victim}"),
        ("results.0.provenance.result_tree", "HEAD^{{tree}}"),
        ("results.0.branch", "--output={victim}"),
        ("merge.0.merge_commit", "--output={victim}"),
        ("merge.0.old_commit", "HEAD"),
        ("merge.0.into", "--output={victim}"),
        ("run_id", "../../../../tmp/x"),
        ("results.0.task_id", "--output=x"),
        ("results.0.envelope.path", "../../../../../../../../../../../../dev/zero"),
        ("results.0.envelope.path", "/dev/zero"),
        ("results.0.attempt_log.0.stdout.path", "logs/../../../../etc/passwd"),
    ],
)
def test_every_field_git_or_the_file_system_sees_is_validated_first(
    where: str,
    value: str,
    make_repo: MakeRepo,
    tmp_path: Path,
    victim: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Finding 1 and 2: object ids, branch names, ids and paths are checked before any use."""
    repo = make_repo()
    path = run_report(repo, ("a",))
    value = value.format(victim=victim)

    def attack(raw: dict[str, Any]) -> None:
        if where.startswith("merge."):
            commit = raw["results"][0]["provenance"]["result_commit"]
            raw["merge"] = [
                {
                    "into": "main",
                    "status": "merged",
                    "old_commit": raw["base_commit"],
                    "new_commit": commit,
                    "tasks": [{"task_id": "a", "result_commit": commit, "merge_commit": commit}],
                    "conflicts": [],
                    "message": "",
                    "at": raw["finished_at"],
                }
            ]
        if where.endswith("stdout.path") and raw["results"][0]["attempt_log"][0]["stdout"] is None:
            raw["results"][0]["attempt_log"][0]["stdout"] = {
                "path": "x",
                "sha256": "0" * 64,
                "size": 0,
            }
        if where.endswith("envelope.path") and raw["results"][0]["envelope"] is None:
            pytest.skip("no envelope file")
        *parents, last = where.split(".")
        node: Any = raw
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value

    forged = forge(path, tmp_path / "forged.json", attack)
    with contextlib.chdir(repo):
        outcome = cli(capsys, "verify", str(forged))
        merged = cli(capsys, "merge", str(forged), "--into", "main")
    for result in (outcome, merged):
        assert result.code == 2, result
        assert "is not a valid report" in result.err
        no_traceback(result)
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "x").exists()


def test_bounded_reads_of_what_a_report_points_at(
    make_repo: MakeRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 2: a run_dir of /dev, a FIFO plan.json, a symlinked log: findings, never a hang."""
    repo = make_repo()
    path = run_report(repo, ("a",))
    run_dir = path.parent

    # run_dir: /dev, with a log named zero: a device, refused without reading it.
    def at_dev(raw: dict[str, Any]) -> None:
        raw["run_dir"] = "/dev"
        raw["results"][0]["envelope"] = {"path": "zero", "sha256": "0" * 64, "size": 10}

    forged = forge(path, tmp_path / "dev.json", at_dev)
    outcome = cli(capsys, "verify", str(forged))
    assert outcome.code == 1
    assert "cannot read 'zero' in /dev: not a regular file" in outcome.out
    no_traceback(outcome)

    # A FIFO plan.json and a log that is a link to /dev/zero, in a copy of the run directory.
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(run_dir), str(copy)], check=True)
    (copy / "plan.json").unlink()
    os.mkfifo(copy / "plan.json")
    envelope = json.loads((copy / "report.json").read_text())["results"][0]["envelope"]["path"]
    (copy / envelope).unlink()
    (copy / envelope).symlink_to("/dev/zero")
    outcome = cli(capsys, "verify", str(copy / "report.json"), "--run-dir", str(copy))
    assert outcome.code == 1
    assert "plan.json: not a regular file" in outcome.out
    assert "a symbolic link or passes through one" in outcome.out
    no_traceback(outcome)

    # A directory on the way that is a link out of the run directory.
    os.unlink(copy / envelope)
    outside = tmp_path / "outside"
    outside.mkdir()
    (copy / "envelopes").rename(tmp_path / "moved")
    (copy / "envelopes").symlink_to(tmp_path / "moved")
    outcome = cli(capsys, "verify", str(copy / "report.json"), "--run-dir", str(copy))
    assert outcome.code == 1
    assert "a symbolic link or passes through one" in outcome.out


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("deep", b'{"schema": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("digits", b'{"schema": "worktree-orchestrator/report/v1", "x": ' + b"9" * 5000 + b"}"),
        ("exponent", b'{"schema": "worktree-orchestrator/report/v1", "x": 1e999}'),
        ("nan", b'{"schema": "worktree-orchestrator/report/v1", "x": NaN}'),
        ("binary", b"\xff\xfe\x00"),
    ],
)
def test_hostile_json_is_a_clear_error(
    name: str, content: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 2: 100,000-deep JSON and a 5,000-digit number are exit 2, not a traceback."""
    path = tmp_path / f"{name}.json"
    path.write_bytes(content)
    for command in ("verify", "merge"):
        extra = ["--into", "main"] if command == "merge" else []
        outcome = cli(capsys, command, str(path), *extra)
        assert outcome.code == 2, outcome
        assert outcome.err.startswith(f"orchestrator: {path} is not JSON") or (
            "cannot read" in outcome.err
        )
        no_traceback(outcome)


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_a_report_that_is_not_a_regular_file_is_refused_without_blocking(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if kind == "fifo":
        path = tmp_path / "report.json"
        os.mkfifo(path)
    elif kind == "device":
        path = Path("/dev/zero")
    else:
        path = tmp_path
    outcome = cli(capsys, "verify", str(path))
    assert outcome.code == 2
    assert "not a regular file" in outcome.err or "Is a directory" in outcome.err
    no_traceback(outcome)


def test_merge_acts_on_the_repository_it_runs_in_not_the_one_the_report_names(
    make_repo: MakeRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 3: merge run in X of a report naming Y moved Y's main without saying so."""
    theirs, mine = make_repo(name="theirs"), make_repo(name="mine")
    path = run_report(theirs, ("a",))
    before = {r: git(r, "rev-parse", "main") for r in (theirs, mine)}
    with contextlib.chdir(mine):
        outcome = cli(capsys, "merge", str(path), "--into", "main")
    assert outcome.code == 2
    assert f"was made in {theirs}, not in {mine} where merge runs" in outcome.err
    no_traceback(outcome)
    assert {r: git(r, "rev-parse", "main") for r in (theirs, mine)} == before
    # Told explicitly, it merges where it is told (here the commits are not there: refused).
    with contextlib.chdir(mine):
        outcome = cli(capsys, "merge", str(path), "--into", "main", "--repo", str(mine))
    assert outcome.code == 2
    assert "not found in the repository" in outcome.err
    assert {r: git(r, "rev-parse", "main") for r in (theirs, mine)} == before


def test_merge_takes_only_object_ids_and_writes_nothing_where_the_report_points(
    make_repo: MakeRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 3: ``result_commit: evil`` (a branch name) was merged; report.mutex was made in
    the report's run_dir."""
    repo = make_repo()
    path = run_report(repo, ("a",))
    git(repo, "branch", "evil", "main")
    elsewhere = tmp_path / "attacker-chosen"
    elsewhere.mkdir()

    def evil(raw: dict[str, Any]) -> None:
        raw["results"][0]["provenance"]["result_commit"] = "evil"

    def moved(raw: dict[str, Any]) -> None:
        raw["run_dir"] = str(elsewhere)

    before = git(repo, "rev-parse", "main")
    with contextlib.chdir(repo):
        outcome = cli(
            capsys, "merge", str(forge(path, tmp_path / "evil.json", evil)), "--into", "main"
        )
        assert outcome.code == 2
        assert "is not a valid report" in outcome.err
        assert git(repo, "rev-parse", "main") == before
        copy = forge(path, tmp_path / "copy.json", moved)
        outcome = cli(capsys, "merge", str(copy), "--into", "main")
    assert outcome.code == 0, outcome
    assert list(elsewhere.iterdir()) == []
    assert json.loads(copy.read_text())["merge"][0]["status"] == "merged"


def test_verify_in_a_subprocess_of_a_crafted_report_exits_2_quickly(
    make_repo: MakeRepo, tmp_path: Path, victim: Path
) -> None:
    """The whole attack through the real command line, as a user would run it."""
    repo = make_repo()
    path = run_report(repo, ("a", "b", "c"))

    def attack(raw: dict[str, Any]) -> None:
        raw["repo"] = "."
        raw["results"][2]["depends_on"] = ["a", "b"]
        raw["results"][2]["provenance"]["base_commit"] = f"--output={victim}"

    forged = forge(path, tmp_path / "forged.json", attack)
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "verify", str(forged)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert victim.read_text() == "precious\n"


def test_a_report_of_an_earlier_version_without_warnings_still_verifies(
    make_repo: MakeRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = make_repo()
    path = run_report(repo, ("a",))

    def earlier(raw: dict[str, Any]) -> None:
        assert raw.pop("warnings") == []

    old = forge(path, tmp_path / "old.json", earlier)
    outcome = cli(capsys, "verify", str(old), "--run-dir", str(path.parent))
    assert outcome.code == 0, outcome
    # A warning removed from a report that had one is caught: the seal covers it.
    raw = json.loads(path.read_text())
    raw["warnings"] = ["refs/heads/main moved during the run"]
    raw["report_sha256"] = report_digest(raw)
    tampered = tmp_path / "tampered.json"
    tampered.write_bytes(report_layout(raw))
    raw.pop("warnings")
    tampered.write_bytes(report_layout(raw))
    assert cli(capsys, "verify", str(tampered), "--run-dir", str(path.parent)).code == 1


def test_runs_and_gc_do_not_block_on_what_an_agent_left_in_the_state_directory(
    make_repo: MakeRepo, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a sandbox an agent can write the run directory: a FIFO there blocks nothing."""
    repo = make_repo()
    path = run_report(repo, ("a",))
    for name in ("report.json", "plan.json"):
        (path.parent / name).unlink()
        os.mkfifo(path.parent / name)
    with contextlib.chdir(repo):
        listed = cli(capsys, "runs")
        collected = cli(capsys, "gc", "--dry-run")
    assert listed.code == 0, listed
    assert collected.code == 0, collected
    no_traceback(listed)


async def _edit_own_line(envelope: Any, workspace: Any) -> dict[str, Any]:
    """Tasks a and b each change their own line of one file: merging them merges its text."""
    shared = workspace.path / "shared.txt"
    lines = shared.read_text().splitlines(keepends=True)
    at = {"a": 0, "b": len(lines) - 1}.get(envelope.task_id)
    if at is not None:
        lines[at] = f"{envelope.task_id}\n"
    shared.write_text("".join(lines))
    return {"ok": True}


def test_verify_runs_no_merge_driver_of_a_repository_the_report_names(
    make_repo: MakeRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Recomputing a dependency merge in the report's repository would run its drivers (a
    and b changed one file: merging them runs the file's merge driver)."""
    repo = make_repo(extra={"shared.txt": "".join(f"{n}\n" for n in range(8))})
    ran = tmp_path / "ran"
    envelopes = [
        build_envelope("w", "a", task_id="a", venv=False),
        build_envelope("w", "b", task_id="b", venv=False),
        build_envelope("w", "c", task_id="c", venv=False, depends_on=["a", "b"]),
    ]
    report = anyio.run(
        lambda: orchestrate_parallel(envelopes, repo=repo, agents={"w": _edit_own_line})
    )
    path = Path(report.run_dir) / "report.json"
    # A driver that merges as git would, and leaves a trace.
    git(repo, "config", "merge.evil.driver", f"touch {ran} && git merge-file %A %O %B")
    (repo / ".git" / "info").mkdir(exist_ok=True)
    (repo / ".git" / "info" / "attributes").write_text("* merge=evil\n")
    outcome = cli(capsys, "verify", str(path))
    assert outcome.code == 1
    assert (
        f"repo: the repository the report names, {repo}, configures programs git would run "
        "(merge.evil.driver)"
    ) in outcome.out
    assert not ran.exists()
    # Named by the user, or the one they work in, the repository is trusted: the merge is
    # recomputed there, with its driver.
    assert cli(capsys, "verify", str(path), "--repo", str(repo)).code == 0
    assert ran.exists()
    ran.unlink()
    with contextlib.chdir(repo):
        assert cli(capsys, "verify", str(path)).code == 0
    assert ran.exists()


def test_the_users_own_git_config_is_not_held_against_the_reports_repository(
    make_repo: MakeRepo,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only the repository's own config counts: a filter the user configures for every
    repository (git-lfs, say) does not make the one the report names untrusted."""
    repo = make_repo()
    path = run_report(repo)
    own = tmp_path / "gitconfig"
    own.write_text('[filter "lfs"]\n\tclean = git-lfs clean -- %f\n')
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(own))
    outcome = cli(capsys, "verify", str(path))
    assert outcome.code == 0, outcome.out


def test_programs_a_repositorys_config_includes_are_found_and_named_in_full(
    make_repo: MakeRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A driver set in a file the repository's config includes counts as its own; a key is
    named whole, spaces in its subsection and all."""
    repo = make_repo()
    path = run_report(repo)
    included = tmp_path / "included.config"
    included.write_text(f'[merge "my driver"]\n\tdriver = touch {tmp_path / "ran"}\n')
    git(repo, "config", "include.path", str(included))
    outcome = cli(capsys, "verify", str(path))
    assert outcome.code == 1
    assert "configures programs git would run (merge.my driver.driver)" in outcome.out


def test_a_partial_clone_the_report_names_is_not_trusted_to_merge_or_diff(
    make_repo: MakeRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A partial clone's promisor remote makes git fetch what it lacks on demand, running the
    remote's upload-pack: neither verify's merges nor the page's diffstats run in one that
    only the report names."""
    repo = make_repo()
    envelopes = [build_envelope("w", "a", task_id="a", venv=False)]
    report = anyio.run(lambda: orchestrate_parallel(envelopes, repo=repo, agents={"w": _write}))
    path = Path(report.run_dir) / "report.json"
    git(repo, "config", "extensions.partialClone", "origin")
    git(repo, "config", "remote.origin.promisor", "true")
    git(repo, "config", "remote.origin.uploadpack", f"touch {tmp_path / 'ran'}; false")
    outcome = cli(capsys, "verify", str(path))
    assert (
        "configures programs git would run (extensions.partialclone, remote.origin.promisor, "
        "remote.origin.uploadpack)"
    ) in outcome.out
    page = tmp_path / "page.html"
    made = cli(capsys, "report", str(path), "--html", str(page))
    assert made.code == 0, made.err
    assert "pass --repo to show them" in page.read_text()
    assert not (tmp_path / "ran").exists()


def test_a_lone_surrogate_escape_is_no_report(
    make_repo: MakeRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = run_report(make_repo(), ("a",))
    text = path.read_text().replace('"plan_name": "', '"plan_name": "\\ud800', 1)
    bad = tmp_path / "report.json"
    bad.write_text(text)
    for argv in (["verify", str(bad)], ["report", str(bad), "--markdown"]):
        outcome = cli(capsys, *argv)
        assert outcome.code == 2
        assert "lone surrogate" in outcome.err
        no_traceback(outcome)


@pytest.mark.slow
def test_a_forged_merge_record_is_checked_against_the_repository(
    make_repo: MakeRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A merge record names commits: each merge commit is the merge of the one before it and
    its task's result (parents and tree), the chain ends at new_commit, and the target still
    contains it. A record re-sealed with other commits, or a target moved back, is caught."""
    from orchestrator import verify_report

    repo = make_repo()
    path = run_report(repo, ("a", "b"))
    with contextlib.chdir(repo):
        assert cli(capsys, "merge", str(path), "--into", "main").code == 0
    outcome = anyio.run(verify_report, path)
    assert outcome.ok, [str(f) for f in outcome.findings]
    assert outcome.checked_commits == 4  # two results, two merge commits
    record = json.loads(path.read_text())["merge"][0]
    old, new = record["old_commit"], record["new_commit"]
    first, second = (t["merge_commit"] for t in record["tasks"])
    results = [t["result_commit"] for t in record["tasks"]]
    assert new == second != first

    def findings(edit: Any) -> list[str]:
        forged = forge(path, tmp_path / "forged.json", edit)
        return [str(f) for f in anyio.run(verify_report, forged).findings]

    def swapped(raw: dict[str, Any]) -> None:
        tasks = raw["merge"][0]["tasks"]
        tasks[0]["merge_commit"], tasks[1]["merge_commit"] = second, first
        raw["merge"][0]["new_commit"] = first

    assert findings(swapped) == [
        f"task a: merge[0].merge_commit: the parents of {second} are [{first!r}, "
        f"{results[1]!r}], expected [{old!r}, {results[0]!r}]"
    ]

    def unknown_merge_commit(raw: dict[str, Any]) -> None:
        raw["merge"][0]["tasks"][0]["merge_commit"] = "2" * 40

    assert findings(unknown_merge_commit) == [
        f"task a: merge[0].merge_commit: commit {'2' * 40} not found in the repository"
    ]

    def unknown_old(raw: dict[str, Any]) -> None:
        raw["merge"][0]["old_commit"] = "1" * 40

    assert findings(unknown_old) == [
        f"merge[0].old_commit: commit {'1' * 40} not found in the repository"
    ]

    # A commit with the right parents but another tree (the base's) is not their merge.
    base_tree = git(repo, "rev-parse", f"{old}^{{tree}}")
    other = git(repo, "commit-tree", base_tree, "-p", old, "-p", results[0], "-m", "forged")

    def other_tree(raw: dict[str, Any]) -> None:
        raw["merge"][0]["tasks"][0]["merge_commit"] = other

    merged_tree = git(repo, "rev-parse", f"{first}^{{tree}}")
    assert findings(other_tree) == [
        f"task a: merge[0].merge_commit: the tree of {other} ({base_tree}) is not the merge of "
        f"its parents ({merged_tree})"
    ]

    def ends_early(raw: dict[str, Any]) -> None:
        raw["merge"][0]["tasks"][1]["merge_commit"] = None

    assert findings(ends_early) == [
        f"merge[0].new_commit: expected {first!r}, found {new!r}",
        f"merge[0].new_commit: expected {first} (the end of the chain of merge commits), "
        f"found {new}",
    ]

    # The target moved on: fine. Moved back, or gone: not.
    (repo / "more.txt").write_text("more\n")
    git(repo, "add", "more.txt")
    git(repo, "commit", "--quiet", "-m", "more")
    assert anyio.run(verify_report, path).ok
    git(repo, "branch", "--force", "elsewhere", old)
    git(repo, "checkout", "--quiet", "elsewhere")
    git(repo, "branch", "--force", "main", old)
    assert [str(f) for f in anyio.run(verify_report, path).findings] == [
        f"merge[0].into: branch main points at {old}, which does not contain {new}"
    ]
    git(repo, "branch", "--quiet", "-D", "main")
    assert [str(f) for f in anyio.run(verify_report, path).findings] == [
        "merge[0].into: branch main does not exist"
    ]


def test_a_merge_record_not_checked_in_the_repository_leaves_the_next_ones_checked(
    make_repo: MakeRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only a ``merged`` record with both its commits is checked in the repository (a
    ``skipped`` one, or one without its new commit, is audit_report's to flag), and one left
    unchecked does not stop the check of the records after it; nor does a task without a
    merge commit stop the check of the tasks after it in its record."""
    from orchestrator import verify_report

    repo = make_repo()
    path = run_report(repo, ("a", "b"))
    with contextlib.chdir(repo):
        assert cli(capsys, "merge", str(path), "--into", "main").code == 0

    record = json.loads(path.read_text())["merge"][0]
    old, (first, second) = record["old_commit"], (t["merge_commit"] for t in record["tasks"])
    result_b = record["tasks"][1]["result_commit"]

    def records(raw: dict[str, Any]) -> None:
        skipped = {**record, "status": "skipped", "into": "gone"}
        unfinished = {**record, "new_commit": None, "into": "gone"}
        passed_over = json.loads(json.dumps(record))
        passed_over["tasks"][0]["merge_commit"] = None
        raw["merge"] = [skipped, unfinished, {**record, "old_commit": "1" * 40}, passed_over]

    forged = forge(path, tmp_path / "forged.json", records)
    assert [str(f) for f in anyio.run(verify_report, forged).findings] == [
        "merge[1]: a merged record without its old and new commit",
        f"merge[2].old_commit: commit {'1' * 40} not found in the repository",
        f"task b: merge[3].merge_commit: the parents of {second} are [{first!r}, {result_b!r}], "
        f"expected [{old!r}, {result_b!r}]",
    ]


def test_a_merge_commit_whose_parents_cannot_be_merged_again_says_so(
    make_repo: MakeRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A merge record's commit whose second parent shares no history with the first: git
    refuses to merge them again, and the finding names them in order."""
    from orchestrator import verify_report

    repo = make_repo()
    path = run_report(repo, ("a", "b"))
    with contextlib.chdir(repo):
        assert cli(capsys, "merge", str(path), "--into", "main").code == 0
    old = json.loads(path.read_text())["merge"][0]["old_commit"]
    tree = git(repo, "rev-parse", f"{old}^{{tree}}")
    unrelated = git(repo, "commit-tree", tree, "-m", "a root of its own")
    made = git(repo, "commit-tree", tree, "-p", old, "-p", unrelated, "-m", "forged")

    def forged(raw: dict[str, Any]) -> None:
        entry = raw["merge"][0]["tasks"][0]
        entry["result_commit"], entry["merge_commit"] = unrelated, made

    findings = anyio.run(verify_report, forge(path, tmp_path / "forged.json", forged)).findings
    message = f"cannot merge {old} and {unrelated} again to check {made}"
    assert f"task a: merge[0].merge_commit: {message}" in [str(f) for f in findings]


@pytest.mark.slow
def test_a_forged_start_from_several_dependencies_is_checked_in_the_repository(
    make_repo: MakeRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A task after two dependencies started from the merge of their results: a base commit
    re-sealed as one of them, or as a commit of the right parents and another tree, is
    caught; after a dependency that contains the other, the base is that one's result."""
    from orchestrator import verify_report

    repo = make_repo()
    after = {"a": None, "b": None, "c": ["a", "b"], "d": ["a"], "e": ["a", "d"]}
    envelopes = [
        build_envelope("w", t, task_id=t, venv=False, depends_on=d) for t, d in after.items()
    ]
    report = anyio.run(lambda: orchestrate_parallel(envelopes, repo=repo, agents={"w": _write}))
    path = Path(report.run_dir) / "report.json"
    outcome = anyio.run(lambda: verify_report(path, repo=repo))
    assert outcome.ok, [str(f) for f in outcome.findings]
    commit = {r.task_id: r.provenance.result_commit for r in report.results}
    base = report.result("c").provenance.base_commit
    assert base is not None and git(repo, "rev-list", "--parents", "-n", "1", base).split()[1:] == [
        commit["a"],
        commit["b"],
    ]
    assert report.result("e").provenance.base_commit == commit["d"]

    def findings(**starts: str) -> list[str]:
        def edit(raw: dict[str, Any]) -> None:
            for r in raw["results"]:
                if r["task_id"] in starts:
                    r["provenance"]["base_commit"] = starts[r["task_id"]]

        forged = forge(path, tmp_path / "forged.json", edit)
        found = anyio.run(lambda: verify_report(forged, repo=repo)).findings
        return [str(f) for f in found]

    wrong_e = (
        f"task e: provenance.base_commit: expected {commit['d']} (it contains the other "
        f"dependencies' results), found {commit['a']}"
    )
    assert findings(e=str(commit["a"])) == [wrong_e]
    # A start that is not the merge, or not found: the tasks after it are still checked.
    assert findings(c=str(commit["a"]), e=str(commit["a"])) == [
        f"task c: provenance.base_commit: {commit['a']} is not the merge of its dependencies' "
        f"results {[commit['a'], commit['b']]} (its parents: {[report.base_commit]})",
        wrong_e,
    ]
    base_tree = git(repo, "rev-parse", f"{report.base_commit}^{{tree}}")
    other = git(repo, "commit-tree", base_tree, "-p", commit["a"], "-p", commit["b"], "-m", "x")
    merged_tree = git(repo, "rev-parse", f"{base}^{{tree}}")
    assert findings(c=other) == [
        f"task c: provenance.base_commit: {other} is not an ancestor of {commit['c']}",
        f"task c: provenance.base_commit: the tree of {other} is {base_tree}, not the merge "
        f"of its parents ({merged_tree})",
    ]
    assert findings(c="3" * 40, e=str(commit["a"])) == [
        f"task c: provenance.base_commit: {'3' * 40} is not an ancestor of {commit['c']}",
        f"task c: provenance.base_commit: commit {'3' * 40} not found in the repository",
        wrong_e,
    ]

    def lost_b_and_wrong_e(raw: dict[str, Any]) -> None:
        by_id = {r["task_id"]: r for r in raw["results"]}
        by_id["b"]["provenance"]["result_commit"] = "4" * 40  # c's start cannot be checked
        by_id["e"]["provenance"]["base_commit"] = str(commit["a"])

    forged = forge(path, tmp_path / "forged.json", lost_b_and_wrong_e)
    assert wrong_e in [str(f) for f in anyio.run(lambda: verify_report(forged, repo=repo)).findings]

    def c_after_a_and_d_then_e_after_a_and_b(raw: dict[str, Any]) -> None:
        by_id = {r["task_id"]: r for r in raw["results"]}
        by_id["c"]["depends_on"] = ["a", "d"]  # d contains a: c's start is d's result
        by_id["c"]["provenance"]["base_commit"] = str(commit["d"])
        by_id["e"]["depends_on"] = ["a", "b"]

    forged = forge(path, tmp_path / "forged.json", c_after_a_and_d_then_e_after_a_and_b)
    assert (
        f"task e: provenance.base_commit: {commit['d']} is not the merge of its dependencies' "
        f"results {[commit['a'], commit['b']]} (its parents: {[commit['a']]})"
    ) in [str(f) for f in anyio.run(lambda: verify_report(forged, repo=repo)).findings]


async def _write_shared(envelope: Any, workspace: Any) -> dict[str, Any]:
    (workspace.path / "shared.txt").write_text(f"{envelope.task_id}\n")
    return {"ok": True}


def test_a_start_forged_as_the_merge_of_results_that_conflict_says_they_conflict(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """Two results that cannot be merged have no merge to start from: a start re-sealed as
    a commit of those two parents is caught, and the finding says why; also when verify is
    given the repository opened (as ``orchestrator merge`` gives it)."""
    from orchestrator import Repository, verify_report

    repo = make_repo()
    envelopes = [build_envelope("w", t, task_id=t, venv=False) for t in ("a", "b", "c")]
    report = anyio.run(
        lambda: orchestrate_parallel(envelopes, repo=repo, agents={"w": _write_shared})
    )
    commit = {r.task_id: str(r.provenance.result_commit) for r in report.results}
    tree = git(repo, "rev-parse", f"{commit['a']}^{{tree}}")
    start = git(repo, "commit-tree", tree, "-p", commit["a"], "-p", commit["b"], "-m", "x")

    def c_after_a_and_b(raw: dict[str, Any]) -> None:
        c = next(r for r in raw["results"] if r["task_id"] == "c")
        c["depends_on"] = ["a", "b"]
        c["provenance"]["base_commit"] = start

    forged = forge(Path(report.run_dir) / "report.json", tmp_path / "forged.json", c_after_a_and_b)
    conflict = (
        f"task c: provenance.base_commit: the tree of {start} is {tree}, not the merge of its "
        "parents (they conflict)"
    )
    assert conflict in [
        str(f) for f in anyio.run(lambda: verify_report(forged, repo=repo)).findings
    ]

    async def opened() -> list[str]:
        outcome = await verify_report(forged, repo=await Repository.open(repo), files=False)
        return [str(f) for f in outcome.findings]

    assert conflict in anyio.run(opened)


def test_a_forged_base_commit_or_branch_outside_the_run_is_checked_in_the_repository(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    from orchestrator import verify_report

    repo = make_repo()
    path = run_report(repo, ("a",))
    raw = json.loads(path.read_text())
    result = raw["results"][0]["provenance"]["result_commit"]

    def findings(edit: Any) -> list[str]:
        forged = forge(path, tmp_path / "forged.json", edit)
        return [str(f) for f in anyio.run(lambda: verify_report(forged, repo=repo)).findings]

    def unknown_base(raw: dict[str, Any]) -> None:
        raw["base_commit"] = "1" * 40
        raw["results"][0]["provenance"]["base_commit"] = "1" * 40

    assert findings(unknown_base) == [
        f"base_commit: commit {'1' * 40} not found in the repository",
        f"task a: provenance.base_commit: {'1' * 40} is not an ancestor of {result}",
    ]

    # An annotated tag of the base is not a commit: named once, and git (which peels it)
    # still finds the base below the result.
    git(repo, "tag", "-a", "-m", "the base", "base-tag", raw["base_commit"])
    tag = git(repo, "rev-parse", "base-tag")

    def base_as_a_tag(raw: dict[str, Any]) -> None:
        raw["base_commit"] = tag
        raw["results"][0]["provenance"]["base_commit"] = tag

    assert findings(base_as_a_tag) == [f"base_commit: commit {tag} not found in the repository"]

    def on_main(raw: dict[str, Any]) -> None:
        raw["results"][0]["branch"] = "main"

    main = git(repo, "rev-parse", "main")
    assert findings(on_main) == [
        f"task a: branch: branch main points at {main}, which does not contain {result}"
    ]

    def nowhere(raw: dict[str, Any]) -> None:
        raw["repo"] = None

    forged = forge(path, tmp_path / "nowhere.json", nowhere)
    assert [str(f) for f in anyio.run(verify_report, forged).findings] == [
        "repo: the report names no repository; pass --repo"
    ]

    def on_nothing(raw: dict[str, Any]) -> None:
        raw["results"][0]["branch"] = "no/such/branch"

    assert findings(on_nothing) == ["task a: branch: branch no/such/branch does not exist"]

    # A tag is not a branch, even one at the result commit.
    git(repo, "tag", "tagged", result)

    def on_a_tag(raw: dict[str, Any]) -> None:
        raw["results"][0]["branch"] = "tagged"

    assert findings(on_a_tag) == ["task a: branch: branch tagged does not exist"]


def test_a_branch_beside_a_tasks_named_with_a_non_ascii_space_is_not_taken_for_it(
    make_repo: MakeRepo,
) -> None:
    """Git takes a no-break space in a branch name (it refuses only ASCII spaces and control
    characters): a branch made beside a task's, under the run's prefix, named with one after
    the task's name, is another branch, and the task's branch still holds its result."""
    from orchestrator import verify_report

    repo = make_repo()
    path = run_report(repo, ("a",))
    raw = json.loads(path.read_text())
    branch = raw["results"][0]["branch"]
    git(repo, "branch", f"{branch}\u00a0copy", "main")
    outcome = anyio.run(lambda: verify_report(path, repo=repo))
    assert outcome.ok, [str(f) for f in outcome.findings]


def test_a_result_commit_whose_tree_the_repository_lacks_is_named(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """A result commit git has but whose tree it does not (an object written alone, as a
    damaged or forged repository holds): its tree is named as not found."""
    from orchestrator import verify_report

    repo = make_repo()
    path = run_report(repo, ("a",))
    raw = json.loads(path.read_text())
    result = raw["results"][0]
    base, tree = result["provenance"]["base_commit"], result["provenance"]["result_tree"]
    missing = "1" * 40
    body = (
        f"tree {missing}\nparent {base}\nauthor A <a@localhost> 0 +0000\n"
        f"committer A <a@localhost> 0 +0000\n\nno tree\n"
    )
    made = subprocess.run(
        ["git", "-C", str(repo), "hash-object", "-t", "commit", "-w", "--literally", "--stdin"],
        input=body.encode(),
        capture_output=True,
        check=True,
    )
    commit = made.stdout.decode().strip()
    git(repo, "update-ref", f"refs/heads/{result['branch']}", commit)

    def treeless(raw: dict[str, Any]) -> None:
        raw["results"][0]["provenance"]["result_commit"] = commit

    forged = forge(path, tmp_path / "forged.json", treeless)
    findings = anyio.run(lambda: verify_report(forged, repo=repo, files=False)).findings
    assert [str(f) for f in findings] == [
        f"task a: provenance.result_tree: expected {tree!r}, found None (the tree of {commit})"
    ]


def test_a_report_of_work_without_git_verifies_without_a_repository(tmp_path: Path) -> None:
    """No commit, no base: nothing to look up, and no repository needed."""
    from orchestrator import verify_report

    envelopes = [build_envelope("w", "x", task_id="x", worktree=False, venv=False)]
    report = anyio.run(
        lambda: orchestrate_parallel(envelopes, agents={"w": _write_nothing}, state_dir=tmp_path)
    )
    assert report.repo is None and report.base_commit is None
    outcome = anyio.run(verify_report, Path(report.run_dir) / "report.json")
    assert outcome.ok, [str(f) for f in outcome.findings]
    assert outcome.checked_commits == 0


async def _write_nothing(envelope: Any, workspace: Any) -> dict[str, Any]:
    return {"ok": True}


def test_the_base_of_a_run_without_worktrees_is_looked_up_in_the_repository(
    make_repo: MakeRepo,
) -> None:
    """Tasks run without worktrees make no commit, but their run started from a commit of
    the repository: verified against another repository (one without it), that is named."""
    from orchestrator import verify_report

    repo = make_repo()
    envelopes = [build_envelope("w", "x", task_id="x", worktree=False, venv=False)]
    report = anyio.run(
        lambda: orchestrate_parallel(envelopes, repo=repo, agents={"w": _write_nothing})
    )
    assert report.base_commit is not None
    assert report.result("x").provenance.result_commit is None
    path = Path(report.run_dir) / "report.json"
    assert anyio.run(lambda: verify_report(path, repo=repo)).ok
    other = make_repo(extra={"other.txt": "another history\n"})
    findings = anyio.run(lambda: verify_report(path, repo=other)).findings
    assert [str(f) for f in findings] == [
        f"base_commit: commit {report.base_commit} not found in the repository"
    ]


def test_a_merged_record_is_checked_in_the_repository_when_nothing_else_names_a_commit(
    make_repo: MakeRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A report re-sealed without its base and result commits but with its ``merged``
    record: the record's commits are still looked up in the repository."""
    from orchestrator import verify_report

    repo = make_repo()
    path = run_report(repo, ("a",))
    with contextlib.chdir(repo):
        assert cli(capsys, "merge", str(path), "--into", "main").code == 0

    def only_the_merge(raw: dict[str, Any]) -> None:
        raw["base_commit"] = None
        for r in raw["results"]:
            r["provenance"].update(base_commit=None, result_commit=None, result_tree=None)
        raw["merge"][0]["old_commit"] = "1" * 40

    forged = forge(path, tmp_path / "forged.json", only_the_merge)
    findings = anyio.run(lambda: verify_report(forged, repo=repo, files=False)).findings
    assert f"merge[0].old_commit: commit {'1' * 40} not found in the repository" in [
        str(f) for f in findings
    ]


def test_checks_of_a_task_without_a_worktree_need_no_commit_to_agree_with(
    make_repo: MakeRepo,
) -> None:
    """A task run without a worktree made no commit, so its check records have no Checks
    trailer to be compared with; beside a task that made one, in the same run, the report
    verifies."""
    from envelopes import Step
    from orchestrator import verify_report

    repo = make_repo()
    passing = Step(name="tests", run=[sys.executable, "-c", "pass"])
    envelopes = [
        build_envelope("w", "x", task_id="x", worktree=False, venv=False, checks=[passing]),
        build_envelope("w", "y", task_id="y", venv=False, checks=[passing]),
    ]
    report = anyio.run(
        lambda: orchestrate_parallel(envelopes, repo=repo, agents={"w": _write_nothing})
    )
    assert report.result("x").provenance.result_commit is None
    assert report.result("y").provenance.result_commit is not None
    outcome = anyio.run(verify_report, Path(report.run_dir) / "report.json")
    assert outcome.ok, [str(f) for f in outcome.findings]
    assert outcome.checked_commits == 1


@pytest.mark.slow
def test_check_records_forged_to_passing_disagree_with_the_commits_checks_trailer(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """The result commit's Checks trailer is git's record of the checks: records rewritten
    to passing in a re-sealed report are caught."""
    from envelopes import Step
    from orchestrator import verify_report

    repo = make_repo()
    fail = Step(name="tests", run=[sys.executable, "-c", "raise SystemExit(1)"])
    lint = Step(name="lint", run=[sys.executable, "-c", "pass"], required=False)
    envelopes = [
        build_envelope("w", "a", task_id="a", venv=False, checks=[fail, lint]),
        build_envelope("w", "b", task_id="b", venv=False, checks=[lint]),
    ]
    report = anyio.run(lambda: orchestrate_parallel(envelopes, repo=repo, agents={"w": _write}))
    assert report.result("a").provenance.result_commit is not None
    path = Path(report.run_dir) / "report.json"
    assert anyio.run(lambda: verify_report(path, repo=repo)).ok

    def passing(raw: dict[str, Any]) -> None:
        result = raw["results"][0]
        for check in result["checks"]:
            check.update(exit_code=0, passed=True)
        result.update(status="succeeded", error=None)
        raw["errors"] = []
        raw["summary"].update(successful=2, failed=0, success_rate=100.0)
        agent = raw["results_by_agent"]["w"]
        agent.update(successful=2, failed=0)

    forged = forge(path, tmp_path / "forged.json", passing)
    findings = anyio.run(lambda: verify_report(forged, repo=repo, files=False)).findings
    assert [str(f) for f in findings] == [
        "task a: checks: its commit's Checks trailer says 'tests failed, lint passed (not "
        "required)', its records 'tests passed, lint passed (not required)'"
    ]


def _b_forged_to_passing(raw: dict[str, Any]) -> None:
    """Task b's failed check rewritten to passing, and everything that follows from it."""
    b = raw["results"][1]
    for check in b["checks"]:
        check.update(exit_code=0, passed=True)
    b.update(status="succeeded", error=None)
    raw["errors"] = [e for e in raw["errors"] if e["task_id"] != "b"]
    raw["summary"].update(successful=1, failed=1, success_rate=50.0)
    raw["results_by_agent"]["w"].update(successful=1, failed=1)


@pytest.mark.parametrize("case", ["b forged", "a lost", "a control character in b's task"])
def test_every_results_checks_trailer_is_compared_even_with_a_commit_lost(
    make_repo: MakeRepo, tmp_path: Path, case: str
) -> None:
    """Each result's check records are compared with its own commit's trailer, not only the
    first one's, whatever its task's text holds (its first line is the commit's subject); and
    a report naming a result commit the repository does not have gets that finding while the
    other results are still compared: one missing commit hides no forged check record."""
    from envelopes import Step
    from orchestrator import verify_report

    repo = make_repo()
    fail = Step(name="tests", run=[sys.executable, "-c", "raise SystemExit(1)"])
    tasks = {"a": "a", "b": "b \x01 b" if case.startswith("a control") else "b"}
    envelopes = [
        build_envelope("w", text, task_id=t, venv=False, checks=[fail]) for t, text in tasks.items()
    ]
    report = anyio.run(lambda: orchestrate_parallel(envelopes, repo=repo, agents={"w": _write}))
    path = Path(report.run_dir) / "report.json"
    a_lost = case == "a lost"

    def forged(raw: dict[str, Any]) -> None:
        _b_forged_to_passing(raw)
        if a_lost:
            raw["results"][0]["provenance"]["result_commit"] = "1" * 40

    at = forge(path, tmp_path / "forged.json", forged)
    findings = anyio.run(lambda: verify_report(at, repo=repo, files=False)).findings
    lost = f"task a: provenance.result_commit: commit {'1' * 40} not found in the repository"
    assert [str(f) for f in findings] == [lost] * a_lost + [
        "task b: checks: its commit's Checks trailer says 'tests failed', its records "
        "'tests passed'",
    ]


async def _a_commits_in_a_bogus_encoding(envelope: Any, workspace: Any) -> dict[str, Any]:
    """Task a's agent commits its work itself, its message in an encoding git cannot
    convert; the others' leave theirs to the run."""
    (workspace.path / f"{envelope.task_id}.txt").write_text("mine\n")
    if envelope.task_id == "a":
        message = workspace.path.parent / "a.message"
        message.write_bytes(b"caf\xe9\n")
        git(workspace.path, "add", "a.txt")
        git(workspace.path, "-c", "i18n.commitEncoding=nowhere", "commit", "-q", "-F", str(message))
    return {"ok": True}


def test_an_agents_own_commit_is_passed_over_and_the_next_results_are_compared(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """An agent may commit its work itself, with a message in an encoding git cannot convert
    (so ``git log`` prints its bytes as they are): that commit is no commit the run made, its
    message is read without failing, and the results after it are still compared with their
    commits' trailers."""
    from envelopes import Step
    from orchestrator import verify_report

    repo = make_repo()
    fail = Step(name="tests", run=[sys.executable, "-c", "raise SystemExit(1)"])
    envelopes = [build_envelope("w", t, task_id=t, venv=False, checks=[fail]) for t in ("a", "b")]
    report = anyio.run(
        lambda: orchestrate_parallel(
            envelopes, repo=repo, agents={"w": _a_commits_in_a_bogus_encoding}
        )
    )
    commit = report.result("a").provenance.result_commit
    assert commit is not None
    logged = subprocess.run(
        ["git", "-C", str(repo), "log", "--no-walk", "--format=%B", commit],
        capture_output=True,
        check=True,
    )
    assert logged.stdout.startswith(b"caf\xe9\n")  # not UTF-8
    path = Path(report.run_dir) / "report.json"
    outcome = anyio.run(lambda: verify_report(path, repo=repo))
    assert outcome.ok, [str(f) for f in outcome.findings]

    forged = forge(path, tmp_path / "forged.json", _b_forged_to_passing)
    findings = anyio.run(lambda: verify_report(forged, repo=repo, files=False)).findings
    assert [str(f) for f in findings] == [
        "task b: checks: its commit's Checks trailer says 'tests failed', its records "
        "'tests passed'"
    ]


def test_check_records_forged_onto_a_task_that_ran_none_disagree_with_its_commit(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """A result commit made without checks has no Checks trailer: check records added to its
    task in a re-sealed report are named as disagreeing with it."""
    from envelopes import Step
    from orchestrator import verify_report

    repo = make_repo()
    passing = Step(name="tests", run=[sys.executable, "-c", "pass"])
    envelopes = [
        build_envelope("w", "a", task_id="a", venv=False),
        build_envelope("w", "b", task_id="b", venv=False, checks=[passing]),
    ]
    report = anyio.run(lambda: orchestrate_parallel(envelopes, repo=repo, agents={"w": _write}))
    path = Path(report.run_dir) / "report.json"

    def checked(raw: dict[str, Any]) -> None:
        a, b = raw["results"]
        a["checks"] = b["checks"]

    forged = forge(path, tmp_path / "forged.json", checked)
    findings = anyio.run(lambda: verify_report(forged, repo=repo, files=False)).findings
    assert "task a: checks: its commit's Checks trailer says None, its records 'tests passed'" in [
        str(f) for f in findings
    ]


def test_given_the_repository_opened_verify_keeps_what_the_audit_found(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """``orchestrator merge`` gives verify the repository it opened: the report's own
    findings (a summary that does not add up) are kept beside the repository's."""
    from orchestrator import Repository, verify_report

    repo = make_repo()
    path = run_report(repo, ("a",))

    def miscounted(raw: dict[str, Any]) -> None:
        raw["summary"]["total_tasks"] = 2
        raw["results"][0]["provenance"]["result_commit"] = "1" * 40

    forged = forge(path, tmp_path / "forged.json", miscounted)

    async def opened() -> list[str]:
        outcome = await verify_report(forged, repo=await Repository.open(repo), files=False)
        return [str(f) for f in outcome.findings]

    said = anyio.run(opened)
    assert (
        f"task a: provenance.result_commit: commit {'1' * 40} not found in the repository" in said
    )
    assert any(line.startswith("summary.total_tasks: ") for line in said), said


def test_a_repository_the_report_names_that_is_gone_is_named(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """The report travelled without its repository (moved away since): the finding says
    which path is no repository, and why."""
    from orchestrator import verify_report

    repo = make_repo()
    path = run_report(repo, ("a",))
    travelled = tmp_path / "report.json"
    travelled.write_bytes(path.read_bytes())
    repo.rename(tmp_path / "moved")
    findings = anyio.run(lambda: verify_report(travelled, files=False)).findings
    assert [str(f) for f in findings] == [f"repo: not a git repository: {repo} (no such directory)"]
