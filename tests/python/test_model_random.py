"""A seeded random walk of cache operations against a plain-Python model of the cache.

The model keeps, per sequence and layer, the K/V rows appended, and per sequence a table of
abstract blocks with reference counts: a sequence needs ceil(max layer length / block_size)
blocks, fork shares them all, a write into a block someone else holds copies it first, and with a
window and retain=False a block goes once no future query of any layer can see it. After every
operation the engine must agree with the model on lengths, block tables (the same sharing) and
block counts, and pass its own invariant checker; gather must match bit for bit and attend must
match the float64 oracle over the model's rows. Appends that need more blocks than are free must
raise OutOfBlocksError and change nothing.
"""
from dataclasses import dataclass, field, replace

import pytest
import torch

import pagedkv
from reference import (LSE_TOL, CacheSpec, assert_bits_equal, assert_close,
                       batched_attention_ref, dtype_supported)


@dataclass
class WalkConfig:
    name: str
    dtype: torch.dtype
    block_size: int
    num_layers: int
    kv_heads: int
    group: int
    device_blocks: int
    steps: int
    window: int = None
    sinks: int = 0
    retain: bool = True

    @property
    def drops(self):
        return self.window is not None and not self.retain


CONFIGS = [
    WalkConfig("full-f32", torch.float32, 3, 2, 2, 3, device_blocks=40, steps=4000),
    WalkConfig("window-f16", torch.float16, 4, 3, 1, 5, device_blocks=30, steps=3000,
               window=9, sinks=2),
    # A pool big enough never to run out: whether drops come before allocations is not specified.
    WalkConfig("drop-bf16", torch.bfloat16, 5, 2, 2, 2, device_blocks=400, steps=3000,
               window=11, sinks=3, retain=False),
]
MAX_SEQS = 10


@dataclass
class SeqModel:
    k: list  # per layer: [L, Hkv, D] rows appended, CPU
    v: list
    table: list  # per logical block: an abstract block id, or None once dropped
    last_start: list  # per layer: first position of the last append, None before any

    def length(self, layer):
        return self.k[layer].shape[0]

    def copy(self):
        return SeqModel(list(self.k), list(self.v), list(self.table), list(self.last_start))


