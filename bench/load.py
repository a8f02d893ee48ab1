"""Load: many concurrent streaming clients through the proxy, memory on, for a while.

Starts the fast fake upstream (``proxy.testing.load_upstream``) and the proxy
(``memcube-proxy serve``) as their own processes, on loopback, with a fresh data
directory: memory on, the default embedded store (Qdrant Edge) and MiniLM embedder,
fast extraction, one model ``up`` relayed to the upstream. Then ``--clients`` clients,
each a loop of streamed chats (httpx) for one of ``--users`` users (so that
write-back and recall both happen), run for a warm-up (``--warmup`` seconds, and until
every client has had a reply) and then ``--duration`` seconds:

    python bench/load.py [--clients 200] [--duration 60] [--warmup 10]

Latency, time to first byte (the first SSE line) and throughput cover the requests
started after the warm-up; errors count over the whole run: an exception, a status
other than 200, an error frame, a stream without ``[DONE]`` or a reply that is not
the upstream's. The proxy's resident memory (anonymous and file-backed apart) and its
outbox backlog are sampled at the end of the warm-up, every progress line and at the
end. Then a flush (``POST /v1/memories/flush``), after which every exchange the
client saw complete must be stored exactly once, and the outbox must be empty.
``--no-write`` runs recall alone, to tell the request path's memory from the store's;
``--memory-off`` the relay alone; ``--side-by-side`` memory off then on, with their
throughput ratio.

Progress goes to stderr; one JSON line of figures to stdout. tests/test_load.py runs
the short form through the same functions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import yaml

from proxy.testing.fake_upstream import DEFAULT_TEXT as REPLY

REPO = Path(__file__).resolve().parent.parent
MODEL = "up"
USERS = ("ana", "ben", "chen", "dara", "emil", "fay", "gus", "hana")
THINGS = ("cello", "kayak", "lantern", "teapot", "compass", "quilt", "bonsai", "atlas")
PLACES = ("by the door", "in the attic", "under the bed", "at the office", "in the garage")


def log(msg: str) -> None:
    print(f"[load] {msg}", file=sys.stderr, flush=True)


@dataclass
class Options:
    clients: int = 200
    duration: float = 60.0
    warmup: float = 10.0
    users: int = 4
    chunks: int = 4  # content chunks per upstream reply
    chunk_delay: float = 0.01  # seconds between them: streams stay open like a model's
    timeout: float = 60.0  # per request, client side
    pool_size: int = 10  # clients per HTTP connection pool
    write: bool = True  # False: requests say memory.write=false (recall only, nothing stored)
    memory: bool = True  # False: the proxy runs with memory.enabled false (the relay alone)
    progress: float = 5.0  # seconds between progress lines
    seed: int = 20251124


@dataclass
class Exchange:
    """One streamed chat and what the client saw of it (times in seconds)."""

    client: int
    user: str
    text: str
    started: float
    ttfb: float | None = None  # to the first SSE line
    total: float | None = None  # to the end of the body
    done: bool = False  # [DONE] arrived
    request_id: str | None = None  # X-Memcube-Request-Id
    memory_ids: tuple[str, ...] = ()  # X-Memcube-Memories
    error: str | None = None

    @property
    def acked(self) -> bool:
        """The client has the whole reply: the proxy must remember this exchange."""
        return self.done and self.error is None


@dataclass
class Run:
    exchanges: list[Exchange] = field(default_factory=list)
    started: float = 0.0
    warm_end: float = 0.0  # when the warm-up ended: the measured requests start after it
    until: float = float("inf")  # clients start no request after this
    ended: float = 0.0
    answered: set[int] = field(default_factory=set)  # clients with an exchange finished
    after_warmup: Sample | None = None
    end: Sample | None = None
    samples: list[Sample] = field(default_factory=list)  # every progress tick after warm-up
    proxy_cpu: float = 0.0  # seconds over the measured window
    client_cpu: float = 0.0


@dataclass(frozen=True)
class Sample:
    """The proxy's resident memory (bytes: all, anonymous, file-backed) and the
    exchanges waiting in its outbox, at one moment."""

    rss: int
    anon: int
    file: int
    pending: int | None


@dataclass(frozen=True)
class Watch:
    """What the run samples: the proxy's process and its outbox file."""

    pid: int
    outbox: Path | None = None

    def sample(self) -> Sample:
        status = dict(line.split(":", 1) for line in
                      Path(f"/proc/{self.pid}/status").read_text().splitlines() if ":" in line)

        def kib(key: str) -> int:
            return int(status[key].split()[0]) * 1024

        pending = (outbox_state(self.outbox)["pending"] if self.outbox and self.outbox.exists()
                   else None)
        return Sample(rss=kib("VmRSS"), anon=kib("RssAnon"), file=kib("RssFile"), pending=pending)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)


