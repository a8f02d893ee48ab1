"""What stops `memcube-proxy serve` is said in a line or two naming the setting, with a
non-zero exit and no traceback: config mistakes, a port or data dir in use, files the
config names that are missing or no LoRA. Real `memcube-proxy serve` processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from memory.store.edge import EdgeStore
from proxy.settings import load_settings
from proxy.startup import LOCK_FILE
from proxy.testing.live import refused_port
from tests.conftest import REPO

CLI = [sys.executable, "-m", "proxy.cli", "serve"]


def upstream_model(**extra: Any) -> dict[str, Any]:
    """A model on the litellm backend whose upstream is a closed port: starts at once."""
    return {"name": "up", "backend": "litellm", "model": "openai/m",
            "api_base": f"http://127.0.0.1:{refused_port()}/v1", **extra}


def write_config(tmp_path: Path, doc: dict[str, Any] | str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MEMCUBE_")}
    return {**env, "MEMCUBE_DATA_DIR": str(tmp_path / "data"), **extra}


def run(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path, env=env or env_for(tmp_path))


def assert_one_clear_failure(r: subprocess.CompletedProcess[str], *needles: str,
                             max_lines: int = 3) -> str:
    """Exit 2, no traceback, the needles on stderr, and what the proxy said about the
    failure in at most ``max_lines`` lines (start-up log lines aside)."""
    err = r.stderr
    assert r.returncode == 2, err
    assert "Traceback" not in err and "File \"" not in err, err
    said = [ln for ln in err.splitlines() if "memcube-proxy:" in ln or " ERROR " in ln]
    assert 1 <= len(said) <= max_lines, err
    assert len(err.splitlines()) <= max_lines + 6, err  # a few start-up INFO lines at most
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    return err


# -- config mistakes (no server starts) ------------------------------------------------------


@pytest.mark.parametrize(("doc", "needles"), [
    ("models: [unclosed\n", ["not valid YAML", "line 2, column 1"]),
    ({"nope": 1}, ["nope: no such setting"]),
    ({"port": "eighty"}, ["port: Input should be a valid integer"]),
    ({"upstream": {"timeout": "soon"}}, ["upstream.timeout"]),
    ({"models": [{"name": "m", "backend": "bogus"}]}, ["models.0.backend"]),
], ids=["bad-yaml", "unknown-key", "wrong-type", "wrong-type-nested", "bad-literal"])
def test_a_bad_config_file_names_the_field(tmp_path: Path, doc: dict[str, Any] | str,
                                           needles: list[str]) -> None:
    cfg = write_config(tmp_path, doc)
    assert_one_clear_failure(run(tmp_path, "--config", str(cfg)), *needles)


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    assert_one_clear_failure(run(tmp_path, "--config", "nowhere.yaml"),
                             "cannot read config file nowhere.yaml", "No such file")


@pytest.mark.parametrize(("var", "value", "needles"), [
    ("MEMCUBE_PORT", "abc", ["port:", "set by MEMCUBE_PORT"]),
    ("MEMCUBE_UPSTREAM_TIMEOUT", "soon", ["upstream.timeout", "set by MEMCUBE_UPSTREAM_TIMEOUT"]),
    ("MEMCUBE_MODELS", "not json", ["MEMCUBE_MODELS: not valid JSON"]),
    ("MEMCUBE_UPSTREAM", "{oops", ["MEMCUBE_UPSTREAM: not valid JSON"]),
    ("MEMCUBE_UPSTREAM_TIMEOT", "3", ["upstream.timeot: no such setting"]),
])
def test_a_bad_environment_override_names_the_variable(tmp_path: Path, var: str, value: str,
                                                       needles: list[str]) -> None:
    r = run(tmp_path, env=env_for(tmp_path, **{var: value}))
    assert_one_clear_failure(r, *needles)


# -- checked before any model loads ----------------------------------------------------------


def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"models": [upstream_model()], "memory": {"enabled": False}})
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run(tmp_path, "--config", str(cfg), "--port", str(port))
    assert_one_clear_failure(r, f"port {port} is in use", "--port", "stop the other process",
                             max_lines=1)


def test_a_host_that_is_not_here_is_one_line(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"models": [upstream_model()], "memory": {"enabled": False}})
    r = run(tmp_path, "--config", str(cfg), "--host", "192.0.2.1", "--port", "0")
    assert_one_clear_failure(r, "cannot listen on 192.0.2.1:0", "--host", max_lines=1)


def test_a_missing_adapter_file_is_one_line_before_the_model_loads(tmp_path: Path) -> None:
    """The shipped multi-tenant config, run where adapters/acme.gguf is not."""
    started = time.monotonic()
    r = run(tmp_path, "--config", str(REPO / "configs" / "multi-tenant.yaml"), "--port", "0")
    assert_one_clear_failure(r, "adapters[0].path: adapters/acme.gguf", "does not exist",
                             "memcube-proxy adapters make-test", "remove the adapter",
                             max_lines=1)
    assert "loaded" not in r.stderr  # said before the local model loaded
    assert time.monotonic() - started < 60


def test_a_missing_model_file_is_one_line(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"models": [{"name": "local", "backend": "llamacpp",
                                              "path": "models/none.gguf"}]})
    assert_one_clear_failure(run(tmp_path, "--config", str(cfg), "--port", "0"),
                             "models[0].path: models/none.gguf", "does not exist", max_lines=1)


# -- one process per data dir ----------------------------------------------------------------


@pytest.fixture
def first_proxy(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A proxy serving on ``tmp_path / "data"``, healthy."""
    cfg = write_config(tmp_path, {"models": [upstream_model()], "memory": {"enabled": False}},
                       "first.yaml")
    port = refused_port()
    proc = subprocess.Popen([*CLI, "--config", str(cfg), "--port", str(port)], cwd=tmp_path,
                            env=env_for(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the first proxy did not start in 60 s"
            time.sleep(0.1)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_a_second_proxy_on_the_same_data_dir_is_one_line_naming_the_first(
        tmp_path: Path, first_proxy: subprocess.Popen[str]) -> None:
    assert (tmp_path / "data" / LOCK_FILE).read_text().strip() == str(first_proxy.pid)
    cfg = write_config(tmp_path, {"models": [upstream_model()], "memory": {"enabled": False}})
    r = run(tmp_path, "--config", str(cfg), "--port", "0")
    assert_one_clear_failure(r, f"data_dir {tmp_path / 'data'} is in use by another "
                             f"memcube-proxy process (pid {first_proxy.pid})",
                             "one process per data dir", "MEMCUBE_DATA_DIR", max_lines=1)
    assert first_proxy.poll() is None  # the first one serves on


def test_a_data_dir_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    cfg = write_config(tmp_path, {"models": [upstream_model()], "memory": {"enabled": False}})
    r = run(tmp_path, "--config", str(cfg), "--port", "0",
            env=env_for(tmp_path, MEMCUBE_DATA_DIR=str(tmp_path / "a-file" / "data")))
    assert_one_clear_failure(r, f"data_dir {tmp_path / 'a-file' / 'data'}: cannot use it",
                             "MEMCUBE_DATA_DIR", max_lines=1)


def test_the_data_dir_is_free_again_once_its_proxy_is_killed(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"models": [upstream_model()], "memory": {"enabled": False}})
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from proxy.startup import lock_data_dir; "
        "lock_data_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)"),
        str(tmp_path / "data")], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        held = run(tmp_path, "--config", str(cfg), "--port", "0", "--log-level", "error")
        assert_one_clear_failure(held, f"(pid {holder.pid})", max_lines=1)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # The lock died with its holder: the proxy now starts (and is stopped at once).
    proc = subprocess.Popen([*CLI, "--config", str(cfg), "--port", "0"], cwd=tmp_path,
                            env=env_for(tmp_path), stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            assert "memcube-proxy:" not in line, line
            if "Application startup complete" in line:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode in (0, -signal.SIGTERM)


def test_a_memory_store_another_process_holds_is_one_line(tmp_path: Path) -> None:
    """Qdrant Edge's own WAL lock (``WouldBlock``), held by a process that took no lock
    file (here the test itself), is said the same way."""
    store = EdgeStore(tmp_path / "data" / "qdrant", embedding_model="test/emb", dim=8)
    try:
        cfg = write_config(tmp_path, {
            "models": [upstream_model()],
            "memory": {"embedder": {"backend": "litellm", "model": "openai/emb", "dim": 8,
                                    "api_base": f"http://127.0.0.1:{refused_port()}/v1"}}})
        r = run(tmp_path, "--config", str(cfg), "--port", "0")
    finally:
        store.close()
    err = assert_one_clear_failure(r, f"data_dir {tmp_path / 'data'} is in use",
                                   "one process per data dir", "MEMCUBE_DATA_DIR")
    assert "WouldBlock" not in err
    assert "(pid " not in err  # its own lock file names itself, not the store's holder


# -- failures found while the app starts -----------------------------------------------------


def test_a_file_that_is_no_lora_is_one_line(tmp_path: Path) -> None:
    """Found only once the local model is loaded: said by the start-up, in one line."""
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    cfg = write_config(tmp_path, {
        "models": [{"name": "local", "backend": "llamacpp", "n_ctx": 512}],
        "memory": {"enabled": False},
        "adapters": [{"name": "junk", "path": "junk.gguf"}]})
    r = run(tmp_path, "--config", str(cfg), "--port", "0")
    err = assert_one_clear_failure(r, "cannot start: adapter 'junk'", "remove the adapter")
    assert "Application startup failed" in err


def test_a_variable_naming_no_setting_is_warned_of(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Not refused: platforms set MEMCUBE_* variables of their own (Kubernetes does for
    a service named memcube), but a misspelt one is not ignored without a word."""
    monkeypatch.setenv("MEMCUBE_DATADIR", "/tmp/x")
    with caplog.at_level("WARNING"):
        settings = load_settings(None)
    assert settings.data_dir == Path("./data")
    assert any("MEMCUBE_DATADIR: no such setting" in r.getMessage() for r in caplog.records)


def test_make_serve_takes_port_and_host() -> None:
    """``make serve PORT=... HOST=...`` passes them on; without them, nothing is."""
    def serve_line(*args: str) -> str:
        out = subprocess.run(["make", "-n", "serve", *args], cwd=REPO, text=True,
                             capture_output=True, check=True,
                             env={**os.environ, "PORT": "1", "HOST": "shell"}).stdout
        joined = out.replace("\\\n", " ")  # the recipe's continued lines, as one
        return next(line for line in joined.splitlines() if "memcube-proxy serve" in line)

    line = serve_line("PORT=8123", "HOST=0.0.0.0")
    assert "--port 8123" in line and "--host 0.0.0.0" in line
    assert "--port" not in serve_line() and "--host" not in serve_line()  # the shell's are not
