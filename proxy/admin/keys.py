"""API keys at rest: the ``sha256:<hex>`` form, and new random keys.

Kept apart from :mod:`proxy.auth` so settings validation and the CLI can use it
without importing the web stack.
"""

from __future__ import annotations

import hashlib
import re
import secrets

PREFIX = "sha256:"
_HEX = re.compile(r"^[0-9a-f]{64}$")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def hashed_form(key: str) -> str:
    """What a config file may hold instead of the key itself."""
    return PREFIX + digest(key)


def stored_digest(configured: str) -> str:
    """The digest a configured key stands for: ``sha256:<hex>`` is taken as given."""
    if configured.startswith(PREFIX):
        hexdigest = configured[len(PREFIX):].lower()
        if not _HEX.match(hexdigest):
            raise ValueError("a `sha256:` key must be followed by 64 hex digits")
        return hexdigest
    if not configured.strip():
        raise ValueError("an API key must not be empty")
    return digest(configured)


def new_key(prefix: str = "sk-mc-") -> str:
    """A fresh random key (256 bits)."""
    return prefix + secrets.token_urlsafe(32)
