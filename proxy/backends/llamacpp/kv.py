"""The llama context's KV state: what it holds, for whom, and how a request's prompt
gets there (activation memory and the chunk-aligned reuse of earlier tokens).

Runs on the worker thread (:mod:`.bridge`), which owns the context.
"""

from __future__ import annotations

import ctypes
import logging
import time
from typing import Any

import numpy as np

from memory.activation import State, StateCache
from proxy.backends.llamacpp.prompt import PrefixPlan
from proxy.backends.stats import ActivationStats

log = logging.getLogger(__name__)

#: Prompts are evaluated in chunks of this many tokens that start at multiples of it.
#: llama.cpp's CPU kernels change with a batch's shape (one token or many, a tile's
#: remainder), and other shapes give other floating-point sums: a repeated request
#: that reused the previous one's tokens and evaluated only its last token once gave
#: another text at temperature 0 (issue 13). With fixed chunks, every token of a prompt
#: is computed in the same batch however much of the prompt was cached. A 1k-token
#: prefill on two cores (median of 8) ran at 185 tokens/s in chunks of 64, 195 in 512
#: and 172 in 32, and bench/kv_ttft.py's cold prefill did not move measurably; a chunk
#: of 64 wastes at most 63 tokens of a reusable prefix.
PROMPT_CHUNK = 64

#: Whose tokens the context holds: the tenant and the identity of the adapter applied.
Owner = tuple[str, str | None]


def whole_chunks(n: int) -> int:
    """The largest multiple of PROMPT_CHUNK not above ``n``."""
    return max(0, n) // PROMPT_CHUNK * PROMPT_CHUNK


class ContextState:
    """The context's tokens and their bookkeeping; ``llm`` is set once the model is loaded.

    Activation memory: a request whose prompt starts with an activation prefix gets a
    context that holds exactly the prefix's saved state, restored (``hit``) or computed
    and saved (``miss``). The context is cleared before each such request and whenever
    the owner changes, so llama-cpp-python's own reuse of the longest matching token
    prefix never crosses a tenant boundary."""

    def __init__(self, states: StateCache | None) -> None:
        self.llm: Any = None
        self.states = states
        self.stats = ActivationStats()
        self.owner: Owner | None = None  # whose tokens the context holds
        # How many of the context's first tokens were computed in whole PROMPT_CHUNKs
        # from position 0, as a request computed from nothing computes them.
        self.chunked = 0

    def clear(self) -> None:
        import llama_cpp

        llm = self.llm
        llm.n_tokens = 0
        llm._requires_eval = True
        self.chunked = 0
        # Metadata only: the cells are freed; zeroing their data (data=True) would memset
        # the whole KV buffer, some 90 MB at n_ctx 4096, 20-25 ms on every tenant switch.
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), False)

    def prompt_evaluated(self, n: int) -> None:
        """The ``n`` tokens of a prompt are in, computed in whole chunks from position 0."""
        self.chunked = whole_chunks(n)

    def set_up(self, plan: PrefixPlan | None, owner: Owner, tokens: list[int]) -> str:
        """Put the context in the state this request starts from; hit, miss or none.

        With a prefix, the context holds exactly its saved state, and the prompt goes on
        from the prefix's end: hit and miss compute every token in the same batches."""
        if plan is None:
            if owner != self.owner:
                self.clear()  # never reuse another tenant's tokens
            self.owner = owner
            self._reuse(tokens)
            return "none"
        self.owner = owner
        assert self.states is not None
        start = time.perf_counter()  # a restore's time includes reading a file from disk
        found = self.states.get(plan.key)
        if found is not None and found[0].tokens == plan.tokens:
            self.clear()
            if self._restore(found[0]):
                self.stats.restore_seconds.add(time.perf_counter() - start)
                self.stats.hits += 1
                return "hit"
            log.warning("saved activation state did not load; rebuilding it")
            self.states.discard(plan.key)
        self._build(plan)
        self.stats.misses += 1
        return "miss"

    def saved(self, plan: PrefixPlan) -> bool:
        """Whether the state of ``plan``'s prefix is saved (neither a hit nor a miss)."""
        assert self.states is not None
        return self.states.has(plan.key)

    def rebuild(self, plan: PrefixPlan, owner: Owner) -> None:
        """Compute and save the state of ``plan``'s prefix ahead of its requests."""
        self.owner = owner
        self._build(plan)
        self.stats.rebuilds += 1

    def _restore(self, state: State) -> bool:
        import llama_cpp

        llm = self.llm
        n = state.nbytes
        buf = (ctypes.c_uint8 * n).from_buffer(state.data)  # no copy: read in place
        if llama_cpp.llama_state_seq_set_data(llm._ctx.ctx, buf, n, 0) != n:
            self.clear()
            return False
        count = len(state.tokens)
        llm.input_ids[:count] = state.tokens
        llm.n_tokens = count
        llm._requires_eval = True  # logits come from the next decode, not the state
        self.chunked = whole_chunks(count)  # _build computed it in chunks from 0
        return True

    def _reuse(self, tokens: list[int]) -> None:
        """Keep as much of the context as a request computed from nothing would have
        computed in the same chunks, and no more: the prefix it shares with ``tokens``,
        within the tokens computed in whole chunks, cut to a chunk boundary and short of
        the prompt's last chunk (whose last token gives the first logits). The next
        decode removes the rest and evaluates the prompt from there, chunk by chunk."""
        llm = self.llm
        limit = min(self.chunked, llm.n_tokens, whole_chunks(len(tokens) - 1))
        shared = 0
        if limit:
            differ = np.flatnonzero(llm.input_ids[:limit] != np.asarray(tokens[:limit]))
            shared = int(differ[0]) if differ.size else limit
        keep = whole_chunks(shared)
        llm.n_tokens = keep
        llm._requires_eval = True
        self.chunked = keep

    def _build(self, plan: PrefixPlan) -> None:
        """Compute the prefix from a clear context and save its state."""
        import llama_cpp

        llm = self.llm
        start = time.perf_counter()
        self.clear()
        llm.eval(list(plan.tokens))  # in PROMPT_CHUNKs from position 0
        self.chunked = whole_chunks(len(plan.tokens))
        n = llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0)
        data = bytearray(n)
        buf = (ctypes.c_uint8 * n).from_buffer(data)
        if llama_cpp.llama_state_seq_get_data(llm._ctx.ctx, buf, n, 0) == n:
            del buf  # release the export so the cache owns a plain bytearray
            assert self.states is not None
            self.states.put(plan.key, State(tokens=plan.tokens, data=data))
        self.stats.build_seconds.add(time.perf_counter() - start)
