"""Collectives of a striped cache (PagedKV(group=...), docs/DISTRIBUTED.md) over a
torch.distributed process group: NCCL on GPUs, gloo on CPUs. No engine code lives here.

Every rank makes the same calls with the same arguments (SPMD). Arguments are checked on each
rank before anything is sent, so a bad one raises alike everywhere without a collective; what
only one rank can know (room in its tiers) goes through `agree`. The attention merge never
synchronises the host, so a decode step with a group can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch

__all__ = ["group_info", "check_same", "agree", "merge", "assemble_rows", "sum_stats", "block_table"]


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("PagedKV(): group= needs torch.distributed initialised first "
                           "(torch.distributed.init_process_group)")
    return dist


def group_info(group) -> tuple[int, int]:
    """(rank, world) of this process in `group`."""
    dist = _dist()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"PagedKV(): group must be a torch.distributed ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD) or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("PagedKV(): this process is not a member of `group`")
    return rank, dist.get_world_size(group)


def _all_objects(group, obj) -> list:
    dist = _dist()
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def check_same(group, fields: dict, where: str = "PagedKV()") -> None:
    """One all_gather of `fields`; ValueError on every rank naming what differs, where."""
    everyone = _all_objects(group, fields)
    diffs = []
    for key in fields:
        values = [f.get(key) for f in everyone]
        if any(v != values[0] for v in values):
            diffs.append(f"{key} ({', '.join(f'rank {r}: {v!r}' for r, v in enumerate(values))})")
    if diffs:
        raise ValueError(f"{where}: every rank of the group must build the cache alike; these differ: "
                         + "; ".join(diffs))


def _rebuild(kind: type, message: str) -> BaseException:
    try:
        return kind(message)
    except Exception:
        return RuntimeError(message)


def agree(group, error: BaseException | None, where: str) -> None:
    """Every rank passes what its local part raised (or None). When any rank failed, every rank
    raises: the failing ranks their own exception, the others one of the first failing rank's
    type saying which rank failed and why. One small all_reduce when none failed (it does
    synchronise the host: only calls that plan, never the attention merge, use it)."""
    dist = _dist()
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    failed = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=device)
    dist.all_reduce(failed, group=group)
    if int(failed.item()) == 0:
        return
    report = None if error is None else (type(error), str(error))
    reports = _all_objects(group, report)
    if error is not None:
        raise error
    rank, (kind, message) = next((r, x) for r, x in enumerate(reports) if x is not None)
    raise _rebuild(kind, f"{where}: rank {rank} failed: {message}")


def merge(out: torch.Tensor, lse: torch.Tensor, group, method: str = "allreduce", merge_fn=None):
    """(out, lse) over every rank's keys from this rank's partial: out [rows, hq, D] (the cache's
    dtype), lse [rows, hq] float32 natural log, -inf (and out 0) where this rank saw no key.
    "allreduce": all_gather of the lse, then one all_reduce(SUM) of out scaled by
    exp(lse - max) in float32; "allgather": one all_gather of (out, lse) packed in one buffer, merged by
    merge_fn(outs, lses, out, lse) (the engine's merge_partials) or in float32 torch. No host
    synchronisation either way."""
    world = _dist().get_world_size(group)
    if world == 1:
        return out, lse
    return merge_collective(out, lse, group, world, method, merge_fn)


def merge_collective(out, lse, group, world: int, method: str, merge_fn=None):
    """merge()'s collectives, at any world size (tests run them at world 1 on one GPU)."""
    dist = _dist()
    if method == "allreduce":
        lses = _all_gather(lse, world, group)  # [world, rows, hq]
        top = lses.amax(dim=0)
        top = torch.where(torch.isinf(top), torch.zeros_like(top), top)  # (rows no rank saw: 0)
        scaled = out.float() * torch.exp(lse - top).unsqueeze(-1)
        dist.all_reduce(scaled, group=group)
        total = torch.exp(lses - top).sum(dim=0)
        merged = (scaled / _nonzero(total).unsqueeze(-1)).to(out.dtype)
        return merged, top + torch.log(total)
    if method != "allgather":
        raise ValueError(f"merge must be 'allreduce' or 'allgather', got {method!r}")
    # One collective: each rank's out and lse as one byte buffer.
    out_bytes = out.numel() * out.element_size()
    packed = torch.cat([out.contiguous().view(torch.uint8).reshape(-1), lse.contiguous().view(torch.uint8).reshape(-1)])
    every = _all_gather(packed, world, group)  # [world, bytes]
    outs = every[:, :out_bytes].contiguous().view(out.dtype).reshape((world,) + tuple(out.shape))
    lses = every[:, out_bytes:].contiguous().view(torch.float32).reshape((world,) + tuple(lse.shape))
    merged = torch.empty_like(out)
    merged_lse = torch.empty_like(lse)
    if merge_fn is not None:
        merge_fn(outs, lses, merged, merged_lse)
        return merged, merged_lse
    top = lses.amax(dim=0)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    w = torch.exp(lses - top)
    total = w.sum(dim=0)
    merged.copy_((outs.float() * w.unsqueeze(-1)).sum(dim=0) / _nonzero(total).unsqueeze(-1))
    return merged, top + torch.log(total)


def _nonzero(total: torch.Tensor) -> torch.Tensor:
    """A row no rank saw a key for has total 0 (and out 0 everywhere): out 0, lse -inf, as the
    engine's merge_partials gives."""
    return total.clamp_min(torch.finfo(torch.float32).tiny)


def _all_gather(t: torch.Tensor, world: int, group) -> torch.Tensor:
    """[world, *t.shape]: every rank's t (all_gather_into_tensor where the backend has it)."""
    dist = _dist()
    t = t.contiguous()
    if dist.get_backend(group) == "nccl":
        out = torch.empty((world,) + tuple(t.shape), dtype=t.dtype, device=t.device)
        dist.all_gather_into_tensor(out, t, group=group)
        return out
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t, group=group)
    return torch.stack(parts)


def assemble_rows(local: torch.Tensor, owner: torch.Tensor, group) -> torch.Tensor:
    """The full tensor from each rank's own rows (local[i] is valid where owner[i] is this rank),
    bit for bit: an all_gather and a pick, never a sum (-0.0 and NaN payloads survive)."""
    dist = _dist()
    world = dist.get_world_size(group)
    if world == 1 or local.shape[0] == 0:
        return local
    every = _all_gather(local, world, group)  # [world, n, ...]
    rows = torch.arange(local.shape[0], device=local.device)
    return every[owner.to(local.device), rows]


def sum_stats(stats: dict, group) -> dict:
    """The numeric values summed over the group's ranks (ints stay ints); others as here."""
    dist = _dist()
    keys = sorted(k for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, group=group)
    out = dict(stats)
    for k, v in zip(keys, values.tolist()):
        out[k] = int(round(v)) if isinstance(stats[k], int) else v
    return out


def block_table(local: list, group) -> list[tuple]:
    """[(rank, tier, slot), ...]: logical block i as rank i % world holds it."""
    tables = _all_objects(group, local)
    world = len(tables)
    return [(i % world,) + tuple(tables[i % world][i]) for i in range(len(local))]
