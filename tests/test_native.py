"""The embedded models on this CPU: llama.cpp's settings, the doctor, and the crash path.

llama.cpp's extra buffer types (AMX, weight repacking) crashed both models on Intel
CPUs with AMX, killing the whole test run. They are off by default; the crash path
(a batch of embeddings, a prefill of 1,000 tokens, JSON sampled under a grammar) runs
first, in a child process, so a native crash shows as one failing test with the
child's stderr (see conftest.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from memory.embedding.minilm import MiniLMEmbedder
from memory.native import cpu_features, has_amx, load_llama
from proxy.backends import build_backend
from proxy.backends.llamacpp import LlamaCppBackend, default_model_path
from proxy.doctor import failure_message, report, run_selftest
from proxy.settings import ModelConfig, Settings, UpstreamSettings, load_settings
from tests.conftest import REPO

DOCTOR = [sys.executable, "-m", "proxy.cli", "doctor"]


def doctor(config: dict[str, object], tmp_path: Path,
           timeout: float = 600) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "doctor.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([*DOCTOR, "--config", str(path)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.native_crash_path
def test_the_crash_path_exits_cleanly_in_a_child_with_default_settings(tmp_path: Path) -> None:
    """Batched embeddings, then a prefill of at least 1,000 tokens and 16 generated, by
    both embedded models with the default settings, in a child process."""
    done = doctor({"data_dir": str(tmp_path / "data")}, tmp_path)
    output = f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert done.returncode == 0, output
    assert re.search(r"embed a batch of 32 texts \.\.\. ok", done.stdout), output
    prefill = re.search(r"prefill (\d+) tokens \(local\) \.\.\. ok", done.stdout)
    assert prefill and int(prefill.group(1)) >= 1000, output
    assert re.search(r"generate 16 tokens \(local\) \.\.\. ok", done.stdout), output
    assert re.search(r"repeat it at temperature 0 \(local\) \.\.\. ok", done.stdout), output
    # Grammar sampling (response_format, fine extraction) is native code too.
    assert re.search(r"answer in JSON under a grammar \(local\) \.\.\. ok", done.stdout), output
    assert done.stdout.rstrip().endswith("all checks passed"), output


def test_default_settings_load_both_models_without_extra_buffer_types(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.models[0].extra_buffer_types is False
    assert settings.memory.embedder.extra_buffer_types is False
    embedder = MiniLMEmbedder(tmp_path / "models")
    try:
        assert embedder.uses_extra_buffer_types is False
    finally:
        embedder.close()
    backend = build_backend(settings.models[0], settings.upstream)
    assert isinstance(backend, LlamaCppBackend)
    import asyncio

    asyncio.run(backend.start())
    try:
        assert backend.uses_extra_buffer_types is False
    finally:
        asyncio.run(backend.close())


@pytest.mark.parametrize("extra", [True, False])
def test_the_setting_reaches_llama_cpp_either_way(extra: bool) -> None:
    # vocab_only loads no weights, so no extra buffer is ever filled: safe on any CPU.
    llm = load_llama(str(default_model_path()), extra_buffer_types=extra, vocab_only=True,
                     verbose=False)
    try:
        assert bool(llm.model_params.use_extra_bufts) is extra
    finally:
        llm.close()


def test_the_setting_is_read_from_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "models": [{"name": "local", "backend": "llamacpp", "extra_buffer_types": True}],
        "memory": {"embedder": {"extra_buffer_types": True}}}))
    settings = load_settings(path)
    assert settings.memory.embedder.extra_buffer_types is True
    backend = build_backend(settings.models[0], UpstreamSettings())
    assert isinstance(backend, LlamaCppBackend) and backend.extra_buffer_types is True


def test_doctor_names_the_step_that_fails_and_exits_1(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    done = doctor({"data_dir": str(tmp_path / "data"),
                   "models": [{"name": "local", "backend": "llamacpp", "path": str(broken)}],
                   "memory": {"embedder": {"backend": "litellm", "model": "openai/unused"}}},
                  tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "self-test FAILED at step 'load local'" in done.stderr
    assert "embedder: openai/unused through litellm, nothing runs here" in done.stdout


def test_doctor_refuses_a_bad_config_with_status_2(tmp_path: Path) -> None:
    done = doctor({"models": [{"name": "local", "backend": "bogus"}]}, tmp_path)
    assert done.returncode == 2
    assert "models.0.backend" in done.stderr


CRASHING_CHILD = """
import json, os, signal, sys
print(json.dumps({"step": "load local", "event": "start"}), flush=True)
print(json.dumps({"step": "load local", "event": "ok", "seconds": 0.5}), flush=True)
print(json.dumps({"step": "prefill 1000 tokens (local)", "event": "start"}), flush=True)
sys.stderr.write("ggml_backend_amx_buffer_set_tensor: amx repack tensor blk.0.attn_q.weight\\n")
sys.stderr.flush()
os.kill(os.getpid(), signal.SIGSEGV)
"""


def test_a_native_crash_in_the_child_is_named_with_its_stderr() -> None:
    test = run_selftest([sys.executable, "-c", CRASHING_CHILD], timeout=60)
    assert not test.ok
    assert [s.step for s in test.passed] == ["load local"]
    assert test.failed_step == "prefill 1000 tokens (local)"
    assert "SIGSEGV" in test.problem
    message = failure_message(test)
    assert "FAILED at step 'prefill 1000 tokens (local)'" in message
    assert "amx repack tensor" in message


def test_a_child_that_hangs_is_stopped_at_the_timeout() -> None:
    hangs = ("import json, time; print(json.dumps({'step': 'embed', 'event': 'start'}), flush=True); "
             "time.sleep(60)")
    test = run_selftest([sys.executable, "-c", hangs], timeout=1)
    assert test.failed_step == "embed"
    assert test.problem == "no result in 1 s; the child was stopped"


AMX_XEON = """processor	: 0
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16 """ \
    """amx_bf16 amx_tile amx_int8
"""
GRAVITON = """processor	: 0
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp sve i8mm
CPU implementer	: 0x41
"""


def test_cpu_features_are_read_from_cpuinfo() -> None:
    name, features = cpu_features(AMX_XEON)
    assert name == "Intel(R) Xeon(R) Platinum 8480+"
    assert features == ["sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                        "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"]
    assert has_amx(features)
    _, arm = cpu_features(GRAVITON)
    assert arm == ["asimd", "asimddp", "i8mm", "sve"] and not has_amx(arm)


def test_this_machine_s_defaults_never_take_the_amx_path() -> None:
    """Whatever this CPU is, the defaults give llama.cpp no extra buffer type, which is
    the only way its AMX kernels are reached; the report says so and why."""
    text = report(Settings())
    assert "llama.cpp: CPU :" in text
    assert text.count("extra buffer types off by default") == 2
    assert "warning: this CPU has AMX" not in text
    on = Settings(models=[ModelConfig(name="local", backend="llamacpp", extra_buffer_types=True)])
    _, features = cpu_features()
    assert ("warning: this CPU has AMX" in report(on)) is has_amx(features)
