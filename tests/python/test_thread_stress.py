"""Threads x tiers x operations on one engine (issue 18, defect 1; docs/DESIGN.md §5).

Each trial builds a tiered cache on the CPU (a small device tier, a host tier, a disk tier in a
temporary directory) and runs several threads at once, each doing random operations (append,
attend, gather, fork, free, truncate, offload, prefetch) on its own sequences while keeping a
plain model of what they store. Oracles: gather is bit-exact against the model after every
gather and for every sequence at the end; attend matches dense float64 attention over the
model's rows; check_invariants() holds after the threads join. OutOfBlocksError is allowed
(threads compete for the tiers) but must change nothing of that thread's sequences.

CI runs a few trials; `pytest tests/python/test_thread_stress.py --stress-trials 200` runs more
(conftest.py), and so does `python tests/python/test_thread_stress.py --trials 200`.
"""
from __future__ import annotations

import random
import sys
import tempfile
import threading

import pytest
import torch

import pagedkv
from reference import attention_ref

LAYERS, HKV, HQ, D, BS = 2, 2, 4, 8, 4
THREADS, OPS = 4, 60


class Worker:
    """One thread's sequences and their model: model[seq][layer] = (k rows, v rows)."""

    def __init__(self, kv, seed):
        self.kv, self.rng = kv, random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.model: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.out_of_blocks = 0
        self.ops = 0

    def rows(self, n, heads=HKV):
        return torch.randn(n, heads, D, generator=self.gen)

    def run(self, ops):
        for _ in range(ops):
            op = self.rng.choice(["add", "append", "append", "append", "attend", "attend", "gather",
                                  "fork", "free", "truncate", "offload", "prefetch"])
            if op != "add" and not self.model:
                op = "add"
            seq = self.rng.choice(sorted(self.model)) if self.model else None
            before = {s: [(k.clone(), v.clone()) for k, v in ls] for s, ls in self.model.items()}
            try:
                getattr(self, op)(seq)
            except pagedkv.OutOfBlocksError:
                self.out_of_blocks += 1
                self.model = before
                for s in self.model:  # nothing of ours changed
                    self.check_gather(s)
            self.ops += 1

    def add(self, _):
        if len(self.model) < 4:
            self.model[self.kv.add_sequence()] = [(self.rows(0), self.rows(0)) for _ in range(LAYERS)]

    def append(self, seq):
        layer, n = self.rng.randrange(LAYERS), self.rng.randint(1, 6)
        if self.model[seq][layer][0].shape[0] + n > 40:
            return self.truncate(seq)
        k, v = self.rows(n), self.rows(n)
        self.kv.append([seq], layer, k, v)
        old_k, old_v = self.model[seq][layer]
        self.model[seq][layer] = (torch.cat([old_k, k]), torch.cat([old_v, v]))

    def attend(self, seq):
        layer = self.rng.randrange(LAYERS)
        k, v = self.model[seq][layer]
        if k.shape[0] == 0:
            return
        n = self.rng.randint(1, min(3, k.shape[0]))
        q = self.rows(n, HQ)
        out = self.kv.attend([seq], layer, q)
        want, _ = attention_ref(q, k, v)
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)

    def gather(self, seq):
        self.check_gather(seq)

    def check_gather(self, seq):
        for layer in range(LAYERS):
            k, v = self.kv.gather(seq, layer)
            want_k, want_v = self.model[seq][layer]
            assert torch.equal(k, want_k) and torch.equal(v, want_v), f"seq {seq} layer {layer}"

    def fork(self, seq):
        if len(self.model) < 4:
            self.model[self.kv.fork(seq)] = list(self.model[seq])

    def free(self, seq):
        self.kv.free(seq)
        del self.model[seq]

    def truncate(self, seq):
        tokens = self.rng.randint(0, 12)
        self.kv.truncate(seq, tokens)
        self.model[seq] = [(k[:tokens], v[:tokens]) for k, v in self.model[seq]]

    def offload(self, seq):
        self.kv.offload([seq])

    def prefetch(self, seq):
        self.kv.prefetch([seq])


def run_trial(trial: int, directory: str, threads: int = THREADS, ops: int = OPS) -> dict:
    """One trial; returns its counts. Raises on any wrong result or broken invariant."""
    rng = random.Random(trial)
    kv = pagedkv.PagedKV(num_layers=LAYERS, num_kv_heads=HKV, head_dim=D, block_size=BS,
                         dtype=torch.float32, device="cpu", device_blocks=rng.choice([6, 8, 12]),
                         host_blocks=rng.choice([8, 12, 32]), disk_blocks=256, disk_path=directory,
                         policy=rng.choice(["lru", "window", "hybrid"]))
    workers = [Worker(kv, trial * 1000 + i) for i in range(threads)]
    errors = []

    def body(w):
        try:
            w.run(ops)
        except BaseException as e:  # noqa: BLE001 - reported below with the thread's trial
            errors.append(e)

    ts = [threading.Thread(target=body, args=(w,)) for w in workers]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    kv.check_invariants()
    for w in workers:
        for seq in w.model:
            assert kv.seq_len(seq, 0) == w.model[seq][0][0].shape[0]
            w.check_gather(seq)
    stats = kv.stats()
    assert stats["num_sequences"] == sum(len(w.model) for w in workers)
    return {"ops": sum(w.ops for w in workers), "out_of_blocks": sum(w.out_of_blocks for w in workers),
            "blocks_to_disk": stats["blocks_to_disk"], "blocks_from_disk": stats["blocks_from_disk"]}


def test_threads_on_one_tiered_engine(stress_trials, tmp_path):
    totals = {}
    for trial in range(stress_trials):
        d = tmp_path / f"t{trial}"
        d.mkdir()
        for k, v in run_trial(trial, str(d)).items():
            totals[k] = totals.get(k, 0) + v
    assert totals["ops"] == stress_trials * THREADS * OPS
    assert totals["blocks_to_disk"] > 0, "the trials never reached the disk tier"
    print(f"\n{stress_trials} thread trials: {totals}")


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description="threads x tiers x operations on one engine")
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--first", type=int, default=0, help="seed of the first trial")
    args = p.parse_args(argv)
    totals = {}
    for trial in range(args.first, args.first + args.trials):
        with tempfile.TemporaryDirectory() as d:
            for k, v in run_trial(trial, d).items():
                totals[k] = totals.get(k, 0) + v
    print(f"{args.trials} thread trials, {THREADS} threads x {OPS} ops each, all exact: {totals}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
