"""Reports for people and for other tools: what ``orchestrator report`` and ``attest`` write.

- ``markdown``: the summary for a pull request comment or a CI step (``report --markdown``).
- ``html``: one self-contained page with a timeline (``report --html``, ``run --html``).
- ``attest``: in-toto Statements (SLSA Provenance, test results) in signed DSSE envelopes
  (``keygen``, ``attest``, ``verify --attestations``).

Each reads a report that ``verify`` has checked and treats every piece of text in it as hostile.
"""
