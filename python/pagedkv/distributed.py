"""Collectives of a striped cache (PagedKV(group=...), docs/DISTRIBUTED.md) over a
torch.distributed process group: NCCL on GPUs, gloo on CPUs. No engine code lives here.

Every rank makes the same calls with the same arguments (SPMD). Arguments are checked on each
rank before anything is sent, so a bad one raises alike everywhere without a collective; what
only one rank can know (room in its tiers) goes through `agree`. The attention merge never
synchronises the host, so a decode step with a group can be captured in a CUDA graph.
"""
from __future__ import annotations

import sys

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


def _device(group) -> torch.device:
    """Where this group's small host-side tensors must live: NCCL only moves GPU memory."""
    if "nccl" in str(_dist().get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


def _report(error: BaseException) -> tuple:
    """What other ranks need to raise alike, as plain values (always picklable, whatever the
    exception holds): (module, class name, message, errno)."""
    kind = type(error)
    errno = getattr(error, "errno", None) if isinstance(error, OSError) else None
    if isinstance(error, OSError) and error.strerror:
        message = error.strerror
    elif len(error.args) == 1:
        message = str(error.args[0])  # (str() of a KeyError would add quotes)
    else:
        message = str(error)
    return kind.__module__, kind.__qualname__, message, errno


def _rebuild(report: tuple, text: str) -> BaseException:
    """An exception of the reported class (looked up among the modules loaded here, never
    imported) saying `text`; RuntimeError naming the class when it cannot be made here."""
    module, name, _, errno = report
    kind = sys.modules.get(module)
    for part in name.split("."):
        kind = getattr(kind, part, None)
    if isinstance(kind, type) and issubclass(kind, BaseException):
        try:
            return kind(errno, text) if issubclass(kind, OSError) and errno is not None else kind(text)
        except Exception:  # a class whose constructor takes other arguments
            pass
    return RuntimeError(f"{text} ({module}.{name})")


def agree(group, error: BaseException | None, where: str) -> None:
    """Every rank passes what its local part raised (or None). When any rank failed, every rank
    raises: the failing ranks their own exception, the others one of the first failing rank's
    class saying "{where}: rank R failed: {its message}". One all_reduce of one int when none
    failed (it does synchronise the host: only calls that plan use it, never the merge)."""
    dist = _dist()
    failed = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=_device(group))
    dist.all_reduce(failed, group=group)
    if int(failed.item()) == 0:
        return
    reports = _all_objects(group, None if error is None else _report(error))
    if error is not None:
        raise error
    rank, report = next((r, x) for r, x in enumerate(reports) if x is not None)
    raise _rebuild(report, f"{where}: rank {rank} failed: {report[2]}")


def merge(out: torch.Tensor, lse: torch.Tensor, group, method: str = "allreduce", merge_fn=None):
    """(out, lse) over every rank's keys from this rank's partial: out [rows, hq, D] (the cache's
    dtype), lse [rows, hq] float32 natural log, -inf (and out 0) where this rank saw no key.
    "allreduce": all_gather of the lse, then one all_reduce(SUM) of out scaled by
    exp(lse - max) in float32; "allgather": one all_gather of (out, lse) packed in one buffer, merged by
    merge_fn(outs, lses, out, lse) (the engine's merge_partials) or in float32 torch. Rows no
    rank saw come back as out 0, lse -inf. No host synchronisation either way, so with NCCL
    the merge can be captured in a CUDA graph."""
    if method not in ("allreduce", "allgather"):
        raise ValueError(f"merge must be 'allreduce' or 'allgather', got {method!r}")
    world = _dist().get_world_size(group)
    if world == 1:
        return out, lse
    return merge_collective(out, lse, group, world, method, merge_fn)


