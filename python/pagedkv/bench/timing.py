"""GPU timing: calls captured in a CUDA graph and replayed, timed with events, median of repeats.

Graph replay removes the Python and launch gaps between calls, so the figure is the device time
of the work itself, the same way for our kernel and for every peer.
"""
from __future__ import annotations

import statistics

import torch


def gpu_time_us(fn, calls_per_graph: int = 20, repeats: int = 15, warmup: int = 3) -> float:
    """Median microseconds per call of `fn` (which only enqueues work on the current stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls_per_graph)
    del graph
    return statistics.median(samples)


def copy_ceiling_tbs(gib: float = 2.0) -> float:
    """Device-to-device copy rate, bytes read plus bytes written, in TB/s."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").uniform_()
    dst = torch.empty_like(src)
    us = gpu_time_us(lambda: dst.copy_(src), calls_per_graph=5, repeats=10)
    return 2 * src.numel() * 2 / (us * 1e-6) / 1e12
