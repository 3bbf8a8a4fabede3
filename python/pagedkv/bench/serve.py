"""`python -m pagedkv bench serve`: chat sessions whose KV is several times the device tier,
returning with Zipf-like popularity. Per policy: device hit rate, bytes moved, tokens/s, beside
the same workload on an unlimited device tier, in one run.

A round picks `batch` distinct sessions by popularity, appends a user turn of `turn` tokens
(chunked-prefill attention over its rows) and decodes `new` tokens for the batch, while the next
round's sessions are prefetched. The device tier is a fraction of the total KV (`--tiers`).

Hit rate: of the blocks each round's sessions hold when the round is chosen, the share that did
not have to come up from a lower tier (as a serving system counts KV-cache hits per request).
The engine's own `device_hits` count every attend's lookups and read far higher.
"""
from __future__ import annotations

import gc
import random
import time

import torch

from ..cache import PagedKV
from ..policies import LRU, Hybrid, Window
from ..steps import DecodeSteps
from .common import save


def _zipf_pick(rng: random.Random, weights: list[float], k: int) -> list[int]:
    chosen: set[int] = set()
    while len(chosen) < k:
        chosen.add(rng.choices(range(len(weights)), weights)[0])
    return sorted(chosen)


def run_one(policy, device_blocks: int, host_blocks: int, a) -> dict:
    dev = a.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    kv = PagedKV(num_layers=a.layers, num_kv_heads=a.kv_heads, head_dim=a.head_dim, block_size=16,
                 dtype=dtype, device=dev, device_blocks=device_blocks, host_blocks=host_blocks,
                 policy=policy)
    gen = torch.Generator(device=dev).manual_seed(0)
    rng = random.Random(0)
    weights = [1.0 / (i + 1) ** a.zipf for i in range(a.sessions)]
    sessions = [kv.add_sequence() for _ in range(a.sessions)]
    ctx = torch.randn(a.context, a.kv_heads, a.head_dim, generator=gen, device=dev).to(dtype)
    for s in sessions:
        for layer in range(a.layers):
            kv.append([s], layer, ctx, ctx)
    hq = 4 * a.kv_heads
    turn_q = torch.randn(a.batch * a.turn, hq, a.head_dim, generator=gen, device=dev).to(dtype)
    turn_kv = torch.randn(a.batch * a.turn, a.kv_heads, a.head_dim, generator=gen, device=dev).to(dtype)
    step_q = torch.randn(a.batch, hq, a.head_dim, generator=gen, device=dev).to(dtype)
    step_kv = torch.randn(a.batch, a.kv_heads, a.head_dim, generator=gen, device=dev).to(dtype)

    def decode_layers(batch):
        for layer in range(a.layers):
            kv.append(batch, layer, step_kv, step_kv)
            kv.attend(batch, layer, step_q)

    steps = DecodeSteps(kv, decode_layers, hq, graph=a.decode == "graph")
    start = kv.stats()
    if dev == "cuda":
        torch.cuda.synchronize()
    gc.collect()  # an earlier run's engine must not be freed (pinned memory unmapped) while timing
    gc.disable()
    t0 = time.perf_counter()
    tokens = requested = 0
    batches = [[sessions[i] for i in _zipf_pick(rng, weights, a.batch)] for _ in range(a.rounds + 1)]
    kv.prefetch(batches[0])
    for r in range(a.rounds):
        batch = batches[r]
        requested += sum(len(kv.block_table(s)) for s in batch)
        for layer in range(a.layers):
            kv.append(batch, layer, turn_kv, turn_kv)
            kv.attend(batch, layer, turn_q)
        kv.prefetch(batches[r + 1])  # the next round's sessions come up while this one decodes
        for _ in range(a.new):
            if a.decode == "plain":  # every layer's call plans for itself
                decode_layers(batch)
            else:
                steps.step(batch)
        if a.decode != "plain":
            steps.close()
        tokens += a.batch * (a.turn + a.new)
    if dev == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    gc.enable()
    end = kv.stats()
    d = {k: end[k] - start[k] for k in ("device_hits", "device_misses", "bytes_to_host", "bytes_from_host",
                                         "bytes_to_disk", "bytes_from_disk", "evictions")}
    looked = d["device_hits"] + d["device_misses"]
    fetched = end["blocks_from_host"] - start["blocks_from_host"]
    kv.check_invariants()
    del kv
    gc.collect()
    return {"tokens_per_s": tokens / secs, "captures": steps.captures, "seconds": secs,
            "hit_rate": max(0.0, 1 - fetched / max(requested, 1)),
            "lookup_hit_rate": d["device_hits"] / max(looked, 1), "blocks_requested": requested,
            "blocks_fetched": fetched, "bytes_moved": d["bytes_to_host"] + d["bytes_from_host"], **d}


POLICIES = (("lru", LRU), ("window", lambda: Window(recent_blocks=4, sink_blocks=1)), ("hybrid", Hybrid))


def main(a) -> None:
    if not 0 < a.batch <= a.sessions:
        raise SystemExit(f"bench serve: --batch ({a.batch}) must be between 1 and --sessions ({a.sessions}): "
                         "a round takes that many distinct sessions")
    total = a.sessions * ((a.context + a.rounds * (a.turn + a.new)) // 16 + 2) + 64
    card = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    run_one("lru", total, 64, a)  # warm-up: kernels, allocator and clocks settle before timing
    print(f"serve on {card}: {a.sessions} sessions x {a.context} tokens, Zipf {a.zipf}, batch {a.batch}, "
          f"turn {a.turn} + {a.new} new, {a.rounds} rounds, decode steps {a.decode}; best of {a.repeats} paired runs")
    print(f"  {'device tier':<14}{'policy':<8}{'hit rate':>9}{'lookups':>9}{'GiB moved':>10}{'tok/s':>10}"
          f"{'unlimited':>10}{'ratio':>8}")
    # The loop is host-bound at small batches, and the machine's speed drifts between runs by more
    # than the tiers cost; so each tiered run is paired with an unlimited-tier run of the same
    # policy right before it (every lookup a hit), and each side keeps its best of the repeats.
    results = {"tiers": []}
    for ratio in [float(x) for x in a.tiers.split(",")]:
        device_blocks = max(int(total / ratio), 64)
        for name, make in POLICIES:
            base = r = None
            for _ in range(a.repeats):
                u = run_one(make(), total, 64, a)
                t = run_one(make(), device_blocks, total - device_blocks + 64, a)
                base = u if base is None or u["tokens_per_s"] > base["tokens_per_s"] else base
                r = t if r is None or t["tokens_per_s"] > r["tokens_per_s"] else r
            r.update(policy=name, device_fraction=1 / ratio, device_blocks=device_blocks,
                     unlimited_tokens_per_s=base["tokens_per_s"], vs_unlimited=r["tokens_per_s"] / base["tokens_per_s"])
            results["tiers"].append(r)
            print(f"  {f'1/{ratio:g} of KV':<14}{name:<8}{r['hit_rate']:>9.3f}{r['lookup_hit_rate']:>9.3f}"
                  f"{r['bytes_moved'] / 2**30:>10.2f}{r['tokens_per_s']:>10.1f}{base['tokens_per_s']:>10.1f}"
                  f"{r['vs_unlimited']:>7.2f}x", flush=True)
    cfg = {k: v for k, v in vars(a).items() if k != "func"}
    print(f"  saved {save('serve', {'card': card, 'config': cfg, 'results': results})}")
