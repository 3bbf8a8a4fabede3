"""Merging attention results over disjoint key sets by their log-sum-exp."""
from __future__ import annotations

import torch


def merge(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """outs[i] [..., hq, D] over key set i with lses[i] [..., hq] (natural log) -> the float32
    output over all the keys, and its lse."""
    stacked = torch.stack(lses)                          # [parts, ..., hq]
    total = torch.logsumexp(stacked, dim=0)
    weights = torch.exp(stacked - total)[..., None]      # [parts, ..., hq, 1]
    return (weights * torch.stack([o.float() for o in outs])).sum(0), total
