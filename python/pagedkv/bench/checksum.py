"""`python -m pagedkv bench checksum`: what the disk tier's per-block CRC-32C costs, on the CPU.

Every block written to the disk tier is checksummed once on the way down and checked once on the
way up (docs/DESIGN.md, disk integrity). Measured in one run:
  crc32c      GB/s of the checksum alone on one thread, over Llama-3-8B-shaped blocks (the
              hardware crc32 instruction when the CPU has it, and the portable tables);
  disk tier   GB/s of block bytes the engine moves through its disk tier (offload through a small
              host tier, prefetch back; its 4 I/O threads, checksum included);
  ceilings    the file system's own sequential 2 MiB write (fsync'd) and read (cache dropped).
The checksum's cost is the time it takes for the bytes the disk tier moved, as a share of the
time the disk tier took: disk tier GB/s / crc32c GB/s per direction (an upper bound: the I/O
threads checksum one block while another's transfer is in flight). Target: under 2%.
"""
from __future__ import annotations

import tempfile
import time

import torch

from .. import _C
from .common import save
from .offload import BS, D, HK, LAYERS, disk_ceilings, disk_swaps


def crc32c_rate(block_bytes: int, portable: bool, seconds: float = 0.5) -> float:
    """GB/s of crc32c over one block-sized buffer, on this thread (best of a few rounds)."""
    buf = torch.randint(0, 256, (block_bytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    _C.crc32c(buf, portable)
    best = 0.0
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds / 3:
            _C.crc32c(buf, portable)
            n += 1
        best = max(best, n * block_bytes / elapsed / 1e9)
    return best


def main(args) -> None:
    path = args.disk_path or tempfile.gettempdir()
    block_bytes = LAYERS * 2 * HK * BS * D * 4  # the float32 blocks of the CPU cache below
    crc = {"hardware": crc32c_rate(block_bytes, False) if _C.crc32c_hardware() else None,
           "portable": crc32c_rate(block_bytes, True)}
    rate = crc["hardware"] or crc["portable"]
    ceilings = disk_ceilings(path, args.gib)
    tier = max((disk_swaps(path, args.blocks, device="cpu") for _ in range(args.repeats)),
               key=lambda r: r["to_disk_gb_s"] + r["from_disk_gb_s"])
    if not tier["intact"]:
        raise SystemExit("bench checksum: the blocks came back from disk different")
    cost = {"write": tier["to_disk_gb_s"] / rate, "read": tier["from_disk_gb_s"] / rate,
            "write_at_ceiling": ceilings["write"] / rate, "read_at_ceiling": ceilings["read"] / rate}
    print(f"checksum (crc32c) of {block_bytes / 2**20:.0f} MiB disk-tier blocks, one thread: "
          + (f"{crc['hardware']:.2f} GB/s (crc32 instruction), " if crc["hardware"] else "")
          + f"{crc['portable']:.2f} GB/s (portable tables)")
    print(f"  disk tier, {tier['blocks']} blocks through the engine's I/O threads: write {tier['to_disk_gb_s']:.2f} "
          f"GB/s, read {tier['from_disk_gb_s']:.2f} GB/s; file system ceilings: write {ceilings['write']:.2f}, "
          f"read {ceilings['read']:.2f} GB/s")
    print(f"  checksum time / disk tier time: write {100 * cost['write']:.2f}%, read {100 * cost['read']:.2f}% "
          f"(at the file system's ceilings: {100 * cost['write_at_ceiling']:.2f}%, "
          f"{100 * cost['read_at_ceiling']:.2f}%); target < 2%")
    print(f"  saved {save('checksum', {'block_bytes': block_bytes, 'crc32c_gb_s': crc, 'disk_tier': tier, 'ceilings': ceilings, 'cost_share': cost})}")
