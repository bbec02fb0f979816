"""Pieces of the one-line messages every refusal ends in."""
from __future__ import annotations

from probex.errors import first_line  # noqa: F401  (re-exported: guard and read end messages with it)


def human_bytes(n: int) -> str:
    """Sizes in binary units everywhere (the upload limit is set in MiB): 256 MiB, never "268.4 MB"."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}".replace(".0 ", " ")
    return f"{n:,} B"


def size_pair(size: int, limit: int) -> tuple[str, str]:
    """A size and the limit it broke, in the same binary units; exact byte counts where rounding would show the same
    figure on both sides (a file one byte over the limit)."""
    if human_bytes(size) == human_bytes(limit):
        return f"{size:,} bytes", f"{limit:,}-byte ({human_bytes(limit)})"
    return human_bytes(size), human_bytes(limit)


def over_limit(size: int, limit: int) -> str:
    """"300 MiB is over the 256 MiB limit" (size_pair's units)."""
    size_text, limit_text = size_pair(size, limit)
    return f"{size_text} is over the {limit_text} limit"


def short(value, limit: int = 80) -> str:
    """A user-supplied name or value, quoted and clipped so messages stay one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
