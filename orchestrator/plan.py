"""Loading a plan file (YAML or JSON) with every problem located at its line and column.

The file is composed into YAML nodes first, so that each value keeps its position; pydantic
then validates the data, and each error's field path is mapped back to a position. Problems
that need the repository (is it a git repository? does the base resolve?) are checked by
:func:`check_plan_repository`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.constructor import ConstructorError

from envelopes import (
    ENV_FORMS,
    AgentSpec,
    EnvSpec,
    HandoffEnvelope,
    Limits,
    Plan,
    PlanProblem,
    TaskSpec,
    VenvOptions,
    build_envelope,
    canonical_json,
    env_values,
    expand_tasks,
    masked_plan,
    masked_task,
    plan_problems,
    sha256_hex,
)
from envelopes import validation_message as _message

from .errors import GitError, PlanError, PlanIssue
from .plan_events import plain_data
from .repo import NotARepository, Repository
from .sandbox import sandbox_problem

__all__ = [
    "ALIAS_ALLOWANCE_CHARS",
    "ALIAS_ALLOWANCE_NODES",
    "ALIAS_GROWTH",
    "MAX_PLAN_BYTES",
    "MAX_PLAN_DEPTH",
    "MAX_PLAN_NODES",
    "LoadedPlan",
    "check_plan_repository",
    "envelopes_of",
    "load_plan",
    "missing_programs",
    "parse_plan",
    "plan_repository_path",
    "validate_plan_data",
]

Loc = tuple[str | int, ...]

# The limits below keep a hostile plan (an alias bomb, /dev/zero, a FIFO, deep nesting) from
# costing more than the largest plan a user could mean: a 100,000-task plan written out long-hand
# is 16.6 MB and 1.6 million values, and takes about a minute and 1.3 GB to load the careful way
# (a plain one, read from the parser's events: about 10 s; see orchestrator/plan_events.py).
MAX_PLAN_BYTES = 32 << 20
"""The largest plan file read, in bytes (a plan given as text: in characters)."""
MAX_PLAN_NODES = 2_000_000
"""The most values (mapping keys included) a plan may hold, aliases and merge keys expanded."""
MAX_PLAN_DEPTH = 100
"""How deep collections may nest in a plan, aliases expanded."""
ALIAS_GROWTH = 10
"""Aliases and merge keys may add this many times the values and text the file itself holds..."""
ALIAS_ALLOWANCE_NODES = 100_000
"""...or this many values, if that is more (a small file that merges templates into its tasks)."""
ALIAS_ALLOWANCE_CHARS = 1 << 20
"""...and this many characters of text, if that is more."""

_TOO_DEEP = f"nested too deeply: more than {MAX_PLAN_DEPTH} levels"
_MERGE = "tag:yaml.org,2002:merge"


@dataclass
class LoadedPlan:
    """A validated plan, where it came from, and the positions of its fields."""

    plan: Plan
    file: str | None
    plan_dir: Path
    positions: dict[Loc, tuple[int, int]] = field(default_factory=dict)
    #: The plan's text, when it was read the fast way (orchestrator/plan_events.py): the
    #: positions are found from it when a problem needs one.
    source: str | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str:
        """``plan_sha256``: digest of the validated plan (comments and layout do not count)."""
        return sha256_hex(self.json_bytes)

    @functools.cached_property
    def json_bytes(self) -> bytes:
        """What ``plan.json`` holds: the plan's canonical JSON, secret values masked."""
        return plan_json(self.plan)

    def issue(self, loc: Loc, message: str) -> PlanIssue:
        """A PlanIssue at *loc*, placed at the nearest position known in the file."""
        if not self.positions and self.source is not None:
            source, self.source = self.source, None
            # Both ways read the same events, so the careful way reads what the fast way
            # read; should it not, the problem is told without its line.
            with contextlib.suppress(PlanError):
                self.positions = _careful(source, self.file)[1]
        return _issue(self.file, self.positions, PlanProblem(loc=loc, message=message))


class _Limit(Exception):
    """A plan past one of the limits above, found at *mark* (a position in the file)."""

    def __init__(self, mark: yaml.Mark | None, reason: str) -> None:
        super().__init__(reason)
        self.mark = mark
        self.reason = reason

    def issue(self, file: str | None) -> PlanIssue:
        if self.mark is None:
            return PlanIssue(file, None, None, "<plan>", self.reason)
        return PlanIssue(file, self.mark.line + 1, self.mark.column + 1, "<plan>", self.reason)


