"""Loading a plan file (YAML or JSON) with every problem located at its line and column.

The file is composed into YAML nodes first, so that each value keeps its position; pydantic
then validates the data, and each error's field path is mapped back to a position. Problems
that need the repository (is it a git repository? does the base resolve?) are checked by
:func:`check_plan_repository`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from envelopes import (
    HandoffEnvelope,
    Plan,
    PlanProblem,
    build_envelope,
    canonical_json,
    digest,
    expand_tasks,
    plan_problems,
)
from envelopes._plan import validation_message as _message

from .errors import GitError, PlanError, PlanIssue
from .repo import NotARepository, Repository

__all__ = [
    "LoadedPlan",
    "check_plan_repository",
    "envelopes_of",
    "load_plan",
    "parse_plan",
    "validate_plan_data",
]

Loc = tuple[str | int, ...]


@dataclass
class LoadedPlan:
    """A validated plan, where it came from, and the positions of its fields."""

    plan: Plan
    file: str | None
    plan_dir: Path
    positions: dict[Loc, tuple[int, int]] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """``plan_sha256``: digest of the validated plan (comments and layout do not count)."""
        return digest(self.plan.model_dump(mode="json"))

    def issue(self, loc: Loc, message: str) -> PlanIssue:
        """A PlanIssue at *loc*, placed at the nearest position known in the file."""
        return _issue(self.file, self.positions, PlanProblem(loc=loc, message=message))


class _Loader(yaml.SafeLoader):
    pass


_UNREADABLE = object()  # stands for a value YAML could not read; its problem is already noted


class _BadValue(Exception):
    """A scalar YAML cannot turn into a value (``2020-13-45``, ``!!int abc``, an unknown tag)."""

    def __init__(self, node: yaml.Node, reason: str) -> None:
        super().__init__(reason)
        self.node = node
        self.reason = reason


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _construct(loader: _Loader, node: yaml.Node) -> Any:
    try:
        value = loader.construct_object(node, deep=True)
        if isinstance(value, str) and any("\ud800" <= c <= "\udfff" for c in value):
            # JSON writes characters beyond the BMP as surrogate pairs ("\\ud83d\\ude00"), which
            # YAML leaves as two halves: join them (a lone half is an error).
            value = value.encode("utf-16", "surrogatepass").decode("utf-16")
        return value
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
        reason = getattr(exc, "problem", None) or str(exc)
        if isinstance(exc, UnicodeError):
            reason = "it holds half of a surrogate pair, which is not a character"
        value = node.value if isinstance(node, yaml.ScalarNode) else node.tag
        raise _BadValue(
            node, f"cannot read value {value!r}: {reason} (quote it to keep it a string)"
        ) from exc


def _to_python(
    loader: _Loader,
    node: yaml.Node,
    loc: Loc,
    positions: dict[Loc, tuple[int, int]],
    problems: list[tuple[Loc, str]],
) -> Any:
    positions[loc] = _mark(node)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves YAML merge keys (<<: *anchor) as safe_load does
        out: dict[Any, Any] = {}
        first: dict[Any, tuple[int, int]] = {}
        for key_node, value_node in node.value:
            key = _construct(loader, key_node)
            if not isinstance(key, str):
                key = str(key)
            child = (*loc, key)
            if key in out:
                line = first[key][0]
                positions[child] = _mark(key_node)
                problems.append((child, f"duplicate key {key!r} (first at line {line})"))
                continue
            out[key] = _to_python(loader, value_node, child, positions, problems)
            positions[child] = first[key] = _mark(key_node)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _to_python(loader, item, (*loc, i), positions, problems)
            for i, item in enumerate(node.value)
        ]
    try:
        return _construct(loader, node)
    except _BadValue as exc:
        problems.append((loc, exc.reason))
        return _UNREADABLE


def _yaml_issue(file: str | None, exc: yaml.YAMLError) -> PlanIssue:
    mark = getattr(exc, "problem_mark", None)
    reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    same_place = (
        mark is not None
        and context_mark is not None
        and (mark.line, mark.column) == (context_mark.line, context_mark.column)
    )
    if context and context_mark is not None and not same_place:
        reason += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
    return PlanIssue(file, line, col, "<plan>", f"malformed YAML: {reason}")


def _issue(
    file: str | None, positions: Mapping[Loc, tuple[int, int]], problem: PlanProblem
) -> PlanIssue:
    loc = problem.loc
    while loc and loc not in positions:
        loc = loc[:-1]
    line, column = positions.get(loc, (None, None)) if positions else (None, None)
    return PlanIssue(
        file=file, line=line, column=column, path=problem.path, message=problem.message
    )


def parse_plan(
    text: str,
    *,
    file: str | None = None,
    plan_dir: Path | None = None,
    callable_agents: Sequence[str] = (),
) -> LoadedPlan:
    """Parse and validate plan text (YAML, or JSON); PlanError lists every problem found."""
    positions: dict[Loc, tuple[int, int]] = {}
    problems: list[tuple[Loc, str]] = []
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        # JSON is YAML, except for a few things YAML refuses (tabs as indentation): such a
        # file is read as JSON, without line numbers.
        try:
            data = _json_or_none(text, problems)
        except RecursionError:
            raise PlanError([PlanIssue(file, None, None, "<plan>", "nested too deeply")]) from None
        if data is None:
            raise PlanError([_yaml_issue(file, exc)]) from None
    except RecursionError:
        raise PlanError([PlanIssue(file, None, None, "<plan>", "nested too deeply")]) from None
    else:
        if node is None:
            raise PlanError([PlanIssue(file, 1, 1, "<plan>", "the plan is empty")])
        try:
            data = _to_python(_Loader(""), node, (), positions, problems)
        except _BadValue as exc:
            line, col = _mark(exc.node)
            raise PlanError([PlanIssue(file, line, col, "<plan>", exc.reason)]) from None
        except yaml.YAMLError as exc:
            raise PlanError([_yaml_issue(file, exc)]) from None
        except RecursionError:
            raise PlanError([PlanIssue(file, None, None, "<plan>", "nested too deeply")]) from None
    return _validate(
        data,
        file=file,
        plan_dir=plan_dir,
        positions=positions,
        problems=problems,
        callable_agents=callable_agents,
    )


def validate_plan_data(
    data: Any, *, plan_dir: Path | None = None, callable_agents: Sequence[str] = ()
) -> LoadedPlan:
    """Validate a plan given as Python data (a dict, as from json.load); PlanError if invalid."""
    return _validate(
        data,
        file=None,
        plan_dir=plan_dir,
        positions={},
        problems=[],
        callable_agents=callable_agents,
    )


def _json_or_none(text: str, problems: list[tuple[Loc, str]]) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                problems.append(((key,), f"duplicate key {key!r}"))
            out[key] = value
        return out

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except ValueError:
        return None


def _validate(
    data: Any,
    *,
    file: str | None,
    plan_dir: Path | None,
    positions: dict[Loc, tuple[int, int]],
    problems: list[tuple[Loc, str]],
    callable_agents: Sequence[str],
) -> LoadedPlan:
    if not isinstance(data, dict):
        found = type(data).__name__
        raise PlanError(
            [
                PlanIssue(
                    file,
                    1 if positions else None,
                    1 if positions else None,
                    "<plan>",
                    f"the plan must be a mapping, found {found}",
                )
            ]
        )
    # Top-level keys starting with "x-" are the user's own (anchors for YAML merge keys, notes).
    data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("x-"))}
    issues = [_issue(file, positions, PlanProblem(loc=loc, message=msg)) for loc, msg in problems]
    plan: Plan | None = None
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            loc = tuple(
                p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))
            )
            if error["input"] is not _UNREADABLE:
                issues.append(
                    _issue(file, positions, PlanProblem(loc=loc, message=_message(error)))
                )
    # Cross-field problems are found on the raw data, so that they are reported together with
    # schema errors rather than one round later.
    issues += [
        _issue(file, positions, p)
        for p in plan_problems(data, callable_agents=frozenset(callable_agents))
    ]
    if issues:
        issues.sort(key=lambda i: (i.line or 0, i.column or 0))
        raise PlanError(issues)
    assert plan is not None
    try:
        canonical_json(plan.model_dump(mode="json"))  # what plan_sha256 will hash
    except (UnicodeError, ValueError) as exc:
        raise PlanError(
            [PlanIssue(file, None, None, "<plan>", f"not representable as JSON: {exc}")]
        ) from None
    return LoadedPlan(plan=plan, file=file, plan_dir=plan_dir or Path.cwd(), positions=positions)


def load_plan(path: Path | str, *, callable_agents: Sequence[str] = ()) -> LoadedPlan:
    """Read and validate a plan file; PlanError (one line per problem) when it is not valid."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError([PlanIssue(str(path), None, None, "<plan>", "no such file")]) from None
    except IsADirectoryError:
        raise PlanError(
            [PlanIssue(str(path), None, None, "<plan>", "is a directory, not a plan file")]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(
            [PlanIssue(str(path), None, None, "<plan>", f"cannot read: {exc}")]
        ) from None
    return parse_plan(
        text, file=str(path), plan_dir=path.resolve().parent, callable_agents=callable_agents
    )


async def check_plan_repository(
    loaded: LoadedPlan,
    *,
    repo_override: Path | str | None = None,
    state_dir: Path | str | None = None,
) -> tuple[Repository | None, str | None, str | None]:
    """Open the plan's repository and resolve its base; PlanError when either fails.

    The repository is ``repo_override``, else the plan's ``repo`` (relative to the plan
    file), else the current directory's repository. A plan whose tasks all run without a
    worktree needs no repository: then ``(None, None, None)`` is returned when none is found.
    Returns ``(repository, base_commit, base_tree)``.
    """
    plan = loaded.plan
    needs_repo = plan.merge is not None or any(
        (t.worktree if t.worktree is not None else plan.defaults.worktree) for t in plan.tasks
    )
    if repo_override is not None:
        where = Path(repo_override)
    elif plan.repo is not None:
        where = loaded.plan_dir / Path(plan.repo).expanduser()
    else:
        where = Path.cwd()
    try:
        repo = await Repository.open(where, state_dir=state_dir)
    except NotARepository as exc:
        if repo_override is not None:
            raise PlanError([PlanIssue(None, None, None, "--repo", str(exc))]) from None
        if plan.repo is not None:
            raise PlanError([loaded.issue(("repo",), str(exc))]) from None
        if not needs_repo:
            return None, None, None
        message = (
            f"the plan has no repo: and the current directory {where} is not in a git "
            "repository; set repo: in the plan or pass --repo"
        )
        raise PlanError([PlanIssue(loaded.file, None, None, "repo", message)]) from None
    try:
        commit, tree = await repo.resolve_commit(plan.base)
    except GitError:
        empty = not await repo.git.ok("rev-parse", "--verify", "--quiet", "HEAD")
        hint = " (the repository has no commits yet)" if empty else ""
        raise PlanError(
            [
                loaded.issue(
                    ("base",), f"{plan.base!r} does not resolve to a commit in {repo.root}{hint}"
                )
            ]
        ) from None
    if plan.merge is not None:
        # Checked now, not after an hour of agents.
        into = plan.merge.into
        if into.startswith("-") or not await repo.git.ok(
            "rev-parse", "--verify", "--quiet", f"refs/heads/{into}^{{commit}}"
        ):
            raise PlanError(
                [loaded.issue(("merge", "into"), f"branch {into!r} does not exist in {repo.root}")]
            )
    return repo, commit, tree


def envelopes_of(plan: Plan, *, run_id: str | None = None) -> list[HandoffEnvelope]:
    """One HandoffEnvelope per task, matrix tasks expanded, with the plan's defaults applied."""
    d = plan.defaults
    out = []
    for expanded in expand_tasks(plan):
        task = expanded.spec
        assert task.agent is not None  # plan_problems makes sure
        out.append(
            build_envelope(
                task.agent,
                task.task,
                task_id=expanded.task_id,
                run_id=run_id,
                inputs=task.inputs,
                requirements=task.requirements if task.requirements is not None else d.requirements,
                acceptance_criteria=task.acceptance_criteria,
                timeout=task.timeout if task.timeout is not None else d.timeout,
                retries=task.retries if task.retries is not None else d.retries,
                env={**d.env, **task.env},
                metadata=task.metadata,
                priority=task.priority,
                worktree=task.worktree if task.worktree is not None else d.worktree,
                venv=task.venv if task.venv is not None else d.venv,
                depends_on=task.depends_on,
                cache=task.cache if task.cache is not None else plan.cache,
                group=expanded.group,
                select=expanded.select,
            )
        )
    return out
