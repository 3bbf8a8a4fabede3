"""StreamingLLM positions (`positions="cache"`): a query keeps its original distance to the keys
in its window, and the sink tokens count as if they sat right before the window's first token.

Keys stay stored as the model rotated them, at their original positions. RoPE scores depend only
on the distance, so the sinks' shift is a rotation of the query: for a row at position p whose
window starts at w = max(0, p − window + 1), the sinks it keeps outside its window are
j < kept = min(S, w), and each must score as if at distance kept + (p − w) − j instead of p − j,
i.e. with the query rotated once more by kept − w (<= 0). Window keys use the query as given.

The attention kernels (and the CPU reference) do this in the one attend call: they turn the query
of each row by its own shift when they score its sink keys (include/pagedkv/attention_params.h).
All they need from here is the table below.
"""
from __future__ import annotations

import torch

from .rope import RoPE

_STYLE_CODES = {"neox": 1, "gptj": 2}  # kRopeNeox, kRopeGptj in attention_params.h


def sink_rope_table(rope: RoPE, head_dim: int) -> torch.Tensor:
    """[2 + rotary_dim / 2] float64 on the CPU: style code, rotary_dim, then the angular
    frequencies with scaling applied: the engine's sink rotation table (sent to the GPU by the
    engine, only when it changes)."""
    rd = rope.dim(head_dim)
    head = torch.tensor([_STYLE_CODES[rope.style], rd], dtype=torch.float64)
    return torch.cat([head, rope.inv_freq(head_dim)]).contiguous()
