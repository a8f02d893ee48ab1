"""What llama.cpp's extra buffer types gain or cost the embedded models on this CPU.

    python bench/native.py [--prefill 1000] [--generate 64] [--embed 256] [--repeat 3]

The doctor's self-test (``proxy/doctor.py``) runs twice in child processes, once with
the extra buffer types off (the default) and once with them on, for both embedded
models: MiniLM embeds a batch of short texts, SmolLM2 prefills a prompt and generates.
Each figure is the median of ``--repeat`` runs. A setting that crashes is reported as
such (on Intel CPUs with AMX, the extra buffer types did), not as a dead benchmark.
Progress on stderr; one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memory import offline  # noqa: E402

offline.configure()

from memory.native import cpu_features, has_amx, system_info  # noqa: E402
from proxy.doctor import (  # noqa: E402
    ChatModelSpec,
    SelfTestSpec,
    StepResult,
    child_command,
    run_selftest,
)


def log(msg: str) -> None:
    print(f"[native] {msg}", file=sys.stderr, flush=True)


def rate(steps: list[StepResult], prefix: str) -> float | None:
    found = [s.rate for s in steps if s.step.startswith(prefix)]
    return round(statistics.median(found), 1) if found else None


def measure(extra: bool, args: argparse.Namespace, models: Path) -> dict[str, Any]:
    spec = SelfTestSpec(embedder_dir=str(models), embedder_extra_buffer_types=extra,
                        models=[ChatModelSpec(name="local", path=None, n_ctx=4096, n_threads=None,
                                              extra_buffer_types=extra)],
                        prefill=args.prefill, generate=args.generate, embed=args.embed,
                        repeat=args.repeat)
    log(f"extra buffer types {'on' if extra else 'off'}")
    test = run_selftest(child_command(spec), timeout=args.timeout, echo=False)
    for step in test.passed:
        log(f"  {step.step}: {step.seconds:.3f} s")
    figures: dict[str, Any] = {
        "embed_texts_per_s": rate(test.passed, "embed"),
        "prefill_tokens_per_s": rate(test.passed, "prefill"),
        "generate_tokens_per_s": rate(test.passed, "generate"),
    }
    if not test.ok:
        log(f"  failed at {test.failed_step}: {test.problem}")
        figures["failed"] = f"{test.failed_step}: {test.problem}"
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--prefill", type=int, default=1000)
    parser.add_argument("--generate", type=int, default=64)
    parser.add_argument("--embed", type=int, default=256, help="texts in the embedded batch")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1200)
    args = parser.parse_args()
    name, features = cpu_features()
    models = Path(tempfile.mkdtemp(prefix="native-bench-"))  # MiniLM converted once, here
    results = {"off": measure(False, args, models), "on": measure(True, args, models)}
    ratios = {}
    for key in ("embed_texts_per_s", "prefill_tokens_per_s", "generate_tokens_per_s"):
        off, on = results["off"].get(key), results["on"].get(key)
        ratios[key] = round(on / off, 3) if off and on else None
    print(json.dumps({"bench": "native", "cpu": name, "amx": has_amx(features),
                      "llama_cpp": system_info(), "prefill_tokens": args.prefill,
                      "extra_buffer_types_off": results["off"], "extra_buffer_types_on": results["on"],
                      "on_over_off": ratios}))


if __name__ == "__main__":
    main()
