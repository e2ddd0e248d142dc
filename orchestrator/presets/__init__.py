"""Presets: real coding agents' CLIs (Claude Code, Codex, Gemini CLI, Aider) run headless.

A preset knows two things about one CLI: the command line that runs it without a human in
the task's worktree, with the rendered prompt delivered the way that CLI reads it
(:meth:`Preset.invocation`), and how to read what it printed into the task's output, its
usage and, when it failed, an error of a kind a user can act on (:meth:`Preset.parse`).
Both are pure functions; the ``preset`` agent kind (orchestrator/preset_agent.py) runs the
program and hands its output over. Each preset is one module (``claude_code.py``,
``codex.py``, ``gemini.py``, ``aider.py``) whose docstring gives its exact command line,
what it parses, what it cannot know, and the CLI version it was checked against;
:data:`PRESETS` is the table, by name.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import aider, claude_code, codex, gemini
from ._protocol import Invocation as Invocation
from ._protocol import Parsed as Parsed
from ._protocol import Preset as Preset

__all__ = ["PRESETS", "Invocation", "Parsed", "Preset"]

#: The presets, by the name a plan gives (``preset: claude-code``).
PRESETS: Mapping[str, Preset] = {
    module.PRESET.name: module.PRESET for module in (claude_code, codex, gemini, aider)
}
