"""Checking a merge: the merged tasks' own checks, run on the combined tree before it lands.

``orchestrator merge --check`` and ``--train`` (and a plan's ``merge: {check: true}``) run, on
a combined commit, the setup steps and the required checks that the merged tasks' envelopes
name. The envelopes are read from the run directory and must hash to the digests the report
holds. A step that several tasks name alike (the same name and command) runs once; two tasks
naming the same command differently run both. Each step runs as its task's did: with the
task's environment (a value its envelope file masks is taken from this process's environment,
when set there), under its isolation (sandbox, network, limits), its placeholders filled in
for the combined tree (``{worktree}`` is the scratch worktree).

Each combined commit is checked in a scratch worktree of its own (on a scratch branch
``orchestrator/<run>/_merge-<token>``, which no task id can be) with a venv made for it as the
tasks asked (their requirements together, pip when one asked for it, the tree installed
into it, editable, when one asked for ``install_project``). Both are removed afterwards,
whatever happens, a cancellation included. A crash leaves them in the run's directories of the
state directory, where ``orchestrator gc`` finds them.

The logs of one merge go into the run directory, ``logs/merge-<n>/``: each step's as
``<task>.<phase>-<name>.<check>.stdout`` (``<check>``: the check's number in the merge, from
1), a venv that could not be made as ``venv.<check>.stderr``; ``verify`` hashes them again.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from envelopes import (
    MASK,
    MAX_ENVELOPE_BYTES,
    CheckResult,
    HandoffEnvelope,
    Limits,
    MergeCheck,
    NotAReport,
    Report,
    Step,
    digest,
    fill_placeholders,
    is_secret_name,
    load_report_file,
    loads_bounded,
    open_regular,
    read_logged,
    ref_safe,
)

from ._fs import remove_tree
from ._git import clean_environment
from .attempt import AttemptRequest, log_entries
from .errors import MergeError, VenvError
from .isolation import agent_environment
from .journal import JOURNAL
from .lifeline import Lifeline
from .repo import Repository
from .secrets import Masker
from .settings import RunSettings
from .steps import Phase, how_it_ended, run_steps, step_argv
from .venv import Venv, VenvBackend, install_project, setup_virtualenv
from .worktree import Worktree, create_worktree, remove_worktree

__all__ = ["MergeCheckSettings", "MergeChecker", "failed_steps", "merge_run_dir", "strictest"]


@dataclass(frozen=True)
class MergeCheckSettings:
    """How a checked merge checks its combined trees: made once, by the CLI or the run's end.

    ``run_dir`` is the run directory the tasks' envelopes are read from and the logs written
    to (see :func:`merge_run_dir`). ``plan_dir`` is what ``{plan_dir}`` stands for and where
    requirements are installed from (None: as the run's journal records it, else the current
    directory). The others are the run's: its venv backend (None: the default), the
    environment the steps start from (None: this process's), the seconds between SIGTERM and
    SIGKILL, and the lifeline that kills the steps if this process dies (None: none).
    """

    run_dir: Path
    train: bool = False
    plan_dir: Path | None = None
    venv_backend: VenvBackend | None = None
    base_env: Mapping[str, str] | None = None
    kill_grace: float = RunSettings.model_fields["kill_grace"].default
    lifeline: Lifeline | None = field(default=None, compare=False)


def strictest(envelopes: Sequence[HandoffEnvelope]) -> dict[str, Any]:
    """The isolation that holds every one of *envelopes*: a sandbox if any had one, the
    network only if all had it, each limit the smallest any set, the orchestrator's
    environment only if all inherited it."""
    limits: dict[str, int] = {}
    for envelope in envelopes:
        for name, value in envelope.limits.model_dump(exclude_none=True).items():
            limits[name] = min(value, limits.get(name, value))
    sandboxed = [e.sandbox for e in envelopes if e.sandbox != "none"]
    return {
        "sandbox": sandboxed[0] if sandboxed else "none",
        "network": all(e.network for e in envelopes),
        "limits": Limits(**limits),
        "inherit_env": all(e.inherit_env for e in envelopes),
    }


def merge_run_dir(report: Report, repository: Repository) -> Path:
    """Where a checked merge of *report* reads envelopes and writes logs: the run's own
    directory in *repository*'s state directory. MergeError when it is not there.

    A checked merge runs the commands the run's envelopes name. A report (and the files
    beside it) may come from anyone, and nothing in it may run code: so only a run made in
    this repository, by this orchestrator, is checked; never the ``run_dir`` a report names,
    nor files sent with it.
    """
    own = repository.state_dir / "runs" / report.run_id
    refusal = (
        "--check runs the commands the run's envelopes name, so it checks only a run made in "
        "this repository: {why} (a report from elsewhere is merged without --check, or its "
        "run made again here)"
    )
    try:
        _, local, _ = load_report_file(own / "report.json")
    except (OSError, NotAReport) as exc:
        why = f"{own / 'report.json'} cannot be read ({exc})"
        raise MergeError(refusal.format(why=why)) from None
    # The results to merge must be the ones this run made: a copy of its report whose result
    # commits were pointed elsewhere (and resealed) would have the run's checks run on them.
    made = {result.task_id: result.provenance.result_sha256 for result in local.results}
    for result in report.results:
        if made.get(result.task_id) != result.provenance.result_sha256:
            why = f"the result of task {result.task_id} is not the one {own} recorded"
            raise MergeError(refusal.format(why=why))
    return own


def failed_steps(check: MergeCheck) -> str:
    """The required steps of *check* that failed, in words: ``required check tests (exit
    code 1)``, ``required setup step venv (could not start)``."""
    parts = []
    for record in check.checks:
        if not record.required or record.passed:
            continue
        kind = "check" if record.phase == "check" else "setup step"
        parts.append(f"{kind} {record.name} ({how_it_ended(record)})")
    return "required " + ", ".join(parts) if parts else "no required step"


@dataclass(frozen=True)
class _Task:
    """A merged task as its envelope file says it ran."""

    task_id: str
    envelope: HandoffEnvelope
    path: Path


@dataclass(frozen=True)
class _Steps:
    """The steps of one task that a check runs (the others named them first, or not at all)."""

    task: _Task
    setup: list[Step]
    checks: list[Step]


class MergeChecker:
    """Checks combined commits of one merge (see the module docstring); :meth:`open` it."""

    def __init__(
        self,
        repository: Repository,
        run_id: str,
        tasks: Mapping[str, _Task],
        settings: MergeCheckSettings,
        plan_dir: Path,
        first_number: int,
    ) -> None:
        self.repository = repository
        self.run_id = run_id
        self.tasks = dict(tasks)
        self.settings = settings
        #: The isolation of the tree being checked (see :func:`strictest`).
        self._strict: dict[str, Any] = {}
        self.plan_dir = plan_dir
        self.first_number = first_number
        #: Checks run so far; the next one's number is this plus one.
        self.count = 0
        #: ``logs/merge-<n>`` in the run directory, made at the first check.
        self.log_dir: Path | None = None

    @classmethod
    async def open(
        cls,
        repository: Repository,
        report: Report,
        task_ids: Sequence[str],
        settings: MergeCheckSettings,
    ) -> MergeChecker:
        """The checker of a merge of *task_ids* of *report*, their envelopes read and matched to
        the report. MergeError (nothing has moved) when an envelope cannot be read or does not
        match, or when none of the tasks has a required check: a check of nothing is no check.
        """
        tasks = {tid: await _read_task(report, tid, settings.run_dir) for tid in task_ids}
        if not any(step.required for task in tasks.values() for step in task.envelope.checks):
            names = ", ".join(task_ids)
            raise MergeError(
                f"nothing to check the combined tree with: none of the tasks to merge ({names}) "
                "has a required check (the plan's checks); merge without --check, or add checks"
            )
        plan_dir = settings.plan_dir
        if plan_dir is None:
            plan_dir = await anyio.to_thread.run_sync(_recorded_plan_dir, settings.run_dir)
        return cls(repository, report.run_id, tasks, settings, plan_dir, len(report.merge) + 1)

    async def check(
        self, commit: str, task_ids: Sequence[str], *, task_id: str | None = None
    ) -> MergeCheck:
        """Run the setup steps and required checks of *task_ids* on *commit*: its record.

        *task_id* is the result a train step adds (None: a check of the whole merge). A tree
        none of whose tasks has a step passes without a worktree being made. GitError when
        the scratch worktree cannot be made; a venv that cannot be made fails the check.
        Cancellation: the running step's processes are ended, the scratch worktree and venv
        removed (shielded), and the cancellation propagates.
        """
        self.count += 1
        turn = self.count
        name = f"_merge-{secrets.token_hex(6)}"
        state = self.repository.state_dir
        path, venv_path = (
            state / "worktrees" / self.run_id / name,
            state / "venvs" / self.run_id / name,
        )
        steps = self._steps(task_ids, path)
        if not any(s.setup or s.checks for s in steps):
            return MergeCheck(task_id=task_id, commit=commit, passed=True)
        # The combined tree holds every task's code: each step runs under the strictest
        # isolation among them, not under its own task's.
        self._strict = strictest([self.tasks[t].envelope for t in task_ids])
        if self._strict["sandbox"] != "none" and any(
            s.task.envelope.install_project for s in steps
        ):
            raise MergeError(
                "--check would install the combined tree (install_project) outside the sandbox "
                "its tasks ran in: merge it without --check, or run its tasks unsandboxed"
            )
        log_dir = await self._log_dir()
        branch = f"orchestrator/{self.run_id}/{name}"
        worktree = await create_worktree(self.repository, branch, path, commit)
        try:
            venv, failed = await self._venv(steps, worktree, venv_path, turn, log_dir)
            if failed is not None:
                records = [failed]
            else:
                records = await self._run(steps, worktree, venv, turn, log_dir)
        finally:
            with anyio.CancelScope(shield=True):
                await remove_worktree(self.repository, worktree, delete_branch=True)
                # A step that committed moved the scratch branch: it goes all the same.
                await self.repository.git.run(
                    "update-ref", "-d", "--end-of-options", f"refs/heads/{branch}", check=False
                )
                await anyio.to_thread.run_sync(remove_tree, venv_path, True)
        passed = all(r.passed for r in records if r.required)
        return MergeCheck(task_id=task_id, commit=commit, passed=passed, checks=records)

    def _steps(self, task_ids: Sequence[str], worktree: Path) -> list[_Steps]:
        """Each task's setup steps and required checks, in order, less those an earlier task
        named alike (the same name and the same command, placeholders filled in)."""
        seen: set[tuple[str, str, tuple[str, ...]]] = set()

        def new(task: _Task, phase: str, step: Step) -> bool:
            key = (phase, step.name, tuple(step_argv(step, self._values(task, worktree))))
            if key in seen:
                return False
            seen.add(key)
            return True

        out = []
        for task_id in dict.fromkeys(task_ids):
            task = self.tasks[task_id]
            setup = [s for s in task.envelope.setup if new(task, "setup", s)]
            checks = [s for s in task.envelope.checks if s.required and new(task, "check", s)]
            out.append(_Steps(task, setup, checks))
        return out

    def _values(self, task: _Task, worktree: Path) -> dict[str, str]:
        """What a step's placeholders stand for, for *task* on the scratch *worktree*."""
        return {
            "worktree": str(worktree),
            "repo_root": str(self.repository.root),
            "plan_dir": str(self.plan_dir),
            "task_id": task.task_id,
        }

    async def _log_dir(self) -> Path:
        """``logs/merge-<n>`` of this merge: the first number from the report's next merge on
        whose directory nobody else made (another merge of the same run, at the same time)."""
        if self.log_dir is not None:
            return self.log_dir
        logs = self.settings.run_dir / "logs"

        def reserve() -> Path:
            logs.mkdir(parents=True, exist_ok=True)
            for number in range(self.first_number, self.first_number + 10_000):
                with contextlib.suppress(FileExistsError):
                    (logs / f"merge-{number}").mkdir()
                    return logs / f"merge-{number}"
            raise MergeError(f"cannot make a directory for the merge's logs in {logs}")

        try:
            self.log_dir = await anyio.to_thread.run_sync(reserve)
        except OSError as exc:
            raise MergeError(
                f"cannot write the merge's logs in {logs}: {exc.strerror or exc}"
            ) from exc
        return self.log_dir

    async def _venv(
        self, steps: Sequence[_Steps], worktree: Worktree, path: Path, turn: int, log_dir: Path
    ) -> tuple[Venv | None, CheckResult | None]:
        """The venv the tasks asked for (None when none did), or the failed ``venv`` setup
        step saying why it could not be made."""
        tasks = [s.task for s in steps]
        if not any(t.envelope.venv for t in tasks):
            return None, None
        requirements: dict[str, None] = {}
        for task in tasks:
            values = self._values(task, worktree.path)
            for requirement in task.envelope.requirements:
                requirements[fill_placeholders(requirement, values)] = None
        backend = self.settings.venv_backend
        start = time.monotonic()
        commands: list[list[str]] = []
        try:
            seed = any(t.envelope.venv_seed for t in tasks)
            venv = await setup_virtualenv(
                path, list(requirements), backend=backend, cwd=self.plan_dir, seed=seed
            )
            commands = venv.commands
            if any(t.envelope.install_project for t in tasks):
                commands = await install_project(venv, worktree.path, backend=backend)
        except VenvError as exc:
            failed = await self._venv_failed(exc, commands, turn, log_dir, time.monotonic() - start)
            return None, failed
        return venv, None

    async def _venv_failed(
        self, exc: VenvError, commands: list[list[str]], turn: int, log_dir: Path, took: float
    ) -> CheckResult:
        """The venv that could not be made, as a failed required setup step named ``venv``
        whose stderr log says why."""
        stdout, stderr = log_dir / f"venv.{turn}.stdout", log_dir / f"venv.{turn}.stderr"

        def write() -> None:
            stdout.write_bytes(b"")
            stderr.write_text(str(exc) + "\n", "utf-8")

        await anyio.to_thread.run_sync(write)
        out, err, _ = await anyio.to_thread.run_sync(
            log_entries, stdout, stderr, self.settings.run_dir, Masker()
        )
        ran = (exc.commands or commands or [["venv"]])[-1]
        return CheckResult(
            name="venv",
            phase="setup",
            turn=turn,
            command=[str(a) for a in ran],
            passed=False,
            required=True,
            duration_s=round(took, 6),
            stdout=out,
            stderr=err,
        )

    async def _run(
        self,
        steps: Sequence[_Steps],
        worktree: Worktree,
        venv: Venv | None,
        turn: int,
        log_dir: Path,
    ) -> list[CheckResult]:
        """Every task's setup steps, then (when no required one failed) every task's checks."""
        records: list[CheckResult] = []
        phases: tuple[Phase, ...] = ("setup", "check")
        for phase in phases:
            for each in steps:
                chosen = each.setup if phase == "setup" else each.checks
                if not chosen:
                    continue
                request = self._request(each.task, worktree, venv, turn, log_dir)
                runs = await run_steps(
                    chosen,
                    phase,
                    turn=turn,
                    request=request,
                    values=self._values(each.task, worktree.path),
                    masker=Masker.for_env(request.env, each.task.envelope.secrets),
                    log_stem=log_dir / ref_safe(each.task.task_id),
                )
                records += [run.record for run in runs]
                if phase == "setup" and any(r.required and not r.passed for r in records):
                    return records
        return records

    def _request(
        self, task: _Task, worktree: Worktree, venv: Venv | None, turn: int, log_dir: Path
    ) -> AttemptRequest:
        """What *task*'s steps run with on the scratch *worktree* (the step's own logs and
        time limit are set by ``run_steps``)."""
        stem = log_dir / f"{ref_safe(task.task_id)}.{turn}"
        return AttemptRequest(
            envelope=task.envelope.model_copy(update=self._strict),
            attempt=turn,
            run_id=self.run_id,
            cwd=worktree.path,
            worktree=worktree,
            venv=venv,
            env=self._env(task, venv),
            envelope_path=task.path,
            output_path=stem.with_name(stem.name + ".output.json"),
            stdout_path=stem.with_name(stem.name + ".stdout"),
            stderr_path=stem.with_name(stem.name + ".stderr"),
            run_dir=self.settings.run_dir,
            state_dir=self.repository.state_dir,
            plan_dir=self.plan_dir,
            repo=self.repository,
            kill_grace=self.settings.kill_grace,
            lifeline=self.settings.lifeline,
        )

    def _env(self, task: _Task, venv: Venv | None) -> dict[str, str]:
        """*task*'s environment as its steps had it: its isolation's base, its own variables
        (one its envelope file masks from this process's environment, or left out), its venv
        first on PATH, and the ``ORCHESTRATOR_*`` variables of its run."""
        base = self.settings.base_env
        if base is None:
            base = clean_environment(os.environ)
        envelope = task.envelope
        env = agent_environment(base, envelope)
        for name, value in envelope.env.items():
            if value == MASK and is_secret_name(name, envelope.secrets):
                if name in base:
                    env[name] = base[name]
                continue
            env[name] = value
        if venv is not None:
            env["VIRTUAL_ENV"] = str(venv.path)
            env["PATH"] = str(venv.bin_dir) + os.pathsep + env.get("PATH", "")
            env.pop("PYTHONHOME", None)
        env.update(
            ORCHESTRATOR_ENVELOPE=str(task.path),
            ORCHESTRATOR_TASK_ID=task.task_id,
            ORCHESTRATOR_RUN_ID=self.run_id,
        )
        return env


