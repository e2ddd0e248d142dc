"""Loading a plan file (YAML or JSON) with every problem located at its line and column.

The file is composed into YAML nodes first, so that each value keeps its position; pydantic
then validates the data, and each error's field path is mapped back to a position. Problems
that need the repository (is it a git repository? does the base resolve?) are checked by
:func:`check_plan_repository`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from envelopes import HandoffEnvelope, Plan, PlanProblem, build_envelope, digest, plan_problems

from .errors import GitError, PlanError, PlanIssue
from .repo import NotARepository, Repository

__all__ = ["LoadedPlan", "check_plan_repository", "envelopes_of", "load_plan", "parse_plan"]

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


def _to_python(
    loader: _Loader,
    node: yaml.Node,
    loc: Loc,
    positions: dict[Loc, tuple[int, int]],
    problems: list[tuple[Loc, str]],
) -> Any:
    positions[loc] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                key = str(key)
            child = (*loc, key)
            if key in out:
                positions[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                problems.append((child, "duplicate key"))
                continue
            out[key] = _to_python(loader, value_node, child, positions, problems)
            positions[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _to_python(loader, item, (*loc, i), positions, problems)
            for i, item in enumerate(node.value)
        ]
    return loader.construct_object(node, deep=True)


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required field missing",
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than_equal": "must be <= {le}",
    "too_short": "must not be empty",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
    "literal_error": "must be one of {expected}",
}


def _message(error: Mapping[str, Any]) -> str:
    template = _MESSAGES.get(error["type"])
    if template is None:
        return str(error["msg"]).removeprefix("Value error, ")
    try:
        text = template.format(**(error.get("ctx") or {}))
    except (KeyError, IndexError):
        text = error["msg"]
    if error["type"].endswith("_type") or error["type"] == "literal_error":
        text += (
            f", found {error['input']!r}"
            if not isinstance(error["input"], dict | list)
            else f", found {type(error['input']).__name__}"
        )
    return text


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
    """Parse and validate plan text; PlanError lists every problem found."""
    positions: dict[Loc, tuple[int, int]] = {}
    problems: list[tuple[Loc, str]] = []
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        reason = getattr(exc, "problem", None) or str(exc)
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise PlanError(
            [PlanIssue(file, line, col, "<plan>", f"malformed YAML: {reason}")]
        ) from None
    if node is None:
        raise PlanError([PlanIssue(file, 1, 1, "<plan>", "the plan is empty")])
    try:
        data = _to_python(_Loader(""), node, (), positions, problems)
    except yaml.YAMLError as exc:
        raise PlanError([PlanIssue(file, None, None, "<plan>", f"malformed YAML: {exc}")]) from None
    if not isinstance(data, dict):
        raise PlanError(
            [
                PlanIssue(
                    file, 1, 1, "<plan>", f"the plan must be a mapping, found {type(data).__name__}"
                )
            ]
        )
    issues = [_issue(file, positions, PlanProblem(loc=loc, message=msg)) for loc, msg in problems]
    plan: Plan | None = None
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            loc = tuple(
                p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))
            )
            issues.append(_issue(file, positions, PlanProblem(loc=loc, message=_message(error))))
    if plan is not None:
        issues += [
            _issue(file, positions, p)
            for p in plan_problems(plan, callable_agents=frozenset(callable_agents))
        ]
    if issues:
        issues.sort(key=lambda i: (i.line or 0, i.column or 0))
        raise PlanError(issues)
    assert plan is not None
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
    needs_repo = any(
        (t.worktree if t.worktree is not None else plan.defaults.worktree) for t in plan.tasks
    )
    if repo_override is not None:
        where, loc = Path(repo_override), ("repo",)
    elif plan.repo is not None:
        where, loc = loaded.plan_dir / Path(plan.repo).expanduser(), ("repo",)
    else:
        where, loc = Path.cwd(), ("repo",)
    try:
        repo = await Repository.open(where, state_dir=state_dir)
    except NotARepository as exc:
        if not needs_repo and repo_override is None and plan.repo is None:
            return None, None, None
        raise PlanError([loaded.issue(loc, str(exc))]) from None
    try:
        commit, tree = await repo.resolve_commit(plan.base)
    except GitError:
        raise PlanError(
            [loaded.issue(("base",), f"{plan.base!r} does not resolve to a commit in {repo.root}")]
        ) from None
    return repo, commit, tree


def envelopes_of(plan: Plan, *, run_id: str | None = None) -> list[HandoffEnvelope]:
    """One HandoffEnvelope per task, with the plan's defaults applied."""
    d = plan.defaults
    out = []
    for task, task_id in zip(plan.tasks, plan.task_ids(), strict=True):
        out.append(
            build_envelope(
                task.agent,
                task.task,
                task_id=task_id,
                run_id=run_id,
                inputs=task.inputs,
                requirements=task.requirements if task.requirements is not None else d.requirements,
                acceptance_criteria=task.acceptance_criteria,
                timeout=task.timeout if task.timeout is not None else d.timeout,
                retries=task.retries if task.retries is not None else d.retries,
                env={**d.env, **task.env},
                metadata=task.metadata,
                worktree=task.worktree if task.worktree is not None else d.worktree,
                venv=task.venv if task.venv is not None else d.venv,
            )
        )
    return out
