"""The demo: a plan, three small agent scripts, and a repository made on first use."""

from __future__ import annotations

from pathlib import Path

from .._git import Git
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
    alone and reported as NotARepository.
    """
    path = path.absolute()
    if path.exists():
        if not (path / ".git").exists():
            raise NotARepository(
                f"{path} exists but is not the demo repository (no .git); remove it or pass --repo"
            )
        await Repository.open(path)
        return path, False
    path.mkdir(parents=True)
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
