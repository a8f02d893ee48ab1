"""API keys: when auth is on, every endpoint but /healthz needs a tenant or admin key."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from proxy.app import create_app
from proxy.settings import AuthSettings, TenantConfig
from proxy.testing.fake_upstream import FakeUpstream
from proxy.testing.live import Live, serve
from tests.conftest import upstream_settings

HASHED = "sk-globex-" + "1" * 20


@pytest.fixture
def live(tmp_path: Path, upstream: FakeUpstream) -> Iterator[Live]:
    settings = upstream_settings(tmp_path, upstream).model_copy(update={
        "auth": AuthSettings(enabled=True, admin_keys=["sk-admin"]),
        "tenants": [
            TenantConfig(id="acme", api_keys=["sk-acme"]),
            TenantConfig(id="globex",
                         api_keys=["sha256:" + hashlib.sha256(HASHED.encode()).hexdigest()]),
        ],
    })
    with serve(create_app(settings)) as server:
        yield server


MESSAGES = [{"role": "user", "content": "hi"}]


def test_missing_key_is_401(live: Live) -> None:
    r = httpx.post(f"{live.base_url}/chat/completions", json={"model": "up", "messages": MESSAGES})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert r.json()["error"]["code"] == "missing_api_key"


@pytest.mark.parametrize("path", ["/v1/models", "/metrics"])
def test_every_endpoint_but_healthz_needs_a_key(live: Live, path: str) -> None:
    assert httpx.get(live.url + path).status_code == 401
    assert httpx.get(live.url + path, headers={"authorization": "Bearer sk-acme"}).status_code == 200
    assert httpx.get(f"{live.url}/healthz").status_code == 200


def test_wrong_key_is_401_via_sdk(live: Live) -> None:
    c = openai.OpenAI(base_url=live.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        c.chat.completions.create(model="up", messages=MESSAGES)  # type: ignore[arg-type]
    assert info.value.status_code == 401


@pytest.mark.parametrize("key", ["sk-acme", HASHED, "sk-admin"])
def test_plain_hashed_and_admin_keys_are_accepted(live: Live, key: str) -> None:
    c = openai.OpenAI(base_url=live.base_url, api_key=key, max_retries=0)
    reply = c.chat.completions.create(model="up", messages=MESSAGES)  # type: ignore[arg-type]
    assert reply.choices[0].message.content


def test_non_bearer_scheme_is_401(live: Live) -> None:
    r = httpx.get(f"{live.base_url}/models", headers={"authorization": "Basic c2stYWNtZQ=="})
    assert r.status_code == 401
