"""Attention over more blocks than the device tier holds: each query row reads its keys in
ranges of at most half the device tier, the blocks of each range brought up in turn. Each range
is a partial attention result (out, lse) of the engine's attend_range, and the engine's
merge_partials combines them by log-sum-exp (float32 accumulation, rounded once to the cache's
dtype): the same seam as every other attention path in the C++ core (attention_planner.h)."""
from __future__ import annotations

import torch


def merge(engine, outs: list[torch.Tensor], lses: list[torch.Tensor], out: torch.Tensor,
          lse: torch.Tensor | None, stream: int) -> None:
    """outs[i] [rows, hq, D] (the cache's dtype) over key set i with lses[i] [rows, hq] (float32,
    natural log) -> out [rows, hq, D] over all the keys, and lse [rows, hq] when given."""
    engine.merge_partials(torch.stack(outs), torch.stack(lses), out, lse, stream)


def key_ranges(begin: int, end: int, chunk_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """[begin, end) cut at block boundaries into pieces spanning at most chunk_tokens of blocks."""
    out = []
    while begin < end:
        stop = min(end, (begin // block_size) * block_size + chunk_tokens)
        out.append((begin, stop))
        begin = stop
    return out


def attend(kv, seqs: list[int], layer: int, q: torch.Tensor, lengths: list[int], scale: float,
           window: int, return_lse: bool):
    """What PagedKV.attend returns, computed range by range. `window`: 0 = full causal."""
    engine, bs, stream = kv._engine, kv.block_size, kv._stream()
    chunk_tokens = max(1, kv.device_blocks // 2) * bs
    sinks = kv.sink_tokens if window else 0
    hq = q.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    row = 0
    for seq, n in zip(seqs, lengths):
        seen = engine.seq_len(seq, layer)
        for r in range(n):
            pos = seen - n + r
            first = max(0, pos - window + 1) if window else 0
            ranges = key_ranges(0, min(sinks, first), chunk_tokens, bs) if sinks else []
            ranges += key_ranges(first, pos + 1, chunk_tokens, bs)
            q_row = q[row:row + 1]
            parts, lses = [], []
            for k0, k1 in ranges:
                o = torch.empty_like(q_row)
                part_lse = torch.empty((1, hq), dtype=torch.float32, device=q.device)
                engine.attend_range(seq, layer, pos, k0, k1, q_row, o, part_lse, hq, scale, stream)
                parts.append(o)
                lses.append(part_lse)
            merge(engine, parts, lses, out[row:row + 1], lse[row:row + 1], stream)
            row += 1
    return (out, lse) if return_lse else out
