"""tools/mutation.py: mutation testing of the core, run for real (mutmut) on a small
project made here, whose tests catch some mutants and let others through."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from tools import mutation
from tools.mutation import Accepted, MutationError, main, mutate_module, read_accepted

from .conftest import git

CALC = """\
def clamp(value, low, high):
    if value < low:
        return low
    if value > high:
        return high
    return value


def label(n):
    return "many" if n > 1 else "one"
"""

TESTS = """\
from pkg.calc import clamp, label


def test_clamp():
    assert clamp(5, 1, 10) == 5
    assert clamp(0, 1, 10) == 1
    assert clamp(1, 1, 10) == 1
    assert clamp(10, 1, 10) == 10
    assert clamp(11, 1, 10) == 10


def test_label():
    assert label(5) == "many"  # never at the boundary: `n >= 1` goes unnoticed
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git repository with a package, its tests, and a file left uncommitted."""
    root = tmp_path / "project"
    for name, text in {
        "pyproject.toml": '[project]\nname = "pkg"\nversion = "0"\n',
        "pkg/__init__.py": "",
        "pkg/calc.py": CALC,
        "tests/__init__.py": "",
        "tests/test_calc.py": TESTS,
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    git(root.parent, "init", "-q", str(root))
    git(root, "add", "-A")
    git(root, "commit", "-qm", "project")
    return root


def status(root: Path) -> str:
    return git(root, "status", "--porcelain", "--ignored")


def test_a_module_is_scored_by_the_mutants_its_tests_catch(project: Path) -> None:
    score = mutate_module(project, "pkg/calc.py", ["tests/test_calc.py"], max_children=1)
    assert score.caught > 0 and score.counts["killed"] == score.caught
    # The boundary of `label` is never tested: its mutant survives, and is shown as a line.
    assert ('return "many" if n > 1 else "one"', 'return "many" if n >= 1 else "one"') in [
        (s.before, s.after) for s in score.survivors
    ]
    assert all(s.status not in mutation.CAUGHT for s in score.survivors)
    assert score.score == score.caught / (score.caught + len(score.survivors))
    # Nothing of it is left in the tree it was run on.
    assert status(project) == ""


def test_accepted_equivalents_are_left_out_of_the_score(project: Path) -> None:
    first = mutate_module(project, "pkg/calc.py", ["tests/test_calc.py"], max_children=1)
    one = first.survivors[0]
    accepted = [Accepted("pkg/calc.py", one.before, one.after, "for the test")]
    # Another module's entry with the same lines is not this module's.
    accepted.append(Accepted("pkg/other.py", first.survivors[1].before, "x", "elsewhere"))
    again = mutate_module(project, "pkg/calc.py", ["tests/test_calc.py"], accepted, max_children=1)
    assert [s.name for s in again.accepted] == [
        s.name for s in first.survivors if (s.before, s.after) == (one.before, one.after)
    ]
    assert again.caught == first.caught
    assert len(again.survivors) == len(first.survivors) - len(again.accepted)


def test_the_working_tree_is_mutated_as_it_is_not_as_committed(project: Path) -> None:
    """Uncommitted changes and new files are what is tested: a test added but not yet
    committed kills the mutant it was written for."""
    tests = project / "tests" / "test_calc.py"
    tests.write_text(TESTS + '\n\ndef test_label_boundary():\n    assert label(1) == "one"\n')
    score = mutate_module(project, "pkg/calc.py", ["tests/test_calc.py"], max_children=1)
    assert 'return "many" if n >= 1 else "one"' not in [s.after for s in score.survivors]


def test_mutants_are_caught_by_the_tests_own_subprocesses(project: Path) -> None:
    """The core is tested through ``python -m orchestrator`` as much as in process: a
    function reached only by a test's subprocess has its mutants run, and caught there."""
    (project / "tests" / "test_calc.py").write_text(TESTS.split("\n\n\ndef test_label")[0])
    (project / "tests" / "test_label_cli.py").write_text(
        textwrap.dedent("""\
            import subprocess, sys

            def test_label_in_a_subprocess():
                code = "from pkg.calc import label; assert (label(1), label(2)) == ('one', 'many')"
                subprocess.run([sys.executable, "-c", code], check=True)
            """)
    )
    tests = ["tests/test_calc.py", "tests/test_label_cli.py"]
    score = mutate_module(project, "pkg/calc.py", tests, max_children=1)
    assert [s for s in score.survivors if "label" in s.name or "many" in s.before] == []
    assert score.counts.get("no tests", 0) == 0


def test_tests_that_fail_on_the_real_code_stop_it_with_one_line(project: Path) -> None:
    (project / "tests" / "test_calc.py").write_text(TESTS + "\n\ndef test_broken():\n    1 / 0\n")
    with pytest.raises(MutationError, match=r"^mutmut run on pkg/calc.py failed"):
        mutate_module(project, "pkg/calc.py", ["tests/test_calc.py"], max_children=1)
    with pytest.raises(MutationError, match="no such file"):
        mutate_module(project, "pkg/missing.py", ["tests/test_calc.py"])


def test_the_command_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert "envelopes/_canonical.py: tests/test_envelopes.py tests/test_report.py" in listed
    assert len(listed) == len(mutation.MODULES)
    with pytest.raises(SystemExit) as exited:
        main(["envelopes/nowhere.py"])
    assert exited.value.code == 2
    assert "not a module of MODULES: envelopes/nowhere.py" in capsys.readouterr().err
    # A tree without the module: one line, exit 1.
    assert main(["envelopes/_canonical.py"], root=tmp_path) == 1
    assert capsys.readouterr().err.startswith("mutation: ")


