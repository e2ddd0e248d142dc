"""The ``orchestrator`` command: a thin layer over the library.

Each command is a function ``cmd_<name>(args) -> int`` that tests call without a subprocess.
Exit codes: 0 all good; 1 some task did not succeed, verify found something, or a merge did not
happen (conflicts, refused); 2 bad usage, bad plan, unreadable report or bad merge input; 130
interrupted by Ctrl-C, 143 by SIGTERM, 129 by SIGHUP (each after clean-up).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from ._version import __version__
from .errors import OrchestratorError

if TYPE_CHECKING:
    from envelopes import Report

__all__ = ["build_parser", "dispatch", "entry", "main", "preload"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

T = TypeVar("T")


def _err(message: str) -> None:
    from .progress import printable

    print(f"orchestrator: {printable(message)}", file=sys.stderr)


def _issues(issues: Sequence[object]) -> None:
    """A plan's problems, one per line on stderr (shown, never obeyed: :func:`_err`)."""
    from .progress import printable

    for issue in issues:
        print(printable(str(issue)), file=sys.stderr)


def _run_async(func: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``anyio.run(func, *args)``, each git and agent process it starts reaped without a
    thread of its own (:func:`orchestrator.process.reaping_by_pidfd`)."""
    import anyio

    from .process import reaping_by_pidfd

    with reaping_by_pidfd():
        return anyio.run(func, *args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="orchestrator",
        description="Fan tasks out to agents, each in its own git worktree and virtualenv; verify the results report.",
    )
    parser.add_argument(
        "--version", action="version", version=f"worktree-orchestrator {__version__}"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="run a plan (or the demo with --demo)",
        description="Run every task of a plan and write a results report.",
    )
    run.add_argument("plan", nargs="?", type=Path, help="plan file (YAML or JSON)")
    run.add_argument(
        "--demo",
        action="store_true",
        help="run the embedded demo plan (makes ./orchestrator-demo if missing)",
    )
    run.add_argument("--repo", type=Path, help="repository to run in (overrides the plan's repo)")
    run.add_argument(
        "--base", help="commit or ref all tasks start from (overrides the plan's base)"
    )
    run.add_argument(
        "--concurrency", type=_integer, help="at most this many tasks at once (1 to 1024)"
    )
    run.add_argument(
        "--pool",
        type=_integer,
        metavar="N",
        help="keep up to N worktrees (and venvs per requirement set) for later tasks and runs "
        "(default: the concurrency; 0: none)",
    )
    run.add_argument("--out", type=Path, help="also write the report here")
    run.add_argument(
        "--html", action="store_true", help="also write report.html beside report.json"
    )
    run.add_argument(
        "--fail-fast",
        action="store_true",
        default=None,
        help="at the first failed task, cancel the running ones and start no more",
    )
    run.add_argument(
        "--keep-worktrees",
        metavar="POLICY",
        help="which worktrees to keep after the run: never, failed or always (default: the plan's)",
    )
    run.add_argument(
        "--state-dir",
        type=Path,
        help="where runs, worktrees and venvs live (default: <git-dir>/orchestrator)",
    )
    run.add_argument(
        "--venv-backend",
        metavar="BACKEND",
        help="how venvs are made: auto (uv when installed), uv or stdlib (default: auto)",
    )
    run.add_argument(
        "--json",
        action="store_true",
        help="print the report JSON on stdout instead of the summary table",
    )
    _executor_options(run)
    run.add_argument(
        "--resume",
        action="store_true",
        help="go on with the latest interrupted run of this plan instead of starting a new one",
    )
    run.add_argument(
        "--rerun",
        action="store_true",
        help="with --resume, when the plan's latest run finished: start a new run (without "
        "it, that run's report is shown and nothing runs)",
    )
    run.add_argument(
        "--force",
        action="store_true",
        help="with --resume, when the plan changed since that run started: start a new run "
        "that reuses its results wherever the work is the same",
    )

    resume = sub.add_parser(
        "resume",
        help="go on with an interrupted or cancelled run",
        description="Go on with a run whose orchestrator died or was stopped: finished tasks "
        "are kept, the rest run again from clean worktrees.",
    )
    resume.add_argument("run_id", metavar="RUN_ID", help="the run's id (see orchestrator runs)")
    resume.add_argument(
        "--repo", type=Path, help="the run's repository (default: the current directory's)"
    )
    resume.add_argument(
        "--state-dir", type=Path, help="where the run lives (default: <git-dir>/orchestrator)"
    )
    resume.add_argument(
        "--concurrency", type=_integer, help="at most this many tasks at once (1 to 1024)"
    )
    resume.add_argument("--out", type=Path, help="also write the report here")
    resume.add_argument(
        "--html", action="store_true", help="also write report.html beside report.json"
    )
    resume.add_argument(
        "--json",
        action="store_true",
        help="print the report JSON on stdout instead of the summary table",
    )
    _executor_options(resume)

    gc = sub.add_parser(
        "gc",
        help="remove what dead runs left behind, and old runs",
        description="Remove orphaned worktrees, venvs, processes and lock files of runs that "
        "are not live, and the run directories (and with --branches, the branches) of runs "
        "older than the limit. A live run is never touched.",
    )
    gc.add_argument("--repo", type=Path, help="the repository (default: the current directory's)")
    gc.add_argument(
        "--state-dir", type=Path, help="where runs live (default: <git-dir>/orchestrator)"
    )
    gc.add_argument(
        "--older-than",
        default="7d",
        metavar="AGE",
        help="remove runs idle for longer than this (7d, 12h, 30m; 0 for all); default 7d",
    )
    gc.add_argument(
        "--branches",
        action="store_true",
        help="also delete the task branches of runs whose report is gone or older than AGE",
    )
    gc.add_argument(
        "--dry-run", action="store_true", help="list what would be removed; remove nothing"
    )

    cache = sub.add_parser(
        "cache",
        help="list or clear the result cache",
        description="The result cache of tasks with cache: true (see docs/plan-format.md).",
    )
    cache.add_argument("action", choices=["ls", "clear"])
    cache.add_argument(
        "--repo", type=Path, help="the repository (default: the current directory's)"
    )
    cache.add_argument(
        "--state-dir", type=Path, help="where the cache lives (default: <git-dir>/orchestrator)"
    )
    cache.add_argument("--json", action="store_true", help="ls: one JSON object per entry")

    runs = sub.add_parser("runs", help="list the runs of a repository")
    runs.add_argument("--repo", type=Path, help="the repository (default: the current directory's)")
    runs.add_argument(
        "--state-dir", type=Path, help="where runs live (default: <git-dir>/orchestrator)"
    )
    runs.add_argument("--json", action="store_true", help="one JSON object per run, a line each")

    validate = sub.add_parser("validate", help="check a plan without running it")
    validate.add_argument("plan", type=Path)
    validate.add_argument("--repo", type=Path, help="repository to check the plan against")

    verify = sub.add_parser("verify", help="re-check a report: digests, files and commits")
    verify.add_argument("report", type=Path)
    verify.add_argument(
        "--repo",
        type=Path,
        help="repository to merge in (default: the current directory's; a report made in another one is refused unless --repo names where to merge)",
    )
    verify.add_argument(
        "--run-dir",
        type=Path,
        help="directory of the run's logs and envelopes (default: the report's)",
    )
    verify.add_argument(
        "--attestations",
        type=Path,
        metavar="DIR",
        help="also check the attestations `attest` wrote there (with --key)",
    )
    verify.add_argument(
        "--key", type=Path, metavar="PUB", help="the public key the attestations are signed with"
    )

    report = sub.add_parser(
        "report",
        help="show a report for people: a Markdown summary, an HTML page",
        description="Render a report for people to read. The report is verified first, and "
        "the summary and the page say what verify found.",
    )
    report.add_argument("report", type=Path)
    report.add_argument(
        "--markdown",
        action="store_true",
        help="print a Markdown summary (for a pull request comment or a CI step summary)",
    )
    report.add_argument(
        "--html",
        type=Path,
        metavar="FILE",
        help="write one self-contained page: timeline, tasks, matrix groups, merges",
    )
    report.add_argument(
        "--repo", type=Path, help="the report's repository (default: the one it names)"
    )

    keygen = sub.add_parser(
        "keygen",
        help="make an Ed25519 key pair for signing attestations",
        description="Write STEM.pem (the private key, mode 0600) and STEM.pub.pem. An existing "
        "file is never overwritten.",
    )
    keygen.add_argument("--out", type=Path, required=True, metavar="STEM", help="e.g. key")

    attest = sub.add_parser(
        "attest",
        help="sign a report's provenance as in-toto attestations (SLSA provenance, test results)",
        description="Verify the report, then write one signed DSSE envelope per statement and "
        "the run's bundle <run_id>.intoto.jsonl into DIR.",
    )
    attest.add_argument("report", type=Path)
    attest.add_argument(
        "--key",
        required=True,
        metavar="KEY",
        help="the private key: a PEM file, or env:NAME for one in environment variable NAME",
    )
    attest.add_argument("--out", type=Path, required=True, metavar="DIR")
    attest.add_argument(
        "--repo", type=Path, help="the report's repository (default: the one it names)"
    )

    merge = sub.add_parser(
        "merge",
        help="merge a report's results into a branch, all or nothing",
        description="Predict conflicts, then merge the report's results into BRANCH in one move "
        "(with --check, only if the combined tree passes the tasks' checks).",
    )
    merge.add_argument("report", type=Path)
    merge.add_argument("--into", required=True, metavar="BRANCH", help="branch to merge into")
    merge.add_argument(
        "--tasks",
        nargs="+",
        action="extend",
        metavar="ID",
        help="merge only these tasks (a matrix group's name: its selected members)",
    )
    merge.add_argument(
        "--dry-run",
        action="store_true",
        help="predict (and check) and report; move nothing, record nothing",
    )
    merge.add_argument(
        "--check",
        action="store_true",
        help="run the tasks' required checks on the combined tree in a scratch worktree; "
        "move BRANCH only if they pass",
    )
    merge.add_argument(
        "--train",
        action="store_true",
        help="merge the results one at a time (dependencies first), keep each only if the "
        "combined tree still passes the checks, leave the others out (implies --check)",
    )
    merge.add_argument(
        "--repo",
        type=Path,
        help="repository to merge in (default: the current directory's; a report made in another one is refused unless --repo names where to merge)",
    )

    schema = sub.add_parser("schema", help="print the JSON Schemas of plan, envelope and report")
    schema.add_argument("document", nargs="?", choices=["plan", "envelope", "report"])

    serve = sub.add_parser(
        "serve",
        help="keep a resident process that runs later commands without their start-up",
        description="Import the engine once and run each later run, resume, validate, verify "
        "and merge command of this user and this install in a process forked from it "
        "(docs/cli.md#orchestrator-serve).",
    )
    what = serve.add_mutually_exclusive_group()
    what.add_argument("--detach", action="store_true", help="start it in the background")
    what.add_argument("--stop", action="store_true", help="stop the one listening")
    what.add_argument("--status", action="store_true", help="say whether one is listening")
    serve.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        help="exit after this long without a command (default 1800; 0: never)",
    )
    return parser


def _integer(text: str) -> int:
    """An argparse ``type``: an integer, else a one-line usage error. Its bounds are the run
    settings' (orchestrator/settings.py), checked there whatever the value's source."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def cmd_run(args: argparse.Namespace) -> int:
    """``orchestrator run``."""
    if args.demo == (args.plan is not None):
        _err("run needs a PLAN file, or --demo (not both)")
        return EXIT_USAGE
    return _drive(args, _run)


def cmd_resume(args: argparse.Namespace) -> int:
    """``orchestrator resume``: go on with an interrupted or cancelled run."""
    return _drive(args, _resume)


def _drive(args: argparse.Namespace, start: Callable[..., Awaitable[Report]]) -> int:
    """Run *start* with progress, signals and the closing summary; map errors to exit codes."""

    from .errors import OrchestratorError, PlanError, SettingsError
    from .repo import NotARepository

    if args.out is not None and not args.out.absolute().parent.is_dir():
        # Checked before anything runs: finding out after an hour of agents would be unkind.
        _err(f"--out: {args.out.absolute().parent} is not a directory")
        return EXIT_USAGE
    try:
        return _run_async(_watch, args, start)
    except PlanError as exc:
        _issues(exc.issues)
        return EXIT_USAGE
    except NotARepository as exc:
        _err(str(exc))
        return EXIT_USAGE
    except SettingsError as exc:
        given = getattr(args, exc.name, None) is not None
        _err(f"--{exc.name.replace('_', '-')}: {exc.reason}" if given else str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _err(
            "interrupted; running tasks were stopped and cleaned up (partial report in the run directory)"
        )
        return EXIT_INTERRUPTED
    except OrchestratorError as exc:
        _err(str(exc))
        return EXIT_FAILED


async def _run(args: argparse.Namespace, on_event: Callable[..., Any]) -> Report:
    from .coordinator import orchestrate_parallel
    from .plan import load_plan

    repo = args.repo
    if args.demo:
        from .demo import DEMO_PLAN, ensure_demo_repo

        plan_path = DEMO_PLAN
        if repo is None:
            repo, created = await ensure_demo_repo(Path("orchestrator-demo"))
            print(f"demo repository: {repo}" + (" (created)" if created else ""), file=sys.stderr)
    else:
        plan_path = args.plan
    loaded = load_plan(plan_path)
    resume = reuse = None
    told = False
    if args.force and not args.resume:
        raise OrchestratorError("--force goes with --resume")
    if args.rerun and not args.resume:
        raise OrchestratorError("--rerun goes with --resume (without --resume, a run is new)")
    if args.resume:
        from .plan import check_plan_repository
        from .runs import PlanChanged, RunAlreadyFinished, find_resumable
        from .settings import state_root

        repository, _, _ = await check_plan_repository(
            loaded, repo_override=repo, state_dir=args.state_dir
        )
        state = state_root(repository.state_dir if repository else None, args.state_dir)
        if repository is not None:
            repository.lock.close()
        plan_file = str(Path(loaded.file).absolute()) if loaded.file else None
        try:
            resume = find_resumable(state, loaded.sha256, plan_file, rerun=args.rerun)
        except RunAlreadyFinished as exc:
            if (done := await _finished_run(exc, args)) is not None:
                return done
            told = True  # _finished_run said why a new run starts
        except PlanChanged as exc:
            if not args.force:
                raise
            reuse = exc.run_id
            print(
                f"the plan changed since run {reuse} started: starting a new run that reuses "
                "what still matches",
                file=sys.stderr,
            )
        if resume is not None:
            print(f"resuming run {resume}", file=sys.stderr)
        elif reuse is None and not told:
            print("no interrupted run of this plan: starting a new one", file=sys.stderr)
    await _warn_if_dirty(loaded, repo, args.base)
    return await orchestrate_parallel(
        loaded,
        repo=repo,
        base=args.base,
        concurrency=args.concurrency,
        pool=args.pool,
        keep_worktrees=args.keep_worktrees,
        state_dir=args.state_dir,
        report_path=args.out,
        venv_backend=args.venv_backend,
        fail_fast=args.fail_fast,
        executor=_executor(args),
        on_event=on_event,
        resume=resume,
        reuse=reuse,
    )


async def _finished_run(finished: Any, args: argparse.Namespace) -> Report | None:
    """``run --resume`` when the plan's latest run finished: nothing runs; that run's report
    is the outcome (copied to ``--out`` if given), and its status the exit status. None when
    ``--base`` asks for another base than that run had: a new run is started."""
    import anyio

    from envelopes import NotAReport, load_report_file

    from ._fs import atomic_write

    path = finished.run_dir / "report.json"
    try:
        _, report, data = await anyio.to_thread.run_sync(load_report_file, path)
    except NotAReport as exc:
        raise OrchestratorError(
            f"run {finished.run_id} of this plan finished, but its report cannot be read "
            f"({exc}); --rerun starts a new run"
        ) from None
    if report.run_id != finished.run_id:
        raise OrchestratorError(
            f"run {finished.run_id} of this plan finished, but {path} is the report of run "
            f"{report.run_id}; --rerun starts a new run"
        )
    if args.base is not None and args.base != report.base_ref:
        # Asked for another base than that run had: not the run that finished.
        print(
            f"run {finished.run_id} of this plan started from {report.base_ref}, not "
            f"{args.base}: starting a new run",
            file=sys.stderr,
        )
        return None
    args.report_file = path  # where it is now, whatever its run_dir says (a moved repository)
    print(
        f"run {finished.run_id} of this plan already finished; nothing to resume "
        "(--rerun starts a new run)",
        file=sys.stderr,
    )
    if args.out is not None:
        await anyio.to_thread.run_sync(atomic_write, args.out.absolute(), data)
    return report


def _executor_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--executor",
        choices=["local", "dask"],
        help="where tasks run: this machine (local, the default) or a Dask cluster (dask)",
    )
    parser.add_argument(
        "--workers",
        type=_integer,
        metavar="N",
        help="with dask: start a cluster of N worker processes on this machine",
    )
    parser.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="with dask: the scheduler of an existing cluster (tcp://host:8786)",
    )


