"""Strings from users (run names, labels, log columns, error messages) made safe to show.

A run name or a CSV header can hold anything: ANSI escape sequences that recolour or clear
a terminal, NUL bytes, bidirectional overrides (U+202E RIGHT-TO-LEFT OVERRIDE makes
``exe.txt`` read ``txt.exe``), dollar signs that matplotlib parses as mathtext, or ten
thousand characters. :func:`printable` turns every control or invisible formatting
character into a visible escape (``\\x1b``, ``\\u202e``) and shortens the text;
:func:`plot_label` also escapes ``$`` so matplotlib draws it as text. Both are pure.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any

# Bidi embeddings/overrides/isolates and marks, zero-width characters, the BOM.
_INVISIBLE = frozenset(
    [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C,
     0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF]
)
ELLIPSIS = "..."


def _escape_char(ch: str, newlines: bool) -> str:
    if ch == "\n" and newlines:
        return ch
    if ch == "\t":
        return " "
    code = ord(ch)
    if code in _INVISIBLE or unicodedata.category(ch) in ("Cc", "Cs"):
        return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"
    return ch


def printable(text: object, *, limit: int | None = None, newlines: bool = False) -> str:
    """``str(text)`` with control, bidi-override and zero-width characters shown as
    escapes (``\\x1b``, ``\\x00``, ``\\u202e``), newlines too unless ``newlines``, cut to
    ``limit`` characters (the cut marked with ``...``)."""
    s = str(text)
    if limit is not None and len(s) > 4 * limit:  # do not scan megabytes to show 80 chars
        s = s[: 4 * limit]
    out = "".join(_escape_char(ch, newlines) for ch in s)
    if limit is not None and len(out) > limit:
        out = out[: max(0, limit - len(ELLIPSIS))] + ELLIPSIS
    return out


def plot_label(text: object, *, limit: int = 40) -> str:
    """A label for a matplotlib figure: :func:`printable`, at most ``limit`` characters,
    and ``$`` escaped so that ``$\\undefinedmacro$`` is drawn as text, not parsed as
    mathtext."""
    return printable(text, limit=limit).replace("$", r"\$")

def fmt(x: Any) -> str:
    """A number for tables (3 significant digits, ``NaN`` for non-finite); other values
    as ``str``."""
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, (int, float)):
        if isinstance(x, float) and not math.isfinite(x):
            return "NaN"
        return f"{x:.3g}" if isinstance(x, float) else str(x)
    return str(x)
