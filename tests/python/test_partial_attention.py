"""Partial attention as a first-class result: the engine's merge_partials combines partial
results by log-sum-exp (oracle: torch.logsumexp in float64), and pass-through attention (a scope
larger than the device and host tiers together, python/pagedkv/passthrough.py) built on it matches
dense float64 attention over the gathered keys."""
import math

import pytest
import torch

import pagedkv


def dense(q, k, v, scale):
    """q [hq, D], k/v [n, hkv, D] -> out [hq, D], lse [hq] (float64, causal over all n keys)."""
    group = q.shape[0] // k.shape[1]
    kk = k.double().repeat_interleave(group, dim=1)  # [n, hq, D]
    vv = v.double().repeat_interleave(group, dim=1)
    s = torch.einsum("hd,nhd->hn", q.double(), kk) * scale
    lse = torch.logsumexp(s, dim=1)
    return torch.einsum("hn,nhd->hd", torch.softmax(s, dim=1), vv), lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_partials_matches_logsumexp(dtype):
    kv = pagedkv.PagedKV(num_layers=1, num_kv_heads=2, head_dim=16, dtype=dtype, device="cpu", device_blocks=4)
    g = torch.Generator().manual_seed(0)
    parts, rows, heads = 3, 5, 4
    outs = torch.randn(parts, rows, heads, 16, generator=g).to(dtype)
    lses = torch.randn(parts, rows, heads, generator=g) * 3
    lses[1, 0, 0] = -math.inf  # a part that saw no key
    out = torch.full((rows, heads, 16), float("nan"), dtype=dtype)
    lse = torch.full((rows, heads), float("nan"))
    kv._engine.merge_partials(outs, lses, out, lse, 0)
    total = torch.logsumexp(lses.double(), dim=0)
    want = (torch.exp(lses.double() - total)[..., None] * outs.double()).sum(0)
    torch.testing.assert_close(lse.double(), total, atol=1e-5, rtol=1e-5)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.double(), want.to(dtype).double(), atol=tol, rtol=tol)


def test_merge_partials_checks_its_arguments():
    kv = pagedkv.PagedKV(num_layers=1, num_kv_heads=2, head_dim=16, dtype=torch.float32, device="cpu",
                         device_blocks=4)
    outs, lses = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="out"):
        kv._engine.merge_partials(outs, lses, torch.empty(3, 4, 15), None, 0)
    with pytest.raises(TypeError, match="lses"):
        kv._engine.merge_partials(outs, lses.half(), torch.empty(3, 4, 16), None, 0)


def test_pass_through_matches_dense_attention(tmp_path):
    kv = pagedkv.PagedKV(num_layers=2, num_kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32,
                         device="cpu", device_blocks=2, host_blocks=2, disk_blocks=64, disk_path=tmp_path)
    g = torch.Generator().manual_seed(1)
    s = kv.add_sequence()
    k, v = torch.randn(41, 2, 16, generator=g), torch.randn(41, 2, 16, generator=g)
    for i in range(0, 41, 5):  # 11 blocks: more than device and host hold together
        kv.append([s], 1, k[i:i + 5], v[i:i + 5])
    kv.check_invariants()
    q = torch.randn(1, 4, 16, generator=g)
    out, lse = kv.attend([s], 1, q, return_lse=True)
    kv.check_invariants()
    want, want_lse = dense(q[0], k, v, 1 / math.sqrt(16))
    torch.testing.assert_close(out[0].double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[0].double(), want_lse, atol=1e-5, rtol=1e-5)
