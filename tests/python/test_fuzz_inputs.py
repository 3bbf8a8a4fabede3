"""Bad-input fuzz over every public method of PagedKV, the constructor included (issue 18).

Each example builds a small tiered cache (device, host and disk tiers; a forked pair sharing a
partial block; one sequence offloaded), replaces one or two arguments of a good call with drawn
bad or edge values (wrong types, ints past int32/int64 both ways, NaN/inf floats, bools as strings,
tensors of the wrong dtype, shape, device or layout, unknown and freed ids), and makes the call.
A call that raises must raise TypeError, ValueError, KeyError, IndexError or OutOfBlocksError,
with no source path in the message, and must leave the engine as it was: stats, every sequence's
lengths and block table, and the gathered bytes of every layer (bit-exact). A call that succeeds
(the drawn value was a good one) must leave the invariants holding.

CI runs a bounded number of examples per test; `pytest tests/python/test_fuzz_inputs.py
--fuzz-examples 2500` runs more (conftest.py).
"""
from __future__ import annotations

import math
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pagedkv
from reference import message_of, source_path_in

LAYERS, HKV, HQ, D, BS = 2, 2, 4, 16, 4
# OSError: a disk_path the OS refuses (missing, read-only) is the OS's error, with its errno.
ALLOWED = (TypeError, ValueError, KeyError, IndexError, pagedkv.OutOfBlocksError, OSError)
VOLATILE_STATS = {"device_hits", "device_misses", "transfer_wait_s"}
CI_EXAMPLES = 60
_DIR = tempfile.TemporaryDirectory(prefix="pagedkv-fuzz-")


class Env:
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.kv = pagedkv.PagedKV(num_layers=LAYERS, num_kv_heads=HKV, head_dim=D, block_size=BS,
                                  dtype=torch.float32, device="cpu", device_blocks=6, host_blocks=6,
                                  disk_blocks=16, disk_path=_DIR.name)
        self.a, self.c = self.kv.add_sequence(), self.kv.add_sequence()
        for layer, (na, nc) in enumerate([(10, 5), (6, 5)]):
            k = torch.randn(na + nc, HKV, D, generator=g)
            self.kv.append([self.a, self.c], layer, k, -k, lengths=[na, nc])
        self.b = self.kv.fork(self.a)
        self.kv.offload([self.c])
        freed = self.kv.add_sequence()
        self.kv.free(freed)
        self.live = [self.a, self.b, self.c]
        self.unknown = freed
        self.g = g

    def rows(self, n, heads=HKV):
        return torch.randn(n, heads, D, generator=self.g)

    def snapshot(self):
        kv = self.kv
        stats = {k: v for k, v in kv.stats().items() if k not in VOLATILE_STATS}
        seqs = {s: (kv.block_table(s), [kv.seq_len(s, layer) for layer in range(LAYERS)],
                    [tuple(x.clone().view(torch.int32) for x in kv.gather(s, layer)) for layer in range(LAYERS)])
                for s in self.live}
        return stats, seqs, kv.sequences()


def good_args(env: Env, method: str) -> dict:
    a, c = env.a, env.c
    return {
        "append": dict(seqs=[c, a], layer=1, k=env.rows(3), v=env.rows(3), lengths=[2, 1]),
        "attend": dict(seqs=[a, c], layer=0, q=env.rows(7, HQ), lengths=[2, 5], scale=None,
                       return_lse=False, window=None),
        "gather": dict(seq=a, layer=1),
        "seq_len": dict(seq=a, layer=1),
        "block_table": dict(seq=a),
        "fork": dict(seq=a),
        "free": dict(seq=c),
        "truncate": dict(seq=a, tokens=3),
        "prepare": dict(seqs=[a, c]),
        "begin_step": dict(seqs=[c], tokens=1, num_q_heads=HQ),
        "prefetch": dict(seqs=[c]),
        "offload": dict(seqs=[a]),
        "end_step": {}, "add_sequence": {}, "stats": {}, "sequences": {}, "check_invariants": {},
    }[method]


METHODS = ["append", "attend", "gather", "seq_len", "block_table", "fork", "free", "truncate", "prepare",
           "begin_step", "prefetch", "offload", "end_step", "add_sequence", "stats", "sequences",
           "check_invariants"]

_EDGE_INTS = [0, 1, -1, 2, 3, 2**31 - 1, 2**31, 2**31 + 5, -2**31 - 1, 2**32, 2**40, 2**63 - 1, 2**63,
              -2**63, -2**63 - 1, 2**64, 2**100, -2**100]
_EDGE_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e39, -1e39, 1e-50, 3.5e38, 1.0, 0.5, -1.0]


def tensors():
    """Tensors of the wrong dtype, shape, device or layout (and a few right ones)."""
    def make(dtype, shape, where, layout):
        if where == "meta":
            return torch.empty(shape, dtype=dtype, device="meta")
        t = torch.zeros(shape, dtype=dtype)
        if layout == "strided" and t.dim() >= 1 and t.shape[0] > 1:
            t = t[::2]
        elif layout == "transposed" and t.dim() >= 2:
            t = t.transpose(0, 1)
        return t

    shapes = st.sampled_from([(), (0,), (3,), (3, HKV, D), (7, HQ, D), (2, HKV, D), (1, HKV, D), (3, HKV, D + 1),
                              (3, HKV + 1, D), (7, 3, D), (7, HQ, D, 1), (0, HKV, D), (4, 0, D)])
    dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32,
                              torch.int64, torch.bool, torch.uint8, torch.complex64])
    return st.builds(make, dtypes, shapes, st.sampled_from(["cpu", "cpu", "meta"]),
                     st.sampled_from(["plain", "plain", "strided", "transposed"]))


