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
Llama-3-8B attention shape per layer: 32 query heads, 8 KV heads, head_dim 128 (bf16).
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
    """Median seconds of fn() over `reps` (after one untimed), all ranks in step."""
    import torch.distributed as dist

    def run(fn, reps: int) -> float:
        fn()
        samples = []
        for _ in range(reps):
            dist.barrier(group=group)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)
    return run


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
    dtype = torch.bfloat16
    timer = _timer(cuda, group)
    g = torch.Generator().manual_seed(0)
    rows_out = []
    for ctx in cfg["contexts"]:
        for batch in cfg["batches"]:
            blocks = batch * (-(-ctx // BS) // world + 2)
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
            lse_bytes = batch * QH * 4
            out_bytes = batch * QH * D * 4
            colls = {}
            for name, n in (("lse", lse_bytes // 4), ("out", out_bytes // 4), ("out_x16", 16 * out_bytes // 4)):
                t = torch.zeros(n, dtype=torch.float32, device=device)
                parts = [torch.empty_like(t) for _ in range(world)]
                colls[f"all_gather_{name}"] = timer(lambda: dist.all_gather(parts, t, group=group), reps)
                colls[f"all_reduce_{name}"] = timer(lambda: dist.all_reduce(t, group=group), reps)
            kv_bytes = 2 * ctx * batch * KH * D * 2  # K and V of one layer, all ranks
            rows_out.append(dict(
                world=world, context=ctx, batch=batch, layers=cfg["layers"], local_ms=local * 1e3,
                attend_ms={m: t * 1e3 for m, t in attend.items()}, step_ms=step * 1e3,
                merge_us={m: t * 1e6 for m, t in merge.items()},
                collective_us={k: t * 1e6 for k, t in colls.items()},
                merge_bytes_per_layer={"allreduce": world * lse_bytes + out_bytes,
                                       "allgather": world * (lse_bytes + batch * QH * D * 2)},
                local_read_gb_s=kv_bytes / world / local / 1e9,
                device_blocks_used=kv.stats()["device_blocks_used"]))
            del kv, seqs
    if rank == 0:
        queue.put(rows_out)
    dist.barrier()
    dist.destroy_process_group()


def main(a) -> None:
    import torch.multiprocessing as mp

    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench distributed: --device cuda but no GPU is visible")
    worlds = [int(x) for x in a.world.split(",")]
    contexts = a.contexts or ("1048576,4194304" if cuda else "16384,65536")
    cfg = dict(device=a.device, contexts=[int(x) for x in contexts.split(",")],
               batches=[int(x) for x in a.batches.split(",")], layers=a.layers, reps=a.reps,
               threads=os.cpu_count() or 1)
    where = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores), gloo"
    print(f"distributed decode attention, bf16, {QH} q / {KH} kv heads, head_dim {D}, block {BS}, on {where}")
    ctx_mp = mp.get_context("spawn")
    rows = []
    for world in worlds:
        if cuda and world > torch.cuda.device_count():
            print(f"  world {world}: skipped ({torch.cuda.device_count()} GPU(s) here)")
            continue
        queue = ctx_mp.SimpleQueue()
        port = _port()
        procs = [ctx_mp.Process(target=_worker, args=(r, world, port, cfg, queue)) for r in range(world)]
        for p in procs:
            p.start()
        got = queue.get()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise SystemExit(f"bench distributed: a rank of world {world} failed")
        rows += got
    print(" world  context batch  local ms  attend ms (ar / ag)  step ms  merge us (ar / ag)  "
          "all_gather lse us  all_reduce out us  local GB/s")
    for r in rows:
        c = r["collective_us"]
        print(f"  {r['world']:4d} {r['context']:8d} {r['batch']:5d} {r['local_ms']:9.3f}  "
              f"{r['attend_ms']['allreduce']:8.3f} / {r['attend_ms']['allgather']:8.3f}  {r['step_ms']:8.2f}  "
              f"{r['merge_us']['allreduce']:8.1f} / {r['merge_us']['allgather']:8.1f}  "
              f"{c['all_gather_lse']:17.1f}  {c['all_reduce_out']:17.1f}  {r['local_read_gb_s']:10.2f}")
    path = save("distributed", {"device": a.device, "where": where, "rows": rows})
    print(f"saved {path}")
