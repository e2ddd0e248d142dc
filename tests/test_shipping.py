"""What travels to and from a Dask worker: bundles hold what a task needs and nothing else,
and files come back only where they belong."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import anyio
import pytest

from envelopes import Step, build_envelope
from orchestrator.errors import GitError, ShippingError
from orchestrator.repo import Repository
from orchestrator.shipping import (
    MAX_SHIPPED_FILES,
    fetch_bundle,
    make_bundle,
    pack_files,
    pack_tree,
    plan_references,
    unpack_files,
)

from .conftest import MakeRepo, git


def commit_file(repo: Path, name: str, text: str, message: str) -> str:
    (repo / name).write_text(text)
    git(repo, "add", name)
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def open_repo(path: Path) -> Repository:
    return anyio.run(Repository.open, path)


def test_a_bundle_holds_one_commits_history_less_what_the_other_side_has(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    path = make_repo()
    base = git(path, "rev-parse", "HEAD")
    git(path, "checkout", "-q", "-b", "other")
    elsewhere = commit_file(path, "other.txt", "not for the worker\n", "other")
    git(path, "checkout", "-q", "main")
    (path / "stashed.txt").write_text("stash me")
    git(path, "add", "stashed.txt")
    git(path, "stash", "-q")
    (path / "ignored.log").write_text("untracked")
    tip = commit_file(path, "new.txt", "new\n", "new")
    repo = open_repo(path)
    bundle = anyio.run(make_bundle, repo, tip, {base}, tmp_path / "a.bundle")
    assert bundle is not None
    listed = git(path, "bundle", "list-heads", str(bundle))
    assert listed.split()[0] == tip and len(listed.splitlines()) == 1
    # Only the new commit's objects: one commit, one tree, one blob.
    objects = git(path, "bundle", "verify", str(bundle))
    assert base in objects  # a prerequisite, not included
    count = git(path, "rev-list", "--objects", tip, f"^{base}").splitlines()
    assert len(count) == 3
    for absent in (elsewhere, git(path, "rev-parse", "refs/stash")):
        assert absent not in listed
    # The ref made for it is gone; a side that has the tip gets no bundle.
    assert "orchestrator-ship" not in git(path, "for-each-ref")
    assert anyio.run(make_bundle, repo, tip, {tip}, tmp_path / "b.bundle") is None


def test_make_bundle_refuses_what_is_not_an_object_id(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = open_repo(make_repo())
    for bad in ("HEAD", "--output=/tmp/x", "main"):
        with pytest.raises(GitError, match="not an object id"):
            anyio.run(make_bundle, repo, bad, set(), tmp_path / "x.bundle")


def _worker_bundle(path: Path, tmp_path: Path, ref: str) -> tuple[Path, str, str, str]:
    """A bundle like a worker's: *ref* at a new commit, less the start commit."""
    start = git(path, "rev-parse", "HEAD")
    git(path, "checkout", "-q", "-b", ref.removeprefix("refs/heads/"))
    commit = commit_file(path, "result.txt", "result\n", "result")
    tree = git(path, "rev-parse", f"{commit}^{{tree}}")
    bundle = tmp_path / "result.bundle"
    git(path, "bundle", "create", "-q", str(bundle), ref, f"^{start}")
    git(path, "checkout", "-q", "main")
    git(path, "branch", "-q", "-D", ref.removeprefix("refs/heads/"))
    git(path, "gc", "-q", "--prune=now")  # the commit is gone here: only the bundle has it
    return bundle, start, commit, tree


def fetch(repo: Repository, bundle: Path, commit: str, tree: str, start: str) -> None:
    data = bundle.read_bytes()
    anyio.run(
        lambda: fetch_bundle(repo, data, commit, tree, "orchestrator/r/t", descends_from=start)
    )


