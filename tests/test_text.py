"""`pipeline.core.text`: strings from artifacts printed with control characters escaped."""

from __future__ import annotations

import json

from pipeline.core.text import printable, printable_json


def test_printable_escapes_controls_and_keeps_ordinary_unicode():
    assert printable("a\x00b\x1b[31mc\x9bd\u202ee\x7f") == "a\\x00b\\x1b[31mc\\x9bd\\u202ee\\x7f"
    assert printable("Привет 日本 café 🙂") == "Привет 日本 café 🙂"
    assert printable("line\nbreak\ttab\r\u2028\U000e0001") == (
        "line\\nbreak\\ttab\\r\\u2028\\U000e0001"
    )
    assert printable("C:\\models\\x") == "C:\\models\\x"  # backslashes are left alone
    assert printable(None) == "None" and printable(3) == "3"


def test_printable_json_is_the_same_value_with_nothing_raw():
    value = {"name": "x\x1b[31m\x9b\u202e Привет \U000e0001", "n": [1, 2]}
    text = printable_json(value, indent=2)
    assert json.loads(text) == value
    assert text.isascii() is False and "Привет" in text  # ordinary Unicode stays readable
    assert not any(ch in text for ch in "\x1b\x9b\u202e\U000e0001")
    assert "\\u202e" in text and "\\udb40\\udc01" in text
