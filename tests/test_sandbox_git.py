"""orchestrator/sandbox_git.py: the private git state of a sandboxed attempt, and what of it
comes out: only commits built on where the attempt started, only objects that are what their
names say, the branch moved by compare-and-swap.

The agent's git is played here by git run with the private state's variables and files (as
the sandbox's mounts would show them), and once for real inside bubblewrap."""

from __future__ import annotations

import hashlib
import os
import subprocess
import zlib
from pathlib import Path
from typing import NamedTuple

import anyio
import pytest

from orchestrator.repo import Repository
from orchestrator.sandbox import SandboxLayout, bwrap_argv, find_bwrap
from orchestrator.sandbox_git import (
    PrivateGit,
    adopt_commits,
    import_loose_objects,
    prepare_private_git,
)
from orchestrator.worktree import Worktree, create_worktree

from .conftest import MakeRepo, git, plumbing_commit

BRANCH = "orchestrator/run1/t1"
IDENT = {
    "GIT_AUTHOR_NAME": "Agent",
    "GIT_AUTHOR_EMAIL": "agent@example.com",
    "GIT_COMMITTER_NAME": "Agent",
    "GIT_COMMITTER_EMAIL": "agent@example.com",
}


class Setup(NamedTuple):
    repo: Path
    repository: Repository
    worktree: Worktree
    private: PrivateGit


@pytest.fixture
def setup(make_repo: MakeRepo, tmp_path: Path) -> Setup:
    """A task's worktree on its branch, and the private git state of its first attempt."""
    repo = make_repo()
    base = git(repo, "rev-parse", "HEAD")

    async def make() -> tuple[Repository, Worktree]:
        repository = await Repository.open(repo)
        worktree = await create_worktree(repository, BRANCH, tmp_path / "wt" / "t1", base)
        return repository, worktree

    repository, worktree = anyio.run(make)
    private = prepare_private_git(worktree, repository.common_dir, tmp_path / "scratch")
    return Setup(repo, repository, worktree, private)


def private_env(private: PrivateGit) -> dict[str, str]:
    return {**os.environ, **IDENT, **private.env()}


def agent_commit(private: PrivateGit, files: dict[str, str], *, parent: str | None = None) -> str:
    """Make a commit as the sandboxed agent's git would: objects into the private store, the
    branch moved in the private ref file. Returns the commit."""
    env = private_env(private)
    index = private.scratch / "agent-index"
    env["GIT_INDEX_FILE"] = str(index)
    start = parent or private.start
    message = f"agent: {', '.join(files)}"
    commit = plumbing_commit(private.worktree.path, env, start, files, message)
    private.ref_file.write_text(commit + "\n")
    return commit


def in_repo(repo: Path, oid: str) -> bool:
    """Whether the repository itself has *oid* (no alternates: the private store is not one)."""
    return subprocess.run(["git", "-C", str(repo), "cat-file", "-e", oid]).returncode == 0


def adopt(setup: Setup) -> str | None:
    problem: str | None = anyio.run(adopt_commits, setup.repository, setup.private)
    return problem


def test_the_private_state_starts_as_a_copy_of_the_attempts_own(setup: Setup) -> None:
    private, worktree = setup.private, setup.worktree
    assert private.start == worktree.base_commit
    admin = private.scratch / "admin"
    for name in ("HEAD", "commondir", "gitdir", "index"):
        assert (admin / name).read_bytes() == (worktree.admin_dir / name).read_bytes(), name
    assert private.ref_file == private.scratch / "refs" / "t1"
    assert private.ref_file.read_text() == worktree.base_commit + "\n"
    assert sorted(p.name for p in private.objects.iterdir()) == ["info", "pack"]
    assert (private.scratch / "logs").is_dir()


def test_mounts_show_the_private_state_where_git_looks(setup: Setup) -> None:
    private, common = setup.private, setup.repository.common_dir
    scratch = private.scratch
    assert private.mounts() == [
        (scratch / "admin", setup.worktree.admin_dir, True),
        # Only its own branch is seen in orchestrator/run1/: no sibling can be moved.
        (scratch / "refs", common / "refs" / "heads" / "orchestrator" / "run1", True),
        (scratch / "logs", common / "logs" / "refs" / "heads" / "orchestrator" / "run1", True),
        (scratch / "objects", scratch / "objects", True),
    ]
    assert private.env() == {
        "GIT_OBJECT_DIRECTORY": str(scratch / "objects"),
        "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(common / "objects"),
    }


def test_a_start_ref_planted_as_a_link_is_not_read(setup: Setup, tmp_path: Path) -> None:
    repo, worktree = setup.repo, setup.worktree
    other = git(repo, "commit-tree", "HEAD^{tree}", "-m", "elsewhere")
    decoy = tmp_path / "decoy-ref"
    decoy.write_text(other + "\n")
    loose = setup.repository.common_dir / "refs" / "heads" / BRANCH
    loose.unlink()
    loose.symlink_to(decoy)
    private = prepare_private_git(worktree, setup.repository.common_dir, tmp_path / "scratch2")
    assert private.start == worktree.base_commit != other


