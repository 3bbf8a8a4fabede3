"""pagedkv inside Hugging Face transformers (5.x): a Cache backed by one PagedKV, and the
"pagedkv" attention implementation that attends over its pages.

    import pagedkv.hf
    cache = pagedkv.hf.PagedKVCache.from_model(model, device_blocks=4096)  # also sets attention
    out = model.generate(**inputs, past_key_values=cache)
"""
try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("pagedkv.hf needs transformers>=5: pip install transformers") from e

from .attention import NAME, pagedkv_attention_forward, register
from .cache import PagedKVCache

__all__ = ["PagedKVCache", "register", "pagedkv_attention_forward", "NAME"]
