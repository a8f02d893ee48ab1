"""The embedded all-MiniLM-L6-v2 served on ``POST /v1/embeddings``.

Memory's own embedder is shared when it is this model (``memory.embedder.backend:
local`` with memory on); otherwise a MiniLM is loaded on the first request, from
``memory.embedder.cache_dir`` (default ``data_dir/models``). Every step of a request,
decoding token ids, tokenizing, embedding and encoding the reply, runs on this
module's threads, never on the event loop; llama.cpp itself runs on the embedder's one
compute thread (see :mod:`memory.embedding.minilm`).

Token id inputs are decoded with tiktoken's ``cl100k_base``, as LangChain's
``OpenAIEmbeddings`` encodes them, and embedded as the text they spell. An input
longer than MiniLM's window (256 tokens, [CLS] and [SEP] included) is refused, never
cut: a vector of part of a text would pass for the vector of all of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from memory import offline
from memory.embedding.base import Embedder
from memory.embedding.minilm import DIM, MAX_TOKENS, MiniLMEmbedder
from proxy.embeddings.protocol import EmbeddingRequest, encode_vector
from proxy.errors import InvalidRequestError, ProxyError

log = logging.getLogger(__name__)

#: What LangChain's OpenAIEmbeddings (and OpenAI's own examples) tokenize with.
TOKEN_ENCODING = "cl100k_base"


class LocalEmbeddings:
    """``name``: the ``model`` clients send. ``load``: builds a MiniLM (blocking; called
    at most once, off the loop). ``shared``: memory's embedder, or None while it has none."""

    def __init__(self, name: str, load: Callable[[], MiniLMEmbedder],
                 shared: Callable[[], Embedder | None]) -> None:
        self.name = name
        self._load = load
        self._shared = shared
        self._own: MiniLMEmbedder | None = None
        self._loading: asyncio.Lock | None = None
        # Two threads: one request's tokens are counted while another's are embedded.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="embeddings")

    async def embedder(self) -> MiniLMEmbedder:
        """Memory's MiniLM when it has one, else this app's own, loaded on first use."""
        shared = self._shared()
        if isinstance(shared, MiniLMEmbedder):
            return shared
        if self._own is None:
            if self._loading is None:
                self._loading = asyncio.Lock()
            async with self._loading:
                if self._own is None:
                    loop = asyncio.get_running_loop()
                    try:
                        self._own = await loop.run_in_executor(self._pool, self._load)
                    except Exception as exc:
                        log.exception("loading the embedded embeddings model failed")
                        raise ProxyError(
                            f"The embedded model '{self.name}' could not be loaded "
                            f"({type(exc).__name__}); see the proxy's log.",
                            status=503, code="model_unavailable") from None
        return self._own

    @property
    def loaded(self) -> MiniLMEmbedder | None:
        """The MiniLM this app loaded itself (None: none, or memory's is shared)."""
        return self._own

    async def create(self, req: EmbeddingRequest) -> bytes:
        """The reply to a validated request, as JSON bytes."""
        if req.dimensions is not None and req.dimensions != DIM:
            raise InvalidRequestError(
                f"Invalid value for 'dimensions': {self.name} gives {DIM}-dimensional "
                f"vectors only, not {req.dimensions}.", param="dimensions",
                code="invalid_value")
        embedder = await self.embedder()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._create, embedder, req)

    def _create(self, embedder: MiniLMEmbedder, req: EmbeddingRequest) -> bytes:
        texts = _texts(req)
        counts = [embedder.count_tokens(text) for text in texts]
        for index, count in enumerate(counts):
            if count > MAX_TOKENS:
                param = req.input_param(index)
                raise InvalidRequestError(
                    f"Invalid value for '{param}': it is {count} tokens long; {self.name} "
                    f"reads at most {MAX_TOKENS} ([CLS] and [SEP] included). Split it into "
                    "shorter inputs.", param=param, code="invalid_value")
        vectors = embedder.embed(texts)
        data = [{"object": "embedding", "index": index,
                 "embedding": encode_vector(vector, req.encoding_format)}
                for index, vector in enumerate(vectors)]
        tokens = sum(counts)
        return json.dumps({"object": "list", "data": data, "model": self.name,
                           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                          separators=(",", ":")).encode()

    def close(self) -> None:
        """Release the MiniLM this app loaded (memory's own is memory's to close)."""
        own, self._own = self._own, None
        if own is not None:
            own.close()
        self._pool.shutdown(wait=True)


def _texts(req: EmbeddingRequest) -> list[str]:
    """Each input as text: token id lists decoded with :data:`TOKEN_ENCODING`."""
    inputs = req.inputs()
    if not inputs or isinstance(inputs[0], str):
        return inputs  # type: ignore[return-value]  # list[str]
    encoding = offline.tiktoken_encoding(TOKEN_ENCODING)
    texts = []
    for index, ids in enumerate(inputs):
        assert isinstance(ids, list)
        try:
            texts.append(encoding.decode(ids))
        except KeyError:
            raise _unknown_token(req, index, ids) from None
    return texts


def _unknown_token(req: EmbeddingRequest, index: int, ids: list[int]) -> InvalidRequestError:
    encoding = offline.tiktoken_encoding(TOKEN_ENCODING)
    position = 0
    for position, token in enumerate(ids):  # noqa: B007 - the position is the answer
        try:
            encoding.decode_single_token_bytes(token)
        except KeyError:
            break
    param = f"{req.input_param(index)}.[{position}]"
    return InvalidRequestError(
        f"Invalid value for '{param}': {ids[position]} is no token of {TOKEN_ENCODING}, the "
        "encoding token id inputs are read with.", param=param, code="invalid_value")
