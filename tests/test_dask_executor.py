"""The dask executor, with real clusters: an embedded LocalCluster, and a real ``dask
scheduler`` with ``dask worker`` processes started here on 127.0.0.1.

Workers see nothing of the coordinator's disk: every worker's local directory and working
directory is outside the repository and the plan's directory, and a test checks that no
path of either travels in what is submitted to Dask.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

distributed = pytest.importorskip("distributed")

from envelopes import Report  # noqa: E402
from orchestrator import DaskExecutor, orchestrate_parallel, verify_report  # noqa: E402
from orchestrator.errors import ExecutorError  # noqa: E402
from orchestrator.plan import load_plan  # noqa: E402

from .conftest import MakeRepo, git  # noqa: E402

pytestmark = pytest.mark.slow

#: The agent: ``write``, ``sleep N`` (its pid left in $PIDS first; only the first time the
#: task runs), ``fail``; every run counted in $PIDS/<task>.runs.
AGENT = r"""
import json, os, pathlib, sys, time
task = os.environ["ORCHESTRATOR_TASK_ID"]
envelope = json.loads(pathlib.Path(os.environ["ORCHESTRATOR_ENVELOPE"]).read_text())
words = envelope["task"].split()
pids = pathlib.Path(os.environ["PIDS"])
runs = pids / f"{task}.runs"
again = runs.exists()
with open(runs, "a") as f:
    f.write(f"{os.getpid()}\n")
if words[0] == "sleep" and not again:  # run again (a lost worker, a resume): at once
    (pids / f"{task}.pid").write_text(str(os.getpid()))
    time.sleep(float(words[1]))
if words[0] == "fail":
    print("failing on purpose", file=sys.stderr)
    sys.exit(3)
