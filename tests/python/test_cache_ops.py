"""append / gather / fork / free / block_table / stats / pool: bit-exact against what was appended."""
import re

import pytest
import torch

from reference import (CacheSpec, StoredKV, append_rows, assert_bits_equal, assert_close,
                       attention_ref, best_dtype, randn, same_device, skip_if_unsupported)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STATS_KEYS = ["device_blocks_used", "device_blocks_free", "host_blocks_used", "host_blocks_free",
              "disk_blocks_used", "disk_blocks_free", "blocks_to_host", "blocks_from_host",
              "blocks_to_disk", "blocks_from_disk", "bytes_to_host", "bytes_from_host",
              "bytes_to_disk", "bytes_from_disk", "evictions", "drops", "device_hits",
              "device_misses"]


def used(kv):
    st = kv.stats()
    assert st["device_blocks_used"] + st["device_blocks_free"] == kv.pool.shape[0]
    return st["device_blocks_used"]


def check_gather(kv, stored, seq, layer):
    k, v = kv.gather(seq, layer)
    want_k, want_v = stored.get(seq, layer)
    assert_bits_equal(k, want_k, f"k of seq {seq} layer {layer}")
    assert_bits_equal(v, want_v, f"v of seq {seq} layer {layer}")


def special_rows(spec, gen, n):
    """Random rows with the values a lossy copy would change: -0.0, inf, the extremes, subnormals."""
    x = randn(gen, (n, spec.num_kv_heads, spec.head_dim), spec.dtype, "cpu")
    fi = torch.finfo(spec.dtype)
    flat = x.view(-1)
    specials = torch.tensor([-0.0, float("inf"), float("-inf"), fi.max, -fi.max, fi.tiny,
                             fi.tiny / 4, -fi.smallest_normal / 8], dtype=spec.dtype)
    flat[: len(specials)] = specials
    return x.to(spec.device)


