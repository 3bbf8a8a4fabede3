"""Nsight Compute side by side: our paged decode kernel, FlashInfer's two paged decode paths and
SDPA on contiguous KV, on one shape, each call inside its own profiler window.

    ncu --clock-control none --profile-from-start off --set full -o $OUT/ncu \
        python3 bench/ncu_kernel.py 16 32768
    ncu -i $OUT/ncu.ncu-rep --page raw --csv > $OUT/ncu-raw.csv

Run from the repository root on a GPU machine, after `pip install .`. Not part of the package:
it only drives the bench's own builders under a profiler (bench/device_run.sh part `ncu`).
"""
import sys

import torch

from pagedkv.bench.kernel import _dense_kv, _filled_cache, _flashinfer, _sdpa_variants, HQ, D


def main() -> None:
    batch, ctx = int(sys.argv[1]), int(sys.argv[2])
    gen = torch.Generator(device="cuda").manual_seed(0)
    kv, seqs = _filled_cache(batch, ctx, gen)
    q = torch.randn(batch, HQ, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    calls = {"pagedkv": lambda: kv.attend(seqs, 0, q)}
    for name, tc in (("flashinfer_tc", True), ("flashinfer_cuda", False)):
        fn, why = _flashinfer(kv, seqs, q, tc)
        if fn is None:
            print(why)
        else:
            calls[name] = fn
    k, v = _dense_kv(kv, seqs)
    calls["sdpa_gqa"] = _sdpa_variants(q, k, v)["gqa"]
    for name, fn in calls.items():
        for _ in range(3):  # warm: JIT, plans, workspaces
            fn()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push(name)
        torch.cuda.profiler.start()
        fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        torch.cuda.nvtx.range_pop()
        print(f"profiled {name}", flush=True)


if __name__ == "__main__":
    main()
