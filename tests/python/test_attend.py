"""attend() against the dense float64 oracle (reference.attention_ref) over awkward sizes.

The sweep is a pairwise covering array over block size, batch shape, GQA group, KV heads, head
dim, decode/multi-token queries, attention scope, dtype, return_lse and scale: every pair of
values of two axes meets in some case, without the full cross product.
"""
import math

import pytest
import torch

from reference import (LSE_TOL, CacheSpec, append_rows, assert_bits_equal, assert_close,
                       batched_attention_ref, best_dtype, cuda_usable, fill_cache, pairwise_cases,
                       same_device, skip_if_unsupported)

AXES = {
    "block_size": [1, 3, 16, 32],
    "batch": ["1", "17", "97", "1000", "mixed8", "mixed64"],
    "group": [1, 2, 5, 7, 8],
    "kv_heads": [1, 2, 3],
    "head_dim": [64, 80, 128, 256],
    "query": ["decode", "multi"],
    "scope": ["full", "win_aligned", "win_unaligned", "win_sinks_unaligned", "win_drop"],
    "dtype": [torch.float32, torch.float16, torch.bfloat16],
    "return_lse": [False, True],
    "scale": [None, 0.3],
}
# Two arrays drawn with different seeds: each covers every pair, together they cover more triples.
CASES = pairwise_cases(AXES, seed=7) + pairwise_cases(AXES, seed=11)
# The CUDA kernels cover fp16/bf16: there the arrays are drawn over those two alone, so no pair of
# the other axes is lost to skipped fp32 cases.
CUDA_AXES = dict(AXES, dtype=[torch.float16, torch.bfloat16])
CUDA_CASES = pairwise_cases(CUDA_AXES, seed=7) + pairwise_cases(CUDA_AXES, seed=11)
DTYPE_NAME = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def case_id(c):
    return (f"bs{c['block_size']}-b{c['batch']}-g{c['group']}x{c['kv_heads']}-d{c['head_dim']}-"
            f"{c['query']}-{c['scope']}-{DTYPE_NAME[c['dtype']]}"
            f"{'-lse' if c['return_lse'] else ''}{'-scale' if c['scale'] else ''}")


def batch_lengths(name, rng):
    if name == "mixed8":
        lens = [1, 17, 97, 1000] + [rng.randint(1, 300) for _ in range(4)]
    elif name == "mixed64":
        lens = [1, 17, 97] + [rng.randint(1, 120) for _ in range(61)]
    else:
        return [int(name)]
    rng.shuffle(lens)
    return lens


