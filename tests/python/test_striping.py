"""Striping in the engine (distributed context, docs/DISTRIBUTED.md) without any collective: one
process builds one engine per simulated rank (stripe_world, stripe_rank), makes the same calls on
each and merges their partial (out, lse) with the engine's merge_partials. The merged result must
match an unstriped cache making the same calls: attention within float tolerance, every rank's
rows of gather() bit-exact, the ranks' blocks adding up to the unstriped cache's, invariants after
every call. tests/python/test_distributed.py runs the same over torch.distributed processes.

On CUDA the same walk runs the kernels: long multi-token rows take the sm_90 tensor-core path,
short ones split-K."""
import math
import random
import zlib

import pytest
import torch

import pagedkv
from pagedkv import _C

CUDA = pagedkv.cuda_available() and torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def make_ranks(world, **kw):
    """(the unstriped reference cache, one cache per rank whose engine holds only that rank's blocks)."""
    ref = pagedkv.PagedKV(**kw)
    ranks = []
    for r in range(world):
        kv = pagedkv.PagedKV(**kw)
        kv._engine = _C.Engine(**{**kv._engine_args, "stripe_world": world, "stripe_rank": r})
        ranks.append(kv)
    return ref, ranks


def merged(ranks, seqs, layer, q, lengths):
    """Every rank's partial attention, merged by log-sum-exp (poisoned outputs first)."""
    parts = [kv.attend(seqs, layer, q, lengths=lengths, return_lse=True) for kv in ranks]
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device=q.device)
    ranks[0]._engine.merge_partials(torch.stack([o for o, _ in parts]), torch.stack([l for _, l in parts]),
                                    out, lse, ranks[0]._stream())
    return out, lse, parts


def check_same(ref, ranks, seqs, tol):
    world, bs = len(ranks), ref.block_size
    for kv in [ref] + ranks:
        kv.check_invariants()
    for s in seqs:
        for layer in range(ref.num_layers):
            n = ref.seq_len(s, layer)
            assert all(kv.seq_len(s, layer) == n for kv in ranks)
            if ref.window and not ref.retain:
                continue  # gather() refuses dropped keys on every rank alike
            k_ref, v_ref = ref.gather(s, layer)
            for r, kv in enumerate(ranks):
                k, v = kv.gather(s, layer)
                mine = (torch.arange(n, device=k.device) // bs) % world == r
                assert torch.equal(k[mine], k_ref[mine]) and torch.equal(v[mine], v_ref[mine])
    if not ref.host_blocks:  # (with tiers, where blocks sit depends on each rank's pressure)
        used = sum(kv.stats()["device_blocks_used"] for kv in ranks)
        assert used == ref.stats()["device_blocks_used"]
    assert sum(kv.stats()["drops"] for kv in ranks) == ref.stats()["drops"]


def compare_attend(ref, ranks, seqs, layer, q, lengths, tol):
    want, want_lse = ref.attend(seqs, layer, q, lengths=lengths, return_lse=True)
    out, lse, _ = merged(ranks, seqs, layer, q, lengths)
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want_lse, atol=tol, rtol=tol)