def test_stats_keys_and_types(device):
    kv = CacheSpec(2, 2, 64, 16, torch.float16, device).make(device_blocks=10)
    st = kv.stats()
    for key in STATS_KEYS:
        assert isinstance(st[key], int) and not isinstance(st[key], bool), (key, st[key])
    assert isinstance(st["transfer_wait_s"], float)
    assert (st["device_blocks_used"], st["device_blocks_free"]) == (0, 10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_append_across_block_boundaries_gathers_bit_exact(block_size, dtype, device, gen):
    skip_if_unsupported(device, dtype)
    spec = CacheSpec(2, 3, 64, block_size, dtype, device)
    kv = spec.make(device_blocks=spec.blocks_for([108]) + 1)
    stored = StoredKV(spec)
    s = kv.add_sequence()
    assert isinstance(s, int) and kv.seq_len(s) == 0 and kv.block_table(s) == []
    total = 0
    for n in [1, 2, 5, 16, 17, 1, 33, 33]:
        k, v = special_rows(spec, gen, n), spec.rows(gen, n)
        kv.append([s], 0, k, v)
        stored.append(s, 0, k, v)
        total += n
        assert kv.seq_len(s) == kv.seq_len(s, 0) == total
        table = kv.block_table(s)
        assert len(table) == -(-total // block_size)
        assert all(tier == "device" for tier, _ in table)
        assert len({slot for _, slot in table}) == len(table)
        assert used(kv) == len(table)
        check_gather(kv, stored, s, 0)
    k, v = kv.gather(s, 0)
    assert k.dtype == dtype and same_device(k.device, device) and k.shape == (total, 3, 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ragged_multi_sequence_append(dtype, device, gen, rng):
    skip_if_unsupported(device, dtype)
    spec = CacheSpec(2, 2, 80, 3, dtype, device)
    kv = spec.make(device_blocks=60)
    stored = StoredKV(spec)
    seqs = [kv.add_sequence() for _ in range(4)]
    for step in range(6):
        chosen = rng.sample(seqs, rng.randint(1, 4))
        lens = [rng.randint(1, 9) for _ in chosen]
        append_rows(kv, spec, stored, gen, chosen, step % 2, lens, as_tensor=step % 3 == 0)
        kv.check_invariants()
    for s in seqs:
        for layer in (0, 1):
            assert kv.seq_len(s, layer) == stored.length(s, layer)
            check_gather(kv, stored, s, layer)
        most = max(stored.length(s, 0), stored.length(s, 1))
        assert len(kv.block_table(s)) == -(-most // 3)
    # Default lengths: N / len(seqs) rows each.
    k, v = spec.rows(gen, 8), spec.rows(gen, 8)
    kv.append(seqs, 1, k, v)
    for i, s in enumerate(seqs):
        stored.append(s, 1, k[2 * i: 2 * i + 2], v[2 * i: 2 * i + 2])
        check_gather(kv, stored, s, 1)


def test_lengths_are_per_layer(device, gen):
    spec = CacheSpec(3, 2, 64, 4, torch.float16, device)
    kv = spec.make(device_blocks=10)
    stored = StoredKV(spec)
    s = kv.add_sequence()
    append_rows(kv, spec, stored, gen, [s], 0, [5])
    assert [kv.seq_len(s, layer) for layer in range(3)] == [5, 0, 0]
    k1, v1 = kv.gather(s, 1)
    assert k1.shape == v1.shape == (0, 2, 64)
    append_rows(kv, spec, stored, gen, [s], 2, [3])
    assert [kv.seq_len(s, layer) for layer in range(3)] == [5, 0, 3]
    assert len(kv.block_table(s)) == 2 and used(kv) == 2  # layer 2 writes into blocks layer 0 made
    append_rows(kv, spec, stored, gen, [s], 2, [9])  # layer 2 now leads: 12 tokens, 3 blocks
    assert [kv.seq_len(s, layer) for layer in range(3)] == [5, 0, 12]
    assert len(kv.block_table(s)) == 3 and used(kv) == 3
    for layer in range(3):
        check_gather(kv, stored, s, layer)


def test_fork_shares_until_written(device, gen):
    spec = CacheSpec(2, 2, 64, 4, torch.bfloat16, device)
    kv = spec.make(device_blocks=12)
    stored = StoredKV(spec)
    a = kv.add_sequence()
    for layer in (0, 1):
        append_rows(kv, spec, stored, gen, [a], layer, [6])  # block 0 full, block 1 holds 2 rows
    b = kv.fork(a)
    assert b != a and [kv.seq_len(b, layer) for layer in (0, 1)] == [6, 6]
    assert kv.block_table(b) == kv.block_table(a) and used(kv) == 2
    for layer in (0, 1):
        stored.rows[(b, layer)] = stored.get(a, layer)
        check_gather(kv, stored, b, layer)

    append_rows(kv, spec, stored, gen, [b], 0, [1])  # copy-on-write of the shared partial block
    ta, tb = kv.block_table(a), kv.block_table(b)
    assert tb[0] == ta[0] and tb[1] != ta[1] and used(kv) == 3
    append_rows(kv, spec, stored, gen, [a], 0, [1])  # a's block 1 is its own now: no new block
    assert kv.block_table(a)[0] == kv.block_table(b)[0] and used(kv) == 3
    for s in (a, b):
        for layer in (0, 1):
            check_gather(kv, stored, s, layer)  # the copy kept layer 1's rows; no write leaked

    append_rows(kv, spec, stored, gen, [b], 0, [6])  # 13 rows: b alone gets block 3
    assert len(kv.block_table(b)) == 4 and len(kv.block_table(a)) == 2 and used(kv) == 5
    for s in (a, b):
        check_gather(kv, stored, s, 0)


def test_fork_copies_a_block_full_in_one_layer_but_not_another(device, gen):
    # Layer 0 fills block 0, layer 1 has 3 rows in it: a write to layer 1 must copy block 0.
    spec = CacheSpec(2, 1, 64, 4, best_dtype(device), device)
    kv = spec.make(device_blocks=6)
    stored = StoredKV(spec)
    c = kv.add_sequence()
    append_rows(kv, spec, stored, gen, [c], 0, [8])
    append_rows(kv, spec, stored, gen, [c], 1, [3])
    d = kv.fork(c)
    for layer in (0, 1):
        stored.rows[(d, layer)] = stored.get(c, layer)
    append_rows(kv, spec, stored, gen, [d], 1, [1])
    tc, td = kv.block_table(c), kv.block_table(d)
    assert td[0] != tc[0] and td[1] == tc[1] and used(kv) == 3
    for s in (c, d):
        for layer in (0, 1):
            check_gather(kv, stored, s, layer)


def test_free_returns_blocks(device, gen):
    spec = CacheSpec(2, 2, 64, 4, torch.float16, device)
    kv = spec.make(device_blocks=8)
    stored = StoredKV(spec)
    a, b = kv.add_sequence(), kv.add_sequence()
    append_rows(kv, spec, stored, gen, [a, b], 0, [10, 5])  # 3 + 2 blocks
    c = kv.fork(a)
    stored.rows[(c, 0)] = stored.get(a, 0)
    append_rows(kv, spec, stored, gen, [c], 0, [1])  # copies a's partial block 2
    assert used(kv) == 6
    kv.free(a)  # blocks 0, 1 stay, held by c; a's own block 2 goes
    assert used(kv) == 5
    with pytest.raises(KeyError):
        kv.seq_len(a)
    check_gather(kv, stored, c, 0)
    kv.free(c)
    kv.free(b)
    assert used(kv) == 0
    d = kv.add_sequence()  # every block is usable again
    append_rows(kv, spec, stored, gen, [d], 1, [32])
    assert used(kv) == 8
    check_gather(kv, stored, d, 1)


def test_pool_is_a_zero_copy_view_in_the_documented_layout(device, gen):
    spec = CacheSpec(3, 2, 64, 3, torch.float16, device)
    kv = spec.make(device_blocks=9)
    pool = kv.pool
    assert pool.shape == (9, 3, 2, 2, 3, 64) and pool.dtype == torch.float16
    assert same_device(pool.device, device) and pool.is_contiguous()
    assert kv.pool.data_ptr() == pool.data_ptr()
    s = kv.add_sequence()
    kv.append([s], 0, spec.rows(gen, 4), spec.rows(gen, 4))
    k, v = spec.rows(gen, 7), spec.rows(gen, 7)
    kv.append([s], 1, k, v)
    table = kv.block_table(s)
    for t in range(7):
        tier, slot = table[t // 3]
        assert tier == "device"
        # `pool` was taken before the append: a view sees the engine's writes, a copy would not.
        assert_bits_equal(pool[slot, 1, 0, :, t % 3], k[t], f"k row {t}")
        assert_bits_equal(pool[slot, 1, 1, :, t % 3], v[t], f"v row {t}")
    x = randn(gen, (64,), torch.float16, device)
    pool[table[2][1], 1, 1, 1, 0] = x  # token 6, V, head 1: the engine reads the same memory
    assert_bits_equal(kv.gather(s, 1)[1][6, 1], x, "write through the pool view")


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_seqs_and_lengths_as_list_or_tensor(index_dtype, device, seed):
    spec = CacheSpec(2, 2, 64, 4, best_dtype(device), device)
    kvs = [spec.make(device_blocks=20) for _ in range(2)]
    outs = []
    for as_tensor, kv in zip([False, True], kvs):
        gen = torch.Generator().manual_seed(seed)  # both caches get the same rows
        ids = [kv.add_sequence() for _ in range(3)]
        wrap = (lambda x: torch.tensor(x, dtype=index_dtype, device=device)) if as_tensor else list
        for layer, lens in [(0, [5, 1, 9]), (1, [2, 2, 2]), (0, [4, 7, 1])]:
            k, v = spec.rows(gen, sum(lens)), spec.rows(gen, sum(lens))
            kv.append(wrap(ids), layer, k, v, lengths=wrap(lens))
        q = spec.rows(gen, 6, heads=4)
        outs.append((kv.attend(wrap(ids), 0, q, lengths=wrap([1, 2, 3])),
                     [kv.gather(s, layer) for s in ids for layer in (0, 1)]))
    assert_bits_equal(outs[0][0], outs[1][0], "attend")
    for (k0, v0), (k1, v1) in zip(outs[0][1], outs[1][1]):
        assert_bits_equal(k0, k1, "k")
        assert_bits_equal(v0, v1, "v")


def test_repr_shows_dims(device):
    kv = CacheSpec(3, 5, 80, 7, torch.bfloat16, device).make(device_blocks=11)
    text = repr(kv)
    for value in ["3", "5", "80", "7"]:
        assert re.search(rf"\b{value}\b", text), (value, text)
    assert "bfloat16" in text, text


@pytest.mark.parametrize("chunk", [1, 5])
def test_window_without_retain_drops_out_of_scope_blocks(chunk, device, gen):
    bs, window, sinks = 4, 6, 2
    spec = CacheSpec(2, 2, 64, bs, best_dtype(device), device)
    kv = spec.make(device_blocks=8, window=window, sink_tokens=sinks, retain=False)
    stored = StoredKV(spec)
    s = kv.add_sequence()
    dropped, start = set(), 0
    while start < 60:
        append_rows(kv, spec, stored, gen, [s], 0, [chunk])
        # Layer 1 has not moved yet: its next queries still see what they saw, so nothing new goes.
        assert {b for b, (tier, _) in enumerate(kv.block_table(s)) if tier == "dropped"} == dropped
        append_rows(kv, spec, stored, gen, [s], 1, [chunk])
        # Row `start` (the first just appended) sees keys > start - window, and the sinks.
        dropped = {b for b in range(len(kv.block_table(s)))
                   if b * bs >= sinks and (b + 1) * bs - 1 <= start - window}
        table = kv.block_table(s)
        assert {b for b, (tier, _) in enumerate(table) if tier == "dropped"} == dropped, start
        assert all(entry == ("dropped", -1) for b, entry in enumerate(table) if b in dropped)
        assert used(kv) == len(table) - len(dropped)
        start += chunk
        q = spec.rows(gen, chunk, heads=4)
        ref, _ = attention_ref(q, *stored.get(s, 1), window=window, sink_tokens=sinks)
        assert_close(kv.attend([s], 1, q), ref, spec.dtype)
    assert dropped and kv.stats()["drops"] > 0
    with pytest.raises(ValueError):
        kv.gather(s, 0)


def test_window_with_retain_keeps_every_block(device, gen):
    spec = CacheSpec(1, 2, 64, 4, torch.float16, device)
    kv = spec.make(device_blocks=16, window=5, sink_tokens=1)
    stored = StoredKV(spec)
    s = kv.add_sequence()
    for _ in range(20):
        append_rows(kv, spec, stored, gen, [s], 0, [3])
    assert all(tier == "device" for tier, _ in kv.block_table(s)) and used(kv) == 15
    check_gather(kv, stored, s, 0)


def test_truncate_keeps_the_prefix_and_frees_the_rest(device, gen):
    spec = CacheSpec(2, 2, 64, 4, torch.float16, device)
    kv = spec.make(device_blocks=16)
    s = kv.add_sequence()
    k, v = randn(gen, (13, 2, 64), torch.float16, device), randn(gen, (13, 2, 64), torch.float16, device)
    kv.append([s], 0, k, v)
    kv.append([s], 1, k[:6], v[:6])
    t = kv.fork(s)
    kv.truncate(s, 5)
    assert (kv.seq_len(s, 0), kv.seq_len(s, 1)) == (5, 5)
    assert len(kv.block_table(s)) == 2
    k2 = randn(gen, (3, 2, 64), torch.float16, device)
    kv.append([s], 0, k2, k2)  # lands in the block shared with t: copied first
    assert torch.equal(kv.gather(s, 0)[0], torch.cat([k[:5], k2]))
    assert torch.equal(kv.gather(t, 0)[0], k)
    kv.check_invariants()
    with pytest.raises(ValueError, match="tokens"):
        kv.truncate(s, -1)
    with pytest.raises(KeyError):
        kv.truncate(12345, 1)
    kv.free(t)
    kv.truncate(s, 0)
    assert kv.stats()["device_blocks_used"] == 0
    kv.check_invariants()
