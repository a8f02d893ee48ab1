"""``memcube-proxy doctor``: whether the embedded models run on this machine.

It prints the platform and the CPU's features, llama.cpp's account of its build, and
the settings each embedded model runs with and why. Then it runs a self-test in a
child process: MiniLM embeds a batch, and each local chat model prefills 1,000 tokens
and generates 16, all through the proxy's own classes. A native crash kills only the
child; the doctor names the step it died in, shows the child's last words, and exits 1.

The child speaks one JSON object a line on stdout: ``{"step", "event": "start"}``, then
``{"step", "event": "ok", "seconds", "count", "unit"}`` or ``{"step", "event": "error",
"error"}``. ``bench/native.py`` runs the same child with other sizes and settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from proxy.settings import Settings

#: Steps a test of the default settings runs: the crash paths of issue 13.
PREFILL_TOKENS = 1000
GENERATE_TOKENS = 16
EMBED_TEXTS = 32


@dataclass
class ChatModelSpec:
    name: str
    path: str | None
    n_ctx: int
    n_threads: int | None
    extra_buffer_types: bool


@dataclass
class SelfTestSpec:
    """What the child loads and runs."""

    embedder_dir: str | None  # None: the embedder is remote, not tested here
    embedder_extra_buffer_types: bool
    models: list[ChatModelSpec]
    prefill: int = PREFILL_TOKENS
    generate: int = GENERATE_TOKENS
    embed: int = EMBED_TEXTS
    repeat: int = 1

    @classmethod
    def from_settings(cls, settings: Settings) -> SelfTestSpec:
        emb = settings.memory.embedder
        local_embedder = emb.backend == "local"
        return cls(
            embedder_dir=str(emb.cache_dir or settings.data_dir / "models") if local_embedder else None,
            embedder_extra_buffer_types=emb.extra_buffer_types,
            models=[ChatModelSpec(name=m.name, path=m.path, n_ctx=m.n_ctx, n_threads=m.n_threads,
                                  extra_buffer_types=m.extra_buffer_types)
                    for m in settings.models if m.backend == "llamacpp"])

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SelfTestSpec:
        raw = json.loads(text)
        raw["models"] = [ChatModelSpec(**m) for m in raw["models"]]
        return cls(**raw)


# -- the report ---------------------------------------------------------------------------

def report(settings: Settings) -> str:
    import llama_cpp

    from memory.native import cpu_features, has_amx, system_info, why
    from proxy.backends.llamacpp import PROMPT_CHUNK, default_model_path

    name, features = cpu_features()
    lines = [
        f"platform:  {platform.platform()}, Python {platform.python_version()}, "
        f"llama-cpp-python {llama_cpp.__version__}",
        f"cpu:       {name}, {os.cpu_count()} logical cores",
        f"features:  {' '.join(features) or '(none of interest found)'}",
        f"llama.cpp: {system_info()}",
        "models:",
    ]
    amx = has_amx(features)
    for m in settings.models:
        if m.backend != "llamacpp":
            lines.append(f"  {m.name}: upstream ({m.model}), nothing runs here")
            continue
        path = m.path or str(default_model_path())
        lines += [
            f"  {m.name}: llama.cpp, {path}",
            f"    n_ctx {m.n_ctx}, threads {m.n_threads or os.cpu_count()}, prompt chunks of "
            f"{PROMPT_CHUNK} tokens at fixed positions (temperature 0 repeats exactly)",
            f"    extra buffer types {why(m.extra_buffer_types)}",
        ]
        if m.extra_buffer_types and amx:
            lines.append("    warning: this CPU has AMX, which extra buffer types use")
    emb = settings.memory.embedder
    if emb.backend == "local":
        where = emb.cache_dir or settings.data_dir / "models"
        lines += [f"  embedder: all-MiniLM-L6-v2 (q8_0) on llama.cpp, converted into {where}",
                  f"    extra buffer types {why(emb.extra_buffer_types)}"]
        if emb.extra_buffer_types and amx:
            lines.append("    warning: this CPU has AMX, which extra buffer types use")
    else:
        lines.append(f"  embedder: {emb.model} through litellm, nothing runs here")
    return "\n".join(lines)


# -- the parent: run the child, follow its steps ------------------------------------------

@dataclass
class StepResult:
    step: str
    seconds: float
    count: int
    unit: str

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


@dataclass
class SelfTest:
    """How a child run went: the steps that passed, and the one that failed (if any)."""

    passed: list[StepResult] = field(default_factory=list)
    failed_step: str | None = None
    problem: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.failed_step is None and not self.problem


def child_command(spec: SelfTestSpec) -> list[str]:
    return [sys.executable, "-m", "proxy.doctor", "--child", spec.to_json()]


def run_selftest(command: list[str], *, timeout: float, echo: bool = False) -> SelfTest:
    """Run a self-test child and read its steps as they come; ``echo`` prints them."""
    result = SelfTest()
    current: str | None = None
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            bufsize=1)
    # stderr is drained by a thread so a chatty child cannot block on a full pipe.
    err_lines: list[str] = []
    drain = threading.Thread(target=lambda: err_lines.extend(proc.stderr or []), daemon=True)
    drain.start()
    expired = threading.Event()

    def stop() -> None:
        expired.set()
        proc.kill()

    timer = threading.Timer(timeout, stop)
    timer.start()
    try:
        for raw in proc.stdout or []:
            try:
                event = json.loads(raw)
            except ValueError:
                continue  # a library's own print
            step = str(event.get("step", "?"))
            if event.get("event") == "start":
                current = step
                if echo:
                    print(f"  {step} ...", end="", flush=True)
            elif event.get("event") == "ok":
                done = StepResult(step=step, seconds=float(event["seconds"]),
                                  count=int(event.get("count", 0)), unit=str(event.get("unit", "")))
                result.passed.append(done)
                current = None
                if echo:
                    print(" ok, " + describe(done), flush=True)
            elif event.get("event") == "error":
                result.failed_step, result.problem = step, str(event.get("error"))
                current = None
                if echo:
                    print(" FAILED", flush=True)
        code = proc.wait()
    finally:
        timer.cancel()
    drain.join(timeout=5)
    result.stderr = "".join(err_lines)
    if result.failed_step is None and code != 0:
        result.failed_step = current or "starting the self-test"
        if echo and current:
            print(" FAILED", flush=True)
        if expired.is_set():
            result.problem = f"no result in {timeout:.0f} s; the child was stopped"
        elif code < 0:
            result.problem = f"the child process died of {_signal_name(-code)}: a native crash"
        else:
            result.problem = f"the child process exited with status {code}"
    return result


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe(step: StepResult) -> str:
    if step.count and step.unit:
        return f"{step.seconds:.2f} s ({step.rate:,.0f} {step.unit}/s)"
    return f"{step.seconds:.2f} s"


def failure_message(test: SelfTest) -> str:
    tail = "\n".join(test.stderr.strip().splitlines()[-20:])
    text = f"self-test FAILED at step '{test.failed_step}': {test.problem}"
    if tail:
        text += "\nthe child's last output on stderr:\n" + tail
    text += ("\nIf extra_buffer_types is on for a model, turn it off; if not, please report "
             "this output with the lines above.")
    return text


def doctor(settings: Settings, *, timeout: float) -> int:
    print("MemCube Proxy doctor")
    print(report(settings))
    spec = SelfTestSpec.from_settings(settings)
    print(f"self-test, in a child process (embed {spec.embed} texts; per chat model: prefill "
          f"{spec.prefill} tokens, generate {spec.generate}):", flush=True)
    test = run_selftest(child_command(spec), timeout=timeout, echo=True)
    if not test.ok:
        print(failure_message(test), file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


# -- the child ----------------------------------------------------------------------------

def _emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


@contextmanager
def _step(name: str, count: int = 0, unit: str = "") -> Iterator[dict[str, Any]]:
    """Announce a step, time it, report it; ``out["count"]`` may be set inside."""
    _emit(step=name, event="start")
    out: dict[str, Any] = {"count": count}
    start = time.perf_counter()
    try:
        yield out
    except Exception as exc:
        _emit(step=name, event="error", error=f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from None
    _emit(step=name, event="ok", seconds=time.perf_counter() - start, count=out["count"], unit=unit)


def _texts(n: int) -> list[str]:
    """Sentences of one to three clauses, as memories are."""
    clauses = ["the user lives in Lisbon", "they keep a parrot named Pepper",
               "their sister plays the cello on Sundays", "they are allergic to peanuts",
               "the standup moved to 9:30", "they read books about astronomy"]
    return [f"Note {i}: " + ", and ".join(clauses[(i + k) % len(clauses)] for k in range(1 + i % 3)) + "."
            for i in range(n)]


def _embed(spec: SelfTestSpec) -> None:
    from memory.embedding.minilm import MiniLMEmbedder

    assert spec.embedder_dir is not None
    with _step("load the embedder"):
        embedder = MiniLMEmbedder(Path(spec.embedder_dir),
                                  extra_buffer_types=spec.embedder_extra_buffer_types)
    texts = _texts(spec.embed)
    for _ in range(spec.repeat):
        with _step(f"embed a batch of {len(texts)} texts", len(texts), "texts"):
            vectors = embedder.embed(texts)
            if len(vectors) != len(texts) or any(abs(sum(x * x for x in v) - 1) > 1e-3 for v in vectors):
                raise RuntimeError("the embedder returned vectors that are not unit length")
    embedder.close()


async def _chat(spec: SelfTestSpec, model: ChatModelSpec) -> None:
    from proxy.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(name=model.name, path=Path(model.path) if model.path else None,
                              n_ctx=model.n_ctx, n_threads=model.n_threads,
                              extra_buffer_types=model.extra_buffer_types)
    with _step(f"load {model.name}"):
        await backend.start()
    target = min(spec.prefill, model.n_ctx - spec.generate - 32)
    sentences = _texts(target)
    for run in range(spec.repeat):
        # Each run starts differently, so none reuses the last one's tokens.
        body: dict[str, Any] = {"temperature": 0, "max_tokens": spec.generate,
                                "stream_options": {"include_usage": True}}
        text = f"Run {run}."
        for sentence in sentences:  # at least ``target`` tokens, a sentence more at most
            text += " " + sentence
            body["messages"] = [{"role": "user", "content": text}]
            if backend.prompt_tokens(body) >= target:
                break
        prompt = backend.prompt_tokens(body)
        stream = backend.stream(body)
        pieces: list[str] = []
        with _step(f"prefill {prompt} tokens ({model.name})", prompt, "tokens"):
            async for chunk in stream:  # the first content piece comes after the prefill
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    pieces.append(chunk["choices"][0]["delta"]["content"])
                    break
        with _step(f"generate {spec.generate} tokens ({model.name})", 0, "tokens") as gen:
            async for chunk in stream:
                if chunk["choices"]:
                    pieces.append(chunk["choices"][0]["delta"].get("content") or "")
                if chunk.get("usage"):  # the first token came with the prefill
                    gen["count"] = max(0, chunk["usage"]["completion_tokens"] - 1)
        with _step(f"repeat it at temperature 0 ({model.name})"):
            # The context now holds this prompt: the repeat reuses all but its last chunk.
            again = (await backend.complete(body)).data["choices"][0]["message"]["content"]
            if again != "".join(pieces):
                raise RuntimeError(f"temperature 0 gave another text the second time: "
                                   f"{''.join(pieces)!r}, then {again!r}")
    with _step(f"answer in JSON under a grammar ({model.name})"):  # response_format
        fmt = {"type": "json_schema", "json_schema": {"name": "check", "schema": {
            "type": "object", "required": ["colours"], "properties": {
                "colours": {"type": "array", "items": {"type": "string"}, "maxItems": 3}}}}}
        reply = await backend.complete({"messages": [{"role": "user", "content": "Name "
                                        "three colours."}], "temperature": 0,
                                        "max_tokens": 64, "response_format": fmt})
        json.loads(reply.data["choices"][0]["message"]["content"])  # raises unless JSON
    await backend.close()


def child(spec: SelfTestSpec) -> int:
    from memory import offline

    offline.configure()
    if spec.embedder_dir is not None:
        _embed(spec)
    for model in spec.models:
        asyncio.run(_chat(spec, model))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.doctor")
    parser.add_argument("--child", required=True, help="the self-test spec, as JSON")
    args = parser.parse_args(argv)
    return child(SelfTestSpec.from_json(args.child))


if __name__ == "__main__":
    sys.exit(main())
