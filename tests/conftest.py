from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from memory import offline
from proxy.app import create_app
from proxy.settings import MemorySettings, ModelConfig, Settings
from proxy.testing.fake_upstream import FakeUpstream
from proxy.testing.live import Live, serve

offline.configure()

REPO = Path(__file__).resolve().parent.parent


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
