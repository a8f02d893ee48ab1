"""Embeddings from any remote embeddings API (OpenAI, Ollama, vLLM, ...) through litellm."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from memory import offline
from memory.embedding.base import Embedder
from memory.errors import MemoryUnavailable

logger = logging.getLogger(__name__)


class EmbeddingDimensionError(RuntimeError):
    """The API returned vectors of another size than the configured ``dim``."""


class LiteLLMEmbedder(Embedder):
    """``litellm.embedding`` behind the :class:`Embedder` interface.

    ``model`` is a litellm model string (``"openai/text-embedding-3-small"``,
    ``"ollama/nomic-embed-text"``, ...) and doubles as ``model_id``. ``dim`` is declared
    up front because stores are created before the first call; every reply is checked
    against it, so a misconfiguration fails loudly instead of corrupting a store.

    When the API cannot serve now (no connection, a timeout, 408, 429, 5xx) ``embed``
    raises :class:`MemoryUnavailable`, so that write-back waits for the API instead of
    spending an exchange's retries. Configuration errors (a bad model name, 401, 403,
    404, a wrong ``dim``) stay what they are: waiting would not mend them.
    """

    def __init__(
        self,
        model: str,
        dim: int,
        *,
        api_base: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if dim < 1:
            raise ValueError("dim must be positive")
        self.model_id = model
        self.dim = dim
        self._api_base = api_base
        self._api_key = api_key
        self._timeout = timeout
        self._extra = dict(extra or {})
        # litellm downloads its model cost map at import time unless told to use the
        # bundled copy; the memory layer must work offline.
        offline.configure()
        import litellm
        import openai

        self._litellm = litellm
        errors = litellm.exceptions
        # openai's own connection error (timeouts included) in case litellm lets one through.
        self._transient: tuple[type[BaseException], ...] = (
            errors.APIConnectionError, errors.Timeout, errors.RateLimitError,
            errors.InternalServerError, errors.ServiceUnavailableError, errors.BadGatewayError,
            openai.APIConnectionError)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        try:
            response = self._litellm.embedding(
                model=self.model_id,
                input=list(texts),
                api_base=self._api_base,
                api_key=self._api_key,
                timeout=self._timeout,
                **self._extra,
            )
        except Exception as exc:
            if not self._cannot_serve_now(exc):
                raise
            # The message names the failure's type only: API errors can quote the input.
            raise MemoryUnavailable(
                f"The embeddings API is unavailable ({type(exc).__name__}); try again later."
            ) from exc
        items = sorted(response.data, key=lambda item: _field(item, "index"))
        if len(items) != len(texts):
            raise RuntimeError(f"{self.model_id} returned {len(items)} embeddings for {len(texts)} texts")
        raw = [_field(item, "embedding") for item in items]
        sizes = sorted({len(vec) for vec in raw} - {self.dim})
        if sizes:
            raise EmbeddingDimensionError(
                f"{self.model_id} returned {sizes[0]}-dimensional vectors but dim={self.dim} is "
                "configured; set the embedder's dim to the model's output size"
            )
        vectors = np.asarray(raw, dtype=np.float64)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return (vectors / np.maximum(norms, 1e-12)).tolist()

    def _cannot_serve_now(self, exc: Exception) -> bool:
        if isinstance(exc, self._transient):
            return True
        # litellm raises its generic APIError for statuses it does not map (a 403 too).
        status = getattr(exc, "status_code", None)
        return isinstance(status, int) and (status in (408, 429) or status >= 500)


def _field(item: Any, name: str) -> Any:
    # litellm hands back plain dicts for some providers and pydantic objects for others.
    return item[name] if isinstance(item, dict) else getattr(item, name)
