"""What a task ran from, hashed: the plan's own files its commands name, and its agent's program.

A result's ``provenance.inputs`` lists them (``InputFile``), so that the report, and the
attestations made from it, say which script and which executable produced the work, not only
the command line that named them. Each file is hashed once per run: a plan's file before the
first task that names it runs its agent (a plan's files are not expected to change while it
runs; one that does, even by an agent, is recorded as it was first seen), a program when the
task ends (the executable as found then). Each is read only as a regular file up to
:data:`MAX_INPUT_BYTES`; the plan's files inside the plan's directory, through no link.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio

from envelopes import HandoffEnvelope, InputFile, hash_file

from .agents import Agent, plan_program_of
from .context import RunContext
from .shipping import plan_references

__all__ = ["MAX_INPUT_BYTES", "MAX_INPUT_FILES", "plan_inputs", "program_input"]

_PLAN_DIR = "{plan_dir}"

#: Largest file hashed (a bigger one is left out of the inputs).
MAX_INPUT_BYTES = 512 << 20
#: Most files recorded for one directory the plan names.
MAX_INPUT_FILES = 256


async def plan_inputs(ctx: RunContext, envelope: HandoffEnvelope, agent: Agent) -> list[InputFile]:
    """The plan's files *envelope*'s task names (its commands, checks, hooks, its agent's
    program when that is one of the plan's), sorted; hashed before its agent runs."""
    hooks = ctx.settings.hooks.model_dump(mode="json") if ctx.settings.hooks else None
    plan_program = plan_program_of(agent)
    info, names_plan_dir = _agent_info(ctx, agent)
    if (
        hooks is None
        and plan_program is None
        and not envelope.requirements
        and _PLAN_DIR not in envelope.model_dump_json(exclude={"upstream"})
        and not names_plan_dir
    ):
        return []  # names nothing of the plan's: no walk through its values (most tasks)
    named = plan_references(envelope, hooks, info, [plan_program] if plan_program else [])
    return await _inputs(ctx, [("plan", p) for p in sorted(named)])


def _agent_info(ctx: RunContext, agent: Agent) -> tuple[dict[str, Any], bool]:
    """*agent*'s info as JSON, and whether it names ``{plan_dir}``: made once per agent and
    run (what the plan configured does not change while it runs), not once per task."""
    known = ctx.agent_infos.get(id(agent))
    if known is not None and known[0] is agent:
        return known[1], known[2]
    info = agent.info().model_dump(mode="json")
    names_plan_dir = _PLAN_DIR in json.dumps(info)
    ctx.agent_infos[id(agent)] = (agent, info, names_plan_dir)
    return info, names_plan_dir


async def program_input(ctx: RunContext, program: str | None) -> list[InputFile]:
    """The program an agent ran (an absolute path, as resolved when it started), hashed."""
    if program is None or not os.path.isabs(program):
        return []
    return await _inputs(ctx, [("program", program)])


async def _inputs(ctx: RunContext, wanted: list[tuple[str, str]]) -> list[InputFile]:
    # Tasks start side by side: one that asks for a file another is hashing waits for it.
    while pending := [ctx.inputs_hashing[w] for w in wanted if w in ctx.inputs_hashing]:
        await pending[0].wait()
    missing = [w for w in wanted if w not in ctx.input_files]
    if missing:
        done = anyio.Event()
        ctx.inputs_hashing.update(dict.fromkeys(missing, done))
        try:
            found = await anyio.to_thread.run_sync(_hash_all, ctx.plan_dir, missing)
            ctx.input_files.update(found)
        finally:
            for key in missing:
                ctx.inputs_hashing.pop(key, None)
            done.set()
    out: list[InputFile] = []
    for key in wanted:
        out += ctx.input_files.get(key, [])
    return out


def _hash_all(
    plan_dir: Path, wanted: list[tuple[str, str]]
) -> dict[tuple[str, str], list[InputFile]]:
    found: dict[tuple[str, str], list[InputFile]] = {}
    for kind, path in wanted:
        try:
            found[(kind, path)] = list(_hash_one(plan_dir, kind, path))
        except OSError:  # a name too long, a directory that cannot be listed: left out
            found[(kind, path)] = []
    return found


def _hash_one(plan_dir: Path, kind: str, path: str) -> Iterator[InputFile]:
    if kind == "program":
        if (found := _digest(Path(path), None)) is not None:
            yield InputFile(kind="program", path=path, sha256=found[0], size=found[1])
        return
    names = [path]
    target = plan_dir / path
    if target.is_dir():
        # Only a directory really inside the plan's, reached through no link.
        if target.resolve() != plan_dir.resolve() / path:
            return
        names = list(itertools.islice(_files_under(plan_dir, target), MAX_INPUT_FILES))
    for name in names:
        if (found := _digest(Path(name), plan_dir)) is not None:
            yield InputFile(kind="plan", path=name, sha256=found[0], size=found[1])


def _files_under(plan_dir: Path, directory: Path) -> Iterator[str]:
    """The files below *directory*, relative to *plan_dir*, in sorted order (links to
    directories not followed)."""
    for current, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not (Path(current) / d).is_symlink())
        for name in sorted(files):
            yield (Path(current) / name).relative_to(plan_dir).as_posix()


def _digest(path: Path, within: Path | None) -> tuple[str, int] | None:
    """SHA-256 and size of *path* (relative to *within* when given); None when it cannot be
    read as a regular file or is larger than MAX_INPUT_BYTES."""
    try:
        found = hash_file(path, MAX_INPUT_BYTES, within=within)
    except OSError:
        return None
    return found if found[1] <= MAX_INPUT_BYTES else None
