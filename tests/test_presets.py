"""The presets (orchestrator/presets/): command lines, parsers, fake CLIs run for real.

Each preset's ``invocation()`` is run as a real subprocess with a fake CLI of the same name
first on PATH: a small Python script that checks it got the prompt the way the real CLI
reads it, edits a file in its working directory, prints a fixture (tests/fixtures/presets/,
real output of the CLI version in each folder's README) and exits with the case's code.
Its real stdout then goes through ``parse()``. Garbage of every kind goes through each
parser's ``read_output`` (the function ``parse`` only wraps), which must never raise. When a
real CLI is on PATH, every flag a preset passes must be in its ``--help``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from envelopes import canonical_json
from orchestrator.presets import (
    PRESETS,
    Invocation,
    Parsed,
    Preset,
    aider,
    claude_code,
    codex,
    gemini,
)

FIXTURES = Path(__file__).parent / "fixtures" / "presets"
PROMPT = "Add a greeting module.\n\nAcceptance: `python -m greet` prints hello.\n"
READERS: dict[str, Callable[[bytes, str, int | None], Parsed]] = {
    "claude-code": claude_code.read_output,
    "codex": codex.read_output,
    "gemini": gemini.read_output,
    "aider": aider.read_output,
}
KINDS = {"auth", "rate_limited", "turn_limit", "agent_error", "invalid_output", "exit_code"}


@dataclass(frozen=True)
class Case:
    """A fixture, the exit code the fake CLI ends with, and what the preset must read."""

    preset: str
    fixture: str
    exit_code: int = 0
    error: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    output: dict[str, Any] = field(default_factory=dict)
    stderr: str = ""
    message: str = ""  # a part of the error's message

    @property
    def id(self) -> str:
        return f"{self.preset}/{self.fixture}"


CLAUDE_SUCCESS_USAGE = {
    "input_tokens": 2100,
    "output_tokens": 114,
    "cache_read_tokens": 3000,
    "cache_write_tokens": 500,
    "total_tokens": 5714,
    "cost_usd": 0.010785,
    "cost_source": "reported",
    "turns": 2,
    "model": "claude-sonnet-4-5",
    "session_id": "c01ddc93-ccc6-4860-afd6-82b6e8d92dc9",
}
ZERO_COST = {"cost_usd": 0.0, "cost_source": "reported", "total_tokens": 0}

CASES = [
    Case(
        "claude-code",
        "success.jsonl",
        usage=CLAUDE_SUCCESS_USAGE,
        output={
            "result": "Done: I looked at the repository.",
            "session_id": "c01ddc93-ccc6-4860-afd6-82b6e8d92dc9",
            "is_error": False,
            "num_turns": 2,
        },
    ),
    Case(
        "claude-code",
        "success-json-format.json",
        usage={"input_tokens": 1200, "total_tokens": 4734, "cost_usd": 0.006885, "turns": 1},
        output={"result": "Done: I looked at the repository.", "is_error": False},
    ),
    Case(
        "claude-code",
        "not-logged-in.jsonl",
        1,
        "auth",
        usage={**ZERO_COST, "session_id": "43950cb3-e4e5-4fde-8e5e-be950ff85170"},
        message="Not logged in",
    ),
    Case("claude-code", "invalid-api-key.jsonl", 1, "auth", ZERO_COST, message="Invalid API key"),
    Case("claude-code", "rate-limited.jsonl", 1, "rate_limited", ZERO_COST, message="429"),
    Case("claude-code", "overloaded.jsonl", 1, "rate_limited", ZERO_COST, message="Overloaded"),
    Case(
        "claude-code",
        "max-turns.jsonl",
        1,
        "turn_limit",
        {"input_tokens": 900, "output_tokens": 80, "cost_usd": 0.0039000000000000003, "turns": 2},
        {"subtype": "error_max_turns", "is_error": True, "result": None},
        message="Reached maximum number of turns (1)",
    ),
    Case(
        "claude-code",
        "error-during-execution.jsonl",
        1,
        "agent_error",
        {"model": "claude-sonnet-4-5", "cost_usd": 0.0216, "turns": 3, "total_tokens": 5760},
        {"permission_denials": ["Bash"], "subtype": "error_during_execution"},
        message="tool execution aborted",
    ),
    Case(
        "codex",
        "success.jsonl",
        usage={
            "input_tokens": 2100,
            "cache_read_tokens": 1800,
            "cache_write_tokens": 0,
            "output_tokens": 96,
            "total_tokens": 3996,
            "cost_usd": None,
            "cost_source": None,
            "model": None,
            "session_id": "01a24a01-4a37-7fd0-a35f-a33c487e5127",
        },
        output={
            "result": "Done: I looked at the repository.",
            "is_error": False,
            "commands": [
                {
                    "command": "/bin/bash -lc \"printf 'hello\\\\n' > hello.txt && cat hello.txt\"",
                    "exit_code": 0,
                    "status": "completed",
                }
            ],
        },
    ),
    Case(
        "codex",
        "file-change.jsonl",
        usage={
            "input_tokens": 51020 - 48896,
            "cache_read_tokens": 48896,
            "output_tokens": 410,
            "total_tokens": 51020 + 410,
        },
        output={
            "result": "Fixed the failing test; all tests pass.",
            "file_changes": [
                {"path": "src/greet.py", "kind": "add"},
                {"path": "README.md", "kind": "update"},
            ],
        },
    ),
    Case("codex", "unauthorized.jsonl", 1, "auth", message="401 Unauthorized"),
    Case("codex", "missing-api-key.jsonl", 1, "auth", message="Missing environment variable"),
    Case("codex", "quota-exceeded.jsonl", 1, "rate_limited", message="Quota exceeded"),
    Case("codex", "rate-limited.jsonl", 1, "rate_limited", message="429 Too Many Requests"),
    Case("codex", "network-down.jsonl", 1, "agent_error", message="waiting for network"),
    Case(
        "gemini",
        "success.jsonl",
        usage={
            "input_tokens": 4000,
            "cache_read_tokens": 2000,
            "output_tokens": 65,
            "total_tokens": 6100,
            "model": "gemini-x",
            "cost_usd": None,
            "session_id": "201a3be5-0822-4d6c-8a88-6420b3da7ba9",
        },
        output={"result": "Done: I looked at the repository.", "tool_calls": 1, "is_error": False},
    ),
    Case(
        "gemini",
        "success-json-format.json",
        usage={"input_tokens": 1100, "cache_read_tokens": 2000, "output_tokens": 45},
        output={"result": "Done: I looked at the repository.", "is_error": False},
    ),
    Case("gemini", "invalid-api-key.jsonl", 145, "auth", message="API key not valid"),
    Case("gemini", "rate-limited.jsonl", 173, "rate_limited", message="Resource has been"),
    Case(
        "gemini",
        "not-authenticated.jsonl",
        41,
        "auth",
        stderr="Please set an Auth method in your /home/dev/.gemini/settings.json or specify "
        "one of the following environment variables before running: GEMINI_API_KEY\n",
        message="Please set an Auth method",
    ),
    Case(
        "gemini",
        "turn-limit.jsonl",
        53,
        "turn_limit",
        {"input_tokens": 4800, "cache_read_tokens": 4000, "total_tokens": 9100},
        message="maxSessionTurns",
    ),
    Case(
        "aider",
        "success.txt",
        usage={
            "input_tokens": 12000,
            "output_tokens": 1200,
            "total_tokens": 13200,
            "cost_usd": 0.02,
            "cost_source": "reported",
            "turns": 1,
            "model": "gpt-4.1",
            "session_id": None,
        },
        output={"applied_edits": ["hello.txt"], "is_error": False},
    ),
    Case(
        "aider",
        "success-no-edit.txt",
        usage={"input_tokens": 2300, "output_tokens": 67, "cost_usd": 0.0052},
        output={"result": "Done: I looked at the repository.", "applied_edits": []},
    ),
    Case(
        "aider",
        "cache-two-messages.txt",
        usage={
            "input_tokens": 13500 - 11000,
            "cache_write_tokens": 11000,
            "cache_read_tokens": 17400,
            "output_tokens": 1620,
            "total_tokens": 2500 + 11000 + 17400 + 1620,
            "cost_usd": 0.06,
            "turns": 2,
            "model": "anthropic/claude-sonnet-4-5",
        },
        output={"applied_edits": ["src/app.py"]},
    ),
    Case("aider", "invalid-api-key.txt", 0, "auth", message="not able to authenticate you"),
    Case("aider", "rate-limited.txt", 0, "rate_limited", message="rate limited you"),
    Case("aider", "no-model.txt", 1, "auth", message="No LLM model was specified"),
]

#: The fake CLI: checks the prompt came the way the real one reads it, edits, prints, exits.
FAKE_CLI = """\
import json, os, sys
from pathlib import Path