# -- processes -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def proxy_command() -> list[str]:
    script = Path(sys.executable).parent / "memcube-proxy"
    return [str(script)] if script.exists() else [sys.executable, "-m", "proxy.cli"]


def write_config(path: Path, data_dir: Path, upstream_url: str, memory: bool = True) -> Path:
    config: dict[str, Any] = {
        "data_dir": str(data_dir),
        # The access log at 200 clients would cost the proxy more than some of its
        # work; warnings and errors still reach the log, which the run reads.
        "log_level": "warning",
        "models": [{"name": MODEL, "backend": "litellm", "model": "openai/fake-model",
                    "api_base": upstream_url, "max_retries": 0, "timeout": 30.0}],
        "memory": {"enabled": memory, "extraction": "fast"},
    }
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Stack:
    """The upstream and the proxy, running."""

    url: str  # the proxy
    pid: int
    data_dir: Path
    log: Path

    @property
    def outbox(self) -> Path:
        return self.data_dir / "outbox.sqlite3"

    @property
    def watch(self) -> Watch:
        return Watch(self.pid, self.outbox)

    def log_problems(self) -> dict[str, int]:
        text = self.log.read_text(errors="replace")
        return {"tracebacks": text.count("Traceback"), "errors": text.count(" ERROR "),
                "warnings": text.count(" WARNING ")}


