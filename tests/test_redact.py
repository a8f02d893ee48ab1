from __future__ import annotations

import pytest

from memory.redact import MASK, redact


@pytest.mark.parametrize(
    ("text", "secret"),
    [("my key is sk-proj-abcdefghijklmnop1234567890", "sk-proj-abcdefghijklmnop1234567890"),
     ("use sk-ABCDEFGHIJKLMNOPQRSTUVWX please", "sk-ABCDEFGHIJKLMNOPQRSTUVWX"),
     ("token ghp_abcdefghijklmnopqrstuvwxyz0123", "ghp_abcdefghijklmnopqrstuvwxyz0123"),
     ("aws AKIAABCDEFGHIJKLMNOP here", "AKIAABCDEFGHIJKLMNOP"),
     ("my password is hunter2!", "hunter2"),
     ("password: correct-horse", "correct-horse"),
     ("api_key=abc123def456", "abc123def456"),
     ("card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111"),
     ("card 4111-1111-1111-1111", "4111-1111-1111-1111"),
     ("Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345", "abcdefghijklmnopqrstuvwxyz012345")],
)
def test_secrets_are_masked(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out
    assert MASK in out


@pytest.mark.parametrize(
    "text",
    ["I live in Lisbon and like tea.",
     "My phone order number is 1234 5678 9012 3456",  # fails Luhn: not a card
     "We met on 8 May 2023 at 1:56 pm.",
     "The sky-blue kite cost 12 euros."],
)
def test_ordinary_text_is_unchanged(text: str) -> None:
    assert redact(text) == text
