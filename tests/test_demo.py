"""orchestrator/demo: the demo repository made on first use (one commit, the machine's git
identity or the fallback), found again afterwards, never made over a directory that is not
one, and kept out of the ``git status`` of a repository it lands in."""

from __future__ import annotations

import subprocess
from pathlib import Path

import anyio
import pytest
import yaml

from orchestrator._git import FALLBACK_IDENTITY
from orchestrator.demo import DEMO_PLAN, ensure_demo_repo
from orchestrator.errors import NotARepository

from .conftest import git

FILES = {"README.md", "textkit/__init__.py", "textkit/reverse.py", ".gitignore"}


@pytest.fixture
def outside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory in no repository, however the machine's /tmp is laid out."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    where = tmp_path / "empty"
    where.mkdir()
    return where


def ensure(path: Path) -> tuple[Path, bool]:
    made: tuple[Path, bool] = anyio.run(ensure_demo_repo, path)
    return made


def tracked(repo: Path) -> set[str]:
    return set(git(repo, "ls-files").splitlines())


def test_made_in_an_empty_directory_with_one_commit(outside: Path) -> None:
    path, created = ensure(outside / "orchestrator-demo")
    assert (path, created) == (outside / "orchestrator-demo", True)
    assert tracked(path) == FILES
    assert git(path, "rev-list", "--count", "HEAD") == "1"
    assert git(path, "symbolic-ref", "HEAD") == "refs/heads/main"
    assert git(path, "log", "-1", "--format=%s") == "textkit: initial commit"
    name, email = FALLBACK_IDENTITY  # the conftest's machine has no git identity
    assert git(path, "log", "-1", "--format=%an <%ae>") == f"{name} <{email}>"
    assert git(path, "status", "--porcelain") == ""
    reverse = (path / "textkit" / "reverse.py").read_text()
    namespace: dict[str, object] = {}
    exec(compile(reverse, "reverse.py", "exec"), namespace)
    assert namespace["reverse_words"]("a b c") == "c b a"  # type: ignore[operator]


def test_a_relative_path_in_missing_parents_is_made_absolute(
    outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(outside)
    path, created = ensure(Path("nested/dirs/demo"))
    assert created and path == outside / "nested" / "dirs" / "demo"
    assert path.is_absolute() and tracked(path) == FILES


def test_the_users_identity_is_used_when_there_is_one(
    outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Ada")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "ada@example.com")
    path, _ = ensure(outside / "demo")
    assert git(path, "log", "-1", "--format=%an <%ae>") == "Ada <ada@example.com>"
    # Only what is missing is filled: the committer still falls back.
    assert git(path, "log", "-1", "--format=%cn") == FALLBACK_IDENTITY[0]


def test_a_second_call_finds_it_and_changes_nothing(outside: Path) -> None:
    path, _ = ensure(outside / "demo")
    head = git(path, "rev-parse", "HEAD")
    (path / "textkit" / "extra.py").write_text("# a user's own change\n")
    again, created = ensure(path)
    assert (again, created) == (path, False)
    assert git(path, "rev-parse", "HEAD") == head
    assert (path / "textkit" / "extra.py").read_text() == "# a user's own change\n"


@pytest.mark.parametrize("contents", [{}, {"notes.txt": "mine\n"}], ids=["empty", "with-files"])
def test_an_existing_directory_without_git_is_refused_and_left_alone(
    outside: Path, contents: dict[str, str]
) -> None:
    path = outside / "orchestrator-demo"
    path.mkdir()
    for name, text in contents.items():
        (path / name).write_text(text)
    with pytest.raises(NotARepository) as caught:
        ensure(path)
    assert str(caught.value) == (
        f"{path} exists but is not the demo repository (no .git); remove it or pass --repo"
    )
    assert {p.name: p.read_text() for p in path.iterdir()} == contents


def test_a_file_in_its_place_is_refused(outside: Path) -> None:
    path = outside / "orchestrator-demo"
    path.write_text("a file\n")
    with pytest.raises(NotARepository):
        ensure(path)
    assert path.read_text() == "a file\n"


def test_a_broken_dot_git_is_not_a_repository(outside: Path) -> None:
    path = outside / "orchestrator-demo"
    path.mkdir()
    (path / ".git").write_text("gitdir: /nowhere\n")
    with pytest.raises(NotARepository, match="not a git repository"):
        ensure(path)
    assert (path / ".git").read_text() == "gitdir: /nowhere\n"


def outer_repo(tmp_path: Path) -> Path:
    outer = tmp_path / "outer"
    outer.mkdir()
    subprocess.run(["git", "init", "--quiet", str(outer)], check=True)
    return outer


def excludes(repo: Path) -> list[str]:
    text = (repo / ".git" / "info" / "exclude").read_text()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_inside_another_repository_it_is_excluded_there_once(tmp_path: Path) -> None:
    outer = outer_repo(tmp_path)
    (outer / "work").mkdir()  # as `orchestrator run --demo` in outer/work
    path, created = ensure(outer / "work" / "orchestrator-demo")
    assert created
    assert excludes(outer) == ["/work/orchestrator-demo/"]
    assert git(outer, "status", "--porcelain", "--untracked-files=all") == ""
    ensure(path)
    assert excludes(outer) == ["/work/orchestrator-demo/"]
    # Its own repository, not a part of the outer one.
    assert git(path, "rev-parse", "--show-toplevel") == str(path)


def test_a_path_the_outer_repository_already_ignores_is_not_added(tmp_path: Path) -> None:
    outer = outer_repo(tmp_path)
    (outer / ".gitignore").write_text("demos/\n")
    ensure(outer / "demos" / "one")
    assert excludes(outer) == []
    assert git(outer, "status", "--porcelain") == "?? .gitignore"


def test_inside_another_repository_in_directories_still_to_be_made_it_is_excluded(
    tmp_path: Path,
) -> None:
    outer = outer_repo(tmp_path)
    ensure(outer / "new" / "dirs" / "orchestrator-demo")
    assert git(outer, "status", "--porcelain", "--untracked-files=all") == ""


def test_a_path_with_glob_characters_is_excluded_as_itself(tmp_path: Path) -> None:
    outer = outer_repo(tmp_path)
    (outer / "drafts[old]").mkdir()
    ensure(outer / "drafts[old]" / "orchestrator-demo")
    assert excludes(outer) == ["/drafts\\[old\\]/orchestrator-demo/"]  # escaped: not a glob
    assert git(outer, "status", "--porcelain", "--untracked-files=all") == ""


def test_the_demo_plan_names_agents_that_are_shipped() -> None:
    plan = yaml.safe_load(DEMO_PLAN.read_text())
    scripts = {
        argv[-1].replace("{plan_dir}", str(DEMO_PLAN.parent))
        for agent in plan["agents"].values()
        for argv in [agent["command"]]
    }
    assert len(scripts) == 3
    for script in scripts:
        assert Path(script).is_file(), script
    assert {t["agent"] for t in plan["tasks"]} == set(plan["agents"])
