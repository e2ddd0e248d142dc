"""The shape of the code, held: one concept per module, short functions, tests beside every
module, and no reaching into another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE = sorted((ROOT / "orchestrator").glob("*.py"))
CONTRACT = sorted((ROOT / "envelopes").glob("*.py"))
TESTS = ROOT / "tests"

#: Longest a function may be, in lines (docstring included).
MAX_FUNCTION_LINES = 80
#: Declarative argument-parser construction may be longer: it reads as a table.
LONG_ALLOWED = {("cli.py", "build_parser")}
#: Modules with nothing to test on their own.
NO_TESTS = {"__init__.py", "__main__.py", "_version.py"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@pytest.mark.parametrize("path", ENGINE + CONTRACT, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_function_is_longer_than_80_lines(path: Path) -> None:
    long = [
        f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
        and (path.name, node.name) not in LONG_ALLOWED
    ]
    assert long == []


def test_the_coordinator_stays_small() -> None:
    lines = (ROOT / "orchestrator" / "coordinator.py").read_text(encoding="utf-8").splitlines()
    assert len(lines) < 450


@pytest.mark.parametrize(
    "path", [p for p in ENGINE if p.name not in NO_TESTS], ids=lambda p: p.name
)
def test_every_engine_module_has_its_own_tests(path: Path) -> None:
    name = path.stem.lstrip("_")
    assert (TESTS / f"test_{name}.py").is_file(), f"tests/test_{name}.py is missing"


def _private_imports(path: Path, package: str) -> list[str]:
    """``from <module> import _name`` of another module, and ``from envelopes._x import``
    from outside ``envelopes``."""
    found = []
    for node in ast.walk(_tree(path)):
        if not isinstance(node, ast.ImportFrom):
            continue
        module = node.module or ""
        if package != "envelopes" and module.startswith("envelopes._"):
            found.append(f"line {node.lineno}: from {module} import ...")
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                found.append(
                    f"line {node.lineno}: from {'.' * node.level}{module} import {alias.name}"
                )
    return found


@pytest.mark.parametrize("path", ENGINE, ids=lambda p: p.name)
def test_engine_modules_import_no_private_names(path: Path) -> None:
    assert _private_imports(path, "orchestrator") == []


@pytest.mark.parametrize("path", CONTRACT, ids=lambda p: p.name)
def test_contract_modules_import_no_private_names(path: Path) -> None:
    assert _private_imports(path, "envelopes") == []


#: The standard library's own functions whose names start with an underscore and that the
#: engine may call: ``os._exit`` is documented and public; ``atexit._run_exitfuncs`` is
#: CPython's one way to run the atexit handlers before such an exit (orchestrator.cli.entry:
#: the interpreter's teardown skipped, nothing registered with atexit).
STDLIB_UNDERSCORED = frozenset(
    {"os._exit", "atexit._run_exitfuncs", "sys._xoptions", "threading._shutdown"}
)


@pytest.mark.parametrize("path", ENGINE + CONTRACT, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_private_attribute_of_another_object_is_touched(path: Path) -> None:
    """What ruff's SLF001 checks, held here too: ``other._name`` outside ``self``/``cls``."""
    touched = [
        f"line {node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        and not (isinstance(node.value, ast.Call) and ast.unparse(node.value.func) == "super")
        and ast.unparse(node) not in STDLIB_UNDERSCORED
    ]
    assert touched == []


def test_aiofiles_is_not_a_dependency() -> None:
    """It is asyncio-only; file I/O goes through anyio so that trio runs work (architecture.md)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert "aiofiles" not in text
    engine = "".join(p.read_text(encoding="utf-8") for p in ENGINE + CONTRACT)
    assert "import aiofiles" not in engine and "from aiofiles" not in engine


def test_fast_tests_run_before_the_slow_ones() -> None:
    """A broken core fails in seconds: the tests marked ``slow`` (kill and resume, clusters)
    are collected after every other test, whatever their file (tests/conftest.py)."""
    import subprocess
    import sys

    listed = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"),
            *("tests/test_resume.py", "tests/test_scheduler.py"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    ids = [line for line in listed if "::" in line]
    slow = [i for i, line in enumerate(ids) if "test_a_killed_run_resumes" in line]
    fast = [i for i, line in enumerate(ids) if "test_scheduler.py" in line]
    assert slow and fast
    assert max(fast) < min(slow)  # test_resume.py is collected first, its slow tests last
