"""Streaming: RoPE against its formulas, StreamingLLM cache positions (the kernels turn each row's
query for its sinks) against a dense reference that rotates unrotated queries and keys by their
cache positions, and constant memory with a window that frees what falls out of scope."""
import math

import pytest
import torch

import pagedkv
from pagedkv import RoPE

H, HQ, D = 2, 4, 64


def rope_loop(x, pos, inv_freq, style):
    """The definition, one pair at a time, in float64."""
    out = x.double().clone()
    half = inv_freq.numel()
    for n in range(x.shape[0]):
        for i in range(half):
            a = float(pos[n]) * float(inv_freq[i])
            c, s = math.cos(a), math.sin(a)
            j, k = (i, i + half) if style == "neox" else (2 * i, 2 * i + 1)
            x0, x1 = x[n, :, j].double(), x[n, :, k].double()
            out[n, :, j], out[n, :, k] = x0 * c - x1 * s, x1 * c + x0 * s
    return out


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("scaling", [None, {"type": "linear", "factor": 4.0},
                                     {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}],
                         ids=["plain", "linear", "llama3"])
def test_rope_matches_its_definition(gen, style, scaling):
    r = RoPE(theta=10000.0, rotary_dim=48, style=style, scaling=scaling)
    x = torch.randn(5, 2, D, generator=gen, dtype=torch.float64)
    pos = torch.tensor([0.0, 1.0, 17.0, 300.0, -9.0], dtype=torch.float64)
    got = r.rotate(x, pos)
    want = rope_loop(x, pos, r.inv_freq(D), style)
    assert torch.allclose(got, want, atol=1e-10)
    assert torch.equal(got[..., 48:], x[..., 48:])  # dims past rotary_dim pass through
    # scores depend only on the distance; rotations add
    q, k = torch.randn(1, 1, D, generator=gen, dtype=torch.float64), torch.randn(1, 1, D, generator=gen, dtype=torch.float64)
    s1 = (r.rotate(q, torch.tensor([40.0])) * r.rotate(k, torch.tensor([7.0]))).sum()
    s2 = (r.rotate(q, torch.tensor([140.0])) * r.rotate(k, torch.tensor([107.0]))).sum()
    assert torch.allclose(s1, s2, atol=1e-9)
    assert torch.allclose(r.rotate(r.rotate(q, torch.tensor([5.0])), torch.tensor([-12.0])),
                          r.rotate(q, torch.tensor([-7.0])), atol=1e-10)


def test_rope_llama3_frequencies_match_transformers():
    tr = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    cfg = tr.LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=128, rope_parameters=params)
    theirs = LlamaRotaryEmbedding(cfg).inv_freq.double()
    ours = RoPE(theta=500000.0, scaling={k: v for k, v in params.items() if k != "rope_theta"} | {"type": "llama3"})
    assert torch.allclose(ours.inv_freq(128), theirs, rtol=1e-6)


