"""The demo: a plan, three small agent scripts, and a repository made on first use."""

from __future__ import annotations

import re
from pathlib import Path

import anyio

from .._git import Git
from ..errors import GitError
from ..repo import NotARepository, Repository

__all__ = ["DEMO_PLAN", "ensure_demo_repo"]

DEMO_PLAN = Path(__file__).with_name("demo.yaml")

_FILES = {
    "README.md": "# textkit\n\nA tiny text toolkit, changed by the worktree-orchestrator demo's agents.\n",
    "textkit/__init__.py": '"""textkit: small text helpers."""\n',
    "textkit/reverse.py": (
        "def reverse_words(text: str) -> str:\n"
        '    """The words of *text* in reverse order."""\n'
        '    return " ".join(reversed(text.split()))\n'
    ),
    ".gitignore": "__pycache__/\n",
}


async def ensure_demo_repo(path: Path) -> tuple[Path, bool]:
    """Make the demo repository at *path* unless it is already there.

    Returns ``(path, created)``. An existing directory that is not a git repository is left
    alone and reported as NotARepository. When *path* lands inside another repository's
    working tree and that repository does not ignore it, it is added to that repository's
    ``.git/info/exclude`` (local, never committed), so the demo never shows up in someone's
    ``git status``.
    """
    path = path.absolute()
    if path.exists():
        if not (path / ".git").exists():
            raise NotARepository(
                f"{path} exists but is not the demo repository (no .git); remove it or pass --repo"
            )
        await Repository.open(path)
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)  # git looks for an enclosing repo from there
    await _exclude_from_enclosing_repo(path)
    path.mkdir()
    for name, text in _FILES.items():
        file = path / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text, encoding="utf-8")
    git = Git(path)
    await git.run("init", "--quiet", "--initial-branch=main")
    await git.run("add", "--all")
    await git.run(
        "commit",
        "--quiet",
        "--no-verify",
        "-m",
        "textkit: initial commit",
        env=await git.identity_env(),
    )
    return path, True


async def _exclude_from_enclosing_repo(path: Path) -> None:
    git = Git(path.parent)
    try:
        top = Path(await git.out("rev-parse", "--show-toplevel"))
    except GitError:
        return  # not inside a working tree
    if await git.ok("check-ignore", "--quiet", "--no-index", str(path)):
        return
    exclude = Path(
        await git.out("rev-parse", "--path-format=absolute", "--git-path", "info/exclude")
    )
    # Glob characters and a leading "#" or "!" are escaped: the line names this path only.
    relative = re.sub(r"([\\*?\[\]!#])", r"\\\1", path.resolve().relative_to(top).as_posix())
    line = "/" + relative + "/\n"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    async with await anyio.open_file(exclude, "a", encoding="utf-8") as f:
        await f.write(line)
