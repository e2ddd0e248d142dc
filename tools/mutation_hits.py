"""A pytest plugin for ``python -m tools.mutation``: what the tests' own subprocesses reached.

mutmut learns which tests reach which function (to run only those against a mutant of it)
from the calls made in its own process. The core is tested as much through ``python -m
orchestrator`` subprocesses as in process, so those calls are counted too: while mutmut
collects them, each subprocess writes the functions it reached to a file of its own
(tools/mutation.py's ``sitecustomize``), and this plugin adds them to the test's before
mutmut reads them, at the end of each test.

It also puts the tests of a mutant's run back in the order of the files (mutmut names them
in the order of a set): interleaved, a module-scoped fixture is torn down and built again at
every switch of file (tests/test_verify.py's real run, hundreds of times a mutant).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: The directory the subprocesses write their files to, named in their environment.
HITS = "MUTATION_TOOL_HITS"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each file's tests together and in the order they are written, the slow ones last
    (tests/conftest.py), as a plain run has them (stable: a parametrized test's cases keep
    their order). Last: pytest's own reordering (for fixtures' parameters) keeps the files
    interleaved as named."""
    items.sort(
        key=lambda item: (
            item.get_closest_marker("slow") is not None,
            str(item.path),
            item.location[1] or 0,
        )
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    directory = os.environ.get(HITS)
    if os.environ.get("MUTANT_UNDER_TEST") != "stats" or not directory:
        return
    from mutmut.state import state  # only here: mutmut is running this process

    for path in Path(directory).iterdir():
        state()._stats.update(path.read_text(encoding="utf-8").split())
        path.unlink()
