"""Masking: which values are secret, and replacing them in text, JSON values and log files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from envelopes._bounded import UnsafeFile
from envelopes._secrets import is_secret_name, masked_env, masked_plan
from orchestrator.secrets import Masker


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("ANTHROPIC_API_KEY", True),
        ("GITHUB_TOKEN", True),
        ("db_password", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("GOOGLE_APPLICATION_CREDENTIALS", True),
        ("GIT_AUTHOR_NAME", False),
        ("PATH", False),
        ("HOME", False),
    ],
)
def test_names_that_look_secret(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_declared_names_are_secret_whatever_they_look_like() -> None:
    assert is_secret_name("PLAIN", ["PLAIN"])
    assert masked_env({"PLAIN": "v", "OTHER": "w"}, ["PLAIN"]) == {"PLAIN": "***", "OTHER": "w"}


def test_the_plan_is_masked_at_every_level_in_both_env_forms() -> None:
    plan = {
        "defaults": {"env": {"API_TOKEN": "a", "X": "1"}, "secrets": ["X"]},
        "agents": {"w": {"command": ["w"], "env": {"set": {"MINE": "m"}}, "secrets": ["MINE"]}},
        "tasks": [{"id": "t", "agent": "w", "task": "t", "env": {"DEPLOY_KEY": "d", "Y": "y"}}],
    }
    masked = masked_plan(plan)
    assert masked["defaults"]["env"] == {"API_TOKEN": "***", "X": "***"}
    assert masked["agents"]["w"]["env"] == {"set": {"MINE": "***"}}
    assert masked["tasks"][0]["env"] == {"DEPLOY_KEY": "***", "Y": "y"}
    assert plan["defaults"]["env"]["API_TOKEN"] == "a"  # the plan itself is not changed


def test_short_values_are_not_masked_and_longer_ones_first() -> None:
    masker = Masker.for_env(
        {"API_TOKEN": "sk-abcdefgh", "LONG_TOKEN": "sk-abcdefgh-longer", "OTHER_KEY": "true"},
        [],
    )
    assert masker.values == ("sk-abcdefgh-longer", "sk-abcdefgh")
    assert masker.text("a sk-abcdefgh-longer b sk-abcdefgh true") == "a *** b *** true"
    assert masker.value({"sk-abcdefgh": ["x sk-abcdefgh"], "n": 1}) == {"***": ["x ***"], "n": 1}
    assert not Masker.for_env({"PATH": "/usr/bin:/bin"}, [])


def test_a_log_file_is_masked_across_chunk_boundaries(tmp_path: Path) -> None:
    masker = Masker.for_env({"API_TOKEN": "sk-0123456789abcdef"}, [])
    log = tmp_path / "log"
    # The secret straddles the 1 MiB chunk the masker reads at a time.
    log.write_bytes(b"x" * ((1 << 20) - 7) + b"sk-0123456789abcdef" + b"y" * 10)
    assert masker.mask_file(log)
    assert log.read_bytes() == b"x" * ((1 << 20) - 7) + b"***" + b"y" * 10
    assert not masker.mask_file(log)  # nothing left: not rewritten


def test_a_log_replaced_by_a_link_is_not_followed(tmp_path: Path) -> None:
    masker = Masker.for_env({"API_TOKEN": "sk-0123456789abcdef"}, [])
    target = tmp_path / "elsewhere"
    target.write_text("sk-0123456789abcdef")
    log = tmp_path / "log"
    os.symlink(target, log)
    with pytest.raises(UnsafeFile):
        masker.mask_file(log)
    assert target.read_text() == "sk-0123456789abcdef"