#: libyaml's scanner and parser when PyYAML has them (both ways into a plan read the same
#: events: orchestrator/plan_events.py), PyYAML's own otherwise.
_CParser: Any = getattr(getattr(yaml, "_yaml", None), "CParser", None)


class _Loader(
    yaml.composer.Composer,
    _CParser or yaml.parser.Parser,  # type: ignore[misc]
    yaml.constructor.SafeConstructor,
    yaml.resolver.Resolver,
):
    """A safe loader that counts the nodes it composes and stops at the limits as it goes:
    PyYAML's composer over libyaml's events (PyYAML's own reader, scanner and parser when it
    was built without libyaml)."""

    def __init__(self, stream: str) -> None:
        if _CParser is not None:
            _CParser.__init__(self, stream)
        else:
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self.nodes = 0  # the file's own nodes: an alias adds none
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        # The event stream is typed loosely (a C or a Python parser).
        mark = self.peek_event().start_mark
        self.nodes += 1
        if self.nodes > MAX_PLAN_NODES:
            raise _Limit(mark, f"more than {MAX_PLAN_NODES:,} values: too big for a plan")
        self._depth += 1
        try:
            if self._depth > MAX_PLAN_DEPTH:
                raise _Limit(mark, _TOO_DEEP)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node is not None:
            # Nothing reads where a node ends, and one Mark less is a third of a node's memory.
            node.end_mark = node.start_mark
        return node


class _Budget:
    """What walking a composed plan may still build, aliases expanded: values and characters.

    A file's own values and text always fit; what aliases add may be ALIAS_GROWTH times that,
    or ALIAS_ALLOWANCE_NODES values and ALIAS_ALLOWANCE_CHARS characters if that is more, and
    never more than MAX_PLAN_NODES values and MAX_PLAN_BYTES characters in all.
    """

    def __init__(self, *, own_nodes: int, own_chars: int) -> None:
        self.max_nodes = min(
            MAX_PLAN_NODES, own_nodes + max(ALIAS_ALLOWANCE_NODES, ALIAS_GROWTH * own_nodes)
        )
        self.max_chars = min(
            MAX_PLAN_BYTES, own_chars + max(ALIAS_ALLOWANCE_CHARS, ALIAS_GROWTH * own_chars)
        )
        self.nodes, self.chars = self.max_nodes, self.max_chars
        self.own_nodes, self.own_chars = own_nodes, own_chars
        # id(mapping node) -> how many of its pairs its merge keys brought in (-1: being counted)
        self.merged: dict[int, int] = {}
        # ids of the nodes whose problems are noted: an alias repeats a node, not its problems
        self.noted: set[int] = set()

    def spend(self, node: yaml.Node) -> None:
        """Count *node* (one value, and its text if it is a scalar); _Limit past the budget."""
        self.nodes -= 1
        if isinstance(node, yaml.ScalarNode):
            self.chars -= len(node.value)
            if self.chars < 0:
                raise _Limit(
                    node.start_mark,
                    f"aliases expand the plan past {self.max_chars:,} characters of text "
                    f"({self.own_chars:,} in the file itself)",
                )
        self.reserve(0, node)

    def reserve(self, nodes: int, node: yaml.Node) -> None:
        """_Limit at *node* unless *nodes* more values fit in what is left."""
        if nodes > self.nodes:
            raise _Limit(
                node.start_mark,
                f"aliases expand the plan past {self.max_nodes:,} values "
                f"({self.own_nodes:,} in the file itself)",
            )


_UNREADABLE = object()  # stands for a value YAML could not read; its problem is already noted


class _BadValue(Exception):
    """A scalar YAML cannot turn into a value (``2020-13-45``, ``!!int abc``, an unknown tag)."""

    def __init__(self, node: yaml.Node, reason: str) -> None:
        super().__init__(reason)
        self.node = node
        self.reason = reason


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


#: YAML 1.1 reads ``1:20:30`` as a number in base 60, a multiplication per part: quadratic in
#: its length. Longer ones than this are refused.
MAX_BASE60_CHARS = 100


