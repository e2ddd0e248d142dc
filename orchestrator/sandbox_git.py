"""A sandboxed task's git: it may commit on its own branch, and change nothing else.

Inside the sandbox the repository's git directory is read-only: its config, hooks, packed
and loose refs, and object store. What the task's own git commands need to write is private
to the attempt, in a scratch directory of the run, shown at the places git looks for it:

- the worktree's admin directory (``.git/worktrees/<name>``: HEAD, index) is a copy;
- the directory of its branch's loose ref (``refs/heads/orchestrator/<run>/``) holds only its
  own ref, so that sibling tasks' branches are neither seen nor moved; likewise its reflog;
- new objects go to a private object directory (``GIT_OBJECT_DIRECTORY``), the repository's
  own being an alternate: no object file of the repository can be replaced or removed.

After the attempt, :func:`adopt_commits` takes the commits the agent made on its branch: each
loose object of the private store is checked (it decompresses to what its name says) and
copied in, and the branch moves by compare-and-swap, only to a commit whose history includes
where the attempt started and whose objects are all there. Nothing else the agent did to its
git state (a moved HEAD, its index) comes out: the orchestrator commits from the worktree's
files, as without a sandbox.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

import anyio

from envelopes import is_object_id

from .errors import GitError
from .repo import Repository
from .sparse import write_patterns
from .worktree import Worktree

__all__ = ["PrivateGit", "adopt_commits", "import_loose_objects", "prepare_private_git"]

#: What of a worktree's admin directory the private copy starts with.
_ADMIN_FILES = ("HEAD", "commondir", "gitdir", "index")
_OBJECT_TYPES = (b"blob", b"tree", b"commit", b"tag")


@dataclass(frozen=True)
class PrivateGit:
    """The private git state of one sandboxed attempt, under ``scratch``."""

    scratch: Path
    worktree: Worktree
    common_dir: Path
    start: str

    @property
    def objects(self) -> Path:
        return self.scratch / "objects"

    @property
    def ref_file(self) -> Path:
        return self.scratch / "refs" / self.worktree.branch.rsplit("/", 1)[-1]

    def mounts(self) -> list[tuple[Path, Path, bool]]:
        """``(source, target, writable)`` mounts that put the private state where git looks."""
        parent = self.worktree.branch.rsplit("/", 1)[0] if "/" in self.worktree.branch else ""
        out = [(self.scratch / "admin", self.worktree.admin_dir, True)]
        refs = self.common_dir / "refs" / "heads" / parent
        if parent and refs.is_dir():
            out.append((self.scratch / "refs", refs, True))
        logs = self.common_dir / "logs" / "refs" / "heads" / parent
        if parent and logs.is_dir():
            out.append((self.scratch / "logs", logs, True))
        out.append((self.objects, self.objects, True))
        return out

    def env(self) -> dict[str, str]:
        """Variables that send the task's new objects to the private store."""
        return {
            "GIT_OBJECT_DIRECTORY": str(self.objects),
            "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(self.common_dir / "objects"),
        }


def prepare_private_git(worktree: Worktree, common_dir: Path, scratch: Path) -> PrivateGit:
    """Make the private git state of one attempt under *scratch* (blocking: run in a thread)."""
    admin = scratch / "admin"
    admin.mkdir(parents=True)
    for name in _ADMIN_FILES:
        with contextlib.suppress(FileNotFoundError):
            shutil.copyfile(worktree.admin_dir / name, admin / name)
    # A sparse worktree's cone: the agent's git needs it to keep the worktree sparse.
    write_patterns(admin, worktree.sparse)
    start = _read_ref(common_dir / "refs" / "heads" / worktree.branch) or worktree.base_commit
    private = PrivateGit(scratch, worktree, common_dir, start)
    private.ref_file.parent.mkdir()
    private.ref_file.write_text(start + "\n", encoding="ascii")
    (scratch / "logs").mkdir()
    for sub in ("info", "pack"):
        (private.objects / sub).mkdir(parents=True)
    return private


