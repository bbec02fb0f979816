"""Pieces of the one-line messages every refusal ends in."""
from __future__ import annotations

from probex.errors import first_line  # noqa: F401  (re-exported: guard and read end messages with it)


def human_bytes(n: int) -> str:
    """Sizes in binary units everywhere (the upload limit is set in MiB): 256 MiB, never "268.4 MB"."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}".replace(".0 ", " ")
    return f"{n:,} B"


def short(value, limit: int = 80) -> str:
    """A user-supplied name or value, quoted and clipped so messages stay one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
