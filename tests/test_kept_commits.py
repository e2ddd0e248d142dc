"""A run's task commits, written by the kept hash-object (orchestrator/_git.py): the commit
``git commit-tree`` makes, byte for byte, or commit-tree makes it (bytes git would rewrite,
a zone git does not share, a parent an agent pointed at a tag); never a commit git would
refuse, never written through a planted link; and the user's own identity as git reads it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import anyio
import pytest

from orchestrator._git import Git
from orchestrator.errors import GitError

from .conftest import MakeRepo, git, head_and_tree, with_kept_gits


def by_commit_tree(
    repo: Path, tree: str, parents: list[str], message: str, env: dict[str, str], when: str
) -> str:
    flags = [f for p in parents for f in ("-p", p)]
    return (
        subprocess.run(
            [
                "git",
                "-C",
                str(repo),
                "-c",
                "i18n.commitEncoding=UTF-8",
                "commit-tree",
                *flags,
                "-m",
                message,
                tree,
            ],
            env={
                **os.environ,
                **env,
                "GIT_AUTHOR_DATE": f"@{when}",
                "GIT_COMMITTER_DATE": f"@{when}",
            },
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .strip()
    )


def kept_commit(
    repo: Path, tree: str, parents: list[str], message: str
) -> tuple[str, dict[str, str]]:
    async def made(runner: Git) -> tuple[str, dict[str, str]]:
        commit = await runner.commit_tree(tree, parents, message, known=True)
        return commit, await runner.identity_env()

    result: tuple[str, dict[str, str]] = with_kept_gits(repo, made)
    return result


def assert_kept_commit_is_commit_trees(repo: Path, message: str = "m") -> None:
    """A commit of HEAD's tree on HEAD made by the kept git is the very commit
    ``git commit-tree`` makes of it at the same second, with the same identity."""
    head, tree = head_and_tree(repo)
    commit, identity = kept_commit(repo, tree, [head], message)
    when = git(repo, "show", "-s", "--format=%ad", "--date=raw", commit)
    assert commit == by_commit_tree(repo, tree, [head], message, identity, when)


@pytest.mark.parametrize(
    "message",
    [
        "caf\udce9 latin-1 byte",
        "non-character \ufffe",
        "surrogate-free \U0010ffff ok",
        "cr\r\nlf\r",
    ],
    ids=["invalid-utf8", "u+fffe", "max", "cr"],
)
def test_kept_commit_equals_commit_tree_for_odd_messages(make_repo: MakeRepo, message: str) -> None:
    assert_kept_commit_is_commit_trees(make_repo(), message)


def test_kept_commit_equals_commit_tree_for_a_latin1_name_in_config(make_repo: MakeRepo) -> None:
    repo = make_repo()
    with open(repo / ".git" / "config", "ab") as f:
        f.write(b"[user]\n\tname = Ren\xe9\n\temail = r@example.com\n")
    assert_kept_commit_is_commit_trees(repo)


def test_a_nul_in_the_message_makes_no_commit(make_repo: MakeRepo) -> None:
    """git commit-tree refuses it ('a NUL byte in commit log message not allowed')."""
    repo = make_repo()
    head, tree = head_and_tree(repo)
    with pytest.raises((GitError, ValueError)):
        commit, _ = kept_commit(repo, tree, [head], "task\0\n\nOrchestrator-Run: r\n")
        print(repr(git(repo, "log", "-1", "--format=%B", commit)))


def test_zone_when_tz_changed_after_python_started(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TZ set in os.environ (a library caller, a test) without time.tzset(): git var and
    commit-tree use it, Python's localtime does not."""
    repo = make_repo()
    monkeypatch.setenv("TZ", "America/St_Johns")  # -0330 / -0230
    runner = Git(repo)

    async def lines() -> tuple[bytes, bytes]:
        return await runner.ident_lines(await runner.identity_env())

    author, _ = anyio.run(lines)
    gits = subprocess.run(
        ["git", "-C", str(repo), "var", "GIT_AUTHOR_IDENT"],
        env={**runner.environment, **anyio.run(runner.identity_env)},
        capture_output=True,
        check=True,
    ).stdout.strip()
    assert author.rsplit(b" ", 1)[1] == gits.rsplit(b" ", 1)[1]


def test_sha256_repository(tmp_path: Path) -> None:
    repo = tmp_path / "r256"
    subprocess.run(["git", "init", "-q", "--object-format=sha256", str(repo)], check=True)
    (repo / "a").write_text("a\n")
    git(repo, "add", "a")
    git(repo, "commit", "-qm", "one")
    assert_kept_commit_is_commit_trees(repo)


def test_a_blob_as_tree_is_refused_as_commit_tree_refuses_it(make_repo: MakeRepo) -> None:
    repo = make_repo()
    head = git(repo, "rev-parse", "HEAD")
    blob = git(repo, "rev-parse", "HEAD:src/file0000.txt")

    with pytest.raises(GitError, match="not a valid 'tree' object"):
        with_kept_gits(repo, lambda runner: runner.commit_tree(blob, [head], "m"))  # known: False


def test_kept_commit_under_trio(make_repo: MakeRepo) -> None:
    repo = make_repo()
    head, tree = head_and_tree(repo)

    async def made(runner: Git) -> str:
        await runner.update_ref("refs/heads/t", head, "")
        return await runner.commit_tree(tree, [head], "trio", known=True)

    commit = with_kept_gits(repo, made, backend="trio")
    assert git(repo, "log", "-1", "--format=%s", commit) == "trio"


