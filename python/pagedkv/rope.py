"""Rotary position embeddings, as the models that fill the cache apply them: "neox" style
(rotate the two halves, Llama/Qwen/Mistral in transformers) or "gptj" style (rotate adjacent
pairs), with linear or Llama-3 frequency scaling. pagedkv needs them for one thing: with
`positions="cache"` (StreamingLLM) the sink keys must look as if they sat right before the
window, which rotating the query by (sinks − window start) achieves, since RoPE scores depend
only on the distance between query and key positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class RoPE:
    theta: float = 10000.0
    rotary_dim: int | None = None  # None: the whole head_dim
    style: str = "neox"            # "neox" | "gptj"
    scaling: dict | None = field(default=None, hash=False)
    # scaling: {"type": "linear", "factor": f} or {"type": "llama3", "factor": 8.0,
    #           "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

    def __post_init__(self):
        if self.style not in ("neox", "gptj"):
            raise ValueError(f"RoPE(): style must be 'neox' or 'gptj', got {self.style!r}")
        if not self.theta > 0:
            raise ValueError(f"RoPE(): theta must be positive, got {self.theta}")
        kind = (self.scaling or {}).get("type", (self.scaling or {}).get("rope_type"))
        if self.scaling is not None and kind not in ("linear", "llama3"):
            raise ValueError(f"RoPE(): scaling type must be 'linear' or 'llama3', got {kind!r}")

    def dim(self, head_dim: int) -> int:
        rd = self.rotary_dim or head_dim
        if rd % 2 or rd > head_dim:
            raise ValueError(f"RoPE(): rotary_dim must be even and <= head_dim={head_dim}, got {rd}")
        return rd

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """[rotary_dim / 2] float64 angular frequencies, scaling applied."""
        rd = self.dim(head_dim)
        inv = 1.0 / self.theta ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)
        if not self.scaling:
            return inv
        s = self.scaling
        factor = float(s["factor"])
        if s.get("type", s.get("rope_type")) == "linear":
            return inv / factor
        low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
        old = float(s.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [N, heads, head_dim] rotated by positions [N] (any real numbers, negative included);
        computed in float32 or float64 and returned in x's dtype."""
        head_dim = x.shape[-1]
        rd = self.dim(head_dim)
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        ang = positions.to(torch.float64)[:, None] * self.inv_freq(head_dim).to(positions.device)
        cos = ang.cos().to(work)[:, None, :]
        sin = ang.sin().to(work)[:, None, :]
        xf = x.to(work)
        rot, rest = xf[..., :rd], xf[..., rd:]
        if self.style == "neox":
            a, b = rot[..., : rd // 2], rot[..., rd // 2:]
            out = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
        else:
            a, b = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
        return torch.cat([out, rest], dim=-1).to(x.dtype)
