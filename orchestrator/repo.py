"""A git repository the orchestrator works in, and where it keeps its state."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from envelopes import is_object_id

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
        asked = ["rev-parse", "--path-format=absolute", "--git-common-dir", "--is-bare-repository"]
        # One git process for the usual case, a working tree; the top directory is asked
        # alone only where that fails (a bare repository, the inside of a git directory).
        both = await git.run(*asked, "--show-toplevel", check=False)
        lines = both.stdout.decode(errors="replace").splitlines()
        if both.returncode == 0 and len(lines) == 3:
            common_dir, bare, root = Path(lines[0]), lines[1] == "true", Path(lines[2])
        else:
            try:
                lines = (await git.out(*asked)).splitlines()
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
        git.common_dir = common_dir
        return cls(
            root=root,
            common_dir=common_dir,
            bare=bare,
            state_dir=state,
            git=git,
            lock=RepoLock(common_dir / "orchestrator" / "metadata.mutex"),
        )

    async def resolve_commit(self, ref: str) -> tuple[str, str]:
        """The commit id and tree id that *ref* names; GitError when it does not resolve.

        One git process: ``cat-file --batch`` resolves ``<ref>^{commit}`` and prints the
        commit, whose first line names its tree (both from one lookup of *ref*, even if it
        moves meanwhile). The name goes on git's standard input, never its command line.
        """
        if ref.startswith("-") or not ref or any(c in ref for c in "\n\r\0"):
            raise GitError(["rev-parse", ref], 128, f"fatal: not a revision: {ref!r}")
        asked = ["cat-file", "--batch"]
        out, _ = await self.git.read(
            *asked,
            stdin=f"{ref}^{{commit}}\n".encode("utf-8", "surrogateescape"),
            limit=_COMMIT_HEAD_BYTES,
            timeout=math.inf,
        )
        header, _, body = out.partition(b"\n")
        fields = header.split(b" ")
        tree = body.split(b"\n", 1)[0].split(b" ")
        if len(fields) == 3 and fields[1] == b"commit" and len(tree) == 2 and tree[0] == b"tree":
            commit, tree_id = (
                fields[0].decode("ascii", "replace"),
                tree[1].decode("ascii", "replace"),
            )
            if is_object_id(commit) and is_object_id(tree_id):
                return commit, tree_id
        raise GitError(asked, 128, f"fatal: {ref!r} does not name a commit")


#: What is read of the base commit's object: its header and first line, which names its tree
#: (a commit with a message of gigabytes is not read whole).
_COMMIT_HEAD_BYTES = 1 << 16
