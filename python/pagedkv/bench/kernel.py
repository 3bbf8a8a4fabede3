"""`python -m pagedkv bench kernel`: paged decode attention against SDPA, FlashInfer and the copy
ceiling, in one run on one GPU.

Shape: bf16, 32 query heads, 8 KV heads, head_dim 128, block 16, one query token per sequence.
Figure of merit: KV bytes read per call over time (TB/s), beside the card's copy rate.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from ..cache import PagedKV
from .common import save
from .timing import copy_ceiling_tbs, gpu_time_us

ROWS = [(1, 32768), (8, 8192), (32, 8192), (64, 4096), (16, 32768), (4, 131072), (1, 131072),
        (128, 2048)]
HQ, HK, D, BS = 32, 8, 128, 16


def _filled_cache(batch: int, ctx: int, gen: torch.Generator):
    kv = PagedKV(num_layers=1, num_kv_heads=HK, head_dim=D, block_size=BS, dtype=torch.bfloat16,
                 device="cuda", device_blocks=batch * (ctx // BS + 1))
    seqs = [kv.add_sequence() for _ in range(batch)]
    chunk = max(1, 2**22 // (HK * D * batch))
    for start in range(0, ctx, chunk):
        n = min(chunk, ctx - start)
        k = torch.randn(batch * n, HK, D, device="cuda", generator=gen, dtype=torch.bfloat16)
        v = torch.randn(batch * n, HK, D, device="cuda", generator=gen, dtype=torch.bfloat16)
        kv.append(seqs, 0, k, v, lengths=[n] * batch)
    return kv, seqs


def _dense_kv(kv: PagedKV, seqs):
    ks, vs = zip(*(kv.gather(s, 0) for s in seqs))
    # [B, HK, L, D] contiguous, as SDPA wants it
    return torch.stack(ks).transpose(1, 2).contiguous(), torch.stack(vs).transpose(1, 2).contiguous()


def _sdpa_variants(q, k, v) -> dict:
    """Two ways to run GQA decode through SDPA on contiguous KV; the bench keeps the faster:
    each KV head's group of query heads as query rows, or SDPA's own enable_gqa."""
    b = q.shape[0]
    qg = q.view(b, HK, HQ // HK, D)
    q1 = q.view(b, HQ, 1, D)
    return {"rows": lambda: F.scaled_dot_product_attention(qg, k, v).view(b, HQ, D),
            "gqa": lambda: F.scaled_dot_product_attention(q1, k, v, enable_gqa=True).view(b, HQ, D)}


def _reference(q, k, v) -> torch.Tensor:
    """float64 oracle: [B, HQ, D]."""
    b = q.shape[0]
    qg = q.double().view(b, HK, HQ // HK, D)
    s = qg @ k.double().transpose(-1, -2) / math.sqrt(D)
    return (s.softmax(-1) @ v.double()).reshape(b, HQ, D)


def _flashinfer(kv: PagedKV, seqs, q, tensor_cores: bool):
    try:
        import flashinfer
    except Exception as e:  # noqa: BLE001 - any import failure means "peer absent"
        return None, f"flashinfer not importable: {type(e).__name__}: {e}"
    tables = [kv.block_table(s) for s in seqs]
    indices = torch.tensor([slot for t in tables for _, slot in t], dtype=torch.int32, device="cuda")
    indptr = torch.tensor([0, *itertools.accumulate(len(t) for t in tables)], dtype=torch.int32,
                          device="cuda")
    last = torch.tensor([(kv.seq_len(s) - 1) % BS + 1 for s in seqs], dtype=torch.int32, device="cuda")
    ws = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "HND", use_tensor_cores=tensor_cores)
    w.plan(indptr, indices, last, HQ, HK, D, BS, pos_encoding_mode="NONE",
           q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    cache = kv.pool[:, 0]  # [blocks, 2, HK, BS, D]: FlashInfer's HND paged layout, same memory
    return (lambda: w.run(q, cache)), None


def _err(out, ref) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def run_row(batch: int, ctx: int, gen: torch.Generator) -> dict:
    kv, seqs = _filled_cache(batch, ctx, gen)
    q = torch.randn(batch, HQ, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    kv_bytes = batch * ctx * HK * D * 2 * 2
    row = {"batch": batch, "context": ctx, "kv_bytes": kv_bytes}
    ours = lambda: kv.attend(seqs, 0, q)  # noqa: E731
    k, v = _dense_kv(kv, seqs)
    ref = _reference(q, k, v)
    row["pagedkv_us"] = gpu_time_us(ours)
    row["pagedkv_err"] = _err(ours(), ref)
    for name, fn in _sdpa_variants(q, k, v).items():
        row[f"sdpa_{name}_us"] = gpu_time_us(fn)
        row[f"sdpa_{name}_err"] = _err(fn(), ref)
    best = min(("rows", "gqa"), key=lambda n: row[f"sdpa_{n}_us"])
    row["sdpa_us"], row["sdpa_err"], row["sdpa_variant"] = row[f"sdpa_{best}_us"], row[f"sdpa_{best}_err"], best
    del k, v
    for name, tc in (("flashinfer_tc", True), ("flashinfer_cuda", False)):
        fn, why = _flashinfer(kv, seqs, q, tc)
        if fn is None:
            row[name + "_skipped"] = why
            continue
        row[name + "_us"] = gpu_time_us(fn)
        row[name + "_err"] = _err(fn(), ref)
    return row


def main(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench kernel needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    card = torch.cuda.get_device_name()
    ceiling = copy_ceiling_tbs()
    rows = [run_row(b, c, gen) for b, c in (ROWS if not args.quick else ROWS[:2])]
    print(f"paged decode attention, bf16, {HQ} q / {HK} kv heads, head_dim {D}, block {BS}, on {card}")
    print(f"copy ceiling (read + write): {ceiling:.2f} TB/s")
    hdr = (f"{'batch x ctx':>14} {'ours us':>8} {'TB/s':>5} {'%ceil':>5} {'sdpa us':>8} {'fi-tc us':>8} "
           f"{'fi-cc us':>8} {'vs sdpa':>7} {'vs fi':>6} {'err ours':>9} {'err fi':>9}")
    print(hdr)
    ratios_fi = []
    for r in rows:
        tbs = r["kv_bytes"] / (r["pagedkv_us"] * 1e-6) / 1e12
        fi = [r[k] for k in ("flashinfer_tc_us", "flashinfer_cuda_us") if k in r]
        best_fi = min(fi) if fi else float("nan")
        fi_err = min((r[k] for k in ("flashinfer_tc_err", "flashinfer_cuda_err") if k in r), default=float("nan"))
        r["ratio_vs_sdpa"] = r["sdpa_us"] / r["pagedkv_us"]
        r["ratio_vs_best_flashinfer"] = best_fi / r["pagedkv_us"]
        if fi:
            ratios_fi.append(r["ratio_vs_best_flashinfer"])
        print(f"{r['batch']:>5} x {r['context']:>6} {r['pagedkv_us']:>8.1f} {tbs:>5.2f} {100*tbs/ceiling:>5.0f} "
              f"{r['sdpa_us']:>8.1f} {r.get('flashinfer_tc_us', float('nan')):>8.1f} "
              f"{r.get('flashinfer_cuda_us', float('nan')):>8.1f} {r['ratio_vs_sdpa']:>6.2f}x "
              f"{r['ratio_vs_best_flashinfer']:>5.2f}x {r['pagedkv_err']:>9.2e} {fi_err:>9.2e}")
    geo = math.exp(sum(map(math.log, ratios_fi)) / len(ratios_fi)) if ratios_fi else float("nan")
    print(f"geometric mean vs the faster FlashInfer path: {geo:.3f}x")
    for r in rows:
        for k in ("flashinfer_tc_skipped", "flashinfer_cuda_skipped"):
            if k in r:
                print(f"  note: {k}: {r[k]}")
                break
    path = save("kernel", {"card": card, "copy_ceiling_tbs": ceiling, "rows": rows, "geomean_vs_flashinfer": geo})
    print(f"saved {path}")