def test_a_symlink_planted_in_the_scratch_dir_is_not_written_through(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    """An agent running as the user plants scratch/<next> -> a file of the user's: the
    orchestrator's write_bytes follows it and overwrites that file with the commit."""
    repo = make_repo()
    head, tree = head_and_tree(repo)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")

    async def made(runner: Git) -> str:
        await runner.commit_tree(tree, [head], "first", known=True)
        scratch = runner._objects._scratch
        for name in ["2", *(f"tmp{i}" for i in range(3))]:
            (scratch / name).symlink_to(victim)
        return await runner.commit_tree(tree, [head], "second", known=True)

    with_kept_gits(repo, made)
    assert victim.read_text() == "precious\n"


def test_an_agent_that_points_its_branch_at_a_tag_gets_no_corrupt_commit(
    make_repo: MakeRepo,
) -> None:
    """branch_tip reads the loose ref file as it is and check_branch's merge-base peels a
    tag: an agent that points its branch (and its HEAD reflog) at an annotated tag of a
    commit of its own gets commit_tree(tree, [tag]). commit-tree refuses it ('not a valid
    commit object'); the kept hash-object wrote a commit whose parent is a tag (git log of
    the task's branch: 'Failed to traverse parents')."""
    from orchestrator.repo import Repository
    from orchestrator.worktree import branch_tip, check_branch, commit_worktree, create_worktree

    repo_path = make_repo()

    async def main() -> None:
        repo = await Repository.open(repo_path)
        base, base_tree = await repo.resolve_commit("HEAD")
        async with repo.git.kept():
            wt = await create_worktree(repo, "t/tag", repo.state_dir / "wt" / "t", base)
            (wt.path / "own.txt").write_text("own\n")
            git(wt.path, "add", "own.txt")
            git(wt.path, "commit", "-qm", "own")
            own = git(wt.path, "rev-parse", "HEAD")
            git(wt.path, "tag", "-a", "-m", "t", "agent-tag", own)
            tag = git(wt.path, "rev-parse", "refs/tags/agent-tag")
            (repo.common_dir / "refs" / "heads" / "t" / "tag").write_text(tag + "\n")
            reflog = wt.admin_dir / "logs" / "HEAD"
            line = f"{own} {tag} A <a@b> 1700000000 +0000\tagent\n"
            reflog.write_bytes(reflog.read_bytes() + line.encode())
            (wt.path / "more.txt").write_text("more\n")
            tip = await branch_tip(repo, wt)
            assert tip == tag and await check_branch(repo, wt, tip) is None
            with pytest.raises(GitError, match="not a valid 'commit' object"):
                await commit_worktree(
                    repo, wt, "agent: x [task t]", base_tree=base_tree, parent=tip
                )

    anyio.run(main)


def test_an_annotated_tag_as_parent_is_refused_as_commit_tree_refuses_it(
    make_repo: MakeRepo,
) -> None:
    """branch_tip reads the loose ref file as it is and check_branch's merge-base peels a
    tag: an agent that points its branch (and its HEAD reflog) at an annotated tag of a
    commit of its own gets commit_tree(tree, [tag]). commit-tree says 'is a tag, not a
    commit'; the kept hash-object writes a commit whose parent is a tag."""
    repo = make_repo()
    head, tree = head_and_tree(repo)
    git(repo, "tag", "-a", "-m", "t", "t", head)
    tag = git(repo, "rev-parse", "refs/tags/t")
    with pytest.raises(GitError, match="not a valid 'commit' object"):
        anyio.run(Git(repo).commit_tree, tree, [tag], "outside")

    with pytest.raises(GitError, match="not a valid 'commit' object"):
        with_kept_gits(repo, lambda runner: runner.commit_tree(tree, [tag], "kept"))  # known: False


@pytest.mark.parametrize(
    ("config", "env", "author"),
    [
        ({"author.name": "Alice", "user.email": "a@example.com"}, {}, b"Alice <a@example.com>"),
        (
            {
                "user.name": "Bob",
                "committer.email": "c@example.com",
                "author.email": "b@example.com",
            },
            {},
            b"Bob <b@example.com>",
        ),
        ({"user.name": "Eve"}, {"EMAIL": "eve@example.com"}, b"Eve <eve@example.com>"),
    ],
    ids=["author.name", "author.email", "EMAIL"],
)
def test_the_users_own_identity_is_not_replaced_by_the_fallback(
    make_repo: MakeRepo,
    monkeypatch: pytest.MonkeyPatch,
    config: dict[str, str],
    env: dict[str, str],
    author: bytes,
) -> None:
    """identity_env says 'the user's identity always wins; only a missing name or email is
    filled', but it reads only user.name/user.email: author.name, author.email,
    committer.* and EMAIL (which git takes before user.*, or after) were overridden by
    GIT_*_NAME/EMAIL=worktree-orchestrator."""
    repo = make_repo()
    for key, value in config.items():
        git(repo, "config", key, value)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    runner = Git(repo)

    async def lines() -> tuple[bytes, bytes]:
        return await runner.ident_lines(await runner.identity_env())

    ours = anyio.run(lines)[0].rsplit(b" ", 2)[0]
    assert ours == author
