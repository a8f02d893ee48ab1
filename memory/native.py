"""Loading llama.cpp models so that they run on any x86-64 or Arm CPU.

llama-cpp-python compiles llama.cpp for the CPU that builds the wheel (``GGML_NATIVE``).
On such a build, llama.cpp's *extra buffer types* put weights in buffers of their own
kernels: AMX tiles on Intel CPUs that have AMX, repacked layouts (CPU_REPACK) elsewhere.
On an Intel Xeon with AMX both embedded models segfaulted on them (issue 13): MiniLM on
its first batch, SmolLM2 on a prompt of about 900 tokens. With them off, every CPU runs
the plain ggml kernels, which are what the test suite covers.

So :func:`load_llama` turns them off unless a model's settings turn them on
(``extra_buffer_types: true``), and checks that llama.cpp got the setting.
``bench/native.py`` measures what they gain on a machine; ``memcube-proxy doctor``
says what this one uses and tests both models in a child process.

:func:`cpu_features` and :func:`system_info` describe the machine for the doctor.
"""

from __future__ import annotations

import contextlib
import inspect
import platform
import threading
from collections.abc import Iterator
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as llama_c

#: Why the extra buffer types are off unless asked for: shown by the doctor and the docs.
WHY_OFF = ("off by default: llama.cpp's extra buffer types (AMX, weight repacking) "
           "crashed both embedded models on Intel CPUs with AMX")
WHY_ON = "on: asked for by the settings (extra_buffer_types: true)"

# Llama() builds its model parameters from llama_model_default_params() and offers no
# argument for use_extra_bufts (llama-cpp-python 0.3.36), so the default is swapped for
# the length of one construction. The lock keeps two loads from seeing each other's.
_load_lock = threading.Lock()
_TAKES_ARGUMENT = "use_extra_bufts" in inspect.signature(llama_cpp.Llama.__init__).parameters


class NativeSettingError(RuntimeError):
    """llama.cpp did not take a model parameter it was given."""


@contextlib.contextmanager
def _model_defaults(extra_buffer_types: bool) -> Iterator[None]:
    original = llama_c.llama_model_default_params

    def defaults() -> Any:
        params = original()
        params.use_extra_bufts = extra_buffer_types
        return params

    with _load_lock:
        llama_c.llama_model_default_params = defaults
        try:
            yield
        finally:
            llama_c.llama_model_default_params = original


def load_llama(model_path: str, *, extra_buffer_types: bool = False, **kwargs: Any) -> llama_cpp.Llama:
    """``llama_cpp.Llama(model_path, **kwargs)`` with llama.cpp's extra buffer types on
    or off; raises :class:`NativeSettingError` if the loaded model does not say so."""
    if _TAKES_ARGUMENT:
        llm = llama_cpp.Llama(model_path=model_path, use_extra_bufts=extra_buffer_types, **kwargs)
    else:
        with _model_defaults(extra_buffer_types):
            llm = llama_cpp.Llama(model_path=model_path, **kwargs)
    if bool(llm.model_params.use_extra_bufts) != extra_buffer_types:
        llm.close()
        raise NativeSettingError(
            f"llama.cpp loaded {model_path} with use_extra_bufts="
            f"{llm.model_params.use_extra_bufts}, not {extra_buffer_types}; this "
            f"llama-cpp-python ({llama_cpp.__version__}) builds its parameters differently")
    return llm


def uses_extra_buffer_types(llm: llama_cpp.Llama) -> bool:
    """Whether a loaded model was given llama.cpp's extra buffer types."""
    return bool(llm.model_params.use_extra_bufts)


def why(extra_buffer_types: bool) -> str:
    return WHY_ON if extra_buffer_types else WHY_OFF


# -- describing the machine ---------------------------------------------------------------

#: The CPU flags that decide which llama.cpp kernels run, as /proc/cpuinfo names them.
_RELEVANT = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
             "asimd", "asimddp", "i8mm", "sve", "sve2", "sme")


def cpu_features(cpuinfo: str | None = None) -> tuple[str, list[str]]:
    """The CPU's model name and the flags among :data:`_RELEVANT` it has (Linux reads
    /proc/cpuinfo; elsewhere the name only)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return platform.processor() or platform.machine(), []
    name = platform.processor() or platform.machine()
    flags: set[str] = set()
    for row in cpuinfo.splitlines():
        key, _, value = row.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and value.strip():
            name = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    return name, [f for f in _RELEVANT if f in flags]


def has_amx(features: list[str]) -> bool:
    return any(f.startswith("amx") for f in features)


def system_info() -> str:
    """llama.cpp's own account of its build: the CPU kernels it was compiled with."""
    raw = llama_cpp.llama_print_system_info()
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return text.strip()
