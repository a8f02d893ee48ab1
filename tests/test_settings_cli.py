"""Settings, config files and the CLI, including a real `memcube-proxy serve`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from proxy.settings import ConfigError, Settings, load_settings
from proxy.testing.live import refused_port
from tests.conftest import REPO

CLI = [sys.executable, "-m", "proxy.cli"]


def test_default_config_file_matches_builtin_defaults() -> None:
    assert load_settings(REPO / "configs" / "default.yaml").model_dump() == \
        load_settings(None).model_dump()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path: Path) -> None:
    settings = load_settings(path)
    assert settings.models


def test_env_overrides_file_and_flags_override_env(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"port": 1000, "data_dir": "/file",
                                   "upstream": {"timeout": 3, "max_retries": 1}}))
    monkeypatch.setenv("MEMCUBE_PORT", "2000")
    monkeypatch.setenv("MEMCUBE_DATA_DIR", "/env")
    monkeypatch.setenv("MEMCUBE_UPSTREAM_TIMEOUT", "9")
    monkeypatch.setenv("MEMCUBE_QDRANT_URL", "http://q:6333")
    s = load_settings(cfg, port=3000)
    assert s.port == 3000
    assert s.data_dir == Path("/env")
    assert s.upstream.timeout == 9
    assert s.upstream.max_retries == 1  # the file's other keys in that section survive
    assert s.qdrant.url == "http://q:6333"


def test_models_can_come_from_env_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMCUBE_MODELS", '[{"name": "x", "backend": "litellm", "model": "openai/x"}]')
    assert [m.name for m in load_settings(None).models] == ["x"]


@pytest.mark.parametrize(
    ("doc", "field"),
    [({"models": [{"name": "m", "backend": "bogus"}]}, "models.0.backend"),
     ({"models": [{"name": "m", "backend": "litellm"}]}, "models.0"),
     ({"port": "eighty"}, "port"),
     ({"upstream": {"timeout": -1}}, "upstream.timeout"),
     ({"no_such_key": 1}, "no_such_key"),
     ({"models": [{"name": "a", "backend": "llamacpp"}, {"name": "a", "backend": "llamacpp"}]},
      "duplicate model name")],
)
def test_bad_config_names_the_field(tmp_path: Path, doc: dict[str, object], field: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert field in str(info.value)


def test_unreadable_and_non_yaml_configs_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(bad)


def test_cli_bad_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("models:\n  - name: m\n    backend: nope\n")
    r = subprocess.run([*CLI, "serve", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.returncode == 2
    assert "models.0.backend" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_help_lists_flags() -> None:
    r = subprocess.run([*CLI, "serve", "--help"], capture_output=True, text=True, timeout=60,
                       cwd=REPO)
    assert r.returncode == 0
    for flag in ("--config", "--host", "--port"):
        assert flag in r.stdout


def test_serve_default_config_is_healthy_within_15s(tmp_path: Path) -> None:
    port = refused_port()
    env = {**os.environ, "MEMCUBE_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen([*CLI, "serve", "--config", str(REPO / "configs" / "default.yaml"),
                             "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    start = time.monotonic()
    healthy = False
    try:
        while time.monotonic() - start < 15 and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    healthy = True
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert healthy, "not healthy within 15 s"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                       json={"model": "local", "max_tokens": 4,
                             "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        assert (tmp_path / "data").is_dir()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out
    assert "Traceback" not in out
    rid = r.headers["x-memcube-request-id"]
    assert f"[{rid}] POST /v1/chat/completions 200" in out


def test_settings_fields_are_all_described() -> None:
    def walk(model: type) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            if not field.description:
                missing.append(f"{model.__name__}.{name}")
            ann = field.annotation
            for sub in getattr(ann, "__args__", ()) + (ann,):
                if isinstance(sub, type) and hasattr(sub, "model_fields") and sub is not model:
                    missing += walk(sub)
        return missing

    assert walk(Settings) == []
