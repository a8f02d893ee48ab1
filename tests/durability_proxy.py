"""A real ``memcube-proxy serve`` process that tests kill with SIGKILL and restart.

Each start gets a fresh loopback port and its own log file; the data directory is
what survives from one life to the next. Readiness is ``/healthz`` answering 200
(uvicorn only listens once the app's startup, memory layer included, is done).
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from proxy.testing.live import refused_port

REPO = Path(__file__).resolve().parent.parent


def write_config(path: Path, *, data_dir: Path, upstream_url: str, model_cache: Path) -> Path:
    """Memory on (real Edge store and MiniLM, fast extraction), one model ``up`` relayed to
    the fake upstream, auth off (one tenant)."""
    config: dict[str, Any] = {
        "data_dir": str(data_dir),
        "log_level": "info",
        "models": [{"name": "up", "backend": "litellm", "model": "openai/fake-model",
                    "api_base": upstream_url, "max_retries": 0, "timeout": 30.0}],
        "memory": {"enabled": True, "extraction": "fast",
                   "embedder": {"cache_dir": str(model_cache)}},
    }
    path.write_text(yaml.safe_dump(config))
    return path


class ProxyProcess:
    """One life of the proxy: started, waited on, then killed or terminated."""

    def __init__(self, config: Path, log: Path) -> None:
        self.port = refused_port()
        self.log = log
        self.started = time.monotonic()
        self.ready_after: float | None = None  # seconds from spawn to healthy
        self._out = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config),
             "--port", str(self.port)],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 90.0) -> None:
        # The first start converts MiniLM and later ones may index the store before
        # serving, so the deadline is generous; a crash ends the wait at once.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    self.ready_after = time.monotonic() - self.started
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # polling a port that is not open yet, not a background job
        raise TimeoutError(f"proxy not healthy in {timeout} s:\n{self.output()}")

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        """Until the log holds ``text``: how a test finds a moment in the start-up to kill at."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {text!r} in the log in {timeout} s:\n{self.output()}")
            time.sleep(0.001)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._out.close()
        assert self.proc.returncode == -signal.SIGKILL, self.output()

    def terminate(self) -> int:
        """Graceful shutdown (SIGTERM); returns the exit status."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        finally:
            self._out.close()
        return self.proc.returncode

    def stop_quietly(self) -> None:
        """For cleanup after a failure: whatever state it is in, it is gone afterwards."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._out.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def outbox_rows(path: Path) -> tuple[set[str], int]:
    """The request ids still pending in the outbox file, and its dead-letter count, read
    without writing to it: a read-only connection neither checkpoints nor removes the
    WAL a killed proxy left behind, so the next start finds what the kill left."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        pending = {rid for (rid,) in db.execute("SELECT request_id FROM outbox")}
        dead = db.execute("SELECT COUNT(*) FROM dead").fetchone()[0]
    finally:
        db.close()
    return pending, int(dead)