def bad_values(env: Env):
    ids = st.sampled_from([env.unknown, env.a, env.c, env.unknown + 10**6])
    scalar = st.one_of(
        st.none(), st.booleans(), st.sampled_from(_EDGE_INTS), st.integers(-2**70, 2**70),
        st.integers(-3, 40), st.sampled_from(_EDGE_FLOATS), st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(["no", "yes", "True", "1", "", "lru", "cpu"]),
        st.text(alphabet=st.characters(blacklist_characters="/\\"), max_size=4),
        st.just(b"x"), st.just(object()), st.just(1 + 2j), ids,
        st.builds(torch.tensor, st.integers(-2**40, 2**40)), st.builds(torch.tensor, st.floats(-5, 5)))
    lists = st.one_of(st.lists(scalar, max_size=3), st.tuples(scalar, scalar), st.lists(ids, max_size=3),
                      st.lists(st.sampled_from(_EDGE_INTS), max_size=3), tensors())
    return st.one_of(scalar, lists, tensors())


def check_raised(e: BaseException, what: str):
    assert isinstance(e, ALLOWED), f"{what}: {type(e).__name__}: {e}"
    msg = message_of(e)
    assert source_path_in(msg, _DIR.name) is None, f"{what}: source path in {msg!r}"


def examples(request) -> int:
    return request.config.getoption("--fuzz-examples") or CI_EXAMPLES


def fuzz_settings(n):
    return settings(max_examples=n, deadline=None, database=None, derandomize=False,
                    suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("method", METHODS)
def test_bad_arguments_raise_named_errors_and_change_nothing(method, request):
    counts = {"raised": 0, "accepted": 0}

    @fuzz_settings(examples(request))
    @given(data=st.data())
    def case(data):
        env = Env()
        args = good_args(env, method)
        if args:
            names = data.draw(st.lists(st.sampled_from(sorted(args)), min_size=1, max_size=2, unique=True))
            for name in names:
                args[name] = data.draw(bad_values(env), label=name)
        else:  # no arguments: an extra positional or keyword one
            if data.draw(st.booleans()):
                args = {"bogus": data.draw(bad_values(env))}
        before = env.snapshot()
        try:
            getattr(env.kv, method)(**args)
        except BaseException as e:  # noqa: BLE001 - checked by type
            check_raised(e, f"{method}({args!r})")
            counts["raised"] += 1
            assert _same(env.snapshot(), before), f"{method}({args!r}) changed state"
            env.kv.check_invariants()
            return
        counts["accepted"] += 1
        env.kv.end_step()
        env.kv.check_invariants()

    case()
    print(f"\n{method}: {counts}")


def _same(a, b) -> bool:
    (sa, qa, la), (sb, qb, lb) = a, b
    if sa != sb or la != lb:
        return False
    for s, (table, lens, rows) in qb.items():
        table2, lens2, rows2 = qa[s]
        if table2 != table or lens2 != lens:
            return False
        for (k, v), (k2, v2) in zip(rows, rows2):
            if not (torch.equal(k, k2) and torch.equal(v, v2)):
                return False
    return True


BASE_CTOR = dict(num_layers=2, num_kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32, device="cpu",
                 device_blocks=8, host_blocks=8, disk_blocks=8, disk_path=None, policy="lru", window=None,
                 sink_tokens=0, retain=True, rope=None, positions="original", watermarks=(0.02, 0.05),
                 staging="kernel", gather_shape=None, copy_batch="batch", disk_checksum=True,
                 disk_read_piece=512 * 1024, disk_crc="crc32")


def ctor_values():
    # Ints either small or past the bounds: an in-range huge size would really be allocated.
    ints = st.one_of(st.integers(-3, 40), st.sampled_from([2**31, 2**31 + 5, 2**40, 2**63, 2**64, -2**63 - 1,
                                                           2**100, -1, 0]))
    return st.one_of(
        ints, st.none(), st.booleans(), st.sampled_from(_EDGE_FLOATS), st.sampled_from(["no", "cuda", "cpu:1", "",
                                                                                      "meta", "lru", "window"]),
        st.just(object()), st.tuples(ints, ints), st.tuples(ints, ints, ints),
        st.tuples(st.sampled_from(_EDGE_FLOATS), st.sampled_from(_EDGE_FLOATS)),
        st.sampled_from([torch.float64, torch.int8, torch.bfloat16, torch.float16]),
        st.sampled_from([pagedkv.policies.LRU(), pagedkv.policies.Hybrid()]))


def test_bad_constructor_arguments_raise_named_errors(request):
    counts = {"raised": 0, "accepted": 0}

    @fuzz_settings(examples(request) * 3)
    @given(data=st.data())
    def case(data):
        args = dict(BASE_CTOR, disk_path=_DIR.name)
        names = data.draw(st.lists(st.sampled_from(sorted(BASE_CTOR)), min_size=1, max_size=2, unique=True))
        for name in names:
            args[name] = data.draw(ctor_values(), label=name)
        try:
            kv = pagedkv.PagedKV(**args)
        except BaseException as e:  # noqa: BLE001 - checked by type
            check_raised(e, f"PagedKV({ {n: args[n] for n in names}!r})")
            counts["raised"] += 1
            return
        counts["accepted"] += 1
        kv.check_invariants()

    case()
    print(f"\nPagedKV(): {counts}")


@pytest.mark.parametrize("name", ["recent_blocks", "sink_blocks"])
def test_policy_sizes_are_bounded(name):
    for bad in (2**31, 2**40, -1):
        with pytest.raises(ValueError, match=name):
            pagedkv.policies.Window(**{name: bad})
    with pytest.raises(TypeError, match=name):
        pagedkv.policies.Window(**{name: 2.0})
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="weight"):
            pagedkv.policies.Hybrid(recency_weight=bad)
