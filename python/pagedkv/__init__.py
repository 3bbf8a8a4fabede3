"""pagedkv: a paged KV-cache engine for long-context LLM inference.

    kv = pagedkv.PagedKV(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16,
                         dtype=torch.bfloat16, device="cuda", device_blocks=8192)
    s = kv.add_sequence()
    kv.append([s], layer, k, v)
    out = kv.attend([s], layer, q)

Decode steps replayed from one CUDA graph: `pagedkv.DecodeSteps` (steps.py).
"""
from . import policies
from ._C import CorruptBlockError, OutOfBlocksError, built_with_cuda, cuda_available
from .cache import PagedKV
from .rope import RoPE
from .steps import DecodeSteps

__version__ = "0.1.0"
__all__ = ["PagedKV", "DecodeSteps", "OutOfBlocksError", "CorruptBlockError", "RoPE", "cuda_available", "built_with_cuda",
           "default_device", "policies"]


def __getattr__(name):
    if name == "hf":  # `pagedkv.hf` without a separate import; needs transformers
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module 'pagedkv' has no attribute {name!r}")


def default_device() -> str:
    """"cuda" when pagedkv's kernels and torch can both run on a GPU here, else "cpu"."""
    import torch

    return "cuda" if cuda_available() and torch.cuda.is_available() else "cpu"
