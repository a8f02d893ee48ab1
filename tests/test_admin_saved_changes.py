"""What the admin API changes is saved, and only that: a later edit of the config file
takes effect for everything the API did not change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from proxy.app import create_app
from proxy.settings import (
    AdapterConfig,
    AuthSettings,
    MemorySettings,
    ModelConfig,
    Settings,
    TenantConfig,
)
from proxy.testing.fake_upstream import FakeUpstream
from proxy.testing.live import serve

ADMIN = {"authorization": "Bearer sk-admin"}


def settings(data_dir: Path, upstream: FakeUpstream, **changes: Any) -> Settings:
    base = Settings(
        data_dir=data_dir,
        models=[ModelConfig(name="up", backend="litellm", model="openai/fake-model",
                            api_base=upstream.url, transport="direct")],
        auth=AuthSettings(enabled=True, admin_keys=["sk-admin"]),
        memory=MemorySettings(enabled=False),
        adapters=[AdapterConfig(name="a", upstream_model="hosted_vllm/a-v1")],
        tenants=[TenantConfig(id="acme", api_keys=["sk-acme"], adapter="a", rate_limit_rpm=10),
                 TenantConfig(id="globex", api_keys=["sk-globex"])],
    )
    return base.model_copy(update=changes)


def adapters(url: str) -> dict[str, dict[str, Any]]:
    listed = httpx.get(f"{url}/v1/adapters", headers=ADMIN).json()["data"]
    return {a["name"]: a for a in listed}


def test_a_config_edit_reaches_adapters_the_api_did_not_change(tmp_path: Path,
                                                              upstream: FakeUpstream) -> None:
    with serve(create_app(settings(tmp_path, upstream))) as live:
        r = httpx.put(f"{live.url}/v1/adapters/b", headers=ADMIN,
                      json={"upstream_model": "hosted_vllm/b", "tenants": ["globex"]})
        assert r.status_code == 200, r.text
    edited = settings(tmp_path, upstream,
                      adapters=[AdapterConfig(name="a", upstream_model="hosted_vllm/a-v2")])
    with serve(create_app(edited)) as live:
        found = adapters(live.url)
    assert found["a"]["upstream_model"] == "hosted_vllm/a-v2"  # the config's edit
    assert found["a"]["tenants"] == ["acme"]
    assert (found["b"]["upstream_model"], found["b"]["tenants"]) == ("hosted_vllm/b", ["globex"])


def test_an_adapter_deleted_through_the_api_stays_deleted(tmp_path: Path,
                                                         upstream: FakeUpstream) -> None:
    with serve(create_app(settings(tmp_path, upstream))) as live:
        assert httpx.delete(f"{live.url}/v1/adapters/a", headers=ADMIN).status_code == 200
    with serve(create_app(settings(tmp_path, upstream))) as live:
        assert adapters(live.url) == {}


def test_a_config_edit_reaches_tenant_fields_the_api_did_not_set(tmp_path: Path,
                                                                upstream: FakeUpstream) -> None:
    with serve(create_app(settings(tmp_path, upstream))) as live:
        r = httpx.put(f"{live.url}/v1/tenants/acme", headers=ADMIN, json={"api_keys": ["sk-acme-2"]})
        assert r.status_code == 200, r.text
    edited = settings(tmp_path, upstream, tenants=[
        TenantConfig(id="acme", api_keys=["sk-acme"], adapter="a", rate_limit_rpm=20),
        TenantConfig(id="globex", api_keys=["sk-globex"])])
    with serve(create_app(edited)) as live:
        acme = httpx.get(f"{live.url}/v1/tenants/acme", headers=ADMIN).json()
        assert (acme["rate_limit_rpm"], acme["source"], acme["key_count"]) == (20, "api", 1)
        models = f"{live.url}/v1/models"
        assert httpx.get(models, headers={"authorization": "Bearer sk-acme-2"}).status_code == 200
        assert httpx.get(models, headers={"authorization": "Bearer sk-acme"}).status_code == 401