def _executor(args: argparse.Namespace) -> dict[str, Any] | None:
    """The executor the options ask for (over the plan's), or None when they ask nothing."""
    if args.executor is None and args.workers is None and args.scheduler is None:
        return None
    given: dict[str, Any] = {"kind": args.executor or "dask"}
    if args.workers is not None:
        given["workers"] = args.workers
    if args.scheduler is not None:
        given["scheduler"] = args.scheduler
    return given


async def _warn_if_dirty(loaded: Any, repo: Path | None, base: str | None) -> None:
    """One line on stderr when the repository's checkout has changes the tasks will not see.

    Two git processes (the run opens and checks the repository itself, and reports what is
    wrong with it, located): nothing is said when there is no checkout or no such base.
    """
    from envelopes import is_object_id

    from ._git import Git
    from .plan import plan_repository_path

    ref = base or loaded.plan.base
    where = plan_repository_path(loaded, repo).expanduser().absolute()
    if ref.startswith("-") or any(ord(c) < 32 for c in ref) or not where.is_dir():
        return  # the run refuses that base itself, in words
    git = Git(where)
    # (Not an option: refused above. rev-parse takes --end-of-options only with --verify.)
    found = await git.run("rev-parse", "--show-toplevel", f"{ref}^{{commit}}", check=False)
    lines = found.stdout.decode(errors="replace").splitlines()
    if found.returncode != 0 or len(lines) != 2 or not is_object_id(lines[1]):
        return  # a bare repository, none at all, a base that is no commit: the run says so
    root, commit = lines
    status = await git.run(
        "status", "--porcelain", "--untracked-files=normal", "--ignore-submodules", check=False
    )
    if status.returncode == 0 and status.stdout.strip():
        count = len(status.stdout.splitlines())
        print(
            f"warning: {root} has {count} uncommitted or untracked change(s); "
            f"the tasks start from commit {commit[:12]} and do not see them",
            file=sys.stderr,
        )