def wait_healthy(proc: subprocess.Popen[bytes], url: str, log_path: Path,
                 timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"proxy exited with {proc.returncode}:\n"
                               f"{log_path.read_text(errors='replace')[-4000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # polling a port that is not open yet
    raise TimeoutError(f"proxy not healthy in {timeout} s")


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


@contextmanager
def stack(opts: Options, workdir: Path) -> Iterator[Stack]:
    upstream = subprocess.Popen(
        [sys.executable, "-m", "proxy.testing.load_upstream", "--chunks", str(opts.chunks),
         "--delay", str(opts.chunk_delay), "--text", REPLY],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    proxy: subprocess.Popen[bytes] | None = None
    out = None
    try:
        assert upstream.stdout is not None
        upstream_url = f"http://127.0.0.1:{int(upstream.stdout.readline())}/v1"
        data_dir = workdir / "data"
        config = write_config(workdir / "load.yaml", data_dir, upstream_url, opts.memory)
        port = free_port()
        log_path = workdir / "proxy.log"
        out = log_path.open("wb")
        proxy = subprocess.Popen([*proxy_command(), "serve", "--config", str(config),
                                  "--port", str(port)],
                                 cwd=REPO, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proxy, url, log_path)
        yield Stack(url=url, pid=proxy.pid, data_dir=data_dir, log=log_path)
    finally:
        if proxy is not None:
            stop(proxy)
        if out is not None:
            out.close()
        stop(upstream)
        if upstream.stdout is not None:
            upstream.stdout.close()


# -- the clients ---------------------------------------------------------------------


async def exchange(http: httpx.AsyncClient, ex: Exchange, write: bool = True) -> None:
    body: dict[str, Any] = {"model": MODEL, "stream": True, "max_tokens": 32,
                            "messages": [{"role": "user", "content": ex.text}]}
    if not write:
        body["memory"] = {"write": False}
    headers = {"x-memcube-user": ex.user, "x-memcube-session": f"load-{ex.client}"}
    parts: list[str] = []
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                ex.error = f"status {r.status_code}: {(await r.aread())[:200]!r}"
                return
            ex.request_id = r.headers.get("x-memcube-request-id")
            ex.memory_ids = tuple(i for i in r.headers.get("x-memcube-memories", "").split(",") if i)
            async for line in r.aiter_lines():
                if ex.ttfb is None:
                    ex.ttfb = time.monotonic() - ex.started
                if not line:
                    continue
                if ex.done:
                    ex.error = f"data after [DONE]: {line[:200]}"
                    return
                if line == "data: [DONE]":
                    ex.done = True
                    continue
                if not line.startswith("data: "):
                    ex.error = f"not an SSE data line: {line[:200]}"
                    return
                frame = json.loads(line[len("data: "):])
                if "error" in frame:
                    ex.error = f"error frame: {line[:200]}"
                    return
                parts.extend(c["delta"].get("content") or "" for c in frame["choices"])
    except Exception as exc:  # every failure is counted, none stops the run
        ex.error = f"{type(exc).__name__}: {str(exc)[:200]}"
        return
    finally:
        ex.total = time.monotonic() - ex.started
    if not ex.done:
        ex.error = "the stream ended without [DONE]"
    elif "".join(parts) != REPLY:
        ex.error = f"reply {''.join(parts)[:200]!r}"


async def client(http: httpx.AsyncClient, index: int, users: list[str], run: Run,
                 rng: random.Random, write: bool) -> None:
    user = users[index % len(users)]
    turn = 0
    while time.monotonic() < run.until:
        # Unique per exchange, so that each is one memory and none is a duplicate.
        text = (f"Load client {index} turn {turn}: I keep the {rng.choice(THINGS)} "
                f"{rng.choice(PLACES)}.")
        ex = Exchange(client=index, user=user, text=text, started=time.monotonic())
        run.exchanges.append(ex)
        await exchange(http, ex, write)
        run.answered.add(index)
        turn += 1


async def drive(url: str, opts: Options, watch: Watch | None = None) -> Run:
    """The clients, for ``opts.warmup`` then ``opts.duration`` seconds, with a progress
    line every ``opts.progress`` seconds; ``watch``: the proxy to sample."""
    run = Run()
    users = list(USERS[:opts.users])
    rng = random.Random(opts.seed)
    # Several small pools, not one of opts.clients connections: httpcore looks over its
    # whole pool on every request event, which at 200 connections cost the client ten
    # times the CPU per request, taken from the cores the proxy runs on.
    size = max(1, opts.pool_size)
    pools = [httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(opts.timeout),
                               limits=httpx.Limits(max_connections=size,
                                                   max_keepalive_connections=size))
             for _ in range(-(-opts.clients // size))]
    async with AsyncExitStack() as closing:
        for pool in pools:
            await closing.enter_async_context(pool)
        run.started = time.monotonic()
        run.warm_end = run.started + opts.warmup
        tasks = [asyncio.create_task(client(pools[i // size], i, users, run,
                                            random.Random(rng.random()), opts.write))
                 for i in range(opts.clients)]
        last = Tick(at=run.started, proxy_cpu=watch.cpu() if watch else 0.0)
        # The warm-up lasts its time and until every client has had a reply, so that on
        # a slow machine the figures after it do not include the proxy's first requests
        # (tokenizer and embedder loaded, pools filled: tens of MiB).
        while not (time.monotonic() >= run.warm_end and len(run.answered) == opts.clients
                   or all(t.done() for t in tasks)):
            await asyncio.sleep(0.05)
            if time.monotonic() >= last.at + opts.progress:
                last = progress(run, watch, False, last)
        run.warm_end = time.monotonic()
        run.until = run.warm_end + opts.duration
        client_cpu0 = own_cpu_seconds()
        proxy_cpu0 = watch.cpu() if watch else 0.0
        if watch:
            run.after_warmup = watch.sample()
        while (now := time.monotonic()) < run.until:
            await asyncio.sleep(max(0.0, min(last.at + opts.progress, run.until) - now))
            last = progress(run, watch, True, last)
        await asyncio.gather(*tasks)
        run.ended = time.monotonic()
        run.client_cpu = own_cpu_seconds() - client_cpu0
        if watch:
            run.proxy_cpu = watch.cpu() - proxy_cpu0
            run.end = watch.sample()
    return run


@dataclass
class Tick:
    """Where the previous progress line left off, for the rates of the next."""

    at: float
    done: int = 0
    proxy_cpu: float = 0.0


def progress(run: Run, watch: Watch | None, warm: bool, last: Tick) -> Tick:
    """One progress line (and, after the warm-up, one sample)."""
    now = time.monotonic()
    finished = [e for e in run.exchanges if e.total is not None]
    span = max(now - last.at, 1e-9)
    rate = (len(finished) - last.done) / span
    errors = sum(e.error is not None for e in finished)
    line = (f"{'run' if warm else 'warm-up'} {now - run.started:5.1f}s: {len(finished)} done, "
            f"{rate:.0f} req/s, {errors} errors")
    cpu = 0.0
    if watch:
        sample, cpu = watch.sample(), watch.cpu()
        if warm:
            run.samples.append(sample)
        # The proxy's CPU beside the machine's load: a stall with the proxy idle and
        # the machine busy is the machine's; with both idle, the proxy's.
        line += (f", proxy rss {sample.rss / 2**20:.0f} MiB, cpu {(cpu - last.proxy_cpu) / span:.0%}"
                 f", outbox {sample.pending}, load {os.getloadavg()[0]:.1f}")
    log(line)
    return Tick(at=now, done=len(finished), proxy_cpu=cpu)


# -- after the run -------------------------------------------------------------------


def flush(url: str, timeout: float = 600.0) -> float:
    """Seconds until everything acknowledged has been written back."""
    start = time.monotonic()
    r = httpx.post(f"{url}/v1/memories/flush", timeout=timeout)
    r.raise_for_status()
    if r.json() != {"object": "memory.flush", "flushed": True}:
        raise RuntimeError(f"flush answered {r.text}")
    return time.monotonic() - start


def list_memories(url: str) -> list[dict[str, Any]]:
    """Every memory of the (one) tenant, all users, page by page."""
    items: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 1000}
    with httpx.Client(base_url=url, timeout=120) as http:
        while True:
            page = http.get("/v1/memories", params=params)
            page.raise_for_status()
            body = page.json()
            items += body["data"]
            if not body["has_more"]:
                return items
            params["after"] = body["next_after"]


def outbox_state(path: Path) -> dict[str, int]:
    """Exchanges still waiting in the outbox file and dead letters, read without writing."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        pending = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        dead = db.execute("SELECT COUNT(*) FROM dead").fetchone()[0]
    finally:
        db.close()
    return {"pending": int(pending), "dead": int(dead)}


def check_stored(exchanges: list[Exchange], items: list[dict[str, Any]],
                 write: bool = True) -> dict[str, int]:
    """How the stored memories match the exchanges: every acknowledged one exactly once
    (``missing``, ``duplicated`` 0), nothing that was never sent (``unexpected`` 0).
    Without ``write`` nothing is expected, and anything stored is unexpected."""
    stored = Counter((i["user"], i["text"]) for i in items)
    sent = {(e.user, e.text) for e in exchanges} if write else set()
    acked = [(e.user, e.text) for e in exchanges if e.acked and write]
    return {"expected": len(acked), "stored": len(items),
            "missing": sum(stored[k] == 0 for k in acked),
            "duplicated": sum(n > 1 for n in stored.values()),
            "unexpected": sum(k not in sent for k in stored)}


def percentiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(q[49] * 1000, 2), "p95": round(q[94] * 1000, 2),
            "p99": round(q[98] * 1000, 2)}


def mib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def memory_figures(run: Run) -> dict[str, float | None]:
    """Resident memory after the warm-up and at the end; growth split into anonymous
    memory (the heap: where a leak would show) and file-backed pages (the store's
    memory-mapped files, which grow with the memories written)."""
    first, last = run.after_warmup, run.end
    if first is None or last is None:
        return {}
    return {"after_warmup": mib(first.rss), "end": mib(last.rss),
            "growth": mib(last.rss - first.rss), "anon_growth": mib(last.anon - first.anon),
            "file_growth": mib(last.file - first.file),
            "max": mib(max(x.rss for x in [*run.samples, last]))}


def summarize(run: Run, opts: Options) -> dict[str, Any]:
    measured = [e for e in run.exchanges if e.started >= run.warm_end]
    ok = [e for e in measured if e.acked]
    window = max([e.started + (e.total or 0.0) for e in measured], default=run.warm_end) - run.warm_end
    failed = [e for e in run.exchanges if not e.acked]
    return {
        "bench": "load", "clients": opts.clients, "duration_s": opts.duration,
        "warmup_s": opts.warmup, "users": opts.users, "write": opts.write, "upstream_chunks": opts.chunks,
        "upstream_chunk_delay_ms": opts.chunk_delay * 1000, "cpus": os.cpu_count(),
        "requests_total": len(run.exchanges),
        "requests": len(measured),
        "throughput_rps": round(len(ok) / window, 1) if window > 0 else 0.0,
        "ttfb_ms": percentiles([e.ttfb for e in ok if e.ttfb is not None]),
        "latency_ms": percentiles([e.total for e in ok if e.total is not None]),
        "errors": len(failed),
        "error_samples": sorted(Counter(e.error or "incomplete" for e in failed).items(),
                                key=lambda kv: -kv[1])[:5],
        "completed_with_done": sum(e.done for e in run.exchanges),
        "with_memories_injected": sum(bool(e.memory_ids) for e in measured),
        "rss_mib": memory_figures(run),
        "rss_samples_mib": [mib(x.rss) for x in run.samples],
        "outbox_pending_samples": [x.pending for x in run.samples],
        "proxy_cpu_ms_per_req": round(run.proxy_cpu * 1000 / len(ok), 3) if ok else None,
        "client_cpu_ms_per_req": round(run.client_cpu * 1000 / len(ok), 3) if ok else None,
    }


async def bench(opts: Options, workdir: Path) -> dict[str, Any]:
    load_before = os.getloadavg()
    with stack(opts, workdir) as s:
        log(f"proxy {s.url} (pid {s.pid}), {opts.clients} clients, {opts.warmup:g}s warm-up "
            f"+ {opts.duration:g}s")
        run = await drive(s.url, opts, s.watch)
        figures = summarize(run, opts)
        figures["memory"] = opts.memory
        if opts.memory:
            log(f"{figures['requests_total']} requests, {figures['errors']} errors; flushing")
            figures["flush_s"] = round(flush(s.url), 3)
            figures["rss_mib"]["after_flush"] = mib(s.watch.sample().rss)
            figures["outbox"] = outbox_state(s.outbox)
            figures["memories"] = check_stored(run.exchanges, list_memories(s.url), opts.write)
        figures["proxy_log"] = s.log_problems()
    figures["loadavg_before"] = [round(x, 2) for x in load_before]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    defaults = Options()
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--duration", type=float, default=defaults.duration,
                        help="seconds measured, after the warm-up")
    parser.add_argument("--warmup", type=float, default=defaults.warmup, help="seconds")
    parser.add_argument("--users", type=int, default=defaults.users,
                        help=f"distinct users the clients speak for (at most {len(USERS)})")
    parser.add_argument("--chunks", type=int, default=defaults.chunks,
                        help="content chunks in each upstream reply")
    parser.add_argument("--chunk-delay", type=float, default=defaults.chunk_delay,
                        help="seconds between the upstream's chunks")
    parser.add_argument("--timeout", type=float, default=defaults.timeout,
                        help="per request, seconds")
    parser.add_argument("--progress", type=float, default=defaults.progress,
                        help="seconds between progress lines")
    parser.add_argument("--no-write", dest="write", action="store_false",
                        help="requests ask for no write-back (memory.write=false): recall only, "
                        "so memory growth is the request path's alone")
    parser.add_argument("--memory-off", dest="memory", action="store_false",
                        help="run the proxy with memory.enabled false: the relay alone")
    parser.add_argument("--side-by-side", action="store_true",
                        help="run memory off, then memory on, with the same clients; print "
                        "both and the on/off throughput ratio")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (data, config, proxy log), as a run "
                        "with errors does")
    args = parser.parse_args()
    if not 1 <= args.users <= len(USERS):
        parser.error(f"--users must be 1 to {len(USERS)}")
    opts = Options(clients=args.clients, duration=args.duration, warmup=args.warmup,
                   users=args.users, chunks=args.chunks, chunk_delay=args.chunk_delay,
                   timeout=args.timeout, progress=args.progress, write=args.write,
                   memory=args.memory)
    if not args.side_by_side:
        print(json.dumps(run_once(opts, args.keep)), flush=True)
        return
    off = run_once(replace(opts, memory=False), args.keep)
    on = run_once(replace(opts, memory=True), args.keep)
    print(json.dumps({
        "bench": "load", "side_by_side": True, "clients": opts.clients,
        "throughput_rps": {"memory_off": off["throughput_rps"], "memory_on": on["throughput_rps"]},
        "on_off_throughput_ratio": round(on["throughput_rps"] / off["throughput_rps"], 3),
        "proxy_cpu_ms_per_req": {"memory_off": off["proxy_cpu_ms_per_req"],
                                 "memory_on": on["proxy_cpu_ms_per_req"]},
        "ttfb_ms": {"memory_off": off["ttfb_ms"], "memory_on": on["ttfb_ms"]},
        "errors": off["errors"] + on["errors"], "memory_off": off, "memory_on": on}), flush=True)


def run_once(opts: Options, keep_dir: bool) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="memcube-load-"))
    keep = True  # a run that fails leaves its data and the proxy's log to look at
    try:
        figures = asyncio.run(bench(opts, workdir))
        keep = keep_dir or bool(figures["errors"]) or sum(figures["proxy_log"].values()) > 0
    finally:
        if keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return figures


if __name__ == "__main__":
    main()
