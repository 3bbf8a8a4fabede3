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


def sync_seconds(fn) -> float:
    """Wall-clock seconds of one call of fn, from an idle GPU to its work done (when CUDA is used)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def device_used_bytes(device: str) -> float:
    """Device memory in use according to the driver (pagedkv's pools live outside torch's
    allocator); NaN off CUDA."""
    if not str(device).startswith("cuda"):
        return float("nan")
    free, total = torch.cuda.mem_get_info()
    return float(total - free)


def summary(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"median": statistics.median(s), "p10": s[len(s) // 10], "p90": s[(len(s) * 9) // 10],
            "n": len(s)}


_results_dir = Path("bench/results")


def set_results_dir(path) -> None:
    """Where save() writes: the command line's `--out` (python -m pagedkv bench NAME --out DIR)."""
    global _results_dir
    _results_dir = Path(path)


def save(name: str, payload: dict, out_dir: str | None = None) -> Path:
    """Writes `payload` as NAME-DATE-TIME.json under `out_dir` (default: the --out folder)."""
    d = Path(out_dir) if out_dir else _results_dir
    d.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = d / f"{name}-{stamp}.json"
    payload = {"bench": name, "date": stamp, "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2))
    return path
