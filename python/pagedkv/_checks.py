"""Argument checks at the Python boundary: each failure names the argument and what was expected."""
from __future__ import annotations

import math
import os

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

INT32_MAX = 2**31 - 1  # lengths, tokens, slots and block ids are int32 in the engine
_SEQ_ID_RANGE = range(-2**63, 2**63)  # sequence ids are int64
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def bounded_int(value, name: str, where: str, low: int = 0, high: int = INT32_MAX) -> int:
    """An int in [low, high] (TypeError for a non-int, ValueError out of range)."""
    if not is_int(value):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{where}: {name} must be >= {low}, got {value}")
    if value > high:
        raise ValueError(f"{where}: {name} must be <= {high}" + (" (below 2^31)" if high == INT32_MAX else "")
                         + f", got {value}")
    return value


def _tensor_ints(t: torch.Tensor, name: str, where: str):
    """The values of an integer tensor as Python ints (a tensor without data, on "meta", has none)."""
    if t.device.type == "meta" or t.dtype.is_complex:
        raise TypeError(f"{where}: {name} must be ints or an integer tensor with data, got a "
                        f"{t.dtype} tensor on {t.device}")
    return t.tolist()


def seq_id(value, where: str) -> int:
    """A sequence id: any int; one outside int64 can name no sequence (KeyError)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_floating_point \
            and value.dtype != torch.bool:
        value = _tensor_ints(value, "seq", where)
    if not is_int(value):
        raise TypeError(f"{where}: seq must be an int sequence id, got {type(value).__name__}")
    if value not in _SEQ_ID_RANGE:
        raise KeyError(f"{where}: unknown sequence id {value}")
    return value


def seq_list(value, where: str) -> list[int]:
    """`seqs`: a list of sequence ids; one outside int64 is unknown (KeyError)."""
    out = int_list(value, "seqs", where)
    for x in out:
        if x not in _SEQ_ID_RANGE:
            raise KeyError(f"{where}: unknown sequence id {x}")
    return out


def check_bool(value, name: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be a bool, got {type(value).__name__}")
    return value


def check_scale(scale, default: float, where: str) -> float:
    """The softmax scale: None (the default) or a real number that is positive and finite once
    rounded to float32, which is what the kernels use."""
    if scale is None:
        return default
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{where}: scale must be a float or None, got {type(scale).__name__}")
    try:
        value = float(scale)
    except OverflowError:  # an int too large for a double
        raise ValueError(f"{where}: scale must be finite as float32, got {scale!r}") from None
    if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
        raise ValueError(f"{where}: scale must be finite as float32 (|scale| <= {_FLOAT32_MAX:.6g}), got {scale!r}")
    if not torch.tensor(value, dtype=torch.float32).item() > 0:
        raise ValueError(f"{where}: scale must be > 0 as float32, got {scale!r}")
    return value


def int_list(value, name: str, where: str) -> list[int]:
    """A list of Python ints from a list/tuple of ints or a 1-D integer tensor."""
    if type(value) is list and all(type(x) is int for x in value):
        return value  # the common case, checked without building a new list
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(f"{where}: {name} must be a 1-D integer tensor, got "
                            f"{value.dtype} of shape {tuple(value.shape)}")
        return [int(x) for x in _tensor_ints(value, name, where)]
    if isinstance(value, int) and not isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be a list of ints or a 1-D integer tensor, got int "
                        f"(wrap a single id in a list: [{value}])")
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{where}: {name} must be a list of ints or a 1-D integer tensor, "
                        f"got {type(value).__name__}")
    out = []
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, int):
            if isinstance(x, torch.Tensor) and x.dim() == 0 and not x.dtype.is_floating_point \
                    and x.dtype != torch.bool:
                x = _tensor_ints(x, f"{name}[{i}]", where)
            else:
                raise TypeError(f"{where}: {name}[{i}] must be an int, got {type(x).__name__}")
        out.append(int(x))
    return out


def split_lengths(lengths, seqs: list[int], rows: int, where: str) -> list[int]:
    """Rows per sequence: the given lengths (summing to `rows`), or rows split evenly."""
    if lengths is None:
        if not seqs:
            if rows:
                raise ValueError(f"{where}: seqs is empty but there are {rows} rows")
            return []
        if rows % len(seqs):
            raise ValueError(f"{where}: {rows} rows do not split evenly over {len(seqs)} "
                             f"sequences; pass lengths")
        return [rows // len(seqs)] * len(seqs)
    out = int_list(lengths, "lengths", where)
    if len(out) != len(seqs):
        raise ValueError(f"{where}: lengths has {len(out)} entries but seqs has {len(seqs)}")
    for i, n in enumerate(out):
        if n < 0:
            raise ValueError(f"{where}: lengths[{i}] is negative ({n})")
        if n > INT32_MAX:
            raise ValueError(f"{where}: lengths[{i}] must be below 2^31, got {n}")
    if sum(out) != rows:
        raise ValueError(f"{where}: lengths sum to {sum(out)} but there are {rows} rows")
    return out


def check_tensor(t, name: str, where: str, dtype: torch.dtype, device: torch.device,
                 dims: int, tail: tuple | None = None) -> None:
    """Type, dtype, device and shape checks; nothing is ever converted to fit."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{where}: {name} must be {str(dtype)[6:]} like the cache, got {str(t.dtype)[6:]}")
    if not same_device(t.device, device):
        raise ValueError(f"{where}: {name} must be on {device} like the cache, got {t.device}")
    if t.dim() != dims or (tail is not None and tuple(t.shape[1:]) != tail):
        want = "[N, " + ", ".join(str(x) for x in tail) + "]" if tail else f"{dims}-D"
        raise ValueError(f"{where}: {name} must have shape {want}, got {list(t.shape)}")


