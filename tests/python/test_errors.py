"""Every bad input of DESIGN §4 raises the named error, names the argument, and changes nothing.

Each case runs a call with one bad argument on a cache holding a forked pair that shares a
partial block, compares the whole observable state (stats, lengths, block tables, gathered rows)
with a snapshot taken before, then makes the same call with the argument fixed and checks that it
works.
"""
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import pagedkv
from reference import (CacheSpec, StoredKV, append_rows, assert_bits_equal, assert_close,
                       batched_attention_ref, message_of, source_path_in)

VOLATILE_STATS = {"device_hits", "device_misses", "transfer_wait_s"}  # counters reads may move


class Env:
    """a: 10 rows in layer 0, 6 in layer 1; b = fork(a); c: 5 rows in both layers; 11 of 16 free."""

    def __init__(self, device, gen):
        self.gen = gen
        self.spec = CacheSpec(2, 2, 64, 4, torch.float16, device)
        self.kv = self.spec.make(device_blocks=16)
        self.stored = StoredKV(self.spec)
        self.a, self.c = self.kv.add_sequence(), self.kv.add_sequence()
        append_rows(self.kv, self.spec, self.stored, gen, [self.a, self.c], 0, [10, 5])
        append_rows(self.kv, self.spec, self.stored, gen, [self.a, self.c], 1, [6, 5])
        self.b = self.kv.fork(self.a)
        for layer in (0, 1):
            self.stored.rows[(self.b, layer)] = self.stored.get(self.a, layer)
        self.freed = self.kv.add_sequence()
        self.kv.free(self.freed)
        self.live = [self.a, self.b, self.c]
        self.unknown = max(self.live + [self.freed]) + 1000
        self.other_device = "meta" if device == "cpu" else "cpu"
        assert self.kv.stats()["device_blocks_used"] == 5

    def rows(self, n, heads=None):
        return self.spec.rows(self.gen, n, heads)


def snapshot(env):
    kv = env.kv
    kv.check_invariants()
    stats = {k: v for k, v in kv.stats().items() if k not in VOLATILE_STATS}
    seqs = {s: (kv.block_table(s), [kv.seq_len(s, layer) for layer in (0, 1)],
                [tuple(x.cpu().clone() for x in kv.gather(s, layer)) for layer in (0, 1)])
            for s in env.live}
    return stats, seqs


def assert_unchanged(before, after):
    assert after[0] == before[0], "stats changed"
    for s, (table, lens, rows) in before[1].items():
        table2, lens2, rows2 = after[1][s]
        assert table2 == table and lens2 == lens, f"seq {s}"
        for layer, ((k, v), (k2, v2)) in enumerate(zip(rows, rows2)):
            assert_bits_equal(k2, k, f"k of seq {s} layer {layer}")
            assert_bits_equal(v2, v, f"v of seq {s} layer {layer}")


# Each method's good call, as keyword arguments; a case replaces one of them with a bad value.
def good_args(env, method):
    return {
        "append": lambda: dict(seqs=[env.c, env.a], layer=1, k=env.rows(3), v=env.rows(3),
                               lengths=[2, 1]),
        # c has 5 rows in layer 0: querying all of them is the boundary of what is allowed.
        "attend": lambda: dict(seqs=[env.a, env.c], layer=0, q=env.rows(7, heads=4),
                               lengths=[2, 5], scale=None),
        "gather": lambda: dict(seq=env.a, layer=1),
        "seq_len": lambda: dict(seq=env.a, layer=1),
        "block_table": lambda: dict(seq=env.a),
        "fork": lambda: dict(seq=env.a),
        "free": lambda: dict(seq=env.c),
    }[method]()


def call(env, method, args):
    kv = env.kv
    if method == "append":
        return kv.append(args["seqs"], args["layer"], args["k"], args["v"], lengths=args["lengths"])
    if method == "attend":
        return kv.attend(args["seqs"], args["layer"], args["q"], lengths=args["lengths"],
                         scale=args["scale"])
    if method in ("gather", "seq_len"):
        return getattr(kv, method)(args["seq"], args["layer"])
    return getattr(kv, method)(args["seq"])


