"""Sparse worktrees (``sparse:`` in a plan): a worktree that holds only some directories.

git's cone mode: the worktree holds every file at the top level, the files directly in each
ancestor of a named directory, and everything below each named directory. The orchestrator
writes the cone's patterns itself into the worktree's admin directory (``info/sparse-checkout``)
and runs its own git there with ``core.sparseCheckout`` and ``core.sparseCheckoutCone`` given
on the command line; the agent gets the same two settings through ``GIT_CONFIG_*`` variables.
Nothing is written to the repository's config (``git sparse-checkout init`` would set
``extensions.worktreeConfig`` in it).

A file the agent leaves where the cone has none (a directory outside it, which may hold
tracked but skipped paths that neither ``diff-files`` nor ``ls-files -o`` report) is found by
:func:`remove_outside_cone`: in cone mode, the only directories a checkout has are the named
ones, their ancestors, and what is below the named ones, so any other directory in the root or
in an ancestor is removed whole.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from envelopes import digest

from ._fs import remove_entry, remove_tree_at, replace_file

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW

__all__ = [
    "agent_git_config",
    "cone_patterns",
    "git_config_args",
    "remove_outside_cone",
    "sparse_key",
    "write_patterns",
]


def git_config_args(sparse: Sequence[str] | None) -> tuple[str, ...]:
    """The ``-c`` options for the orchestrator's git in a worktree with *sparse* (None: full)."""
    if sparse is None:
        # Explicitly off: a repository whose own config turns sparse checkout on must not
        # make a full worktree sparse (with no patterns, git would check out nothing).
        return ("-c", "core.sparseCheckout=false")
    return ("-c", "core.sparseCheckout=true", "-c", "core.sparseCheckoutCone=true")


def agent_git_config(env: Mapping[str, str], sparse: Sequence[str] | None) -> dict[str, str]:
    """The ``GIT_CONFIG_COUNT``/``KEY``/``VALUE`` variables that give an agent's git the same
    two settings, after any the environment *env* already has; empty when *sparse* is None."""
    if sparse is None:
        return {}
    try:
        count = max(int(env.get("GIT_CONFIG_COUNT", "0")), 0)
    except ValueError:
        count = 0
    out = {"GIT_CONFIG_COUNT": str(count + 2)}
    for i, (key, value) in enumerate(
        (("core.sparseCheckout", "true"), ("core.sparseCheckoutCone", "true")), start=count
    ):
        out[f"GIT_CONFIG_KEY_{i}"] = key
        out[f"GIT_CONFIG_VALUE_{i}"] = value
    return out


def sparse_key(sparse: Sequence[str] | None) -> str:
    """A short name of a sparse set (``full`` for none), for noting what a pool slot holds."""
    return "full" if sparse is None else digest(sorted(sparse))[:16]


def _cone(sparse: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the named directories no other named one contains, their ancestors that are not)."""
    named = sorted(set(sparse))
    recursive = [d for d in named if not any(d.startswith(o + "/") for o in named if o != d)]
    parents: set[str] = set()
    for d in recursive:
        parts = d.split("/")
        parents.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return recursive, sorted(parents - set(recursive))


def cone_patterns(sparse: Sequence[str]) -> str:
    """The ``info/sparse-checkout`` text of cone mode for the directories *sparse*, as ``git
    sparse-checkout set --cone`` writes it (the plan's paths hold no character that would need
    escaping: envelopes.SparsePath)."""
    recursive, parents = _cone(sparse)
    lines = ["/*", "!/*/"]
    for parent in parents:
        lines += [f"/{parent}/", f"!/{parent}/*/"]
    lines += [f"/{d}/" for d in recursive]
    return "\n".join(lines) + "\n"


def write_patterns(admin_dir: Path, sparse: Sequence[str] | None) -> None:
    """Write (or, for a full worktree, remove) the cone's patterns in *admin_dir*: replaced,
    never written through a link. Blocking."""
    info = admin_dir / "info"
    target = info / "sparse-checkout"
    if info.is_symlink() or (info.exists() and not info.is_dir()):
        info.unlink()  # the agent's: never what it leads to
    if sparse is None:
        remove_entry(target)
        return
    info.mkdir(exist_ok=True)
    if target.is_dir() and not target.is_symlink():
        remove_entry(target)  # a file cannot be renamed over a directory
    replace_file(target, cone_patterns(sparse).encode())


def remove_outside_cone(root: Path, sparse: Sequence[str] | None) -> list[str]:
    """Remove every directory in *root* and in the cone's ancestors that the cone of *sparse*
    does not have; the paths removed, relative to *root*. Nothing for a full worktree.

    Each directory is opened from the one above it without following a link, and only real
    directories are walked: an ancestor replaced by a link or a file is left to git (it
    reports the tracked files under it gone and the link untracked). Blocking; OSError when a
    directory cannot be removed.
    """
    if sparse is None:
        return []
    recursive, parents = _cone(sparse)
    keep, walk = set(recursive), set(parents)
    removed: list[str] = []
    top = os.open(root, _DIRECTORY)
    pending: list[tuple[str, int]] = [("", top)]
    try:
        while pending:
            where, fd = pending.pop()
            try:
                with os.scandir(fd) as entries:
                    found = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
                for name, is_dir in found:
                    rel = f"{where}/{name}" if where else name
                    if not is_dir or rel == ".git" or rel in keep:
                        continue  # a file or a link: tracked or not, git reports it
                    if rel in walk:
                        pending.append((rel, os.open(name, _DIRECTORY, dir_fd=fd)))
                    else:
                        remove_tree_at(fd, name)
                        removed.append(rel)
            finally:
                os.close(fd)
    finally:
        for _, fd in pending:
            os.close(fd)
    return sorted(removed)