async def _resume(args: argparse.Namespace, on_event: Callable[..., Any]) -> Report:
    from .coordinator import resume_run

    return await resume_run(
        args.run_id,
        repo=args.repo,
        state_dir=args.state_dir,
        report_path=args.out,
        concurrency=args.concurrency,
        executor=_executor(args),
        on_event=on_event,
    )


async def _watch(args: argparse.Namespace, start: Callable[..., Awaitable[Report]]) -> int:
    import signal

    import anyio

    from .errors import OrchestratorError
    from .progress import Progress, SafeConsole, run_succeeded, summary_table

    out = SafeConsole(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 120)
    report: Report | None = None
    error: OrchestratorError | None = None
    began = time.monotonic()
    stopped_by: list[int] = []
    with Progress() as progress:
        async with anyio.create_task_group() as tg:
            # Ctrl-C, SIGTERM and SIGHUP stop the run: agents killed, worktrees cleaned up,
            # partial report written. Without this, agents in their own sessions would outlive
            # a terminated orchestrator. Ctrl-C is received here too rather than left to
            # KeyboardInterrupt, which asyncio turns into a cancellation of the main task that
            # a shielded step (a git command, a journal write) could absorb.
            async def stop_on_signal() -> None:
                stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
                with anyio.open_signal_receiver(*stops) as signals:
                    async for signum in signals:
                        stopped_by.append(signum)
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(stop_on_signal)
            try:
                report = await start(args, progress)
            except OrchestratorError as exc:
                error = exc  # raised below, outside the task group, so it is not wrapped
            tg.cancel_scope.cancel()
    if error is not None:
        raise error
    if report is None and stopped_by == [signal.SIGINT]:
        raise KeyboardInterrupt  # told as an interruption, exit 130 (see _drive)
    if report is None:
        name = signal.Signals(stopped_by[0]).name if stopped_by else "a signal"
        _err(
            f"stopped by {name}; running tasks were stopped and cleaned up (partial report in the run directory)"
        )
        return 128 + (stopped_by[0] if stopped_by else signal.SIGTERM)
    report_path = args.out or getattr(args, "report_file", None)
    report_path = report_path or Path(report.run_dir) / "report.json"
    page = await _html_page(report, report_path) if args.html else None
    if args.json:
        from .report import report_bytes

        sys.stdout.flush()
        sys.stdout.buffer.write(report_bytes(report))
        sys.stdout.buffer.flush()
    else:
        out.print(summary_table(report, wall_s=time.monotonic() - began))
        for record in report.merge:
            moved = (
                f" {record.old_commit[:10]} -> {record.new_commit[:10]}"
                if (record.status == "merged" and record.old_commit and record.new_commit)
                else ""
            )
            line = f"merge into {record.into}: {record.status}{moved}"
            out.print(line + (f" ({record.message})" if record.message else ""), markup=False)
            for entry in record.left_out:
                out.print(f"  left out {entry.task_id}: {entry.reason}", markup=False)
        for warning in report.warnings:
            out.print(f"warning: {warning}", markup=False, soft_wrap=True)
        out.print(f"report: {report_path}", markup=False, soft_wrap=True)
        if page is not None:
            out.print(f"page: {page}", markup=False, soft_wrap=True)
        out.print(f"verify: orchestrator verify {report_path}", markup=False, soft_wrap=True)
    # A first_success group's members that were not needed are not failures.
    merged = all(record.status == "merged" for record in report.merge)
    return EXIT_OK if run_succeeded(report) and merged else EXIT_FAILED


