"""Parametric memory: LoRA adapters, knowledge held in parameters (MemOS's third kind).

An adapter is a LoRA GGUF for the local llama.cpp model (applied per request, without
reloading the model) or the name of a model an upstream serves with it. This module
reads and checks LoRA GGUF files, and writes small random ones for tests and demos
(``memcube-proxy adapters make-test``), with the ``gguf`` package (llama.cpp's own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGUFReader

_A, _B = ".lora_a", ".lora_b"


class AdapterError(ValueError):
    """A file that is not a LoRA adapter for the base model; the message says why."""


@dataclass(slots=True)
class AdapterInfo:
    """What a LoRA GGUF adapts, and whether it fits a base model (when one was given)."""

    path: Path
    architecture: str
    alpha: float | None
    ranks: set[int] = field(default_factory=set)
    targets: list[str] = field(default_factory=list)  # base tensor names
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        layers = sorted({t.split(".")[1] for t in self.targets if t.startswith("blk.")}, key=int)
        kinds = sorted({t.split(".")[2] if t.startswith("blk.") else t for t in self.targets})
        lines = [f"{self.path}: LoRA for {self.architecture}, rank {sorted(self.ranks)}, "
                 f"alpha {self.alpha}",
                 f"  adapts {len(self.targets)} tensors: {', '.join(kinds)} "
                 f"in {len(layers)} layers"]
        lines += [f"  does not fit: {p}" for p in self.problems] or ["  fits the base model"]
        return "\n".join(lines)


def _field(reader: GGUFReader, key: str) -> object:
    fields = reader.fields
    return fields[key].contents() if key in fields else None


def _shapes(reader: GGUFReader) -> dict[str, tuple[int, ...]]:
    """Tensor shapes in ggml order (ne0 first), as GGUFReader reports them."""
    return {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}


def inspect(path: Path, base: Path | None = None) -> AdapterInfo:
    """Read a LoRA GGUF. Raises :class:`AdapterError` if it is no LoRA adapter at all;
    mismatches with ``base`` are listed in ``problems``."""
    try:
        reader = GGUFReader(str(path))
    except FileNotFoundError:
        raise AdapterError(f"no file {path}") from None
    except Exception as exc:  # gguf raises ValueError, struct errors, numpy errors...
        raise AdapterError(f"{path} is not a GGUF file ({type(exc).__name__}: {exc})") from None
    if _field(reader, "general.type") != "adapter" or _field(reader, "adapter.type") != "lora":
        raise AdapterError(f"{path} is a GGUF file but not a LoRA adapter "
                           "(general.type must be 'adapter' and adapter.type 'lora')")
    alpha = _field(reader, "adapter.lora.alpha")
    info = AdapterInfo(path=path, architecture=str(_field(reader, "general.architecture")),
                       alpha=float(alpha) if isinstance(alpha, (int, float)) else None)
    shapes = _shapes(reader)
    pairs = sorted({n[:-len(_A)] for n in shapes if n.endswith(_A)}
                   | {n[:-len(_B)] for n in shapes if n.endswith(_B)})
    if not pairs:
        raise AdapterError(f"{path} holds no LoRA tensors (*.lora_a / *.lora_b)")
    info.targets = pairs
    for name in pairs:
        a, b = shapes.get(name + _A), shapes.get(name + _B)
        if a is None or b is None:
            info.problems.append(f"{name}: lora_a and lora_b must come in pairs")
            continue
        if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            info.problems.append(f"{name}: lora_a {a} and lora_b {b} do not chain")
            continue
        info.ranks.add(a[1])
    if base is not None:
        _check_base(info, GGUFReader(str(base)), shapes)
    return info


def _check_base(info: AdapterInfo, base: GGUFReader, shapes: dict[str, tuple[int, ...]]) -> None:
    arch = str(_field(base, "general.architecture"))
    if info.architecture != arch:
        info.problems.append(f"made for {info.architecture}, the model is {arch}")
    weights = _shapes(base)
    for name in info.targets:
        w = weights.get(name)
        a, b = shapes.get(name + _A), shapes.get(name + _B)
        if w is None:
            info.problems.append(f"{name}: the model has no such tensor")
        elif a is not None and b is not None and len(w) == 2 and (a[0], b[1]) != w:
            info.problems.append(f"{name}: adapter maps {a[0]} -> {b[1]}, the model's tensor "
                                 f"is {w[0]} -> {w[1]}")


def make_test_adapter(base: Path, out: Path, *, rank: int = 8, seed: int = 0,
                      strength: float = 1.0, kinds: tuple[str, ...] = ("attn_q", "attn_v"),
                      ) -> AdapterInfo:
    """Write a random LoRA for ``base`` (every layer's ``kinds`` projections) that
    changes its greedy output: for trying the adapter path without training one."""
    from gguf import GGUFWriter

    if rank < 1:
        raise AdapterError("rank must be at least 1")
    reader = GGUFReader(str(base))
    arch = str(_field(reader, "general.architecture"))
    weights = _shapes(reader)
    targets = sorted(n for n in weights
                     if n.startswith("blk.") and n.endswith(".weight") and n.split(".")[2] in kinds)
    if not targets:
        raise AdapterError(f"{base} has no {'/'.join(kinds)} tensors to adapt")
    rng = np.random.default_rng(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(out), arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))  # scale alpha/rank = 1
    for name in targets:
        n_in, n_out = weights[name]
        # numpy shapes are ggml's reversed: lora_a is (rank, n_in), lora_b (n_out, rank).
        a = rng.standard_normal((rank, n_in), dtype=np.float32) / np.sqrt(n_in)
        b = rng.standard_normal((n_out, rank), dtype=np.float32) * strength / np.sqrt(rank)
        writer.add_tensor(name + _A, a.astype(np.float32))
        writer.add_tensor(name + _B, b.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return inspect(out, base)
