"""/healthz tells "configured" from "reachable": each upstream model's key variable and
whether its api_base answers, probed in the background, never in the status code."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy import upstreams
from proxy.app import create_app
from proxy.settings import MemorySettings, ModelConfig, Settings
from proxy.testing.fake_upstream import FakeUpstream
from proxy.testing.live import Live, refused_port, serve

UNSET = "TEST_UPSTREAM_KEY_THAT_IS_NOT_SET"


def settings(tmp_path: Path, *models: dict[str, Any]) -> Settings:
    return Settings(data_dir=tmp_path / "data", memory=MemorySettings(enabled=False),
                    models=[ModelConfig.model_validate({"backend": "litellm", **m})
                            for m in models])


def settled(live: Live, names: set[str], timeout: float = 15) -> httpx.Response:
    """/healthz once the probe has answered for every model in ``names``."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{live.url}/healthz", timeout=5)
        ups = r.json().get("upstreams", {})
        if all(ups.get(n, {}).get("state") not in (None, "unknown") for n in names):
            return r
        assert time.monotonic() < deadline, r.json()
        time.sleep(0.05)


def test_upstreams_are_reported_without_touching_liveness(
        tmp_path: Path, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("FAKE_UPSTREAM_KEY", "sk-test")
    monkeypatch.delenv(UNSET, raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # "keyless" would read it
    closed = refused_port()
    caplog.set_level(logging.WARNING, logger="proxy.upstreams")
    app = create_app(settings(
        tmp_path,
        {"name": "up", "model": "openai/m", "api_base": upstream.url,
         "api_key_env": "FAKE_UPSTREAM_KEY"},
        {"name": "down", "model": "openai/m", "api_base": f"http://127.0.0.1:{closed}/v1",
         "api_key_env": UNSET},
        {"name": "keyless", "model": "openai/m", "api_base": upstream.url},
        {"name": "hosted", "model": "anthropic/claude-x", "transport": "litellm"}))
    with serve(app) as live:
        r = settled(live, {"up", "down", "keyless"})
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["models"] == {n: "ready" for n in ("up", "down", "keyless", "hosted")}
    ups = body["upstreams"]
    assert ups["up"]["state"] == "reachable" and ups["up"]["key"] == "set"
    assert ups["down"]["state"] == "unreachable" and ups["down"]["key"] == "missing"
    assert ups["down"]["error"] == "connection refused"
    assert (ups["keyless"]["state"], ups["keyless"]["key"]) == ("reachable", "none")
    assert ups["hosted"] == {"state": "configured", "key": "none", "checked_at": None}
    assert abs(ups["up"]["checked_at"] - time.time()) < 60
    assert upstream.history == []  # a TCP connect: no request reached the upstream
    warnings = [rec.getMessage() for rec in caplog.records if rec.name == "proxy.upstreams"]
    assert len(warnings) == 1, warnings  # one line, for the one model whose key is unset
    assert "model 'down' (models[1])" in warnings[0] and f"api_key_env {UNSET}" in warnings[0]


def test_the_default_key_variable_of_openai_models_is_checked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """openai/ models without api_base read OPENAI_API_KEY (not probed here: the
    upstream is OpenAI's, out of this test's reach)."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setattr(upstreams.UpstreamHealth, "_refresh", lambda self: None)
    caplog.set_level(logging.WARNING, logger="proxy.upstreams")
    with serve(create_app(settings(tmp_path, {"name": "gpt", "model": "openai/gpt-4o-mini"}))) as live:
        ups = httpx.get(f"{live.url}/healthz").json()["upstreams"]
    assert ups["gpt"] == {"state": "unknown", "key": "missing", "checked_at": None}
    assert any("model 'gpt' (models[0])" in rec.getMessage() and "OPENAI_API_KEY" in
               rec.getMessage() for rec in caplog.records), caplog.text


def test_a_stale_result_is_probed_again_in_the_background(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Down at the first probe, up later: a later /healthz sees it once its result is
    older than PROBE_EVERY_S (0 here)."""
    monkeypatch.setattr(upstreams, "PROBE_EVERY_S", 0.0)
    port = refused_port()
    app = create_app(settings(tmp_path, {"name": "late", "model": "openai/m",
                                         "api_base": f"http://127.0.0.1:{port}/v1"}))
    with serve(app) as live:
        first = settled(live, {"late"}).json()["upstreams"]["late"]
        assert first["state"] == "unreachable"
        with socket.socket() as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen()
            deadline = time.monotonic() + 15
            while (now := httpx.get(f"{live.url}/healthz").json()["upstreams"]["late"])[
                    "state"] != "reachable":
                assert time.monotonic() < deadline, now
                time.sleep(0.05)
    assert "error" not in now


def test_a_local_model_only_proxy_reports_no_upstreams(local_server: Live) -> None:
    assert httpx.get(f"{local_server.url}/healthz").json() == {
        "status": "ok", "models": {"local": "ready"}}
