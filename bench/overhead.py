"""Latency the proxy adds over calling the same upstream directly, and throughput.

Starts the scripted fake upstream and the proxy (`memcube-proxy serve`) as separate
processes, then drives both with one asyncio client, alternating direct and proxied
rounds so that they are measured side by side under the same conditions:

    python bench/overhead.py [--requests 400] [--rounds 3]

Rows: non-stream and stream, 1 and 20 concurrent clients, for the chat relay (the
direct transport, the default for OpenAI-compatible upstreams) and, for reference,
litellm; then, at 1 and 20 clients, the Responses API translated to chat (against the
upstream's chat endpoint called directly), the Responses API relayed natively (against
its /responses) and embeddings relayed (against its /embeddings).
Progress goes to stderr; one JSON line of figures to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

BODY = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
RESPONSES_BODY = {"input": "Say hello.", "max_output_tokens": 16}
EMBEDDINGS_BODY = {"input": "Say hello."}
#: Endpoint rows: name -> (proxy path and body, the upstream path and body it is
#: measured against). The proxy's models: "direct" (translated), "native".
ENDPOINTS: dict[str, tuple[str, str, dict[str, Any], str, dict[str, Any]]] = {
    "responses": ("/responses", "direct", RESPONSES_BODY, "/chat/completions", BODY),
    "responses_native": ("/responses", "native", RESPONSES_BODY, "/responses", RESPONSES_BODY),
    "embeddings": ("/embeddings", "direct", EMBEDDINGS_BODY, "/embeddings", EMBEDDINGS_BODY),
}


def log(msg: str) -> None:
    print(f"[overhead] {msg}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_upstream() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "proxy.testing.fake_upstream", "--responses"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}/v1"


def start_proxy(upstream: str, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = data_dir / "bench.yaml"
    config.write_text(json.dumps({
        "port": port, "data_dir": str(data_dir / "data"),
        # The relay's own cost; memory's is measured by bench/memory_latency.py.
        "memory": {"enabled": False},
        "models": [
            {"name": "direct", "backend": "litellm", "model": "openai/fake-model",
             "api_base": upstream, "max_retries": 0},
            {"name": "litellm", "backend": "litellm", "model": "openai/fake-model",
             "api_base": upstream, "max_retries": 0, "transport": "litellm"},
            {"name": "native", "backend": "litellm", "model": "openai/fake-model",
             "api_base": upstream, "max_retries": 0, "responses": "native"},
        ],
        # Responses are stored, as by default: part of what the endpoint costs.
    }))
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, f"{url}/v1"
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("proxy did not become healthy")


async def one(client: httpx.AsyncClient, url: str, body: dict[str, Any], stream: bool) -> float:
    start = time.perf_counter()
    if stream:
        async with client.stream("POST", url, json=body) as r:
            async for _ in r.aiter_raw():
                pass
            assert r.status_code == 200, r.status_code
    else:
        r = await client.post(url, json=body)
        assert r.status_code == 200, r.text
    return time.perf_counter() - start


async def run(base: str, model: str, stream: bool, clients: int, total: int,
              pid: int | None = None, path: str = "/chat/completions",
              body: dict[str, Any] = BODY) -> dict[str, float]:
    url = f"{base}{path}"
    body = {**body, "model": model}
    if stream:
        body["stream"] = True
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        for _ in range(min(20, total)):  # warm connections and code paths
            await one(client, url, body, stream)
        remaining = total

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                latencies.append(await one(client, url, body, stream))

        cpu0 = cpu_seconds(pid) if pid else 0.0
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds(pid) - cpu0 if pid else 0.0
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    figures = {"p50": q[49] * 1000, "p95": q[94] * 1000, "p99": q[98] * 1000,
               "rps": len(latencies) / elapsed}
    if pid:
        # The proxy's own CPU per request: its cost, whatever the cores are busy with.
        figures["proxy_cpu_ms_per_req"] = cpu * 1000 / len(latencies)
    return figures


def merge(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Median over rounds of each figure: one noisy round does not decide the result."""
    return {k: round(statistics.median(r[k] for r in rounds), 3) for k in rounds[0]}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    up_proc, upstream = start_upstream()
    tmp = Path(tempfile.mkdtemp(prefix="memcube-bench-"))
    proxy_proc, proxy = start_proxy(upstream, tmp)
    log(f"upstream {upstream}, proxy {proxy}")
    results: dict[str, Any] = {}
    try:
        for stream in (False, True):
            for clients in (1, 20):
                key = f"{'stream' if stream else 'nonstream'}_c{clients}"
                rounds: dict[str, list[dict[str, float]]] = {"direct": [], "proxy": [],
                                                             "litellm": []}
                for i in range(args.rounds):
                    n = args.requests
                    rounds["direct"].append(await run(upstream, "fake-model", stream, clients, n))
                    rounds["proxy"].append(
                        await run(proxy, "direct", stream, clients, n, proxy_proc.pid))
                    if not args.skip_litellm:
                        rounds["litellm"].append(
                            await run(proxy, "litellm", stream, clients, max(n // 4, 50),
                                      proxy_proc.pid))
                    log(f"{key} round {i + 1}/{args.rounds}: direct p50 "
                        f"{rounds['direct'][-1]['p50']:.2f} ms, proxy p50 "
                        f"{rounds['proxy'][-1]['p50']:.2f} ms")
                direct, proxied = merge(rounds["direct"]), merge(rounds["proxy"])
                row: dict[str, Any] = {
                    "direct": direct, "proxy": proxied,
                    "added_ms": {p: round(proxied[p] - direct[p], 3)
                                 for p in ("p50", "p95", "p99")},
                    "throughput_ratio": round(proxied["rps"] / direct["rps"], 3),
                }
                if rounds["litellm"]:
                    lite = merge(rounds["litellm"])
                    row["litellm"] = lite
                    row["litellm_added_p50_ms"] = round(lite["p50"] - direct["p50"], 3)
                results[key] = row
        for name, (path, model, body, direct_path, direct_body) in ENDPOINTS.items():
            for stream in ((False,) if name == "embeddings" else (False, True)):
                for clients in (1, 20):
                    key = f"{name}_{'stream' if stream else 'nonstream'}_c{clients}"
                    rounds = {"direct": [], "proxy": []}
                    for i in range(args.rounds):
                        n = args.requests
                        rounds["direct"].append(await run(
                            upstream, "fake-model", stream, clients, n, path=direct_path,
                            body=direct_body))
                        rounds["proxy"].append(await run(
                            proxy, model, stream, clients, n, proxy_proc.pid, path=path,
                            body=body))
                        log(f"{key} round {i + 1}/{args.rounds}: direct p50 "
                            f"{rounds['direct'][-1]['p50']:.2f} ms, proxy p50 "
                            f"{rounds['proxy'][-1]['p50']:.2f} ms")
                    direct, proxied = merge(rounds["direct"]), merge(rounds["proxy"])
                    results[key] = {
                        "direct": direct, "proxy": proxied,
                        "added_ms": {p: round(proxied[p] - direct[p], 3)
                                     for p in ("p50", "p95", "p99")},
                        "throughput_ratio": round(proxied["rps"] / direct["rps"], 3)}
    finally:
        proxy_proc.terminate()
        up_proc.terminate()
        proxy_proc.wait(30)
        up_proc.wait(30)
    return {
        "bench": "overhead",
        "requests_per_round": args.requests, "rounds": args.rounds, "cpus": os.cpu_count(),
        "added_p50_ms_c1": results["nonstream_c1"]["added_ms"]["p50"],
        "throughput_ratio_c20": results["nonstream_c20"]["throughput_ratio"],
        "stream_added_p50_ms_c1": results["stream_c1"]["added_ms"]["p50"],
        "stream_throughput_ratio_c20": results["stream_c20"]["throughput_ratio"],
        "proxy_cpu_ms_per_req": results["nonstream_c20"]["proxy"]["proxy_cpu_ms_per_req"],
        **{f"{name}_added_p50_ms_c1": results[f"{name}_nonstream_c1"]["added_ms"]["p50"]
           for name in ENDPOINTS},
        **{f"{name}_stream_added_p50_ms_c1": results[f"{name}_stream_c1"]["added_ms"]["p50"]
           for name in ENDPOINTS if name != "embeddings"},
        **{f"{name}_cpu_ms_per_req": results[f"{name}_nonstream_c20"]["proxy"][
            "proxy_cpu_ms_per_req"] for name in ENDPOINTS},
        **results,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-litellm", action="store_true")
    print(json.dumps(asyncio.run(main(parser.parse_args()))), flush=True)
