from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from memory import offline
from proxy.app import create_app
from proxy.settings import (
    AuthSettings,
    EmbedderSettings,
    MemorySettings,
    ModelConfig,
    Settings,
    TenantConfig,
)
from proxy.testing.fake_upstream import FakeUpstream
from proxy.testing.live import Live, serve

offline.configure()

REPO = Path(__file__).resolve().parent.parent
#: The tenants of ``memory_live``, by key.
KEYS = {"acme": "sk-acme", "globex": "sk-globex"}
ADMIN_KEY = "sk-admin"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The native crash path runs first (tests/test_native.py): if llama.cpp crashes on
    this CPU, later tests that load the models in-process would kill the whole run."""
    first = [i for i in items if i.get_closest_marker("native_crash_path")]
    items[:] = first + [i for i in items if not i.get_closest_marker("native_crash_path")]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    report: pytest.TestReport = yield
    if report.when == "call" and report.failed and item.get_closest_marker("native_crash_path"):
        item.session.shouldstop = ("the embedded models crash natively on this CPU (the failure "
                                   "above carries the child's stderr); stopping before a test "
                                   "that loads them in-process dies with them")
    return report


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="session")
def local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One proxy with the real embedded model for the whole session (loading is shared)."""
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("data"),
        models=[ModelConfig(name="local", backend="llamacpp", n_ctx=2048)],
        memory=MemorySettings(enabled=False),
    )
    with serve(create_app(settings)) as live:
        yield live


def upstream_settings(tmp_path: Path, upstream: FakeUpstream, transport: str = "direct",
                      **model: object) -> Settings:
    cfg = {"name": "up", "backend": "litellm", "model": "openai/fake-model",
           "api_base": upstream.url, "api_key_env": "FAKE_UPSTREAM_KEY",
           "transport": transport, "max_retries": 0, "timeout": 5.0, **model}
    # The proxy's own behaviour, without memory: memory has its tests (test_memory_*).
    return Settings(data_dir=tmp_path / "data", models=[ModelConfig.model_validate(cfg)],
                    memory=MemorySettings(enabled=False))


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where MiniLM is converted to GGUF: once for the whole session."""
    return tmp_path_factory.mktemp("models")


def memory_settings(tmp_path: Path, upstream: FakeUpstream, model_cache: Path,
                    **memory: Any) -> Settings:
    """``memory_live``'s settings; ``memory``: more of the ``memory`` section."""
    return Settings(
        data_dir=tmp_path / "data",
        models=[ModelConfig(name="up", backend="litellm", model="openai/fake-model",
                            api_base=upstream.url, max_retries=0)],
        auth=AuthSettings(enabled=True, admin_keys=[ADMIN_KEY]),
        tenants=[TenantConfig(id=t, api_keys=[k]) for t, k in KEYS.items()],
        memory=MemorySettings(embedder=EmbedderSettings(cache_dir=model_cache), **memory),
    )


@pytest.fixture
def memory_live(tmp_path: Path, upstream: FakeUpstream, model_cache: Path) -> Iterator[Live]:
    """A proxy with memory on (real MiniLM, Qdrant Edge on disk) over the fake upstream,
    auth on: tenants ``KEYS`` and an admin key."""
    with serve(create_app(memory_settings(tmp_path, upstream, model_cache))) as server:
        yield server


def sdk(live: Live, tenant: str = "acme", user: str = "alice") -> openai.OpenAI:
    """The openai SDK as one of ``memory_live``'s tenants, for one user."""
    return openai.OpenAI(base_url=live.base_url, api_key=KEYS[tenant], max_retries=0,
                         default_headers={"x-memcube-user": user})


def api(live: Live, method: str, path: str, tenant: str = "acme", **kw: Any) -> httpx.Response:
    """A request to ``memory_live``'s API as a tenant."""
    return httpx.request(method, f"{live.base_url}{path}", timeout=60,
                         headers={"authorization": f"Bearer {KEYS[tenant]}"}, **kw)
