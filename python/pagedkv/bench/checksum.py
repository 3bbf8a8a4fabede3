"""`python -m pagedkv bench checksum`: what the disk tier's per-block CRC-32C costs (caches on the
CPU by default; `--device cuda` puts them on the GPU, their blocks crossing the pinned host tier).

Every block written to the disk tier is checksummed once on the way down (CPU caches: on a
checksum thread while its own write runs; CUDA caches: on the GPU as the block is evicted, the
write taking that CRC as given) and checked once on the way up, on the CPU (docs/DESIGN.md, disk
integrity). `--disk-read-piece` and `--disk-crc` set both caches' PagedKV(disk_read_piece=,
disk_crc=), so one host times the ways against each other.
Measured in one run:
  crc32c      GB/s of the checksum alone on one thread over one disk-tier block, on each path this
              CPU has (carry-less-multiply folding, the crc32 instruction, the portable tables;
              the disk tier runs the first at most --disk-crc);
  cost        the same swaps through the disk tier by two caches alike but for the checksum,
              taking turns (disk_tier.checksum_cost): time with it over time without, less 1,
              median and quartiles per direction. Target: under 2%;
  bound       the checksum's own time for the bytes moved as a share of the disk tier's time
              (disk tier GB/s over crc32c GB/s): what it would cost if nothing overlapped it (a
              lower bound of that: blocks fresh from the disk are not in the cache);
  ceilings    the file system's own sequential 2 MiB write (fsync'd) and read (cache dropped).
`--control` runs the same rounds with neither cache checksumming (an A/A run): what the method
reports when there is nothing to find, the floor under the cost.
"""
from __future__ import annotations

import tempfile
import time

import torch

from .. import _C, cuda_available
from .._checks import DISK_CRC_PATHS
from .common import save
from .disk_tier import checksum_cost, checksum_lines, default_dtype, disk_ceilings


def crc32c_rate(block_bytes: int, path: str = "best", seconds: float = 0.5) -> float:
    """GB/s of crc32c over one block-sized buffer on `path`, on this thread (best of a few rounds)."""
    buf = torch.randint(0, 256, (block_bytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    _C.crc32c(buf, path=path)
    best = 0.0
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds / 3:
            _C.crc32c(buf, path=path)
            n += 1
        best = max(best, n * block_bytes / elapsed / 1e9)
    return best


def main(args) -> None:
    if args.device == "cuda" and not cuda_available():
        raise SystemExit("bench checksum --device cuda: no GPU that pagedkv's kernels run on (use --device cpu)")
    path = args.disk_path or tempfile.gettempdir()
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(args.device)
    dtype_name = str(dtype).removeprefix("torch.")
    ceilings = disk_ceilings(path, args.gib)
    tuning = {"disk_read_piece": args.disk_read_piece, "disk_crc": args.disk_crc}
    cost = checksum_cost(path, args.blocks, args.rounds, device=args.device, dtype=dtype, control=args.control,
                         **tuning)
    block_bytes = cost["block_bytes"]
    paths = _C.crc32c_paths()  # this CPU's, fastest first
    runs = next(p for p in paths  # the disk tier's: the fastest at most --disk-crc (both lists fastest first)
                if DISK_CRC_PATHS.index(p) >= DISK_CRC_PATHS.index(args.disk_crc))
    crc = {p: crc32c_rate(block_bytes, p) for p in paths}
    bound = {way: cost[way]["gb_s_checksum"] / crc[runs] for way in ("write", "read")}
    print(f"checksum (crc32c) of {block_bytes / 2**20:.0f} MiB disk-tier blocks, one thread: "
          + ", ".join(f"{crc[p]:.2f} GB/s ({p})" for p in paths) + f"; the disk tier runs {runs}")
    for line in checksum_lines(cost, ceilings):
        print("  " + line)
    print(f"  were nothing overlapped, the checksum's own time (at its rate on a cached block) would be write "
          f"{100 * bound['write']:.2f}%, read {100 * bound['read']:.2f}% of the disk tier's")
    print(f"  caches on {args.device} in {dtype_name}: the blocks cross "
          + ("a pinned host tier (copy engines)" if args.device == "cuda" else "a host tier (memcpy)"))
    print(f"  disk tier: PagedKV(disk_read_piece={args.disk_read_piece}, disk_crc={args.disk_crc!r})"
          + (" (whole blocks, checked after the read)" if args.disk_read_piece == 0 else ""))
    print(f"  saved {save('checksum', {'device': args.device, 'control': args.control, 'dtype': dtype_name, 'block_bytes': block_bytes, 'crc32c_gb_s': crc, 'ceilings': ceilings, 'cost': cost, 'bound': bound, 'disk_tuning': tuning})}")
