"""Distributed context over torch.distributed (gloo on CPUs): PagedKV(group=...) on spawned
processes, world sizes 1-4, against a single-process cache making the same calls. Each world
size is one spawn running every check (processes are the expensive part); a check that fails
raises in the worker and the spawn reports its traceback."""
import gc
import os
import socket

import pytest
import torch

import pagedkv

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
mp = pytest.importorskip("torch.multiprocessing")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close(kept: list):
    """Caches go before the group (a ProcessGroup freed at interpreter exit can abort gloo)."""
    kept.clear()
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def same(a, b, tol):
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def both(kv, ref, method, *args, **kwargs):
    """The same call on the striped cache and the reference; (ours, theirs)."""
    return getattr(kv, method)(*args, **kwargs), getattr(ref, method)(*args, **kwargs)


def raises_everywhere(kind, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except kind as e:
        return str(e)
    raise AssertionError(f"{fn.__name__} did not raise {kind.__name__} on rank {dist.get_rank()}")


def walk(world, rank, merge, dtype, tol, **scope):
    """Appends, attends (decode, chunked prefill, speculative rows), fork, truncate, free and
    gather against the reference; per-rank blocks about 1/world of the reference's."""
    g = torch.Generator().manual_seed(7)  # the same stream on every rank: identical arguments
    kw = dict(num_layers=2, num_kv_heads=2, head_dim=16, block_size=4, dtype=dtype, device="cpu",
              device_blocks=200, **scope)
    kv = pagedkv.PagedKV(**kw, group=dist.group.WORLD, merge=merge)
    ref = pagedkv.PagedKV(**kw)
    seqs = [kv.add_sequence() for _ in range(3)]
    assert seqs == [ref.add_sequence() for _ in range(3)]

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    for step, n in enumerate([11, 1, 1, 5, 1, 9, 2, 1, 1]):
        if step == 3:
            child = kv.fork(seqs[0])
            assert child == ref.fork(seqs[0])
            seqs.append(child)
        if step == 6 and not (scope.get("window") and not scope.get("retain", True)):
            both(kv, ref, "truncate", seqs[1], kv.seq_len(seqs[1]) - 3)
        batch = seqs if step % 2 else seqs[:2]
        lengths = [n] * len(batch)
        for layer in range(2):
            k, v, q = rand(n * len(batch), 2, 16), rand(n * len(batch), 2, 16), rand(n * len(batch), 4, 16)
            both(kv, ref, "append", batch, layer, k, v, lengths=lengths)
            (o, l), (wo, wl) = both(kv, ref, "attend", batch, layer, q, lengths=lengths, return_lse=True)
            same(o, wo, tol)
            same(l, wl, 1e-4)
        kv.check_invariants()
    if not (scope.get("window") and not scope.get("retain", True)):
        for s in seqs:
            (k, v), (wk, wv) = both(kv, ref, "gather", s, 1)
            assert torch.equal(k, wk) and torch.equal(v, wv)
    table = kv.block_table(seqs[0])
    assert [r for r, _, _ in table] == [i % world for i in range(len(table))]
    assert [t for _, t, _ in table] == [t for t, _ in ref.block_table(seqs[0])]
    mine = kv.stats()["device_blocks_used"]
    total = kv.stats(group=True)["device_blocks_used"]
    assert total == ref.stats()["device_blocks_used"], (total, ref.stats()["device_blocks_used"])
    assert mine <= -(-total // world) + len(seqs), (mine, total)
    for s in seqs:
        both(kv, ref, "free", s)
    assert kv.stats(group=True)["device_blocks_used"] == 0
    return kv, ref


def failures(world, rank):
    """Bad arguments and a rank out of room raise on every rank and change nothing."""
    kw = dict(num_layers=1, num_kv_heads=1, head_dim=8, block_size=2, dtype=torch.float32, device="cpu")
    # A configuration that differs on one rank: a clear error at construction, on every rank.
    if world > 1:
        msg = raises_everywhere(ValueError, pagedkv.PagedKV, **kw, device_blocks=8,
                                window=6 if rank == world - 1 else None, group=dist.group.WORLD)
        assert "window" in msg and f"rank {world - 1}" in msg
    # Rank 0 holds blocks 0, world, 2 world, ...: with 2 device blocks it runs out first.
    kv = pagedkv.PagedKV(**kw, device_blocks=2, group=dist.group.WORLD)
    ref = pagedkv.PagedKV(**kw, device_blocks=64)
    s = kv.add_sequence()
    ref.add_sequence()
    rows = torch.arange(2 * 2 * world * 8, dtype=torch.float32).reshape(-1, 1, 8) / 100
    both(kv, ref, "append", [s], 0, rows, rows)  # two blocks per rank
    more = torch.ones(2, 1, 8)
    if world > 1:
        msg = raises_everywhere(pagedkv.OutOfBlocksError, kv.append, [s], 0, more, more)
        assert "rank 0" in msg or rank == 0
    else:
        raises_everywhere(pagedkv.OutOfBlocksError, kv.append, [s], 0, more, more)
    assert kv.seq_len(s) == ref.seq_len(s)
    raises_everywhere(KeyError, kv.attend, [s + 5], 0, torch.ones(1, 1, 8))
    raises_everywhere(ValueError, kv.attend, [s], 0, torch.ones(1, 1, 7))
    kv.check_invariants()
    q = torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(1))
    (o, l), (wo, wl) = both(kv, ref, "attend", [s], 0, q, lengths=[3], return_lse=True)
    same(o, wo, 1e-5)
    (k, v), (wk, wv) = both(kv, ref, "gather", s, 0)
    assert torch.equal(k, wk)
    return kv, ref


def flat_window(world, rank):
    """Window with retain=False: each rank's blocks stay flat over a long stream."""
    kw = dict(num_layers=1, num_kv_heads=1, head_dim=8, block_size=4, dtype=torch.float32, device="cpu",
              device_blocks=40, window=16, sink_tokens=4, retain=False)
    kv = pagedkv.PagedKV(**kw, group=dist.group.WORLD)
    ref = pagedkv.PagedKV(**kw)
    s = kv.add_sequence()
    ref.add_sequence()
    g = torch.Generator().manual_seed(3)
    used = []
    for t in range(300):
        k, q = torch.randn(1, 1, 8, generator=g), torch.randn(1, 2, 8, generator=g)
        both(kv, ref, "append", [s], 0, k, k)
        if t % 37 == 0:
            o, w = both(kv, ref, "attend", [s], 0, q)
            same(o, w, 1e-5)
        used.append(kv.stats()["device_blocks_used"])
    assert max(used[100:]) <= max(used[:100]), used
    assert max(used) <= -(-7 // world) + 1
    return kv, ref


def streaming_steps(world, rank):
    """StreamingLLM positions and decode steps (begin_step/DecodeSteps) with a group."""
    kw = dict(num_layers=2, num_kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32, device="cpu",
              device_blocks=100, window=10, sink_tokens=3, rope=pagedkv.RoPE(theta=10000.0), positions="cache")
    kv = pagedkv.PagedKV(**kw, group=dist.group.WORLD)
    ref = pagedkv.PagedKV(**kw)
    seqs = [kv.add_sequence(), kv.add_sequence()]
    [ref.add_sequence(), ref.add_sequence()]
    g = torch.Generator().manual_seed(5)
    k = torch.randn(2 * 13, 2, 16, generator=g)
    for layer in range(2):
        both(kv, ref, "append", seqs, layer, k, k)
    outs = {}

    def layers(cache):
        def run(batch):
            res = []
            for layer in range(2):
                cache.append(batch, layer, step_k, step_k)
                res.append(cache.attend(batch, layer, step_q))
            return res
        return run

    with pagedkv.DecodeSteps(kv, layers(kv), num_q_heads=4) as ours, \
            pagedkv.DecodeSteps(ref, layers(ref), num_q_heads=4) as theirs:
        for _ in range(12):
            step_k, step_q = torch.randn(2, 2, 16, generator=g), torch.randn(2, 4, 16, generator=g)
            for o, w in zip(ours.step(seqs), theirs.step(seqs)):
                same(o, w, 1e-5)
    assert kv.seq_len(seqs[0]) == ref.seq_len(seqs[0]) == 25
    return kv, ref


def merge_edges(world, rank):
    """The merge by itself against float64: random partials, a row some ranks saw nothing of,
    and a row no rank saw (out 0, lse -inf, as the engine's merge_partials gives)."""
    import math

    from pagedkv import distributed

    g = torch.Generator().manual_seed(11)  # every rank draws all ranks' partials, keeps its own
    outs = torch.randn(world, 4, 3, 8, generator=g)
    lses = torch.randn(world, 4, 3, generator=g) * 4
    lses[1:, 1, 0] = -math.inf
    outs[1:, 1, 0] = 0
    lses[:, 2, 1] = -math.inf
    outs[:, 2, 1] = 0
    top = lses.double().amax(0).nan_to_num(neginf=0.0)
    w = torch.exp(lses.double() - top)
    want = (w[..., None] * outs.double()).sum(0) / w.sum(0).clamp_min(1e-300)[..., None]
    want_lse = top + torch.log(w.sum(0))
    for method in ("allreduce", "allgather"):
        o, l = distributed.merge_collective(outs[rank], lses[rank], dist.group.WORLD, world, method)
        torch.testing.assert_close(o.double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l.double(), want_lse, atol=1e-5, rtol=1e-5)
        assert l[2, 1] == -math.inf and bool((o[2, 1] == 0).all())


def worker(rank, world, port):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    kept = []
    merge_edges(world, rank)
    for merge in ("allreduce", "allgather"):
        kept += walk(world, rank, merge, torch.float32, 2e-5)
    kept += walk(world, rank, "allreduce", torch.bfloat16, 2e-2)
    kept += walk(world, rank, "allgather", torch.float32, 2e-5, window=9, sink_tokens=3)
    kept += walk(world, rank, "allreduce", torch.float32, 2e-5, window=9, sink_tokens=3, retain=False)
    kept += failures(world, rank)
    kept += flat_window(world, rank)
    kept += streaming_steps(world, rank)
    close(kept)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_distributed_matches_one_process(world):
    mp.spawn(worker, args=(world, free_port()), nprocs=world, join=True)


def test_group_must_be_a_process_group():
    with pytest.raises((TypeError, RuntimeError), match="group"):
        pagedkv.PagedKV(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float32, device="cpu",
                        device_blocks=2, group="world")
