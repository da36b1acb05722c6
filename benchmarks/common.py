"""Shared plumbing for the benchmarks: timing, machine description, results file."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(os.environ.get("BENCH_RESULTS", "reports/bench.json"))


def machine() -> dict[str, Any]:
    cpu = torch.backends.cpu.get_cpu_capability()
    return {
        "cpu_cores": os.cpu_count(),
        "cpu_capability": cpu,
        "native_bf16": bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def rate(step: Callable[[], None], items_per_step: int, *, warmup: int = 1, repeats: int = 3) -> float:
    """Items per second over `repeats` calls of `step`, after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return items_per_step * repeats / (time.perf_counter() - start)


def record(name: str, figures: dict[str, Any]) -> None:
    """Merge one benchmark's figures into the results file (each figure: value, unit, baseline)."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["machine"] = machine()
    results[name] = figures
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({name: figures}, indent=2))
