"""The CUDA kernels against the C++ CPU reference on identical pages: the same random appends go
into a CUDA cache and a CPU cache, and attend must agree within the half-precision tolerance."""
import itertools

import pytest
import torch

import pagedkv
from reference import randn

CASES = list(itertools.product(
    [torch.float16, torch.bfloat16],
    [(64, 1), (80, 5), (96, 7), (128, 4), (256, 2)],   # (head_dim, GQA group)
    [1, 16, 32],                                       # block size
    [(None, 0), (40, 4), (33, 0)],                     # (window, sinks)
))[::3]


def _same_attention(caches, gen, dtype, hk, d, group, lens, q_lens):
    """Appends the same random K/V to the CPU cache and the CUDA cache (2 layers), then checks
    that layer 1's attention (and its LSE) agree for the newest q_lens rows of each sequence."""
    seqs = [[kv.add_sequence() for _ in lens] for kv in caches]
    for layer in (0, 1):
        rows = randn(gen, (sum(lens), hk, d), dtype, "cpu")
        vals = randn(gen, (sum(lens), hk, d), dtype, "cpu")
        for kv, s in zip(caches, seqs):
            kv.append(s, layer, rows.to(kv.device), vals.to(kv.device), lengths=lens)
    q = randn(gen, (sum(q_lens), hk * group, d), dtype, "cpu")
    ref, ref_lse = caches[0].attend(seqs[0], 1, q, lengths=q_lens, return_lse=True)
    got, got_lse = caches[1].attend(seqs[1], 1, q.cuda(), lengths=q_lens, return_lse=True)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    assert torch.allclose(got.float().cpu(), ref.float(), atol=tol, rtol=tol)
    assert torch.allclose(got_lse.cpu(), ref_lse, atol=2e-3, rtol=2e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,hd_group,bs,scope", CASES,
                         ids=[f"{str(c[0])[6:]}-d{c[1][0]}g{c[1][1]}-bs{c[2]}-w{c[3][0]}s{c[3][1]}" for c in CASES])
def test_cuda_matches_cpu_reference(cuda, gen, dtype, hd_group, bs, scope):
    d, group = hd_group
    window, sinks = scope
    hk = 2
    caches = [pagedkv.PagedKV(num_layers=2, num_kv_heads=hk, head_dim=d, block_size=bs, dtype=dtype,
                              device=dev, device_blocks=512, window=window, sink_tokens=sinks)
              for dev in ("cpu", "cuda")]
    _same_attention(caches, gen, dtype, hk, d, group, lens=[1, 17, 97, 300], q_lens=[1, 3, 1, 5])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,group,bs,rope", [
    (128, 4, 16, pagedkv.RoPE(theta=500000.0, style="neox")),
    (64, 5, 3, pagedkv.RoPE(theta=10000.0, rotary_dim=32, style="gptj", scaling={"type": "linear", "factor": 2.0})),
    (256, 2, 32, pagedkv.RoPE(theta=10000.0, rotary_dim=192, style="neox")),
], ids=["d128-neox", "d64-gptj-partial", "d256-partial"])
def test_cuda_matches_cpu_reference_with_cache_positions(cuda, gen, dtype, d, group, bs, rope):
    """positions="cache": the kernels' sink rotation against the CPU reference's, decode and
    multi-token rows of several sequences, windows that have slid past the sinks or not yet."""
    hk, window, sinks = 2, 40, 5
    caches = [pagedkv.PagedKV(num_layers=2, num_kv_heads=hk, head_dim=d, block_size=bs, dtype=dtype,
                              device=dev, device_blocks=512, window=window, sink_tokens=sinks, rope=rope,
                              positions="cache")
              for dev in ("cpu", "cuda")]
    _same_attention(caches, gen, dtype, hk, d, group, lens=[1, 17, 44, 97, 300], q_lens=[1, 3, 9, 1, 20])
