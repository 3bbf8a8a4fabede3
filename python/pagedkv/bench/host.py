"""`python -m pagedkv bench host`: host-side cost of a decode step.

Per decode step of `seqs` sequences over `layers` layers: one append per layer (slot reservation,
block allocation when a sequence crosses a block boundary, the row writes) and the block-table
preparation that attend() does once per step. Attention itself is left out (that is the kernel
benchmark); on the CPU the row writes are memcpy into the host pool.

Then `begin_step`, a whole decode step's host work for every layer at once (reservations, block
table, residency and pins), with and without a host tier.

Then the host side of attention passing through: one sequence of `staged_blocks` one-token
blocks through a device tier a quarter that size, so attention itself is tiny and the time is
the engine's: layer 0 of each step builds the staged plan, the other layers reuse it.
"""
from __future__ import annotations

import time

import torch

from ..cache import PagedKV
from .common import save, summary


def run(seqs: int = 256, layers: int = 32, kv_heads: int = 8, head_dim: int = 128,
        block_size: int = 16, prompt: int = 32, steps: int = 64, device: str = "cpu") -> dict:
    dtype = torch.bfloat16
    blocks = seqs * ((prompt + steps + 2 * block_size) // block_size + 1)
    kv = PagedKV(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
                 dtype=dtype, device=device, device_blocks=blocks)
    ids = [kv.add_sequence() for _ in range(seqs)]
    rows = torch.randn(seqs * prompt, kv_heads, head_dim, device=device).to(dtype)
    for layer in range(layers):
        kv.append(ids, layer, rows, rows)
    step_kv = [torch.randn(seqs, kv_heads, head_dim, device=device).to(dtype) for _ in range(layers)]
    append_s, prepare_s = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        for layer in range(layers):
            kv.append(ids, layer, step_kv[layer], step_kv[layer])
        t1 = time.perf_counter()
        kv.prepare(ids)
        t2 = time.perf_counter()
        append_s.append(t1 - t0)
        prepare_s.append(t2 - t1)
    crossings = sum(1 for s in range(prompt, prompt + steps) if s % block_size == 0)
    res = {"config": dict(seqs=seqs, layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                          block_size=block_size, prompt=prompt, steps=steps, device=device,
                          dtype=str(dtype)),
           "append_per_step_s": summary(append_s), "prepare_per_step_s": summary(prepare_s),
           "steps_with_new_blocks": crossings,
           "kv_bytes_written_per_step": seqs * layers * 2 * kv_heads * head_dim * 2}
    return res


def _small_head(device: str) -> int:
    """The smallest head the kernels take on CUDA (64); 16 on the CPU, as the recorded runs."""
    return 16 if str(device) == "cpu" else 64


def staged(blocks: int = 4096, layers: int = 32, steps: int = 8, device: str = "cpu") -> dict:
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    D = _small_head(device)
    kv = PagedKV(num_layers=layers, num_kv_heads=1, head_dim=D, block_size=1, dtype=dtype, device=device,
                 device_blocks=blocks // 4, host_blocks=blocks + steps + 16)
    s = kv.add_sequence()
    rows = torch.randn(blocks, 1, D, device=device).to(dtype)
    for layer in range(layers):
        kv.append([s], layer, rows, rows)
    step_kv = torch.randn(1, 1, D, device=device).to(dtype)
    q = torch.randn(1, 1, D, device=device).to(dtype)
    first, rest = [], []
    for _ in range(steps):
        for layer in range(layers):
            kv.append([s], layer, step_kv, step_kv)
            t0 = time.perf_counter()
            kv.attend([s], layer, q)
            (first if layer == 0 else rest).append(time.perf_counter() - t0)
    if device != "cpu":
        torch.cuda.synchronize()
    return {"blocks": blocks, "device_blocks": blocks // 4, "layers": layers, "steps": steps,
            "layer0_s": summary(first), "other_layers_s": summary(rest),
            "slices_staged": kv.stats()["slices_staged"]}


def planned(seqs: int = 8, context: int = 8192, layers: int = 32, steps: int = 32, device: str = "cpu") -> dict:
    """Host seconds of begin_step per step (only the bookkeeping is timed; each step's rows are
    then written outside the clock, as a step must be before the next). Small heads: the host
    work does not depend on them."""
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    out = {"seqs": seqs, "context": context, "layers": layers, "steps": steps}
    D = _small_head(device)
    for name, host in (("resident", 0), ("host tier", 64)):
        kv = PagedKV(num_layers=layers, num_kv_heads=1, head_dim=D, block_size=16, dtype=dtype, device=device,
                     device_blocks=seqs * ((context + steps) // 16 + 2), host_blocks=host, watermarks=(0, 0))
        ids = [kv.add_sequence() for _ in range(seqs)]
        rows = torch.zeros(seqs * context, 1, D, device=device, dtype=dtype)
        for layer in range(layers):
            kv.append(ids, layer, rows, rows)
        times = []
        step_rows = torch.zeros(seqs, 1, D, device=device, dtype=dtype)
        for _ in range(steps):
            t0 = time.perf_counter()
            kv.begin_step(ids)
            times.append(time.perf_counter() - t0)
            for layer in range(layers):
                kv.append(ids, layer, step_rows, step_rows)
        kv.end_step()
        out[name] = summary(times)
    return out


def main(args) -> None:
    # --seqs/--steps size every part when given; otherwise each part keeps the size its figures in
    # BENCHMARKS.md were measured at (append 256 x 64 steps, begin_step 8 x 32, staged 8 steps).
    given = {k: v for k, v in (("seqs", args.seqs), ("steps", args.steps)) if v is not None}
    res = run(layers=args.layers, device=args.device, **given)
    a, p = res["append_per_step_s"], res["prepare_per_step_s"]
    c = res["config"]
    print(f"host-side cost per decode step: {c['seqs']} sequences x {c['layers']} layers, "
          f"block {c['block_size']}, {c['device']}")
    print(f"  {'part':<28}{'median us':>12}{'p10 us':>10}{'p90 us':>10}{'us/seq/layer':>14}")
    for name, s in (("append (all layers)", a), ("block-table preparation", p)):
        per = s["median"] * 1e6 / (c["seqs"] * (c["layers"] if name.startswith("append") else 1))
        print(f"  {name:<28}{s['median']*1e6:>12.1f}{s['p10']*1e6:>10.1f}{s['p90']*1e6:>10.1f}{per:>14.3f}")
    gbs = res["kv_bytes_written_per_step"] / a["median"] / 1e9
    print(f"  append moves {res['kv_bytes_written_per_step']/2**20:.1f} MiB of K/V per step "
          f"({gbs:.1f} GB/s including bookkeeping); {res['steps_with_new_blocks']} of {c['steps']} "
          f"steps allocated new blocks")
    pl = planned(layers=args.layers, device=args.device, context=args.context, **given)
    res["planned"] = pl
    print(f"  begin_step, {pl['seqs']} sequences x {pl['context']} tokens x {pl['layers']} layers: "
          f"{pl['resident']['median'] * 1e6:.0f} us resident, {pl['host tier']['median'] * 1e6:.0f} us with a "
          f"host tier (pins and policy touches; medians, host time per step)")
    st = staged(layers=args.layers, device=args.device, **{k: v for k, v in given.items() if k == "steps"})
    res["staged"] = st
    print(f"  staged attend, {st['blocks']} one-token blocks through a {st['device_blocks']}-block device tier: "
          f"layer 0 (plan built) {st['layer0_s']['median'] * 1e6:.0f} us, other layers (plan reused) "
          f"{st['other_layers_s']['median'] * 1e6:.0f} us (medians, host time per call)")
    print(f"  saved {save('host', res)}")