def merge_collective(out, lse, group, world: int, method: str, merge_fn=None):
    """merge()'s collectives, at any world size (tests run them at world 1 on one GPU)."""
    if method == "allreduce":
        lses = _all_gather(lse, world, group)  # [world, rows, hq]
        top = _finite_max(lses)
        scaled = out.float() * torch.exp(lse - top).unsqueeze(-1)  # [rows, hq, D] float32
        _dist().all_reduce(scaled, group=group)
        return _normalised(scaled, torch.exp(lses - top).sum(dim=0), top, out.dtype)
    outs, lses = _all_gather_pair(out, lse, world, group)  # [world, rows, hq, D], [world, rows, hq]
    if merge_fn is not None:
        merged, merged_lse = torch.empty_like(out), torch.empty_like(lse)
        merge_fn(outs, lses, merged, merged_lse)
        return merged, merged_lse
    top = _finite_max(lses)
    w = torch.exp(lses - top)  # [world, rows, hq]
    return _normalised((outs.float() * w.unsqueeze(-1)).sum(dim=0), w.sum(dim=0), top, out.dtype)


def _finite_max(lses: torch.Tensor) -> torch.Tensor:
    """[rows, hq]: the largest lse over ranks, 0 where every rank has -inf (so exp(lse - top)
    is 0 there, not NaN). A NaN lse (a rank that failed) stays NaN."""
    top = lses.amax(dim=0)
    return top.masked_fill(top == float("-inf"), 0.0)


def _normalised(weighted, total, top, dtype):
    """weighted [rows, hq, D] / total [rows, hq], rounded once to dtype; rows of total 0 (no keys
    anywhere) give 0 and lse -inf, as a rank's own partial does."""
    out = torch.where((total == 0).unsqueeze(-1), torch.zeros_like(weighted), weighted / total.unsqueeze(-1))
    return out.to(dtype), top + torch.log(total)


def _all_gather(t: torch.Tensor, world: int, group) -> torch.Tensor:
    """[world, *t.shape]: every rank's t; one tensor collective on NCCL (capturable)."""
    dist = _dist()
    t = t.contiguous()
    if "nccl" in str(dist.get_backend(group)):
        out = torch.empty((world,) + tuple(t.shape), dtype=t.dtype, device=t.device)
        gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather_into(out, t, group=group)
        return out
    parts = [torch.empty_like(t) for _ in range(world)]  # (gloo: the list form every version has)
    dist.all_gather(parts, t, group=group)
    return torch.stack(parts)


def _all_gather_pair(out: torch.Tensor, lse: torch.Tensor, world: int, group):
    """Every rank's (out, lse) in one collective: both packed as bytes in one buffer."""
    out_bytes = out.numel() * out.element_size()
    packed = torch.cat([out.contiguous().view(torch.uint8).reshape(-1),
                        lse.contiguous().view(torch.uint8).reshape(-1)])
    every = _all_gather(packed, world, group)  # [world, bytes]
    outs = every[:, :out_bytes].contiguous().view(out.dtype).reshape((world,) + tuple(out.shape))
    lses = every[:, out_bytes:].contiguous().view(torch.float32).reshape((world,) + tuple(lse.shape))
    return outs, lses


def assemble_rows(local: torch.Tensor, owner: torch.Tensor, group) -> torch.Tensor:
    """The full tensor from each rank's own rows (local[i] is valid where owner[i] is this rank),
    bit for bit: an all_gather and a pick, never a sum (-0.0 and NaN payloads survive)."""
    world = _dist().get_world_size(group)
    if world == 1 or local.shape[0] == 0:
        return local
    every = _all_gather(local, world, group)  # [world, n, ...]
    rows = torch.arange(local.shape[0], device=local.device)
    return every[owner.to(device=local.device, dtype=torch.int64), rows]


def _numeric(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def sum_stats(stats: dict, group) -> dict:
    """Rank 0's keys; numeric values summed over the group's ranks (exactly: ints stay ints),
    others (bools, strings) as rank 0 has them. One all_gather of the dicts (not a hot path)."""
    everyone = _all_objects(group, stats)
    out = {}
    for key, value in everyone[0].items():
        out[key] = sum(s.get(key, 0) for s in everyone) if _numeric(value) else value
    return out


def block_table(local: list, group) -> list[tuple]:
    """[(rank, tier, slot), ...]: logical block i as rank i % world holds it."""
    tables = _all_objects(group, local)
    world = len(tables)
    if any(len(t) != len(local) for t in tables):
        raise ValueError(f"block_table(): the ranks' page tables differ in length "
                         f"({', '.join(f'rank {r}: {len(t)}' for r, t in enumerate(tables))}); "
                         f"every rank must have made the same calls")
    return [(i % world,) + tuple(tables[i % world][i]) for i in range(len(local))]
