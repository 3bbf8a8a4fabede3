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


def copy_ceiling_tbs(gib: float = 4.0, repeats: int = 10) -> float:
    """Device-to-device copy rate, bytes read plus bytes written, in TB/s: the best of `repeats`
    plain copies (a copy captured in a graph may run on the copy engines, which are slower)."""
    src = torch.empty(int(gib * 2**30) // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(repeats):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e-3)
    return 2 * src.numel() * 4 / best / 1e12