def test_a_branch_that_did_not_move_is_left_without_running_git(setup: Setup) -> None:
    calls = setup.repository.git.calls
    assert adopt(setup) is None
    assert setup.repository.git.calls == calls
    assert git(setup.repo, "rev-parse", BRANCH) == setup.worktree.base_commit


def test_the_agents_commits_are_taken_with_their_objects(setup: Setup) -> None:
    repo = setup.repo
    first = agent_commit(setup.private, {"a.txt": "first\n"})
    second = agent_commit(setup.private, {"b.txt": "second\n"}, parent=first)
    assert not in_repo(repo, second)  # only in the private store until taken
    assert adopt(setup) is None
    assert git(repo, "rev-parse", BRANCH) == second
    assert git(repo, "show", f"{second}:a.txt") == "first"
    assert git(repo, "show", f"{second}:b.txt") == "second"
    # Through the worktree's HEAD: its reflog tells the move from one by another process.
    reflog = git(
        setup.worktree.path,
        "--git-dir",
        str(setup.worktree.admin_dir),
        "reflog",
        "-1",
        "--format=%H %gs",
        "HEAD",
    )
    assert reflog == f"{second} commit: the sandboxed agent's commits"
    git(repo, "fsck", "--strict", "--no-dangling")


@pytest.mark.parametrize(
    "content",
    ["not a commit\n", "", "HEAD\n", "a" * 64 + "\n", "A" * 40 + "\n", "--output=x\n"],
    ids=["words", "empty", "symbolic", "sha256-length", "upper-case", "option"],
)
def test_a_ref_file_naming_no_commit_keeps_nothing(setup: Setup, content: str) -> None:
    setup.private.ref_file.write_text(content)
    assert adopt(setup) == "its branch in the sandbox names no commit: its commits are not kept"
    assert git(setup.repo, "rev-parse", BRANCH) == setup.worktree.base_commit


def test_a_ref_file_replaced_by_a_link_keeps_nothing(setup: Setup, tmp_path: Path) -> None:
    commit = agent_commit(setup.private, {"a.txt": "linked\n"})
    target = tmp_path / "elsewhere"
    target.write_text(commit + "\n")
    setup.private.ref_file.unlink()
    setup.private.ref_file.symlink_to(target)
    assert adopt(setup) == "its branch in the sandbox names no commit: its commits are not kept"
    assert git(setup.repo, "rev-parse", BRANCH) == setup.worktree.base_commit


def test_a_branch_moved_to_a_commit_not_built_on_the_start_keeps_nothing(setup: Setup) -> None:
    repo = setup.repo
    empty_tree = git(repo, "hash-object", "-t", "tree", "/dev/null")
    orphan = git(repo, "commit-tree", empty_tree, "-m", "unrelated history")
    setup.private.ref_file.write_text(orphan + "\n")
    problem = adopt(setup)
    assert problem == (
        f"its branch was moved to {orphan[:12]}, which is not a commit built on "
        f"{setup.private.start[:12]}: its commits are not kept"
    )
    assert git(repo, "rev-parse", BRANCH) == setup.worktree.base_commit


