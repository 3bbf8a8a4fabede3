"""PagedKVCache: a transformers `Cache` whose K/V live in one PagedKV.

Padding. transformers puts a batch's pad tokens into the cache and masks them; pagedkv's kernel
has no per-token mask, so this cache stores only the real tokens of each sequence (the rows the
2-D attention mask marks 1), one pagedkv sequence per batch row, with ragged appends. A real
token's index among the stored tokens of its sequence is then its position counted without pads,
which is the position_ids `generate` gives it (cumsum of the mask - 1), and with left padding the
distance between two real tokens is the same with or without the pads, so causal and
sliding-window attention see exactly the keys they see in transformers. Rows at pad positions
get zeros (transformers gives them attention over nothing useful; no real token reads them).

Counting. `get_seq_length()` counts every token column seen, pads included, as DynamicCache does,
because transformers sizes its masks and slices `input_ids` with it.

Sliding windows. The model passes `sliding_window` per layer to the attention function, which
hands it to `PagedKV.attend(..., window=W)`; one cache serves full and sliding layers alike.
Every block holds all layers, so sliding layers keep their old tokens too (no memory saved).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..cache import PagedKV
from ..rope import RoPE
from . import attention

_MODEL_DECIDES = ("retain", "num_layers", "num_kv_heads", "head_dim", "rope")


class _Step:
    """Which rows of this forward's [B, T] chunk are real: computed once, used by every layer."""

    def __init__(self, real: torch.Tensor | None, batch: int, q_len: int):
        if real is None:
            self.lengths, self.index = [q_len] * batch, None
        else:
            self.lengths = real.sum(1).tolist()          # the one host sync of a forward
            full = all(n == q_len for n in self.lengths)
            self.index = None if full else real.reshape(-1).nonzero().squeeze(1)  # [N] rows of B*T