def _construct(loader: _Loader, node: yaml.Node) -> Any:
    if (
        isinstance(node, yaml.ScalarNode)
        and node.tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
        and ":" in node.value
        and len(node.value) > MAX_BASE60_CHARS
    ):
        raise _BadValue(
            node,
            f"cannot read value {node.value[:40]!r}... ({len(node.value):,} chars): a base-60 "
            f"number longer than {MAX_BASE60_CHARS} characters (quote it to keep it a string)",
        )
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
        # Python's advice on its own int limit means nothing to the plan's author.
        reason = reason.split("; use sys.set_int_max_str_digits()")[0]
        value = node.value if isinstance(node, yaml.ScalarNode) else node.tag
        shown = repr(value) if len(value) <= 80 else f"{value[:40]!r}... ({len(value):,} chars)"
        raise _BadValue(
            node, f"cannot read value {shown}: {reason} (quote it to keep it a string)"
        ) from exc


def _merge_error(node: yaml.Node, found: yaml.Node, expected: str) -> ConstructorError:
    """What PyYAML says of a merge key (``<<``) whose value cannot be merged."""
    return ConstructorError(
        "while constructing a mapping",
        node.start_mark,
        f"expected {expected} for merging, but found {getattr(found, 'id', 'a node')}",
        found.start_mark,
    )


def _flatten(node: yaml.MappingNode, budget: _Budget) -> int:
    """Resolve the merge keys (``<<: *anchor``) of *node* in place, as PyYAML's flatten_mapping
    does, and return how many of its pairs they brought in; _Limit past the budget.

    The merged pairs come first (of several mappings listed, the first last), then the node's
    own: later pairs win. A node is flattened once, however many aliases lead to it: a second
    call only returns the count.
    """
    done = budget.merged.get(id(node))
    if done == -1:
        raise ConstructorError(
            None, None, "a merge key (<<) merges the mapping it is in", node.start_mark
        )
    if done is not None:
        return done
    budget.merged[id(node)] = -1
    sources: list[yaml.MappingNode] = []
    own: list[tuple[yaml.Node, yaml.Node]] = []
    for key_node, value_node in node.value:
        if key_node.tag != _MERGE:
            if key_node.tag == "tag:yaml.org,2002:value":
                key_node.tag = "tag:yaml.org,2002:str"  # as flatten_mapping does
            own.append((key_node, value_node))
            continue
        if isinstance(value_node, yaml.MappingNode):
            sources.append(value_node)
            continue
        if not isinstance(value_node, yaml.SequenceNode):
            raise _merge_error(node, value_node, "a mapping or list of mappings")
        listed: list[yaml.MappingNode] = []
        for source in value_node.value:
            if not isinstance(source, yaml.MappingNode):
                raise _merge_error(node, source, "a mapping")
            listed.append(source)
        sources += reversed(listed)  # later pairs win, and the first listed is to win
    for source in sources:
        _flatten(source, budget)
    count = sum(len(source.value) for source in sources)
    budget.reserve(count, node)  # each merged pair costs at least its key once walked
    if sources:
        node.value = [pair for source in sources for pair in source.value] + own
    budget.merged[id(node)] = count
    return count


def _to_python(
    loader: _Loader,
    node: yaml.Node,
    loc: Loc,
    positions: dict[Loc, tuple[int, int]],
    problems: list[tuple[Loc, str]],
    budget: _Budget,
) -> Any:
    # An alias is the very node it names, so a node is walked (and counted) once per path to
    # it: that is what keeps nine levels of nine aliases from building 9**9 values.
    budget.spend(node)
    if len(loc) >= MAX_PLAN_DEPTH:  # only aliases reach this deep: the file was checked
        raise _Limit(node.start_mark, _TOO_DEEP)
    positions[loc] = _mark(node)
    if isinstance(node, yaml.MappingNode):
        merged = _flatten(node, budget)
        out: dict[Any, Any] = {}
        first: dict[Any, tuple[int, int]] = {}
        for index, (key_node, value_node) in enumerate(node.value):
            budget.spend(key_node)
            if not isinstance(key_node, yaml.ScalarNode):
                raise _BadValue(key_node, f"a key must be a string, found a {key_node.id}")
            key = _construct(loader, key_node)
            if not isinstance(key, str):
                key = str(key)
            child = (*loc, key)
            if key in first:
                line = first[key][0]
                positions[child] = _mark(key_node)
                if _first_time(key_node, budget):
                    problems.append((child, f"duplicate key {key!r} (first at line {line})"))
                continue
            # A merged pair yields to a later one: the node's own, or an earlier-listed merge.
            out[key] = _to_python(loader, value_node, child, positions, problems, budget)
            positions[child] = _mark(key_node)
            if index >= merged:
                first[key] = positions[child]
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _to_python(loader, item, (*loc, i), positions, problems, budget)
            for i, item in enumerate(node.value)
        ]
    try:
        return _construct(loader, node)
    except _BadValue as exc:
        if _first_time(node, budget):
            problems.append((loc, exc.reason))
        return _UNREADABLE


