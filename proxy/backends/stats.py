"""What a backend that keeps model state reports to ``/metrics``: activation memory's
hits, misses and times, and its LoRA adapters' loads and use."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Timing:
    """How many times something took place and the seconds it took in all."""

    count: int = 0
    seconds: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds


@dataclass(slots=True)
class ActivationStats:
    """Counts and times of activation memory, read by /metrics."""

    hits: int = 0
    misses: int = 0
    rebuilds: int = 0
    restore_seconds: Timing = field(default_factory=Timing)
    build_seconds: Timing = field(default_factory=Timing)


@dataclass(slots=True)
class AdapterStats:
    """LoRA adapters loaded, let go by the LRU, and requests by adapter, read by /metrics."""

    loads: int = 0
    evictions: int = 0
    requests: dict[str, int] = field(default_factory=dict)  # by adapter name ("" = none)
