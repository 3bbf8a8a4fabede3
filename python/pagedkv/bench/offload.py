"""`python -m pagedkv bench offload`: block swaps against the link and disk ceilings, measured in
one run, and a decode step with and without concurrent swap traffic; the disk tier's checksum
cost as the same swaps with and without it. `--device cpu`: the disk-tier part alone.

Cache: Llama-3-8B-shaped (32 layers, 8 KV heads, head_dim 128, bf16, block 16 -> 2 MiB blocks).
"""
from __future__ import annotations

import gc
import tempfile
import time

import torch

from .. import _C
from ..cache import PagedKV
from ..steps import DecodeSteps
from .common import save, sync_seconds
from .disk_tier import BS, D, HK, LAYERS, checksum_cost, checksum_lines, disk_ceilings, disk_swaps

HQ = 32


def link_ceilings(gib: float) -> dict:
    """Plain pinned cudaMemcpyAsync of one large buffer: each way, and both ways at once."""
    n = int(gib * 2**30)
    host_a = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host_b = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev_a = torch.empty(n, dtype=torch.uint8, device="cuda")
    dev_b = torch.empty(n, dtype=torch.uint8, device="cuda")
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    best = {"d2h": 0.0, "h2d": 0.0, "both": 0.0}
    for _ in range(3):
        best["d2h"] = max(best["d2h"], n / sync_seconds(lambda: host_a.copy_(dev_a, non_blocking=True)) / 1e9)
        best["h2d"] = max(best["h2d"], n / sync_seconds(lambda: dev_b.copy_(host_b, non_blocking=True)) / 1e9)

        def both():
            with torch.cuda.stream(s1):
                host_a.copy_(dev_a, non_blocking=True)
            with torch.cuda.stream(s2):
                dev_b.copy_(host_b, non_blocking=True)

        best["both"] = max(best["both"], 2 * n / sync_seconds(both) / 1e9)
    return best


# How a request's copies reach the driver: the label in the output -> PagedKV(copy_batch=...).
ISSUE = {"batch": "batch", "batch+overlap": "overlap", "a call per copy": "off"}


def staging_variants(gather: str) -> dict:
    """The pass-through variants timed: PagedKV constructor config per label. Staging by SM
    loads over the link, at the default shape and at each `gather` shape ("u,t,c;u,t,c": loads
    in flight per thread, threads, CTAs per SM), or by 2-D copy-engine copies."""
    out = {"kernel": {"staging": "kernel"}}
    for text in filter(None, (g.strip() for g in gather.split(";"))):
        try:
            shape = tuple(int(x) for x in text.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) <= 0:
            raise ValueError(f"--gather: each shape is three positive integers unroll,threads,ctas_per_sm, "
                             f"got {text!r}")
        out[f"kernel:{text}"] = {"staging": "kernel", "gather_shape": shape}
    out["dma"] = {"staging": "dma"}
    return out


def swaps(blocks: int, scattered: bool, issue: str = "batch", repeats: int = 3) -> dict:
    """Engine swap-out, swap-in and both at once, GB/s of block bytes moved, best of `repeats`
    (each on a fresh engine: a block fetched back and not written is a clean copy, which goes
    down again without a copy). Two sequences of `blocks` blocks each, whose device slots are one
    run each, or alternate (`scattered`: every block is a copy of its own, as in a pool that
    served many sessions). `issue`: how a request's copies reach the driver (ISSUE)."""
    out = {"blocks": blocks, "scattered": scattered, "issue": issue, "swap_out": 0.0, "swap_in": 0.0, "both": 0.0}
    rows = torch.randn(blocks * BS, HK, D, device="cuda", dtype=torch.bfloat16)
    for _ in range(repeats):
        kv = PagedKV(num_layers=LAYERS, num_kv_heads=HK, head_dim=D, block_size=BS, dtype=torch.bfloat16,
                     device="cuda", device_blocks=2 * blocks + 8, host_blocks=2 * blocks + 8, watermarks=(0, 0),
                     copy_batch=ISSUE[issue])
        a, b = kv.add_sequence(), kv.add_sequence()
        if scattered:  # layer 0 block by block, taking turns: a gets the even slots, b the odd ones
            for i in range(blocks):
                for s in (a, b):
                    kv.append([s], 0, rows[i * BS:(i + 1) * BS], rows[i * BS:(i + 1) * BS])
        for s in (a, b):
            for layer in range(1 if scattered else 0, LAYERS):
                kv.append([s], layer, rows, rows)
        nbytes = blocks * kv.block_bytes
        out["block_bytes"] = kv.block_bytes
        out["swap_out"] = max(out["swap_out"], nbytes / sync_seconds(lambda: kv.offload([a])) / 1e9)
        out["swap_in"] = max(out["swap_in"], nbytes / sync_seconds(lambda: kv.prefetch([a])) / 1e9)
        kv.offload([a])  # a clean copy: nothing moves
        torch.cuda.synchronize()

        def both():  # b goes down while a comes up into other slots
            kv.offload([b])
            kv.prefetch([a])

        out["both"] = max(out["both"], 2 * nbytes / sync_seconds(both) / 1e9)
        kv.check_invariants()
        del kv
        gc.collect()  # unpins its host tier before the next engine pins one
    return out


