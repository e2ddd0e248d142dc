"""Virtualenvs: one per task, outside its worktree, made by uv or by the standard library.

Backends are a small interface and a table (``ALL_BACKENDS``), chosen by :func:`get_backend`:
``uv`` when the uv binary is available (the ``uv`` wheel ships it), else ``stdlib``
(``python -m venv`` and pip).

A venv has no pip unless asked for (``seed``: ``uv venv --seed``, or the standard library's
ensurepip); a task's own worktree can be installed into it, editable (:func:`install_project`).
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import ClassVar, Protocol

import anyio

from envelopes import Environment, read_bounded

from ._fs import remove_tree
from ._git import clean_environment
from .errors import VenvError
from .process import run_command

__all__ = [
    "ALL_BACKENDS",
    "StdlibBackend",
    "UvBackend",
    "Venv",
    "VenvBackend",
    "describe_environment",
    "get_backend",
    "install_project",
    "setup_virtualenv",
]


@dataclass(frozen=True)
class Venv:
    """A created virtualenv and the commands that made it."""

    path: Path
    backend: str
    commands: list[list[str]] = field(default_factory=list)

    @property
    def bin_dir(self) -> Path:
        """Where its executables live."""
        return self.path / ("Scripts" if os.name == "nt" else "bin")

    @property
    def python(self) -> Path:
        """Its interpreter."""
        return self.bin_dir / ("python.exe" if os.name == "nt" else "python")


class VenvBackend(Protocol):
    """Creates venvs and installs requirements into them."""

    name: ClassVar[str]

    async def create(self, path: Path, *, with_pip: bool) -> list[str]: ...

    async def install(
        self,
        venv: Path,
        requirements: Sequence[str],
        *,
        cwd: Path | None = None,
        what: str | None = None,
    ) -> list[str]: ...


#: Longest an installer may run before it is stopped.
INSTALL_TIMEOUT = 1800.0

#: Seconds an installer stopped by a timeout or a cancellation gets between SIGTERM and SIGKILL.
INSTALL_KILL_GRACE = 2.0


async def _run(command: list[str], what: str, *, venv: Path, cwd: Path | None = None) -> None:
    """Run an installer command in its own session, its output in files beside *venv*.

    Cancellation kills the installer's whole process group (pip's own children included)
    before it propagates, so nothing goes on writing into a venv being removed.
    """
    log_dir = venv.parent
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        message = f"{what} failed: cannot create {log_dir}: {exc.strerror or exc}"
        raise VenvError(message, commands=[command]) from exc
    token = secrets.token_hex(8)
    out, err = log_dir / f".install-{token}.stdout", log_dir / f".install-{token}.stderr"
    try:
        try:
            outcome = await run_command(
                command,
                cwd=cwd or Path.cwd(),
                env=clean_environment(os.environ),
                stdout=out,
                stderr=err,
                timeout=INSTALL_TIMEOUT,
                tag=f"install/{token}",
                kill_grace=INSTALL_KILL_GRACE,
            )
        except OSError as exc:
            raise VenvError(
                f"{what} failed: cannot start {command[0]}: {exc.strerror or exc}",
                commands=[command],
            ) from exc
        if outcome.timed_out:
            raise VenvError(f"{what} timed out after {INSTALL_TIMEOUT:g} s", commands=[command])
        if outcome.exit_code != 0:
            text = (
                err.read_text(errors="replace").strip() or out.read_text(errors="replace").strip()
            )
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            detail = " | ".join(lines[-6:]) or f"exit code {outcome.exit_code}"
            raise VenvError(f"{what} failed: {detail}", commands=[command])
    finally:
        out.unlink(missing_ok=True)
        err.unlink(missing_ok=True)


@cache
def _uv_binary() -> str | None:
    try:
        from uv import find_uv_bin
    except ImportError:
        return shutil.which("uv")
    try:
        return find_uv_bin()
    except FileNotFoundError:
        return shutil.which("uv")


def base_python() -> str:
    # An absolute interpreter path spares uv ~100 ms of interpreter discovery per venv.
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


class UvBackend:
    """``uv venv`` and ``uv pip install``: tens of milliseconds per venv from a warm cache."""

    name: ClassVar[str] = "uv"

    def __init__(self, uv: str | None = None) -> None:
        binary = uv or _uv_binary()
        if binary is None:
            raise VenvError("uv is not available")
        self.uv = binary
        #: Installer runs (``uv pip install``) and syncs (``uv pip sync``) made, for the tests'
        #: counts.
        self.installs = 0
        self.syncs = 0

    async def create(self, path: Path, *, with_pip: bool) -> list[str]:
        command = [self.uv, "venv", "--quiet", "--python", base_python(), str(path)]
        if with_pip:
            command.insert(3, "--seed")
        await _run(command, "uv venv", venv=path)
        return command

    async def install(
        self,
        venv: Path,
        requirements: Sequence[str],
        *,
        cwd: Path | None = None,
        what: str | None = None,
    ) -> list[str]:
        python = str(Venv(venv, self.name).python)
        command = [self.uv, "pip", "install", "--quiet", "--python", python, *requirements]
        await _run(command, what or "installing " + " ".join(requirements), venv=venv, cwd=cwd)
        self.installs += 1
        return command

    async def sync(self, venv: Path, pinned: Sequence[str]) -> list[str]:
        """Make *venv*'s distributions exactly *pinned* (``name==version``).

        Offline first: the pool syncs only to sets this run installed, whose wheels uv has
        cached. With no cache (``UV_NO_CACHE``, a pruned cache), online.
        """
        python = str(Venv(venv, self.name).python)
        listing = venv.parent / f".sync-{secrets.token_hex(8)}.txt"
        base = [self.uv, "pip", "sync", "--quiet", "--python", python]
        base += ["--allow-empty-requirements", str(listing)]
        what = "syncing " + (" ".join(pinned) or "an empty venv")
        command = [*base[:3], "--offline", *base[3:]]
        try:
            await anyio.to_thread.run_sync(
                listing.write_text, "".join(f"{p}\n" for p in pinned), "utf-8"
            )
            try:
                await _run(command, what, venv=venv)
            except VenvError:
                command = base
                await _run(command, what, venv=venv)
        except OSError as exc:
            raise VenvError(f"{what} failed: {exc.strerror or exc}", commands=[command]) from exc
        finally:
            listing.unlink(missing_ok=True)
        self.syncs += 1
        return command


class StdlibBackend:
    """``python -m venv`` and pip: slower (pip alone costs seconds), but needs nothing extra."""

    name: ClassVar[str] = "stdlib"

    async def create(self, path: Path, *, with_pip: bool) -> list[str]:
        command = [base_python(), "-m", "venv", str(path)]
        if not with_pip:
            command.insert(3, "--without-pip")
        await _run(command, "python -m venv", venv=path)
        return command

    async def install(
        self,
        venv: Path,
        requirements: Sequence[str],
        *,
        cwd: Path | None = None,
        what: str | None = None,
    ) -> list[str]:
        python = str(Venv(venv, self.name).python)
        command = [
            python,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *requirements,
        ]
        await _run(command, what or "installing " + " ".join(requirements), venv=venv, cwd=cwd)
        return command


ALL_BACKENDS: dict[str, type[UvBackend] | type[StdlibBackend]] = {
    "uv": UvBackend,
    "stdlib": StdlibBackend,
}


def get_backend(name: str = "auto") -> VenvBackend:
    """The backend called *name*; ``auto`` is uv when available, else the standard library."""
    if name == "auto":
        return UvBackend() if _uv_binary() else StdlibBackend()
    try:
        return ALL_BACKENDS[name]()
    except KeyError:
        raise VenvError(
            f"unknown venv backend {name!r} (choose from auto, {', '.join(ALL_BACKENDS)})"
        ) from None


async def setup_virtualenv(
    path: Path,
    requirements: Sequence[str] = (),
    *,
    backend: VenvBackend | None = None,
    cwd: Path | None = None,
    seed: bool = False,
) -> Venv:
    """Create a venv at *path* and install *requirements* into it.

    Requirements are passed to the installer as written, run in *cwd* (the plan's directory,
    so that relative paths to wheels or projects resolve against the plan file). With *seed*,
    the venv has pip (and setuptools) in it; without, it has none unless the installer needs
    it (the standard library's backend installs with pip).

    Raises VenvError with the installer's message on failure, after removing the partial
    venv; ``VenvError.commands`` lists what was run. Cancellation kills the installer's
    processes and removes the partial venv too.
    """
    backend = backend or get_backend()
    commands: list[list[str]] = []
    try:
        with_pip = seed or (bool(requirements) and backend.name == "stdlib")
        commands.append(await backend.create(path, with_pip=with_pip))
        if requirements:
            commands.append(await backend.install(path, list(requirements), cwd=cwd))
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(remove_tree, path, True)
        if isinstance(exc, VenvError):
            exc.commands = commands + exc.commands
        raise
    return Venv(path=path, backend=backend.name, commands=commands)


async def install_project(
    venv: Venv, project: Path, *, backend: VenvBackend | None = None
) -> list[list[str]]:
    """Install the Python project at *project* into *venv*, editable; the commands run.

    Editable: the venv imports the project's modules from *project* itself, so what an agent
    changes there is what its venv runs. The standard library's backend installs with pip,
    which a venv made without requirements does not have: ensurepip puts it in first.

    Raises VenvError (its ``commands`` what ran, the failing one last) with the end of the
    installer's output on failure; the venv stays. Cancellation kills the installer's
    processes.
    """
    backend = backend or get_backend(venv.backend)
    commands: list[list[str]] = []
    try:
        if backend.name == "stdlib" and not await anyio.to_thread.run_sync(_has_pip, venv):
            command = [str(venv.python), "-m", "ensurepip"]
            await _run(command, "python -m ensurepip", venv=venv.path)
            commands.append(command)
        what = f"installing {project} (editable)"
        commands.append(
            await backend.install(venv.path, ["-e", str(project)], cwd=project, what=what)
        )
    except VenvError as exc:
        exc.commands = commands + exc.commands
        raise
    return commands


def _has_pip(venv: Venv) -> bool:
    return any(venv.path.glob("lib/python*/site-packages/pip/__init__.py"))


_DIST_INFO = re.compile(r"^(?P<name>.+?)-(?P<version>[^-]+)\.dist-info$")


#: Most entries of a site-packages directory looked at when describing a venv.
_MAX_SITE_ENTRIES = 100_000


def describe_environment(venv: Venv) -> Environment:
    """The venv's interpreter and installed distributions, read from disk (no subprocess)."""
    config: dict[str, str] = {}
    # The agent could write its venv: pyvenv.cfg is read as a regular file, up to 64 KiB.
    text = read_bounded(venv.path / "pyvenv.cfg", 64 * 1024).decode("utf-8", errors="replace")
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            config[key.strip()] = value.strip()
    version = config.get("version_info") or config.get("version") or "unknown"
    packages: list[str] = []
    for site in venv.path.glob("lib/python*/site-packages"):
        # Bounded: an agent can fill its venv with fake *.dist-info entries.
        for entry in itertools.islice(site.iterdir(), _MAX_SITE_ENTRIES):
            match = _DIST_INFO.match(entry.name)
            if match:
                name = re.sub(r"[-_.]+", "-", match["name"]).lower()
                packages.append(f"{name}=={match['version']}")
    return Environment(
        python=version,
        implementation=config.get("implementation", sys.implementation.name).lower(),
        packages=sorted(packages),
        installer=venv.backend,
    )
