"""Secrets never become memories: API keys, passwords and card numbers are masked
before an item is written. Patterns lean towards masking too much, not too little.
"""

from __future__ import annotations

import re

MASK = "[REDACTED]"

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # Provider keys and tokens: sk-..., sk-proj-..., ghp_..., xoxb-..., AKIA..., AIza..., JWTs.
    (re.compile(r"\b(?:sk|pk|rk)-(?:[A-Za-z0-9_-]{2,20}-)?[A-Za-z0-9_-]{16,}\b"), MASK),
    (re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr|github_pat)_[A-Za-z0-9_]{20,}\b"), MASK),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"), MASK),
    (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), MASK),
    (re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"), MASK),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\b"), MASK),
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{16,}"), f"Bearer {MASK}"),
    # "password: hunter2", "my password is hunter2", "api_key=...", "secret = ..."
    (re.compile(
        r"(?i)\b(pass(?:word|phrase|wd)?|pwd|api[ _-]?key|secret|token|access[ _-]?key)"
        r"(\s*(?:is|:|=)\s*|\s+)([\"']?)(\S+?)\3(?=[\s,;.!?]|$)"
    ), rf"\1\2\3{MASK}\3"),
]

_CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _mask_card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    return MASK if 13 <= len(digits) <= 19 and _luhn_ok(digits) else match.group(0)


def redact(text: str) -> str:
    """The text with secrets masked."""
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return _CARD.sub(_mask_card, text)
