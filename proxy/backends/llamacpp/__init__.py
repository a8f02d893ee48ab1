"""The embedded model: a GGUF run in-process by llama.cpp (llama-cpp-python).

One job a module: :mod:`.backend` puts the parts together behind the backend
interface; :mod:`.prompt` renders and tokenizes chats; :mod:`.kv` keeps the
context's KV state (activation memory, chunk-aligned reuse); :mod:`.lora` the LoRA
adapters; :mod:`.bridge` the worker thread and its stream to the event loop;
:mod:`.schema` the OpenAI request fields and response objects; :mod:`.text` those
of legacy text completions.
"""

from __future__ import annotations

from proxy.backends.llamacpp.backend import DEFAULT_GGUF, LlamaCppBackend, default_model_path
from proxy.backends.llamacpp.kv import PROMPT_CHUNK

__all__ = ["DEFAULT_GGUF", "PROMPT_CHUNK", "LlamaCppBackend", "default_model_path"]