def _first_time(node: yaml.Node, budget: _Budget) -> bool:
    """Whether *node*'s problem is new (not one an alias led to again); notes it."""
    seen = id(node) in budget.noted
    budget.noted.add(id(node))
    return not seen


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
    """Parse and validate plan text (YAML, or JSON); PlanError lists every problem found.

    A plan past a limit (MAX_PLAN_BYTES characters; MAX_PLAN_NODES values, MAX_PLAN_DEPTH
    levels and ALIAS_GROWTH, aliases expanded) is one PlanError line, found as the limit passes.
    """
    if len(text) > MAX_PLAN_BYTES:
        too_large = _too_large(len(text), "characters")
        raise PlanError([PlanIssue(file, None, None, "<plan>", too_large)])
    # A plain plan, read the fast way; one with any problem, read again to place them.
    data = plain_data(text, max_nodes=MAX_PLAN_NODES, max_depth=MAX_PLAN_DEPTH)
    if isinstance(data, dict):
        with contextlib.suppress(PlanError):
            return _validate(
                data,
                file=file,
                plan_dir=plan_dir,
                positions={},
                problems=[],
                callable_agents=callable_agents,
                source=text,
            )
    data, positions, problems = _careful(text, file)
    return _validate(
        data,
        file=file,
        plan_dir=plan_dir,
        positions=positions,
        problems=problems,
        callable_agents=callable_agents,
    )


