"""`python -m pagedkv bench prefill`: multi-token (prefill / append) paged attention against
FlashInfer's paged prefill on the very same pages, FlashInfer's contiguous single prefill and
torch SDPA, in one run on one GPU.

Shape: bf16, 32 query heads, 8 KV heads, head_dim 128, block 16, causal. A row (B, L, n) is B
sequences of L cached tokens whose last n are the new query rows: row i of n sees the first
L - n + i + 1 keys. FLOPs = 4 * heads * head_dim * (keys seen, summed over query rows).
Errors: relative Frobenius error against a float64 oracle on a random subset of query rows.
"""
from __future__ import annotations

import gc
import itertools
import math
import random
import time

import torch
import torch.nn.functional as F

from .common import save
from .timing import gpu_time_us

HQ, HK, D, BS = 32, 8, 128, 16
ROWS = [(1, 8192, 2048), (1, 32768, 4096), (1, 131072, 4096), (4, 16384, 1024), (8, 4096, 4096),
        (32, 8192, 8), (64, 4096, 4), (1, 131072, 16384)]
ORACLE_ROWS = 64        # query rows (all heads) checked against float64
LONG_CALL_MS = 5.0      # calls longer than this are timed one per graph, with fewer repeats
LONG_BUDGET_MS = 1500.0  # about this much timed replay per implementation and row
SDPA_MAX_ERR = 2e-2     # an SDPA variant further than this from the oracle is not "the SDPA figure"
PEERS = ("flashinfer_fa3", "flashinfer_fa2", "flashinfer_single", "sdpa")


# -- pure helpers (tested on the CPU) ---------------------------------------------------------
def parse_rows(text: str | None, quick: bool = False) -> list[tuple[int, int, int]]:
    """--rows "B,L,n;B,L,n" (or the default table, its first two rows with --quick)."""
    if not text:
        return ROWS[:2] if quick else list(ROWS)
    rows = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        try:
            b, l, n = (int(x) for x in part.split(","))
        except ValueError:
            raise ValueError(f"--rows: {part!r} is not three integers B,L,n") from None
        if b < 1 or n < 1 or l < n:
            raise ValueError(f"--rows: {part!r} needs B >= 1 and 1 <= n <= L")
        rows.append((b, l, n))
    if not rows:
        raise ValueError(f"--rows: no row in {text!r}")
    return rows


def keys_seen(ctx: int, new: int) -> int:
    """Keys attended by the last `new` query rows of one causal sequence of `ctx` tokens."""
    return new * (ctx - new) + new * (new + 1) // 2


def flops(batch: int, ctx: int, new: int) -> int:
    return 4 * HQ * D * batch * keys_seen(ctx, new)


def tflops(batch: int, ctx: int, new: int, us: float) -> float:
    return flops(batch, ctx, new) / (us * 1e-6) / 1e12


def oracle_picks(batch: int, new: int, count: int = ORACLE_ROWS, seed: int = 0) -> list[tuple[int, int]]:
    """(sequence, new-row index) pairs checked against float64: all of them, or `count` at random."""
    total = batch * new
    picks = range(total) if total <= count else sorted(random.Random(seed).sample(range(total), count))
    return [divmod(r, new) for r in picks]


