"""Replies name the model the client asked for.

An upstream answers with its own name for the model (``gpt-4o-mini-2024-07-18`` for
``gpt-4o-mini``, ``fake-model`` behind a model configured as ``fake``). Clients match
on the name they sent, so replies and stream chunks carry it, and the upstream's own
name goes in the ``X-Memcube-Upstream-Model`` response header. Relayed bytes are
rewritten in place, not re-encoded, where the upstream wrote the field as JSON does.
"""

from __future__ import annotations

import json
from typing import Any


def _holder(data: dict[str, Any]) -> dict[str, Any] | None:
    """The object naming the model: the reply itself, or a Responses event's response."""
    if "model" in data:
        return data
    response = data.get("response")
    return response if isinstance(response, dict) and "model" in response else None


def rename(data: dict[str, Any], raw: bytes | None,
           name: str) -> tuple[bytes | None, str | None]:
    """Name ``name`` as the model in ``data`` (in place) and in ``raw``.

    Returns the bytes to send (None: encode ``data`` again) and the upstream's own name,
    or None when it already was ``name``."""
    holder = _holder(data)
    old = holder.get("model") if holder is not None else None
    if holder is None or not isinstance(old, str) or old == name:
        return raw, None
    holder["model"] = name
    if raw is not None:
        # A string's inner quotes are escaped in JSON, so this matches only the key.
        was, now = json.dumps(old).encode(), json.dumps(name).encode()
        for key in (b'"model":', b'"model": '):
            if key + was in raw:
                return raw.replace(key + was, key + now), old
        return None, old
    return raw, old