def pass_through(device_blocks: int, steps: int = 3, **config) -> dict:
    """Decode attention, all layers, over one context 4x the device tier: each layer's slices of
    the host-resident blocks are staged to the device for the call (`config`: PagedKV's staging
    and gather_shape). GB/s of staged bytes."""
    kv = PagedKV(num_layers=LAYERS, num_kv_heads=HK, head_dim=D, block_size=BS, dtype=torch.bfloat16,
                 device="cuda", device_blocks=device_blocks, host_blocks=4 * device_blocks + 16, **config)
    s = kv.add_sequence()
    rows = torch.randn(4 * device_blocks * BS, HK, D, device="cuda", dtype=torch.bfloat16)
    for layer in range(LAYERS):
        kv.append([s], layer, rows, rows)
    q = torch.randn(1, HQ, D, device="cuda", dtype=torch.bfloat16)

    calls = []  # host seconds of each attend call: one that waits for the GPU stands out

    def step():
        for layer in range(LAYERS):
            t0 = time.perf_counter()
            kv.attend([s], layer, q)
            calls.append(time.perf_counter() - t0)

    step()
    calls.clear()
    before = kv.stats()["bytes_staged"]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    issued = time.perf_counter() - t0  # host time to queue the work; near `secs` = host-bound
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    staged = kv.stats()["bytes_staged"] - before
    kv.check_invariants()
    return {"device_blocks": device_blocks, "context_blocks": 4 * device_blocks, "step_s": secs / steps,
            "host_issue_s": issued / steps, "staged_bytes_per_step": staged / steps, "gb_s": staged / secs / 1e9,
            "attend_call_s": {"median": sorted(calls)[len(calls) // 2], "max": max(calls),
                              "over_1ms": sum(c > 1e-3 for c in calls), "calls": len(calls)}}


def decode_with_traffic(batch: int, ctx: int, steps: int) -> dict:
    """Decode steps of a resident batch; then the same while other sessions swap in and out."""
    swap_blocks = 256
    need = batch * (ctx // BS + 40 * steps // BS + 2)  # every decode step below appends a row
    kv = PagedKV(num_layers=LAYERS, num_kv_heads=HK, head_dim=D, block_size=BS, dtype=torch.bfloat16,
                 device="cuda", device_blocks=need + 2 * swap_blocks + 16, host_blocks=2 * swap_blocks + 16,
                 watermarks=(0, 0))
    seqs = [kv.add_sequence() for _ in range(batch)]
    rows = torch.randn(batch * ctx, HK, D, device="cuda", dtype=torch.bfloat16)
    for layer in range(LAYERS):
        kv.append(seqs, layer, rows, rows)
    other = [kv.add_sequence(), kv.add_sequence()]
    orows = torch.randn(swap_blocks * BS, HK, D, device="cuda", dtype=torch.bfloat16)
    for s in other:
        for layer in range(LAYERS):
            kv.append([s], layer, orows, orows)
    kv.offload([other[1]])
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, HK, D, device="cuda", dtype=torch.bfloat16)

    def step_calls(batch):  # one decode step: every layer's append and attend
        for layer in range(LAYERS):
            kv.append(batch, layer, k, k)
            kv.attend(batch, layer, q)

    def compute_time(fn, before=None) -> float:
        """Seconds the compute stream spends on fn's work; `before` (untimed) runs after the
        device is idle and may leave copies in flight on the copy streams."""
        torch.cuda.synchronize()
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3

    def timed(fn) -> tuple[float, float]:
        """fn runs 3 steps: (compute seconds per step, host seconds to queue one; near the
        former = host-bound), after a warm-up run (and any capture)."""
        fn()
        alone = min(compute_time(fn) for _ in range(steps)) / 3
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        issued = (time.perf_counter() - t0) / 3
        torch.cuda.synchronize()
        return alone, issued

    def steps3():  # a pipelined loop: the host prepares the next layer while the GPU runs
        for _ in range(3):
            step_calls(seqs)

    plain, issue = timed(steps3)
    where = 0  # which of `other` is on the device

    def with_swaps(down: bool, up: bool, work=steps3) -> float:
        nonlocal where
        times = []
        for _ in range(steps):
            dev, host = other[where], other[1 - where]

            def swaps():  # 512 MiB down and/or 512 MiB up on the copy streams ...
                if down:
                    kv.offload([dev])
                if up:
                    kv.prefetch([host])

            times.append(compute_time(work, before=swaps) / 3)  # ... while 3 decode steps run
            if down and up:
                where = 1 - where
            elif down:  # put it back, untimed
                torch.cuda.synchronize()
                kv.prefetch([dev])
            else:
                torch.cuda.synchronize()
                kv.offload([host])
        return min(times)

    busy = with_swaps(True, True)
    only_down, only_up = with_swaps(True, False), with_swaps(False, True)

    # The same step planned once for every layer (begin_step), its calls launched one by one or
    # replayed from a CUDA graph captured once, as a serving loop runs decode (DESIGN.md §5).
    planned = {}

    def three(steps_of):
        def run():
            for _ in range(3):
                steps_of.step(seqs)
            steps_of.close()
        return run

    for name, fn in (("begin_step, eager", three(DecodeSteps(kv, step_calls, HQ, graph=False))),
                     ("begin_step, CUDA graph", three(DecodeSteps(kv, step_calls, HQ)))):
        alone, issued = timed(fn)
        planned[name] = {"alone_s": alone, "ratio": with_swaps(True, True, fn) / alone, "host_issue_s": issued}

    # Every layer's attention alone, launched one call at a time or replayed from one CUDA graph:
    # whether the slowdown under swap-ins is in the launches (commands the GPU fetches from host
    # memory over the same link) or in the kernels.
    def attends():
        for layer in range(LAYERS):
            kv.attend(seqs, layer, q)

    def eager3():
        for _ in range(3):
            attends()

    att = {"eager": eager3}
    attends()  # the metadata the capture reads is current
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
            attends()
        torch.cuda.synchronize()

        def graph3():
            for _ in range(3):
                graph.replay()

        att["graph"] = graph3
    except RuntimeError as e:  # a diagnostic: report, do not lose the rest of the bench
        print(f"    (attention-only CUDA graph not measured: {str(e)[:120]})")
    for name, fn in list(att.items()):
        alone = min(compute_time(fn) for _ in range(steps)) / 3
        att[name] = {"alone_s": alone, "ratio": with_swaps(True, True, fn) / alone}
    kv.check_invariants()
    return {"batch": batch, "context": ctx, "step_s": plain, "step_with_swaps_s": busy,
            "ratio": busy / plain, "swap_bytes_per_step": 2 * swap_blocks * kv.block_bytes,
            "host_issue_s": issue, "ratio_swap_out_only": only_down / plain, "ratio_swap_in_only": only_up / plain,
            "attention_only": att, "planned_step": planned}


def main(args) -> None:
    if args.device == "cpu":
        from .disk_tier import main_cpu

        return main_cpu(args)
    if not torch.cuda.is_available():
        raise SystemExit("bench offload needs a CUDA GPU (or --device cpu: the disk tier alone)")
    variants = staging_variants(args.gather)  # a bad --gather fails before anything is measured
    card = torch.cuda.get_device_name()
    link = link_ceilings(2.0)
    disk = disk_ceilings(args.disk_path or tempfile.gettempdir(), 2.0)
    sw_all = [swaps(args.blocks, False)] + [swaps(args.blocks, True, how) for how in ISSUE]
    sw = sw_all[1]  # the scattered slots of a pool in service, the engine's default: the figure of record
    dec = decode_with_traffic(args.batch, args.context, 5)
    dk = disk_swaps(args.disk_path or tempfile.gettempdir(), 512)
    ck = checksum_cost(args.disk_path or tempfile.gettempdir(), args.disk_blocks, args.rounds)
    pt = {how: pass_through(1024, **config) for how, config in variants.items()}
    print(f"offload on {card}: blocks of {sw['block_bytes'] / 2**20:.1f} MiB, {sw['blocks']} per transfer")
    print(f"  {'direction':<12}{'slots':<11}{'issued as':<18}{'pagedkv GB/s':>14}{'ceiling GB/s':>14}{'ratio':>8}")
    for r in sw_all:
        for name, ours, ceil in (("swap-out", r["swap_out"], link["d2h"]), ("swap-in", r["swap_in"], link["h2d"]),
                                 ("both ways", r["both"], link["both"])):
            print(f"  {name:<12}{'scattered' if r['scattered'] else 'one run':<11}"
                  f"{r['issue']:<18}"
                  f"{ours:>14.1f}{ceil:>14.1f}{ours / ceil:>7.2f}x")
    print(f"  disk ceilings: write {disk['write']:.2f} GB/s, read {disk['read']:.2f} GB/s (2 MiB sequential)")
    print(f"  engine through the disk tier ({dk['blocks']} blocks, 4 I/O threads): swap-out to disk "
          f"{dk['to_disk_gb_s']:.2f} GB/s ({dk['to_disk_gb_s'] / disk['write']:.2f}x), back up "
          f"{dk['from_disk_gb_s']:.2f} GB/s ({dk['from_disk_gb_s'] / disk['read']:.2f}x)"
          + ("" if dk["intact"] else "  DATA MISMATCH"))
    for line in checksum_lines(ck, disk):
        print("  " + line)
    print(f"  decode step (mean of 3 back to back), batch {dec['batch']} x {dec['context']}: "
          f"{dec['step_s'] * 1e3:.2f} ms alone, "
          f"{dec['step_with_swaps_s'] * 1e3:.2f} ms with {dec['swap_bytes_per_step'] / 2**30:.2f} GiB of swaps "
          f"in flight ({dec['ratio']:.3f}x; swap-out only {dec['ratio_swap_out_only']:.3f}x, swap-in only "
          f"{dec['ratio_swap_in_only']:.3f}x; host issues a step in {dec['host_issue_s'] * 1e3:.2f} ms)")
    for name, r in dec["planned_step"].items():
        print(f"    decode step planned once ({name}): {r['alone_s'] * 1e3:.2f} ms alone, {r['ratio']:.3f}x with "
              f"the swaps (host issues a step in {r['host_issue_s'] * 1e3:.2f} ms)")
    for name, r in dec["attention_only"].items():
        print(f"    attention only, {name}: {r['alone_s'] * 1e3:.2f} ms per step alone, {r['ratio']:.3f}x with the swaps")
    for how, r in pt.items():
        print(f"  pass-through ({how}): decode over {r['context_blocks']} blocks, {r['device_blocks']}-block device "
              f"tier: {r['step_s'] * 1e3:.1f} ms/step (host issue {r['host_issue_s'] * 1e3:.1f}), "
              f"{r['staged_bytes_per_step'] / 2**30:.2f} GiB staged per step, "
              f"{r['gb_s']:.1f} GB/s = {r['gb_s'] / link['h2d']:.2f}x the host-to-device ceiling; attend calls "
              f"on the host: median {r['attend_call_s']['median'] * 1e3:.2f} ms, max {r['attend_call_s']['max'] * 1e3:.1f}, "
              f"{r['attend_call_s']['over_1ms']} of {r['attend_call_s']['calls']} over 1 ms")
    print(f"  saved {save('offload', {'card': card, 'link': link, 'disk': disk, 'swaps': sw, 'swap_layouts': sw_all, 'decode': dec, 'pass_through': pt, 'disk_swaps': dk, 'checksum_cost': ck})}")