class PagedKVCache(Cache):
    """A transformers Cache backed by one `pagedkv.PagedKV`; use with attn_implementation "pagedkv".

        cache = PagedKVCache.from_model(model, device_blocks=4096)
        out = model.generate(**inputs, past_key_values=cache)
    """

    def __init__(self, config, device_blocks: int, host_blocks: int = 0, block_size: int = 16,
                 dtype: torch.dtype = torch.float16, device="cuda", **pagedkv_kwargs):
        config = config.get_text_config(decoder=True)
        _check_config(config)
        for name in _MODEL_DECIDES:
            if name in pagedkv_kwargs:
                raise ValueError(f"PagedKVCache(): {name} comes from the model config, not an argument")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # Streaming (StreamingLLM): window + sinks on every layer, sinks at cache positions, and
        # blocks out of every window freed at once, so memory stays flat however long it runs.
        self.streaming = "window" in pagedkv_kwargs or "sink_tokens" in pagedkv_kwargs
        if self.streaming:
            if pagedkv_kwargs.get("positions") != "cache" or not pagedkv_kwargs.get("window") \
                    or not pagedkv_kwargs.get("sink_tokens"):
                raise ValueError("PagedKVCache(): streaming takes window=W, sink_tokens=S and positions='cache'")
            if any(t == "sliding_attention" for t in _layer_types(config)):
                raise NotImplementedError("PagedKVCache(): streaming over models with sliding-window "
                                          "layers is not supported (they already bound their keys)")
            pagedkv_kwargs.update(retain=False, rope=rope_of(config, head_dim))
        elif pagedkv_kwargs.get("positions", "original") != "original":
            raise ValueError("PagedKVCache(): positions='cache' needs window=W and sink_tokens=S")
        self.kv = PagedKV(num_layers=config.num_hidden_layers, num_kv_heads=config.num_key_value_heads,
                          head_dim=head_dim, block_size=block_size, dtype=dtype, device=device,
                          device_blocks=device_blocks, host_blocks=host_blocks, **pagedkv_kwargs)
        sliding = [t == "sliding_attention" for t in _layer_types(config)]
        super().__init__(layers=[_PagedLayer(self, i, s) for i, s in enumerate(sliding)])
        self._seqs: list[int] = []                        # pagedkv sequence id of each batch row
        self._seen = [0] * config.num_hidden_layers       # token columns seen per layer, pads included
        self._real: torch.Tensor | None = None            # [B, seen] bool: which columns are stored
        self._step: _Step | None = None
        self._pending: int | None = None                  # layer whose attention has not run yet
        self._pending_key: torch.Tensor | None = None     # what update() returned for it

    @classmethod
    def from_model(cls, model, device_blocks: int, host_blocks: int = 0, block_size: int = 16,
                   **pagedkv_kwargs) -> "PagedKVCache":
        """A cache shaped for `model` (its dtype and device unless given), and switches the
        model's attention to "pagedkv" (registering it with transformers first)."""
        pagedkv_kwargs.setdefault("dtype", model.dtype)
        pagedkv_kwargs.setdefault("device", model.device)
        cache = cls(model.config, device_blocks=device_blocks, host_blocks=host_blocks,
                    block_size=block_size, **pagedkv_kwargs)
        model.set_attn_implementation(attention.register())
        return cache

    # -- the per-layer path: update() then the attention function -----------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Records the new tokens' count and returns them unchanged; the "pagedkv" attention
        function stores the real ones and attends over the pages."""
        if self._pending is not None:
            raise RuntimeError(
                f"PagedKVCache: layer {self._pending}'s attention did not run pagedkv; switch the model "
                "with PagedKVCache.from_model(model, ...) or model.set_attn_implementation('pagedkv')")
        batch = key_states.shape[0]
        if not self._seqs:
            self._seqs = [self.kv.add_sequence() for _ in range(batch)]
        elif batch != len(self._seqs):
            raise ValueError(f"PagedKVCache.update(): batch of {batch} rows, but the cache holds "
                             f"{len(self._seqs)} sequences (reset() it or make a new cache)")
        if layer_idx == 0:
            self._step = None
        self._seen[layer_idx] += key_states.shape[2]
        self._pending, self._pending_key = layer_idx, key_states
        attention.set_pending(self)
        return key_states, value_states

    def takes(self, layer: int, key: torch.Tensor) -> bool:
        """Whether this cache's update() handed `key` to `layer`'s attention (and clears that)."""
        if key is not self._pending_key:
            return False
        if self._pending != layer:
            raise RuntimeError(f"PagedKVCache: attention ran for layer {layer} but update() was for "
                               f"layer {self._pending}")
        self._pending, self._pending_key = None, None
        return True

    def attend_layer(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None, scale: float | None, window: int) -> torch.Tensor:
        """q [B, Hq, T, D], k/v [B, Hkv, T, D] (the new tokens) -> [B, T, Hq, D]."""
        batch, hq, t, d = q.shape
        if self._step is None:
            self._step = self._begin_step(mask, batch, t)
        step = self._step
        self.kv.append(self._seqs, layer, _rows(k, step), _rows(v, step), step.lengths)
        out = self.kv.attend(self._seqs, layer, _rows(q, step), step.lengths, scale=scale,
                             window=None if self.streaming else window)
        if step.index is None:
            return out.view(batch, t, hq, d)
        full = out.new_zeros(batch * t, hq, d)
        full.index_copy_(0, step.index, out)
        return full.view(batch, t, hq, d)

    def _begin_step(self, mask: torch.Tensor | None, batch: int, t: int) -> _Step:
        real = None if mask is None else mask[:, -t:].to(torch.bool)
        flags = real if real is not None else torch.ones(batch, t, dtype=torch.bool, device=self.kv.device)
        self._real = flags if self._real is None else torch.cat([self._real, flags.to(self._real.device)], 1)
        return _Step(real, batch, t)

    # -- sizes ---------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seen[layer_idx]

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._seen[layer_idx] + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        return len(self._seqs) if self._seqs else -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return bool(self._seqs)

    @property
    def is_croppable(self) -> bool:
        return True

    def stats(self) -> dict:
        return self.kv.stats()

    # -- editing: crop, beams, batch selection ------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        """Removes the last `-tokens_to_remove` token columns (a positive value, transformers'
        deprecated form, is the length to keep). Each sequence keeps its real tokens among the
        kept columns: `PagedKV.truncate`, no copy."""
        seen = self._seen[0]
        if tokens_to_remove > 0:
            remove = max(seen - tokens_to_remove, 0)
        else:
            remove = -tokens_to_remove
        if remove == 0:
            return
        if remove > seen:
            raise ValueError(f"PagedKVCache.crop(): cannot remove {remove} of {seen} tokens")
        if any(n != seen for n in self._seen):
            raise RuntimeError("PagedKVCache.crop(): layers hold different lengths (crop inside a forward?)")
        keep = self._real[:, :seen - remove].sum(1).tolist()
        for i, n in enumerate(keep):
            self.kv.truncate(self._seqs[i], int(n))
        self._real = self._real[:, :seen - remove]
        self._seen = [n - remove for n in self._seen]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i becomes old row beam_idx[i]; forks share blocks (copy-on-write)."""
        self._select(beam_idx.tolist())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(torch.as_tensor(indices).reshape(-1).tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select([i for i in range(len(self._seqs)) for _ in range(repeats)])

    def _select(self, rows: list[int]) -> None:
        if not self._seqs or rows == list(range(len(self._seqs))):
            return
        old = self._seqs
        self._seqs = [self.kv.fork(old[i]) for i in rows]
        for s in old:
            self.kv.free(s)
        self._real = self._real[torch.tensor(rows, device=self._real.device)]

    def reset(self) -> None:
        for s in self._seqs:
            self.kv.free(s)
        self._seqs, self._real, self._step = [], None, None
        self._pending, self._pending_key = None, None
        self._seen = [0] * len(self._seen)

    def offload(self, layer_idx: int, only_non_sliding: bool = True):
        raise NotImplementedError("PagedKVCache: offloading is pagedkv's host tier: pass host_blocks= "
                                  "to PagedKVCache.from_model and blocks move between tiers on their own")

    def __repr__(self) -> str:
        return f"PagedKVCache(batch={len(self._seqs)}, seen={self._seen[0]}, kv={self.kv!r})"


def _rows(x: torch.Tensor, step: _Step) -> torch.Tensor:
    """[B, H, T, D] -> [N, H, D]: the real rows, those of each batch row consecutive."""
    b, h, t, d = x.shape
    flat = x.transpose(1, 2).reshape(b * t, h, d)
    if step.index is not None:
        return flat.index_select(0, step.index)
    return flat.contiguous()


class _PagedLayer(CacheLayerMixin):
    """Per-layer view for transformers code that inspects cache.layers; the data is in the PagedKV."""

    is_croppable = True
    supports_early_init = False

    def __init__(self, parent: PagedKVCache, layer: int, sliding: bool):
        super().__init__()
        self.parent, self.layer_idx, self.is_sliding = parent, layer, sliding

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self.parent.update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.parent.get_mask_sizes(query_length, self.layer_idx)

    def get_seq_length(self) -> int:
        return self.parent.get_seq_length(self.layer_idx)

    def get_max_length(self) -> int:
        return -1

    @property
    def is_initialized(self) -> bool:
        return self.parent.is_initialized

    @is_initialized.setter
    def is_initialized(self, value) -> None:
        pass  # CacheLayerMixin.__init__ sets it; the parent's sequences decide


def rope_of(config, head_dim: int) -> RoPE:
    """The model's rotary embedding as pagedkv.RoPE (transformers 5.x rope_parameters)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", "default")
    scaling = None
    if kind in ("linear", "llama3"):
        scaling = {k: v for k, v in params.items() if k not in ("rope_type", "rope_theta")} | {"type": kind}
    elif kind != "default":
        raise NotImplementedError(f"PagedKVCache(): streaming with rope_type {kind!r} (pagedkv.RoPE knows "
                                  "default, linear and llama3)")
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return RoPE(theta=float(theta), rotary_dim=int(head_dim * partial), style="neox", scaling=scaling)


def _layer_types(config) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types is None:
        sliding = getattr(config, "sliding_window", None) is not None
        types = ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers
    return list(types)


def _check_config(config) -> None:
    """Raises for what pagedkv's attention cannot do, naming the config field."""
    if getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError("PagedKVCache: encoder-decoder models are not supported")
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        raise NotImplementedError(
            f"PagedKVCache: config.attn_logit_softcapping={softcap} (Gemma-2 style attention logit "
            "softcapping) is not supported by pagedkv's kernel; set it to None")
    if getattr(config, "num_kv_shared_layers", 0):
        raise NotImplementedError("PagedKVCache: models with KV-shared layers are not supported")
    other = sorted(set(_layer_types(config)) - {"full_attention", "sliding_attention"})
    if other:
        raise NotImplementedError(f"PagedKVCache: layer types {other} are not supported "
                                  "(pagedkv does full and sliding-window attention)")
