"""The errors a user can cause.

Every failure that comes from what a user sends (a file, a link, a text) is a ``ProbexError``. Its message is ONE
specific line, fit to print after ``error:`` in the CLI or to show in the app; no traceback is needed to act on it.
"""
from __future__ import annotations


class ProbexError(Exception):
    """A failure the user caused and can fix; ``str()`` is one line."""

    def __init__(self, message: str):
        # multi-line messages break the CLI's `error: …` contract and the app's message box
        super().__init__(" ".join(str(message).split()))


class InputError(ProbexError):
    """The file / link / text is unusable (not safetensors, pickle, truncated, unknown adapter…)."""


class NoExpertError(ProbexError):
    """The file is readable, but no tree expert fits it (the message names the base it looks like)."""


def first_line(err: BaseException, limit: int | None = 200) -> str:
    """A caught exception's message as one line to quote in ours: its first line (its type's name if it has none),
    cut at ``limit`` characters (None: uncut)."""
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__
