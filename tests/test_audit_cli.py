"""The audit commands as a user runs them: ``report --html``/``--markdown``, ``run --html``,
and their bad input (one line, exit 2, nothing half-written)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from .conftest import MakeRepo, cli

AGENT = "import pathlib; pathlib.Path('made.txt').write_text('made\\n')"


def _plan(tmp_path: Path) -> Path:
    plan = {
        "name": "paged",
        "agents": {"maker": {"command": [sys.executable, "-c", AGENT]}},
        "defaults": {"venv": False},
        "tasks": [{"id": "one", "agent": "maker", "task": "make"}],
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def test_run_html_writes_the_page_beside_the_report(
    make_repo: MakeRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = make_repo()
    outcome = cli(capsys, "run", str(_plan(tmp_path)), "--repo", str(repo), "--html")
    assert outcome.code == 0, outcome.err
    (report,) = (repo / ".git" / "orchestrator" / "runs").glob("*/report.json")
    page = report.with_name("report.html")
    assert f"page: {page}" in outcome.out
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "Verified when this page was made" in text
    # With --out, beside the copy.
    out = tmp_path / "copy" / "report.json"
    out.parent.mkdir()
    again = cli(
        capsys, "run", str(_plan(tmp_path)), "--repo", str(repo), "--out", str(out), "--html"
    )
    assert again.code == 0, again.err
    assert out.with_name("report.html").is_file()


def test_report_makes_a_page_and_a_summary_at_once(
    make_repo: MakeRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = make_repo()
    assert cli(capsys, "run", str(_plan(tmp_path)), "--repo", str(repo)).code == 0
    (report,) = (repo / ".git" / "orchestrator" / "runs").glob("*/report.json")
    page = tmp_path / "page.html"
    outcome = cli(capsys, "report", str(report), "--html", str(page), "--markdown")
    assert outcome.code == 0, outcome.err
    assert outcome.out.startswith("## Run ")
    assert f"page: {page}" in outcome.err
    assert "OK, 1 commit(s) checked" in page.read_text()


def test_report_refuses_what_it_cannot_make(
    make_repo: MakeRepo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = make_repo()
    assert cli(capsys, "run", str(_plan(tmp_path)), "--repo", str(repo)).code == 0
    (report,) = (repo / ".git" / "orchestrator" / "runs").glob("*/report.json")
    nothing = cli(capsys, "report", str(report))
    assert nothing.code == 2 and "--markdown, --html FILE, or both" in nothing.err
    nowhere = cli(capsys, "report", str(report), "--html", str(tmp_path / "no" / "page.html"))
    assert nowhere.code == 2 and "is not a directory" in nowhere.err
    (tmp_path / "notes.txt").write_text("hello")
    page = tmp_path / "page.html"
    not_report = cli(capsys, "report", str(tmp_path / "notes.txt"), "--html", str(page))
    assert not_report.code == 2 and "Traceback" not in not_report.err
    assert not page.exists()
    # A directory where the page should go: one line, and nothing left behind.
    (tmp_path / "taken.html").mkdir()
    taken = cli(capsys, "report", str(report), "--html", str(tmp_path / "taken.html"))
    assert taken.code == 2 and "cannot write" in taken.err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