def cmd_runs(args: argparse.Namespace) -> int:
    """``orchestrator runs``: every run of the repository, oldest first."""
    from .repo import NotARepository
    from .runs import list_runs

    try:
        where = _state_dir(args)
    except NotARepository as exc:
        _err(str(exc))
        return EXIT_USAGE
    infos = list_runs(where)
    if args.json:
        for info in infos:
            print(json.dumps(info.to_json_dict()))
        return EXIT_OK
    if not infos:
        print(f"no runs in {where / 'runs'}")
        return EXIT_OK
    from rich.table import Table

    from .progress import SafeConsole

    table = Table(title=f"runs in {where / 'runs'}")
    for column in ("run", "state", "plan", "tasks", "started", "last activity"):
        table.add_column(column, no_wrap=True)
    for info in infos:
        done = ", ".join(f"{n} {status}" for status, n in sorted(info.counts.items()))
        total = f"{info.total_tasks}" if info.total_tasks is not None else "?"
        table.add_row(
            info.run_id,
            info.state,
            info.plan_name or "?",
            f"{total}: {done}" if done else total,
            info.started_at.strftime("%Y-%m-%d %H:%M:%S") if info.started_at else "",
            info.last_activity.strftime("%Y-%m-%d %H:%M:%S") if info.last_activity else "",
        )
    SafeConsole(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 160).print(
        table
    )
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    """``orchestrator gc``."""

    from .errors import OrchestratorError
    from .gc import collect_garbage, parse_age
    from .repo import NotARepository, Repository

    try:
        age = parse_age(args.older_than)
    except ValueError as exc:
        _err(f"--older-than: {exc}")
        return EXIT_USAGE

    async def gc() -> Any:
        repo = await Repository.open(args.repo or Path.cwd(), state_dir=args.state_dir)
        try:
            return await collect_garbage(
                repo, older_than=age, branches=args.branches, dry_run=args.dry_run
            )
        finally:
            repo.lock.close()

    try:
        outcome = _run_async(gc)
    except NotARepository as exc:
        _err(str(exc))
        return EXIT_USAGE
    except OrchestratorError as exc:
        _err(str(exc))
        return EXIT_FAILED
    from .progress import printable

    # Process tags, branch names and paths: an agent may have chosen them.
    for line in outcome.kept:
        print(printable(f"kept: {line}"))
    for line in outcome.done:
        print(printable(line))
    return EXIT_OK


