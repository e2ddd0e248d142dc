"""orchestrator/repo.py: opening a repository from anywhere inside it, refusing what is not
one, where the state goes, and resolving a base reference to a commit and its tree."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import anyio
import pytest

from orchestrator.errors import GitError, NotARepository
from orchestrator.repo import Repository

from .conftest import MakeRepo, git


def open_repo(path: Path | str, **options: object) -> Repository:
    repository: Repository = anyio.run(lambda: Repository.open(path, **options))  # type: ignore[arg-type]
    repository.lock.close()
    return repository


def test_opened_from_a_subdirectory_it_is_the_whole_repository(make_repo: MakeRepo) -> None:
    repo = make_repo(extra={"deep/er/file.txt": "x\n"})
    repository = open_repo(repo / "deep" / "er")
    assert repository.root == repo
    assert repository.common_dir == repo / ".git"
    assert not repository.bare
    assert repository.state_dir == repo / ".git" / "orchestrator"
    assert repository.git.repo == repo  # later commands run at the top, not in deep/er
    assert repository.lock.path == repo / ".git" / "orchestrator" / "metadata.mutex"
    assert repository.git.calls == 1  # one rev-parse, and nothing else
    assert not repository.state_dir.exists()  # opening makes nothing


def test_a_relative_or_home_path_is_made_absolute(
    make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(name="my repo é")
    with contextlib.chdir(tmp_path):
        assert open_repo("my repo é/src").root == repo
    monkeypatch.setenv("HOME", str(tmp_path))
    assert open_repo("~/my repo é").root == repo


def test_a_linked_worktree_opens_as_itself_with_the_shared_git_directory(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    linked = tmp_path / "linked"
    git(repo, "worktree", "add", "--quiet", "-b", "side", str(linked))
    repository = open_repo(linked / "src")
    assert repository.root == linked
    assert repository.common_dir == repo / ".git"
    assert repository.state_dir == repo / ".git" / "orchestrator"


def test_a_bare_repository_is_its_own_root(make_repo: MakeRepo, tmp_path: Path) -> None:
    source = make_repo()
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(source), str(bare)], check=True)
    repository = open_repo(bare)
    assert repository.bare
    assert repository.root == repository.common_dir == bare
    assert repository.state_dir == bare / "orchestrator"
    commit, _ = anyio.run(repository.resolve_commit, "main")
    assert commit == git(source, "rev-parse", "main")


def test_a_state_dir_given_moves_the_state_but_not_the_lock(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    with contextlib.chdir(tmp_path):
        repository = open_repo(repo, state_dir="elsewhere/state")
    assert repository.state_dir == tmp_path / "elsewhere" / "state"
    # The metadata lock is per repository: it stays in the git directory.
    assert repository.lock.path == repo / ".git" / "orchestrator" / "metadata.mutex"
    assert open_repo(repo, state_dir=tmp_path / "abs").state_dir == tmp_path / "abs"


def test_a_directory_outside_any_repository_is_not_a_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    # However the machine's /tmp is laid out, git looks no higher than tmp_path.
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    with pytest.raises(NotARepository) as caught:
        open_repo(plain)
    assert str(caught.value) == f"not a git repository: {plain}"
    assert isinstance(caught.value.__cause__, GitError)


@pytest.mark.parametrize("what", ["missing", "file"])
def test_a_path_that_is_no_directory_is_not_a_repository(make_repo: MakeRepo, what: str) -> None:
    repo = make_repo()
    path = repo / "missing" if what == "missing" else repo / "src" / "file0000.txt"
    with pytest.raises(NotARepository) as caught:
        open_repo(path)
    assert str(caught.value) == f"not a git repository: {path} (no such directory)"


def test_a_path_inside_the_git_directory_is_refused_with_a_hint(make_repo: MakeRepo) -> None:
    repo = make_repo()
    with pytest.raises(NotARepository) as caught:
        open_repo(repo / ".git" / "refs")
    assert str(caught.value) == (
        f"{repo / '.git' / 'refs'} is inside a git directory, not a working tree; "
        "give the repository's top directory"
    )


def test_an_inherited_git_dir_does_not_change_which_repository_opens(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, theirs = make_repo(name="ours"), make_repo(name="theirs")
    monkeypatch.setenv("GIT_DIR", str(theirs / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(theirs))
    repository = open_repo(ours)
    assert (repository.root, repository.common_dir) == (ours, ours / ".git")


def test_resolve_commit_peels_branches_and_tags_to_a_commit_and_its_tree(
    make_repo: MakeRepo,
) -> None:
    repo = make_repo()
    head = git(repo, "rev-parse", "HEAD")
    tree = git(repo, "rev-parse", "HEAD^{tree}")
    git(repo, "tag", "-a", "-m", "annotated", "v1")
    git(repo, "tag", "light")
    repository = open_repo(repo)

    async def resolve_all() -> list[tuple[str, str]]:
        refs = ["HEAD", "main", "refs/heads/main", "v1", "light", head, head[:10]]
        return [await repository.resolve_commit(ref) for ref in refs]

    assert anyio.run(resolve_all) == [(head, tree)] * 7


@pytest.mark.parametrize(
    "ref",
    ["no-such-branch", "HEAD~5", "main:src", "main^{tree}", "HEAD:src/file0000.txt", "", "ma in"],
)
def test_resolve_commit_of_what_names_no_commit_is_a_git_error(
    make_repo: MakeRepo, ref: str
) -> None:
    repository = open_repo(make_repo())
    with pytest.raises(GitError) as caught:
        anyio.run(repository.resolve_commit, ref)
    assert repr(ref) in str(caught.value)  # named, whatever git said of it


@pytest.mark.parametrize("ref", ["-h", "--output=/tmp/x", "--all", "-"])
def test_resolve_commit_refuses_an_option_without_running_git(
    make_repo: MakeRepo, ref: str
) -> None:
    repository = open_repo(make_repo())
    before = repository.git.calls
    with pytest.raises(GitError) as caught:
        anyio.run(repository.resolve_commit, ref)
    assert str(caught.value) == f"git rev-parse {ref}: fatal: not a revision: {ref!r}"
    assert repository.git.calls == before


def test_resolve_commit_is_one_git_process_even_for_a_commit_with_a_huge_message(
    make_repo: MakeRepo,
) -> None:
    repo = make_repo()
    # A message far larger than what is read of the commit: only its first line is needed.
    (repo.parent / "message").write_text("x" * (1 << 20))
    git(repo, "commit", "-q", "--allow-empty", "-F", str(repo.parent / "message"))
    head, tree = git(repo, "rev-parse", "HEAD"), git(repo, "rev-parse", "HEAD^{tree}")
    repository = open_repo(repo)
    before = repository.git.calls
    assert anyio.run(repository.resolve_commit, "main") == (head, tree)
    assert repository.git.calls == before + 1


@pytest.mark.parametrize("ref", ["main\nHEAD~1", "main\rx", "main\0x"])
def test_resolve_commit_refuses_a_name_that_would_be_two_lines_to_git(
    make_repo: MakeRepo, ref: str
) -> None:
    repository = open_repo(make_repo())
    before = repository.git.calls
    with pytest.raises(GitError):
        anyio.run(repository.resolve_commit, ref)
    assert repository.git.calls == before