def check_good_call(env, method, args, result):
    """The good call did what it should."""
    kv, stored = env.kv, env.stored
    if method == "append":
        for s, k, v in zip(args["seqs"], torch.split(args["k"], [2, 1]), torch.split(args["v"], [2, 1])):
            stored.append(s, 1, k, v)
        for s in env.live:
            for layer in (0, 1):
                k, v = kv.gather(s, layer)
                assert_bits_equal(k, stored.get(s, layer)[0], f"k of seq {s} layer {layer}")
                assert_bits_equal(v, stored.get(s, layer)[1], f"v of seq {s} layer {layer}")
    elif method == "attend":
        ref, _ = batched_attention_ref(args["q"], [stored.get(s, 0) for s in args["seqs"]], [2, 5])
        assert_close(result, ref, torch.float16)
    elif method == "gather":
        assert_bits_equal(result[0], stored.get(env.a, 1)[0], "k")
        assert_bits_equal(result[1], stored.get(env.a, 1)[1], "v")
    elif method == "seq_len":
        assert result == 6
    elif method == "block_table":
        assert len(result) == 3 and result == kv.block_table(env.b)
    elif method == "fork":
        assert result not in env.live and kv.seq_len(result, 0) == 10
        assert kv.block_table(result) == kv.block_table(env.a)
    elif method == "free":
        assert kv.stats()["device_blocks_used"] == 3
        with pytest.raises(KeyError):
            kv.seq_len(env.c)
    kv.check_invariants()


@dataclass
class Case:
    method: str
    name: str
    bad: Callable  # env -> {argument: bad value}
    exc: object
    match: Callable  # env -> regex the message must contain, or None


def names(arg):
    return lambda env: rf"\b{arg}\b"


def names_unknown_id(env):
    return rf"\b{env.unknown}\b"


def names_freed_id(env):
    return rf"\b{env.freed}\b"


EITHER = (TypeError, ValueError)
CASES = [
    Case("append", "k-dtype", lambda e: dict(k=e.rows(3).float()), TypeError, names("k")),
    Case("append", "v-dtype", lambda e: dict(v=e.rows(3).bfloat16()), TypeError, names("v")),
    Case("append", "k-heads", lambda e: dict(k=e.rows(3, heads=3)), ValueError, names("k")),
    Case("append", "k-head-dim", lambda e: dict(k=e.rows(3)[..., :32].contiguous()), ValueError,
         names("k")),
    Case("append", "k-2d", lambda e: dict(k=e.rows(3).flatten(1)), ValueError, names("k")),
    Case("append", "v-rows", lambda e: dict(v=e.rows(4)), ValueError, names("v")),
    Case("append", "k-device", lambda e: dict(k=e.rows(3).to(e.other_device)), EITHER, names("k")),
    Case("append", "v-device", lambda e: dict(v=e.rows(3).to(e.other_device)), EITHER, names("v")),
    Case("append", "lengths-sum", lambda e: dict(lengths=[2, 2]), ValueError, names("lengths")),
    Case("append", "lengths-negative", lambda e: dict(lengths=[4, -1]), ValueError,
         names("lengths")),
    Case("append", "lengths-count", lambda e: dict(lengths=[1, 1, 1]), ValueError,
         names("lengths")),
    Case("append", "lengths-indivisible", lambda e: dict(lengths=None), ValueError,
         lambda e: r"\blengths\b|\bk\b"),  # 3 rows over 2 sequences
    Case("append", "lengths-float", lambda e: dict(lengths=torch.tensor([2.0, 1.0])), EITHER,
         names("lengths")),
    Case("append", "seqs-unknown", lambda e: dict(seqs=[e.c, e.unknown]), KeyError,
         names_unknown_id),
    Case("append", "seqs-freed", lambda e: dict(seqs=[e.c, e.freed]), KeyError, names_freed_id),
    Case("append", "seqs-2d", lambda e: dict(seqs=torch.tensor([[e.c, e.a]])), EITHER,
         names("seqs")),
    Case("append", "seqs-float", lambda e: dict(seqs=torch.tensor([float(e.c), float(e.a)])),
         EITHER, names("seqs")),
    Case("append", "seqs-int", lambda e: dict(seqs=e.c, k=e.rows(1), v=e.rows(1), lengths=None),
         EITHER, names("seqs")),
    Case("append", "seqs-0d", lambda e: dict(seqs=torch.tensor(e.c), k=e.rows(1), v=e.rows(1),
                                              lengths=None), EITHER, names("seqs")),
    Case("append", "layer-high", lambda e: dict(layer=2), IndexError, names("layer")),
    Case("append", "layer-negative", lambda e: dict(layer=-3), IndexError, names("layer")),
    # c alone would fit (+11 blocks of 11 free) but a's copy-on-write needs more: all or nothing.
    Case("append", "out-of-blocks", lambda e: dict(k=e.rows(48), v=e.rows(48), lengths=[44, 4]),
         pagedkv.OutOfBlocksError, None),
    Case("attend", "q-dtype", lambda e: dict(q=e.rows(7, heads=4).float()), TypeError, names("q")),
    Case("attend", "q-heads", lambda e: dict(q=e.rows(7, heads=3)), ValueError, names("q")),
    Case("attend", "q-head-dim", lambda e: dict(q=e.rows(7, heads=4)[..., :32].contiguous()),
         ValueError, names("q")),
    Case("attend", "q-2d", lambda e: dict(q=e.rows(7, heads=4).flatten(1)), ValueError,
         names("q")),
    Case("attend", "q-device", lambda e: dict(q=e.rows(7, heads=4).to(e.other_device)), EITHER,
         names("q")),
    Case("attend", "lengths-beyond-seq", lambda e: dict(lengths=[1, 6]), ValueError,
         names("lengths")),
    Case("attend", "lengths-sum", lambda e: dict(lengths=[2, 4]), ValueError, names("lengths")),
    Case("attend", "lengths-count", lambda e: dict(lengths=[2, 4, 1]), ValueError,
         names("lengths")),
    Case("attend", "lengths-negative", lambda e: dict(lengths=[8, -1]), ValueError,
         names("lengths")),
    Case("attend", "seqs-unknown", lambda e: dict(seqs=[e.a, e.unknown]), KeyError,
         names_unknown_id),
    Case("attend", "layer-high", lambda e: dict(layer=2), IndexError, names("layer")),
    Case("attend", "scale-type", lambda e: dict(scale="x"), TypeError, names("scale")),
    Case("gather", "seq-unknown", lambda e: dict(seq=e.unknown), KeyError, names_unknown_id),
    Case("gather", "layer-high", lambda e: dict(layer=2), IndexError, names("layer")),
    Case("gather", "layer-negative", lambda e: dict(layer=-3), IndexError, names("layer")),
    Case("seq_len", "seq-unknown", lambda e: dict(seq=e.unknown), KeyError, names_unknown_id),
    Case("seq_len", "layer-high", lambda e: dict(layer=2), IndexError, names("layer")),
    Case("block_table", "seq-unknown", lambda e: dict(seq=e.unknown), KeyError, names_unknown_id),
    Case("fork", "seq-unknown", lambda e: dict(seq=e.unknown), KeyError, names_unknown_id),
    Case("fork", "seq-freed", lambda e: dict(seq=e.freed), KeyError, names_freed_id),
    Case("free", "seq-unknown", lambda e: dict(seq=e.unknown), KeyError, names_unknown_id),
    Case("free", "seq-freed-twice", lambda e: dict(seq=e.freed), KeyError, names_freed_id),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.method}-{c.name}" for c in CASES])
