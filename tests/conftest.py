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
