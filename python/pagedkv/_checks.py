"""Argument checks at the Python boundary: each failure names the argument and what was expected."""
from __future__ import annotations

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def int_list(value, name: str, where: str) -> list[int]:
    """A list of Python ints from a list/tuple of ints or a 1-D integer tensor."""
    if type(value) is list and all(type(x) is int for x in value):
        return value  # the common case, checked without building a new list
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(f"{where}: {name} must be a 1-D integer tensor, got "
                            f"{value.dtype} of shape {tuple(value.shape)}")
        return [int(x) for x in value.tolist()]
    if isinstance(value, int) and not isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be a list of ints or a 1-D integer tensor, got int "
                        f"(wrap a single id in a list: [{value}])")
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{where}: {name} must be a list of ints or a 1-D integer tensor, "
                        f"got {type(value).__name__}")
    out = []
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, int):
            if isinstance(x, torch.Tensor) and x.dim() == 0 and not x.dtype.is_floating_point:
                x = int(x)
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