def scope_args(name, bs):
    """Window and sinks aligned with the block size, or deliberately not."""
    return {
        "full": {},
        "win_aligned": dict(window=4 * bs, sink_tokens=bs),
        "win_unaligned": dict(window=3 * bs + 5),
        "win_sinks_unaligned": dict(window=2 * bs + 3, sink_tokens=bs + 2),
        "win_drop": dict(window=3 * bs + 2, sink_tokens=bs // 2 + 1, retain=False),
    }[name]


def query_lengths(kind, total_lens, rng):
    if kind == "decode":
        return [1] * len(total_lens)
    # Short sequences sometimes query every token (a prefill from empty); long ones up to 48 rows.
    return [rng.choice([n, rng.randint(1, n)]) if n <= 48 else rng.randint(1, 48)
            for n in total_lens]


def check_attend(kv, spec, stored, gen, seqs, layer, q_lens, num_q_heads, *, scope=None,
                 scale=None, return_lse=False, lengths_arg="list"):
    """One attend call over `seqs` compared with the oracle over the rows `stored` recorded."""
    scope = scope or {}
    q = spec.rows(gen, sum(q_lens), heads=num_q_heads)
    q_before = q.clone()
    lengths = {"none": None, "list": list(q_lens),
               "tensor": torch.tensor(q_lens, device=spec.device)}[lengths_arg]
    res = kv.attend(seqs, layer, q, lengths=lengths, scale=scale, return_lse=return_lse)
    if return_lse:
        assert isinstance(res, tuple) and len(res) == 2
        out, lse = res
    else:
        assert isinstance(res, torch.Tensor), type(res)
        out = res
    assert out.shape == q.shape and out.dtype == spec.dtype and same_device(out.device, spec.device)
    assert_bits_equal(q, q_before, "attend must not write q")
    ref_out, ref_lse = batched_attention_ref(
        q, [stored.get(s, layer) for s in seqs], q_lens, window=scope.get("window"),
        sink_tokens=scope.get("sink_tokens", 0), scale=scale)
    assert_close(out, ref_out, spec.dtype)
    if return_lse:
        assert lse.shape == (q.shape[0], num_q_heads) and lse.dtype == torch.float32
        assert same_device(lse.device, spec.device)
        assert_close(lse, ref_lse, torch.float32, tol=LSE_TOL[spec.dtype], what="lse")


SWEEP = [pytest.param("cpu", c, id=f"cpu-{case_id(c)}") for c in CASES]
if cuda_usable():
    SWEEP += [pytest.param("cuda", c, id=f"cuda-{case_id(c)}") for c in CUDA_CASES]


@pytest.mark.parametrize("device,case", SWEEP)
def test_attend_matches_reference(case, device, gen, rng):
    skip_if_unsupported(device, case["dtype"])
    spec = CacheSpec(num_layers=2, num_kv_heads=case["kv_heads"], head_dim=case["head_dim"],
                     block_size=case["block_size"], dtype=case["dtype"], device=device)
    scope = scope_args(case["scope"], spec.block_size)
    total = batch_lengths(case["batch"], rng)
    q_lens = query_lengths(case["query"], total, rng)
    kv = spec.make(device_blocks=spec.blocks_for(total) + 3, **scope)
    seqs, stored = fill_cache(kv, spec, gen, rng, total, q_lens)
    lengths_arg = "none" if case["query"] == "decode" else rng.choice(["list", "tensor"])
    check_attend(kv, spec, stored, gen, seqs, 1, q_lens, case["group"] * case["kv_heads"],
                 scope=scope, scale=case["scale"], return_lse=case["return_lse"],
                 lengths_arg=lengths_arg)


@pytest.mark.parametrize("block_size", [3, 16])
def test_every_length_across_block_boundaries(block_size, device, gen, rng):
    # Lengths 1..50 in one batch: every offset of a partial last block, decode and multi-token.
    spec = CacheSpec(2, 2, 64, block_size, best_dtype(device), device)
    total = list(range(1, 51))
    rng.shuffle(total)
    q_lens = [rng.randint(1, n) for n in total]
    kv = spec.make(device_blocks=spec.blocks_for(total))
    seqs, stored = fill_cache(kv, spec, gen, rng, total, q_lens, max_chunk=7)
    check_attend(kv, spec, stored, gen, seqs, 0, q_lens, 4, return_lse=True)
    check_attend(kv, spec, stored, gen, seqs, 1, [1] * len(seqs), 6, lengths_arg="none")


@pytest.mark.parametrize("group", range(1, 17))
def test_gqa_group_sizes(group, device, gen, rng):
    spec = CacheSpec(1, 2, 64, 16, best_dtype(device), device)
    total = [37, 5, 16]
    kv = spec.make(device_blocks=8)
    seqs, stored = fill_cache(kv, spec, gen, rng, total, [3, 5, 1])
    check_attend(kv, spec, stored, gen, seqs, 0, [3, 5, 1], 2 * group, return_lse=True)


@pytest.mark.parametrize("window,sinks", [(1, 0), (1, 5), (5000, 0), (7, 200), (16, 16), (17, 15)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_edges(window, sinks, dtype, device, gen, rng):
    # A window of one key (itself), windows and sinks longer than the sequence, and block-edge ones.
    skip_if_unsupported(device, dtype)
    spec = CacheSpec(2, 1, 128, 16, dtype, device)
    total, q_lens = [97, 40, 3], [33, 1, 3]
    scope = dict(window=window, sink_tokens=sinks)
    kv = spec.make(device_blocks=spec.blocks_for(total), **scope)
    seqs, stored = fill_cache(kv, spec, gen, rng, total, q_lens)
    check_attend(kv, spec, stored, gen, seqs, 1, q_lens, 3, scope=scope, return_lse=True)


def test_each_layer_attends_over_its_own_length(device, gen, rng):
    # Layer 1 is 15 tokens behind layer 0; its queries sit at its own last positions.
    spec = CacheSpec(2, 2, 64, 16, best_dtype(device), device)
    kv = spec.make(device_blocks=8, window=20, sink_tokens=3)
    seqs, stored = fill_cache(kv, spec, gen, rng, [25], [2])
    append_rows(kv, spec, stored, gen, seqs, 0, [15])
    assert (kv.seq_len(seqs[0], 0), kv.seq_len(seqs[0], 1)) == (40, 25)
    for layer in (0, 1):
        check_attend(kv, spec, stored, gen, seqs, layer, [2], 4,
                     scope=dict(window=20, sink_tokens=3), return_lse=True)


def test_default_scale_is_inverse_sqrt_head_dim(device, gen, rng):
    spec = CacheSpec(1, 2, 80, 16, best_dtype(device), device)
    kv = spec.make(device_blocks=4)
    seqs, _ = fill_cache(kv, spec, gen, rng, [30], [4])
    q = spec.rows(gen, 4, heads=2)
    default = kv.attend(seqs, 0, q)
    explicit = kv.attend(seqs, 0, q, scale=1 / math.sqrt(80))
    other = kv.attend(seqs, 0, q, scale=2 / math.sqrt(80))
    assert_close(default, explicit.double(), spec.dtype)
    assert not torch.allclose(default, other, atol=1e-3)  # scale reaches the kernel at all


def test_attend_leaves_the_cache_unchanged(device, gen, rng):
    spec = CacheSpec(2, 2, 64, 3, torch.bfloat16, device)
    kv = spec.make(device_blocks=40)
    seqs, stored = fill_cache(kv, spec, gen, rng, [17, 40], [5, 1])
    before = [kv.gather(s, layer) for s in seqs for layer in (0, 1)]
    stats = {k: v for k, v in kv.stats().items() if "blocks" in k}
    check_attend(kv, spec, stored, gen, seqs, 1, [5, 1], 4, return_lse=True)
    after = [kv.gather(s, layer) for s in seqs for layer in (0, 1)]
    for (k0, v0), (k1, v1) in zip(before, after):
        assert_bits_equal(k1, k0, "k")
        assert_bits_equal(v1, v0, "v")
    assert {k: v for k, v in kv.stats().items() if "blocks" in k} == stats
    assert [kv.seq_len(s, 1) for s in seqs] == [17, 40]


def test_attend_after_fork_reads_each_branch(device, gen, rng):
    # Parent and child share a partial block, then diverge; each attends over its own rows.
    spec = CacheSpec(1, 2, 64, 16, torch.float16, device)
    kv = spec.make(device_blocks=8)
    (parent,), stored = fill_cache(kv, spec, gen, rng, [21], [1])
    child = kv.fork(parent)
    stored.rows[(child, 0)] = stored.get(parent, 0)
    append_rows(kv, spec, stored, gen, [child, parent], 0, [3, 2])
    check_attend(kv, spec, stored, gen, [parent, child], 0, [2, 3], 4, return_lse=True)


@pytest.mark.cuda
def test_attend_on_a_side_stream(cuda, gen, rng):
    # Calls are ordered on the caller's current stream (DESIGN §4): fill and read on a side stream.
    spec = CacheSpec(2, 2, 128, 16, torch.bfloat16, cuda)
    kv = spec.make(device_blocks=64)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        seqs, stored = fill_cache(kv, spec, gen, rng, [500, 77], [1, 1])
        q = spec.rows(gen, 2, heads=8)
        out = kv.attend(seqs, 1, q)
    stream.synchronize()
    ref, _ = batched_attention_ref(q, [stored.get(s, 1) for s in seqs], [1, 1])
    assert_close(out, ref, spec.dtype)
