"""Numeric edges and decode-step edges of issue 18 (defects 5 and 6), each checked once at the
boundary: messages name the call and the argument, never a source path or nanobind's signature
dump, and a refused call changes nothing."""
import math
import time

import pytest
import torch

import pagedkv
from reference import assert_bits_equal, message_of, source_path_in

LAYERS, HKV, HQ, D, BS = 2, 2, 4, 16, 4


def make(tmp_path=None, **kw):
    args = dict(num_layers=LAYERS, num_kv_heads=HKV, head_dim=D, block_size=BS, dtype=torch.float32,
                device="cpu", device_blocks=16)
    args.update(kw)
    return pagedkv.PagedKV(**args)


def filled(gen, rows=(6, 6)):
    kv = make()
    s = kv.add_sequence()
    data = []
    for layer, n in enumerate(rows):
        k, v = torch.randn(n, HKV, D, generator=gen), torch.randn(n, HKV, D, generator=gen)
        kv.append([s], layer, k, v)
        data.append((k, v))
    return kv, s, data


VOLATILE_STATS = {"device_hits", "device_misses", "transfer_wait_s"}  # counters reads may move


def state(kv):
    return ({k: v for k, v in kv.stats().items() if k not in VOLATILE_STATS}, {s: ([kv.seq_len(s, layer) for layer in range(LAYERS)], kv.block_table(s),
                             [[x.clone() for x in kv.gather(s, layer)] for layer in range(LAYERS)])
                         for s in kv.sequences()})


def assert_same(a, b):
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for s in a[1]:
        (la, ta, ga), (lb, tb, gb) = a[1][s], b[1][s]
        assert la == lb and ta == tb
        for (ka, va), (kb, vb) in zip(ga, gb):
            assert_bits_equal(ka, kb)
            assert_bits_equal(va, vb)


def clean(e, *names):
    msg = message_of(e.value)
    assert "incompatible function arguments" not in msg, msg
    assert source_path_in(msg) is None, msg
    for n in names:
        assert n in msg, (n, msg)


# -- defect 5: numeric edges -----------------------------------------------------------------

@pytest.mark.parametrize("scale", [1e39, -1e39, 3.5e38, math.inf, math.nan, 1e-50, 0.0, -1.0, 2**200])
def test_scale_must_be_positive_and_finite_as_float32(gen, scale):
    kv, s, _ = filled(gen)
    with pytest.raises(ValueError) as e:
        kv.attend([s], 0, torch.randn(1, HQ, D, generator=gen), scale=scale)
    clean(e, "attend()", "scale")
    out = kv.attend([s], 0, torch.randn(1, HQ, D, generator=gen), scale=3.4e38)  # finite as float32
    assert out.shape == (1, HQ, D)


@pytest.mark.parametrize("value", ["no", "", 0, 1, None, 1.0])
def test_return_lse_must_be_a_bool(gen, value):
    kv, s, _ = filled(gen)
    with pytest.raises(TypeError) as e:
        kv.attend([s], 0, torch.randn(1, HQ, D, generator=gen), return_lse=value)
    clean(e, "attend()", "return_lse")


@pytest.mark.parametrize("arg", ["device_blocks", "host_blocks", "disk_blocks"])
@pytest.mark.parametrize("value", [2**31 + 5, 2**40, 2**64])
def test_tier_sizes_past_int32_slots_are_refused_at_once(tmp_path, arg, value):
    kw = dict(host_blocks=4, disk_blocks=0, disk_path=str(tmp_path))
    kw[arg] = value
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as e:
        make(**kw)
    assert time.perf_counter() - t0 < 1.0, "the check came after an allocation"
    clean(e, arg)


def test_tiers_together_past_int32_block_ids_are_refused(tmp_path):
    with pytest.raises(ValueError) as e:
        make(device_blocks=2**30, host_blocks=2**30, disk_blocks=2**30, disk_path=str(tmp_path))
    clean(e, "block ids")


@pytest.mark.parametrize("arg", ["num_layers", "num_kv_heads", "block_size", "window", "sink_tokens"])
def test_other_sizes_past_int32_are_value_errors(arg):
    kw = {arg: 2**40}
    if arg == "sink_tokens":
        kw["window"] = 8
    with pytest.raises(ValueError) as e:
        make(**kw)
    clean(e, arg)


@pytest.mark.parametrize("kw, name", [(dict(recent_blocks=2**40), "recent_blocks"),
                                      (dict(sink_blocks=2**31), "sink_blocks"),
                                      (dict(recent_blocks=-1), "recent_blocks")])
def test_window_policy_sizes_are_bounded(kw, name):
    with pytest.raises(ValueError) as e:
        pagedkv.policies.Window(**kw)
    clean(e, name)


@pytest.mark.parametrize("kw", [dict(recency_weight=math.nan), dict(frequency_weight=math.inf),
                                dict(recency_weight=-1.0)])
def test_hybrid_policy_weights_are_finite(kw):
    with pytest.raises(ValueError) as e:
        pagedkv.policies.Hybrid(**kw)
    clean(e, next(iter(kw)))


BIG_IDS = [2**63, 2**64, -2**63 - 1, 2**100, -5, 2**63 - 1, -2**63]


@pytest.mark.parametrize("seq", BIG_IDS)
@pytest.mark.parametrize("call", ["fork", "free", "seq_len", "gather", "block_table", "truncate"])
def test_ids_of_any_int_are_key_errors_naming_them(gen, seq, call):
    kv, s, _ = filled(gen)
    before = state(kv)
    args = (seq, 1) if call == "truncate" else (seq,)
    with pytest.raises(KeyError) as e:
        getattr(kv, call)(*args)
    clean(e, f"{call}()", str(seq))
    assert_same(state(kv), before)


