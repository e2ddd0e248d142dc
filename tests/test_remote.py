"""The worker's side of the dask executor: a job's cancel flag, the worker plugin that stops
a job its scheduler let go of, and what a worker says of itself. A whole job on a real
worker is in tests/test_dask_executor.py."""

from __future__ import annotations

import json
import os
import threading
import zlib

from orchestrator import remote


def test_a_cancel_reaches_a_job_before_and_while_it_runs() -> None:
    assert remote.cancel_job("wo-run-early-1") is False
    flag = threading.Event()
    with remote._lock:
        assert "wo-run-early-1" in remote._early
        remote._flags["wo-run-late-1"] = ("run", flag)
    try:
        assert remote.cancel_job("wo-run-late-1") is True
        assert flag.is_set()
        # The worker plugin stops a job the scheduler lets go of, not one that finished.
        other = threading.Event()
        remote._flags["wo-run-late-2"] = ("run", other)
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


def test_a_sweep_stops_its_own_runs_jobs_only() -> None:
    mine, other = threading.Event(), threading.Event()
    with remote._lock:
        remote._flags["wo-abc-t-s1-1"] = ("abc", mine)
        remote._flags["wo-abc-2-t-s1-1"] = ("abc-2", other)
    done = threading.Timer(0.2, lambda: remote._flags.pop("wo-abc-t-s1-1", None))
    done.start()  # the stopped job ends a moment later: the sweep waits for it
    try:
        remote.sweep_run("abc")
        assert mine.is_set() and not other.is_set()
        assert "wo-abc-t-s1-1" not in remote._flags
    finally:
        done.cancel()
        with remote._lock:
            remote._flags.pop("wo-abc-t-s1-1", None)
            remote._flags.pop("wo-abc-2-t-s1-1", None)


def test_a_worker_says_what_it_lacks() -> None:
    facts = remote.worker_facts(["git", "no-such-program-7f3a"])
    assert facts["git"] and facts["missing"] == ["no-such-program-7f3a"]
    assert facts["version"]
    assert os.environ.get("PATH")


def test_an_outcome_travels_as_bytes_and_is_checked_when_it_comes_back() -> None:
    import pytest

    from envelopes import TaskPhase
    from orchestrator.remote import RemoteOutcome, decode_outcome, encode_outcome

    phase = TaskPhase(run_id="r", task_id="t", phase="agent", attempt=1)
    outcome = RemoteOutcome(
        missing="files",
        worker="tcp://127.0.0.1:1",
        bundle=b"bundle bytes",
        files={
            "logs/t.attempt-1.stdout": (0o644, b"out"),
            "outputs/t.attempt-1.json": (0o600, b"{}"),
        },
        events=[phase],
    )
    data = encode_outcome(outcome)
    back = decode_outcome(data, max_bundle=1 << 20)
    assert back.bundle == b"bundle bytes" and back.files == outcome.files
    assert back.events == [phase] and back.result is None and back.missing == "files"
    for bad, why in [
        (b"", "not an outcome"),
        (data[:-1], "runs past"),
        (data + b"x", "left over"),
        ((10**9).to_bytes(8, "big") + data[8:], "header runs past"),
    ]:
        with pytest.raises(ValueError, match=why):
            decode_outcome(bad, max_bundle=1 << 20)
    with pytest.raises(ValueError, match="at most 4"):
        decode_outcome(data, max_bundle=4)
    for header, why in [
        ({"missing": "rm -rf", "worker": "w"}, "lacks"),
        ({"missing": None, "result": None}, "exactly one"),
        ({"missing": "commit", "stopped": True}, "exactly one"),
        ({"missing": "commit", "bundle": True}, "bundle of True bytes"),
        ({"missing": "commit", "files": [["a", 0, 1], ["a", 0, 0]]}, "runs past|twice"),
    ]:
        head = zlib.compress(json.dumps(header).encode())
        with pytest.raises(ValueError, match=why):
            decode_outcome(len(head).to_bytes(8, "big") + head, max_bundle=1)
    bomb = zlib.compress(b" " * (65 << 20))  # a header that inflates past its bound
    with pytest.raises(ValueError, match="over 64 MiB"):
        decode_outcome(len(bomb).to_bytes(8, "big") + bomb, max_bundle=1)
    plain = b'{"missing": null}'  # not deflated
    with pytest.raises(ValueError, match="not deflated"):
        decode_outcome(len(plain).to_bytes(8, "big") + plain, max_bundle=1)
