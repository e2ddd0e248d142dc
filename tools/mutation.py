"""Mutation testing of the core: how many plausible one-line bugs the tests catch.

    python -m tools.mutation                     # every module of MODULES
    python -m tools.mutation envelopes/_canonical.py orchestrator/journal.py
    python -m tools.mutation --list              # the modules and the tests each one runs
    python -m tools.mutation orchestrator/verify.py --function verify_report --function Audit.run

Each module is mutated by mutmut (3.x: an operator swapped, a constant changed, an
argument dropped, a return value replaced), one mutant at a time, and the module's tests
(:data:`MODULES`) run against each. A mutant the tests fail on is *caught*; one they pass
on *survived*: a bug they would not notice, unless it is *equivalent* (it changes nothing a
caller can observe: ``ensure_ascii=None`` for ``ensure_ascii=False``). Equivalent mutants
are listed, with why, in ``tools/mutation-accepted.toml`` and left out of the score.

The score of a module is caught / (caught + survived + not covered): a mutant in code that
no selected test reaches counts as a miss. docs/mutation.md holds the table (with the date
and commit) and how to read a survivor.

It works on a copy of the working tree (tracked and untracked files, not ignored ones), so
the tree is never changed; mutmut's state stays in that copy's ``mutants/`` directory. The
tests' own subprocesses (``python -m orchestrator``) import the mutated modules too:
``PYTHONPATH`` points at them, and mutmut names the mutant under test in the environment.
It is a habit, not a CI gate: the exit status is 0 whatever the score (1 when the tool
itself cannot run, 2 for bad arguments), unless ``--min-score`` is given.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["MODULES", "Accepted", "ModuleScore", "Survivor", "main", "mutate_module"]

ROOT = Path(__file__).resolve().parent.parent
ACCEPTED_FILE = Path("tools") / "mutation-accepted.toml"
#: tools/mutation_hits.py, as the copy's tests load it (``-p _mutation_hits``).
PLUGIN = "_mutation_hits.py"

#: Each core module and the tests that cover it: the quick, focused ones, so that one
#: module runs in minutes here (issue 18).
MODULES: dict[str, tuple[str, ...]] = {
    # The contract: canonical JSON and the audit of a report.
    "envelopes/_canonical.py": ("tests/test_envelopes.py", "tests/test_report.py"),
    "envelopes/_audit.py": (
        "tests/test_verify.py",
        "tests/test_security_reports.py",
        "tests/test_report.py",
    ),
    # verify: every hash recomputed, every commit checked.
    # test_ancestry: verify's fixed number of git processes (its batched branch lookup).
    "orchestrator/verify.py": (
        "tests/test_verify.py",
        "tests/test_security_reports.py",
        "tests/test_ancestry.py",
    ),
    "orchestrator/ancestry.py": ("tests/test_ancestry.py", "tests/test_verify.py"),
    # The journal, and what a crash leaves to recover and resume.
    "orchestrator/journal.py": (
        "tests/test_journal.py",
        "tests/test_faults.py",
        "tests/test_full_disk.py",
        "tests/test_subagent.py",
    ),
    "orchestrator/recovery.py": ("tests/test_recovery.py", "tests/test_resume.py"),
    "orchestrator/resume.py": ("tests/test_resume.py", "tests/test_recovery.py"),
    # The scheduler, and the pool of worktrees.
    "orchestrator/scheduler.py": ("tests/test_scheduler.py", "tests/test_graph.py"),
    # The run's results, held as their lines.
    "orchestrator/results.py": ("tests/test_results.py", "tests/test_report.py"),
    "orchestrator/pool.py": ("tests/test_pool.py", "tests/test_recycle.py"),
    "orchestrator/recycle.py": ("tests/test_recycle.py", "tests/test_pool.py"),
    "orchestrator/worktree.py": ("tests/test_worktree.py", "tests/test_pool.py"),
    # Merge-back.
    "orchestrator/merge.py": ("tests/test_merge.py", "tests/test_mergeback.py"),
    "orchestrator/overlap.py": ("tests/test_overlap.py", "tests/test_mergeback.py"),
    # The security checks.
    "orchestrator/sandbox.py": ("tests/test_sandbox.py", "tests/test_security_agents.py"),
    "orchestrator/guard.py": ("tests/test_guard.py", "tests/test_stall.py"),
    "orchestrator/stall.py": ("tests/test_stall.py",),
    "orchestrator/secrets.py": ("tests/test_secrets.py", "tests/test_security_secrets.py"),
}

#: Imported by every Python process the tests start (``PYTHONPATH`` names the mutants).
#: Such a process runs the mutant under test. While mutmut learns which tests reach which
#: function ("stats"), it writes the functions it reached to a file of its own instead
#: (mutmut keeps them in its own process; tools/mutation_hits.py brings them there), one
#: line as each is first reached, so a process killed mid-test has told what it reached.
SITECUSTOMIZE = """\
import os

