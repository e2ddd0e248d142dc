"""The worker's side of the dask executor: a job's cancel flag, the worker plugin that stops
a job its scheduler let go of, and what a worker says of itself. A whole job on a real
worker is in tests/test_dask_executor.py."""

from __future__ import annotations

import os
import threading

from orchestrator import remote


def test_a_cancel_reaches_a_job_before_and_while_it_runs() -> None:
    assert remote.cancel_job("wo-run-early-1") is False
    flag = threading.Event()
    with remote._lock:
        assert "wo-run-early-1" in remote._early
        remote._flags["wo-run-late-1"] = flag
    try:
        assert remote.cancel_job("wo-run-late-1") is True
        assert flag.is_set()
        # The worker plugin stops a job the scheduler lets go of, not one that finished.
        other = threading.Event()
        remote._flags["wo-run-late-2"] = other
        watch = remote.JobWatch()
        watch.transition("wo-run-late-2", "executing", "memory")
        assert not other.is_set()
        watch.transition("wo-run-late-2", "executing", "released")
        assert other.is_set()
    finally:
        with remote._lock:
            remote._flags.pop("wo-run-late-1", None)
            remote._flags.pop("wo-run-late-2", None)
            remote._early.pop("wo-run-early-1", None)


def test_a_worker_says_what_it_lacks() -> None:
    facts = remote.worker_facts(["git", "no-such-program-7f3a"])
    assert facts["git"] and facts["missing"] == ["no-such-program-7f3a"]
    assert facts["version"]
    assert os.environ.get("PATH")
