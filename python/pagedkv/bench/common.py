"""Shared pieces of the benchmarks: timing, the machine's description, JSON results."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1))
    return info


def time_host(fn, repeat: int, warmup: int = 2) -> list[float]:
    """Wall-clock seconds of each of `repeat` calls (after `warmup`), synchronising CUDA if used."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def summary(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"median": statistics.median(s), "p10": s[len(s) // 10], "p90": s[(len(s) * 9) // 10],
            "n": len(s)}


def save(name: str, payload: dict, out_dir: str | None = None) -> Path:
    d = Path(out_dir or os.environ.get("PAGEDKV_BENCH_DIR", "bench/results"))
    d.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = d / f"{name}-{stamp}.json"
    payload = {"bench": name, "date": stamp, "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2))
    return path
