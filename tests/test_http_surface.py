"""The HTTP surface without a model: error shapes, limits, ids, models, health, metrics."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from proxy.app import create_app
from proxy.testing.fake_upstream import FakeUpstream
from proxy.testing.live import Live, serve
from tests.conftest import upstream_settings

ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture
def live(tmp_path: Path, upstream: FakeUpstream) -> Iterator[Live]:
    settings = upstream_settings(tmp_path, upstream).model_copy(update={"max_body_bytes": 4096})
    with serve(create_app(settings)) as server:
        yield server


def chat(live: Live, content: bytes | None = None, json: object = None,
         headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{live.base_url}/chat/completions", content=content, json=json,
                      headers=headers)


def assert_error(r: httpx.Response, status: int, type_: str, param: str | None = None,
                 code: str | None = None) -> dict[str, object]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == ERROR_KEYS
    assert err["type"] == type_
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    assert len(r.headers["x-memcube-request-id"]) == 32
    return err  # type: ignore[no-any-return]


def test_invalid_json_is_400(live: Live) -> None:
    assert_error(chat(live, content=b"{not json", headers={"content-type": "application/json"}),
                 400, "invalid_request_error", code="invalid_json")


def test_non_object_body_is_400(live: Live) -> None:
    assert_error(chat(live, json=[1, 2]), 400, "invalid_request_error", code="invalid_json")


def test_missing_messages_names_the_param(live: Live) -> None:
    err = assert_error(chat(live, json={"model": "up"}), 400, "invalid_request_error",
                       param="messages")
    assert "messages" in str(err["message"])


def test_missing_model_names_the_param(live: Live) -> None:
    assert_error(chat(live, json={"messages": [{"role": "user", "content": "x"}]}), 400,
                 "invalid_request_error", param="model")


@pytest.mark.parametrize(
    ("body", "param"),
    [({"messages": [{"role": "robot", "content": "x"}]}, "messages.[0].role"),
     ({"messages": [{"role": "user", "content": 5}]}, "messages.[0].content"),
     ({"messages": []}, "messages"),
     ({"messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature"),
     ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
     ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
     ({"messages": [{"role": "user", "content": "x"}], "memory": {"top_k": -1}},
      "memory.top_k"),
     ({"messages": [{"role": "user", "content": "x"}], "memory": {"bogus": 1}},
      "memory.bogus")],
)
def test_schema_errors_name_the_param(live: Live, body: dict[str, object], param: str) -> None:
    assert_error(chat(live, json={"model": "up", **body}), 400, "invalid_request_error",
                 param=param)


def test_unknown_model_is_404_model_not_found(live: Live, upstream: FakeUpstream) -> None:
    r = chat(live, json={"model": "gpt-nope", "messages": [{"role": "user", "content": "x"}]})
    assert_error(r, 404, "not_found_error", param="model", code="model_not_found")
    assert upstream.history == []  # never a silent fallback to another model


def test_body_over_limit_is_413(live: Live) -> None:
    big = {"model": "up", "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_error(chat(live, json=big), 413, "invalid_request_error", code="payload_too_large")


def test_chunked_body_over_limit_is_413(live: Live) -> None:
    def body() -> Iterator[bytes]:
        yield b'{"model": "up", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}]}'

    r = httpx.post(f"{live.base_url}/chat/completions", content=body())
    assert_error(r, 413, "invalid_request_error", code="payload_too_large")


def test_unknown_path_is_404_error_object(live: Live) -> None:
    assert_error(httpx.get(f"{live.base_url}/nothing-here"), 404, "not_found_error")


def test_wrong_method_is_405_error_object(live: Live) -> None:
    assert_error(httpx.get(f"{live.base_url}/chat/completions"), 405, "invalid_request_error")


def test_models_lists_configured_models(live: Live) -> None:
    models = openai.OpenAI(base_url=live.base_url, api_key="x").models.list()
    # The embedded MiniLM (embeddings.local_model) is listed after the configured models.
    assert [m.id for m in models.data] == ["up", "all-minilm-l6-v2"]
    assert models.data[0].object == "model"


def test_healthz(live: Live) -> None:
    r = httpx.get(f"{live.url}/healthz")
    assert r.status_code == 200
    body = r.json()
    assert {k: body[k] for k in ("status", "models")} == {"status": "ok", "models": {"up": "ready"}}
    assert set(body) == {"status", "models", "upstreams"}  # upstreams: tests/test_healthz.py


def test_every_response_has_a_distinct_request_id(live: Live) -> None:
    ids = {httpx.get(f"{live.url}/healthz").headers["x-memcube-request-id"] for _ in range(3)}
    ids.add(httpx.get(f"{live.url}/metrics").headers["x-memcube-request-id"])
    assert len(ids) == 4


def test_request_id_is_on_every_log_line_of_the_request(live: Live,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    from proxy.observability import RequestIdFilter

    handler_filter = RequestIdFilter()
    caplog.handler.addFilter(handler_filter)
    with caplog.at_level(logging.INFO):
        r = chat(live, json={"model": "up", "messages": [{"role": "user", "content": "x"}]})
    rid = r.headers["x-memcube-request-id"]
    lines = [rec for rec in caplog.records if getattr(rec, "request_id", "-") == rid]
    assert any(rec.name == "proxy.access" for rec in lines)
    assert all(rec.request_id in (rid, "-") for rec in caplog.records)  # type: ignore[attr-defined]


def test_logs_never_contain_keys_or_bodies(live: Live, upstream: FakeUpstream,
                                           caplog: pytest.LogCaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    secret_text = "my-very-private-message"
    with caplog.at_level(logging.DEBUG):
        chat(live, json={"model": "up", "messages": [{"role": "user", "content": secret_text}]},
             headers={"authorization": "Bearer sk-client-secret"})
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert secret_text not in text
    assert "sk-client-secret" not in text


def test_metrics_exposes_prometheus_families(live: Live) -> None:
    chat(live, json={"model": "up", "messages": [{"role": "user", "content": "x"}]})
    r = httpx.get(f"{live.url}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for family in ("memcube_requests_total", "memcube_request_duration_seconds_bucket",
                   "memcube_request_errors_total", "memcube_requests_in_flight"):
        assert family in text
    assert 'memcube_request_duration_seconds_count{model="up",route="/v1/chat/completions"} 1.0' \
        in text
