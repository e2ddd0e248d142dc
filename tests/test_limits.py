"""orchestrator/limits.py: a plan's limits as setrlimit triples, set on a real child (by
util-linux prlimit, or by a preexec_fn where it is missing, see orchestrator/process.py), and
telling which limit ended an attempt.

Whole plans over each limit, with and without the sandbox, are in tests/test_sandbox.py.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import ValidationError

from envelopes import Limits
from orchestrator import process
from orchestrator.limits import CPU_GRACE_S, Rlimit, limit_error, rlimits_of
from orchestrator.process import ProcessOutcome, run_command

MB = 1 << 20
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
NAMES = ("AS", "CPU", "NOFILE", "FSIZE", "NPROC", "CORE")

#: Prints the limits it runs under and the argv its interpreter was started with.
PROBE = """
import json, resource, sys
names = ["AS", "CPU", "NOFILE", "FSIZE", "NPROC", "CORE"]
limits = {n: resource.getrlimit(getattr(resource, "RLIMIT_" + n)) for n in names}
print(json.dumps({"limits": limits, "argv": sys.orig_argv}))
"""


@pytest.fixture(params=["prlimit", "preexec"])
def setter(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """How the child's limits are set: by prlimit, or with no prlimit on PATH, a preexec_fn."""
    if request.param == "prlimit":
        if shutil.which("prlimit") is None:
            pytest.skip("util-linux prlimit is not installed")
    else:
        monkeypatch.setenv("PATH", str(tmp_path_factory.mktemp("bin-without-prlimit")))
    # prlimit is looked up once per process: again under this PATH, and again after it.
    process._prlimit.cache_clear()
    yield request.param
    process._prlimit.cache_clear()


def run(
    argv: list[str], cwd: Path, rlimits: list[Rlimit], *, path: str = SYSTEM_PATH
) -> tuple[ProcessOutcome, str, str]:
    """Run *argv* to its end under *rlimits*; its outcome, stdout and stderr."""
    out, err = cwd / "stdout.log", cwd / "stderr.log"
    outcome = anyio.run(
        lambda: run_command(
            argv,
            cwd=cwd,
            env={"PATH": path, "LANG": "C.UTF-8"},
            stdout=out,
            stderr=err,
            timeout=60,
            tag=f"test-limits/{cwd.name}",
            kill_grace=1.0,
            rlimits=rlimits,
        )
    )
    return outcome, out.read_text(), err.read_text()


def probe(cwd: Path, rlimits: list[Rlimit]) -> dict[str, Any]:
    """What a Python child started as ``python -c PROBE`` (found on PATH) sees."""
    here = Path(sys.executable)
    outcome, out, err = run([here.name, "-c", PROBE], cwd, rlimits, path=str(here.parent))
    assert outcome.exit_code == 0, err
    seen: dict[str, Any] = json.loads(out)
    return seen


def ours() -> dict[str, list[int]]:
    return {n: list(resource.getrlimit(getattr(resource, "RLIMIT_" + n))) for n in NAMES}


def test_no_limits_are_no_triples_and_the_command_runs_as_given(tmp_path: Path) -> None:
    assert rlimits_of(Limits()) == []
    seen = probe(tmp_path, rlimits_of(Limits()))
    assert seen["limits"] == ours()
    # Not through prlimit: the program is started by the name it was given.
    assert seen["argv"] == [Path(sys.executable).name, "-c", PROBE]


def test_each_limit_reaches_the_child(setter: str, tmp_path: Path) -> None:
    limits = Limits(memory_mb=512, cpu_s=30, open_files=64, file_size_mb=2, processes=4096)
    rlimits = rlimits_of(limits)
    assert rlimits == [
        (resource.RLIMIT_AS, 512 * MB, 512 * MB),
        (resource.RLIMIT_CPU, 30, 30 + CPU_GRACE_S),
        (resource.RLIMIT_NOFILE, 64, 64),
        (resource.RLIMIT_FSIZE, 2 * MB, 2 * MB),
        (resource.RLIMIT_NPROC, 4096, 4096),
        (resource.RLIMIT_CORE, 0, 0),  # SIGXCPU and SIGXFSZ dump no core into the worktree
    ]
    seen = probe(tmp_path, rlimits)
    assert seen["limits"] == {
        "AS": [512 * MB, 512 * MB],
        "CPU": [30, 31],
        "NOFILE": [64, 64],
        "FSIZE": [2 * MB, 2 * MB],
        "NPROC": [4096, 4096],
        "CORE": [0, 0],
    }
    name = Path(sys.executable).name
    # prlimit execs the program by the path found on the command's PATH.
    program = shutil.which(name, path=str(Path(sys.executable).parent)) or ""
    assert seen["argv"] == [program if setter == "prlimit" else name, "-c", PROBE]


