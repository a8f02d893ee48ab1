"""Parametric memory: LoRA files, the adapters API, and tenants' adapters applied per
request by the real llama.cpp model (and by name for an upstream)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from gguf import GGUFWriter

from memory.parametric import AdapterError, inspect, make_test_adapter
from proxy.app import create_app
from proxy.backends.llamacpp import LlamaCppBackend, default_model_path
from proxy.cli import main as cli
from proxy.settings import (
    AdapterConfig,
    AuthSettings,
    MemorySettings,
    ModelConfig,
    Settings,
    TenantConfig,
)
from proxy.testing.fake_upstream import FakeUpstream
from proxy.testing.live import Live, serve

pytestmark = pytest.mark.slow

BASE = default_model_path()
KEYS = {"acme": "sk-acme", "globex": "sk-globex", "initech": "sk-initech"}
ADMIN = "sk-admin"
PROMPT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("adapters")
    made = {"a": make_test_adapter(BASE, d / "a.gguf", rank=8, seed=1),
            "c": make_test_adapter(BASE, d / "c.gguf", rank=4, seed=2)}
    assert all(info.fits for info in made.values())
    wrong = d / "wrong.gguf"  # a LoRA whose shapes fit no tensor of the model
    w = GGUFWriter(str(wrong), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 4.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 100), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((100, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    junk = d / "junk.gguf"
    junk.write_bytes(b"GGUF but not really" * 10)
    return {"a": d / "a.gguf", "c": d / "c.gguf", "wrong": wrong, "junk": junk}


# -- files and the CLI --------------------------------------------------------------------


def test_inspect_reads_a_made_adapter(files: dict[str, Path]) -> None:
    info = inspect(files["a"], BASE)
    assert info.fits and info.ranks == {8} and info.architecture == "llama"
    assert len(info.targets) == 60  # attn_q and attn_v in 30 layers
    assert "fits the base model" in info.describe()


def test_inspect_names_what_does_not_fit(files: dict[str, Path]) -> None:
    info = inspect(files["wrong"], BASE)
    assert not info.fits
    assert "blk.0.attn_q.weight: adapter maps 100 -> 100" in info.problems[0]
    with pytest.raises(AdapterError, match="not a GGUF file"):
        inspect(files["junk"], BASE)
    with pytest.raises(AdapterError, match="not a LoRA adapter"):
        inspect(BASE, BASE)  # a model, not an adapter


def test_cli_make_test_and_inspect(tmp_path: Path, files: dict[str, Path],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["adapters", "make-test", "--rank", "2", str(tmp_path / "x.gguf")]) == 0
    assert "rank [2]" in capsys.readouterr().out
    assert cli(["adapters", "inspect", str(tmp_path / "x.gguf")]) == 0
    assert cli(["adapters", "inspect", str(files["wrong"])]) == 1
    assert "does not fit" in capsys.readouterr().out
    assert cli(["adapters", "inspect", str(files["junk"])]) == 2


# -- the local model through HTTP -----------------------------------------------------


def local_settings(data_dir: Path, files: dict[str, Path]) -> Settings:
    return Settings(
        data_dir=data_dir,
        models=[ModelConfig(name="local", backend="llamacpp", n_ctx=1024)],
        auth=AuthSettings(enabled=True, admin_keys=[ADMIN]),
        adapters=[AdapterConfig(name="style-a", path=str(files["a"]))],
        tenants=[TenantConfig(id="acme", api_keys=[KEYS["acme"]], adapter="style-a"),
                 TenantConfig(id="globex", api_keys=[KEYS["globex"]]),
                 TenantConfig(id="initech", api_keys=[KEYS["initech"]])],
        memory=MemorySettings(enabled=False),
    )


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, files: dict[str, Path]) -> Iterator[Live]:
    with serve(create_app(local_settings(tmp_path_factory.mktemp("data"), files))) as running:
        yield running


def ask(live: Live, tenant: str, *, stream: bool = False) -> tuple[str, httpx.Headers]:
    c = openai.OpenAI(base_url=live.base_url, api_key=KEYS[tenant], max_retries=0)
    kwargs: dict[str, Any] = {"model": "local", "messages": PROMPT, "max_tokens": 12,
                              "temperature": 0}
    if stream:
        raw = c.chat.completions.with_raw_response.create(stream=True, **kwargs)
        return ("".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices),
                raw.headers)  # type: ignore[return-value]
    raw = c.chat.completions.with_raw_response.create(**kwargs)
    return raw.parse().choices[0].message.content or "", raw.headers  # type: ignore[return-value]


def admin(live: Live, method: str, path: str, key: str = ADMIN, **kw: Any) -> httpx.Response:
    return httpx.request(method, f"{live.base_url}{path}", timeout=60,
                         headers={"authorization": f"Bearer {key}"}, **kw)


def backend(live: Live) -> LlamaCppBackend:
    b = live.context.backends["local"]
    assert isinstance(b, LlamaCppBackend)
    return b


@pytest.fixture(scope="module")
def base_output(local_server: Live) -> str:
    """The model with no adapter at all (another server, which never loaded one)."""
    c = openai.OpenAI(base_url=local_server.base_url, api_key="unused", max_retries=0)
    reply = c.chat.completions.create(model="local", messages=PROMPT,  # type: ignore[arg-type]
                                      max_tokens=12, temperature=0)
    return reply.choices[0].message.content or ""


def test_tenant_adapter_changes_output_and_others_get_the_base(live: Live, base_output: str) -> None:
    a, ha = ask(live, "acme")
    g, hg = ask(live, "globex")
    assert a != base_output and g == base_output
    assert ha["x-memcube-adapter"] == "style-a" and "x-memcube-adapter" not in hg
    assert ask(live, "acme", stream=True)[0] == a  # and again, after the base ran
    assert ask(live, "globex", stream=True)[0] == base_output


def test_interleaved_concurrent_requests_never_mix(live: Live, base_output: str) -> None:
    adapted = ask(live, "acme")[0]
    order = ["acme", "globex"] * 4
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda t: (t, ask(live, t, stream=t == "acme")[0]), order))
    for tenant, text in results:
        assert text == (adapted if tenant == "acme" else base_output), tenant


def test_put_refuses_files_that_do_not_fit_and_changes_nothing(live: Live,
                                                               files: dict[str, Path]) -> None:
    before = admin(live, "GET", "/adapters").json()
    for bad, needle in (("wrong", "does not fit"), ("junk", "not a GGUF"),
                        ("nope", "cannot read")):
        path = str(files.get(bad, files["a"].parent / "missing.gguf"))
        r = admin(live, "PUT", "/adapters/broken", json={"path": path, "tenants": ["globex"]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["type"], err["param"], err["code"]) == (
            "invalid_request_error", "path", "invalid_adapter")
        assert needle in err["message"]
    assert admin(live, "GET", "/adapters").json() == before
    assert "x-memcube-adapter" not in ask(live, "globex")[1]
    r = admin(live, "PUT", "/adapters/x", json={"scale": 1.0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "path"
    assert admin(live, "PUT", "/adapters/bad%20name", json={"path": "x"}).status_code == 400


def test_only_admins_manage_adapters(live: Live, files: dict[str, Path]) -> None:
    r = admin(live, "GET", "/adapters", key=KEYS["acme"])
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert admin(live, "PUT", "/adapters/z", key=KEYS["acme"],
                 json={"path": str(files["c"])}).status_code == 403
    assert admin(live, "GET", "/adapters", key="sk-nobody").status_code == 401
    listed = admin(live, "GET", "/adapters").json()
    assert listed["object"] == "list"
    assert [(a["name"], a["tenants"]) for a in listed["data"]] == [("style-a", ["acme"])]


def test_adapters_put_binds_and_evicted_adapters_reload(live: Live, files: dict[str, Path],
                                                        base_output: str) -> None:
    acme = ask(live, "acme")[0]
    r = admin(live, "PUT", "/adapters/style-c", json={"path": str(files["c"]),
                                                      "tenants": ["initech"]})
    assert r.status_code == 200 and r.json()["tenants"] == ["initech"]
    b = backend(live)
    b.max_adapters = 1  # the LRU holds one: alternating tenants evicts and reloads
    try:
        first = ask(live, "initech")
        assert first[1]["x-memcube-adapter"] == "style-c"
        assert first[0] not in (acme, base_output)
        evictions = b.adapter_stats.evictions
        for _ in range(2):
            assert ask(live, "acme")[0] == acme
            assert ask(live, "initech")[0] == first[0]
        assert b.adapter_stats.evictions >= evictions + 3
    finally:
        b.max_adapters = 8
    metrics = httpx.get(live.url + "/metrics", headers={"authorization": f"Bearer {ADMIN}"}).text
    assert 'memcube_adapter_requests_total{adapter="style-c",model="local"}' in metrics
    assert "memcube_adapter_evictions_total" in metrics
    gone = admin(live, "DELETE", "/adapters/style-c")
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert ask(live, "initech")[0] == base_output
    assert admin(live, "DELETE", "/adapters/style-c").status_code == 404


def test_api_changes_survive_a_restart(tmp_path: Path, files: dict[str, Path],
                                       base_output: str) -> None:
    with serve(create_app(local_settings(tmp_path, files))) as first:
        r = admin(first, "PUT", "/adapters/style-c", json={"path": str(files["c"]),
                                                           "tenants": ["globex"]})
        assert r.status_code == 200
        adapted = ask(first, "globex")[0]
        assert adapted != base_output
    with serve(create_app(local_settings(tmp_path, files))) as second:
        text, headers = ask(second, "globex")
        assert (text, headers["x-memcube-adapter"]) == (adapted, "style-c")


def test_a_configured_adapter_that_does_not_fit_stops_startup(
        tmp_path: Path, files: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    settings = local_settings(tmp_path, files)
    settings.adapters = [AdapterConfig(name="bad", path=str(files["wrong"]))]
    settings.tenants[0].adapter = "bad"
    with pytest.raises(RuntimeError, match="server failed to start"):
        with serve(create_app(settings)):
            pass
    assert "adapter 'bad': " in caplog.text and "does not fit this model" in caplog.text


# -- upstream models ----------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["direct", "litellm"])
def test_upstream_adapter_replaces_the_model_name(tmp_path: Path, upstream: FakeUpstream,
                                                  transport: str) -> None:
    settings = Settings(
        data_dir=tmp_path,
        models=[ModelConfig(name="up", backend="litellm", model="openai/base-model",
                            api_base=upstream.url, transport=transport, max_retries=0)],
        auth=AuthSettings(enabled=True, admin_keys=[ADMIN]),
        adapters=[AdapterConfig(name="acme-ft", upstream_model="openai/acme-finetune")],
        tenants=[TenantConfig(id="acme", api_keys=[KEYS["acme"]], adapter="acme-ft"),
                 TenantConfig(id="globex", api_keys=[KEYS["globex"]])],
        memory=MemorySettings(enabled=False))
    with serve(create_app(settings)) as running:
        for tenant, model in (("acme", "acme-finetune"), ("globex", "base-model")):
            c = openai.OpenAI(base_url=running.base_url, api_key=KEYS[tenant], max_retries=0)
            raw = c.chat.completions.with_raw_response.create(model="up", messages=PROMPT)
            assert upstream.history[-1].body["model"] == model
            assert raw.headers.get("x-memcube-adapter") == ("acme-ft" if tenant == "acme" else None)


def test_activation_state_is_never_reused_across_adapters(tmp_path: Path,
                                                         files: dict[str, Path]) -> None:
    settings = local_settings(tmp_path, files)
    settings.memory = MemorySettings(enabled=True)
    with serve(create_app(settings)) as running:
        key = {"authorization": f"Bearer {KEYS['acme']}"}
        r = httpx.post(f"{running.base_url}/memories", headers=key, timeout=60,
                       json={"user": "ann", "text": "The user likes jazz.", "pinned": True})
        assert r.status_code == 200

        def run() -> tuple[str, str, str]:
            c = openai.OpenAI(base_url=running.base_url, api_key=KEYS["acme"], max_retries=0)
            raw = c.chat.completions.with_raw_response.create(
                model="local", messages=PROMPT, max_tokens=12, temperature=0,  # type: ignore[arg-type]
                extra_headers={"x-memcube-user": "ann"},
                extra_body={"memory": {"write": False}})
            h = raw.headers
            return (raw.parse().choices[0].message.content or "", h["x-memcube-activation"],
                    h["x-memcube-adapter"])

        a1, a2 = run(), run()
        assert (a1[1:], a2[1:]) == (("miss", "style-a"), ("hit", "style-a")) and a1[0] == a2[0]
        assert admin(running, "PUT", "/adapters/style-c", json={
            "path": str(files["c"]), "tenants": ["acme"]}).status_code == 200
        c1, c2 = run(), run()
        assert (c1[1:], c2[1:]) == (("miss", "style-c"), ("hit", "style-c")) and c1[0] == c2[0]
        assert c1[0] != a1[0]
    assert len(list((tmp_path / "activation" / "local").glob("*.kv"))) == 2
