"""Keep libraries off the network: call :func:`configure` before importing litellm or tiktoken.

litellm fetches its model cost map from the web at import, and tiktoken downloads
its encoding files on first use. litellm ships both (the map as a backup, the
cl100k/o200k files under ``litellm_core_utils/tokenizers``), so point them there.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tiktoken


def litellm_tokenizers_dir() -> Path | None:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "litellm_core_utils" / "tokenizers"
    return path if path.is_dir() else None


def configure() -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_TELEMETRY", "False")
    tokenizers = litellm_tokenizers_dir()
    if tokenizers is not None:
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(tokenizers))


@lru_cache(maxsize=4)
def tiktoken_encoding(name: str) -> tiktoken.Encoding:
    """A tiktoken encoding (``cl100k_base``, ``o200k_base``) read from the copies
    litellm ships, never downloaded; loaded once (about 0.3 s: call it off the loop)."""
    configure()
    import tiktoken

    return tiktoken.get_encoding(name)