def test_bad_input_raises_and_changes_nothing(case, device, gen):
    env = Env(device, gen)
    args = good_args(env, case.method)
    bad = dict(args, **case.bad(env))
    before = snapshot(env)
    match = case.match(env) if case.match else None
    with pytest.raises(case.exc, match=match):
        call(env, case.method, bad)
    assert_unchanged(before, snapshot(env))
    check_good_call(env, case.method, args, call(env, case.method, args))


def test_out_of_blocks_error_is_a_memory_error():
    assert issubclass(pagedkv.OutOfBlocksError, MemoryError)


def test_exact_fit_then_out_of_blocks(device, gen):
    spec = CacheSpec(2, 2, 64, 4, torch.bfloat16, device)
    kv = spec.make(device_blocks=4)
    stored = StoredKV(spec)
    a, b = kv.add_sequence(), kv.add_sequence()
    append_rows(kv, spec, stored, gen, [a], 0, [16])  # exactly the whole pool
    append_rows(kv, spec, stored, gen, [a], 1, [16])  # into blocks a already has: no new block
    env = type("E", (), dict(kv=kv, live=[a, b]))
    before = snapshot(env)
    for seq in (a, b):
        with pytest.raises(pagedkv.OutOfBlocksError):
            kv.append([seq], 0, spec.rows(gen, 1), spec.rows(gen, 1))
        assert_unchanged(before, snapshot(env))
    kv.free(a)
    append_rows(kv, spec, stored, gen, [b], 1, [16])
    assert kv.stats()["device_blocks_used"] == 4 and kv.seq_len(b, 1) == 16
    kv.check_invariants()


def test_copy_on_write_out_of_blocks(device, gen):
    spec = CacheSpec(2, 1, 64, 4, torch.float16, device)
    kv = spec.make(device_blocks=4)
    stored = StoredKV(spec)
    a, c = kv.add_sequence(), kv.add_sequence()
    append_rows(kv, spec, stored, gen, [a, c], 0, [10, 4])  # 3 + 1 blocks: the pool is full
    b = kv.fork(a)
    env = type("E", (), dict(kv=kv, live=[a, b, c]))
    before = snapshot(env)
    for seq, layer in [(b, 0), (a, 0), (a, 1)]:  # (a, 1) writes into the full-in-layer-0 block 0
        with pytest.raises(pagedkv.OutOfBlocksError):
            kv.append([seq], layer, spec.rows(gen, 1), spec.rows(gen, 1))
        assert_unchanged(before, snapshot(env))
    append_rows(kv, spec, stored, gen, [c], 1, [4])  # c's own block: fits with nothing free
    kv.free(c)
    stored.rows[(b, 0)] = stored.get(a, 0)
    append_rows(kv, spec, stored, gen, [b], 0, [1])
    assert kv.block_table(b)[2] != kv.block_table(a)[2]
    for s in (a, b):
        k, v = kv.gather(s, 0)
        assert_bits_equal(k, stored.get(s, 0)[0], "k")
        assert_bits_equal(v, stored.get(s, 0)[1], "v")
    kv.check_invariants()


