"""Multi-token attention on the GPU (chunked prefill, continuation prompts, window prefill), where
Hopper takes the tensor-core kernel: against the C++ CPU reference on identical pages, and in
float64 against a dense oracle over the gathered keys."""
import itertools

import pytest
import torch

import pagedkv
from reference import randn
from test_cuda_vs_cpu import _same_attention

CASES = list(itertools.product(
    [torch.float16, torch.bfloat16],
    [(64, 1), (128, 4), (128, 7), (256, 2)],   # (head_dim, GQA group)
    [16, 32, 64],                              # block size
    [(None, 0), (100, 4), (129, 0)],           # (window, sinks)
))[::2]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,hd_group,bs,scope", CASES,
                         ids=[f"{str(c[0])[6:]}-d{c[1][0]}g{c[1][1]}-bs{c[2]}-w{c[3][0]}s{c[3][1]}" for c in CASES])
def test_prefill_matches_cpu_reference(cuda, gen, dtype, hd_group, bs, scope):
    d, group = hd_group
    window, sinks = scope
    hk = 2
    caches = [pagedkv.PagedKV(num_layers=2, num_kv_heads=hk, head_dim=d, block_size=bs, dtype=dtype,
                              device=dev, device_blocks=256, window=window, sink_tokens=sinks)
              for dev in ("cpu", "cuda")]
    # mixed lengths in one batch: a fresh prompt, a continuation, a decode row, partial last blocks
    _same_attention(caches, gen, dtype, hk, d, group, lens=[333, 700, 41, 1], q_lens=[333, 130, 1, 1])


@pytest.mark.cuda
def test_chunked_prefill_equals_float64_dense(cuda, gen):
    """A 1,500-token prompt appended and attended in chunks of 512: every chunk's output equals
    float64 causal attention over all keys so far, rounded to bf16."""
    hk, group, d, n, chunk = 2, 4, 128, 1500, 512
    kv = pagedkv.PagedKV(num_layers=1, num_kv_heads=hk, head_dim=d, block_size=16, dtype=torch.bfloat16,
                         device="cuda", device_blocks=128)
    s = kv.add_sequence()
    k = randn(gen, (n, hk, d), torch.bfloat16, "cuda")
    v = randn(gen, (n, hk, d), torch.bfloat16, "cuda")
    q = randn(gen, (n, hk * group, d), torch.bfloat16, "cuda")
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        kv.append([s], 0, k[start:end], v[start:end])
        out = kv.attend([s], 0, q[start:end])
        kk = k[:end].double().repeat_interleave(group, 1).transpose(0, 1)  # [Hq, end, d]
        vv = v[:end].double().repeat_interleave(group, 1).transpose(0, 1)
        qq = q[start:end].double().transpose(0, 1)                          # [Hq, rows, d]
        scores = qq @ kk.transpose(1, 2) / d ** 0.5
        pos = torch.arange(start, end, device="cuda")[:, None]
        scores.masked_fill_(torch.arange(end, device="cuda")[None, :] > pos, float("-inf"))
        ref = (scores.softmax(-1) @ vv).transpose(0, 1)
        err = (out.double() - ref.bfloat16().double()).norm() / ref.norm()
        assert err < 1e-2, (start, float(err))