config = json.loads(Path(os.environ["FAKE_CLI_CONFIG"]).read_text())
name, argv = Path(sys.argv[0]).name, sys.argv[1:]
if name == "aider":
    prompt = Path(argv[argv.index("--message-file") + 1]).read_text()
else:
    if name == "codex" and (argv[:1] != ["exec"] or "-" not in argv):
        sys.exit("codex: expected `codex exec ... -`")
    if name in ("claude", "gemini") and "-p" not in argv:
        sys.exit(name + ": expected -p")
    prompt = sys.stdin.read()
Path(config["record"]).write_text(json.dumps({"argv": sys.argv, "prompt": prompt}))
if prompt != config["prompt"]:
    sys.exit(name + ": the prompt did not arrive")
Path("edited-by-" + name + ".txt").write_text("edited\\n")
sys.stdout.buffer.write(Path(config["fixture"]).read_bytes())
sys.stderr.write(config["stderr"])
sys.exit(config["exit_code"])
"""


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """A directory with fake ``claude``, ``codex``, ``gemini`` and ``aider`` programs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for preset in PRESETS.values():
        script = bin_dir / preset.program
        script.write_text(f"#!{sys.executable}\n{FAKE_CLI}")
        script.chmod(0o755)
    return bin_dir


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_fake(
    preset: Preset, fake_bin: Path, tmp_path: Path, case: Case, *, model: str | None = None
) -> tuple[subprocess.CompletedProcess[bytes], dict[str, Any], Path]:
    """Run *preset*'s command line with the fake CLI on PATH, as the preset kind would."""
    worktree = tmp_path / "worktree"
    worktree.mkdir()
    prompt_file = tmp_path / "logs" / "t1.attempt-1.prompt"
    prompt_file.parent.mkdir()
    prompt_file.write_text(PROMPT)
    config = tmp_path / "config.json"
    record = tmp_path / "record.json"
    config.write_text(
        json.dumps(
            {
                "record": str(record),
                "prompt": PROMPT,
                "fixture": str(FIXTURES / case.preset / case.fixture),
                "stderr": case.stderr,
                "exit_code": case.exit_code,
            }
        )
    )
    program = shutil.which(preset.program, path=str(fake_bin))
    assert program is not None
    invocation = preset.invocation(
        program=program, prompt=PROMPT, prompt_file=prompt_file, model=model, args=[]
    )
    env = {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "FAKE_CLI_CONFIG": str(config)}
    with prompt_file.open("rb") as prompt:
        proc = subprocess.run(
            invocation.argv,
            cwd=worktree,
            env=env,
            stdin=prompt if invocation.prompt_on_stdin else subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
    recorded = json.loads(record.read_text()) if record.exists() else {}
    return proc, recorded, worktree


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fake_cli_run_through_the_preset_is_read_back(
    case: Case, fake_bin: Path, tmp_path: Path
) -> None:
    preset = PRESETS[case.preset]
    proc, recorded, worktree = run_fake(preset, fake_bin, tmp_path, case)
    assert recorded.get("prompt") == PROMPT, proc.stderr.decode()
    assert proc.returncode == case.exit_code, proc.stderr.decode()
    assert (worktree / f"edited-by-{preset.program}.txt").read_text() == "edited\n"
    assert proc.stdout == (FIXTURES / case.preset / case.fixture).read_bytes()

    parsed = preset.parse(
        stdout=proc.stdout,
        stderr_tail=_last_line(proc.stderr.decode(errors="replace")),
        exit_code=proc.returncode,
    )

    assert (parsed.error.kind if parsed.error else None) == case.error, parsed.error
    if parsed.error is not None:
        assert case.message in parsed.error.message
        assert "\n" not in parsed.error.message and len(parsed.error.message) <= 300
    usage = parsed.usage.model_dump() if parsed.usage else {}
    assert {key: usage.get(key) for key in case.usage} == case.usage
    assert {key: (parsed.output or {}).get(key) for key in case.output} == case.output
    if parsed.output is not None:
        canonical_json(parsed.output)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_model_and_the_users_args_reach_the_cli(
    name: str, fake_bin: Path, tmp_path: Path
) -> None:
    preset = PRESETS[name]
    case = next(c for c in CASES if c.preset == name and c.error is None)
    program = shutil.which(preset.program, path=str(fake_bin))
    assert program is not None
    invocation = preset.invocation(
        program=program,
        prompt=PROMPT,
        prompt_file=tmp_path / "p",
        model="some-model",
        args=["--extra", "value"],
    )
    assert invocation.argv[0] == program
    assert invocation.argv[-2:] == ["--extra", "value"]
    model_flag = invocation.argv.index("some-model") - 1
    assert invocation.argv[model_flag] in ("--model", "-m")

    proc, recorded, _ = run_fake(preset, fake_bin, tmp_path, case, model="some-model")
    assert proc.returncode == 0, proc.stderr.decode()
    assert (
        recorded["argv"][1:]
        == preset.invocation(
            program=program,
            prompt=PROMPT,
            prompt_file=tmp_path / "logs" / "t1.attempt-1.prompt",
            model="some-model",
            args=[],
        ).argv[1:]
    )


EXPECTED_ARGV = {
    "claude-code": (
        [
            *("claude", "-p", "--output-format", "stream-json", "--verbose"),
            *("--permission-mode", "acceptEdits", "--allowedTools", "Bash"),
            *("--model", "M", "--x"),
        ],
        True,
    ),
    "codex": (
        [
            *("codex", "exec", "--json", "--sandbox", "workspace-write", "--skip-git-repo-check"),
            *("-m", "M", "-", "--x"),
        ],
        True,
    ),
    "gemini": (
        [
            *("gemini", "-p", "", "--output-format", "stream-json", "--skip-trust"),
            *("--approval-mode", "yolo", "-m", "M", "--x"),
        ],
        True,
    ),
    "aider": (
        [
            *("aider", "--message-file", "/run/logs/t.prompt", *aider.QUIET),
            *("--chat-history-file", os.devnull, "--input-history-file", os.devnull),
            *("--model", "M", "--x"),
        ],
        False,
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_ARGV))
def test_each_command_line_is_exactly_the_documented_one(name: str) -> None:
    preset = PRESETS[name]
    made = preset.invocation(
        program=preset.program,
        prompt="a prompt that never goes on the command line",
        prompt_file=Path("/run/logs/t.prompt"),
        model="M",
        args=["--x"],
    )
    assert made == Invocation(argv=EXPECTED_ARGV[name][0], prompt_on_stdin=EXPECTED_ARGV[name][1])
    assert "a prompt that never goes on the command line" not in made.argv
    without_model = preset.invocation(
        program="p", prompt="", prompt_file=Path("f"), model=None, args=[]
    )
    assert "M" not in without_model.argv and "--x" not in without_model.argv


@pytest.mark.parametrize(
    ("name", "args", "dropped"),
    [
        # The user's mode is the whole permission setting: no allowance added to it.
        ("claude-code", ["--permission-mode", "acceptEdits"], [*claude_code.PERMISSIONS]),
        ("claude-code", ["--permission-mode=plan"], [*claude_code.PERMISSIONS]),
        ("claude-code", ["--dangerously-skip-permissions"], [*claude_code.PERMISSIONS]),
        # The user's allowance replaces the preset's, in the preset's mode.
        ("claude-code", ["--allowedTools", "Bash(pytest *)"], ["--allowedTools", "Bash"]),
        ("claude-code", ["--disallowedTools", "Bash"], []),  # narrows, replaces nothing
        ("codex", ["--sandbox", "read-only"], [*codex.SANDBOX]),
        ("codex", ["-s", "danger-full-access"], [*codex.SANDBOX]),
        ("gemini", ["--approval-mode", "auto_edit"], [*gemini.APPROVAL]),
        ("gemini", ["--approval-mode=plan"], [*gemini.APPROVAL]),
        ("gemini", ["-y"], [*gemini.APPROVAL]),
    ],
)
def test_the_users_own_permission_setting_replaces_the_presets(
    name: str, args: list[str], dropped: list[str]
) -> None:
    """Headless, the presets let the agent edit and run commands (the sandbox contains it);
    the cautious setting is the user's, in ``args``, and the CLI then sees only theirs
    (Gemini CLI 0.61.0 refuses ``--approval-mode`` given twice, Codex 0.171.0 ``--sandbox``)."""
    preset = PRESETS[name]
    made = preset.invocation(program="p", prompt="", prompt_file=Path("f"), model=None, args=args)
    default = preset.invocation(program="p", prompt="", prompt_file=Path("f"), model=None, args=[])
    assert made.argv[-len(args) :] == args
    assert made.argv[: -len(args)] == [a for a in default.argv if a not in dropped]
    assert all(word in default.argv for word in dropped)
    flags = [a.split("=", 1)[0] for a in made.argv if a.startswith("--")]
    assert len(flags) == len(set(flags)), made.argv  # no flag given twice


def test_the_table_names_each_preset_and_its_program() -> None:
    assert {name: preset.program for name, preset in PRESETS.items()} == {
        "claude-code": "claude",
        "codex": "codex",
        "gemini": "gemini",
        "aider": "aider",
    }
    assert all(preset.name == name for name, preset in PRESETS.items())
    versions = {"claude-code": "2.1.197", "codex": "0.171.0", "gemini": "0.61.0", "aider": "0.86.2"}
    for name, version in versions.items():
        assert version in PRESETS[name].checked_with


@pytest.mark.parametrize("module", [aider, claude_code, codex, gemini], ids=lambda m: m.__name__)
def test_every_name_in_a_presets_all_exists(module: Any) -> None:
    assert [name for name in module.__all__ if not hasattr(module, name)] == []


# Odd shapes each parser must read right.


def test_claude_success_then_a_nonzero_exit_is_an_exit_code_failure() -> None:
    stdout = (FIXTURES / "claude-code" / "success.jsonl").read_bytes()
    parsed = claude_code.parse(stdout, "Segmentation fault", 139)
    assert parsed.error is not None and parsed.error.kind == "exit_code"
    assert parsed.usage is not None and parsed.usage.cost_usd == 0.010785


@pytest.mark.parametrize(
    ("stdout", "stderr", "exit_code", "kind"),
    [
        (
            b"",
            "Error: When using --print, --output-format=stream-json requires --verbose",
            1,
            "exit_code",
        ),
        (b"", "Invalid API key \u00b7 Fix external API key", 1, "auth"),
        (b"", "", 0, "invalid_output"),
        (b"\x00\xff garbage \x1b[31m", "", 0, "invalid_output"),
    ],
)
def test_claude_without_a_result_message(
    stdout: bytes, stderr: str, exit_code: int, kind: str
) -> None:
    parsed = claude_code.parse(stdout, stderr, exit_code)
    assert parsed.error is not None and parsed.error.kind == kind
    assert parsed.output is None


def test_claude_run_cut_short_keeps_its_session_and_the_api_error() -> None:
    lines = (FIXTURES / "claude-code" / "rate-limited.jsonl").read_bytes().splitlines()
    parsed = claude_code.parse(b"\n".join(lines[:-1]), "", None)
    assert parsed.error is not None and parsed.error.kind == "rate_limited"
    assert parsed.usage is not None
    assert parsed.usage.session_id == "add50170-5b07-4952-abff-56b316d23903"


def test_codex_takes_the_last_turn_usage_not_the_sum() -> None:
    parsed = codex.parse((FIXTURES / "codex" / "file-change.jsonl").read_bytes(), "", 0)
    assert parsed.usage is not None
    assert (parsed.usage.cache_read_tokens, parsed.usage.output_tokens) == (48896, 410)


def test_codex_retry_errors_before_a_completed_turn_are_not_failures() -> None:
    events = [
        {"type": "thread.started", "thread_id": "t"},
        {"type": "error", "message": "Reconnecting... 1/5 (429 Too Many Requests)"},
        {"type": "item.completed", "item": {"id": "i", "type": "agent_message", "text": "ok"}},
        {"type": "turn.completed", "usage": {"input_tokens": 5, "cached_input_tokens": 9}},
    ]
    stdout = "\n".join(json.dumps(event) for event in events).encode()
    parsed = codex.parse(stdout, "", 0)
    assert parsed.error is None and parsed.output is not None and parsed.output["result"] == "ok"
    assert parsed.usage is not None
    assert parsed.usage.input_tokens is None  # more cached than input: not believed
    assert parsed.usage.cache_read_tokens == 9


@pytest.mark.parametrize(
    ("exit_code", "kind"),
    [(code, kind) for code, (kind, _) in gemini.EXIT_CODES.items()] + [(1, "exit_code")],
)
def test_gemini_exit_codes_name_the_kind(exit_code: int, kind: str) -> None:
    parsed = gemini.parse(b"", "some last line of stderr", exit_code)
    assert parsed.error is not None and parsed.error.kind == kind


def test_gemini_json_format_error_object() -> None:
    document = {"session_id": "s", "error": {"type": "Error", "message": "boom", "code": 41}}
    parsed = gemini.parse(json.dumps(document, indent=2).encode(), "", 41)
    assert parsed.error is not None and parsed.error.kind == "auth"
    assert parsed.output is not None and parsed.output["session_id"] == "s"


@pytest.mark.parametrize(
    ("printed", "count"),
    [("999", 999), ("1.2k", 1200), ("12k", 12000), ("0", 0), ("1.2.3k", None), ("", None)],
)
def test_aider_token_counts(printed: str, count: int | None) -> None:
    assert aider.tokens(printed) == count


def test_aider_rate_limit_then_a_reply_is_a_success() -> None:
    limited = (FIXTURES / "aider" / "rate-limited.txt").read_text()
    # The retry that worked: aider says it retries, then prints the reply and its report.
    reply = "Retrying in 64.0 seconds...\n\nDone.\n\n"
    reply += "Tokens: 1.2k sent, 30 received. Cost: $0.01 message, $0.01 session.\n"
    parsed = aider.parse((limited + reply).encode(), "", 0)
    assert parsed.error is None
    assert parsed.usage is not None and parsed.usage.input_tokens == 1200
    assert parsed.output is not None and parsed.output["result"] == "Done."


def test_aider_without_a_report_is_invalid_output_or_its_exit_code() -> None:
    banner = b"Aider v0.86.2\nMain model: gpt-4.1 with diff edit format\n"
    error = aider.parse(banner, "", 0).error
    assert error is not None and error.kind == "invalid_output"
    error = aider.parse(banner, "", 2).error
    assert error is not None and error.kind == "exit_code"


# Hostile output: nothing may raise, and what comes back must fit a report.


def _check(parsed: Parsed) -> None:
    assert isinstance(parsed, Parsed)
    if parsed.output is not None:
        canonical_json(parsed.output)
    if parsed.error is not None:
        assert parsed.error.kind in KINDS
        assert "\n" not in parsed.error.message and len(parsed.error.message) <= 300
    if parsed.usage is not None:
        for value in parsed.usage.model_dump().values():
            assert not isinstance(value, float) or math.isfinite(value)


def _fixtures(preset: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((FIXTURES / preset).iterdir()) if p.suffix != ".md"]


WRONG: list[Any] = [None, "text", -1, 1.5, True, [], {}, 2**70, "\ud800", "x" * 300, {"a": [1]}]


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*path, index))