def test_one_limit_leaves_the_others_as_they_were(setter: str, tmp_path: Path) -> None:
    seen = probe(tmp_path, rlimits_of(Limits(open_files=100)))
    assert seen["limits"] == {**ours(), "NOFILE": [100, 100], "CORE": [0, 0]}


def test_a_child_over_its_file_size_is_killed_by_sigxfsz_and_told(
    setter: str, tmp_path: Path
) -> None:
    # head does not ignore SIGXFSZ, as Python does; its stdout is the log file, capped too.
    limits = Limits(file_size_mb=1)
    outcome, _, _ = run(["head", "-c", str(3 * MB), "/dev/zero"], tmp_path, rlimits_of(limits))
    assert outcome.signal == signal.SIGXFSZ
    assert (tmp_path / "stdout.log").stat().st_size == MB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr.log", "stdout.log"]  # no core
    error = limit_error(limits, outcome)
    assert error is not None and error.kind == "limit"
    assert error.message == "exceeded limits.file_size_mb (1 MB per file): killed by SIGXFSZ"
    assert limit_error(Limits(cpu_s=1), outcome) is None  # no file size limit: not a limit's


DROP_ROOT_AND_FORK = """
import os
if os.geteuid() == 0:  # the kernel does not count root's processes: be someone else
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
os.fork()
"""


def test_the_processes_limit_stops_a_fork_once_the_agent_is_not_root(
    setter: str, tmp_path: Path
) -> None:
    limits = Limits(processes=1)
    outcome, _, err = run([sys.executable, "-c", DROP_ROOT_AND_FORK], tmp_path, rlimits_of(limits))
    assert outcome.exit_code == 1
    last = err.strip().splitlines()[-1]
    assert last == "BlockingIOError: [Errno 11] Resource temporarily unavailable"
    error = limit_error(limits, outcome, last)
    assert error is not None
    assert error.message == f"exceeded limits.processes (1 processes): exited with code 1: {last}"


def test_the_processes_limit_of_a_root_agent_is_set_but_not_counted(
    setter: str, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root's processes are not counted against RLIMIT_NPROC")
    outcome, _, err = run(
        [sys.executable, "-c", "import os\nif os.fork() == 0: os._exit(0)\nos.wait()"],
        tmp_path,
        rlimits_of(Limits(processes=1)),
    )
    assert outcome.exit_code == 0, err


CAPPED = """
import json, os, resource
from envelopes import Limits
from orchestrator.limits import rlimits_of
resource.setrlimit(resource.RLIMIT_NOFILE, (100, 128))
if os.geteuid() == 0:  # imports done: drop to nobody, who may not raise a hard limit
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
print(json.dumps(rlimits_of(Limits(open_files=1000, memory_mb=64))))
"""


def test_a_limit_above_a_non_root_hard_limit_is_that_hard_limit() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CAPPED], cwd="/", capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    triples = {which: (soft, hard) for which, soft, hard in json.loads(done.stdout)}
    assert triples[resource.RLIMIT_NOFILE] == (128, 128)
    hard_as = resource.getrlimit(resource.RLIMIT_AS)[1]
    wanted = 64 * MB if hard_as == resource.RLIM_INFINITY else min(64 * MB, hard_as)
    assert triples[resource.RLIMIT_AS] == (wanted, wanted)
    assert triples[resource.RLIMIT_CORE] == (0, 0)


def _may_raise_hard_limits() -> bool:
    """Whether this process may raise a hard limit: root with CAP_SYS_RESOURCE (which most
    containers drop, root or not)."""
    if os.geteuid() != 0:
        return False
    status = Path("/proc/self/status").read_text()
    effective = next(line for line in status.splitlines() if line.startswith("CapEff:"))
    return bool(int(effective.split()[1], 16) >> 24 & 1)  # CAP_SYS_RESOURCE is 24


MAY_RAISE = _may_raise_hard_limits()


def test_a_limit_above_our_hard_limit_is_what_this_process_may_give(
    setter: str, tmp_path: Path
) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    higher = min(hard + 1000, nr_open)
    if higher <= hard:
        pytest.skip(f"the open-files hard limit is already the kernel's most ({nr_open})")
    given = higher if MAY_RAISE else hard
    rlimits = rlimits_of(Limits(open_files=higher))
    assert (resource.RLIMIT_NOFILE, given, given) in rlimits
    assert probe(tmp_path, rlimits)["limits"]["NOFILE"] == [given, given]