def geomean(xs) -> float:
    xs = [x for x in xs if x == x and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


# -- GPU side ---------------------------------------------------------------------------------
def _time_us(fn) -> tuple[float, float, str]:
    """(µs per call, seconds of the first (untimed) call, "graph" or "eager")."""
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end)
    if ms <= LONG_CALL_MS:
        kw = {}
    else:
        kw = dict(calls_per_graph=1, repeats=max(3, min(15, int(LONG_BUDGET_MS / ms))), warmup=1)
    try:
        return gpu_time_us(fn, **kw), first, "graph"
    except Exception:  # noqa: BLE001 - not capturable: median of eager calls, each timed with events
        torch.cuda.synchronize()
        samples = []
        for _ in range(kw.get("repeats", 15)):
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        return sorted(samples)[len(samples) // 2], first, "eager"


def _filled_cache(kv_cls, k_all, v_all, new: int):
    """A cache holding k_all/v_all ([B, L, HK, D]): the first L - new tokens in interleaved chunks
    (as a serving loop would grow them), then the new ones in one append."""
    batch, ctx = k_all.shape[:2]
    kv = kv_cls(num_layers=1, num_kv_heads=HK, head_dim=D, block_size=BS, dtype=torch.bfloat16,
                device=k_all.device, device_blocks=batch * (ctx // BS + 1))
    seqs = [kv.add_sequence() for _ in range(batch)]
    chunk = max(1, 2**22 // (HK * D * batch))
    bounds = [(s, min(s + chunk, ctx - new)) for s in range(0, ctx - new, chunk)] + [(ctx - new, ctx)]
    for a, b in bounds:
        k = k_all[:, a:b].reshape(-1, HK, D).contiguous()
        v = v_all[:, a:b].reshape(-1, HK, D).contiguous()
        kv.append(seqs, 0, k, v, lengths=[b - a] * batch)
    return kv, seqs


def _oracle(q, k_all, v_all, picks, new: int) -> torch.Tensor:
    """float64 attention of the picked rows: [len(picks), HQ, D]."""
    ctx = k_all.shape[1]
    out = []
    for b, group in itertools.groupby(picks, key=lambda p: p[0]):
        kd, vd = (t[b].double().transpose(0, 1).contiguous() for t in (k_all, v_all))  # [HK, L, D]
        for _, i in group:
            s = ctx - new + i + 1
            qd = q[b * new + i].double().view(HK, HQ // HK, D)
            p = (qd @ kd[:, :s].transpose(-1, -2) / math.sqrt(D)).softmax(-1)
            out.append((p @ vd[:, :s]).reshape(HQ, D))
        del kd, vd
    return torch.stack(out)


def _flashinfer_paged(kv, seqs, q, new: int, backend: str):
    import flashinfer

    tables = [kv.block_table(s) for s in seqs]
    indices = torch.tensor([slot for t in tables for _, slot in t], dtype=torch.int32, device="cuda")
    kv_indptr = torch.tensor([0, *itertools.accumulate(len(t) for t in tables)], dtype=torch.int32, device="cuda")
    last = torch.tensor([(kv.seq_len(s) - 1) % BS + 1 for s in seqs], dtype=torch.int32, device="cuda")
    qo_indptr = torch.arange(0, (len(seqs) + 1) * new, new, dtype=torch.int32, device="cuda")
    ws = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "HND", backend=backend)
    w.plan(qo_indptr, kv_indptr, indices, last, HQ, HK, D, BS, causal=True,
           q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    cache = kv.pool[:, 0]  # [blocks, 2, HK, BS, D]: FlashInfer's HND paged layout, the same memory
    return lambda: w.run(q, cache)


def _flashinfer_single(q, k, v):
    import flashinfer

    return lambda: flashinfer.single_prefill_with_kv_cache(q, k, v, causal=True, kv_layout="NHD")


def _sdpa_variants(q, k, v) -> dict:
    """SDPA with the causal mask aligned bottom-right (is_causal=True is top-left: wrong for n < L):
    SDPA's own GQA, or K/V repeated to every query head beforehand. Outputs [n, HQ, D]."""
    from torch.nn.attention.bias import causal_lower_right

    new, ctx = q.shape[0], k.shape[0]
    mask = causal_lower_right(new, ctx)
    qs = q.transpose(0, 1).unsqueeze(0).contiguous()                       # [1, HQ, n, D]
    ks, vs = (t.transpose(0, 1).unsqueeze(0).contiguous() for t in (k, v))  # [1, HK, L, D]
    kr, vr = (t.repeat_interleave(HQ // HK, dim=1) for t in (ks, vs))       # [1, HQ, L, D]
    sdpa = F.scaled_dot_product_attention
    return {"gqa": lambda: sdpa(qs, ks, vs, attn_mask=mask, enable_gqa=True)[0].transpose(0, 1),
            "repeat": lambda: sdpa(qs, kr, vr, attn_mask=mask)[0].transpose(0, 1)}


def _measure(name: str, make, idx, ref, shape) -> dict:
    """Times the function `make()` returns: {name_us, name_tflops, name_err, ...}, or
    {name_skipped: why} when the peer is absent or refuses the shape."""
    t0 = time.perf_counter()
    try:
        fn = make()  # FlashInfer builds its kernels (JIT) in plan(), here
        made = time.perf_counter() - t0
        us, first, how = _time_us(fn)
        err = float((fn()[idx].double() - ref).norm() / ref.norm())
    except Exception as e:  # noqa: BLE001 - a peer that fails is recorded, not fatal
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - a sticky CUDA error: the next measurement will say so too
            pass
        return {name + "_skipped": f"{type(e).__name__}: {e}"[:400]}
    return {name + "_us": us, name + "_tflops": tflops(*shape, us), name + "_err": err,
            name + "_setup_s": round(made + first, 2), name + "_timing": how}


def _best_sdpa(variants: dict) -> dict:
    ok = [n for n in ("gqa", "repeat") if variants.get(n + "_err", 1.0) <= SDPA_MAX_ERR]
    if not ok:
        return {"sdpa_skipped": "no SDPA variant within the error bound: " + "; ".join(
            f"{n}: {variants.get(n + '_skipped', variants.get(n + '_err'))}" for n in ("gqa", "repeat"))}
    best = min(ok, key=lambda n: variants[n + "_us"])
    return {"sdpa_variant": best, **{"sdpa_" + f: variants[f"{best}_{f}"] for f in ("us", "tflops", "err", "timing")}}


def run_row(batch: int, ctx: int, new: int, gen: torch.Generator) -> dict:
    from ..cache import PagedKV

    shape = (batch, ctx, new)
    k_all = torch.randn(batch, ctx, HK, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    v_all = torch.randn(batch, ctx, HK, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    q = torch.randn(batch * new, HQ, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    kv, seqs = _filled_cache(PagedKV, k_all, v_all, new)
    picks = oracle_picks(batch, new)
    idx = torch.tensor([b * new + i for b, i in picks], device="cuda")
    ref = _oracle(q, k_all, v_all, picks, new)
    row = {"batch": batch, "context": ctx, "new": new, "flops": flops(*shape), "oracle_rows": len(picks)}
    row.update(_measure("pagedkv", lambda: (lambda: kv.attend(seqs, 0, q, lengths=[new] * batch)), idx, ref, shape))
    for backend in ("fa3", "fa2"):
        row.update(_measure("flashinfer_" + backend, lambda: _flashinfer_paged(kv, seqs, q, new, backend),
                            idx, ref, shape))
    if batch == 1:  # the contiguous peers: what paging costs
        k, v = k_all[0], v_all[0]  # [L, HK, D], contiguous
        row.update(_measure("flashinfer_single", lambda: _flashinfer_single(q, k, v), idx, ref, shape))
        variants = {}
        for name, fn in _sdpa_variants(q, k, v).items():
            variants.update(_measure(name, lambda fn=fn: fn, idx, ref, shape))
        row["sdpa_variants"] = variants
        row.update(_best_sdpa(variants))
    if "pagedkv_us" in row:
        for p in PEERS:
            if p + "_us" in row:
                row["ratio_vs_" + p] = row[p + "_us"] / row["pagedkv_us"]
        paged = [row[p + "_us"] for p in ("flashinfer_fa3", "flashinfer_fa2") if p + "_us" in row]
        if paged:
            row["ratio_vs_best_flashinfer_paged"] = min(paged) / row["pagedkv_us"]
    del kv, k_all, v_all, q, ref
    gc.collect()
    torch.cuda.empty_cache()
    return row


def _cell(x, width: int, spec: str) -> str:
    return format(x, f">{width}{spec}") if isinstance(x, (int, float)) else "-".rjust(width)


def table_line(r: dict) -> str:
    """One printed row of the table (values absent where a peer did not run: "-")."""
    cells = [f"{r['batch']:>3} x {r['context']:>6} n{r['new']:<5}", _cell(r.get("pagedkv_us"), 9, ".1f"),
             _cell(r.get("pagedkv_tflops"), 6, ".0f")]
    cells += [_cell(r.get(p + "_us"), 9, ".1f") for p in PEERS]
    cells += [_cell(r.get("ratio_vs_best_flashinfer_paged"), 8, ".2f"),
              _cell(r.get("ratio_vs_flashinfer_single"), 7, ".2f"), _cell(r.get("ratio_vs_sdpa"), 7, ".2f")]
    cells += [_cell(r.get(p + "_err"), 8, ".1e") for p in ("pagedkv", *PEERS)]
    return " ".join(cells)


HEADER = (f"{'B x L, n new':<20} {'ours us':>9} {'TF/s':>6} {'fi-fa3':>9} {'fi-fa2':>9} {'fi-single':>9} "
          f"{'sdpa':>9} {'vs fi-pg':>8} {'vs sgl':>7} {'vs sdpa':>7} {'err ours':>8} {'err fa3':>8} "
          f"{'err fa2':>8} {'err sgl':>8} {'err sdpa':>8}")


def main(args) -> None:
    try:
        rows = parse_rows(getattr(args, "rows", None), getattr(args, "quick", False))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    from .. import cuda_available

    if not (torch.cuda.is_available() and cuda_available()):
        raise SystemExit("bench prefill needs a CUDA GPU and a CUDA build of pagedkv "
                         f"(torch.cuda.is_available()={torch.cuda.is_available()}, "
                         f"pagedkv.cuda_available()={cuda_available()})")
    gen = torch.Generator(device="cuda").manual_seed(0)
    card = torch.cuda.get_device_name()
    print(f"paged prefill attention, bf16, {HQ} q / {HK} kv heads, head_dim {D}, block {BS}, causal, on {card}")
    print("µs per call (median), TF/s = 4*heads*head_dim*sum(keys seen)/time; ratios = peer µs / ours "
          "(>1: ours faster); errors on", ORACLE_ROWS, "random query rows vs float64")
    print(HEADER)
    results = []
    for b, l, n in rows:
        results.append(run_row(b, l, n, gen))
        print(table_line(results[-1]), flush=True)
    geo = geomean(r.get("ratio_vs_best_flashinfer_paged", float("nan")) for r in results)
    print(f"geometric mean vs the faster FlashInfer paged path: {geo:.3f}x")
    for r in results:
        for p in ("pagedkv", *PEERS):
            if p + "_skipped" in r:
                print(f"  note: {r['batch']}x{r['context']} n{r['new']}: {p} skipped: {r[p + '_skipped']}")
            if r.get(p + "_setup_s", 0) > 10:
                print(f"  note: {r['batch']}x{r['context']} n{r['new']}: {p} setup (plan, JIT build, first call) "
                      f"took {r[p + '_setup_s']} s")
            if r.get(p + "_timing") == "eager":
                print(f"  note: {r['batch']}x{r['context']} n{r['new']}: {p} not capturable in a CUDA graph, "
                      "timed eagerly")
    path = save("prefill", {"card": card, "shape": {"q_heads": HQ, "kv_heads": HK, "head_dim": D, "block_size": BS,
                                                    "dtype": "bfloat16", "causal": True},
                            "rows": results, "geomean_vs_best_flashinfer_paged": geo})
    print(f"saved {path}")