def _careful(
    text: str, file: str | None
) -> tuple[Any, dict[Loc, tuple[int, int]], list[tuple[Loc, str]]]:
    """Plan *text* composed into nodes and read with every value's position: its data, the
    positions, and the problems found on the way. PlanError for what stops the reading."""
    positions: dict[Loc, tuple[int, int]] = {}
    problems: list[tuple[Loc, str]] = []
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        if "maximum nesting depth" in str(exc) and mark is not None:
            # libyaml's own limit (1,000 levels), met as it scans ahead of the composer.
            line, col = mark.line + 1, mark.column + 1
            raise PlanError([PlanIssue(file, line, col, "<plan>", _TOO_DEEP)]) from None
        # JSON is YAML, except for a few things YAML refuses (tabs as indentation): such a
        # file is read as JSON, without line numbers.
        try:
            data = _json_or_none(text, problems)
        except _Limit as limit:
            raise PlanError([limit.issue(file)]) from None
        if data is None:
            raise PlanError([_yaml_issue(file, exc)]) from None
    except _Limit as exc:
        raise PlanError([exc.issue(file)]) from None
    else:
        if node is None:
            raise PlanError([PlanIssue(file, 1, 1, "<plan>", "the plan is empty")])
        budget = _Budget(own_nodes=loader.nodes, own_chars=len(text))
        try:
            data = _to_python(_Loader(""), node, (), positions, problems, budget)
        except _BadValue as exc:
            line, col = _mark(exc.node)
            raise PlanError([PlanIssue(file, line, col, "<plan>", exc.reason)]) from None
        except _Limit as exc:
            raise PlanError([exc.issue(file)]) from None
        except yaml.YAMLError as exc:
            raise PlanError([_yaml_issue(file, exc)]) from None
    finally:
        loader.dispose()
    return data, positions, problems


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
    """*text* read as JSON, or None if it is not JSON; _Limit if it nests too deep."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                problems.append(((key,), f"duplicate key {key!r}"))
            out[key] = value
        return out

    try:
        data = json.loads(text, object_pairs_hook=no_duplicates)
    except ValueError:
        return None
    except RecursionError:
        raise _Limit(None, _TOO_DEEP) from None
    # The JSON parser stops only at Python's recursion limit: hold JSON to YAML's depth.
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_PLAN_DEPTH:
            raise _Limit(None, _TOO_DEEP)
        if isinstance(value, dict):
            stack += [(item, depth + 1) for item in value.values()]
        elif isinstance(value, list):
            stack += [(item, depth + 1) for item in value]
    return data


def _validate(
    data: Any,
    *,
    file: str | None,
    plan_dir: Path | None,
    positions: dict[Loc, tuple[int, int]],
    problems: list[tuple[Loc, str]],
    callable_agents: Sequence[str],
    source: str | None = None,
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
            loc = _user_loc(error["loc"])
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
    if plan is not None:
        issues += [_issue(file, positions, p) for p in engine_problems(plan)]
    if issues:
        issues.sort(key=lambda i: (i.line or 0, i.column or 0))
        raise PlanError(issues)
    assert plan is not None
    loaded = LoadedPlan(
        plan=plan, file=file, plan_dir=plan_dir or Path.cwd(), positions=positions, source=source
    )
    try:
        loaded.json_bytes  # noqa: B018  (what plan_sha256 will hash, made once)
    except (UnicodeError, ValueError) as exc:
        raise PlanError(
            [PlanIssue(file, None, None, "<plan>", f"not representable as JSON: {exc}")]
        ) from None
    return loaded


def plan_json(plan: Plan) -> bytes:
    """``canonical_json(masked_plan(plan.model_dump(mode="json")))``, the same bytes, made a
    task at a time: a 100,000-task plan's JSON form as one dict is about 350 MB, its bytes 37."""
    top = plan.model_dump(mode="json", exclude={"tasks"})
    masked = masked_plan(top)
    parts: list[bytes] = []
    for key in sorted([*masked, "tasks"]):
        if key == "tasks":
            tasks = (
                canonical_json(masked_task(t.model_dump(mode="json"), top)) for t in plan.tasks
            )
            value = b"[" + b",".join(tasks) + b"]"
        else:
            value = canonical_json(masked[key])
        parts.append(canonical_json(key) + b":" + value)
    return b"{" + b",".join(parts) + b"}"


def engine_problems(plan: Plan) -> list[PlanProblem]:
    """What the contract cannot check alone: prompt templates (Jinja2) and preset names."""
    from .presets import PRESETS
    from .prompts import template_problem

    problems = []
    templates: list[tuple[Loc, str | None]] = [(("defaults", "prompt"), plan.defaults.prompt)]
    templates += [(("tasks", i, "prompt"), t.prompt) for i, t in enumerate(plan.tasks)]
    for loc, template in templates:
        if template is not None and (why := template_problem(template)):
            problems.append(PlanProblem(loc=loc, message=why))
    for name, spec in plan.agents.items():
        if spec.preset is not None and spec.preset not in PRESETS:
            known = ", ".join(sorted(PRESETS))
            message = f"unknown preset {spec.preset!r} (known: {known})"
            problems.append(PlanProblem(loc=("agents", name, "preset"), message=message))
    return problems


def _user_loc(loc: Sequence[str | int]) -> Loc:
    """A pydantic error location as the user wrote the field: without validator names, nor
    the form ``env`` was checked in."""
    out: list[str | int] = []
    for part in loc:
        if isinstance(part, str) and part.startswith("function-"):
            continue
        if out and out[-1] == "env" and part in ENV_FORMS:
            continue
        out.append(part)
    return tuple(out)


def load_plan(path: Path | str, *, callable_agents: Sequence[str] = ()) -> LoadedPlan:
    """Read and validate a plan file; PlanError (one line per problem) when it is not valid.

    The file must be a regular file (or a link to one) of at most MAX_PLAN_BYTES, in UTF-8.
    """
    path = Path(path)
    return parse_plan(
        _read_plan_file(path),
        file=str(path),
        plan_dir=path.resolve().parent,
        callable_agents=callable_agents,
    )