@pytest.mark.parametrize("value", [0, -1, "64", 1.5, True])
def test_a_limit_that_is_no_positive_whole_number_is_refused(value: object) -> None:
    with pytest.raises(ValidationError, match="open_files"):
        Limits(open_files=value)  # type: ignore[arg-type]


#: 2**64 bytes: past the largest limit setrlimit takes (RLIM_INFINITY is 2**64 - 1).
HUGE = Limits(memory_mb=1 << 44)
MARK_AND_EXIT = "import pathlib; pathlib.Path('ran').touch()"


def test_a_limit_too_large_to_set_fails_the_command_through_prlimit(tmp_path: Path) -> None:
    if shutil.which("prlimit") is None:
        pytest.skip("util-linux prlimit is not installed")
    process._prlimit.cache_clear()
    rlimits = rlimits_of(HUGE)
    assert rlimits[0] == (resource.RLIMIT_AS, 1 << 64, 1 << 64)
    outcome, _, err = run([sys.executable, "-c", MARK_AND_EXIT], tmp_path, rlimits)
    assert outcome.exit_code == 1
    assert err.strip() == "prlimit: failed to parse AS limit"
    assert not (tmp_path / "ran").exists()  # the program never started
    assert limit_error(HUGE, outcome, err.strip()) is None


def test_a_limit_too_large_to_set_without_prlimit_is_an_oserror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "_prlimit", lambda: None)
    with pytest.raises(OSError):
        run([sys.executable, "-c", MARK_AND_EXIT], tmp_path, rlimits_of(HUGE))


def ended(
    *,
    code: int | None = None,
    sig: int | None = None,
    cpu: float = 0.0,
    timed_out: bool = False,
    cancelled: bool = False,
) -> ProcessOutcome:
    return ProcessOutcome(
        exit_code=code,
        timed_out=timed_out,
        cancelled=cancelled,
        signal=sig,
        duration_s=1.0,
        cpu_user_s=cpu,
        cpu_system_s=0.0,
        max_rss_kb=None,
    )


ALL = Limits(memory_mb=150, cpu_s=2, open_files=32, file_size_mb=1, processes=8)
TOO_MANY = "OSError: [Errno 24] Too many open files: 'x'"


@pytest.mark.parametrize(
    ("limits", "outcome", "last", "expected"),
    [
        (ALL, ended(sig=signal.SIGXCPU), None, "cpu_s (2s of CPU): killed by SIGXCPU"),
        # SIGKILL at the hard limit, once SIGXCPU at the soft one was caught.
        (ALL, ended(sig=signal.SIGKILL, cpu=2.5), None, "cpu_s (2s of CPU): killed by SIGKILL"),
        (ALL, ended(sig=signal.SIGKILL, cpu=0.5), None, None),
        (Limits(memory_mb=1), ended(sig=signal.SIGXCPU), None, None),
        (Limits(memory_mb=1), ended(sig=signal.SIGXFSZ), None, None),
        (ALL, ended(sig=signal.SIGKILL, cpu=9.0, timed_out=True), None, None),
        (ALL, ended(sig=signal.SIGXCPU, cancelled=True), None, None),
        (ALL, ended(code=1), TOO_MANY, f"open_files (32 files): exited with code 1: {TOO_MANY}"),
        (Limits(memory_mb=1), ended(code=1), TOO_MANY, None),
        (ALL, ended(code=0), "MemoryError", None),
        (ALL, ended(code=1), "Traceback? no: KeyError: 'x'", None),
        (ALL, ended(code=1), None, None),
        (
            ALL,
            ended(code=134),
            "terminate called after throwing an instance of 'std::bad_alloc'",
            "memory_mb (150 MB): exited with code 134: terminate called after throwing an "
            "instance of 'std::bad_alloc'",
        ),
        (
            ALL,
            ended(sig=200),
            "MemoryError",
            "memory_mb (150 MB): killed by signal 200: MemoryError",
        ),
    ],
    ids=[
        "sigxcpu",
        "sigkill-after-cpu",
        "sigkill-before-cpu",
        "sigxcpu-no-cpu-limit",
        "sigxfsz-no-size-limit",
        "timed-out",
        "cancelled",
        "line-of-a-set-limit",
        "line-of-an-unset-limit",
        "exit-0",
        "other-line",
        "no-line",
        "bad-alloc",
        "unnamed-signal",
    ],
)
def test_limit_error_tells_the_limit_from_the_signal_or_the_last_line(
    limits: Limits, outcome: ProcessOutcome, last: str | None, expected: str | None
) -> None:
    error = limit_error(limits, outcome, last)
    if expected is None:
        assert error is None
    else:
        assert error is not None and error.kind == "limit"
        assert error.message == f"exceeded limits.{expected}"
