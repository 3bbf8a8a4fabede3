"""`python -m pagedkv bench longctx`: a decode loop over a Llama-2-7B-shaped attention stack
(32 layers, 32 heads, head_dim 128, fp16: 512 KiB of K/V per token) at growing contexts, for
  (a) full attention with a device tier large enough, where it fits;
  (b) full attention with a 16 GiB device tier and the rest on the pinned host tier, as far
      as the host holds;
  (c) window 4096 + 4 sinks, retain=False (out-of-scope blocks freed);
  (d) the same with retain=True (out-of-scope blocks kept in the lower tiers: the host tier, then
      the disk tier with --disk-gib; 1M tokens retained are 512 GiB).
Per context: device memory in use (from the driver), host memory (RSS), decode tokens/s.
Writes JSON and, when matplotlib is there, a PNG of memory and tokens/s against context.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from ..cache import PagedKV
from ..rope import RoPE
from .common import device_used_bytes, save

SHAPE = dict(num_layers=32, num_kv_heads=32, head_dim=128, block_size=16, dtype=torch.float16)


def _host_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


BLOCK_BYTES = (SHAPE["num_layers"] * 2 * SHAPE["num_kv_heads"] * SHAPE["block_size"] * SHAPE["head_dim"]
               * 2)


def _reach(mode: str, batch: int, a) -> int:
    """The largest context (tokens per sequence) a mode can hold, from the tiers it is given."""
    if mode == "a":
        gib = a.full_gib
    elif mode == "b":
        gib = a.device_gib + a.host_gib
    elif mode == "d":
        gib = a.host_gib + a.disk_gib
    else:
        return 1 << 62  # constant memory
    return int(gib * 2**30) // BLOCK_BYTES * SHAPE["block_size"] // batch


def _cache(mode: str, batch: int, max_ctx: int, a) -> PagedKV:
    per_seq = max_ctx // SHAPE["block_size"] + 4
    if mode == "a":
        return PagedKV(**SHAPE, device=a.device, device_blocks=batch * per_seq)
    if mode == "b":
        dev = int(a.device_gib * 2**30) // BLOCK_BYTES
        return PagedKV(**SHAPE, device=a.device, device_blocks=dev,
                       host_blocks=max(batch * per_seq - dev, 1))
    # the scope, plus a growth chunk of rows, plus the chunk layer 0 wrote before the last layer did
    scope_blocks = batch * ((a.window + a.sinks + 2 * a.chunk) // SHAPE["block_size"] + 6)
    # --positions cache: StreamingLLM positions, the kernel turning the query for the sink chunks
    stream = dict(rope=RoPE(theta=10000.0), positions="cache") if a.positions == "cache" else {}
    if mode == "c":
        return PagedKV(**SHAPE, device=a.device, device_blocks=scope_blocks, window=a.window,
                       sink_tokens=a.sinks, retain=False, **stream)
    host = min(batch * per_seq, int(a.host_gib * 2**30) // BLOCK_BYTES)
    disk = min(max(batch * per_seq - host, 0), int(a.disk_gib * 2**30) // BLOCK_BYTES)
    return PagedKV(**SHAPE, device=a.device, device_blocks=scope_blocks, host_blocks=host,
                   disk_blocks=disk, disk_path=(a.disk_path or tempfile.gettempdir()) if disk else None,
                   window=a.window, sink_tokens=a.sinks, retain=True, **stream)


def run_mode(mode: str, batch: int, contexts: list[int], a) -> list[dict]:
    """Grows one cache through the contexts in order, timing decode steps at each."""
    reach = min(_reach(mode, batch, a), a.token_budget // batch)
    if mode in ("b", "d") and reach < max(contexts):  # also the largest context the tiers hold
        contexts = contexts + [reach // a.chunk * a.chunk]
    rows = [{"mode": mode, "batch": batch, "context": c,
             "skipped": f"beyond this mode's reach ({reach} tokens per sequence: tiers or --token-budget)"}
            for c in contexts if c > reach]
    contexts = [c for c in contexts if c <= reach]
    if not contexts:
        return rows
    try:
        kv = _cache(mode, batch, max(contexts), a)
    except (MemoryError, RuntimeError, ValueError) as e:
        return rows + [{"mode": mode, "batch": batch, "context": c, "skipped": str(e)}
                       for c in contexts]
    dev = a.device
    gen = torch.Generator(device=dev).manual_seed(0)
    seqs = [kv.add_sequence() for _ in range(batch)]
    hk, d, hq = SHAPE["num_kv_heads"], SHAPE["head_dim"], SHAPE["num_kv_heads"]
    fill = torch.randn(batch * a.chunk, hk, d, generator=gen, device=dev).half()
    step_kv = torch.randn(batch, hk, d, generator=gen, device=dev).half()
    q = torch.randn(batch, hq, d, generator=gen, device=dev).half()
    reached, stopped = 0, None
    for ctx in sorted(contexts):
        if stopped:
            rows.append({"mode": mode, "batch": batch, "context": ctx, "skipped": stopped})
            continue
        try:
            while reached < ctx - a.steps:
                n = min(a.chunk, ctx - a.steps - reached)
                for layer in range(SHAPE["num_layers"]):
                    kv.append(seqs, layer, fill[: batch * n], fill[: batch * n])
                reached += n
            def step():
                for layer in range(SHAPE["num_layers"]):
                    kv.append(seqs, layer, step_kv, step_kv)
                    kv.attend(seqs, layer, q)

            step()  # untimed: the first step after growing rebuilds the block table
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            staged0 = kv.stats()["bytes_staged"]
            t0 = time.perf_counter()
            for _ in range(a.steps - 1):
                step()
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            secs = time.perf_counter() - t0
            reached += a.steps
        except (MemoryError, RuntimeError) as e:  # the tiers are full: the largest context is the last row
            stopped = f"stopped at {reached} tokens: {e}"
            rows.append({"mode": mode, "batch": batch, "context": ctx, "skipped": stopped})
            print(f"  ({mode}) batch {batch} ctx {ctx:>8}: {stopped}", flush=True)
            continue
        s = kv.stats()
        rows.append({"mode": mode, "batch": batch, "context": ctx, "tokens_per_s": (a.steps - 1) * batch / secs,
                     "device_gib": device_used_bytes(dev) / 2**30, "host_gib": _host_gib(),
                     "device_blocks": s["device_blocks_used"], "host_blocks": s["host_blocks_used"],
                     "drops": s["drops"], "staged_gb_s": (s["bytes_staged"] - staged0) / secs / 1e9})
        print(f"  ({mode}) batch {batch} ctx {ctx:>8}: {rows[-1]['tokens_per_s']:9.1f} tok/s, device "
              f"{rows[-1]['device_gib']:7.2f} GiB, host {rows[-1]['host_gib']:7.2f} GiB", flush=True)
    del kv
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    return sorted(rows, key=lambda r: r["context"])


def plot(rows: list[dict], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (mem, tps) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({(r["mode"], r["batch"]) for r in rows}):
        pts = [r for r in rows if (r["mode"], r["batch"]) == key and "tokens_per_s" in r]
        if not pts:
            continue
        label = f"({key[0]}) batch {key[1]}"
        mem.plot([p["context"] for p in pts], [p["device_gib"] for p in pts], marker="o", label=label)
        tps.plot([p["context"] for p in pts], [p["tokens_per_s"] for p in pts], marker="o", label=label)
    for ax, name in ((mem, "device memory in use (GiB, driver)"), (tps, "decode tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    tps.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(a) -> None:
    contexts = [int(x) for x in a.contexts.split(",")]
    rows = []
    for batch in [int(b) for b in a.batches.split(",")]:
        for mode in a.modes.split(","):
            rows += run_mode(mode, batch, contexts, a)
    card = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    out = save("longctx", {"card": card, "config": {k: v for k, v in vars(a).items() if k != "func"}, "rows": rows})
    png = plot(rows, os.path.splitext(str(out))[0] + ".png")
    print(f"  saved {out}" + (f" and {png}" if png else ""))