def test_every_module_and_test_named_exists_and_accepted_entries_name_modules() -> None:
    for module, tests in mutation.MODULES.items():
        assert (mutation.ROOT / module).is_file(), module
        assert tests and all((mutation.ROOT / t).is_file() for t in tests), module
    accepted = read_accepted(mutation.ROOT / mutation.ACCEPTED_FILE)
    assert accepted and all(a.module in mutation.MODULES and a.reason for a in accepted)


def test_the_changed_line_is_read_after_the_diff_header() -> None:
    diff = textwrap.dedent("""\
        --- envelopes/_x.py
        +++ envelopes/_x.py
        @@ -1,3 +1,3 @@
         def f():
        --- a rule
        +XX--- a ruleXX
        """)
    assert mutation.changed_line(diff) == ("-- a rule", "XX--- a ruleXX")
    assert mutation.changed_line("") == ("", "")


def test_a_bad_accepted_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "accepted.toml"
    bad.write_text(
        textwrap.dedent("""\
        [[accepted]]
        module = "x"
        """)
    )
    with pytest.raises(MutationError, match=r"accepted.toml: "):
        read_accepted(bad)
    assert read_accepted(tmp_path / "none.toml") == []


def test_fast_leaves_the_slow_tests_out_of_the_run(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "pkg"\n')
    mutation.configure(tmp_path, "pkg/calc.py", ["tests/test_calc.py"], fast=True)
    fast = (tmp_path / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "pkg"\n')
    mutation.configure(tmp_path, "pkg/calc.py", ["tests/test_calc.py"])
    full = (tmp_path / "pyproject.toml").read_text()
    assert '"-m", "not slow"' in fast
    assert "not slow" not in full


def test_a_fast_score_says_so() -> None:
    line = mutation._report(mutation.ModuleScore(module="m.py", tests=(), fast=True))
    assert line.endswith("[--fast: the tests marked slow left out]")
    assert "--fast" not in mutation._report(mutation.ModuleScore(module="m.py", tests=()))


COUNTDOWN = """\
def countdown(n):
    steps = 0
    while n > 0:
        n -= 1
        steps += 1
    return steps
"""


def test_a_mutant_that_hangs_fails_its_test_at_the_test_timeout(project: Path) -> None:
    """``n -= 1`` made ``n += 1`` or ``n = 1`` never ends: with a test timeout the test
    fails there (killed by the tests), instead of running until mutmut's own limit."""
    (project / "pkg" / "count.py").write_text(COUNTDOWN)
    (project / "tests" / "test_count.py").write_text(
        "from pkg.count import countdown\n\n\ndef test_countdown():\n"
        "    assert countdown(3) == 3\n    assert countdown(0) == 0\n"
    )
    score = mutate_module(
        project, "pkg/count.py", ["tests/test_count.py"], max_children=1, test_timeout=3
    )
    assert score.survivors == [] and score.counts.get("timeout", 0) == 0
    assert score.caught == score.counts["killed"] > 0


def test_the_test_timeout_reaches_pytest(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "pkg"\n')
    mutation.configure(tmp_path, "pkg/calc.py", ["tests/test_calc.py"], test_timeout=2.5)
    assert '"--timeout", "2.5"' in (tmp_path / "pyproject.toml").read_text()
    for bad in ("0", "-1", "inf", "nan", "soon"):
        with pytest.raises(SystemExit) as exited:
            main(["--test-timeout", bad, "orchestrator/merge.py"])
        assert exited.value.code == 2
        assert "not a positive number of seconds" in capsys.readouterr().err


def test_only_the_named_functions_are_mutated_and_scored(project: Path) -> None:
    """A module changed in one function is measured again in that function alone: the
    mutants of the others are neither run nor counted."""
    whole = mutate_module(project, "pkg/calc.py", ["tests/test_calc.py"], max_children=1)
    only = mutate_module(
        project, "pkg/calc.py", ["tests/test_calc.py"], max_children=1, functions=["label"]
    )
    assert only.functions == ("label",)
    assert 0 < sum(only.counts.values()) < sum(whole.counts.values())
    assert only.survivors and all(".x_label__mutmut_" in s.name for s in only.survivors)
    assert only.survivors == [s for s in whole.survivors if ".x_label__" in s.name]


def test_a_function_the_module_does_not_define_is_refused_before_any_test_runs(
    project: Path,
) -> None:
    for bad, why in (
        ("lable", "defines no function lable"),
        ("Calc.clamp", "defines no function Calc.clamp"),
        ("label()", "not a function or Class.method name"),
        ("a.b.c", "not a function or Class.method name"),
    ):
        with pytest.raises(MutationError, match=re.escape(why)):
            mutate_module(project, "pkg/calc.py", ["tests/test_calc.py"], functions=[bad])
    assert mutation.mutant_patterns("orchestrator/verify.py", ["Audit.run", "verify_report"]) == [
        "orchestrator.verify.xǁAuditǁrun__mutmut_*",
        "orchestrator.verify.x_verify_report__mutmut_*",
    ]


def test_function_needs_exactly_one_module(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--function", "f"], ["--function", "f", "a.py", "b.py"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
    assert "--function needs exactly one module" in capsys.readouterr().err