name = task.replace("[", "_").replace("]", "").replace(",", "_")
pathlib.Path(f"{name}.txt").write_text(f"made by {task}\n")
print("done", task)
"""


#: An agent whose tasks each hold one ``gpu`` on their worker.
GPU_AGENT = {"gpu": {"command": ["python", "{plan_dir}/agent.py"], "resources": {"gpu": 1}}}


def write_plan(
    root: Path,
    repo: Path,
    tasks: list[dict[str, Any]],
    agents: dict[str, Any] | None = None,
    **top: Any,
) -> tuple[Path, Path]:
    """A plan directory with the agent script and a plan of *tasks* (agent ``a`` runs the
    script; *agents* adds others); (plan file, pids dir)."""
    plan_dir = root / "plan"
    plan_dir.mkdir(exist_ok=True)
    (plan_dir / "agent.py").write_text(AGENT)
    pids = root / "pids"
    pids.mkdir(exist_ok=True)
    plan = {
        "name": "dask",
        "repo": str(repo),
        "concurrency": 4,
        "defaults": {"venv": False, "env": {"PIDS": str(pids)}},
        "agents": {"a": {"command": ["python", "{plan_dir}/agent.py"]}, **(agents or {})},
        "tasks": tasks,
        **top,
    }
    path = plan_dir / "plan.json"
    path.write_text(json.dumps(plan))
    return path, pids


class Cluster:
    """A real ``dask scheduler`` and ``dask worker`` processes (no nanny) on 127.0.0.1, each
    in a directory of its own under *root*."""

    def __init__(self, root: Path, workers: int = 2, threads: int = 2) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "DASK_TEMPORARY_DIRECTORY": str(root / "tmp"),
            "DASK_LOGGING__DISTRIBUTED": "error",
        }
        file = root / "scheduler.json"
        self.scheduler = self._start(
            "sched",
            "distributed.cli.dask_scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--dashboard-address",
            "127.0.0.1:0",
            "--scheduler-file",
            str(file),
        )
        deadline = time.monotonic() + 60
        while not file.exists() or not file.read_text().strip():
            assert time.monotonic() < deadline, "the scheduler did not start"
            time.sleep(0.05)
        self.address: str = json.loads(file.read_text())["address"]
        self.workers: list[subprocess.Popen[bytes]] = []
        for i in range(workers):
            self.add_worker(f"w{i}", threads)
        self.wait_for(workers)

    def _start(self, name: str, module: str, *args: str) -> subprocess.Popen[bytes]:
        where = self.root / name
        where.mkdir(exist_ok=True)
        with open(where / "log", "wb") as log:
            return subprocess.Popen(
                [sys.executable, "-m", module, *args],
                cwd=where,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )

    def add_worker(self, name: str, threads: int) -> None:
        self.workers.append(
            self._start(
                name,
                "distributed.cli.dask_worker",
                self.address,
                "--no-nanny",
                "--nthreads",
                str(threads),
                "--host",
                "127.0.0.1",
                "--no-dashboard",
                "--local-directory",
                str(self.root / name / "local"),
            )
        )

    def wait_for(self, count: int) -> None:
        with distributed.Client(self.address, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(count, timeout=60)

    def close(self) -> None:
        for process in [*self.workers, self.scheduler]:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    started = Cluster(tmp_path_factory.mktemp("cluster"))
    yield started
    started.close()


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[Cluster]:
    started = Cluster(tmp_path / "cluster")
    yield started
    started.close()


def run(plan: Path | Any, backend: str = "asyncio", **options: Any) -> Report:
    async def go() -> Report:
        return await orchestrate_parallel(
            load_plan(plan) if isinstance(plan, Path) else plan, **options
        )

    return anyio.run(go, backend=backend)


def trees(report: Report) -> dict[str, str | None]:
    return {r.task_id: r.provenance.result_tree for r in report.results}


def diamond() -> list[dict[str, Any]]:
    return [
        {"id": "top", "agent": "a", "task": "write"},
        {"id": "left", "agent": "a", "task": "write", "depends_on": ["top"]},
        {"id": "right", "agent": "a", "task": "write", "depends_on": ["top"]},
        {"id": "bottom", "agent": "a", "task": "write", "depends_on": ["left", "right"]},
        {"id": "grid", "agent": "a", "task": "write", "matrix": {"inputs.n": [1, 2, 3]}},
        {"id": "broken", "agent": "a", "task": "fail"},
    ]


# -- a real scheduler and workers ---------------------------------------------------------


def test_a_plan_runs_on_a_real_cluster_and_its_report_verifies(
    cluster: Cluster, make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    plan, _ = write_plan(tmp_path, repo, diamond())
    remote = run(plan, executor={"kind": "dask", "scheduler": cluster.address})
    by_id = {r.task_id: r for r in remote.results}
    assert by_id["broken"].status == "failed" and by_id["broken"].error is not None
    assert by_id["broken"].error.kind == "exit_code"
    assert all(r.status == "succeeded" for t, r in by_id.items() if t != "broken"), remote.errors
    assert len(by_id) == 8
    # Every result names the worker that ran it; the journal does too.
    workers = {a.worker for r in remote.results for a in r.attempt_log}
    assert workers and all(w and w.startswith("tcp://127.0.0.1:") for w in workers)
    journal = Path(remote.run_dir, "journal.jsonl").read_text().splitlines()
    dispatches = [json.loads(line) for line in journal if '"dispatch"' in line]
    assert {d["task"] for d in dispatches} == set(by_id)
    # Branches are here, with the worker's commits; verify passes on the report as it is.
    for result in remote.results:
        if result.branch is not None:
            assert git(repo, "rev-parse", result.branch) == result.provenance.result_commit
    outcome = anyio.run(verify_report, Path(remote.run_dir) / "report.json")
    assert outcome.ok, outcome.problems
    assert "made by bottom" in git(repo, "show", f"{by_id['bottom'].branch}:bottom.txt")
    assert git(repo, "show", f"{by_id['bottom'].branch}:top.txt")  # from upstream
    # A local run of the same plan makes the same trees.
    local = run(plan)
    assert trees(local) == trees(remote)


def test_both_event_loops(cluster: Cluster, make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = make_repo()
    plan, _ = write_plan(
        tmp_path,
        repo,
        [
            {"id": "one", "agent": "a", "task": "write"},
            {"id": "two", "agent": "a", "task": "write", "depends_on": ["one"]},
        ],
    )
    reports = [
        run(plan, backend, executor=DaskExecutor(scheduler=cluster.address))
        for backend in ("asyncio", "trio")
    ]
    for report in reports:
        assert report.summary.successful == 2, report.errors
    assert trees(reports[0]) == trees(reports[1])


def test_cancelling_the_run_stops_every_remote_agent(
    cluster: Cluster, make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    tasks = [{"id": f"s{i}", "agent": "a", "task": "sleep 60"} for i in range(3)]
    plan, pids = write_plan(tmp_path, repo, tasks)
    seen: list[int] = []

    async def go() -> None:
        with anyio.move_on_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    lambda: orchestrate_parallel(
                        load_plan(plan),
                        executor={"kind": "dask", "scheduler": cluster.address},
                        kill_grace=1.0,
                    )
                )
                while len(list(pids.glob("*.pid"))) < 3:  # noqa: ASYNC110 (another process)
                    await anyio.sleep(0.05)
                seen.extend(int(p.read_text()) for p in pids.glob("*.pid"))
                tg.cancel_scope.cancel()

    anyio.run(go)
    assert len(seen) == 3
    deadline = time.monotonic() + 1.0 + 5
    while any(_alive(pid) for pid in seen) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in seen if _alive(pid)]
    runs = sorted((repo / ".git" / "orchestrator" / "runs").iterdir())
    report = json.loads((runs[-1] / "report.json").read_text())
    assert {r["status"] for r in report["results"]} == {"cancelled"}


def test_a_task_needing_a_resource_no_worker_has_fails_after_the_wait(
    cluster: Cluster, make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    plan, _ = write_plan(
        tmp_path, repo, [{"id": "g", "agent": "gpu", "task": "write"}], agents=GPU_AGENT
    )
    report = run(
        plan,
        executor={"kind": "dask", "scheduler": cluster.address, "placement_timeout": 0.5},
    )
    (result,) = report.results
    assert result.status == "failed" and result.error is not None
    assert result.error.kind == "placement"
    assert "gpu=1" in result.error.message


def test_a_worker_without_the_agents_program_fails_the_task_saying_so(
    cluster: Cluster, make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    missing = {"missing": {"command": ["no-such-agent-program-7f3a"]}}
    plan, _ = write_plan(
        tmp_path, repo, [{"id": "x", "agent": "missing", "task": "write"}], agents=missing
    )
    report = run(plan, executor={"kind": "dask", "scheduler": cluster.address})
    (result,) = report.results
    assert result.error is not None and result.error.kind == "spawn"
    assert "no-such-agent-program-7f3a" in result.error.message
    assert "tcp://127.0.0.1:" in result.error.message


def test_no_scheduler_at_the_address_is_a_clear_error_and_leaves_no_run(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    plan, _ = write_plan(tmp_path, repo, [{"id": "x", "agent": "a", "task": "write"}])
    with pytest.raises(ExecutorError, match=r"no Dask scheduler answered at tcp://127\.0\.0\.1:9"):
        run(plan, executor={"kind": "dask", "scheduler": "tcp://127.0.0.1:9", "connect_timeout": 1})
    assert not list((repo / ".git" / "orchestrator" / "runs").glob("*"))


def test_a_worker_killed_mid_task_is_an_attempt_and_the_task_finishes_elsewhere(
    own_cluster: Cluster, make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    plan, pids = write_plan(tmp_path, repo, [{"id": "slow", "agent": "a", "task": "sleep 3"}])

    async def go() -> Report:
        async with anyio.create_task_group() as tg:
            report: list[Report] = []

            async def start() -> None:
                report.append(
                    await orchestrate_parallel(
                        load_plan(plan), executor={"kind": "dask", "scheduler": own_cluster.address}
                    )
                )

            tg.start_soon(start)
            pid_file = pids / "slow.pid"
            while not pid_file.exists():  # noqa: ASYNC110 (written by another process)
                await anyio.sleep(0.05)
            agent = int(pid_file.read_text())
            pid_file.unlink()
            worker = _worker_of(agent, own_cluster)
            os.kill(worker.pid, signal.SIGKILL)
            killed.append(agent)
        return report[0]

    killed: list[int] = []
    report = anyio.run(go)
    (result,) = report.results
    assert result.status == "succeeded", report.errors
    # The lost worker's agent died with it (its lifeline killed its process group).
    deadline = time.monotonic() + 10
    while _alive(killed[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(killed[0])
    first, second = result.attempt_log
    assert first.status == "failed" and first.error is not None
    assert first.error.kind == "worker_lost"
    assert first.worker != second.worker and second.status == "succeeded"
    assert (pids / "slow.runs").read_text().count("\n") == 2
    assert anyio.run(verify_report, Path(report.run_dir) / "report.json").ok


def test_a_coordinator_killed_mid_run_resumes_on_the_cluster_losing_nothing(
    own_cluster: Cluster, make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    tasks = [
        {"id": "quick1", "agent": "a", "task": "write"},
        {"id": "quick2", "agent": "a", "task": "write"},
        {"id": "slow", "agent": "a", "task": "sleep 60"},
        {"id": "after", "agent": "a", "task": "write", "depends_on": ["quick1"]},
    ]
    plan, pids = write_plan(tmp_path, repo, tasks, concurrency=3)
    command = [sys.executable, "-m", "orchestrator", "run", str(plan), "--scheduler"]
    coordinator = subprocess.Popen(
        [*command, own_cluster.address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    runs = repo / ".git" / "orchestrator" / "runs"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        journals = list(runs.glob("*/journal.jsonl"))
        text = journals[0].read_text() if journals else ""
        finished = text.count('"final":true')
        if finished >= 3 and (pids / "slow.pid").exists():
            break
        time.sleep(0.05)
    else:
        pytest.fail("the run did not get far enough")
    slow_agent = int((pids / "slow.pid").read_text())
    os.kill(coordinator.pid, signal.SIGKILL)
    coordinator.wait()
    run_id = journals[0].parent.name
    # The dead run's remote agent is stopped once the scheduler lets go of its task (its
    # client is gone), before anyone resumes.
    deadline = time.monotonic() + 30
    while _alive(slow_agent) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(slow_agent)
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "resume",
            run_id,
            "--repo",
            str(repo),
            "--scheduler",
            own_cluster.address,
            "--json",
        ],
        capture_output=True,
        timeout=300,
        env={**os.environ},
        input=None,
    )
    assert not _alive(slow_agent)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    report = json.loads(resumed.stdout)
    statuses = {r["task_id"]: r["status"] for r in report["results"]}
    assert statuses["slow"] == "succeeded"
    assert (pids / "slow.runs").read_text().count("\n") == 2
    # What was fetched was kept, not run again.
    for task in ("quick1", "quick2", "after"):
        assert (pids / f"{task}.runs").read_text().count("\n") == 1, task
    assert anyio.run(verify_report, Path(report["run_dir"]) / "report.json").ok


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _worker_of(pid: int, cluster: Cluster) -> subprocess.Popen[bytes]:
    """The worker process whose descendant *pid* is."""
    parents = {p.pid for p in psutil.Process(pid).parents()}
    for worker in cluster.workers:
        if worker.pid in parents:
            return worker
    raise AssertionError(f"no worker runs {pid}")


# -- an embedded cluster ------------------------------------------------------------------


def test_nothing_of_the_coordinators_disk_travels_to_the_workers(
    make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo()
    tasks = [
        {
            "id": "one",
            "agent": "a",
            "task": "write",
            "checks": [{"name": "check", "run": "python {plan_dir}/check.py"}],
        },
        {"id": "two", "agent": "a", "task": "write", "depends_on": ["one"]},
    ]
    plan, _ = write_plan(tmp_path, repo, tasks)
    (plan.parent / "check.py").write_text("print('checked')\n")
    sent: list[bytes] = []
    submit, scatter = distributed.Client.submit, distributed.Client.scatter

    def record(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        import cloudpickle

        sent.append(cloudpickle.dumps((args, kwargs)))

    def recording_submit(self: Any, *args: Any, **kwargs: Any) -> Any:
        record(args, kwargs)
        return submit(self, *args, **kwargs)

    def recording_scatter(self: Any, *args: Any, **kwargs: Any) -> Any:
        record(args, kwargs)
        return scatter(self, *args, **kwargs)

    # A secret of this machine's environment that the plan does not pass to an agent.
    monkeypatch.setenv("COORDINATOR_ONLY_TOKEN", "tok-5f0c9e1d7a3b")
    monkeypatch.setattr(distributed.Client, "submit", recording_submit)
    monkeypatch.setattr(distributed.Client, "scatter", recording_scatter)
    report = run(plan, executor={"kind": "dask", "workers": 2, "slots": 2})
    assert report.summary.successful == 2, report.errors
    assert report.results[0].checks and report.results[0].checks[0].passed
    assert len(sent) >= 2
    for blob in sent:
        # (The plan's own env holds a path of this machine, $PIDS, which the plan passes.)
        for path in (repo, plan.parent, repo / ".git" / "orchestrator"):
            assert str(path).encode() not in blob
        assert b"tok-5f0c9e1d7a3b" not in blob
    assert anyio.run(verify_report, Path(report.run_dir) / "report.json").ok


def test_resources_bound_how_many_run_on_each_worker(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = make_repo()
    tasks = [{"id": f"g{i}", "agent": "gpu", "task": "sleep 0.5"} for i in range(4)]
    plan, _ = write_plan(tmp_path, repo, tasks, agents=GPU_AGENT)
    report = run(
        plan,
        executor={"kind": "dask", "workers": 2, "slots": 2, "resources": {"gpu": 1}},
    )
    assert report.summary.successful == 4, report.errors
    spans = [(r.timings.started_at, r.timings.finished_at) for r in report.results]
    busiest = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert busiest <= 2
    per_worker: dict[str | None, int] = {}
    for r in report.results:
        per_worker[r.attempt_log[-1].worker] = per_worker.get(r.attempt_log[-1].worker, 0) + 1
    assert len(per_worker) == 2


def test_the_plan_and_the_cli_choose_the_executor(make_repo: MakeRepo, tmp_path: Path) -> None:
    from orchestrator.settings import resolve_settings

    repo = make_repo()
    plan, _ = write_plan(
        tmp_path,
        repo,
        [{"id": "x", "agent": "a", "task": "write"}],
        executor={"kind": "dask", "workers": 3},
    )
    loaded = load_plan(plan)
    settings = resolve_settings(loaded.plan, {})
    assert settings.executor_spec.kind == "dask" and settings.executor_spec.workers == 3
    over = resolve_settings(loaded.plan, {"executor": {"kind": "dask", "scheduler": "tcp://h:1"}})
    assert over.executor_spec.scheduler == "tcp://h:1" and over.executor_spec.workers is None
    assert over.journal_form()["executor"] == {"kind": "dask", "scheduler": "tcp://h:1"}
    assert pickle.loads(pickle.dumps(over)).executor_spec == over.executor_spec


def test_a_worker_of_another_version_or_without_git_is_refused() -> None:
    from orchestrator import __version__
    from orchestrator.dask_executor import unfit

    assert unfit("tcp://w:1", {"version": __version__, "git": "/usr/bin/git"}) is None
    why = unfit("tcp://w:1", {"version": "0.0.1", "git": "/usr/bin/git"})
    assert why == (
        f"worker tcp://w:1 runs worktree-orchestrator 0.0.1, this coordinator {__version__}: "
        "install the same version on both"
    )
    assert unfit("tcp://w:1", {"version": __version__, "git": None}) == (
        "worker tcp://w:1 has no git on its PATH"
    )


def test_a_timeout_is_enforced_on_the_worker(
    cluster: Cluster, make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo()
    plan, pids = write_plan(
        tmp_path, repo, [{"id": "late", "agent": "a", "task": "sleep 60", "timeout": 1}]
    )
    report = run(plan, executor={"kind": "dask", "scheduler": cluster.address}, kill_grace=0.5)
    (result,) = report.results
    assert result.status == "timed_out" and result.error is not None
    assert result.error.kind == "timeout"
    assert not _alive(int((pids / "late.pid").read_text()))
    assert anyio.run(verify_report, Path(report.run_dir) / "report.json").ok


def test_the_base_goes_to_a_worker_once(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = make_repo(50)
    tasks = [{"id": f"t{i}", "agent": "a", "task": "write"} for i in range(4)]
    plan, _ = write_plan(tmp_path, repo, tasks)
    bundles: list[int] = []

    class Counting(DaskExecutor):
        def bind(self, ctx: Any) -> Any:
            run = super().bind(ctx)
            submit = run._submit

            def counted(job: Any, address: str, scatter: bool) -> Any:
                bundles.append(len(job.bundle or b""))
                return submit(job, address, scatter)

            run._submit = counted
            return run

    report = run(plan, executor=Counting(workers=1, slots=2))
    assert report.summary.successful == 4, report.errors
    assert len(bundles) == 4 and sum(1 for size in bundles if size) == 1


def test_a_remote_tasks_phases_are_told_as_they_happen_once(
    cluster: Cluster, make_repo: MakeRepo, tmp_path: Path
) -> None:
    from envelopes import Event, TaskFinished, TaskPhase

    repo = make_repo()
    task = {
        "id": "slow",
        "agent": "a",
        "task": "sleep 3",
        "setup": [{"name": "prep", "run": "true"}],
        "checks": [{"name": "ok", "run": "true"}],
    }
    plan, _ = write_plan(tmp_path, repo, [task])
    seen: list[tuple[float, Event]] = []
    report = run(
        plan,
        executor={"kind": "dask", "scheduler": cluster.address},
        on_event=lambda e: seen.append((time.monotonic(), e)),
    )
    assert report.summary.successful == 1, report.errors
    phases = [(t, e.phase) for t, e in seen if isinstance(e, TaskPhase)]
    assert [p for _, p in phases] == ["setup", "agent", "checks"]  # each once, in order
    finished = next(t for t, e in seen if isinstance(e, TaskFinished))
    agent_told = next(t for t, p in phases if p == "agent")
    assert finished - agent_told > 1.5  # told while the agent ran, not when it came back


def test_a_sparse_plan_runs_on_the_cluster_as_it_does_here(
    cluster: Cluster, make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo = make_repo(extra={"docs/guide.md": "guide\n", "lib/deep/x.py": "x = 1\n"})
    tasks = [
        {"id": "top", "agent": "a", "task": "write"},
        {"id": "bottom", "agent": "a", "task": "write", "depends_on": ["top"]},
    ]
    defaults = {"venv": False, "env": {"PIDS": str(tmp_path / "pids")}, "sparse": ["lib"]}
    plan, _ = write_plan(tmp_path, repo, tasks, defaults=defaults)
    remote = run(plan, executor={"kind": "dask", "scheduler": cluster.address})
    assert all(r.status == "succeeded" for r in remote.results), remote.errors
    assert all(r.provenance.sparse == ["lib"] for r in remote.results)
    outcome = anyio.run(verify_report, Path(remote.run_dir) / "report.json")
    assert outcome.ok, outcome.problems
    # The commits hold the whole tree, as a local run's do.
    bottom = next(r for r in remote.results if r.task_id == "bottom")
    assert git(repo, "show", f"{bottom.branch}:docs/guide.md") == "guide"
    assert trees(run(plan)) == trees(remote)
