"""What switching LoRA adapters between requests costs the local model.

    python bench/lora_switch.py [--requests 16] [--rounds 3] [--rank 8]

Two tenants run with two different random rank-8 adapters (made with the same code as
``memcube-proxy adapters make-test``). Through the HTTP API, sequences of 32-token
generations alternate A, B, A, B (every request switches adapter) or stay on A
(none does); the two patterns run in turns, ``--rounds`` times each, side by side.
Generations are held at exactly 32 tokens (the end tokens are banned). Memory is off,
so only the adapter differs.

Each request has its own prompt (as different users' requests do), so neither pattern
reuses the previous request's KV cache: the difference is the switch itself. The run
is repeated with one prompt for every request, where staying on A also reuses the
whole prompt's KV cache and a switch cannot (a KV cache computed under another adapter
is wrong, so the context is cleared): that figure is the price of a switch when the
same prompt repeats. Progress on stderr; one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memory import offline  # noqa: E402

offline.configure()

from memory.parametric import make_test_adapter  # noqa: E402
from proxy.app import create_app  # noqa: E402
from proxy.backends.llamacpp import LlamaCppBackend, default_model_path  # noqa: E402
from proxy.settings import (  # noqa: E402
    AdapterConfig,
    AuthSettings,
    MemorySettings,
    ModelConfig,
    Settings,
    TenantConfig,
)
from proxy.testing.live import Live, serve  # noqa: E402

TOKENS = 32
PROMPT = [{"role": "user", "content": "Tell me about the sea."}]
KEYS = {"a": "sk-a", "b": "sk-b"}


def log(msg: str) -> None:
    print(f"[lora_switch] {msg}", file=sys.stderr, flush=True)


_serial = iter(range(10**9))


def run(live: Live, tenants: list[str], bias: dict[str, float], distinct: bool) -> float:
    """Seconds for the requests in order, one after another."""
    clients = {t: openai.OpenAI(base_url=live.base_url, api_key=KEYS[t], max_retries=0)
               for t in set(tenants)}
    start = time.perf_counter()
    for tenant in tenants:
        messages = ([{"role": "system", "content": f"Request {next(_serial)}. Be brief."},
                     *PROMPT] if distinct else PROMPT)
        reply = clients[tenant].chat.completions.create(
            model="local", messages=messages, max_tokens=TOKENS, temperature=0,  # type: ignore[arg-type]
            logit_bias=bias)
        assert reply.usage is not None and reply.usage.completion_tokens >= TOKENS - 1
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lora-switch-"))
    base = default_model_path()
    log(f"writing two rank-{args.rank} adapters")
    for name, seed in (("a", 1), ("b", 2)):
        make_test_adapter(base, work / f"{name}.gguf", rank=args.rank, seed=seed)
    settings = Settings(
        data_dir=work / "data", models=[ModelConfig(name="local", backend="llamacpp")],
        auth=AuthSettings(enabled=True),
        adapters=[AdapterConfig(name=n, path=str(work / f"{n}.gguf")) for n in KEYS],
        tenants=[TenantConfig(id=n, api_keys=[k], adapter=n) for n, k in KEYS.items()],
        memory=MemorySettings(enabled=False))
    n = args.requests
    patterns = {"alternating": ["a", "b"] * (n // 2), "same": ["a"] * n}
    times: dict[tuple[str, bool], list[float]] = {(k, d): [] for k in patterns
                                                  for d in (True, False)}
    with serve(create_app(settings)) as live:
        backend = live.context.backends["local"]
        assert isinstance(backend, LlamaCppBackend)
        # The end tokens banned, to hold every generation at 32.
        bias = {str(t): -100.0 for t in backend.end_token_ids()}
        run(live, ["a", "b"], bias, True)  # warm up: load both, first prefill
        for r in range(args.rounds):
            for distinct in (True, False):
                # Which pattern goes first changes every round, so drift hits both alike.
                names = list(patterns) if r % 2 == 0 else list(reversed(patterns))
                for name in names:
                    order = patterns[name]
                    seconds = run(live, order, bias, distinct)
                    times[(name, distinct)].append(seconds)
                    log(f"round {r + 1}: {name}, {'distinct' if distinct else 'one'} prompt: "
                        f"{seconds:.2f}s for {n} generations")
        loads = backend.adapter_stats.loads
    per: dict[Any, float] = {k: statistics.median(v) / n for k, v in times.items()}

    def cost(distinct: bool) -> float:
        same = per[("same", distinct)]
        return (per[("alternating", distinct)] - same) / same

    print(json.dumps({
        "bench": "lora_switch", "model": "SmolLM2-135M-Instruct Q4_1", "rank": args.rank,
        "tokens_per_generation": TOKENS, "generations": n, "rounds": args.rounds,
        "distinct_prompts": {"alternating_s": round(per[("alternating", True)], 4),
                             "same_s": round(per[("same", True)], 4),
                             "switch_cost_fraction": round(cost(True), 4)},
        "one_prompt": {"alternating_s": round(per[("alternating", False)], 4),
                       "same_s": round(per[("same", False)], 4),
                       "switch_cost_fraction": round(cost(False), 4)},
        "adapter_loads": loads, "target_met": cost(True) < 0.05}))


if __name__ == "__main__":
    main()