def _read_plan_file(path: Path) -> str:
    def refused(message: str) -> PlanError:
        return PlanError([PlanIssue(str(path), None, None, "<plan>", message)])

    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise refused("no such file") from None
    except OSError as exc:
        raise refused(f"cannot read: {exc}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise refused("is a directory, not a plan file")
        if not stat.S_ISREG(info.st_mode):
            raise refused("is not a regular file")
        if info.st_size > MAX_PLAN_BYTES:
            raise refused(_too_large(info.st_size))
        with open(fd, "rb", closefd=False) as f:
            data = f.read(MAX_PLAN_BYTES + 1)  # a file may grow, or /proc may say 0 bytes
        if len(data) > MAX_PLAN_BYTES:
            raise refused(_too_large(None))
        # As Path.read_text did: newlines become "\n".
        return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise refused(f"cannot read: {exc}") from None
    finally:
        os.close(fd)


def _too_large(size: int | None, unit: str = "bytes") -> str:
    most = f"the {MAX_PLAN_BYTES:,} {unit} a plan may be"
    return f"is more than {most}" if size is None else f"is {size:,} {unit}, more than {most}"


def plan_repository_path(loaded: LoadedPlan, repo_override: Path | str | None = None) -> Path:
    """Where the plan's repository is looked for: ``repo_override``, else the plan's
    ``repo`` (relative to the plan file), else the current directory."""
    if repo_override is not None:
        return Path(repo_override)
    if loaded.plan.repo is not None:
        return loaded.plan_dir / Path(loaded.plan.repo).expanduser()
    return Path.cwd()


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
    Returns ``(repository, base_commit, base_tree)``. A plan that asks for a sandbox this
    machine cannot make is refused here too.
    """
    plan = loaded.plan
    await _check_sandbox(loaded)
    needs_repo = plan.merge is not None or any(
        (t.worktree if t.worktree is not None else plan.defaults.worktree) for t in plan.tasks
    )
    where = plan_repository_path(loaded, repo_override)
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
            "rev-parse", "--verify", "--quiet", "--end-of-options", f"refs/heads/{into}^{{commit}}"
        ):
            raise PlanError(
                [loaded.issue(("merge", "into"), f"branch {into!r} does not exist in {repo.root}")]
            )
    return repo, commit, tree


def _sandboxed_fields(plan: Plan) -> list[Loc]:
    """Where the plan asks for ``sandbox: bwrap``."""
    places: list[Loc] = []
    if plan.defaults.sandbox == "bwrap":
        places.append(("defaults", "sandbox"))
    places += [("agents", n, "sandbox") for n, a in plan.agents.items() if a.sandbox == "bwrap"]
    places += [("tasks", i, "sandbox") for i, t in enumerate(plan.tasks) if t.sandbox == "bwrap"]
    return places


async def _check_sandbox(loaded: LoadedPlan) -> None:
    places = _sandboxed_fields(loaded.plan)
    if not places:
        return
    problem = await sandbox_problem()
    if problem is not None:
        raise PlanError([loaded.issue(loc, f"sandbox: bwrap: {problem}") for loc in places])


def _isolation(plan: Plan, task: TaskSpec) -> dict[str, Any]:
    """The envelope's isolation fields for *task*: its own value, else its agent's, else the
    plan's default (``limits`` key by key; ``secrets`` and ``env.pass`` from every level)."""
    d = plan.defaults
    agent = plan.agents.get(task.agent or "")
    levels: list[Any] = [d, agent, task] if agent is not None else [d, task]

    def last(name: str) -> Any:
        return next(v for v in (getattr(x, name) for x in reversed(levels)) if v is not None)

    limits: dict[str, int] = {}
    secrets: list[str] = []
    passed: list[str] = []
    inherit: bool | None = None
    for level in levels:
        if level.limits is not None:
            limits.update(level.limits.model_dump(exclude_none=True))
        secrets += [n for n in level.secrets if n not in secrets]
        if isinstance(level.env, EnvSpec):
            passed += [n for n in level.env.pass_ if n not in passed]
            inherit = level.env.inherit if level.env.inherit is not None else inherit
    sandbox = last("sandbox")
    return {
        "sandbox": sandbox,
        "network": last("network"),
        "inherit_env": inherit if inherit is not None else sandbox == "none",
        "pass_env": passed,
        "secrets": secrets,
        "limits": Limits(**limits),
        "max_commit_mb": last("max_commit_mb"),
        "allow_secrets_in_commit": last("allow_secrets_in_commit"),
    }


def envelopes_of(plan: Plan, *, run_id: str | None = None) -> list[HandoffEnvelope]:
    """One HandoffEnvelope per task, matrix tasks expanded, with the plan's defaults applied.

    The variables a task's agent sets (``agents.<name>.env``) are not in its envelope: they
    are the agent's, set when its command starts, under the envelope's own.
    """
    d = plan.defaults
    out = []
    for expanded in expand_tasks(plan):
        task = expanded.spec
        assert task.agent is not None  # plan_problems makes sure
        worktree = task.worktree if task.worktree is not None else d.worktree
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
                env={**env_values(d.env), **env_values(task.env)},
                metadata=task.metadata,
                priority=task.priority,
                worktree=worktree,
                **_venv(task.venv if task.venv is not None else d.venv),
                depends_on=task.depends_on,
                cache=task.cache if task.cache is not None else plan.cache,
                group=expanded.group,
                select=expanded.select,
                prompt=task.prompt if task.prompt is not None else d.prompt,
                stall_timeout=(
                    task.stall_timeout if task.stall_timeout is not None else d.stall_timeout
                ),
                setup=task.setup if task.setup is not None else d.setup,
                checks=task.checks if task.checks is not None else d.checks,
                repair_attempts=_first(task.repair_attempts, d.repair_attempts, 0),
                install_project=_first(task.install_project, d.install_project, False),
                sparse=_sparse(plan, task, worktree),
                **_isolation(plan, task),
            )
        )
    return out


