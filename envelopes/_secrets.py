"""Which variables hold secrets, and the plan and envelope as written down: secrets masked.

A report, its plan.json and its envelopes are meant to be shared. A variable whose name looks
secret (``*KEY*``, ``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``, ``*CREDENTIAL*``, ...) or that a
plan lists under ``secrets:`` never has its value written: it is ``***`` in every file. The
agent still gets the real value, in its environment.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "MASK",
    "SECRET_NAME_PATTERN",
    "is_secret_name",
    "masked_env",
    "masked_plan",
    "masked_task",
]

MASK = "***"
#: Names that look like they hold a secret (matched against the upper-cased name).
SECRET_NAME_PATTERN = r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|PRIVATE|COOKIE|AUTH_"
_SECRET_NAME = re.compile(SECRET_NAME_PATTERN)


def is_secret_name(name: str, declared: Iterable[str] = ()) -> bool:
    """Whether variable *name* holds a secret: its name looks so, or the plan says so."""
    names = declared if isinstance(declared, (set, frozenset)) else set(declared)
    return name in names or _looks_secret(name)


@functools.lru_cache(maxsize=4096)
def _looks_secret(name: str) -> bool:
    # Asked for every variable of every task's environment: the same few dozen names.
    return _SECRET_NAME.search(name.upper()) is not None


def masked_env(env: Mapping[str, str], declared: Iterable[str] = ()) -> dict[str, str]:
    """*env* with the value of every secret variable replaced by ``***``."""
    names = set(declared)
    return {k: MASK if is_secret_name(k, names) else v for k, v in env.items()}


def _masked(node: Any, declared: list[str]) -> Any:
    """*node* (a plan's defaults, agent or task, as JSON) with its ``env`` masked for the
    secrets *declared* above it and its own."""
    if not isinstance(node, Mapping):
        return node
    node = dict(node)
    names = declared + list(node.get("secrets") or [])
    env = node.get("env")
    if isinstance(env, Mapping):
        if isinstance(env.get("set"), Mapping):
            node["env"] = {**env, "set": masked_env(env["set"], names)}
        else:
            node["env"] = masked_env(
                {k: v for k, v in env.items() if isinstance(v, str)}, names
            ) | {k: v for k, v in env.items() if not isinstance(v, str)}
    return node


def _plan_secrets(plan: Mapping[str, Any]) -> list[str]:
    return list((plan.get("defaults") or {}).get("secrets") or []) + list(plan.get("secrets") or [])


def masked_plan(plan: Mapping[str, Any]) -> dict[str, Any]:
    """A plan's JSON form (``Plan.model_dump(mode="json")``) with secret env values masked.

    Every ``env`` (of ``defaults``, of each agent, of each task, in the plain or the
    structured form) is masked with the ``secrets`` declared at its level and above.
    """
    out = dict(plan)
    top = _plan_secrets(plan)
    if isinstance(out.get("defaults"), Mapping):
        out["defaults"] = _masked(out["defaults"], top)
    if isinstance(out.get("agents"), Mapping):
        out["agents"] = {name: _masked(spec, top) for name, spec in out["agents"].items()}
    if isinstance(out.get("tasks"), list):
        out["tasks"] = [masked_task(task, plan) for task in out["tasks"]]
    return out


def masked_task(task: Any, plan: Mapping[str, Any]) -> Any:
    """One task of *plan* (its JSON form; its ``tasks`` need not be there) masked as
    :func:`masked_plan` masks it: with the plan's, its agent's and its own secrets."""
    if not isinstance(task, Mapping):
        return task
    agents = plan.get("agents") or {}
    agent = agents.get(task.get("agent")) if isinstance(agents, Mapping) else None
    return _masked(task, _plan_secrets(plan) + list((agent or {}).get("secrets") or []))
