"""DecodeSteps: the decode loop of a serving engine, one CUDA graph replay per step.

    def layers(batch):                                   # the model's decode step, every layer
        for layer in range(num_layers):
            kv.append(batch, layer, k[layer], v[layer])  # static input tensors
            outs[layer] = kv.attend(batch, layer, q[layer])

    with pagedkv.DecodeSteps(kv, layers, num_q_heads=32) as steps:
        for _ in range(new_tokens):
            fill_inputs()          # write this step's q, k, v into the static tensors
            steps.step(batch)      # begin_step, then one graph replay (captured when needed)

Each `step(batch)` calls `kv.begin_step(batch, tokens, num_q_heads)`, which does the step's host
work for every layer at once, then replays the graph holding `layers(batch)`. The graph is
captured on the first step and again whenever begin_step returns True (the batch size changed,
or the block-table stride grew); otherwise one capture serves every step, whichever sequences
the batch holds. Off CUDA, or with `graph=False`, the same calls run eagerly after begin_step.
`close()` (or leaving the `with` block) calls `kv.end_step()`, after which the step's blocks
may move again and `fork`/`free`/`truncate`/`offload` of its sequences are allowed.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["DecodeSteps"]


class DecodeSteps:
    """Decode steps of one cache: `begin_step` once per step, then `layers_fn(batch)` replayed
    from a CUDA graph (or called eagerly).

    Args:
        kv: the `pagedkv.PagedKV` the steps run on.
        layers_fn: `layers_fn(batch) -> Any`, one decode step over every layer: each layer's
            `kv.append(batch, layer, ...)` and `kv.attend(batch, layer, ...)` on tensors that keep
            their addresses from step to step (a graph replays the captured addresses). It must
            append `tokens` rows per sequence to every layer, once.
        num_q_heads: query heads of the `attend` calls (sizes the split-K scratch before capture).
        tokens: rows per sequence per step (1 for decode; more for speculative decoding).
        graph: capture and replay a CUDA graph when the cache is on CUDA (default); False runs
            the calls eagerly after each begin_step, as happens anyway off CUDA.

    Attributes:
        captures: how many times a graph was captured (0 when eager).
        uses_graph: whether steps replay a CUDA graph.
    """

    def __init__(self, kv, layers_fn: Callable[[list[int]], Any], num_q_heads: int, tokens: int = 1,
                 graph: bool = True):
        if not callable(layers_fn):
            raise TypeError(f"DecodeSteps(): layers_fn must be callable, got {type(layers_fn).__name__}")
        for name, value in (("num_q_heads", num_q_heads), ("tokens", tokens)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"DecodeSteps(): {name} must be an int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"DecodeSteps(): {name} must be >= 1, got {value}")
        self.kv, self.layers_fn = kv, layers_fn
        self.num_q_heads, self.tokens = num_q_heads, tokens
        self.uses_graph = bool(graph) and kv.device.type == "cuda"
        self.captures = 0
        self._graph = None
        self._result = None  # what layers_fn returned inside the capture; each replay rewrites it

    def step(self, batch) -> Any:
        """Runs one decode step of `batch` (a list or 1-D integer tensor of sequence ids).

        Returns what `layers_fn(batch)` returned. With a graph, that is the value returned during
        the capture: its tensors are the graph's outputs, rewritten in place by every replay
        (clone them to keep a step's result past the next one)."""
        changed = self.kv.begin_step(batch, tokens=self.tokens, num_q_heads=self.num_q_heads)
        if not self.uses_graph:
            return self.layers_fn(batch)
        if changed or self._graph is None:
            self._capture(batch)
        self._graph.replay()
        return self._result

    def close(self) -> None:
        """Closes the open step (`kv.end_step()`); a later `step()` opens a new one and replays the
        same graph if it still holds. Safe to call twice."""
        self.kv.end_step()

    def __enter__(self) -> DecodeSteps:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _capture(self, batch) -> None:
        # A side stream, as torch.cuda.graph wants, ordered after the work already queued.
        self._graph = None
        self._result = None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
            result = self.layers_fn(batch)
        torch.cuda.current_stream().wait_stream(side)
        self._graph, self._result = graph, result
        self.captures += 1

    def __repr__(self) -> str:
        mode = "CUDA graph" if self.uses_graph else "eager"
        return (f"DecodeSteps({mode}, num_q_heads={self.num_q_heads}, tokens={self.tokens}, "
                f"captures={self.captures})")
