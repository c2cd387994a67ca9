"""Peer-supplied text on its way to a log: escaped and capped."""

from __future__ import annotations

from federation.untrusted import shown


def test_control_characters_are_escaped_and_long_text_is_capped() -> None:
    assert shown("v1.2") == "v1.2"
    assert shown("a\nb\r\x1b[31m\u2028") == "a\\nb\\r\\x1b[31m\\u2028"
    long = shown("y" * 10_000, 50)
    assert long == "y" * 50 + "... (9950 more characters)"
    assert "\n" not in shown("\n" * 500)