def cmd_cache(args: argparse.Namespace) -> int:
    """``orchestrator cache ls | clear``."""
    from .cache import clear_cache, list_cache

    try:
        where = _state_dir(args)
    except OrchestratorError as exc:
        _err(str(exc))
        return EXIT_USAGE
    if args.action == "clear":
        print(f"removed {clear_cache(where)} cache entries from {where / 'cache'}")
        return EXIT_OK
    entries = list_cache(where)
    if args.json:
        for e in entries:
            print(
                json.dumps(
                    {
                        "key": e.key,
                        "task_id": e.task_id,
                        "run_id": e.run_id,
                        "created_at": e.created_at,
                        "result_commit": e.result_commit,
                        "branch": e.branch,
                    }
                )
            )
        return EXIT_OK
    for e in entries:
        commit = (e.result_commit or "-")[:10]
        print(f"{e.key[:16]}  {e.created_at[:19]}  {e.task_id}  run {e.run_id}  {commit}")
    print(f"{len(entries)} entries in {where / 'cache'}")
    return EXIT_OK


def _state_dir(args: argparse.Namespace) -> Path:
    """The state directory named by --state-dir, else the repository's (--repo or the cwd's)."""

    from .repo import Repository

    if args.state_dir is not None and args.repo is None:
        return Path(args.state_dir).absolute()

    async def find() -> Path:
        repo = await Repository.open(args.repo or Path.cwd(), state_dir=args.state_dir)
        repo.lock.close()
        return repo.state_dir

    return _run_async(find)