async def _read_task(report: Report, task_id: str, run_dir: Path) -> _Task:
    """*task_id*'s envelope, read from *run_dir* and matched to the report's digest of it."""
    result = report.result(task_id)
    entry = result.envelope
    if entry is None:
        raise MergeError(f"task {task_id}: the report names no envelope file, so no checks")
    try:
        data = await anyio.to_thread.run_sync(
            lambda: read_logged(
                entry.path,
                size=entry.size,
                offset=entry.offset,
                limit=MAX_ENVELOPE_BYTES,
                within=run_dir,
            )
        )
        raw = loads_bounded(data)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise MergeError(
            f"task {task_id}: cannot read its envelope {entry.path} in {run_dir} ({why}); "
            "a checked merge reads the tasks' checks from the run directory"
        ) from exc
    if not isinstance(raw, dict) or digest(raw) != result.provenance.envelope_sha256:
        raise MergeError(
            f"task {task_id}: its envelope {entry.path} in {run_dir} does not match the "
            "report's envelope_sha256; its checks are not run"
        )
    try:
        envelope = HandoffEnvelope.model_validate(raw)
    except ValueError as exc:
        raise MergeError(f"task {task_id}: its envelope {entry.path} is not valid") from exc
    return _Task(task_id, envelope, run_dir / entry.path)


def _recorded_plan_dir(run_dir: Path) -> Path:
    """The plan's directory as the run's journal recorded it (its first line), else the
    current directory. Blocking (a thread)."""
    try:
        fd = open_regular(JOURNAL, within=run_dir)
        with os.fdopen(fd, "rb") as f:
            first = json.loads(f.readline(1 << 20))
        return Path(first["plan_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return Path.cwd()