def _replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(value[path[0]], path[1:], new)
    return copy


def _mutations(document: bytes, rng: random.Random, limit: int) -> Iterator[bytes]:
    """*document* with one value of one JSON line replaced by a value of another type."""
    lines = document.splitlines()
    candidates = []
    for number, line in enumerate(lines):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        candidates += [(number, value, path) for path in _paths(value)]
    for number, value, path in rng.sample(candidates, min(limit, len(candidates))):
        changed = json.dumps(_replaced(value, path, rng.choice(WRONG))).encode()
        yield b"\n".join([*lines[:number], changed, *lines[number + 1 :]])


@pytest.mark.parametrize("name", sorted(READERS))
def test_wrong_types_in_any_field_never_raise(name: str) -> None:
    rng = random.Random(1234)
    for fixture in _fixtures(name):
        for mutated in _mutations(fixture, rng, limit=150):
            for exit_code in (0, 1, None):
                _check(READERS[name](mutated, "", exit_code))


@pytest.mark.parametrize("name", sorted(READERS))
def test_truncated_and_corrupted_output_never_raises(name: str) -> None:
    rng = random.Random(99)
    for fixture in _fixtures(name):
        for cut in sorted({rng.randrange(len(fixture) + 1) for _ in range(40)}):
            _check(READERS[name](fixture[:cut], "", 1))
            _check(READERS[name](fixture[cut:], "", 0))
        for _ in range(40):
            corrupted = bytearray(fixture)
            for _ in range(8):
                if corrupted:
                    corrupted[rng.randrange(len(corrupted))] = rng.randrange(256)
            _check(
                READERS[name](bytes(corrupted), "\x00\x1b[31mstderr", rng.choice([0, 1, 41, -9]))
            )