def cmd_validate(args: argparse.Namespace) -> int:
    """``orchestrator validate``: the plan checks of ``run``, without running anything."""

    from envelopes import expand_tasks

    from .errors import PlanError
    from .plan import check_plan_repository, load_plan, missing_programs
    from .progress import printable
    from .workspace import missing_copies

    async def check() -> str:
        loaded = load_plan(args.plan)
        repo, commit, _ = await check_plan_repository(loaded, repo_override=args.repo)
        where = f"{repo.root} at {commit[:12]}" if repo and commit else "no repository"
        warnings = missing_programs(loaded)
        if repo is not None:
            warnings += missing_copies(repo.root, loaded.plan.copy_paths)
        for warning in warnings:
            print(printable(f"{args.plan}: warning: {warning}"), file=sys.stderr)
        expanded = expand_tasks(loaded.plan)
        members = [t.task_id for t in expanded if t.group is not None]
        listed = f" ({len(members)} matrix members: {', '.join(members)})" if members else ""
        return (
            f"{args.plan}: OK, {len(expanded)} tasks{listed}, "
            f"{len(loaded.plan.agents)} agents, {where}"
        )

    try:
        print(_run_async(check))
    except PlanError as exc:
        _issues(exc.issues)
        return EXIT_USAGE
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """``orchestrator verify``: exit 0 all held, 1 a finding, 2 bad input."""

    from .audit.cli import attestation_lines
    from .errors import AttestationError, ReportUnreadable
    from .verify import verify_report

    if (args.attestations is None) != (args.key is None):
        _err("--attestations and --key go together")
        return EXIT_USAGE
    try:
        outcome = _run_async(
            lambda: verify_report(args.report, repo=args.repo, run_dir=args.run_dir)
        )
        attested = attestation_lines(outcome, args.report, args.attestations, args.key)
    except (ReportUnreadable, AttestationError) as exc:
        _err(str(exc))
        return EXIT_USAGE
    lines = [str(finding) for finding in outcome.findings] + (attested or [])
    if not lines:
        n = len(outcome.report.results)
        also = f", attestations checked in {args.attestations}" if attested is not None else ""
        print(
            f"{args.report}: OK ({n} results, {outcome.checked_commits} commits checked, every digest recomputed{also})"
        )
        return EXIT_OK
    from .progress import printable

    for line in lines:
        print(printable(f"{args.report}: {line}"))  # a report's text is someone else's
    print(f"{len(lines)} finding(s)", file=sys.stderr)
    return EXIT_FAILED


def cmd_merge(args: argparse.Namespace) -> int:
    """``orchestrator merge``: exit 0 merged (or a clean dry run), 1 not merged, 2 bad input."""

    from .errors import MergeError, OrchestratorError, ReportUnreadable

    try:
        return _run_async(_merge, args)
    except (ReportUnreadable, MergeError) as exc:
        _err(str(exc))
        return EXIT_USAGE
    except OrchestratorError as exc:
        _err(str(exc))
        return EXIT_FAILED


async def _merge(args: argparse.Namespace) -> int:
    import anyio

    from envelopes import NotAReport, load_report_json

    from .errors import ReportUnreadable
    from .mergeback import open_merge_repository

    try:
        _, first = await anyio.to_thread.run_sync(load_report_json, args.report)
    except NotAReport as exc:
        raise ReportUnreadable(str(exc)) from exc
    repository = await open_merge_repository(first, args.repo)
    try:
        return await _merge_into(args, first, repository)
    finally:
        repository.lock.close()


