"""Virtualenvs: real venvs made by uv and by the standard library, and a task's venv in a run.

Requirements come from a wheel the tests build themselves, so nothing touches the network.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import platform
import re
import signal
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from envelopes import Plan, Report, TaskResult, build_envelope, digest
from orchestrator import orchestrate_parallel
from orchestrator.errors import VenvError
from orchestrator.venv import (
    StdlibBackend,
    UvBackend,
    Venv,
    describe_environment,
    get_backend,
    install_project,
    setup_virtualenv,
)

from .conftest import MakeRepo, git, live_processes_with

PACKAGE = "probe_pkg"
VERSION = "1.0"
#: How describe_environment names the package (normalised).
PINNED = "probe-pkg==1.0"

# Imports the wheel's package from the task's venv and reports where everything points.
AGENT = """
import json, os, sys
from pathlib import Path

attempts = Path(os.environ["ATTEMPTS_DIR"]) / os.environ["ORCHESTRATOR_TASK_ID"]
attempts.mkdir(parents=True, exist_ok=True)
count = len(list(attempts.iterdir())) + 1
(attempts / str(count)).touch()

import probe_pkg

Path("made-by-agent.txt").write_text("made\\n")
with open(os.environ["ORCHESTRATOR_OUTPUT"], "w") as f:
    json.dump(
        {
            "version": probe_pkg.VERSION,
            "module": probe_pkg.__file__,
            "prefix": sys.prefix,
            "executable": sys.executable,
            "virtual_env": os.environ.get("VIRTUAL_ENV"),
            "path": os.environ["PATH"],
            "cwd": os.getcwd(),
        },
        f,
    )
if count == 1 and os.environ.get("FAIL_FIRST_ATTEMPT"):
    sys.exit(1)
"""


def build_wheel(directory: Path, name: str = PACKAGE, version: str = VERSION) -> Path:
    """Write a minimal pure-Python wheel for *name* into *directory*; return its path."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f'VERSION = "{version}"\n',
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for path, text in files.items():
        data = text.encode()
        hashed = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={hashed},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    """A local wheel of ``probe_pkg`` 1.0."""
    directory = tmp_path / "wheels"
    directory.mkdir()
    return build_wheel(directory)


@pytest.fixture
def missing_wheel(tmp_path: Path) -> Path:
    """A requirement path where no file exists."""
    return tmp_path / "no-such-dir" / f"{PACKAGE}-{VERSION}-py3-none-any.whl"


def setup(
    path: Path, requirements: list[str], backend: str, *, loop: str = "asyncio", seed: bool = False
) -> Venv:
    return anyio.run(
        lambda: setup_virtualenv(path, requirements, backend=get_backend(backend), seed=seed),
        backend=loop,
    )