BASE_CTOR = dict(num_layers=2, num_kv_heads=2, head_dim=64, block_size=4, dtype=torch.float16,
                 device_blocks=8)
CTOR_CASES = [
    ("num_layers", 0), ("num_layers", -1), ("num_layers", 2.5), ("num_kv_heads", 0),
    ("num_kv_heads", -2), ("head_dim", 0), ("block_size", 0), ("block_size", -4),
    ("device_blocks", 0), ("device_blocks", -5), ("dtype", torch.float64), ("dtype", torch.int8),
    ("dtype", "nonsense"), ("device", "nonsense"), ("policy", "bogus"), ("window", 0),
    ("window", -1), ("sink_tokens", -1), ("positions", "bogus"),
]


@pytest.mark.parametrize("arg,value", CTOR_CASES, ids=[f"{a}={v}" for a, v in CTOR_CASES])
def test_bad_constructor_argument(arg, value, device):
    pagedkv.PagedKV(**BASE_CTOR, device=device)  # the base is good
    kw = dict(BASE_CTOR, device=device)
    kw[arg] = value
    with pytest.raises(EITHER, match=rf"\b{arg}\b"):
        pagedkv.PagedKV(**kw)


def test_constructor_requires_device_blocks(device):
    kw = dict(BASE_CTOR, device=device)
    del kw["device_blocks"]
    with pytest.raises(TypeError, match="device_blocks"):
        pagedkv.PagedKV(**kw)


def bad_input_messages(gen):
    """(where, exception) of every bad call above, each on a fresh cache on the CPU."""
    out = []
    for case in CASES:
        env = Env("cpu", gen)
        with pytest.raises(case.exc) as info:
            call(env, case.method, dict(good_args(env, case.method), **case.bad(env)))
        out.append((f"{case.method}-{case.name}", info.value))
    for arg, value in CTOR_CASES:
        with pytest.raises(EITHER) as info:
            pagedkv.PagedKV(**dict(BASE_CTOR, device="cpu", **{arg: value}))
        out.append((f"PagedKV({arg}={value!r})", info.value))
    # A decode step's rules (engine_step.cpp): a call that would change an open step's sequences,
    # and a step that does not fit.
    env = Env("cpu", gen)
    env.kv.begin_step([env.c])
    for name, bad in (("fork-in-step", lambda: env.kv.fork(env.c)),
                      ("free-in-step", lambda: env.kv.free(env.c)),
                      ("begin_step-unknown", lambda: env.kv.begin_step([env.unknown]))):
        with pytest.raises((ValueError, KeyError)) as info:
            bad()
        out.append((name, info.value))
    env.kv.end_step()
    with pytest.raises(pagedkv.OutOfBlocksError) as info:
        env.kv.begin_step([env.c], tokens=60)  # 15 more blocks, 11 free
    out.append(("begin_step-out-of-blocks", info.value))
    return out


def test_error_messages_carry_no_source_path(gen, tmp_path):
    """No message a user reads names a source file: `[/abs/path/engine.cpp:121]` goes to a debug
    build or an attribute (issue 14). Every bad-input message above, the constructor's, a
    decode step's, and the disk tier's faults (the user's own disk_path may appear)."""
    from test_tiers import disk_fault_error

    found = []
    for where, exc in bad_input_messages(gen):
        path = source_path_in(message_of(exc))
        if path:
            found.append(f"{where}: {message_of(exc)!r}")
    missing = tmp_path / "does-not-exist"
    with pytest.raises(OSError) as info:
        pagedkv.PagedKV(**dict(BASE_CTOR, device="cpu", host_blocks=2, disk_blocks=2, disk_path=missing))
    if source_path_in(message_of(info.value), missing):
        found.append(f"disk_path: {message_of(info.value)!r}")
    for kind in ("full", "short"):
        folder = tmp_path / kind
        folder.mkdir()
        message = disk_fault_error(kind, folder)
        if source_path_in(message, folder):
            found.append(f"disk fault {kind}: {message!r}")
    assert not found, f"{len(found)} messages name a source file:\n" + "\n".join(found)