async def _merge_into(args: argparse.Namespace, first: Any, repository: Any) -> int:
    from rich.table import Table
    from rich.text import Text

    from .errors import MergeError, OrchestratorError
    from .mergeback import record_merge
    from .progress import SafeConsole
    from .verify import verify_report

    # The report says which commits to merge: one that does not verify is not trusted.
    outcome = await verify_report(args.report, repo=repository, files=False)
    # A branch deleted or moved since is checked for the tasks merged, with a way to repair it.
    if findings := [f for f in outcome.findings if f.field != "branch"]:
        raise MergeError(
            f"{args.report}: {findings[0]}; a report that does not verify is not "
            f"merged (see orchestrator verify {args.report})"
        )
    report = outcome.report
    if report.report_sha256 != first.report_sha256:
        raise MergeError(f"{args.report} changed while it was read; not merged")
    record = await _merge_checked(args, report, repository)
    out = SafeConsole(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 120)
    _print_checks(out, record)
    if record.conflicts:
        out.print(f"conflicts merging into {record.into}:", markup=False, soft_wrap=True)
        conflicts = Table()
        for column in ("left", "right", "paths"):
            conflicts.add_column(column, overflow="fold")
        for conflict in record.conflicts:
            conflicts.add_row(
                Text(conflict.left), Text(conflict.right), Text("\n".join(conflict.paths))
            )
        out.print(conflicts)
    else:
        out.print("no conflicts predicted")
    if record.status == "merged":
        merged = Table()
        for column in ("task", "result", "merge commit"):
            merged.add_column(column, no_wrap=True)
        for task in record.tasks:
            made = task.merge_commit or f"none: already in {record.into}"
            merged.add_row(Text(task.task_id), task.result_commit, Text(made))
        out.print(merged)
    if record.status in ("merged", "skipped"):
        out.print(record.message, markup=False, soft_wrap=True)
    else:
        _err(record.message)
    # A checked merge that failed its checks is recorded too: its logs are in the run directory.
    if record.status == "merged" or (record.status == "check_failed" and not args.dry_run):
        try:
            await record_merge(args.report, record, repo=repository)
        except OrchestratorError as exc:
            _err(f"not recorded in {args.report}: {exc}")
            return EXIT_FAILED
        out.print(f"recorded in {args.report}", markup=False, soft_wrap=True)
    elif args.dry_run:
        out.print(f"dry run: nothing recorded in {args.report}", markup=False, soft_wrap=True)
    return EXIT_OK if record.status in ("merged", "skipped") else EXIT_FAILED


async def _merge_checked(args: argparse.Namespace, report: Report, repository: Any) -> Any:
    """``merge_results`` as the arguments ask: checked (``--check``, ``--train``) with the
    run's own directory in the repository and a lifeline that ends the checks if this
    process dies, or not."""
    from .lifeline import Lifeline
    from .mergeback import merge_results
    from .mergecheck import MergeCheckSettings, merge_run_dir

    options = {"into": args.into, "tasks": args.tasks, "repo": repository, "dry_run": args.dry_run}
    if not (args.check or args.train):
        return await merge_results(report, **options)
    lifeline = Lifeline()
    try:
        check = MergeCheckSettings(
            run_dir=merge_run_dir(report, repository),
            train=args.train,
            lifeline=lifeline,
        )
        return await merge_results(report, **options, check=check)
    finally:
        lifeline.close()


def _print_checks(out: Any, record: Any) -> None:
    """What a checked merge checked (one line per combined tree) and left out (one line each)."""
    from .mergecheck import failed_steps

    kept = [record.into]  # a train's tree: the target and the results kept so far
    for check in record.checks:
        tree = " + ".join([*kept, check.task_id]) if check.task_id else "the combined tree"
        if check.task_id and check.passed:
            kept.append(check.task_id)
        outcome = "passed" if check.passed else failed_steps(check) + " failed"
        steps = len(check.checks)
        out.print(
            f"checked {tree} ({check.commit[:12]}, {steps} step(s)): {outcome}",
            markup=False,
            soft_wrap=True,
        )
    for entry in record.left_out:
        out.print(f"left out {entry.task_id}: {entry.reason}", markup=False, soft_wrap=True)


def cmd_schema(args: argparse.Namespace) -> int:
    """``orchestrator schema``."""
    from envelopes import json_schemas

    schemas: dict[str, Any] = json_schemas()
    print(json.dumps(schemas[args.document] if args.document else schemas, indent=2))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """``orchestrator serve`` (orchestrator/resident.py, orchestrator/server.py)."""
    from .errors import ServerError
    from .resident import find_server, stop_server
    from .server import serve, serve_detached

    if args.idle_timeout is not None and not 0 <= args.idle_timeout < 1e9:
        _err("--idle-timeout: must be 0 or more seconds")
        return EXIT_USAGE
    try:
        if args.stop:
            pid = stop_server()
            print(f"stopped the resident process {pid}" if pid else "no resident process")
            return EXIT_OK
        if args.status:
            pid = find_server()
            print(f"a resident process is listening (pid {pid})" if pid else "no resident process")
            return EXIT_OK if pid else EXIT_FAILED
        if args.detach:
            print(f"a resident process is listening (pid {serve_detached(args.idle_timeout)})")
            return EXIT_OK
        return serve(idle_timeout=args.idle_timeout)
    except ServerError as exc:
        _err(str(exc))
        return EXIT_FAILED


