"""StreamingLLM positions (`positions="cache"`): a query keeps its original distance to the keys
in its window, and the sink tokens count as if they sat right before the window's first token.

Keys stay stored as the model rotated them, at their original positions. RoPE scores depend only
on the distance, so the sinks' shift is a rotation of the query: for a row at position p whose
window starts at w = p − window + 1, sink key j must score as if at distance min(S, w) + (p − w)
− j instead of p − j, i.e. with the query rotated once more by min(S, w) − w. The window part and
the sink part (every row at once) are two kernel calls that merge by log-sum-exp; folding the
rotation into the kernel would make them one.
"""
from __future__ import annotations

import torch

from . import _lse


def attend(kv, seqs: list[int], layer: int, q: torch.Tensor, lengths: list[int], scale: float,
           window: int, return_lse: bool):
    engine, stream, sinks = kv._engine, kv._stream(), kv.sink_tokens
    hq = q.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    engine.attend(seqs, layer, lengths, q, out, lse, hq, scale, window, 0, stream)  # window only
    rows, shifts, where = [], [], []
    row = 0
    for seq, n in zip(seqs, lengths):
        seen = engine.seq_len(seq, layer)
        for r in range(n):
            pos = seen - n + r
            first = max(0, pos - window + 1)
            kept = min(sinks, first)
            if kept > 0:  # this row's sinks lie outside its window
                rows.append(row)
                shifts.append(kept - first)
                where.append((seq, kept))
            row += 1
    if rows:
        idx = torch.tensor(rows, device=q.device)
        q_rot = kv.rope.rotate(q[idx], torch.tensor(shifts, dtype=torch.float64, device=q.device))
        part = torch.empty_like(q_rot)
        part_lse = torch.empty((len(rows), hq), dtype=torch.float32, device=q.device)
        engine.attend_prefixes([w[0] for w in where], layer, [w[1] for w in where], q_rot, part,
                               part_lse, hq, scale, stream)  # every row's sinks in one call
        merged, total = _lse.merge([out[idx], part], [lse[idx], part_lse])
        out[idx] = merged.to(q.dtype)
        lse[idx] = total
    return (out, lse) if return_lse else out