def venv_python(venv: Venv, code: str) -> str:
    result = subprocess.run(
        [str(venv.python), "-c", code], capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def is_venv_creation(command: list[str]) -> bool:
    """``uv venv ...`` or ``python -m venv ...``."""
    return command[1:2] == ["venv"] or command[1:3] == ["-m", "venv"]


def test_auto_backend_is_uv_here() -> None:
    backend = get_backend("auto")
    assert isinstance(backend, UvBackend)
    assert backend.name == "uv"
    assert Path(backend.uv).is_file()


def test_backends_by_name() -> None:
    assert isinstance(get_backend("uv"), UvBackend)
    assert isinstance(get_backend("stdlib"), StdlibBackend)


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(
        VenvError, match=r"unknown venv backend 'nope' \(choose from auto, uv, stdlib\)"
    ):
        get_backend("nope")


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
@pytest.mark.parametrize("backend", ["uv", "stdlib"])
def test_a_new_venv_runs_its_python(tmp_path: Path, backend: str, loop: str) -> None:
    path = tmp_path / "venv"
    venv = setup(path, [], backend, loop=loop)
    assert venv.path == path
    assert venv.backend == backend
    assert (path / "pyvenv.cfg").is_file()
    assert Path(venv_python(venv, "import sys; print(sys.prefix)")).resolve() == path.resolve()
    assert [is_venv_creation(c) for c in venv.commands] == [True]
    environment = describe_environment(venv)
    assert environment.python == platform.python_version()
    assert environment.implementation == sys.implementation.name
    assert environment.installer == backend
    assert environment.packages == []


@pytest.mark.parametrize("backend", ["uv", "stdlib"])
def test_requirements_from_a_local_wheel(tmp_path: Path, wheel: Path, backend: str) -> None:
    path = tmp_path / "venv"
    venv = setup(path, [str(wheel)], backend)
    module = venv_python(venv, f"import {PACKAGE}; print({PACKAGE}.VERSION, {PACKAGE}.__file__)")
    version, location = module.split(" ", 1)
    assert version == VERSION
    assert Path(location).resolve().is_relative_to(path.resolve())
    assert [is_venv_creation(c) for c in venv.commands] == [True, False]
    assert str(wheel) in venv.commands[1]
    environment = describe_environment(venv)
    assert environment.python == platform.python_version()
    if backend == "uv":
        assert environment.packages == [PINNED]
    else:
        # The standard library's venv brings pip (and setuptools) along for the install.
        assert PINNED in environment.packages
        assert any(p.startswith("pip==") for p in environment.packages)


@pytest.mark.parametrize(
    ("backend", "installer_says"),
    [("uv", "Distribution not found"), ("stdlib", "No such file or directory")],
)
def test_install_failure_raises_with_the_installers_message(
    tmp_path: Path, missing_wheel: Path, backend: str, installer_says: str
) -> None:
    path = tmp_path / "venv"
    with pytest.raises(VenvError) as caught:
        setup(path, [str(missing_wheel)], backend)
    message = str(caught.value)
    assert message.startswith(f"installing {missing_wheel} failed: ")
    assert installer_says in message
    assert str(missing_wheel) in message.split(" failed: ", 1)[1]
    assert not path.exists()


def test_creation_failure_raises_and_leaves_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    path = blocker / "venv"
    with pytest.raises(VenvError, match=r"^uv venv failed: "):
        setup(path, [], "uv")
    assert blocker.read_text() == "not a directory\n"
    assert not path.exists()


@pytest.fixture
def kill_leftovers(tmp_path: Path) -> Iterator[None]:
    """Kill any process a test left running under tmp_path."""
    yield
    for pid in live_processes_with(str(tmp_path)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.usefixtures("kill_leftovers")
def test_cancelled_setup_leaves_no_installer_running_and_no_venv(
    tmp_path: Path, wheel: Path
) -> None:
    path = tmp_path / "venv"

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: setup_virtualenv(path, [str(wheel)], backend=StdlibBackend()))
            # Cancel while ensurepip is installing into site-packages. The limit is a guard.
            with anyio.fail_after(60):
                while not list(path.glob("lib/python*/site-packages/*")):  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()

    anyio.run(main)
    assert live_processes_with(str(path)) == []
    assert not path.exists()


def run_plan(repo: Path, agent: Path, tasks: list[dict[str, Any]], **options: Any) -> Report:
    plan = Plan.model_validate(
        {
            "agents": {
                "importer": {
                    "command": ["python", str(agent)],
                    "env": {"ATTEMPTS_DIR": str(repo.parent / "attempts")},
                }
            },
            "tasks": [{"agent": "importer", "task": f"import {PACKAGE}", **t} for t in tasks],
        }
    )
    return anyio.run(lambda: orchestrate_parallel(plan, repo=repo, venv_backend="uv", **options))


def venv_dir(report: Report, task_id: str) -> Path:
    """Where the run put *task_id*'s venv."""
    return Path(report.run_dir).parent.parent / "venvs" / report.run_id / task_id


def test_a_task_runs_in_its_own_venv_with_its_requirements(
    make_repo: MakeRepo,
    write_agent: Callable[[str, str], Path],
    wheel: Path,
    missing_wheel: Path,
) -> None:
    repo = make_repo()
    agent = write_agent("importer", AGENT)
    tasks = [
        {
            "id": "good",
            "requirements": [str(wheel)],
            "retries": 1,
            "env": {"FAIL_FIRST_ATTEMPT": "1"},
        },
        {"id": "bad", "requirements": [str(missing_wheel)]},
    ]
    report = run_plan(repo, agent, tasks)
    results = {r.task_id: r for r in report.results}
    good, bad = results["good"], results["bad"]

    assert bad.status == "failed"
    assert bad.error is not None and bad.error.kind == "install"
    assert "Distribution not found" in bad.error.message
    assert str(missing_wheel) in bad.error.message
    assert bad.attempts == 0
    assert not venv_dir(report, "bad").exists()

    assert good.status == "succeeded", good.error
    assert good.attempts == 2
    output = good.output
    assert output is not None
    venv = Path(output["virtual_env"])
    assert venv == venv_dir(report, "good")
    assert Path(output["prefix"]) == venv
    assert output["path"].split(os.pathsep)[0] == str(venv / "bin")
    assert Path(output["executable"]).parent == venv / "bin"
    assert output["version"] == VERSION
    assert Path(output["module"]).is_relative_to(venv)
    # The venv lives outside the worktree, and none of it reached the commit.
    assert not venv.is_relative_to(Path(output["cwd"]))
    commit = good.provenance.result_commit
    assert commit is not None
    committed = git(repo, "ls-tree", "-r", "--name-only", commit).splitlines()
    assert "made-by-agent.txt" in committed
    assert not [name for name in committed if "pyvenv.cfg" in name or PACKAGE in name]
    assert git(repo, "status", "--porcelain") == ""

    environment = good.provenance.environment
    assert environment is not None
    assert environment.packages == [PINNED]
    assert environment.installer == "uv"
    assert good.provenance.env_sha256 == digest(environment.model_dump(mode="json"))

    # Two attempts, one venv: created once, installed into once, before the first attempt.
    commands = good.provenance.commands
    assert [is_venv_creation(c) for c in commands] == [True, False, False, False]
    assert str(wheel) in commands[1]

    # The default policy (`failed`) removes a succeeded task's venv with its worktree.
    assert not venv.exists()
    assert not venv_dir(report, "good").parent.exists()


def test_a_failed_install_records_the_commands_it_ran(
    make_repo: MakeRepo, write_agent: Callable[[str, str], Path], missing_wheel: Path
) -> None:
    repo = make_repo()
    agent = write_agent("importer", AGENT)
    report = run_plan(repo, agent, [{"id": "bad", "requirements": [str(missing_wheel)]}])
    (bad,) = report.results
    assert bad.error is not None and bad.error.kind == "install"
    commands = bad.provenance.commands
    assert [is_venv_creation(c) for c in commands] == [True, False]
    assert str(missing_wheel) in commands[1]


@pytest.mark.parametrize(("policy", "kept"), [("failed", True), ("never", False)])
def test_a_failed_tasks_venv_goes_with_its_worktree(
    make_repo: MakeRepo,
    write_agent: Callable[[str, str], Path],
    wheel: Path,
    policy: str,
    kept: bool,
) -> None:
    repo = make_repo()
    agent = write_agent("importer", AGENT + "sys.exit(4)\n")
    report = run_plan(
        repo, agent, [{"id": "fails", "requirements": [str(wheel)]}], keep_worktrees=policy
    )
    (result,) = report.results
    assert result.status == "failed"
    assert result.exit_code == 4
    assert (result.worktree is not None) is kept
    assert venv_dir(report, "fails").exists() is kept
    if kept:
        assert (venv_dir(report, "fails") / "pyvenv.cfg").is_file()


def test_each_task_gets_its_own_venv_created_once(
    make_repo: MakeRepo, write_agent: Callable[[str, str], Path], wheel: Path
) -> None:
    repo = make_repo()
    agent = write_agent("importer", AGENT)
    tasks = [{"id": f"t{i}", "requirements": [str(wheel)]} for i in range(3)]
    report = run_plan(repo, agent, tasks, concurrency=3)
    assert [r.status for r in report.results] == ["succeeded"] * 3
    venvs = {r.output["virtual_env"] for r in report.results if r.output}
    assert venvs == {str(venv_dir(report, f"t{i}")) for i in range(3)}
    for result in report.results:
        assert [is_venv_creation(c) for c in result.provenance.commands] == [True, False, False]


@pytest.mark.parametrize("backend", ["uv", "stdlib"])
def test_a_seeded_venv_has_pip_and_an_unseeded_one_none(tmp_path: Path, backend: str) -> None:
    seeded = setup(tmp_path / "seeded", [], backend, seed=True)
    plain = setup(tmp_path / "plain", [], backend)
    pip = [str(seeded.python), "-m", "pip", "--version"]
    assert str(seeded.path) in subprocess.run(pip, capture_output=True, text=True).stdout
    assert any(p.startswith("pip==") for p in describe_environment(seeded).packages)
    pip[0] = str(plain.python)
    assert "No module named pip" in subprocess.run(pip, capture_output=True, text=True).stderr
    assert describe_environment(plain).packages == []


#: The tests' project (tests/fixtures/project): ``tinypkg`` in a src layout, built by an
#: in-tree backend that needs nothing installed (offline) and that, like setuptools, leaves
#: ``src/tinypkg.egg-info`` behind in the tree it builds.
PROJECT = Path(__file__).parent / "fixtures" / "project"
PROJECT_FILES = ("pyproject.toml", "tinybuild.py", "src/tinypkg/__init__.py")


def project_files() -> dict[str, str]:
    """The tests' project, as ``make_repo(extra=...)`` takes files."""
    return {name: (PROJECT / name).read_text() for name in PROJECT_FILES}


# Imports the project from the task's venv and reports where it came from.
PROJECT_AGENT = """
import importlib.util, json, os
from pathlib import Path

import tinypkg

Path("made-by-agent.txt").write_text("made\\n")
with open(os.environ["ORCHESTRATOR_OUTPUT"], "w") as f:
    json.dump(
        {
            "module": tinypkg.__file__,
            "cwd": os.getcwd(),
            "venv": os.environ["VIRTUAL_ENV"],
            "pip": importlib.util.find_spec("pip") is not None,
        },
        f,
    )
"""


@pytest.mark.parametrize("backend", ["uv", "stdlib"])
def test_install_project_installs_the_tree_editable(tmp_path: Path, backend: str) -> None:
    project = tmp_path / "project"
    for name, text in project_files().items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    venv = setup(tmp_path / "venv", [], backend)

    commands = anyio.run(lambda: install_project(venv, project, backend=get_backend(backend)))
    location = venv_python(venv, "import tinypkg; print(tinypkg.__file__)")
    assert Path(location) == project / "src" / "tinypkg" / "__init__.py"
    (project / "src" / "tinypkg" / "__init__.py").write_text('VERSION = "changed"\n')
    assert venv_python(venv, "import tinypkg; print(tinypkg.VERSION)") == "changed"
    assert "tinypkg==0.1" in describe_environment(venv).packages
    assert commands[-1][-2:] == ["-e", str(project)]
    # The standard library's venv has no pip without requirements: ensurepip brings it.
    ensurepip = [[str(venv.python), "-m", "ensurepip"]] if backend == "stdlib" else []
    assert commands[:-1] == ensurepip


def test_a_broken_project_fails_to_install_with_the_installers_words(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text("[project\nname = \n")
    venv = setup(tmp_path / "venv", [], "uv")
    with pytest.raises(VenvError) as caught:
        anyio.run(lambda: install_project(venv, project))
    message = str(caught.value)
    assert message.startswith(f"installing {project} (editable) failed: ")
    assert "Invalid `pyproject.toml`" in message and "\n" not in message
    assert [c[-2:] for c in caught.value.commands] == [["-e", str(project)]]
    assert venv.python.is_file()


def project_plan(
    repo: Path, agent: Path, tasks: list[dict[str, Any]], **options: Any
) -> dict[str, TaskResult]:
    """Run *tasks* of PROJECT_AGENT (uv venvs); their results by task id."""
    plan = Plan.model_validate(
        {
            "agents": {"importer": {"command": ["python", str(agent)]}},
            "tasks": [{"agent": "importer", "task": "import tinypkg", **t} for t in tasks],
        }
    )
    report = anyio.run(lambda: orchestrate_parallel(plan, repo=repo, venv_backend="uv", **options))
    return {r.task_id: r for r in report.results}


def committed(repo: Path, result: TaskResult) -> set[str]:
    """What *result*'s commit added to the repository's main branch."""
    commit = result.provenance.result_commit
    assert commit is not None
    files = set(git(repo, "ls-tree", "-r", "--name-only", commit).splitlines())
    return files - set(git(repo, "ls-tree", "-r", "--name-only", "main").splitlines())


def test_a_task_imports_its_own_worktree(
    make_repo: MakeRepo, write_agent: Callable[[str, str], Path]
) -> None:
    repo = make_repo(extra=project_files())
    agent = write_agent("project", PROJECT_AGENT)
    tasks: list[dict[str, Any]] = [
        {"id": "installed", "install_project": True},
        {"id": "required", "requirements": ["-e {worktree}"]},
        {"id": "seeded", "install_project": True, "venv": {"seed": True}},
    ]
    results = project_plan(repo, agent, tasks)

    for task_id, result in results.items():
        assert result.status == "succeeded", (task_id, result.error)
        output = result.output
        assert output is not None
        worktree = Path(output["cwd"])
        assert worktree != repo  # the main checkout, which `-e ../repo` would have installed
        assert Path(output["module"]) == worktree / "src" / "tinypkg" / "__init__.py", task_id
        assert output["pip"] is (task_id == "seeded"), task_id
        # The installer's src/tinypkg.egg-info is not the agent's work: not committed.
        assert committed(repo, result) == {"made-by-agent.txt"}, task_id
        assert result.provenance.environment is not None
        assert "tinypkg==0.1" in result.provenance.environment.packages
        # Recorded as run: the venv made, then the worktree installed into it.
        commands = result.provenance.commands
        assert [is_venv_creation(c) for c in commands[:2]] == [True, False], task_id
        assert commands[1][-1].endswith(str(worktree)), task_id  # "-e {worktree}" filled in
    assert "--seed" in results["seeded"].provenance.commands[0]
    assert git(repo, "status", "--porcelain", "--ignored") == ""


def test_a_project_that_does_not_build_fails_its_task_as_install(
    make_repo: MakeRepo, write_agent: Callable[[str, str], Path]
) -> None:
    repo = make_repo(extra={"pyproject.toml": "[project\nname = \n"})
    agent = write_agent("project", PROJECT_AGENT)
    broken = project_plan(repo, agent, [{"id": "broken", "install_project": True}])["broken"]
    assert broken.status == "failed" and broken.attempts == 0
    assert broken.error is not None and broken.error.kind == "install"
    message = broken.error.message
    assert re.fullmatch(
        r"installing \S+ \(editable\) failed: .*Invalid `pyproject\.toml`.*", message
    )
    commands = broken.provenance.commands
    assert [is_venv_creation(c) for c in commands] == [True, False]
    assert commands[1][-1] in message
    # In code, an envelope can ask for it without a venv: the task says why it cannot.
    envelope = build_envelope("importer", "t", task_id="t", venv=False, install_project=True)
    agents = {"importer": ["python", str(agent)]}
    report = anyio.run(lambda: orchestrate_parallel([envelope], agents=agents, repo=repo))
    (result,) = report.results
    assert result.error is not None and result.error.kind == "install"
    assert result.error.message == (
        "install_project needs the task's venv, and this task has venv: false"
    )
