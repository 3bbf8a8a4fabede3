"""The "pagedkv" attention implementation for transformers' AttentionInterface.

transformers calls, per layer, `cache.update(k, v, layer)` and then the attention function with
the query, the keys and values `update` returned, and the mask that the mask function registered
under the same name built. `PagedKVCache.update` hands back only the new tokens and marks itself
pending for that layer; the attention function below finds the pending cache, and the cache
appends the real (unpadded) rows to its pages and runs `PagedKV.attend` on them. K/V are never
materialised in the dense [batch, heads, seq, head_dim] layout.

The mask function returns the 2-D padding mask ([batch, seen + new] bool) untouched: pagedkv's
kernel has no per-token mask, so the cache stores only the tokens the mask marks real.
"""
from __future__ import annotations

import threading

import torch

NAME = "pagedkv"

# The cache whose update() ran last in this thread and whose attention has not run yet.
_pending = threading.local()


def set_pending(cache) -> None:
    _pending.cache = cache


def take_pending(layer: int, key: torch.Tensor):
    """The PagedKVCache whose update() returned `key` for `layer`, or None (the forward runs
    without a PagedKVCache: no cache, or another Cache class)."""
    cache = getattr(_pending, "cache", None)
    _pending.cache = None
    if cache is None or not cache.takes(layer, key):
        return None
    return cache


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                 kv_offset: int = 0, mask_function=None, attention_mask=None, **kwargs):
    """Mask function of "pagedkv": the 2-D padding mask ([batch, kv_length] bool) or None."""
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:]


def pagedkv_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask: torch.Tensor | None,
                              dropout: float = 0.0, scaling: float | None = None,
                              sliding_window: int | None = None, softcap: float | None = None,
                              **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, num_q_heads, T, head_dim], key/value [B, num_kv_heads, T or S, head_dim]
    -> ([B, T, num_q_heads, head_dim], None), the layout transformers' attention functions return."""
    if softcap is not None:
        raise NotImplementedError(
            f"pagedkv attention: attention logit softcapping (softcap={softcap}) is not supported by "
            "the pagedkv kernel; set config.attn_logit_softcapping=None or use another attn_implementation")
    if dropout and module.training:
        raise NotImplementedError("pagedkv attention: attention dropout in training mode is not supported")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError(
            f"pagedkv attention: expected the 2-D padding mask of the 'pagedkv' mask function, got a "
            f"{attention_mask.dim()}-D mask (custom 4-D masks are not supported)")
    layer = module.layer_idx
    cache = take_pending(layer, key)
    if cache is None:
        return dense_attention(query, key, value, attention_mask, scaling, sliding_window), None
    return cache.attend_layer(layer, query, key, value, attention_mask, scaling, sliding_window or 0), None


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask2d: torch.Tensor | None,
                    scale: float | None, window: int | None) -> torch.Tensor:
    """Plain attention for forwards that run without a PagedKVCache (no cache, or a DynamicCache):
    the query rows are the last T of the S keys; causal, optional window, padding mask."""
    t, s = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    qpos = torch.arange(s - t, s, device=q.device)[:, None]
    kpos = torch.arange(s, device=q.device)[None, :]
    allowed = kpos <= qpos
    if window:
        allowed &= kpos > qpos - window
    allowed = allowed[None, None]
    if mask2d is not None:
        allowed = allowed & mask2d[:, None, None, -s:].to(torch.bool)
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
    bias.masked_fill_(~allowed, torch.finfo(q.dtype).min)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return out.transpose(1, 2).contiguous()


def register() -> str:
    """Registers "pagedkv" with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, pagedkv_attention_forward)
    AttentionMaskInterface.register(NAME, padding_mask)
    return NAME
