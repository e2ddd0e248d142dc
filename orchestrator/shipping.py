"""What a task on another machine needs, packed to travel: git bundles and files.

A Dask worker sees nothing of the coordinator's disk (docs/distributed.md). What a task
needs goes with it, and what it made comes back, in two forms:

- **git bundles** (:func:`make_bundle`, :func:`unbundle`, :func:`fetch_bundle`): one ref's
  commits, less those the other side already has (``^<commit>``): no other ref, no stash,
  nothing untracked or ignored;
- **files** (:class:`Files`: relative path -> mode and bytes): the plan's own files that its
  commands name (``{plan_dir}/check.sh``, a requirements file), the plan's ``copy`` files,
  and, coming back, the task's envelope, logs and outputs. Unpacked only below the
  directory given, each path checked first (:func:`unpack_files`).
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio

from envelopes import HandoffEnvelope, relative_path_problem

from ._git import check_ids
from .errors import GitError, ShippingError
from .repo import Repository

__all__ = [
    "MAX_SHIPPED_FILES_BYTES",
    "Files",
    "ShippingError",
    "bundle_heads",
    "fetch_bundle",
    "make_bundle",
    "pack_files",
    "pack_tree",
    "plan_references",
    "unbundle",
    "unpack_files",
]

#: Files as they travel: relative path (``/``-separated) -> (permission bits, content).
Files = dict[str, tuple[int, bytes]]

#: Most the files shipped with one run (the plan's, its copies) or back with one task (its
#: logs and outputs) may weigh together.
MAX_SHIPPED_FILES_BYTES = 512 << 20
#: Most files one of those may hold.
MAX_SHIPPED_FILES = 20_000

#: ``{plan_dir}/<path>`` in a command, requirement or variable: a file of the plan's.
_PLAN_FILE = re.compile(r"\{plan_dir\}/([^\s\"'`;|&<>(){}$*?\[\]]+)")
#: A requirement that names a file relative to the plan's directory (installs run there).
_REQUIREMENT_FILE = re.compile(r"^\s*(?:-r|-c|--requirement|--constraint)[\s=]+(\S+)\s*$")


def plan_references(envelope: HandoffEnvelope, *more: Any) -> set[str]:
    """The plan's own files that *envelope* (and *more*: its agent's command, the plan's
    hooks, as JSON-like values) names, as paths relative to the plan's directory.

    ``{plan_dir}/x`` anywhere, a requirement ``-r x``/``-c x`` (installs run in the plan's
    directory) and an agent program ``./x`` or ``dir/x`` (taken from the plan's directory)
    count; paths that leave the directory are left out (they are not the plan's).
    """
    found: set[str] = set()
    # What the plan wrote, never what an upstream agent produced (its output, its files).
    written = envelope.model_dump(mode="json", exclude={"upstream"})
    for text in _strings([written, *more]):
        found.update(match.group(1) for match in _PLAN_FILE.finditer(text))
    for requirement in envelope.requirements:
        if (match := _REQUIREMENT_FILE.match(requirement)) and "{" not in match.group(1):
            found.add(match.group(1))
    return {p.rstrip("/") for p in found if p and relative_path_problem(p.rstrip("/")) is None}


def _strings(values: Iterable[Any]) -> Iterator[str]:
    for value in values:
        if isinstance(value, str):
            yield value
        elif isinstance(value, Mapping):
            yield from _strings(value.values())
        elif isinstance(value, list | tuple):
            yield from _strings(value)


def pack_files(root: Path, paths: Iterable[str]) -> Files:
    """The files *paths* name below *root* (a directory: every file in it), packed.

    Blocking. Missing paths are left out (a task naming one fails on the worker as it
    would here); so are symbolic links, FIFOs and anything that resolves outside *root*.
    ShippingError past :data:`MAX_SHIPPED_FILES_BYTES` or :data:`MAX_SHIPPED_FILES`.
    """
    packing = _Packing(root)
    real_root = root.resolve()
    for path in sorted(set(paths)):
        target = root / path
        try:
            if not target.resolve().is_relative_to(real_root):
                continue
            info = target.lstat()
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode):
            packing.add_dir(target)
        elif stat.S_ISREG(info.st_mode):
            packing.add(target)
    return packing.files


def pack_tree(root: Path) -> Files:
    """Every regular file below *root*, packed (blocking; the limits of :func:`pack_files`)."""
    packing = _Packing(root)
    if root.is_dir():
        packing.add_dir(root)
    return packing.files


class _Packing:
    """Files being packed below *root*, and their total size so far."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: Files = {}
        self.total = 0

    def add_dir(self, directory: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(directory):  # never follows links
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath, name)
                if path.is_file() and not path.is_symlink():
                    self.add(path)

    def add(self, path: Path) -> None:
        relative = path.relative_to(self.root).as_posix()
        if relative in self.files:
            return
        if len(self.files) >= MAX_SHIPPED_FILES:
            raise ShippingError(f"more than {MAX_SHIPPED_FILES} files to send to the workers")
        room = MAX_SHIPPED_FILES_BYTES - self.total
        try:
            info = path.lstat()
            if info.st_size > room:
                raise ShippingError(
                    f"{relative}: the files to send to the workers would come to more than "
                    f"{MAX_SHIPPED_FILES_BYTES >> 20} MiB"
                )
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                data = f.read(room + 1)
        except OSError:
            return  # gone meanwhile, or not readable: left out, as a missing one is
        if len(data) > room:
            raise ShippingError(
                f"{relative}: the files to send would come to more than "
                f"{MAX_SHIPPED_FILES_BYTES >> 20} MiB"
            )
        self.files[relative] = (stat.S_IMODE(info.st_mode) & 0o755, data)
        self.total += len(data)


def unpack_files(root: Path, files: Files, *, allowed: re.Pattern[str] | None = None) -> None:
    """Write *files* below *root*, replacing what is there; ShippingError, before anything
    is written, when a path is not a plain relative path (or does not match *allowed*), the
    files are too many or too big, or a directory on the way is a symbolic link.

    Blocking.
    """
    if len(files) > MAX_SHIPPED_FILES:
        raise ShippingError(f"{len(files)} files sent: more than {MAX_SHIPPED_FILES}")
    total = 0
    for path, entry in files.items():
        if not (isinstance(path, str) and isinstance(entry, tuple) and len(entry) == 2):
            raise ShippingError("a file sent is not a (mode, bytes) pair under a path")
        mode, data = entry
        if not (isinstance(mode, int) and isinstance(data, bytes)):
            raise ShippingError(f"{path!r}: not a (mode, bytes) pair")
        if why := relative_path_problem(path):
            raise ShippingError(f"a file sent is named {path!r}: {why}")
        if allowed is not None and not allowed.fullmatch(path):
            raise ShippingError(f"a file sent is named {path!r}, which it may not be")
        total += len(data)
    if total > MAX_SHIPPED_FILES_BYTES:
        raise ShippingError(f"files sent come to more than {MAX_SHIPPED_FILES_BYTES >> 20} MiB")
    for path in files:
        parent = root
        for part in Path(path).parts[:-1]:
            parent = parent / part
            if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
                raise ShippingError(f"{path}: {parent} is not a directory")
        target = root / path
        if target.is_symlink() or (target.exists() and not target.is_file()):
            raise ShippingError(f"{path}: something else is there")
    root.mkdir(parents=True, exist_ok=True)
    for path, (mode, data) in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        # Written aside, then renamed: a file another task is running or copying right now
        # is replaced whole, never seen half written.
        scratch = target.with_name(f".{target.name}.{secrets.token_hex(4)}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(scratch, flags, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(scratch, (mode & 0o755) | 0o600)
        os.replace(scratch, target)


async def make_bundle(repo: Repository, tip: str, have: Iterable[str], path: Path) -> Path | None:
    """Write a bundle of *tip*'s history, less what *have* (commits the other side has)
    reaches, to *path*; None when the other side has everything already.

    Every value is a checked object id; the bundle holds one ref, made for the purpose
    (``refs/orchestrator-ship/<random>``) and removed after. GitError when git fails.
    """
    if tip in set(have):
        return None
    have = sorted(set(have))
    check_ids(tip, *have)
    ref = f"refs/orchestrator-ship/{secrets.token_hex(8)}"
    await repo.git.run("update-ref", ref, tip)
    try:
        exclude = [f"^{commit}" for commit in have]
        result = await repo.git.run(
            "bundle", "create", "--quiet", str(path), ref, *exclude, check=False
        )
        if result.returncode != 0:
            message = result.stderr.decode(errors="replace")
            if "empty bundle" in message:
                return None
            raise GitError(["bundle", "create"], result.returncode, message)
    finally:
        await repo.git.run("update-ref", "-d", ref, check=False)
    return path


async def unbundle(repo: Repository, path: Path, tip: str, keep_as: str) -> None:
    """Store the objects of the bundle at *path* in *repo*, and keep *tip* (a checked object
    id, which the bundle must bring or the repository hold) as the ref *keep_as*.

    GitError when the bundle is not one, lacks what it needs, or does not hold *tip*.
    """
    check_ids(tip)
    await repo.git.run("bundle", "unbundle", str(path))
    await repo.git.run("update-ref", keep_as, tip)


def bundle_heads(path: Path, limit: int = 1 << 16) -> list[tuple[str, str]]:
    """The refs a bundle file brings, (object id, ref name), read from its header (at most
    *limit* bytes of it); GitError when it is not a version 2 bundle."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        return _bundle_header(f.read(limit))[0]


def _bundle_header(data: bytes, limit: int = 1 << 16) -> tuple[list[tuple[str, str]], int]:
    """A bundle's refs and where its pack starts; GitError when it is not a v2 bundle."""
    end = data.find(b"\n\n", 0, limit)
    lines = data[:end].decode("ascii", errors="replace").split("\n") if end > 0 else []
    if not lines or lines[0] != "# v2 git bundle":
        raise GitError(["bundle"], 1, "not a git bundle (or its header is too long)")
    heads = []
    for line in lines[1:]:
        if line.startswith("-"):
            continue  # a prerequisite: a commit the receiving side must have
        sha, _, ref = line.partition(" ")
        heads.append((sha, ref))
    return heads, end + 2


async def fetch_bundle(
    repo: Repository,
    bundle: bytes,
    commit: str,
    tree: str,
    branch: str,
    *,
    descends_from: str,
) -> None:
    """Bring *commit* from *bundle* (a bundle file's bytes) into *repo* as the task's
    *branch* (``orchestrator/...``), once it is sure that the bundle brings that commit
    alone, as a task's branch, that every object in it is well formed (``index-pack
    --strict``: git's ``fetch.fsckObjects`` is not applied to bundles before git 2.46), that
    the commit's tree is *tree*, and that it descends from *descends_from*.

    The bundle's objects are indexed into a quarantine directory (the repository's objects
    as its alternate) and moved in only once every check passed: a bundle refused leaves
    nothing behind. GitError, and no branch, when any check fails.
    """
    check_ids(commit, tree, descends_from)
    heads, start = _bundle_header(bundle)
    if len(heads) != 1 or heads[0][0] != commit:
        raise GitError(["bundle"], 1, f"the bundle does not bring {commit} alone")
    ref = heads[0][1]
    if not ref.startswith("refs/heads/orchestrator/") or ".." in ref:
        raise GitError(["bundle"], 1, f"the bundle's ref {ref!r} is not a task's branch")
    objects = repo.common_dir / "objects"
    with tempfile.TemporaryDirectory(prefix="incoming-", dir=objects) as scratch:
        quarantine = Path(scratch)
        (quarantine / "pack").mkdir()
        env = {
            "GIT_OBJECT_DIRECTORY": str(quarantine),
            "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(objects),
        }
        git = repo.git
        await git.run(
            "index-pack", "--stdin", "--fix-thin", "--strict", stdin=bundle[start:], env=env
        )
        found = await git.out(
            "rev-parse", "--verify", "--end-of-options", f"{commit}^{{tree}}", env=env
        )
        if found != tree:
            raise GitError(["bundle"], 1, f"commit {commit} has tree {found}, not {tree}")
        ancestry = await git.run(
            "merge-base", "--is-ancestor", descends_from, commit, env=env, check=False
        )
        if ancestry.returncode != 0:
            raise GitError(["bundle"], 1, f"commit {commit} does not descend from {descends_from}")
        await anyio.to_thread.run_sync(_move_packs, quarantine / "pack", objects / "pack")
    await repo.git.run("update-ref", f"refs/heads/{branch}", commit)


def _move_packs(source: Path, target: Path) -> None:
    """Move the packs of *source* into *target*: each pack's index last (git finds a pack by
    its index, so it never sees half of one)."""
    target.mkdir(exist_ok=True)
    files = sorted(source.glob("pack-*"), key=lambda p: (p.suffix == ".idx", p.name))
    for path in files:
        os.replace(path, target / path.name)