def test_a_commit_whose_objects_are_missing_keeps_nothing(setup: Setup) -> None:
    commit = agent_commit(setup.private, {"lost.txt": "this blob goes missing\n"})
    blob = subprocess.run(
        ["git", "hash-object", "--stdin"],
        input="this blob goes missing\n",
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (setup.private.objects / blob[:2] / blob[2:]).unlink()
    assert adopt(setup) == (
        f"objects of its commit {commit[:12]} are missing: its commits are not kept"
    )
    assert git(setup.repo, "rev-parse", BRANCH) == setup.worktree.base_commit


def test_a_branch_moved_meanwhile_by_someone_else_is_not_overwritten(setup: Setup) -> None:
    repo = setup.repo
    commit = agent_commit(setup.private, {"a.txt": "agent\n"})
    theirs = git(repo, "commit-tree", "HEAD^{tree}", "-p", "HEAD", "-m", "someone else")
    git(repo, "update-ref", f"refs/heads/{BRANCH}", theirs)
    problem = adopt(setup)
    assert problem is not None
    assert problem.startswith(f"its branch could not be moved to {commit[:12]}: ")
    assert git(repo, "rev-parse", BRANCH) == theirs


# import_loose_objects: what of the private store is copied.


def loose(kind: bytes, body: bytes, *, algorithm: str = "sha1") -> tuple[str, bytes]:
    """A loose object's name and file content."""
    raw = kind + b" " + str(len(body)).encode() + b"\0" + body
    return hashlib.new(algorithm, raw).hexdigest(), zlib.compress(raw)


def put(store: Path, name: str, data: bytes) -> Path:
    path = store / name[:2] / name[2:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_objects_are_copied_read_only_and_the_present_ones_left_alone(tmp_path: Path) -> None:
    source, target = tmp_path / "private", tmp_path / "objects"
    target.mkdir()
    fresh_name, fresh = loose(b"blob", b"fresh\n")
    kept_name, kept = loose(b"blob", b"already there\n")
    put(source, fresh_name, fresh)
    put(source, kept_name, kept)
    original = put(target, kept_name, kept)
    before = original.stat().st_ino
    assert import_loose_objects(source, target, 40) == 1
    copied = target / fresh_name[:2] / fresh_name[2:]
    assert copied.read_bytes() == fresh
    assert copied.stat().st_mode & 0o777 == 0o444
    assert original.stat().st_ino == before
    # Nothing half-made is left beside them.
    assert not [p for p in target.rglob("tmp_obj_*")]


def test_only_what_decompresses_to_a_whole_object_of_its_name_is_copied(tmp_path: Path) -> None:
    source, target = tmp_path / "private", tmp_path / "objects"
    target.mkdir()
    good_name, good = loose(b"commit", b"tree 0\n")
    put(source, good_name, good)
    bad_kind, bad = loose(b"evil", b"payload")  # a type git does not know
    put(source, bad_kind, bad)
    trailing_name, trailing = loose(b"blob", b"with a tail")
    put(source, trailing_name, trailing + b"garbage after the stream")
    put(source, "ab" + "c" * 38, b"not zlib at all")
    truncated_name, truncated = loose(b"blob", b"x" * 10_000)
    put(source, truncated_name, truncated[: len(truncated) // 2])
    # Names that are no loose object's are never even opened.
    put(source, "zz" + "0" * 38, good)
    (source / "pack").mkdir()
    (source / "pack" / "pack-x.pack").write_bytes(b"PACK")
    put(source, good_name[:2] + "0" * 10, good)  # too short a name
    assert import_loose_objects(source, target, 40) == 1
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == [
        f"{good_name[:2]}/{good_name[2:]}"
    ]


def test_a_linked_object_directory_is_not_followed(tmp_path: Path) -> None:
    source, target, elsewhere = tmp_path / "private", tmp_path / "objects", tmp_path / "else"
    target.mkdir()
    name, data = loose(b"blob", b"reached through a link\n")
    put(elsewhere, name, data)
    source.mkdir()
    (source / name[:2]).symlink_to(elsewhere / name[:2], target_is_directory=True)
    assert import_loose_objects(source, target, 40) == 0
    assert not (target / name[:2]).exists()


def test_sha256_repositories_have_their_objects_checked_with_sha256(tmp_path: Path) -> None:
    source, target = tmp_path / "private", tmp_path / "objects"
    target.mkdir()
    name, data = loose(b"blob", b"sha256 world\n", algorithm="sha256")
    put(source, name, data)
    sha1_name, sha1_data = loose(b"blob", b"a sha1 object\n")
    put(source, sha1_name, sha1_data)  # 40 digits: no sha256 object's name
    assert import_loose_objects(source, target, 64) == 1
    assert (target / name[:2] / name[2:]).read_bytes() == data


# Once for real: the agent's own git inside bubblewrap, with the private state mounted.


def bwrap_works() -> bool:
    bwrap = find_bwrap()
    if bwrap is None:
        return False
    probe = bwrap_argv(SandboxLayout(cwd=Path("/")), ["true"], bwrap=bwrap)
    return subprocess.run(probe, capture_output=True).returncode == 0


@pytest.mark.skipif(not bwrap_works(), reason="bwrap (bubblewrap) is not installed or cannot run")
def test_a_sandboxed_git_commits_privately_and_cannot_move_a_sibling(setup: Setup) -> None:
    repo, repository, worktree, private = setup
    base = worktree.base_commit
    git(repo, "branch", "orchestrator/run1/t2", base)  # a sibling task's branch
    layout = SandboxLayout(
        cwd=worktree.path,
        read_only=[repository.common_dir],  # the git directory, as the sandbox shows it
        writable=[worktree.path],
        mounts=private.mounts(),
    )
    script = (
        "echo sandboxed > made.txt && git add made.txt && git commit -qm 'from the sandbox' && "
        "! git rev-parse -q --verify refs/heads/orchestrator/run1/t2 && "
        "! git update-ref refs/heads/main HEAD 2>/dev/null"
    )
    done = subprocess.run(
        bwrap_argv(layout, ["sh", "-c", script], bwrap=str(find_bwrap())),
        env=private_env(private),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    made = private.ref_file.read_text().strip()
    assert made != base and not in_repo(repo, made)
    assert git(repo, "rev-parse", BRANCH) == base  # the real branch moves only on adoption
    assert adopt(setup) is None
    assert git(repo, "rev-parse", BRANCH) == made
    assert git(repo, "show", f"{made}:made.txt") == "sandboxed"
    assert git(repo, "rev-parse", "orchestrator/run1/t2") == git(repo, "rev-parse", "main") == base