async def _html_page(report: Report, report_path: Path) -> Path | None:
    """``run --html``: the page beside the report (None, said on stderr, when it cannot be
    written: the run and its report stand)."""
    from .audit.cli import write_html_page

    page = report_path.with_name("report.html")
    try:
        await write_html_page(report_path, page, repo=Path(report.repo) if report.repo else None)
    except (OrchestratorError, OSError) as exc:
        _err(f"--html: cannot write {page}: {getattr(exc, 'strerror', None) or exc}")
        return None
    return page


def cmd_report(args: argparse.Namespace) -> int:
    """``orchestrator report`` (see orchestrator/audit/cli.py)."""
    from .audit.cli import cmd_report as command

    return command(args)


def cmd_keygen(args: argparse.Namespace) -> int:
    """``orchestrator keygen`` (see orchestrator/audit/cli.py)."""
    from .audit.cli import cmd_keygen as command

    return command(args)


def cmd_attest(args: argparse.Namespace) -> int:
    """``orchestrator attest`` (see orchestrator/audit/cli.py)."""
    from .audit.cli import cmd_attest as command

    return command(args)


COMMANDS = {
    "resume": cmd_resume,
    "gc": cmd_gc,
    "cache": cmd_cache,
    "runs": cmd_runs,
    "run": cmd_run,
    "validate": cmd_validate,
    "verify": cmd_verify,
    "report": cmd_report,
    "keygen": cmd_keygen,
    "attest": cmd_attest,
    "merge": cmd_merge,
    "schema": cmd_schema,
    "serve": cmd_serve,
}


#: The modules each command spends its start importing (run: the engine, pydantic's models,
#: the progress display), imported up front by :func:`entry` (:func:`preload`).
PRELOADED = {
    "run": (".coordinator", ".plan", ".progress"),
    "resume": (".coordinator", ".plan", ".progress"),
    "validate": (".plan", ".progress", ".workspace"),
    "verify": (".verify", ".progress"),
    "merge": (".mergeback", ".mergecheck", ".verify", ".progress"),
}


def preload(command: str) -> None:
    """Import the modules *command* needs with the garbage collector off, then freeze what
    they made (``gc.freeze``): the process's own, not a library's caller's, policy.

    Importing a run's modules makes some 70,000 objects (classes, pydantic's schemas and
    validators, compiled patterns) that live as long as the process. The collections that
    walked them as they were made, and again in each full collection of the run, took
    about 50 ms of a 16-task run's CPU (the peer benchmark's); about 9 ms once they are
    frozen (docs/benchmarks.md). What is garbage at that moment (the argument parser, some
    2,000 objects, none holding a file or a process) stays, frozen with the rest: collecting
    it first would cost what freezing saves.
    """
    import gc
    import importlib

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for name in PRELOADED.get(command, ()):
            importlib.import_module(name, __package__)
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``orchestrator`` console script."""
    return dispatch(build_parser().parse_args(argv))


def dispatch(args: argparse.Namespace) -> int:
    """The command *args* names, run: its exit status."""
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:
        return EXIT_FAILED


def entry(argv: Sequence[str] | None = None) -> NoReturn:
    """The process's entry (the console script, ``python -m orchestrator``): the command,
    as :func:`main` runs it, then the exit.

    Before the command, the modules it needs are imported and frozen (:func:`preload`).
    The interpreter's own exit tears down every module and object, 0.1 to 0.2 s here after
    a run (a tenth of a small plan's whole time) that no finished command needs. So once the
    command has returned and no other thread is left, the atexit handlers run, stdout and
    stderr are flushed, and the process ends at once with the command's status. Threads
    still finishing (anyio's workers, told to stop when the run ended) get a moment; a
    thread still at work then takes the usual exit, which waits for it.
    """
    import atexit
    import os
    import threading

    args = build_parser().parse_args(argv)
    try:
        preload(args.command)
    except KeyboardInterrupt:  # Ctrl-C before anything started: nothing to clean up
        _err("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    code = dispatch(args)
    if not _threads_done(threading.main_thread(), within=0.1):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: the descriptor was closed before Python started
                stream.flush()
        except (OSError, ValueError):  # a reader gone (a closed pipe), a stream closed
            code = code or EXIT_FAILED
    os._exit(code)


def _threads_done(main_thread: Any, *, within: float) -> bool:
    """Whether every thread but *main_thread* that the usual exit would wait for (not a
    daemon) has ended, waiting for them *within* seconds in all."""
    import threading

    deadline = time.monotonic() + within
    for thread in threading.enumerate():
        if thread is not main_thread and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                return False
    return True


if __name__ == "__main__":
    entry()
