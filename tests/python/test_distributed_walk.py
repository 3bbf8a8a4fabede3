"""Random op walks on a striped cache (PagedKV(group=...)) over gloo processes, world sizes 1-4,
against a single-process cache making the same calls: add, fork, append (single- and multi-token,
ragged, several sequences), attend (decode, chunked-prefill and speculative rows, lse), truncate,
free, gather, block_table, with windows, sinks, retain=False and StreamingLLM positions; and bad
calls among them (wrong dtype or shape, unknown ids, layers out of range, a window cut that the
cache refuses). Oracle: the reference cache. attend within the dtype's tolerance, gather
bit-exact, every error the reference raises raised on every rank with the same class (and no
error where the reference has none), page tables and lengths equal after each call. A config
that differs on one rank is refused at construction on every rank.

Every rank draws the walk from the same seed, so every rank makes the same calls (SPMD)."""
import datetime
import gc
import random
import socket

import pytest
import torch

import pagedkv

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
mp = pytest.importorskip("torch.multiprocessing")

LAYERS, HKV, D, HQ = 2, 2, 16, 4
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}  # (bf16: both caches round once, merges differ)
CONFIGS = [
    dict(block_size=8, dtype=torch.float32, merge="allgather"),
    dict(block_size=4, dtype=torch.bfloat16, merge="allreduce", window=13, sink_tokens=2),
    dict(block_size=8, dtype=torch.float32, merge="allreduce", window=12, sink_tokens=4, retain=False,
         rope=pagedkv.RoPE(theta=500.0), positions="cache"),
    dict(block_size=3, dtype=torch.float32, merge="allgather", window=7, sink_tokens=0, retain=False),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Walk:
    """One striped cache and its reference, driven by one random stream shared by every rank."""

    def __init__(self, world, rank, seed, merge, **cfg):
        self.world, self.rank, self.cfg = world, rank, cfg
        self.rng, self.gen = random.Random(seed), torch.Generator().manual_seed(seed)
        kw = dict(num_layers=LAYERS, num_kv_heads=HKV, head_dim=D, device="cpu", device_blocks=300, **cfg)
        self.kv = pagedkv.PagedKV(**kw, group=dist.group.WORLD, merge=merge)
        self.ref = pagedkv.PagedKV(**kw)
        self.dtype, self.tol = cfg["dtype"], TOL[cfg["dtype"]]
        self.seqs = []
        self.log = []

    # -- one call on both caches -----------------------------------------------------------
    def both(self, name, *args, **kwargs):
        """(striped result, reference result); when either raises, both must, with one class."""
        self.log.append(name)
        results, errors = [], []
        for cache in (self.ref, self.kv):
            try:
                results.append(getattr(cache, name)(*args, **kwargs))
                errors.append(None)
            except Exception as e:  # noqa: BLE001 - compared below
                results.append(None)
                errors.append(e)
        want, got = errors
        assert type(got) is type(want), (
            f"world {self.world} rank {self.rank}: {name} after {self.log[-6:]}: the reference raised "
            f"{want!r}, the striped cache {got!r}")
        self.kv.check_invariants()
        return results[1], results[0], got

    def rows(self, n, heads=HKV, dtype=None):
        return torch.randn(n, heads, D, generator=self.gen).to(dtype or self.dtype)

    def lengths(self, s, layer=0):
        return self.ref.seq_len(s, layer)

    # -- ops -------------------------------------------------------------------------------
    def add(self):
        got, want, _ = self.both("add_sequence")
        assert got == want
        self.seqs.append(got)

    def fork(self):
        got, want, err = self.both("fork", self.rng.choice(self.seqs))
        if err is None:
            assert got == want
            self.seqs.append(got)

    def append(self):
        batch = self.rng.sample(self.seqs, self.rng.randint(1, len(self.seqs)))
        lens = [1 if self.rng.random() < 0.5 else self.rng.randint(2, 24) for _ in batch]
        for layer in range(LAYERS):
            n = sum(lens)
            self.both("append", batch, layer, self.rows(n), self.rows(n), lengths=lens)

    def attend(self):
        layer = self.rng.randrange(LAYERS)
        batch = [s for s in self.rng.sample(self.seqs, self.rng.randint(1, len(self.seqs)))
                 if self.lengths(s, layer) > 0]
        if not batch:
            return
        # decode rows (1), speculative rows (2-4), chunked-prefill rows (up to 12)
        lens = [min(self.lengths(s, layer), self.rng.choice([1, 1, 2, 4, 12])) for s in batch]
        q = self.rows(sum(lens), HQ)
        got, want, err = self.both("attend", batch, layer, q, lengths=lens, return_lse=True)
        if err is None:
            torch.testing.assert_close(got[0].float(), want[0].float(), atol=self.tol, rtol=self.tol)
            torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-5)

    def truncate(self):
        s = self.rng.choice(self.seqs)
        self.both("truncate", s, max(0, self.lengths(s) - self.rng.randint(0, 6)))

    def free(self):
        if len(self.seqs) > 1:
            s = self.seqs.pop(self.rng.randrange(len(self.seqs)))
            self.both("free", s)

    def gather(self):
        got, want, err = self.both("gather", self.rng.choice(self.seqs), self.rng.randrange(LAYERS))
        if err is None:
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), "gather differs"

    def table(self):
        s = self.rng.choice(self.seqs)
        got, want, _ = self.both("block_table", s)
        assert [r for r, _, _ in got] == [i % self.world for i in range(len(got))], got
        assert [t for _, t, _ in got] == [t for t, _ in want], (got, want)

    def bad(self):
        """A call every rank must refuse alike, after which the caches still agree."""
        s, unknown = self.rng.choice(self.seqs), max(self.seqs) + 1000
        n = 2
        call = self.rng.choice([
            ("append", [s], 0, self.rows(n, dtype=torch.float16), self.rows(n, dtype=torch.float16)),
            ("append", [s], 0, self.rows(n), self.rows(n + 1)),
            ("append", [unknown], 1, self.rows(n), self.rows(n)),
            ("append", [s], LAYERS, self.rows(n), self.rows(n)),
            ("attend", [s], 0, self.rows(1, HQ + 1)),
            ("attend", [unknown], 0, self.rows(1, HQ)),
            ("attend", [s], -1, self.rows(1, HQ)),
            ("fork", unknown), ("free", unknown), ("gather", unknown, 0), ("block_table", unknown),
            ("truncate", s, -1),
        ])
        _, _, err = self.both(*call)
        assert err is not None, f"{call[0]} with bad arguments did not raise"

    def check_all(self):
        for s in self.seqs:
            for layer in range(LAYERS):
                assert self.kv.seq_len(s, layer) == self.ref.seq_len(s, layer)
        total = self.kv.stats(group=True)
        mine = self.kv.stats()["device_blocks_used"]
        assert total["device_blocks_used"] == self.ref.stats()["device_blocks_used"]
        assert total["num_sequences"] == self.world * self.ref.stats()["num_sequences"]
        assert mine <= -(-total["device_blocks_used"] // self.world) + len(self.seqs), (mine, total)

    def run(self, steps):
        ops = [self.add, self.fork, self.append, self.append, self.append, self.attend, self.attend,
               self.attend, self.truncate, self.free, self.gather, self.table, self.bad]
        self.add()
        self.append()
        for _ in range(steps):
            self.rng.choice(ops)()
        self.check_all()


def mismatches(world, rank):
    """A config that differs on one rank: ValueError at construction, on every rank."""
    if world == 1:
        return
    base = dict(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float32, device="cpu", device_blocks=4)
    last = rank == world - 1
    for field, odd in (("block_size", dict(block_size=8 if last else 4)),
                       ("dtype", dict(dtype=torch.bfloat16 if last else torch.float32)),
                       ("merge", dict(merge="allgather" if last else "allreduce"))):
        try:
            pagedkv.PagedKV(**{**base, **odd}, group=dist.group.WORLD)
        except ValueError as e:
            assert field in str(e) and f"rank {world - 1}" in str(e), str(e)
        else:
            raise AssertionError(f"rank {rank}: a {field} differing on rank {world - 1} was accepted")
    pagedkv.PagedKV(**base, group=dist.group.WORLD)  # and the group is still usable


def worker(rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    walks = []
    try:
        mismatches(world, rank)
        for i, cfg in enumerate(CONFIGS):
            walks.append(Walk(world, rank, seed=100 * world + i, **cfg))
            walks[-1].run(steps=45)
        dist.barrier()
    finally:
        walks.clear()  # caches before the group: a group freed at interpreter exit aborts gloo
        gc.collect()  # (caught exceptions keep their frames, and so the caches, in cycles)
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_random_walk_matches_one_process(world):
    mp.spawn(worker, args=(world, free_port()), nprocs=world, join=True)
