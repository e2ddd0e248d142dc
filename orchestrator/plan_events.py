"""A plain plan read straight from libyaml's events: the fast way in for large plans.

Composing a plan into YAML nodes, each keeping its position, is what lets every problem be
told at its line and column (orchestrator/plan.py); it is also most of the time and memory a
large plan costs (about 45 s and 1.2 GB for 100,000 tasks). Most plans are plain: no anchors,
aliases, merge keys or tags, no duplicate keys, no long numbers, nothing nested too deep. Such
a plan means the same whichever way it is read, so :func:`plain_data` builds its data from the
parser's events directly, without nodes or positions. Both ways read the same events (C
libyaml's, when PyYAML has it: the careful way composes them with PyYAML's own composer), so
they agree on what is YAML. Anything else, and any plan that turns out to have a problem, is
read again the careful way, which finds and places every problem: the fast way never decides
what a plan means on its own.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["plain_data"]

_Parser: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_RESOLVER = yaml.resolver.Resolver()
_STR = "tag:yaml.org,2002:str"
_SURROGATE = re.compile("[\ud800-\udfff]")
_MERGE = "tag:yaml.org,2002:merge"


class _NotPlain(Exception):
    """The plan is not one this reader takes: read it the careful way."""


def plain_data(text: str, *, max_nodes: int, max_depth: int) -> Any:
    """The data of plan *text* when it is plain (see the module's docstring) and within
    *max_nodes* values and *max_depth* levels (counted as the careful way counts them: a
    scalar is a level too); None otherwise, or when it is not YAML."""
    constructor = yaml.constructor.SafeConstructor()  # its caches die with this call
    try:
        return _build(yaml.parse(text, Loader=_Parser), constructor, max_nodes, max_depth)
    except (_NotPlain, yaml.YAMLError, ValueError, TypeError, OverflowError):
        return None


#: A number written in base 60 (``1:20``) is built by a multiplication per part: long ones are
#: left to the careful way, which refuses them.
MAX_NUMBER_CHARS = 100


def _scalar(event: Any, constructor: yaml.constructor.SafeConstructor) -> Any:
    """A scalar event's value, as SafeLoader would read it; _NotPlain for anything that is
    not a plain string, number, boolean, null or date, or holds a surrogate."""
    if event.anchor is not None or event.tag is not None:
        raise _NotPlain  # any tag, even "!", is read the careful way
    value = event.value
    if _SURROGATE.search(value):
        raise _NotPlain  # surrogate pairs are joined the careful way
    if not event.implicit[0]:  # quoted
        return value
    tag = _RESOLVER.resolve(yaml.ScalarNode, value, event.implicit)  # type: ignore[no-untyped-call]
    if tag == _STR:
        return value
    if tag == _MERGE or len(value) > MAX_NUMBER_CHARS:
        raise _NotPlain
    node = yaml.ScalarNode(tag, value, event.start_mark, event.end_mark, event.style)
    return constructor.construct_object(node, deep=True)


def _build(
    events: Any, constructor: yaml.constructor.SafeConstructor, max_nodes: int, max_depth: int
) -> Any:
    """The document's data from its events, iteratively."""
    stack: list[Any] = []  # open collections: a list, or a _Mapping
    nodes = 0
    root: Any = _NOTHING
    for event in events:
        kind = type(event)
        if kind is yaml.ScalarEvent:
            if len(stack) >= max_depth:
                raise _NotPlain
            value = _scalar(event, constructor)
        elif kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
            if event.anchor is not None or event.tag is not None:
                raise _NotPlain
            if len(stack) >= max_depth:
                raise _NotPlain
            nodes += 1
            stack.append(_Mapping() if kind is yaml.MappingStartEvent else [])
            continue
        elif kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
            done = stack.pop()
            value = done.items if kind is yaml.MappingEndEvent else done
            nodes -= 1  # counted when it started
        elif kind is yaml.AliasEvent:
            raise _NotPlain
        elif kind is yaml.DocumentStartEvent and root is not _NOTHING:
            raise _NotPlain  # a second document: the careful way says so
        else:
            continue  # stream and document boundaries
        nodes += 1
        if nodes > max_nodes:
            raise _NotPlain
        if not stack:
            root = value
            continue
        top = stack[-1]
        if type(top) is list:
            top.append(value)
        elif top.key is _NO_KEY:
            if not isinstance(value, str) or value == "<<":
                raise _NotPlain  # a key that is no string, or a merge key
            if value in top.items:
                raise _NotPlain  # a duplicate key: the careful way places both
            top.key = value
        else:
            top.items[top.key] = value
            top.key = _NO_KEY
    return None if root is _NOTHING else root


_NO_KEY = object()
_NOTHING = object()


class _Mapping:
    """An open mapping: its items so far, and the key read whose value comes next."""

    __slots__ = ("items", "key")

    def __init__(self) -> None:
        self.items: dict[str, Any] = {}
        self.key: Any = _NO_KEY