if os.environ.get("MUTANT_UNDER_TEST") == "stats" and os.environ.get("MUTATION_TOOL_HITS"):
    try:  # not in a Python without mutmut (a task's venv), which runs no mutant either
        import mutmut.mutation.trampoline as _trampoline
    except ImportError:
        _trampoline = None
    _seen = set()
    _path = os.path.join(os.environ["MUTATION_TOOL_HITS"], f"{os.getpid()}.txt")

    def _record(name, caller=None):
        if name not in _seen:
            _seen.add(name)
            try:  # never a failure of the code under test
                with open(_path, "a", encoding="utf-8") as f:
                    f.write(name + "\\n")
            except OSError:
                pass

    if _trampoline is not None:
        _trampoline.record_trampoline_hit = _record
"""

#: mutmut's words for what became of a mutant that count as caught here; every other
#: ("survived", "no tests", "suspicious", "not checked", ...) counts as missed.
CAUGHT = frozenset({"killed", "timeout", "caught by type check", "segfault"})
#: Line of ``mutmut results --all true``: ``    <mutant name>: <status>``.
_RESULT_LINE = re.compile(r"^\s*(?P<name>[\w.]+__mutmut_\d+): (?P<status>[a-z ]+)$")


class MutationError(Exception):
    """The tool cannot run: mutmut missing or failing, a module not in the tree."""


@dataclass(frozen=True)
class Accepted:
    """A survivor accepted as equivalent: in *module*, the line *before* becoming *after*
    (each stripped) changes nothing observable, for *reason*."""

    module: str
    before: str
    after: str
    reason: str


@dataclass(frozen=True)
class Survivor:
    """A mutant the tests did not catch: its mutmut name, status and the changed line."""

    name: str
    status: str
    before: str
    after: str


@dataclass
class ModuleScore:
    module: str
    tests: tuple[str, ...]
    #: Whether the tests marked slow were left out (``--fast``).
    fast: bool = False
    #: The functions mutated (``--function``); empty: the whole module.
    functions: tuple[str, ...] = ()
    counts: dict[str, int] = field(default_factory=dict)
    survivors: list[Survivor] = field(default_factory=list)
    accepted: list[Survivor] = field(default_factory=list)

    @property
    def caught(self) -> int:
        return sum(n for status, n in self.counts.items() if status in CAUGHT)

    @property
    def missed(self) -> int:
        return len(self.survivors)

    @property
    def score(self) -> float | None:
        """Caught / (caught + missed), accepted equivalents left out; None with no mutant."""
        judged = self.caught + self.missed
        return self.caught / judged if judged else None


def read_accepted(path: Path) -> list[Accepted]:
    """The accepted equivalent mutants of *path* (a TOML file of ``[[accepted]]`` tables)."""
    if not path.exists():
        return []
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return [Accepted(**entry) for entry in data.get("accepted", [])]
    except (tomllib.TOMLDecodeError, TypeError) as exc:
        raise MutationError(f"{path}: {exc}") from None


def copy_tree(root: Path, into: Path) -> None:
    """Copy the working tree of the git repository *root* (tracked and untracked files that
    are not ignored, as they are now) into *into*."""
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=False,
    )
    if listed.returncode != 0:
        raise MutationError(f"{root}: not a git working tree: {listed.stderr.decode().strip()}")
    for name in sorted(set(listed.stdout.decode().split("\0")) - {""}):
        source = root / name
        if not source.is_file() or source.is_symlink():
            continue  # deleted in the tree, or a link: nothing mutmut needs
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def configure(
    copy: Path,
    module: str,
    tests: Sequence[str],
    *,
    fast: bool = False,
    test_timeout: float | None = None,
) -> None:
    """Point mutmut at *module* and *tests* in the copy's pyproject.toml; with *fast*, only
    the tests not marked ``slow`` (a module whose tests kill and resume runs takes hours
    with them on a 2-core machine, minutes without). With *test_timeout*, a test still
    running after that many seconds fails (pytest-timeout), so a mutant that makes the code
    hang costs that long, not the project's 300 s: such a mutant counts as caught."""
    # The packages (all of them, so that the tests import every module from one place).
    packages = sorted(
        f"{p.parent.name}/"
        for p in copy.glob("*/__init__.py")
        if p.parent.name not in ("tests", "tools")
    )
    also = [p for p in ("tools/", "bench/", "plans/", "docs/", "README.md") if (copy / p).exists()]
    section = {
        "source_paths": packages,
        "only_mutate": [module],
        "also_copy": also,
        "pytest_add_cli_args_test_selection": list(tests),
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-p", "_mutation_hits", "-x", "-q"]
        + (["-m", "not slow"] if fast else [])
        + (["--timeout", f"{test_timeout:g}"] if test_timeout else []),
    }
    lines = ["", "[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in section.items()]
    pyproject = copy / "pyproject.toml"
    text = pyproject.read_text(encoding="utf-8") if pyproject.exists() else ""
    if "[tool.mutmut]" in text:
        raise MutationError(f"{pyproject}: has a [tool.mutmut] section of its own")
    pyproject.write_text(text + "\n".join(lines) + "\n", encoding="utf-8")


def _mutmut(copy: Path, *args: str) -> subprocess.CompletedProcess[str]:
    hits = copy / "hits"
    hits.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(copy / "mutants"), "MUTATION_TOOL_HITS": str(hits)}
    env.pop("MUTANT_UNDER_TEST", None)
    try:
        return subprocess.run(
            [sys.executable, "-m", "mutmut", *args],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError as exc:
        raise MutationError(f"cannot run mutmut: {exc}") from None


def changed_line(diff: str) -> tuple[str, str]:
    """The first removed and added lines of a mutant's diff (``mutmut show``), stripped:
    the lines after its first hunk header (a removed line may itself start with ``--``)."""
    before = after = ""
    lines = diff.splitlines()
    hunk = next((i for i, line in enumerate(lines) if line.startswith("@@")), -1)
    for line in lines[hunk + 1 :]:
        if line.startswith("-") and not before:
            before = line[1:].strip()
        elif line.startswith("+") and not after:
            after = line[1:].strip()
    return before, after


def mutant_patterns(module: str, functions: Sequence[str]) -> list[str]:
    """mutmut's names (fnmatch patterns) of the mutants of *functions* of *module*: a
    function ``name`` or a method ``Class.name`` (``orchestrator/verify.py``, ``Audit.run``:
    ``orchestrator.verify.xǁAuditǁrun__mutmut_*``). MutationError for a name that is not
    an identifier or a ``Class.name`` pair."""
    dotted = module.removesuffix(".py").replace("/", ".")
    patterns = []
    for function in functions:
        parts = function.split(".")
        if len(parts) > 2 or not all(part.isidentifier() for part in parts):
            raise MutationError(f"not a function or Class.method name: {function!r}")
        mangled = f"x_{parts[0]}" if len(parts) == 1 else f"xǁ{parts[0]}ǁ{parts[1]}"
        patterns.append(f"{dotted}.{mangled}__mutmut_*")
    return patterns


def mutate_module(
    root: Path,
    module: str,
    tests: Sequence[str],
    accepted: Sequence[Accepted] = (),
    *,
    max_children: int | None = None,
    fast: bool = False,
    test_timeout: float | None = None,
    functions: Sequence[str] = (),
) -> ModuleScore:
    """Mutate *module* of the working tree *root*, run *tests* against each mutant; the score.
    With *functions*, only those functions' mutants are run and counted (a module changed in
    a few functions since its last measure).

    MutationError when mutmut is not installed, the module is not in the tree, a function
    has no mutant, or mutmut fails (its tests fail on the unmutated code, say).
    """
    if not (root / module).is_file():
        raise MutationError(f"{module}: no such file in {root}")
    patterns = mutant_patterns(module, functions)
    _check_functions(root / module, functions)
    with tempfile.TemporaryDirectory(prefix="mutation-") as scratch:
        copy = Path(scratch) / "tree"
        copy_tree(root, copy)
        configure(copy, module, tests, fast=fast, test_timeout=test_timeout)
        # Made now: a PYTHONPATH entry that did not exist when Python started is never
        # looked in again (its importer is cached as None).
        (copy / "mutants").mkdir()
        (copy / "mutants" / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
        shutil.copy(Path(__file__).with_name("mutation_hits.py"), copy / "mutants" / PLUGIN)
        args = ["run"] + (["--max-children", str(max_children)] if max_children else [])
        ran = _mutmut(copy, *args, *patterns)
        if ran.returncode != 0:
            why = (ran.stderr or ran.stdout).strip().splitlines()
            raise MutationError(f"mutmut run on {module} failed: {why[-1] if why else ''}")
        listed = _mutmut(copy, "results", "--all", "true")
        if listed.returncode != 0:
            raise MutationError(f"mutmut results for {module} failed: {listed.stderr.strip()}")
        score = ModuleScore(
            module=module, tests=tuple(tests), fast=fast, functions=tuple(functions)
        )
        for line in listed.stdout.splitlines():
            match = _RESULT_LINE.match(line)
            if match and (
                not patterns or any(fnmatch.fnmatchcase(match["name"], p) for p in patterns)
            ):
                _count(copy, score, match["name"], match["status"], accepted)
    return score


def _check_functions(source: Path, functions: Sequence[str]) -> None:
    """MutationError naming each of *functions* (``name`` or ``Class.name``) that *source*
    does not define at its top level, before anything runs (a typo costs no test run)."""
    import ast

    tree = ast.parse(source.read_text(encoding="utf-8"))
    defined = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            defined.add(node.name)
        elif isinstance(node, ast.ClassDef):
            defined.update(
                f"{node.name}.{item.name}"
                for item in node.body
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
            )
    missing = [f for f in functions if f not in defined]
    if missing:
        raise MutationError(f"{source.name}: defines no function {', '.join(missing)}")


def _count(
    copy: Path, score: ModuleScore, name: str, status: str, accepted: Sequence[Accepted]
) -> None:
    score.counts[status] = score.counts.get(status, 0) + 1
    if status in CAUGHT:
        return
    before, after = changed_line(_mutmut(copy, "show", name).stdout)
    survivor = Survivor(name=name, status=status, before=before, after=after)
    if any(a.module == score.module and a.before == before and a.after == after for a in accepted):
        score.accepted.append(survivor)
    else:
        score.survivors.append(survivor)


def _report(score: ModuleScore) -> str:
    pct = "-" if score.score is None else f"{100 * score.score:.1f}%"
    counts = ", ".join(f"{n} {status}" for status, n in sorted(score.counts.items()))
    lines = [
        f"{score.module}: {pct} ({score.caught} caught, {score.missed} missed, "
        f"{len(score.accepted)} accepted as equivalent; {counts})"
        + (" [--fast: the tests marked slow left out]" if score.fast else "")
        + (f" [only {', '.join(score.functions)}]" if score.functions else "")
    ]
    for s in score.survivors:
        lines.append(f"  {s.status}: {s.name}\n    - {s.before}\n    + {s.after}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, *, root: Path = ROOT) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.mutation", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("modules", nargs="*", help="modules to mutate (default: all of MODULES)")
    parser.add_argument("--list", action="store_true", help="list the modules and their tests")
    parser.add_argument("--max-children", type=int, help="mutants run at once (default: cores)")
    parser.add_argument("--json", type=Path, help="also write the scores to this JSON file")
    parser.add_argument("--min-score", type=float, help="exit 3 if a module scores below (0-1)")
    parser.add_argument("--fast", action="store_true", help="leave out the tests marked slow")
    parser.add_argument(
        "--function",
        action="append",
        default=[],
        metavar="NAME",
        help="mutate only this function or Class.method (repeatable; one module only)",
    )
    parser.add_argument(
        "--test-timeout",
        type=_positive,
        metavar="SECONDS",
        help="fail a test still running after this long (default: the project's 300 s)",
    )
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"not a module of MODULES: {', '.join(unknown)} (see --list)")
    if args.function and len(args.modules) != 1:
        parser.error("--function needs exactly one module")
    if args.list:
        for module, tests in MODULES.items():
            print(f"{module}: {' '.join(tests)}")
        return 0
    try:
        scores = _run_all(
            root,
            args.modules or list(MODULES),
            max_children=args.max_children,
            fast=args.fast,
            test_timeout=args.test_timeout,
            functions=args.function,
        )
    except MutationError as exc:
        print(f"mutation: {exc}", file=sys.stderr)
        return 1
    if args.json is not None:
        args.json.write_text(json.dumps([_as_json(s) for s in scores], indent=2) + "\n")
    # A module with no mutant has nothing to fall short of.
    low = [
        s
        for s in scores
        if args.min_score is not None and s.score is not None and s.score < args.min_score
    ]
    return 3 if low else 0


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


def _run_all(
    root: Path,
    modules: Sequence[str],
    *,
    max_children: int | None = None,
    fast: bool = False,
    test_timeout: float | None = None,
    functions: Sequence[str] = (),
) -> list[ModuleScore]:
    accepted = read_accepted(root / ACCEPTED_FILE)
    scores = []
    for module in modules:
        tests = MODULES[module]
        score = mutate_module(
            root,
            module,
            tests,
            accepted,
            max_children=max_children,
            fast=fast,
            test_timeout=test_timeout,
            functions=functions,
        )
        print(_report(score), flush=True)
        scores.append(score)
    return scores


def _as_json(score: ModuleScore) -> Mapping[str, object]:
    return {**asdict(score), "caught": score.caught, "missed": score.missed, "score": score.score}


if __name__ == "__main__":
    sys.exit(main())
