"""orchestrator/errors.py: one shallow tree under OrchestratorError, drawn in the module's
docstring; a plan's problems rendered one line each, located."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re
import subprocess
import sys

import pytest

import orchestrator
from orchestrator import errors
from orchestrator.errors import (
    GitError,
    OrchestratorError,
    PlanChanged,
    PlanError,
    PlanIssue,
    VenvError,
)


def exception_classes() -> dict[str, type[BaseException]]:
    return {
        name: value
        for name, value in vars(errors).items()
        if inspect.isclass(value)
        and issubclass(value, BaseException)
        and value.__module__ == errors.__name__
    }


def drawn_tree() -> dict[str, str]:
    """``{name: parent}`` as the module docstring draws it (a root line, then branches)."""
    doc = errors.__doc__ or ""
    root = re.search(r"^[ \t]+(\w+)[ \t]*$", doc, re.MULTILINE)
    assert root is not None, "the docstring draws no tree"
    branches = re.findall(r"^[ \t]+[├└]── (\w+)\s", doc, re.MULTILINE)
    return {root.group(1): "", **{name: root.group(1) for name in branches}}


def test_the_docstring_draws_every_exception_of_the_module_and_nothing_else() -> None:
    tree = drawn_tree()
    classes = exception_classes()
    assert set(tree) == set(classes)
    for name, parent in tree.items():
        cls = classes[name]
        if parent:
            # Shallow: every exception hangs directly under the root.
            assert cls.__bases__ == (classes[parent],), name
        else:
            assert cls is OrchestratorError and cls.__bases__ == (Exception,)


def test_every_exception_is_exported_and_the_package_exports_no_other() -> None:
    assert set(exception_classes()) <= set(errors.__all__)
    exported = {
        name
        for name in orchestrator.__all__
        if inspect.isclass(getattr(orchestrator, name))
        and issubclass(getattr(orchestrator, name), BaseException)
    }
    assert exported <= set(exception_classes())
    for name in exported:
        assert getattr(orchestrator, name) is getattr(errors, name)


def engine_modules() -> list[str]:
    skipped = (".demo.agents", "__main__")  # scripts, and the CLI's entry point (it runs)
    return [
        module.name
        for module in pkgutil.walk_packages(orchestrator.__path__, "orchestrator.")
        if not any(part in module.name for part in skipped)
    ]


def engine_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of the engine, by qualified name."""
    found = {}
    for name in engine_modules():
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == name
            ):
                found[f"{name}.{attribute}"] = value
    return found


def test_no_exception_of_the_engine_is_an_assertion_error() -> None:
    """``python -O`` must not make a check vanish (IllegalTransition once was one)."""
    found = engine_exceptions()
    assert "orchestrator.errors.IllegalTransition" in found
    for name, cls in found.items():
        assert not issubclass(cls, AssertionError), name


def test_illegal_transition_survives_python_dash_o() -> None:
    code = (
        "from orchestrator.errors import IllegalTransition\n"
        "assert False, 'asserts are gone under -O'\n"
        "raise IllegalTransition('pending -> succeeded')\n"
    )
    done = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        "orchestrator.errors.IllegalTransition: pending -> succeeded"
    )


@pytest.mark.parametrize(
    ("issue", "line"),
    [
        (
            PlanIssue("plan.yaml", 12, 5, "tasks[2].timeout", "must be > 0"),
            "plan.yaml:12:5: tasks[2].timeout: must be > 0",
        ),
        (
            PlanIssue(None, 3, 1, "agents", "required"),
            "<plan>:3:1: agents: required",
        ),
        (
            PlanIssue("plan.json", None, None, "tasks", "must not be empty"),
            "plan.json: tasks: must not be empty",
        ),
        (
            PlanIssue(None, None, None, "tasks[0].agent", "unknown agent 'x'"),
            "tasks[0].agent: unknown agent 'x'",
        ),
    ],
    ids=["file-line-column", "line-without-file", "file-without-line", "neither"],
)
def test_a_plan_issue_is_one_located_line(issue: PlanIssue, line: str) -> None:
    assert str(issue) == line


def test_a_plan_error_is_one_line_per_issue_in_order() -> None:
    issues = (
        PlanIssue("plan.yaml", 4, 3, "concurrency", "must be >= 1"),
        PlanIssue("plan.yaml", 12, 5, "tasks[2].timeout", "must be > 0"),
        PlanIssue("plan.yaml", 2, 1, "version", "must be 1"),
    )
    error = PlanError(issues)
    assert isinstance(error, OrchestratorError)
    assert str(error).splitlines() == [
        "plan.yaml:4:3: concurrency: must be >= 1",
        "plan.yaml:12:5: tasks[2].timeout: must be > 0",
        "plan.yaml:2:1: version: must be 1",
    ]
    assert error.issues == list(issues)
    assert isinstance(error.issues, list)  # a copy: the caller's sequence is not kept


def test_a_plan_issue_is_frozen() -> None:
    issue = PlanIssue("plan.yaml", 1, 1, "name", "too long")
    with pytest.raises(dataclasses.FrozenInstanceError):
        issue.message = "changed"  # type: ignore[misc]


def test_git_error_keeps_the_command_and_says_gits_last_line() -> None:
    command = ("worktree", "add", "/tmp/x")
    error = GitError(command, 128, "\nwarning: first\nfatal: '/tmp/x' already exists\n\n")
    assert error.command == ["worktree", "add", "/tmp/x"]
    assert error.returncode == 128
    assert error.stderr == "warning: first\nfatal: '/tmp/x' already exists"
    assert str(error) == "git worktree add /tmp/x: fatal: '/tmp/x' already exists"
    assert str(GitError(["status"], 2, "")) == "git status: exit code 2"


def test_venv_error_lists_its_commands_as_lists() -> None:
    error = VenvError("uv pip install failed", commands=[("uv", "venv"), ("uv", "pip", "install")])
    assert str(error) == "uv pip install failed"
    assert error.commands == [["uv", "venv"], ["uv", "pip", "install"]]
    assert VenvError("no commands").commands == []


def test_plan_changed_names_the_run_and_the_ways_out() -> None:
    error = PlanChanged("20261122-055431-8c6b7f")
    assert error.run_id == "20261122-055431-8c6b7f"
    message = str(error)
    assert message.startswith("the plan changed since run 20261122-055431-8c6b7f started")
    assert "--force" in message
    assert "\n" not in message