def test_fetching_a_result_checks_its_commit_and_tree_and_makes_the_branch(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    path = make_repo()
    bundle, start, commit, tree = _worker_bundle(path, tmp_path, "refs/heads/orchestrator/r/t")
    repo = open_repo(path)
    fetch(repo, bundle, commit, tree, start)
    assert git(path, "rev-parse", "orchestrator/r/t") == commit
    assert git(path, "for-each-ref", "--format=%(refname)").splitlines() == [
        "refs/heads/main",
        "refs/heads/orchestrator/r/t",
    ]


def test_a_result_that_does_not_descend_from_the_start_is_refused(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    path = make_repo()
    bundle, _, commit, tree = _worker_bundle(path, tmp_path, "refs/heads/orchestrator/r/t")
    elsewhere = commit_file(path, "other.txt", "x\n", "elsewhere")
    with pytest.raises(GitError, match="does not descend"):
        fetch(open_repo(path), bundle, commit, tree, elsewhere)
    assert git(path, "branch", "--list", "orchestrator/r/t") == ""


def test_a_bundle_with_a_malformed_object_is_refused(make_repo: MakeRepo, tmp_path: Path) -> None:
    """A commit without an author: git's fetch from a bundle lets it in before git 2.46."""
    path = make_repo()
    start = git(path, "rev-parse", "HEAD")
    tree = git(path, "rev-parse", "HEAD^{tree}")
    raw = f"tree {tree}\nparent {start}\ncommitter A <a@b> 0 +0000\n\nno author\n"
    bad = (
        subprocess.run(
            ["git", "-C", str(path), "hash-object", "-t", "commit", "-w", "--literally", "--stdin"],
            input=raw.encode(),
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .strip()
    )
    git(path, "update-ref", "refs/heads/orchestrator/r/t", bad)
    bundle = tmp_path / "bad.bundle"
    git(path, "bundle", "create", "-q", str(bundle), "refs/heads/orchestrator/r/t", f"^{start}")
    git(path, "update-ref", "-d", "refs/heads/orchestrator/r/t")
    git(path, "reflog", "expire", "--expire=now", "--all")
    git(path, "gc", "-q", "--prune=now")
    packs = sorted((path / ".git" / "objects" / "pack").iterdir())
    with pytest.raises(GitError):
        fetch(open_repo(path), bundle, bad, tree, start)
    assert git(path, "branch", "--list", "orchestrator/r/t") == ""
    # Nothing of it stays: no pack, no temporary file, no quarantine.
    assert sorted((path / ".git" / "objects" / "pack").iterdir()) == packs
    assert not list((path / ".git" / "objects").glob("incoming-*"))


def test_a_result_whose_tree_is_another_is_refused_and_makes_no_branch(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    path = make_repo()
    bundle, start, commit, _ = _worker_bundle(path, tmp_path, "refs/heads/orchestrator/r/t")
    repo = open_repo(path)
    wrong = git(path, "rev-parse", f"{start}^{{tree}}")
    with pytest.raises(GitError, match="has tree"):
        fetch(repo, bundle, commit, wrong, start)
    assert git(path, "branch", "--list", "orchestrator/r/t") == ""
    with pytest.raises(GitError, match="does not bring"):
        fetch(repo, bundle, start, wrong, start)


def test_a_bundle_of_another_ref_is_refused(make_repo: MakeRepo, tmp_path: Path) -> None:
    path = make_repo()
    bundle, start, commit, tree = _worker_bundle(path, tmp_path, "refs/heads/main2")
    with pytest.raises(GitError, match="not a task's branch"):
        fetch(open_repo(path), bundle, commit, tree, start)


@pytest.mark.parametrize(
    "name", ["../escape.txt", "/etc/passwd", "a/../../b", "", "a//b", "logs/../../x"]
)
def test_files_sent_back_may_not_leave_their_directory(tmp_path: Path, name: str) -> None:
    with pytest.raises(ShippingError):
        unpack_files(tmp_path / "root", {name: (0o644, b"x")})
    assert not (tmp_path / "escape.txt").exists()


def test_files_are_not_written_through_a_symbolic_link(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "logs").symlink_to(outside)
    with pytest.raises(ShippingError, match="not a directory"):
        unpack_files(root, {"logs/t.attempt-1.stdout": (0o644, b"x")})
    (root / "file").symlink_to(outside / "target")
    with pytest.raises(ShippingError, match="something else"):
        unpack_files(root, {"file": (0o644, b"x")})
    assert list(outside.iterdir()) == []


def test_only_the_names_allowed_are_written(tmp_path: Path) -> None:
    allowed = re.compile(r"logs/t\.[a-z0-9.-]+")
    unpack_files(tmp_path, {"logs/t.attempt-1.stdout": (0o777, b"ok")}, allowed=allowed)
    written = tmp_path / "logs" / "t.attempt-1.stdout"
    assert written.read_bytes() == b"ok" and written.stat().st_mode & 0o777 == 0o755
    with pytest.raises(ShippingError, match="may not be"):
        unpack_files(tmp_path, {"logs/other.attempt-1.stdout": (0o644, b"x")}, allowed=allowed)
    with pytest.raises(ShippingError):
        unpack_files(tmp_path, {"x": ("rw", b"x")})  # type: ignore[dict-item]
    too_many = {f"f{i}": (0o644, b"") for i in range(MAX_SHIPPED_FILES + 1)}
    with pytest.raises(ShippingError, match="more than"):
        unpack_files(tmp_path / "many", too_many)


def test_packing_takes_files_and_directories_but_no_link_out(tmp_path: Path) -> None:
    plan = tmp_path / "plan"
    (plan / "scripts").mkdir(parents=True)
    (plan / "scripts" / "check.sh").write_text("echo ok\n")
    (plan / "scripts" / "check.sh").chmod(0o755)
    (plan / "reqs.txt").write_text("six\n")
    (tmp_path / "secret").write_text("outside the plan")
    (plan / "leak").symlink_to(tmp_path / "secret")
    (plan / "scripts" / "leak").symlink_to(tmp_path / "secret")
    packed = pack_files(plan, ["scripts", "reqs.txt", "leak", "missing.txt", "../secret"])
    assert sorted(packed) == ["reqs.txt", "scripts/check.sh"]
    assert packed["scripts/check.sh"] == (0o755, b"echo ok\n")
    assert sorted(pack_tree(plan)) == ["reqs.txt", "scripts/check.sh"]


def test_the_plans_files_a_task_names_are_found() -> None:
    envelope = build_envelope(
        "a",
        "t",
        task_id="t",
        requirements=["-r reqs.txt", "-r {plan_dir}/more.txt", "six", "-c ../outside.txt"],
        setup=[Step(name="setup", run="sh {plan_dir}/scripts/setup.sh")],
        checks=[Step(name="check", run="python {plan_dir}/check.py --strict")],
        env={"CONFIG": "{plan_dir}/conf/app.toml"},
    )
    hooks = {"after_create": "{plan_dir}/hooks/make.sh"}
    agent = {"command": ["python", "{plan_dir}/agent.py", "{worktree}"]}
    found = plan_references(envelope, hooks, agent, ["../escape.sh", "./local.sh"])
    assert found == {
        "reqs.txt",
        "more.txt",
        "scripts/setup.sh",
        "check.py",
        "conf/app.toml",
        "hooks/make.sh",
        "agent.py",
    }


def test_a_bundle_header_is_read_without_git_and_bounded(tmp_path: Path) -> None:
    from orchestrator.shipping import bundle_heads

    good = tmp_path / "good.bundle"
    good.write_bytes(
        b"# v2 git bundle\n-" + b"a" * 40 + b" base\n" + b"b" * 40 + b" refs/heads/x\n\nPACK"
    )
    assert bundle_heads(good) == [("b" * 40, "refs/heads/x")]
    for name, data in [
        ("not", b"PK\x03\x04 a zip file"),
        ("endless", b"# v2 git bundle\n" + b"c" * 200_000),
        ("empty", b""),
    ]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(GitError, match="not a git bundle"):
            bundle_heads(path)
    link = tmp_path / "link.bundle"
    link.symlink_to(good)
    with pytest.raises(OSError):
        bundle_heads(link)
