"""JSON Schemas of the contract's documents."""

from __future__ import annotations

from typing import Any

from ._envelope import HandoffEnvelope
from ._plan import Plan
from ._result import Report

__all__ = ["json_schemas"]


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of the plan, the envelope and the report, by document name."""
    return {
        "plan": Plan.model_json_schema(),
        "envelope": HandoffEnvelope.model_json_schema(by_alias=True),
        "report": Report.model_json_schema(by_alias=True),
    }
