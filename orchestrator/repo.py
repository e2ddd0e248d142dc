"""A git repository the orchestrator works in, and where it keeps its state."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ._git import Git
from .errors import GitError, NotARepository
from .locks import RepoLock

__all__ = ["NotARepository", "Repository"]


@dataclass
class Repository:
    """An opened repository: its paths, a git runner and the metadata lock.

    ``state_dir`` (default ``<git-common-dir>/orchestrator``) holds run directories,
    worktrees and venvs; being inside the git directory it is never part of anyone's checkout.
    """

    root: Path
    common_dir: Path
    bare: bool
    state_dir: Path
    git: Git
    lock: RepoLock = field(repr=False)

    @classmethod
    async def open(cls, path: Path | str, *, state_dir: Path | str | None = None) -> Repository:
        """Open the repository containing *path*; NotARepository when there is none."""
        path = Path(path).expanduser().absolute()
        if not path.is_dir():
            raise NotARepository(f"not a git repository: {path} (no such directory)")
        git = Git(path)
        try:
            lines = (
                await git.out(
                    "rev-parse",
                    "--path-format=absolute",
                    "--git-common-dir",
                    "--is-bare-repository",
                )
            ).splitlines()
        except GitError as exc:
            raise NotARepository(f"not a git repository: {path}") from exc
        common_dir, bare = Path(lines[0]), lines[1] == "true"
        try:
            root = common_dir if bare else Path(await git.out("rev-parse", "--show-toplevel"))
        except GitError as exc:
            raise NotARepository(
                f"{path} is inside a git directory, not a working tree; give the repository's top directory"
            ) from exc
        state = Path(state_dir).absolute() if state_dir else common_dir / "orchestrator"
        git.repo = root
        return cls(
            root=root,
            common_dir=common_dir,
            bare=bare,
            state_dir=state,
            git=git,
            lock=RepoLock(common_dir / "orchestrator" / "metadata.mutex"),
        )

    async def resolve_commit(self, ref: str) -> tuple[str, str]:
        """The commit id and tree id that *ref* names; GitError when it does not resolve."""
        if ref.startswith("-"):
            raise GitError(["rev-parse", ref], 128, f"fatal: not a revision: {ref!r}")
        commit = await self.git.out(
            "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}"
        )
        tree = await self.git.out(
            "rev-parse", "--verify", "--quiet", "--end-of-options", f"{commit}^{{tree}}"
        )
        return commit, tree
