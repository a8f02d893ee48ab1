"""Nothing reaches the network at import or run time, except a configured upstream."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

GUARD = textwrap.dedent('''
    import socket
    attempts = []
    LOOPBACK = ("127.", "::1", "localhost")

    def _is_loopback(host):
        return isinstance(host, str) and host.startswith(LOOPBACK)

    _connect = socket.socket.connect
    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not _is_loopback(host) and self.family != socket.AF_UNIX:
            attempts.append(("connect", host))
            raise OSError("network disabled by test")
        return _connect(self, address)
    socket.socket.connect = connect

    _getaddrinfo = socket.getaddrinfo
    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not _is_loopback(host if isinstance(host, str) else ""):
            attempts.append(("dns", host))
            raise socket.gaierror("network disabled by test")
        return _getaddrinfo(host, *args, **kwargs)
    socket.getaddrinfo = getaddrinfo
''')

SCRIPT = GUARD + textwrap.dedent('''
    import os, tempfile, asyncio
    from pathlib import Path
    from memory import offline
    offline.configure()
    import litellm  # fetches its cost map at import unless kept local
    import tiktoken
    assert tiktoken.get_encoding("cl100k_base").encode("hello world")
    assert tiktoken.get_encoding("o200k_base").encode("hello world")
    import httpx
    from proxy.app import create_app
    from proxy.settings import ModelConfig, Settings
    from proxy.testing.fake_upstream import FakeUpstream
    from proxy.testing.live import serve
    with FakeUpstream() as up:
        settings = Settings(data_dir=Path(tempfile.mkdtemp()), models=[
            ModelConfig(name="l", backend="llamacpp", n_ctx=512),
            ModelConfig(name="d", backend="litellm", model="openai/m", api_base=up.url),
            ModelConfig(name="t", backend="litellm", model="openai/m", api_base=up.url,
                        transport="litellm"),
        ])
        with serve(create_app(settings)) as live:
            for model in ("l", "d", "t"):
                for stream in (False, True):
                    r = httpx.post(live.base_url + "/chat/completions", timeout=60, json={
                        "model": model, "stream": stream, "max_tokens": 3,
                        "messages": [{"role": "user", "content": "hi"}]})
                    assert r.status_code == 200, (model, r.text)
    print("ATTEMPTS", attempts)
''')


@pytest.mark.slow
def test_no_network_at_import_or_run_time() -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                       timeout=300, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ATTEMPTS []" in r.stdout, r.stdout[-2000:]