def same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.type == "cpu" or (a.index or 0) == (b.index or 0)


def positive_int(value, name: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"PagedKV(): {name} must be an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"PagedKV(): {name} must be {'>= 0' if allow_zero else 'positive'}, got {value}")
    if value > INT32_MAX:
        raise ValueError(f"PagedKV(): {name} must be below 2^31, got {value}")
    return value


def check_constructor(num_layers, num_kv_heads, head_dim, block_size, dtype, device, device_blocks,
                       host_blocks, disk_blocks, disk_path, window, sink_tokens, retain, rope,
                       positions) -> torch.device:
    """Every constructor argument checked, naming it; returns the resolved torch.device."""
    for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim), ("block_size", block_size)):
        positive_int(value, name)
    if device_blocks is None:
        raise TypeError("PagedKV(): device_blocks is required (the hot tier's capacity in blocks)")
    positive_int(device_blocks, "device_blocks")
    positive_int(host_blocks, "host_blocks", allow_zero=True)
    positive_int(disk_blocks, "disk_blocks", allow_zero=True)
    positive_int(sink_tokens, "sink_tokens", allow_zero=True)
    if device_blocks + host_blocks + disk_blocks > INT32_MAX:
        raise ValueError("PagedKV(): device_blocks + host_blocks + disk_blocks must be below 2^31 "
                         f"(block ids are int32), got {device_blocks + host_blocks + disk_blocks}")
    if disk_path is not None and not isinstance(disk_path, (str, os.PathLike)):
        raise TypeError(f"PagedKV(): disk_path must be a str or os.PathLike directory, got {type(disk_path).__name__}")
    if dtype not in DTYPE_CODES:
        raise TypeError(f"PagedKV(): dtype must be torch.float32, float16 or bfloat16, got {dtype}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"PagedKV(): device {device!r} is not a device: {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"PagedKV(): device must be 'cpu' or 'cuda', got {device}")
    if device.type == "cuda":
        from . import _C

        if not _C.built_with_cuda():
            raise ValueError("PagedKV(): device='cuda' but this build of pagedkv has no CUDA kernels")
        if not (_C.cuda_available() and torch.cuda.is_available()):
            raise ValueError("PagedKV(): device='cuda' but no usable CUDA GPU is present")
        device = torch.device("cuda", device.index if device.index is not None
                              else torch.cuda.current_device())
        if dtype == torch.float32:
            raise TypeError("PagedKV(): dtype on CUDA must be float16 or bfloat16, got float32")
    if window is not None:
        positive_int(window, "window")
    elif sink_tokens:
        raise ValueError("PagedKV(): sink_tokens needs a window (sinks are kept outside it)")
    if not isinstance(retain, bool):
        raise TypeError(f"PagedKV(): retain must be a bool, got {type(retain).__name__}")
    if disk_blocks and not host_blocks:
        raise ValueError("PagedKV(): disk_blocks needs host_blocks > 0 (disk reads and writes are staged "
                         "through the pinned host tier)")
    if disk_blocks and disk_path is None:
        raise ValueError("PagedKV(): disk_blocks > 0 needs disk_path, a directory for the file")
    if positions not in ("original", "cache"):
        raise ValueError(f"PagedKV(): positions must be 'original' or 'cache', got {positions!r}")
    if positions == "cache":
        if rope is None:
            raise ValueError("PagedKV(): positions='cache' needs rope=pagedkv.RoPE(...) to shift the sinks")
        if window is None or not sink_tokens:
            raise ValueError("PagedKV(): positions='cache' needs a window and sink_tokens > 0")
    if rope is not None:
        from .rope import RoPE

        if not isinstance(rope, RoPE):
            raise TypeError(f"PagedKV(): rope must be a pagedkv.RoPE, got {type(rope).__name__}")
        rope.dim(head_dim)

    return device


STAGING_CODES = {"kernel": 0, "dma": 1}
COPY_BATCH_CODES = {"batch": 0, "overlap": 1, "off": 2}
GATHER_SHAPE_DEFAULT = (8, 512, 4)


DISK_CRC_PATHS = ("fold", "crc32", "portable")  # fastest first, as _C.crc32c_paths() lists them


def check_disk_tuning(disk_read_piece, disk_crc) -> None:
    """PagedKV(disk_read_piece=, disk_crc=): the disk tier's read piece in bytes (0: whole blocks;
    else a multiple of 4096 from 256 KiB up) and the CRC path it may run at most."""
    if isinstance(disk_read_piece, bool) or not isinstance(disk_read_piece, int):
        raise TypeError(f"PagedKV(): disk_read_piece must be an int (bytes), got {type(disk_read_piece).__name__}")
    if disk_read_piece != 0 and not (disk_read_piece % 4096 == 0 and 256 * 1024 <= disk_read_piece <= 2**40):
        raise ValueError("PagedKV(): disk_read_piece must be 0 (whole blocks) or a multiple of 4096 from 262144 "
                         f"to 2**40 bytes, got {disk_read_piece}")
    if not isinstance(disk_crc, str) or disk_crc not in DISK_CRC_PATHS:
        raise ValueError(f"PagedKV(): disk_crc must be 'fold', 'crc32' or 'portable', got {disk_crc!r}")


def check_tuning(staging, gather_shape, copy_batch) -> tuple[int, tuple[int, int, int], int]:
    """The tuning arguments of PagedKV() as the engine's codes; each failure names its argument."""
    if staging not in STAGING_CODES:
        raise ValueError(f"PagedKV(): staging must be 'kernel' or 'dma', got {staging!r}")
    if copy_batch not in COPY_BATCH_CODES:
        raise ValueError(f"PagedKV(): copy_batch must be 'batch', 'overlap' or 'off', got {copy_batch!r}")
    if gather_shape is None:
        shape = GATHER_SHAPE_DEFAULT
    else:
        if (not isinstance(gather_shape, (tuple, list)) or len(gather_shape) != 3
                or any(isinstance(x, bool) or not isinstance(x, int) for x in gather_shape)):
            raise ValueError("PagedKV(): gather_shape must be None or a tuple of three ints "
                             f"(unroll, threads, ctas_per_sm), got {gather_shape!r}")
        shape = tuple(gather_shape)
        unroll, threads, ctas = shape
        if unroll not in (2, 4, 8, 16):
            raise ValueError(f"PagedKV(): gather_shape unroll must be 2, 4, 8 or 16, got {unroll}")
        if not (32 <= threads <= 1024 and threads % 32 == 0):
            raise ValueError(f"PagedKV(): gather_shape threads must be a multiple of 32 in 32..1024, got {threads}")
        if ctas < 1:
            raise ValueError(f"PagedKV(): gather_shape ctas_per_sm must be >= 1, got {ctas}")
    return STAGING_CODES[staging], shape, COPY_BATCH_CODES[copy_batch]