GARBAGE = [
    b"",
    b"\n\n\n",
    bytes(range(256)) * 64,
    b"\xff\xfe\x00{" * 1000,
    b"[" * 200_000,
    b'{"a":' * 50_000,
    b"{" + b'"k":1,' * 10_000,
    b'{"type":"result","usage":{"input_tokens":1' + b"0" * 5000 + b"}}",
    b'{"type": "result", "total_cost_usd": 1e999, "num_turns": -5, "is_error": "yes"}',
    b'{"type":"result","result":"\\ud800\\udc00\\ud800","session_id":"\\u0000"}',
    b'{"type":"turn.completed","usage":[]}\n{"type":"thread.started","thread_id":7}',
    b'{"type":"result","status":"success","stats":{"models":{"":{},"m":null}}}',
    b"Tokens: 9999999999999999k sent, 1.2k received. Cost: $99999999999.9 message, $1e3 session.",
    b"Tokens: " + b"1" * 100_000 + b" sent",
    b"litellm.AuthenticationError" * 10_000,
    "Tokens: 1k sent, 1k received.\u2028\u0085".encode() * 1000,
]


@pytest.mark.parametrize("name", sorted(READERS))
@pytest.mark.parametrize("garbage", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_never_raises(name: str, garbage: bytes) -> None:
    for exit_code in (0, 1, None, 255, -15):
        _check(READERS[name](garbage, "\ud800 odd stderr", exit_code))


def test_random_bytes_never_raise() -> None:
    rng = random.Random(7)
    for _ in range(50):
        noise = rng.randbytes(rng.randrange(1, 4000))
        for reader in READERS.values():
            _check(reader(noise, "", rng.choice([0, 1, None])))


def test_a_huge_stdout_is_read_from_its_end() -> None:
    """64 MiB of noise before the result: the parser reads the last 64 MiB and finds it."""
    noise = (b"x" * 1023 + b"\n") * (64 * 1024 + 16)
    success = (FIXTURES / "claude-code" / "success.jsonl").read_bytes()
    parsed = claude_code.parse(noise + success, "", 0)
    assert parsed.error is None and parsed.usage is not None
    assert parsed.usage.cost_usd == 0.010785


def test_parse_turns_a_parser_bug_into_invalid_output() -> None:
    def broken(stdout: bytes, stderr_tail: str, exit_code: int | None) -> Parsed:
        raise KeyError("a bug")

    from orchestrator.presets._reading import guarded

    parsed = guarded("claude", broken)(b"", "", 0)
    assert parsed.error is not None and parsed.error.kind == "invalid_output"
    assert parsed.output is None and parsed.usage is None


# The real CLIs, when installed: every flag a preset passes is one they know.


def _help(argv: list[str], home: Path) -> str:
    env = {**os.environ, "HOME": str(home), "NO_COLOR": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, check=False)
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_flag_the_preset_passes_is_in_the_real_clis_help(name: str, tmp_path: Path) -> None:
    preset = PRESETS[name]
    program = shutil.which(preset.program)
    if program is None:
        pytest.skip(f"{preset.program} is not on PATH: its --help cannot be checked here")
    argv = preset.invocation(
        program=program, prompt="", prompt_file=tmp_path / "prompt", model="m", args=[]
    ).argv
    help_text = _help([program, "--help"], tmp_path)
    if name == "codex":
        assert re.search(r"^\s+exec\b", help_text, re.MULTILINE)
        help_text += _help([program, "exec", "--help"], tmp_path)
    flags = [arg for arg in argv[1:] if arg.startswith("-") and arg != "-"]
    missing = [
        flag for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text)
    ]
    assert missing == [], f"{program} --help does not list {missing}"
