"""``python -m orchestrator``."""

from .resident import entry

entry()