def _read_ref(path: Path) -> str | None:
    """A loose ref's object id, read without following a link; None if it is not one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        value = os.read(fd, 200).decode("ascii", errors="replace").strip()
    finally:
        os.close(fd)
    return value if is_object_id(value) else None


async def adopt_commits(repo: Repository, private: PrivateGit) -> str | None:
    """Take the commits the agent made on its branch; why not, or None when taken (or none).

    See the module docstring. Runs git only when the branch moved.
    """
    new = await anyio.to_thread.run_sync(_read_ref, private.ref_file)
    start = private.start
    if new == start:
        return None
    if new is None or len(new) != len(start):
        return "its branch in the sandbox names no commit: its commits are not kept"
    await anyio.to_thread.run_sync(
        import_loose_objects, private.objects, private.common_dir / "objects", len(start)
    )
    git = repo.git
    if not await git.ok("merge-base", "--is-ancestor", start, new):
        return (
            f"its branch was moved to {new[:12]}, which is not a commit built on "
            f"{start[:12]}: its commits are not kept"
        )
    if not await git.ok("rev-list", "--quiet", "--objects", new, "--not", start):
        return f"objects of its commit {new[:12]} are missing: its commits are not kept"
    worktree = private.worktree
    try:
        # Through the worktree's HEAD, as the agent's own git would have: the worktree's HEAD
        # reflog records the move, which tells it from one made by another process.
        await git.run(
            *worktree.git_args(),
            "update-ref",
            "-m",
            "commit: the sandboxed agent's commits",
            "HEAD",
            new,
            start,
            cwd=worktree.path,
            env={"GIT_COMMON_DIR": str(private.common_dir)},
        )
    except GitError as exc:
        return f"its branch could not be moved to {new[:12]}: {exc}"
    return None


def import_loose_objects(source: Path, target: Path, hex_length: int) -> int:
    """Copy the loose objects of *source* that *target* lacks, each checked to hold what its
    name says (blocking). Anything else in *source* (packs, links, odd names) is ignored.
    Returns how many were copied."""
    algorithm = {40: "sha1", 64: "sha256"}[hex_length]
    copied = 0
    hexdigits = set("0123456789abcdef")
    for sub in sorted(source.iterdir()):
        if len(sub.name) != 2 or not set(sub.name) <= hexdigits or sub.is_symlink():
            continue
        for entry in sorted(sub.iterdir()):
            name = sub.name + entry.name
            if len(name) != hex_length or not set(entry.name) <= hexdigits:
                continue
            final = target / sub.name / entry.name
            if final.exists():
                continue
            copied += _copy_checked(entry, final, name, algorithm)
    return copied


def _copy_checked(path: Path, final: Path, name: str, algorithm: str) -> int:
    """Copy one loose object to *final* if it decompresses to an object named *name*."""
    temporary = final.parent / f"tmp_obj_{secrets.token_hex(6)}"
    try:
        final.parent.mkdir(exist_ok=True)
        with (
            open(path, "rb", opener=_no_follow) as src,
            temporary.open("xb") as out,
        ):
            if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                return 0
            inflate = zlib.decompressobj()
            digest = hashlib.new(algorithm)
            header = b""
            while chunk := src.read(1 << 16):
                out.write(chunk)
                # Bounded pieces: a small file may inflate to gigabytes.
                while chunk:
                    data = inflate.decompress(chunk, 1 << 20)
                    chunk = inflate.unconsumed_tail
                    if len(header) < 64:
                        header = (header + data)[:64]
                    digest.update(data)
            kind, _, rest = header.partition(b" ")
            if (
                not inflate.eof
                or inflate.unused_data
                or kind not in _OBJECT_TYPES
                or b"\0" not in rest
                or digest.hexdigest() != name
            ):
                return 0
        os.chmod(temporary, 0o444)
        try:
            os.link(temporary, final)
        except FileExistsError:
            return 0
        return 1
    except (OSError, zlib.error):
        return 0
    finally:
        temporary.unlink(missing_ok=True)


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)
