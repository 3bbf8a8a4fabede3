"""`python -m pagedkv bench distributed`: decode attention of one long sequence striped over the
ranks of a torch.distributed group (docs/DISTRIBUTED.md), against world size and context.

Spawns `world` processes per world size: gloo on CPUs, NCCL with one GPU per rank on CUDA (a
world larger than the GPUs here is skipped). Per (world, context, batch), rank 0 reports:
  local       attention of this rank's keys alone (its partial (out, lse)), per layer;
  attend      the whole PagedKV.attend: local part + merge over the group, per layer, and per
              step (every layer);
  merge       the merge alone (each method), per layer, and the bare collectives it is made of
              (all_gather of the lse, all_reduce of the float32 outputs) at two sizes, which give
              the alpha + beta * bytes model of docs/DISTRIBUTED.md;
  bytes       what the merge moves per layer and per step;
  ceiling     local attention's bytes read per second (context * bytes_per_token / world / time).
Llama-3-8B attention shape per layer: 32 query heads, 8 KV heads, head_dim 128 (bf16 unless --dtype).
"""
from __future__ import annotations

import os
import socket
import statistics
import time

import torch

from .common import save

QH, KH, D, BS = 32, 8, 128, 16


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timer(cuda: bool, group):
    """Median seconds of fn() over `reps` (after one untimed), all ranks in step: a barrier before
    each repeat; CUDA events around fn on a GPU, perf_counter on a CPU."""
    import torch.distributed as dist

    def once(fn) -> float:
        if not cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3

    def run(fn, reps: int) -> float:
        fn()
        samples = []
        for _ in range(reps):
            dist.barrier(group=group)
            samples.append(once(fn))
        return statistics.median(samples)
    return run


