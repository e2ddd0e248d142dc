"""Masking: a task's secret values never reach a file, an event, a report or a commit.

The secret values of a task are those of the variables its agent gets whose names look
secret, or that the plan lists under ``secrets:`` (see ``envelopes._secrets``): passed,
inherited or set. A :class:`Masker` replaces each by ``***`` in text, in JSON values and, once
the agent has exited, in its log files (digests are of the masked files). Values shorter than
:data:`MIN_SECRET_LENGTH` (or than :data:`MIN_DECLARED_LENGTH` when declared) are not masked:
masking ``1`` or ``true`` everywhere would garble the logs and protect nothing.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envelopes import MASK, is_secret_name, open_regular

__all__ = ["MIN_DECLARED_LENGTH", "MIN_SECRET_LENGTH", "Masker"]

#: Shortest value masked for a variable whose name looks secret.
MIN_SECRET_LENGTH = 8
#: Shortest value masked for a variable the plan declares secret.
MIN_DECLARED_LENGTH = 3

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Masker:
    """Replaces each of *values* (longest first) by ``***``."""

    values: tuple[str, ...] = ()

    @classmethod
    def for_env(cls, env: Mapping[str, str], declared: Iterable[str] = ()) -> Masker:
        """The masker of an agent's environment *env*, with the plan's *declared* secrets."""
        names = set(declared)
        found = {
            value
            for name, value in env.items()
            if is_secret_name(name, names)
            and len(value) >= (MIN_DECLARED_LENGTH if name in names else MIN_SECRET_LENGTH)
        }
        return cls(tuple(sorted(found, key=lambda v: (-len(v), v))))

    def __bool__(self) -> bool:
        return bool(self.values)

    def text(self, text: str) -> str:
        """*text* with every secret value masked."""
        for value in self.values:
            if value in text:
                text = text.replace(value, MASK)
        return text

    def value(self, value: Any) -> Any:
        """A JSON value with every secret masked in its strings, keys included."""
        if not self.values:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if isinstance(value, dict):
            return {self.text(k): self.value(v) for k, v in value.items()}
        return value

    def found_in(self, data: bytes) -> bool:
        """Whether any secret value occurs in *data*."""
        return any(value.encode() in data for value in self.values)

    def mask_file(self, path: Path) -> bool:
        """Mask the secrets in a log file in place (a regular file, not followed if a link).

        Streams through the file with an overlap, so a secret across two chunks is found;
        rewrites it (same path, new inode) only when one is. Returns whether it did.
        """
        if not self.values:
            return False
        needles = [v.encode() for v in self.values]
        overlap = max(len(n) for n in needles) - 1
        fd = open_regular(path)
        try:
            found, tail = False, b""
            while chunk := os.read(fd, _CHUNK):
                window = tail + chunk
                if any(n in window for n in needles):
                    found = True
                    break
                tail = window[-overlap:] if overlap else b""
            if not found:
                return False
            os.lseek(fd, 0, os.SEEK_SET)
            out, name = tempfile.mkstemp(
                prefix=f".{path.name}.", suffix=".masking", dir=path.parent
            )
            tmp = Path(name)
            try:
                # A buffered file: a write the disk takes only in part is finished or fails
                # (os.write would leave the masked log cut short, in the log's place).
                with os.fdopen(out, "wb") as f:
                    os.fchmod(out, stat.S_IMODE(os.fstat(fd).st_mode))  # the log's own mode
                    pending = b""
                    while True:
                        chunk = os.read(fd, _CHUNK)
                        window = pending + chunk
                        for needle in needles:
                            window = window.replace(needle, MASK.encode())
                        if not chunk:
                            f.write(window)
                            break
                        # Keep back what could be the start of a secret cut by the chunk's end.
                        cut = max(0, len(window) - overlap)
                        f.write(window[:cut])
                        pending = window[cut:]
                    f.flush()
                    os.fsync(out)  # the masked log whole on disk before it replaces the log
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            return True
        finally:
            os.close(fd)
