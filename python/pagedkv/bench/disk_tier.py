"""The disk tier's measurements, shared by `bench offload` and `bench checksum`: the file
system's own ceilings, engine swaps through the disk tier, and the per-block checksum's cost as
the same swaps with it and without it (`bench offload --device cpu` runs only these).

Cache: Llama-3-8B-shaped (32 layers, 8 KV heads, head_dim 128, block 16): 2 MiB blocks in bf16
on CUDA, 4 MiB in float32 on the CPU.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from ..cache import PagedKV
from .common import save

LAYERS, HK, D, BS = 32, 8, 128, 16


def disk_ceilings(path: str, gib: float) -> dict:
    """Sequential 2 MiB writes (fsync'd) and reads of a file as large as the disk tier's traffic."""
    block = 2 << 20
    n = int(gib * 2**30) // block
    buf = os.urandom(block)
    fd, name = tempfile.mkstemp(dir=path)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            os.pwrite(fd, buf, i * block)
        os.fsync(fd)
        w = n * block / (time.perf_counter() - t0) / 1e9
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        for i in range(n):
            os.pread(fd, block, i * block)
        r = n * block / (time.perf_counter() - t0) / 1e9
    finally:
        os.close(fd)
        os.unlink(name)
    return {"write": w, "read": r}


def disk_swaps(path: str, blocks: int, device: str = "cuda", checksum: bool = True) -> dict:
    """Engine swap-out through a small host tier to the disk tier, and back up: GB/s of block
    bytes that crossed the disk (its writes and reads run on the engine's I/O threads), with the
    per-block CRC-32C (`checksum`) or without."""
    kv, s, rows = _spilled_cache(checksum, path, blocks, device, default_dtype(device))
    to_disk, from_disk = _round_trip(kv, s, device)
    st = kv.stats()
    ok = torch.equal(kv.gather(s, LAYERS - 1)[0], rows)
    kv.check_invariants()
    return {"blocks": blocks, "checksum": checksum, "block_bytes": kv.block_bytes,
            "to_disk_gb_s": to_disk, "from_disk_gb_s": from_disk, "bytes_to_disk": st["bytes_to_disk"],
            "bytes_from_disk": st["bytes_from_disk"], "intact": ok}


def _median(xs: list) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def _spilled_cache(checksum: bool, path: str, blocks: int, device: str, dtype: torch.dtype, **disk_tuning):
    """A cache with one sequence of `blocks` blocks in every layer, and a host tier of 32 blocks in
    front of its disk tier: each offload of the sequence spills all but a few blocks to disk."""
    kv = PagedKV(LAYERS, HK, D, block_size=BS, dtype=dtype, device=device, device_blocks=blocks + 8,
                 host_blocks=32, disk_blocks=blocks + 40, disk_path=path, disk_checksum=checksum, **disk_tuning)
    s = kv.add_sequence()
    rows = torch.randn(blocks * BS, HK, D, device=device).to(dtype)
    for layer in range(LAYERS):
        kv.append([s], layer, rows, rows)
    return kv, s, rows


def _round_trip(kv, s, device: str) -> tuple[float, float]:
    """(GB/s to disk, GB/s from disk) of one offload of `s` and its prefetch back."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    before = kv.stats()
    sync()
    t0 = time.perf_counter()
    kv.offload([s])
    sync()
    t1 = time.perf_counter()
    kv.prefetch([s])
    sync()
    t2 = time.perf_counter()
    after = kv.stats()
    return ((after["bytes_to_disk"] - before["bytes_to_disk"]) / (t1 - t0) / 1e9,
            (after["bytes_from_disk"] - before["bytes_from_disk"]) / (t2 - t1) / 1e9)


def checksum_cost(path: str, blocks: int, rounds: int, device: str = "cuda", dtype: torch.dtype | None = None,
                  control: bool = False, **disk_tuning) -> dict:
    """The disk-tier checksum's cost, measured: two caches alike but for the per-block CRC-32C
    (one checksums, one does not) take turns, `rounds` times, at the same swap (offload through
    the host tier to disk, prefetch back), which of the two goes first alternating. Per round and
    direction: time with the checksum over time without, less 1 (0.02 = 2% slower); median and
    quartiles over the rounds (one warm-up round not counted), and the median GB/s of each.
    `control`: both caches without the checksum (an A/A run), so the "cost" is the method's own
    bias and spread on this machine (two files, two pools), the floor a real cost stands on.
    `disk_tuning`: PagedKV(disk_read_piece=, disk_crc=) of both caches."""
    caches = {ck: _spilled_cache(ck and not control, path, blocks, device, dtype or default_dtype(device),
                                 **disk_tuning) for ck in (True, False)}
    rates = {True: [], False: []}
    for i in range(rounds + 1):
        for ck in ((True, False) if i % 2 == 0 else (False, True)):
            kv, s, _ = caches[ck]
            rates[ck].append(_round_trip(kv, s, device))
    for ck, (kv, s, rows) in caches.items():
        if not torch.equal(kv.gather(s, LAYERS - 1)[0], rows):
            raise SystemExit("bench: the blocks came back from disk different")
        kv.check_invariants()
    out = {"blocks": blocks, "rounds": rounds, "block_bytes": caches[True][0].block_bytes, "control": control,
           "disk_tuning": disk_tuning}
    for d, way in enumerate(("write", "read")):
        on, off = [r[d] for r in rates[True][1:]], [r[d] for r in rates[False][1:]]
        cost = sorted(b / a - 1 for a, b in zip(on, off))
        q = len(cost) // 4
        out[way] = {"cost_median": _median(cost), "cost_q1": cost[q], "cost_q3": cost[-1 - q],
                    "gb_s_checksum": _median(on), "gb_s_no_checksum": _median(off)}
    return out


def checksum_lines(c: dict, ceilings: dict) -> list[str]:
    swaps = f"{c['rounds']} rounds of {c['blocks']} x {c['block_bytes'] / 2**20:.0f} MiB swaps"
    if c.get("control"):
        lines = [f"A/A control: {swaps}, two caches both WITHOUT the checksum taking turns ('with' = the first "
                 f"cache): the method's own bias:"]
    else:
        lines = [f"disk-tier checksum (crc32c per block): {swaps}, a cache with it and one without taking turns:"]
    for way in ("write", "read"):
        r = c[way]
        lines.append(f"  {way:<6} {r['gb_s_checksum']:.2f} GB/s with, {r['gb_s_no_checksum']:.2f} without "
                     f"(file system ceiling {ceilings[way]:.2f}): cost {100 * r['cost_median']:+.2f}% of the disk "
                     f"tier's time (median; quartiles {100 * r['cost_q1']:+.2f}% .. {100 * r['cost_q3']:+.2f}%); "
                     f"target < 2%")
    return lines


def main_cpu(args) -> None:
    """--device cpu: the disk tier alone (no link, no kernels): ceilings, swaps, checksum cost."""
    path = args.disk_path or tempfile.gettempdir()
    disk = disk_ceilings(path, 2.0)
    cost = checksum_cost(path, args.disk_blocks, args.rounds, device="cpu")
    print(f"offload on the CPU (device=\"cpu\"): disk tier only, {cost['blocks']} blocks of "
          f"{cost['block_bytes'] / 2**20:.0f} MiB per swap, 4 I/O threads")
    print(f"  disk ceilings: write {disk['write']:.2f} GB/s, read {disk['read']:.2f} GB/s (2 MiB sequential)")
    for line in checksum_lines(cost, disk):
        print("  " + line)
    print(f"  saved {save('offload', {'device': 'cpu', 'disk': disk, 'checksum_cost': cost})}")