@pytest.mark.parametrize("seq", BIG_IDS)
@pytest.mark.parametrize("call", ["append", "attend", "prefetch", "offload", "begin_step", "prepare"])
def test_ids_of_any_int_in_batches_are_key_errors(gen, seq, call):
    kv, s, _ = filled(gen)
    kv2 = make(host_blocks=8) if call == "offload" else kv
    if call == "offload":
        s = kv2.add_sequence()
    before = state(kv2)
    rows = torch.randn(2, HKV, D, generator=gen)
    q = torch.randn(2, HQ, D, generator=gen)
    calls = {"append": lambda: kv2.append([s, seq], 0, rows, rows), "attend": lambda: kv2.attend([s, seq], 0, q),
             "prefetch": lambda: kv2.prefetch([s, seq]), "offload": lambda: kv2.offload([s, seq]),
             "begin_step": lambda: kv2.begin_step([s, seq]), "prepare": lambda: kv2.prepare([s, seq])}
    with pytest.raises(KeyError) as e:
        calls[call]()
    clean(e, f"{call}()", str(seq))
    assert_same(state(kv2), before)


@pytest.mark.parametrize("n", [2**31, 2**40, 2**64, -1])
def test_lengths_of_any_int_are_value_errors(gen, n):
    kv, s, _ = filled(gen)
    t = kv.add_sequence()
    before = state(kv)
    rows = torch.randn(2, HKV, D, generator=gen)
    for call in (lambda: kv.append([s, t], 0, rows, rows, lengths=[n, 2 - n]),
                 lambda: kv.attend([s, t], 0, torch.randn(2, HQ, D, generator=gen), lengths=[n, 2 - n])):
        with pytest.raises(ValueError) as e:
            call()
        clean(e, "lengths")
    for call, name in ((lambda: kv.truncate(s, n), "tokens"), (lambda: kv.begin_step([s], tokens=n), "tokens"),
                       (lambda: kv.attend([s], 0, torch.randn(1, HQ, D), window=n), "window")):
        with pytest.raises(ValueError) as e:
            call()
        clean(e, name)
    assert_same(state(kv), before)


def test_gather_of_an_unknown_id_names_gather(gen):
    kv, s, _ = filled(gen)
    with pytest.raises(KeyError) as e:
        kv.gather(s + 100)
    clean(e, "gather()", str(s + 100))
    assert "seq_len()" not in message_of(e.value)


def test_ids_from_meta_tensors_are_type_errors(gen):
    kv, s, _ = filled(gen)
    with pytest.raises(TypeError) as e:
        kv.fork(torch.tensor(s, device="meta"))
    clean(e, "fork()")
    with pytest.raises(TypeError):
        kv.prefetch(torch.tensor([s], device="meta"))


# -- defect 6: decode-step edges ------------------------------------------------------------

def test_end_step_without_a_step_does_nothing(gen):
    """Like closing a closed file: no error, nothing changes (DESIGN.md §5)."""
    kv, s, _ = filled(gen)
    before = state(kv)
    kv.end_step()
    kv.end_step()
    assert_same(state(kv), before)
    kv.begin_step([s])
    for layer in range(LAYERS):
        row = torch.randn(1, HKV, D, generator=gen)
        kv.append([s], layer, row, row)
    kv.end_step()
    kv.end_step()  # twice: the second is a no-op
    assert kv.seq_len(s, 0) == 7


def test_rows_a_step_reserved_but_never_wrote_are_given_back(gen):
    kv, s, data = filled(gen, rows=(8, 8))  # 2 blocks
    used = kv.stats()["device_blocks_used"]
    kv.begin_step([s], tokens=1)
    assert kv.seq_len(s, 0) == kv.seq_len(s, 1) == 9  # reserved rows count from begin_step on
    assert kv.stats()["device_blocks_used"] == used + 1
    # gather leaves out the rows no append wrote
    k, v = kv.gather(s, 1)
    assert k.shape[0] == 8
    assert_bits_equal(k, data[1][0])
    row_k, row_v = torch.randn(1, HKV, D, generator=gen), torch.randn(1, HKV, D, generator=gen)
    kv.append([s], 0, row_k, row_v)
    # begin_step while layer 1 was never appended: refused, nothing changes
    before = state(kv)
    with pytest.raises(ValueError) as e:
        kv.begin_step([s])
    clean(e, "begin_step()", "layer 1", "end_step()")
    assert_same(state(kv), before)
    kv.end_step()
    assert kv.seq_len(s, 0) == 9 and kv.seq_len(s, 1) == 8
    k0, v0 = kv.gather(s, 0)
    assert_bits_equal(k0, torch.cat([data[0][0], row_k]))
    assert_bits_equal(v0, torch.cat([data[0][1], row_v]))
    k1, _ = kv.gather(s, 1)
    assert_bits_equal(k1, data[1][0])
    kv.check_invariants()
    # Layer 1 goes on from where it was: appends and attention see exactly the written rows.
    kv.append([s], 1, row_k, row_v)
    assert kv.seq_len(s, 1) == 9
    kv.check_invariants()


def test_a_step_with_no_layer_written_gives_its_blocks_back(gen):
    kv, s, data = filled(gen, rows=(8, 8))
    before = state(kv)
    kv.begin_step([s], tokens=3)
    kv.end_step()
    assert_same(state(kv), before)  # lengths, blocks, bytes
    kv.check_invariants()
