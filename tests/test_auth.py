"""API keys: when auth is on, every endpoint but /healthz needs a tenant or admin key."""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from proxy import cli
from proxy.admin.keys import hashed_form
from proxy.app import create_app
from proxy.auth import RateLimiter
from proxy.settings import AuthSettings, ConfigError, TenantConfig, load_settings
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


# -- rate limits ---------------------------------------------------------------------------

@pytest.fixture
def limited(tmp_path: Path, upstream: FakeUpstream) -> Iterator[Live]:
    settings = upstream_settings(tmp_path, upstream).model_copy(update={
        "auth": AuthSettings(enabled=True, admin_keys=["sk-admin"], rate_limit_rpm=1000),
        "tenants": [TenantConfig(id="acme", api_keys=["sk-acme"], rate_limit_rpm=3),
                    TenantConfig(id="globex", api_keys=["sk-globex"])],
    })
    with serve(create_app(settings)) as server:
        yield server


def test_rate_limit_answers_429_with_retry_after(limited: Live) -> None:
    c = openai.OpenAI(base_url=limited.base_url, api_key="sk-acme", max_retries=0)
    for _ in range(3):
        c.chat.completions.create(model="up", messages=MESSAGES)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(model="up", messages=MESSAGES)  # type: ignore[arg-type]
    assert info.value.status_code == 429
    retry_after = int(info.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 20  # 3 a minute: one more every 20 s
    error = info.value.response.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "3 requests per minute" in error["message"]
    # The memory API counts against the same budget.
    r = httpx.get(f"{limited.base_url}/models", headers={"authorization": "Bearer sk-acme"})
    assert r.status_code == 429


def test_rate_limit_is_per_tenant_and_spares_admins(limited: Live) -> None:
    acme = {"authorization": "Bearer sk-acme"}
    for _ in range(3):
        assert httpx.get(f"{limited.base_url}/models", headers=acme).status_code == 200
    assert httpx.get(f"{limited.base_url}/models", headers=acme).status_code == 429
    globex = {"authorization": "Bearer sk-globex"}  # the default limit: 1000 a minute
    assert all(httpx.get(f"{limited.base_url}/models", headers=globex).status_code == 200
               for _ in range(10))
    admin = {"authorization": "Bearer sk-admin"}
    assert all(httpx.get(f"{limited.base_url}/models", headers=admin).status_code == 200
               for _ in range(10))


def test_token_bucket_refills_at_the_configured_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert [limiter.wait_needed("t", 60) for _ in range(60)] == [0.0] * 60  # a minute's burst
    assert limiter.wait_needed("t", 60) == pytest.approx(1.0)
    now[0] += 0.5
    assert limiter.wait_needed("t", 60) == pytest.approx(0.5)  # refused: nothing taken
    now[0] += 0.5
    assert limiter.wait_needed("t", 60) == 0.0
    assert limiter.wait_needed("other", 60) == 0.0  # buckets are per tenant


# -- keys at rest ----------------------------------------------------------------------------

def test_keys_hash_prints_the_form_the_config_accepts(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli.main(["keys", "hash", HASHED]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == "sha256:" + hashlib.sha256(HASHED.encode()).hexdigest()
    monkeypatch.setattr("sys.stdin", io.StringIO("sk-one\n\nsk-two\n"))
    assert cli.main(["keys", "hash"]) == 0
    assert capsys.readouterr().out.split() == [hashed_form("sk-one"), hashed_form("sk-two")]
    assert cli.main(["keys", "new"]) == 0
    lines = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["config"].strip() == hashed_form(lines["key"].strip())


@pytest.mark.parametrize("tenants, admin, message", [
    ([{"id": "a", "api_keys": ["sk-same"]}, {"id": "b", "api_keys": ["sk-same"]}], [],
     "one API key is given to both tenant 'a' and tenant 'b'"),
    ([{"id": "a", "api_keys": [hashed_form("sk-same")]}], ["sk-same"],
     "one API key is given to both tenant 'a' and auth.admin_keys"),
    ([{"id": "a", "api_keys": ["sha256:abc"]}], [], "64 hex digits"),
    ([{"id": "a"}, {"id": "a"}], [], "duplicate tenant id 'a'"),
    ([{"id": "no spaces"}], [], "tenants.0.id"),
])
def test_conflicting_or_malformed_keys_stop_the_config(
        tmp_path: Path, tenants: list[dict[str, object]], admin: list[str], message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"auth": {"enabled": True, "admin_keys": admin},
                                    "tenants": tenants}))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(path)


# -- admins: acting for a tenant, managing tenants ------------------------------------------

ADMIN = {"authorization": "Bearer sk-admin"}


def test_admin_acts_for_a_tenant_and_tenants_cannot(live: Live) -> None:
    models = f"{live.base_url}/models"
    as_acme = {**ADMIN, "x-memcube-tenant": "acme"}
    assert httpx.get(models, headers=as_acme).status_code == 200
    r = httpx.get(models, headers={**ADMIN, "x-memcube-tenant": "nobody"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "tenant_not_found"
    r = httpx.get(models, headers={"authorization": "Bearer sk-acme",
                                   "x-memcube-tenant": "globex"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    r = httpx.get(models, headers={"authorization": "Bearer sk-acme", "x-memcube-tenant": "acme"})
    assert r.status_code == 200  # naming oneself is fine


def test_tenant_api_is_admin_only(live: Live) -> None:
    acme = {"authorization": "Bearer sk-acme"}
    assert httpx.get(f"{live.base_url}/tenants", headers=acme).status_code == 403
    r = httpx.put(f"{live.base_url}/tenants/evil", headers=acme, json={"api_keys": ["sk-evil"]})
    assert r.status_code == 403
    assert httpx.get(f"{live.base_url}/models",
                     headers={"authorization": "Bearer sk-evil"}).status_code == 401


def test_tenant_added_through_the_api_works_at_once_and_after_restart(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    settings = upstream_settings(tmp_path, upstream).model_copy(update={
        "auth": AuthSettings(enabled=True, admin_keys=["sk-admin"]),
        "tenants": [TenantConfig(id="acme", api_keys=["sk-acme"])],
    })
    initech = {"authorization": "Bearer sk-initech-secret"}
    with serve(create_app(settings)) as server:
        base = server.base_url
        assert httpx.get(f"{base}/models", headers=initech).status_code == 401
        r = httpx.put(f"{base}/tenants/initech", headers=ADMIN,
                      json={"api_keys": ["sk-initech-secret"], "rate_limit_rpm": 600})
        assert r.status_code == 200
        assert r.json() == {"object": "tenant", "id": "initech", "key_count": 1,
                            "rate_limit_rpm": 600, "adapter": None, "source": "api"}
        assert httpx.get(f"{base}/models", headers=initech).status_code == 200
        listed = httpx.get(f"{base}/tenants", headers=ADMIN).json()
        assert [(t["id"], t["source"]) for t in listed["data"]] == [("acme", "config"),
                                                                   ("initech", "api")]
        # Another tenant's key, or an admin's, cannot be taken over.
        r = httpx.put(f"{base}/tenants/thief", headers=ADMIN, json={"api_keys": ["sk-acme"]})
        assert r.status_code == 409 and r.json()["error"]["code"] == "key_in_use"
        r = httpx.put(f"{base}/tenants/thief", headers=ADMIN, json={"api_keys": ["sk-admin"]})
        assert r.status_code == 409
        r = httpx.put(f"{base}/tenants/default", headers=ADMIN, json={"api_keys": ["sk-x"]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "id"
        r = httpx.delete(f"{base}/tenants/acme", headers=ADMIN)
        assert r.status_code == 409 and r.json()["error"]["code"] == "tenant_in_config"
    saved = (settings.data_dir / "tenants.json").read_text()
    assert "sk-initech-secret" not in saved and hashed_form("sk-initech-secret") in saved
    with serve(create_app(settings)) as server:
        base = server.base_url
        assert httpx.get(f"{base}/models", headers=initech).status_code == 200
        r = httpx.delete(f"{base}/tenants/initech", headers=ADMIN)
        assert r.json() == {"object": "tenant.deleted", "id": "initech", "deleted": True}
        assert httpx.get(f"{base}/models", headers=initech).status_code == 401
        assert httpx.get(f"{base}/tenants/initech", headers=ADMIN).status_code == 404


def test_keys_never_reach_the_logs(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    for key in ("sk-wrong-secret-123", "sk-acme", "sk-admin"):
        httpx.post(f"{live.base_url}/chat/completions", json={"model": "up", "messages": MESSAGES},
                   headers={"authorization": f"Bearer {key}"})
    httpx.put(f"{live.base_url}/tenants/newco", headers=ADMIN, json={"api_keys": ["sk-newco-77"]})
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "tenant newco set" in logged  # the log was captured at all
    for secret in ("sk-wrong-secret-123", "sk-acme", "sk-admin", "sk-newco-77"):
        assert secret not in logged