def _copy_ceiling_gb_s(device: torch.device) -> float:
    """This rank's memory copy rate, bytes read plus written per second (GB/s): the ceiling of
    a local attention that reads every key once."""
    if device.type == "cuda":
        from .timing import copy_ceiling_tbs

        return copy_ceiling_tbs(gib=1.0) * 1e3
    src = torch.empty(64 * 2**20, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def _fits_everywhere(need: int, device: torch.device, group) -> bool:
    """Whether every rank has `need` bytes free (with 10% to spare) for its share of the K/V:
    the same answer on every rank (one all_reduce of MIN), so all skip a row together."""
    import torch.distributed as dist

    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    fits = torch.tensor([1 if need * 1.1 < free else 0], dtype=torch.int32, device=device)
    dist.all_reduce(fits, op=dist.ReduceOp.MIN, group=group)
    return bool(fits.item())


def _alpha_beta(small_s: float, large_s: float, small_bytes: int, large_bytes: int) -> dict:
    """The line t = alpha + beta * bytes through two measured sizes (us, us per KiB)."""
    beta = max(0.0, (large_s - small_s) / (large_bytes - small_bytes))
    return {"alpha_us": (small_s - beta * small_bytes) * 1e6, "beta_us_per_kib": beta * 1024 * 1e6}


def _worker(rank: int, world: int, port: int, cfg: dict, queue) -> None:
    import torch.distributed as dist

    import pagedkv
    from pagedkv import distributed

    cuda = cfg["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, cfg["threads"] // world))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, **({"device_id": torch.device("cuda", rank)} if cuda else {}))
    group = dist.group.WORLD
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = getattr(torch, cfg["dtype"])
    esize = torch.empty((), dtype=dtype).element_size()
    ceiling = _copy_ceiling_gb_s(device)
    timer = _timer(cuda, group)
    g = torch.Generator().manual_seed(0)
    rows_out = []
    for ctx in cfg["contexts"]:
        for batch in cfg["batches"]:
            blocks = batch * (-(-ctx // BS) // world + 2)
            need = blocks * cfg["layers"] * 2 * KH * BS * D * esize
            if not _fits_everywhere(need, device, group):
                rows_out.append(dict(world=world, context=ctx, batch=batch, layers=cfg["layers"],
                                     skipped=f"needs {need / 2**30:.1f} GiB of K/V per rank, more than "
                                             f"some rank has free"))
                continue
            kv = pagedkv.PagedKV(num_layers=cfg["layers"], num_kv_heads=KH, head_dim=D, block_size=BS, dtype=dtype,
                                 device=device, device_blocks=blocks, group=group)
            seqs = [kv.add_sequence() for _ in range(batch)]
            chunk = torch.randn(4096, KH, D, generator=g).to(dtype).to(device)
            for layer in range(cfg["layers"]):
                for s in seqs:
                    done = 0
                    while done < ctx:
                        n = min(4096, ctx - done)
                        kv.append([s], layer, chunk[:n], chunk[:n])
                        done += n
            q = torch.randn(batch, QH, D, generator=g).to(dtype).to(device)
            reps = cfg["reps"]
            local = timer(lambda: kv._attend_here(seqs, 0, q, [1] * batch, D ** -0.5, -1, None, True), reps)
            attend = {}
            for method in ("allreduce", "allgather"):
                kv.merge = method
                attend[method] = timer(lambda: kv.attend(seqs, 0, q), reps)
            step = timer(lambda: [kv.attend(seqs, layer, q) for layer in range(cfg["layers"])], max(3, reps // 4))
            out, lse = kv._attend_here(seqs, 0, q, [1] * batch, D ** -0.5, -1, None, True)
            merge = {m: timer(lambda m=m: distributed.merge_collective(out, lse, group, world, m, kv._merge_fn), reps)
                     for m in ("allreduce", "allgather")}
            lse_bytes = batch * QH * 4  # (float32)
            out_bytes = batch * QH * D * 4
            colls = {}
            for name, n in (("lse", lse_bytes // 4), ("out", out_bytes // 4), ("out_x16", 16 * out_bytes // 4)):
                t = torch.zeros(n, dtype=torch.float32, device=device)
                parts = [torch.empty_like(t) for _ in range(world)]
                colls[f"all_gather_{name}"] = timer(lambda: dist.all_gather(parts, t, group=group), reps)
                colls[f"all_reduce_{name}"] = timer(lambda: dist.all_reduce(t, group=group), reps)
            kv_bytes = 2 * ctx * batch * KH * D * esize  # K and V of one layer, all ranks
            merge_bytes = {"allreduce": world * lse_bytes + out_bytes,
                           "allgather": world * (lse_bytes + batch * QH * D * esize)}
            rows_out.append(dict(
                world=world, context=ctx, batch=batch, layers=cfg["layers"], local_ms=local * 1e3,
                attend_ms={m: t * 1e3 for m, t in attend.items()}, step_ms=step * 1e3,
                merge_us={m: t * 1e6 for m, t in merge.items()},
                collective_us={k: t * 1e6 for k, t in colls.items()},
                merge_bytes_per_layer=merge_bytes,
                merge_bytes_per_step={m: b * cfg["layers"] for m, b in merge_bytes.items()},
                model={k: _alpha_beta(colls[f"{k}_out"], colls[f"{k}_out_x16"], out_bytes, 16 * out_bytes)
                       for k in ("all_gather", "all_reduce")},
                local_read_gb_s=kv_bytes / world / local / 1e9, copy_ceiling_gb_s=ceiling,
                dtype=cfg["dtype"],
                device_blocks_used=kv.stats()["device_blocks_used"]))
            del kv, seqs
    if rank == 0:
        queue.put(rows_out)
    dist.barrier()
    dist.destroy_process_group()


def _run_world(ctx_mp, world: int, cfg: dict) -> list:
    """Rank 0's rows from `world` spawned ranks; SystemExit when a rank dies (never a hang)."""
    queue = ctx_mp.SimpleQueue()
    port = _port()
    procs = [ctx_mp.Process(target=_worker, args=(r, world, port, cfg, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        while queue.empty():
            if any(p.exitcode not in (None, 0) for p in procs) or all(p.exitcode == 0 for p in procs):
                raise SystemExit(f"bench distributed: a rank of world {world} failed (exit codes "
                                 f"{[p.exitcode for p in procs]}); its traceback is above")
            time.sleep(0.2)
        got = queue.get()
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    return got


def main(a) -> None:
    import torch.multiprocessing as mp

    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench distributed: --device cuda but no GPU is visible")
    worlds = [int(x) for x in a.world.split(",")]
    if not worlds or min(worlds) < 1:
        raise SystemExit(f"bench distributed: --world must list positive world sizes, got {a.world!r}")
    contexts = a.contexts or ("1048576,4194304" if cuda else "16384,65536")
    cfg = dict(device=a.device, contexts=[int(x) for x in contexts.split(",")],
               batches=[int(x) for x in a.batches.split(",")], layers=a.layers or (4 if cuda else 2),
               reps=a.reps or (20 if cuda else 5), dtype=a.dtype, threads=os.cpu_count() or 1)
    cores = os.cpu_count() or 1
    where = torch.cuda.get_device_name(0) if cuda else f"CPU ({cores} cores), gloo"
    print(f"distributed decode attention, {a.dtype}, {QH} q / {KH} kv heads, head_dim {D}, block {BS}, "
          f"{cfg['layers']} layers, on {where}")
    ctx_mp = mp.get_context("spawn")
    rows = []
    for world in worlds:
        if cuda and world > torch.cuda.device_count():
            print(f"  world {world}: skipped ({torch.cuda.device_count()} GPU(s) here)")
            continue
        if not cuda and world > cores:
            print(f"  world {world}: {world} processes on {cores} cores (oversubscribed: times are upper bounds)")
        rows += _run_world(ctx_mp, world, cfg)
    _print(rows)
    path = save("distributed", {"device": a.device, "where": where, "rows": rows})
    print(f"saved {path}")


def _print(rows: list) -> None:
    print(" world  context batch  local ms  GB/s (ceil)   attend ms (ar / ag)   step ms  "
          "merge us (ar / ag)   all_gather lse us  all_reduce out us  merge KiB/step (ar / ag)")
    for r in rows:
        if "skipped" in r:
            print(f"  {r['world']:4d} {r['context']:8d} {r['batch']:5d}  skipped: {r['skipped']}")
            continue
        c, b = r["collective_us"], r["merge_bytes_per_step"]
        print(f"  {r['world']:4d} {r['context']:8d} {r['batch']:5d} {r['local_ms']:9.3f} "
              f"{r['local_read_gb_s']:6.2f} ({r['copy_ceiling_gb_s']:5.1f})  "
              f"{r['attend_ms']['allreduce']:8.3f} / {r['attend_ms']['allgather']:8.3f}  {r['step_ms']:8.2f}  "
              f"{r['merge_us']['allreduce']:8.1f} / {r['merge_us']['allgather']:8.1f}  "
              f"{c['all_gather_lse']:17.1f}  {c['all_reduce_out']:17.1f}  "
              f"{b['allreduce'] / 1024:9.1f} / {b['allgather'] / 1024:9.1f}")
    print("alpha + beta * bytes of the bare collectives (from the out and 16x out sizes):")
    for r in (r for r in rows if "skipped" not in r):
        m = r["model"]
        print(f"  world {r['world']} batch {r['batch']:3d} context {r['context']:8d}: " + ", ".join(
            f"{k} alpha {v['alpha_us']:.1f} us, beta {v['beta_us_per_kib']:.3f} us/KiB" for k, v in m.items()))
