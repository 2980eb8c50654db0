"""Text that is safe to show on a terminal: control characters made visible.

File names and file contents are data from anyone who can write into a watched folder.
Printed raw, ``ESC ] 0 ; title BEL`` retitles the terminal, ``ESC [ 2 K`` erases the line
(hiding what came before), ``ESC [ 31 m`` recolours everything after, and C1 codes
(``\\x9b`` is a one-byte CSI on some terminals) do the same without an ESC. Everything
the CLI and the dashboard print from a path, a snippet or a daemon message goes through
:func:`printable`; ``--json`` output does not, so that it stays exact.
"""

from __future__ import annotations

# C0 controls (tab and newline included: every field shown is one line), DEL, C1 controls,
# and the invisible characters that reorder or break a line (bidirectional overrides and
# isolates, as in "Trojan Source"; the Unicode line and paragraph separators).
_NAMED = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
_TABLE: dict[int, str] = {
    **{c: _NAMED.get(c, f"\\x{c:02x}") for c in range(0x20)},
    0x7F: "\\x7f",
    **{c: f"\\x{c:02x}" for c in range(0x80, 0xA0)},
    **{c: f"\\u{c:04x}" for c in (0x061C, 0x200E, 0x200F, 0x2028, 0x2029)},
    **{c: f"\\u{c:04x}" for c in range(0x202A, 0x202F)},
    **{c: f"\\u{c:04x}" for c in range(0x2066, 0x206A)},
}


def printable(text: object) -> str:
    """``text`` as one line with every control character written as an escape (``\\x1b``)."""
    return str(text).translate(_TABLE)


def is_printable(text: str) -> bool:
    """True when :func:`printable` would leave ``text`` unchanged."""
    return not any(ord(ch) in _TABLE for ch in text)
