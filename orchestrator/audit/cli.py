"""The audit commands: ``report``, ``keygen``, ``attest`` and ``verify --attestations``.

Each is a function of parsed arguments returning an exit code, as in orchestrator/cli.py,
which registers them: 0 done (verify: everything held), 1 something did not hold (a finding,
a report that does not verify before it is signed), 2 bad input (not a report, a missing key).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import anyio

from .._fs import replace_file
from ..errors import AttestationError, ReportUnreadable
from ..verify import VerifyOutcome, find_run_dir, verify_report

__all__ = [
    "attestation_lines",
    "cmd_attest",
    "cmd_keygen",
    "cmd_report",
    "verified_line",
    "write_html_page",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _err(message: str) -> None:
    from ..progress import printable

    print(f"orchestrator: {printable(message)}", file=sys.stderr)


def verified_line(outcome: VerifyOutcome) -> str:
    """What verify found, in one line of plain text (for the page and the summary)."""
    if outcome.ok:
        return f"OK, {outcome.checked_commits} commit(s) checked, every digest recomputed"
    first = " ".join(str(outcome.findings[0]).split())[:500]
    return f"{len(outcome.findings)} finding(s), the first: {first}"


async def write_html_page(
    report_path: Path, out: Path, *, repo: Path | None = None, outcome: VerifyOutcome | None = None
) -> None:
    """Verify the report at *report_path* (unless *outcome* is given) and write its page to
    *out* (replaced whole). ReportUnreadable for a file that is not a report; OSError when the
    page cannot be written.

    The files each result changed are asked of a repository the user trusts: *repo*, or the
    one the current directory is in. One the report merely names may be anyone's (a partial
    clone's config can make git run a program to fetch what it lacks): the page then says to
    pass ``--repo``.
    """
    from ..repo import NotARepository, Repository
    from .facts import page_facts
    from .html import render_html

    if outcome is None:
        outcome = await verify_report(report_path, repo=repo)
    report = outcome.report
    repository = None
    where = repo or report.repo
    if where:
        try:
            repository = await Repository.open(where)
        except (NotARepository, OSError):
            repository = None  # the page says what it could not find
    trusted = repository is not None and (
        repo is not None or Path.cwd().resolve().is_relative_to(repository.root.resolve())
    )
    run_dir = find_run_dir(report, report_path)
    facts = await page_facts(report, repo=repository if trusted else None, run_dir=run_dir)
    if repository is not None and not trusted:
        note = (
            f"not asked of {repository.root}, which only the report names: pass --repo to show them"
        )
        facts = dataclasses.replace(facts, diffstats_note=note)
    checkout = str(repository.root) if trusted and repository is not None else None
    page = render_html(report, verified=verified_line(outcome), facts=facts, repo=checkout)
    await anyio.to_thread.run_sync(replace_file, out, page.encode())


def cmd_report(args: argparse.Namespace) -> int:
    """``orchestrator report``: the Markdown summary printed and/or the page written; exit 0
    (what verify found is in them), 2 when the file is not a report or the page cannot be
    written."""
    from .markdown import inert, render_markdown

    if not args.markdown and args.html is None:
        _err("report: say what to make: --markdown, --html FILE, or both")
        return EXIT_USAGE
    if args.html is not None and not args.html.absolute().parent.is_dir():
        _err(f"--html: {args.html.absolute().parent} is not a directory")
        return EXIT_USAGE

    async def make() -> VerifyOutcome:
        outcome = await verify_report(args.report, repo=args.repo)
        if args.html is not None:
            await write_html_page(args.report, args.html, repo=args.repo, outcome=outcome)
        return outcome

    try:
        outcome = anyio.run(make)
    except ReportUnreadable as exc:
        _err(str(exc))
        return EXIT_USAGE
    except OSError as exc:
        _err(f"--html: cannot write {args.html}: {exc.strerror or exc}")
        return EXIT_USAGE
    if args.markdown:
        if outcome.ok:
            verified = verified_line(outcome)
        else:
            first = inert(str(outcome.findings[0]), 500)
            verified = f"**{len(outcome.findings)} finding(s)**, the first: {first}"
        sys.stdout.write(render_markdown(outcome.report, verified=verified))
    if args.html is not None:
        print(f"page: {args.html}", file=sys.stderr)
    return EXIT_OK


def cmd_keygen(args: argparse.Namespace) -> int:
    """``orchestrator keygen --out STEM``: an Ed25519 key pair, ``STEM.pem`` (0600) and
    ``STEM.pub.pem``; exit 2 when either exists or cannot be written."""
    from .dsse import key_id, load_public_key, write_keypair

    try:
        private, public = write_keypair(args.out)
    except AttestationError as exc:
        _err(str(exc))
        return EXIT_USAGE
    print(f"private key: {private} (keep it secret)")
    print(f"public key: {public} (keyid {key_id(load_public_key(public))})")
    return EXIT_OK


def cmd_attest(args: argparse.Namespace) -> int:
    """``orchestrator attest REPORT --key KEY --out DIR``: exit 0 written, 1 the report does
    not verify (nothing is signed), 2 bad input."""
    from .attest import report_digest, write_attestations
    from .dsse import load_private_key

    try:
        key = load_private_key(args.key)
    except AttestationError as exc:
        _err(str(exc))
        return EXIT_USAGE
    if args.key.startswith("env:"):
        # Read: no git or installer this process starts needs to inherit it.
        os.environ.pop(args.key.removeprefix("env:"), None)
    try:
        outcome = anyio.run(lambda: verify_report(args.report, repo=args.repo))
        digest = report_digest(args.report)
    except (AttestationError, ReportUnreadable) as exc:
        _err(str(exc))
        return EXIT_USAGE
    if not outcome.ok:
        from ..progress import printable

        for finding in outcome.findings:
            print(printable(f"{args.report}: {finding}"))  # a report's text is someone else's
        _err(f"{args.report} does not verify ({len(outcome.findings)} finding(s)): nothing signed")
        return EXIT_FAILED
    try:
        written = write_attestations(outcome.report, digest, key, args.out)
    except AttestationError as exc:
        _err(str(exc))
        return EXIT_USAGE
    statements = len(written) - 1
    print(f"{args.out}: {statements} statement(s) signed, bundle {written[-1].name}")
    return EXIT_OK


def attestation_lines(
    outcome: VerifyOutcome, report_path: Path, directory: Path | None, key: Path | None
) -> list[str] | None:
    """The findings of ``verify --attestations DIRECTORY --key KEY`` (None: not asked for).
    Attestations are checked against a report that verified: for one that did not, one line
    says they were not. Raises AttestationError for input that cannot be read at all."""
    from .attest import check_attestations, report_digest
    from .dsse import load_public_key

    if directory is None and key is None:
        return None
    if directory is None or key is None:
        raise AttestationError("--attestations and --key go together")
    public = load_public_key(key)
    if not directory.is_dir():
        raise AttestationError(f"--attestations: {directory} is not a directory")
    if not outcome.ok:
        return ["attestations: not checked: the report does not verify"]
    digest = report_digest(report_path)
    return [str(f) for f in check_attestations(outcome.report, digest, directory, public)]