SCOPES = {
    "full": dict(),
    "window": dict(window=13, sink_tokens=5),
    "window-drop": dict(window=13, sink_tokens=5, retain=False),
    "streaming": dict(window=13, sink_tokens=5, rope=pagedkv.RoPE(theta=10000.0), positions="cache"),
    # Each rank's own tiers: a device tier far smaller than the scope (staged slices, evictions),
    # and a disk tier below a small host tier (pass-through ranges over this rank's keys).
    "tiers": dict(device_blocks=6, host_blocks=400),
    "disk": dict(device_blocks=3, host_blocks=3, disk_blocks=400),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scope", list(SCOPES))
@pytest.mark.parametrize("world", [2, 3])
def test_striped_walk_matches_unstriped(device, scope, world, tmp_path):
    if device == "cuda" and scope in ("tiers", "disk"):
        pytest.skip("the tiered walks run on the CPU (the same engine code)")
    rng = random.Random(zlib.crc32(f"{device} {scope} {world}".encode()))
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    cuda = device == "cuda"
    D, hk, hq = (64, 2, 8) if cuda else (16, 2, 4)
    dtype = torch.bfloat16 if cuda else torch.float32
    tol = 2e-2 if cuda else 2e-5
    kw = dict(num_layers=2, num_kv_heads=hk, head_dim=D, block_size=16 if cuda else 4, dtype=dtype, device=device,
              device_blocks=400)
    kw.update(SCOPES[scope])
    if scope == "disk":
        kw["disk_path"] = tmp_path
    ref, ranks = make_ranks(world, **kw)
    if scope == "disk":  # every rank its own file: engines of one process share nothing else
        for r, kv in enumerate(ranks):
            (tmp_path / f"rank{r}").mkdir()
            kv._engine = _C.Engine(**{**kv._engine_args, "disk_path": str(tmp_path / f"rank{r}"),
                                      "stripe_world": world, "stripe_rank": r})
    caches = [ref] + ranks

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    seqs = [ref.add_sequence() for _ in range(3)]
    for kv in ranks:
        assert [kv.add_sequence() for _ in range(3)] == seqs
    for step in range(14):
        op = rng.choice(["append", "append", "append", "fork", "truncate"])
        if op == "fork" and len(seqs) < 5:
            parent = rng.choice(seqs)
            child = ref.fork(parent)
            assert all(kv.fork(parent) == child for kv in ranks)
            seqs.append(child)
        elif op == "truncate" and not (ref.window and not ref.retain):
            s = rng.choice(seqs)
            keep = rng.randrange(0, ref.seq_len(s) + 1)
            for kv in caches:
                kv.truncate(s, keep)
        batch = rng.sample(seqs, rng.randint(1, len(seqs)))
        # Multi-token rows: a chunked prefill (on CUDA long enough for the tensor-core kernel) or
        # speculative rows; else decode rows.
        n = rng.choice([1, 1, 3, 40 if cuda else 9])
        lengths = [n] * len(batch)
        for layer in range(ref.num_layers):
            k, v = rand(n * len(batch), hk, D), rand(n * len(batch), hk, D)
            for kv in caches:
                kv.append(batch, layer, k, v, lengths=lengths)
            q = rand(n * len(batch), hq, D)
            compare_attend(ref, ranks, batch, layer, q, lengths, tol)
        check_same(ref, ranks, seqs, tol)
    # Decode rows over everything kept (a long prefix on every rank, sinks on rank 0).
    q = rand(len(seqs), hq, D)
    compare_attend(ref, ranks, seqs, 1, q, [1] * len(seqs), tol)
    for s in list(seqs):
        for kv in caches:
            kv.free(s)
    check_same(ref, ranks, [], tol)
    assert all(kv.stats()["device_blocks_used"] == 0 for kv in ranks)
    if ref.host_blocks:
        moved = sum(kv.stats()["blocks_to_host"] for kv in ranks)
        assert moved > 0, "the tiered walk never evicted: it tests nothing of the tiers"
    if ref.disk_blocks:
        assert sum(kv.stats()["blocks_to_disk"] for kv in ranks) > 0


@pytest.mark.parametrize("device", DEVICES)
def test_a_rank_without_keys_returns_zero_and_minus_infinity(device):
    """A sequence shorter than one block per rank: ranks past the first hold nothing."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    D = 64 if device == "cuda" else 16
    ref, ranks = make_ranks(4, num_layers=1, num_kv_heads=2, head_dim=D, block_size=16, dtype=dtype,
                            device=device, device_blocks=8)
    g = torch.Generator().manual_seed(3)
    k = torch.randn(5, 2, D, generator=g).to(dtype).to(device)
    q = torch.randn(5, 4, D, generator=g).to(dtype).to(device)
    for kv in [ref] + ranks:
        kv.add_sequence()
        kv.append([0], 0, k, k)
    out, lse, parts = merged(ranks, [0], 0, q, [5])
    for o, l in parts[1:]:
        assert torch.equal(o, torch.zeros_like(o)) and bool((l == -math.inf).all())
    want, want_lse = ref.attend([0], 0, q, lengths=[5], return_lse=True)
    tol = 2e-2 if device == "cuda" else 1e-6
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want_lse, atol=tol, rtol=tol)
    assert [kv.stats()["device_blocks_used"] for kv in ranks] == [1, 0, 0, 0]


def test_check_append_says_what_append_would():
    """The dry run raises exactly when the append would, and changes nothing."""
    _, ranks = make_ranks(2, num_layers=1, num_kv_heads=1, head_dim=8, block_size=2, dtype=torch.float32,
                          device="cpu", device_blocks=2)
    for kv in ranks:
        kv.add_sequence()
    rows = torch.zeros(6, 1, 8)  # blocks 0, 1, 2: rank 0 takes two, rank 1 one
    ranks[1]._engine.check_append([0], 0, [6])
    with pytest.raises(pagedkv.OutOfBlocksError):
        ranks[0]._engine.check_append([0], 0, [10])  # blocks 0, 2, 4 on rank 0: three
    with pytest.raises(KeyError):
        ranks[0]._engine.check_append([7], 0, [1])
    assert ranks[0].seq_len(0) == 0 and ranks[0].stats()["device_blocks_used"] == 0
    for kv in ranks:
        kv.append([0], 0, rows, rows)
    assert [kv.stats()["device_blocks_used"] for kv in ranks] == [2, 1]


def test_stripe_arguments_are_checked():
    kv = pagedkv.PagedKV(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float32, device="cpu", device_blocks=2)
    with pytest.raises(ValueError, match="group"):
        _C.Engine(**{**kv._engine_args, "stripe_world": 256})
    with pytest.raises(ValueError, match="rank 2"):
        _C.Engine(**{**kv._engine_args, "stripe_world": 2, "stripe_rank": 2})
