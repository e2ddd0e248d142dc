"""orchestrator/attempt.py: the request and outcome of one attempt, and the files it leaves."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from envelopes import ErrorInfo, Metrics, build_envelope
from orchestrator.attempt import (
    MAX_OUTPUT_BYTES,
    AttemptOutcome,
    AttemptRequest,
    log_entries,
    read_output,
    timed_out,
)
from orchestrator.secrets import Masker

SECRET = "hunter2-but-longer"


def test_a_timeout_is_told_in_seconds_once_for_every_kind() -> None:
    outcome = timed_out(2.5, exit_code=-15, metrics=Metrics(cpu_user_s=0.1))
    assert outcome == AttemptOutcome(
        status="timed_out",
        exit_code=-15,
        metrics=Metrics(cpu_user_s=0.1),
        error=ErrorInfo(kind="timeout", message="timed out after 2.5 s"),
    )
    assert timed_out(600.0).error == ErrorInfo(kind="timeout", message="timed out after 600 s")


def test_a_request_names_its_task_timeout_and_tag(tmp_path: Path) -> None:
    envelope = build_envelope("a", "t", task_id="t1", timeout=12.0)
    request = AttemptRequest(
        envelope=envelope,
        attempt=2,
        run_id="r1",
        cwd=tmp_path,
        worktree=None,
        venv=None,
        env={},
        envelope_path=tmp_path / "e.json",
        output_path=tmp_path / "o.json",
        stdout_path=tmp_path / "o.stdout",
        stderr_path=tmp_path / "o.stderr",
        run_dir=tmp_path,
        state_dir=tmp_path,
        plan_dir=tmp_path,
        repo=None,
        kill_grace=2.0,
        lifeline=None,
    )
    assert (request.task_id, request.timeout, request.attempt_tag) == ("t1", 12.0, "r1/t1/2")
    request.record_command(["prog"], "/bin/prog")  # made outside a lifecycle: recorded nowhere


# the output file


def test_an_output_file_is_a_json_object(tmp_path: Path) -> None:
    (tmp_path / "out.json").write_text('{"b": [1, 2], "a": "x"}')
    assert read_output(tmp_path / "out.json", tmp_path) == ({"b": [1, 2], "a": "x"}, None)


def test_no_output_file_is_no_output_and_no_error(tmp_path: Path) -> None:
    assert read_output(tmp_path / "out.json", tmp_path) == (None, None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1]", "output must be a JSON object, found list"),
        ("{oops", "output is not valid JSON: "),
        ("[" * 200 + "]" * 200, "output is not valid JSON: "),
    ],
    ids=["list", "not-json", "too-deep"],
)
def test_an_output_that_is_not_an_object_is_invalid(
    tmp_path: Path, text: str, message: str
) -> None:
    (tmp_path / "out.json").write_text(text)
    value, error = read_output(tmp_path / "out.json", tmp_path)
    assert value is None and error is not None and error.kind == "invalid_output"
    assert error.message.startswith(message)


def test_an_output_file_too_large_is_invalid(tmp_path: Path) -> None:
    with (tmp_path / "out.json").open("wb") as f:
        f.truncate(MAX_OUTPUT_BYTES + 1)
    value, error = read_output(tmp_path / "out.json", tmp_path)
    assert value is None and error is not None and error.kind == "invalid_output"


@pytest.mark.parametrize("what", ["symlink", "fifo"])
def test_an_output_path_the_agent_replaced_is_not_followed(tmp_path: Path, what: str) -> None:
    target = tmp_path / "out.json"
    if what == "symlink":
        (tmp_path / "elsewhere.json").write_text('{"a": 1}')
        target.symlink_to(tmp_path / "elsewhere.json")
    else:
        os.mkfifo(target)  # would block a reader forever
    value, error = read_output(target, tmp_path)
    assert value is None and error is not None and error.kind == "invalid_output"
    assert error.message.startswith("output file out.json cannot be read")


# the log files


def test_log_entries_hash_both_files_making_missing_ones(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    stdout, stderr = tmp_path / "logs" / "t.stdout", tmp_path / "logs" / "t.stderr"
    stdout.write_text("hello\n")
    out, err, problem = log_entries(stdout, stderr, tmp_path, Masker())
    assert problem is None
    assert (out.path, out.size, out.sha256) == (
        "logs/t.stdout",
        6,
        hashlib.sha256(b"hello\n").hexdigest(),
    )
    assert (err.path, err.size) == ("logs/t.stderr", 0) and stderr.read_bytes() == b""


def test_log_entries_mask_secrets_before_hashing(tmp_path: Path) -> None:
    stdout, stderr = tmp_path / "t.stdout", tmp_path / "t.stderr"
    stdout.write_text(f"token {SECRET}\n")
    stderr.write_text("")
    out, _, _ = log_entries(stdout, stderr, tmp_path, Masker.for_env({"API_TOKEN": SECRET}))
    assert stdout.read_text() == "token ***\n"
    assert out.sha256 == hashlib.sha256(b"token ***\n").hexdigest()


def test_a_log_the_agent_replaced_with_a_link_is_emptied_and_told(tmp_path: Path) -> None:
    secret_file = tmp_path / "private"
    secret_file.write_text("not yours\n")
    stdout, stderr = tmp_path / "t.stdout", tmp_path / "t.stderr"
    stdout.symlink_to(secret_file)
    stderr.write_text("")
    out, _, problem = log_entries(stdout, stderr, tmp_path, Masker())
    assert problem is not None and problem.startswith("its log t.stdout was tampered with")
    assert out.size == 0 and not stdout.is_symlink()
    assert secret_file.read_text() == "not yours\n"