@dataclass
class CacheModel:
    cfg: WalkConfig
    spec: CacheSpec
    seqs: dict = field(default_factory=dict)
    refs: dict = field(default_factory=dict)  # abstract block -> sequences holding it
    next_block: int = 0

    def free_blocks(self):
        return self.cfg.device_blocks - len(self.refs)

    def add(self, sid):
        empty = torch.empty(0, self.spec.num_kv_heads, self.spec.head_dim, dtype=self.spec.dtype)
        n = self.cfg.num_layers
        self.seqs[sid] = SeqModel([empty] * n, [empty] * n, [], [None] * n)

    def fork(self, parent, child):
        self.seqs[child] = self.seqs[parent].copy()
        for blk in self.seqs[child].table:
            if blk is not None:
                self.refs[blk] += 1

    def free(self, sid):
        for blk in self.seqs.pop(sid).table:
            if blk is not None:
                self._unref(self.refs, blk)

    @staticmethod
    def _unref(refs, blk):
        refs[blk] -= 1
        if refs[blk] == 0:
            del refs[blk]

    def plan_append(self, items, layer):
        """The state after appending n rows to each (sid, n) of items, and the blocks it takes."""
        bs, refs, seqs = self.cfg.block_size, dict(self.refs), {}
        plan = dict(refs=refs, seqs=seqs, allocs=0, copies=0, next_block=self.next_block)

        def new_block():
            blk = plan["next_block"]
            plan["next_block"] += 1
            plan["allocs"] += 1
            refs[blk] = 1
            return blk

        for sid, n in items:
            seq = self.seqs[sid].copy()
            start = seq.length(layer)
            for b in range(start // bs, (start + n - 1) // bs + 1):
                if b == len(seq.table):
                    seq.table.append(new_block())
                elif refs[seq.table[b]] > 1:  # copy-on-write
                    self._unref(refs, seq.table[b])
                    seq.table[b] = new_block()
                    plan["copies"] += 1
            seq.last_start[layer] = start
            if self.cfg.drops:
                self._drop_out_of_scope(seq, refs)
            seqs[sid] = seq
        return plan

    def _drop_out_of_scope(self, seq, refs):
        bs, window = self.cfg.block_size, self.cfg.window
        for b, blk in enumerate(seq.table):
            if blk is None or b * bs < self.cfg.sinks:
                continue
            if all(s is not None and (b + 1) * bs - 1 <= s - window for s in seq.last_start):
                self._unref(refs, blk)
                seq.table[b] = None

    def commit(self, plan, layer, items, k, v):
        self.refs, self.next_block = plan["refs"], plan["next_block"]
        rows = [n for _, n in items]
        for (sid, _), rk, rv in zip(items, torch.split(k, rows), torch.split(v, rows)):
            seq = plan["seqs"][sid]
            seq.k[layer] = torch.cat([seq.k[layer], rk])
            seq.v[layer] = torch.cat([seq.v[layer], rv])
            self.seqs[sid] = seq


def verify(kv, model):
    kv.check_invariants()
    st = kv.stats()
    assert st["device_blocks_used"] == len(model.refs), (st, len(model.refs))
    assert st["device_blocks_used"] + st["device_blocks_free"] == model.cfg.device_blocks
    slot_of, block_at = {}, {}
    for sid, seq in model.seqs.items():
        table = kv.block_table(sid)
        assert len(table) == len(seq.table), (sid, table, seq.table)
        for b, (blk, entry) in enumerate(zip(seq.table, table)):
            if blk is None:
                assert tuple(entry) == ("dropped", -1), (sid, b, entry)
                continue
            assert entry[0] == "device", (sid, b, entry)
            # Shared exactly where the model shares: one slot per abstract block and vice versa.
            assert slot_of.setdefault(blk, tuple(entry)) == tuple(entry), (sid, b, "not shared")
            assert block_at.setdefault(tuple(entry), blk) == blk, (sid, b, "wrongly shared")
        for layer in range(model.cfg.num_layers):
            assert kv.seq_len(sid, layer) == seq.length(layer), (sid, layer)


class Walk:
    def __init__(self, cfg, device, gen, rng):
        self.cfg, self.gen, self.rng = cfg, gen, rng
        self.spec = CacheSpec(cfg.num_layers, cfg.kv_heads, 64, cfg.block_size, cfg.dtype, device)
        kw = dict(window=cfg.window, sink_tokens=cfg.sinks, retain=cfg.retain) if cfg.window else {}
        self.kv = self.spec.make(device_blocks=cfg.device_blocks, **kw)
        self.model = CacheModel(cfg, self.spec)
        self.counts = dict.fromkeys(["add", "append", "oob", "copies", "fork", "free", "attend",
                                     "gather", "gather_dropped"], 0)

    def index_arg(self, values):
        if self.rng.random() < 0.5:
            return list(values)
        return torch.tensor(values, device=self.spec.device)

    def add(self):
        sid = self.kv.add_sequence()
        assert sid not in self.model.seqs
        self.model.add(sid)
        self.counts["add"] += 1

    def append(self):
        rng = self.rng
        chosen = rng.sample(list(self.model.seqs), rng.randint(1, min(3, len(self.model.seqs))))
        layer = rng.randrange(self.cfg.num_layers)
        lens = [rng.choice([1, 1, 2, 3, rng.randint(1, 4 * self.cfg.block_size)]) for _ in chosen]
        items = list(zip(chosen, lens))
        plan = self.model.plan_append(items, layer)
        k = self.spec.rows(self.gen, sum(lens)).cpu()
        v = self.spec.rows(self.gen, sum(lens)).cpu()
        lengths = None if len(set(lens)) == 1 and rng.random() < 0.5 else self.index_arg(lens)
        args = (self.index_arg(chosen), layer, k.to(self.spec.device), v.to(self.spec.device))
        if plan["allocs"] > self.model.free_blocks():
            if self.cfg.drops:
                return  # see CONFIGS: not a case this walk judges
            with pytest.raises(pagedkv.OutOfBlocksError):
                self.kv.append(*args, lengths=lengths)
            self.counts["oob"] += 1
            return
        self.kv.append(*args, lengths=lengths)
        self.model.commit(plan, layer, items, k, v)
        self.counts["append"] += 1
        self.counts["copies"] += plan["copies"]

    def attend(self):
        rng, cfg = self.rng, self.cfg
        layer = rng.randrange(cfg.num_layers)
        ready = [s for s, seq in self.model.seqs.items() if seq.length(layer) > 0]
        if not ready:
            return
        chosen = rng.sample(ready, rng.randint(1, min(4, len(ready))))
        q_lens = []
        for sid in chosen:
            seq = self.model.seqs[sid]
            # With drops, only the rows of the last append are guaranteed their keys.
            most = seq.length(layer) - seq.last_start[layer] if cfg.drops else seq.length(layer)
            q_lens.append(rng.randint(1, min(most, 6)))
        q = self.spec.rows(self.gen, sum(q_lens), heads=cfg.kv_heads * cfg.group)
        scale = rng.choice([None, 0.5])
        out, lse = self.kv.attend(self.index_arg(chosen), layer, q, lengths=self.index_arg(q_lens),
                                  scale=scale, return_lse=True)
        kvs = [(self.model.seqs[s].k[layer], self.model.seqs[s].v[layer]) for s in chosen]
        ref, ref_lse = batched_attention_ref(q, kvs, q_lens, window=cfg.window,
                                             sink_tokens=cfg.sinks, scale=scale)
        assert_close(out, ref, cfg.dtype)
        assert_close(lse, ref_lse, torch.float32, tol=LSE_TOL[cfg.dtype], what="lse")
        self.counts["attend"] += 1

    def gather(self, sid=None, layer=None):
        sid = self.rng.choice(list(self.model.seqs)) if sid is None else sid
        layer = self.rng.randrange(self.cfg.num_layers) if layer is None else layer
        seq = self.model.seqs[sid]
        if None in seq.table:
            with pytest.raises(ValueError):
                self.kv.gather(sid, layer)
            self.counts["gather_dropped"] += 1
            return
        k, v = self.kv.gather(sid, layer)
        self.kv.check_invariants()
        assert_bits_equal(k, seq.k[layer], f"k of seq {sid} layer {layer}")
        assert_bits_equal(v, seq.v[layer], f"v of seq {sid} layer {layer}")
        self.counts["gather"] += 1

    def fork(self):
        parent = self.rng.choice(list(self.model.seqs))
        child = self.kv.fork(parent)
        assert child not in self.model.seqs
        self.model.fork(parent, child)
        self.counts["fork"] += 1

    def free(self):
        sid = self.rng.choice(list(self.model.seqs))
        self.kv.free(sid)
        self.model.free(sid)
        self.counts["free"] += 1

    def choose(self):
        n = len(self.model.seqs)
        if n == 0:
            return self.add
        full = 1 - self.model.free_blocks() / self.cfg.device_blocks
        ops = [(self.add, 1.0 if n < MAX_SEQS else 0.0), (self.append, 6.0),
               (self.fork, 1.5 if n < MAX_SEQS else 0.0), (self.free, 1.0 + 4.0 * (full > 0.8)),
               (self.attend, 2.0), (self.gather, 1.5)]
        return self.rng.choices([op for op, _ in ops], weights=[w for _, w in ops])[0]

    def run(self):
        for step in range(self.cfg.steps):
            op = self.choose()
            try:
                op()
                verify(self.kv, self.model)
                if step % 100 == 99:
                    for sid in list(self.model.seqs):
                        for layer in range(self.cfg.num_layers):
                            self.gather(sid, layer)
            except Exception as e:
                raise AssertionError(f"step {step} ({op.__name__}), counts {self.counts}") from e


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_random_walk_matches_model(cfg, device, gen, rng):
    if not dtype_supported(device, cfg.dtype):  # CUDA kernels are fp16/bf16: walk the same path there
        cfg = replace(cfg, dtype=torch.bfloat16)
    walk = Walk(cfg, device, gen, rng)
    walk.run()
    c = walk.counts
    # The walk must have exercised what it claims to test.
    assert c["fork"] >= 20 and c["copies"] >= 20 and c["free"] >= 20 and c["attend"] >= 100, c
    if cfg.drops:
        assert c["gather_dropped"] >= 10, c
    else:
        assert c["oob"] >= 5 and c["gather"] >= 100, c
    for sid in list(walk.model.seqs):
        walk.kv.free(sid)
        walk.model.free(sid)
    verify(walk.kv, walk.model)
    assert walk.kv.stats()["device_blocks_used"] == 0
