"""The public face of both packages: what ``__all__`` promises exists, and ``envelopes`` stands alone."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import envelopes
import orchestrator

PACKAGES = [envelopes, orchestrator]
PROJECT_ROOT = Path(envelopes.__file__).resolve().parent.parent


def _isort_key(name: str) -> tuple[int, str]:
    """The order the files use (ruff RUF022): CONSTANTS, then Classes, then everything else."""
    if name.isupper():
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


def _reexports(package: ModuleType) -> set[str]:
    """Names the package's ``__init__.py`` re-exports as ``from x import Y as Y``."""
    assert package.__file__ is not None
    tree = ast.parse(Path(package.__file__).read_text(encoding="utf-8"))
    # orchestrator's names are imported lazily: type checkers see them in `if TYPE_CHECKING:`.
    nodes = [*tree.body, *(n for s in tree.body if isinstance(s, ast.If) for n in s.body)]
    return {
        alias.name
        for node in nodes
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.asname == alias.name
    }


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_every_name_in_all_exists(package: ModuleType) -> None:
    missing = [name for name in package.__all__ if not hasattr(package, name)]
    assert missing == []


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_all_is_sorted_as_the_files_have_it(package: ModuleType) -> None:
    names = list(package.__all__)
    assert names == sorted(names, key=_isort_key)
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    "package",
    [
        envelopes,
        orchestrator,
    ],
    ids=lambda p: p.__name__,
)
def test_all_is_exactly_what_init_reexports(package: ModuleType) -> None:
    assert set(package.__all__) == _reexports(package)


def test_lazy_names_are_where_type_checkers_are_told() -> None:
    tree = ast.parse(Path(orchestrator.__file__ or "").read_text(encoding="utf-8"))
    told = {
        alias.name: ("." * node.level) + (node.module or "")
        for stmt in tree.body
        if isinstance(stmt, ast.If)
        for node in stmt.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert told == orchestrator._EXPORTS


def test_the_cli_starts_without_the_engine() -> None:
    """``orchestrator --help`` must not pay for pydantic, anyio or rich (issue 5: lazy imports)."""
    code = (
        "import sys, orchestrator.cli;"
        "print(sorted(m for m in ('anyio', 'pydantic', 'rich', 'envelopes', 'yaml', 'httpx')"
        " if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def _pydantic_requirements() -> set[str]:
    """Top-level import names of pydantic and the distributions it requires."""
    names = {"pydantic"}
    for requirement in importlib.metadata.requires("pydantic") or []:
        if "extra ==" in requirement:
            continue
        dist = re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0]
        top = importlib.metadata.distribution(dist).read_text("top_level.txt")
        if top:
            names.update(top.split())
        names.add(dist.replace("-", "_").lower())
    return names


IMPORT_ENVELOPES = """
import json, sys, sysconfig
from pathlib import Path
stdlib = {Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib")}
before = set(sys.modules)
import envelopes
new = {}
for name in set(sys.modules) - before:
    top = name.split(".")[0]
    origin = getattr(sys.modules[top], "__file__", None)
    in_stdlib = origin is None or any(p in Path(origin).resolve().parents for p in stdlib)
    if "site-packages" in str(origin):
        in_stdlib = False
    new[top] = in_stdlib
print(json.dumps(new))
"""


def test_envelopes_imports_nothing_but_pydantic_and_the_standard_library() -> None:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ENVELOPES],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    imported: dict[str, bool] = json.loads(result.stdout)
    assert "envelopes" in imported
    assert not imported.keys() & {"orchestrator", "anyio", "yaml", "rich", "tenacity", "aiofiles"}
    allowed = {"envelopes"} | _pydantic_requirements()
    third_party = {name for name, in_stdlib in imported.items() if not in_stdlib}
    assert sorted(third_party - allowed) == []
