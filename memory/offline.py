"""Keep libraries off the network: call :func:`configure` before importing litellm or tiktoken.

litellm fetches its model cost map from the web at import, and tiktoken downloads
its encoding files on first use. litellm ships both (the map as a backup, the
cl100k/o200k files under ``litellm_core_utils/tokenizers``), so point them there.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


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
