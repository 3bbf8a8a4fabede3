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


def save(name: str, payload: dict, out_dir: str | None = None) -> Path:
    d = Path(out_dir or os.environ.get("PAGEDKV_BENCH_DIR", "bench/results"))
    d.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = d / f"{name}-{stamp}.json"
    payload = {"bench": name, "date": stamp, "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2))
    return path


class DecodeSteps:
    """Decode steps as a serving loop runs them: begin_step() plans each step for every layer,
    then `layers(seqs)` (each layer's append and attend) is replayed from a CUDA graph, captured
    again whenever begin_step says the last capture no longer holds. With graph=False (or off
    CUDA) the planned calls are launched one by one."""

    def __init__(self, kv, layers, num_q_heads: int, graph: bool = True):
        self.kv, self.layers, self.hq = kv, layers, num_q_heads
        self.use_graph = graph and kv.device.type == "cuda"
        self.graph = None
        self.captures = 0

    def step(self, seqs, tokens: int = 1) -> None:
        changed = self.kv.begin_step(seqs, tokens=tokens, num_q_heads=self.hq)
        if not self.use_graph:
            self.layers(seqs)
            return
        if changed or self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(side), torch.cuda.graph(self.graph, stream=side):
                self.layers(seqs)
            torch.cuda.current_stream().wait_stream(side)
            self.captures += 1
        self.graph.replay()

    def end(self) -> None:
        self.kv.end_step()