def streaming_reference(q_raw, k_raw, v, rows_pos, window, sinks, rope):
    """Dense float64: each row at original position p attends to the sinks [0, min(S, w)) and its
    window [w, p], with positions counted in the cache: sinks 0.., then the window right after."""
    outs = []
    for r, p in enumerate(rows_pos):
        w = max(0, p - window + 1)
        kept = min(sinks, w)
        keys = list(range(kept)) + list(range(w, p + 1))
        cache_pos = torch.tensor([float(j) for j in range(kept)] + [float(kept + j - w) for j in range(w, p + 1)])
        qp = torch.tensor([float(kept + p - w)])
        qr = rope.rotate(q_raw[r:r + 1].double(), qp)[0]                   # [HQ, D]
        kr = rope.rotate(k_raw[keys].double(), cache_pos)                  # [n, H, D]
        kr = kr.repeat_interleave(HQ // H, 1)
        vv = v[keys].double().repeat_interleave(HQ // H, 1)
        s = torch.einsum("hd,nhd->hn", qr, kr) / math.sqrt(D)
        outs.append(torch.einsum("hn,nhd->hd", s.softmax(-1), vv))
    return torch.stack(outs)


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("window,sinks,bs", [(16, 4, 4), (13, 3, 4), (20, 5, 16)])
def test_cache_positions_match_streaming_reference(device, gen, style, window, sinks, bs):
    dtype = torch.float32 if device == "cpu" else torch.float16
    rope = RoPE(theta=10000.0, style=style)
    kv = pagedkv.PagedKV(num_layers=1, num_kv_heads=H, head_dim=D, block_size=bs, dtype=dtype, device=device,
                         device_blocks=64, window=window, sink_tokens=sinks, retain=False, rope=rope,
                         positions="cache")
    s = kv.add_sequence()
    total = 90
    k_raw = torch.randn(total, H, D, generator=gen, dtype=torch.float64)
    v = torch.randn(total, H, D, generator=gen, dtype=torch.float64)
    q_raw = torch.randn(total, HQ, D, generator=gen, dtype=torch.float64)
    k_stored = rope.rotate(k_raw, torch.arange(total, dtype=torch.float64))  # as the model stores them
    q_model = rope.rotate(q_raw, torch.arange(total, dtype=torch.float64))
    written = 0
    for n in [1, 2, 5, 1, 1, 3] * 6:  # decode and multi-token steps, many window slides
        if written + n > total:
            break
        sl = slice(written, written + n)
        kv.append([s], 0, k_stored[sl].to(dtype).to(device), v[sl].to(dtype).to(device))
        written += n
        got = kv.attend([s], 0, q_model[sl].to(dtype).to(device))
        want = streaming_reference(q_raw[sl], k_raw, v.to(dtype).double(),
                                   list(range(written - n, written)), window, sinks, rope)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        assert torch.allclose(got.double().cpu(), want, atol=tol, rtol=tol), f"after {written} tokens"
    assert kv.stats()["drops"] > 0


ROPES = [RoPE(theta=10000.0, rotary_dim=32, style="neox"),
         RoPE(theta=500000.0, style="gptj", scaling={"type": "linear", "factor": 4.0}),
         RoPE(theta=500000.0, rotary_dim=48, style="neox",
              scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 64})]


@pytest.mark.parametrize("rope", ROPES, ids=["partial", "gptj-linear", "partial-llama3"])
@pytest.mark.parametrize("window,sinks,bs", [(8, 4, 4), (19, 2, 16)])
def test_cache_positions_batched_with_scalings_and_partial_rotary(device, gen, rope, window, sinks, bs):
    """Two sequences in one call, different lengths and step sizes (rows of one step up to 17, so
    several m-tiles on CUDA), each row turned by its own shift."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    kv = pagedkv.PagedKV(num_layers=1, num_kv_heads=H, head_dim=D, block_size=bs, dtype=dtype, device=device,
                         device_blocks=64, window=window, sink_tokens=sinks, retain=False, rope=rope,
                         positions="cache")
    seqs = [kv.add_sequence(), kv.add_sequence()]
    total = 120
    raw = [[torch.randn(total, h, D, generator=gen, dtype=torch.float64) for h in (H, H, HQ)] for _ in seqs]
    written = [0, 0]
    for steps in [(1, 17), (3, 1), (17, 2), (1, 1), (5, 9), (1, 1), (2, 13)] * 3:
        if any(w + n > total for w, n in zip(written, steps)):
            break
        qs, wants = [], []
        for i, n in enumerate(steps):
            k_raw, v, q_raw = raw[i]
            sl = slice(written[i], written[i] + n)
            pos = torch.arange(written[i], written[i] + n, dtype=torch.float64)
            kv.append([seqs[i]], 0, rope.rotate(k_raw[sl], pos).to(dtype).to(device), v[sl].to(dtype).to(device))
            written[i] += n
            qs.append(rope.rotate(q_raw[sl], pos).to(dtype))
            wants.append(streaming_reference(q_raw[sl], k_raw, v.to(dtype).double(),
                                             list(range(written[i] - n, written[i])), window, sinks, rope))
        got = kv.attend(seqs, 0, torch.cat(qs).to(device), lengths=list(steps))
        tol = 1e-4 if dtype == torch.float32 else 4e-2
        assert torch.allclose(got.double().cpu(), torch.cat(wants), atol=tol, rtol=tol), f"after {written}"


def test_window_without_retention_keeps_memory_bounded():
    window, sinks, bs = 64, 4, 16
    kv = pagedkv.PagedKV(num_layers=2, num_kv_heads=1, head_dim=64, block_size=bs, dtype=torch.float16,
                         device="cpu", device_blocks=16, window=window, sink_tokens=sinks, retain=False)
    s = kv.add_sequence()
    bound = math.ceil((window + sinks) / bs) + 2
    rows = torch.randn(20000, 1, 64).half()
    peak = 0
    for t in range(20000):  # decode: one token at a time
        for layer in range(2):
            kv.append([s], layer, rows[t:t + 1], rows[t:t + 1])
        peak = max(peak, kv.stats()["device_blocks_used"])
    assert peak <= bound, peak
    assert kv.seq_len(s) == 20000
    kv.attend([s], 1, torch.randn(1, 2, 64).half())