def _sparse(plan: Plan, task: TaskSpec, worktree: bool) -> list[str] | None:
    """The directories *task*'s worktree holds: its own ``sparse``, else its agent's, else
    the plan's default; ``false`` at a level means all of them (None), as does no worktree."""
    agent = plan.agents.get(task.agent or "")
    for level in (task, agent, plan.defaults):
        value = getattr(level, "sparse", None) if level is not None else None
        if value is not None:
            return list(value) if value is not False and worktree else None
    return None


def _venv(venv: bool | VenvOptions) -> dict[str, Any]:
    """An envelope's ``venv`` and ``venv_seed`` from a plan's ``venv`` (a bool, or options)."""
    if isinstance(venv, VenvOptions):
        return {"venv": True, "venv_seed": venv.seed}
    return {"venv": venv}


def _first(*values: Any) -> Any:
    """The first of *values* that is not None."""
    return next(value for value in values if value is not None)


def preset_program(spec: AgentSpec) -> str:
    """The program a preset agent runs unless its ``program`` says otherwise."""
    from .presets import PRESETS

    preset = PRESETS.get(spec.preset or "")
    return preset.program if preset is not None else spec.preset or ""


def missing_programs(loaded: LoadedPlan) -> list[str]:
    """One line per agent whose program will not be found when its tasks run.

    A program is found when it is ``python``/``python3``, an existing file (a path, relative
    to the plan's directory, ``{plan_dir}`` filled in), on PATH, or the name of one of the
    requirements of a task that uses the agent (its venv will have the console script).
    Placeholders other than ``{plan_dir}`` make a path unknowable before the run: not checked.
    """
    plan = loaded.plan
    requirements: dict[str, set[str]] = {}
    for expanded in expand_tasks(plan):
        task = expanded.spec
        names = task.requirements if task.requirements is not None else plan.defaults.requirements
        found = requirements.setdefault(task.agent or "", set())
        for requirement in names:
            name = re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0]
            found.add(re.sub(r"[-_.]+", "-", name).lower())
    problems = []
    for name, spec in sorted(plan.agents.items()):
        if spec.http is not None:
            continue  # an endpoint, not a program
        if spec.acp is not None:
            first = spec.acp.command[0]
        else:
            first = spec.command[0] if spec.command else spec.program or preset_program(spec)
        program = first.replace("{plan_dir}", str(loaded.plan_dir))
        if "{" in program or program in ("python", "python3"):
            continue
        if "/" in program:
            if not (loaded.plan_dir / program).exists():
                problems.append(f"agent {name}: program {program} does not exist")
            continue
        if shutil.which(program) is not None:
            continue
        if re.sub(r"[-_.]+", "-", program).lower() in requirements.get(name, set()):
            continue
        problems.append(
            f"agent {name}: program {program!r} is not on PATH, nor among its tasks' requirements"
        )
    return problems
