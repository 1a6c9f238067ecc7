"""Strings read from artifacts, made safe to print on a terminal or in a log.

A store's attributes, a manifest or a checkpoint are data someone else wrote: a teacher name
holding `\\x1b[31m` would recolour (or, with other escape sequences, retitle or rewrite) the
terminal of whoever runs `softlabels inspect`, and a right-to-left override (U+202E) makes a
name read as something else. Every such string goes through `printable` before it is printed or
logged; `printable_json` does the same for JSON output. Ordinary text (Cyrillic, CJK, accents,
emoji) is kept as is: only the characters that do not print escape.

Escaped: Unicode categories Cc (C0 and C1 controls, DEL), Cf (format characters: bidi
overrides and isolates, zero-width joiners, soft hyphen, BOM, tags), Zl and Zp (line and
paragraph separators, which break a one-line message) and Cs (lone surrogates, from undecodable
file names), written the way Python's `repr` writes them (`\\n`, `\\x1b`, `\\u202e`,
`\\U000e0001`). Backslashes themselves are left alone, so paths stay readable.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

UNPRINTABLE = ("Cc", "Cf", "Zl", "Zp", "Cs")
"""Unicode general categories that `printable` escapes (module docstring)."""
_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _unprintable(ch: str) -> bool:
    return unicodedata.category(ch) in UNPRINTABLE


def _escape(ch: str) -> str:
    if ch in _SHORT:
        return _SHORT[ch]
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(value: Any) -> str:
    """`value` as text (`str(value)` for a non-string) with every control, format and separator
    character escaped repr-style (module docstring); other characters unchanged."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():  # the common case: nothing to escape (spaces are printable)
        return text
    return "".join(_escape(ch) if _unprintable(ch) else ch for ch in text)


def printable_json(obj: Any, **dumps: Any) -> str:
    """`json.dumps(obj, ensure_ascii=False, **dumps)` with the characters `printable` escapes
    written as `\\uXXXX` escapes (surrogate pairs above U+FFFF): the same JSON value, safe to
    print, other Unicode kept readable. JSON's own escapes already cover C0 controls inside
    strings; the layout's newlines (with `indent`) are kept."""
    text = json.dumps(obj, ensure_ascii=False, **dumps)
    out = []
    for ch in text:
        if ch == "\n" or not _unprintable(ch):  # a raw "\n" is only ever layout (JSON rule)
            out.append(ch)
            continue
        code = ord(ch)
        if code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
    return "".join(out)
