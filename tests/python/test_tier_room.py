"""Calls whose blocks fit in the tiers together must run however the blocks are spread over
them (issue 18, defect 2), and truncate must not leave a sequence that can never grow again
(defect 3). Oracles: gather bit-exact against the rows appended; attend against a float64 dense
reference and against the same operations on an engine without tiers."""
import pytest
import torch

import pagedkv
from reference import assert_bits_equal, assert_close, attention_ref, randn

H, D, BS, LAYERS = 2, 32, 4, 2
DTYPE = torch.float32


def make(tmp_path, device_blocks, host_blocks=0, disk_blocks=0, **kw):
    return pagedkv.PagedKV(num_layers=LAYERS, num_kv_heads=H, head_dim=D, block_size=BS, dtype=DTYPE,
                           device="cpu", device_blocks=device_blocks, host_blocks=host_blocks,
                           disk_blocks=disk_blocks, disk_path=tmp_path if disk_blocks else None, **kw)


def fill(kvs, gen, lengths):
    """One sequence per length on every cache of `kvs`, the same rows in each; -> (ids, rows)."""
    ids, rows = [], []
    for n in lengths:
        per_layer = []
        seq = [kv.add_sequence() for kv in kvs]
        for layer in range(LAYERS):
            k, v = randn(gen, (n, H, D), DTYPE, "cpu"), randn(gen, (n, H, D), DTYPE, "cpu")
            for kv, s in zip(kvs, seq):
                kv.append([s], layer, k, v)
            per_layer.append((k, v))
        ids.append(seq)
        rows.append(per_layer)
    return ids, rows


def test_issue_situation_attend_runs(tmp_path, gen):
    """Device 6 / host 8 / disk 48 blocks, A 36 rows and B 24 rows (9 + 6 blocks of 4): attend([A])
    used to raise OutOfBlocksError with 47 of 62 blocks free."""
    tiered = make(tmp_path, 6, 8, 48)
    flat = make(tmp_path, 64)
    (a, b), rows = fill([tiered, flat], gen, [36, 24])
    tiered.check_invariants()
    free = sum(tiered.stats()[f"{t}_blocks_free"] for t in ("device", "host", "disk"))
    assert free == 62 - 15
    for layer in range(LAYERS):
        for n in (1, 3, 36):
            q = randn(gen, (n, 4, D), DTYPE, "cpu")
            out, lse = tiered.attend([a[0]], layer, q, return_lse=True)
            want, want_lse = flat.attend([a[1]], layer, q, return_lse=True)
            ref, ref_lse = attention_ref(q, *rows[0][layer])
            assert_close(out, ref, DTYPE)
            assert_close(lse, ref_lse, DTYPE, tol=(2e-5, 1e-5), what="lse")
            assert_close(out, want.double(), DTYPE, what="vs the engine without tiers")
            tiered.check_invariants()
        k, v = tiered.gather(a[0], layer)
        assert_bits_equal(k, rows[0][layer][0])
        assert_bits_equal(v, rows[0][layer][1])


@pytest.mark.parametrize("window,sinks", [(None, 0), (10, 0), (9, 4)])
def test_attend_batch_over_every_tier(tmp_path, gen, window, sinks):
    """A batch whose scope is spread over device, host and disk, larger than device + host."""
    kw = dict(window=window, sink_tokens=sinks) if window else {}
    tiered = make(tmp_path, 4, 3, 40, **kw)
    flat = make(tmp_path, 64, **kw)
    ids, rows = fill([tiered, flat], gen, [17, 30, 9, 22])
    for layer in range(LAYERS):
        for n in (1, 2, 5):
            q = randn(gen, (n * len(ids), 2, D), DTYPE, "cpu")
            out = tiered.attend([s[0] for s in ids], layer, q)
            want = flat.attend([s[1] for s in ids], layer, q)
            for i, r in enumerate(rows):
                ref, _ = attention_ref(q[i * n:(i + 1) * n], *r[layer], window=window, sink_tokens=sinks)
                assert_close(out[i * n:(i + 1) * n], ref, DTYPE)
            assert_close(out, want.double(), DTYPE, what="vs the engine without tiers")
            tiered.check_invariants()


def test_gather_and_append_with_every_tier_nearly_full(tmp_path, gen):
    """Appends that need every free slot of every tier, then a gather of each sequence."""
    tiered = make(tmp_path, 4, 2, 12)  # 18 blocks in all
    ids, rows = fill([tiered], gen, [4 * BS, 6 * BS, 5 * BS + 1])  # 4 + 6 + 6 = 16 blocks
    tiered.check_invariants()
    # Two slots free: enough to rotate every block through the tiers.
    assert sum(tiered.stats()[f"{t}_blocks_free"] for t in ("device", "host", "disk")) == 2
    for (s,), r in zip(ids, rows):
        for layer in range(LAYERS):
            k, v = tiered.gather(s, layer)
            assert_bits_equal(k, r[layer][0])
            assert_bits_equal(v, r[layer][1])
    # A row into the partial last block still fits, three new blocks do not.
    s = ids[2][0]
    k, v = randn(gen, (1, H, D), DTYPE, "cpu"), randn(gen, (1, H, D), DTYPE, "cpu")
    tiered.append([s], 0, k, v)
    with pytest.raises(pagedkv.OutOfBlocksError):
        tiered.append([s], 0, *[randn(gen, (3 * BS, H, D), DTYPE, "cpu")] * 2)
    tiered.check_invariants()
    got_k, _ = tiered.gather(s, 0)
    assert_bits_equal(got_k, torch.cat([rows[2][0][0], k]))


def test_append_larger_than_device_and_host(tmp_path, gen):
    """One append of more blocks than device + host hold, into a cache with clean copies."""
    tiered = make(tmp_path, 4, 3, 30)
    (s,), (r,) = fill([tiered], gen, [3 * BS])
    tiered.offload([s[0]])
    tiered.prefetch([s[0]])  # device blocks with clean host copies
    k, v = randn(gen, (20 * BS + 3, H, D), DTYPE, "cpu"), randn(gen, (20 * BS + 3, H, D), DTYPE, "cpu")
    tiered.append([s[0]], 0, k, v)
    tiered.check_invariants()
    got_k, got_v = tiered.gather(s[0], 0)
    assert_bits_equal(got_k, torch.cat([r[0][0], k]))
    assert_bits_equal(got_v, torch.cat([r[0][1], v]))


def test_begin_step_with_tight_tiers(tmp_path, gen):
    """A decode step whose blocks fit on the device runs while host and disk are nearly full."""
    tiered = make(tmp_path, 8, 2, 8)
    flat = make(tmp_path, 64)
    ids, rows = fill([tiered, flat], gen, [4 * BS, 5 * BS, 2 * BS + 2, BS + 1])  # 4+5+3+2 = 14 of 18
    step = [ids[2], ids[3]]
    for it in range(6):
        assert tiered.begin_step([s[0] for s in step]) in (True, False)
        flat.begin_step([s[1] for s in step])
        for layer in range(LAYERS):
            k, v = randn(gen, (2, H, D), DTYPE, "cpu"), randn(gen, (2, H, D), DTYPE, "cpu")
            tiered.append([s[0] for s in step], layer, k, v)
            flat.append([s[1] for s in step], layer, k, v)
            q = randn(gen, (2, 2, D), DTYPE, "cpu")
            out = tiered.attend([s[0] for s in step], layer, q)
            want = flat.attend([s[1] for s in step], layer, q)
            assert_bits_equal(out, want)  # the same kernel over the same keys
        tiered.end_step()
        flat.end_step()
        tiered.check_invariants()
        # The others move in between: their blocks come up, the step's go down.
        tiered.attend([ids[0][0], ids[1][0]], 0, randn(gen, (2, 2, D), DTYPE, "cpu"))
    for (s, t) in ids:
        for layer in range(LAYERS):
            assert_bits_equal(tiered.gather(s, layer)[0], flat.gather(t, layer)[0])


def test_truncate_into_dropped_blocks_is_refused(tmp_path, gen):
    """window=8, retain=False: 20 rows then 1 drop the first blocks; truncate(s, 2) used to be
    accepted and leave a sequence every later append refused."""
    for tiers in ({}, dict(host_blocks=4, disk_blocks=8)):
        kv = make(tmp_path, 16, window=8, retain=False, **tiers)
        s = kv.add_sequence()
        rows = {}
        for n in (20, 1):
            for layer in range(LAYERS):
                k, v = randn(gen, (n, H, D), DTYPE, "cpu"), randn(gen, (n, H, D), DTYPE, "cpu")
                kv.append([s], layer, k, v)
                old = rows.get(layer, (k[:0], v[:0]))
                rows[layer] = (torch.cat([old[0], k]), torch.cat([old[1], v]))
        table = kv.block_table(s)
        assert table[0][0] == "dropped"
        with pytest.raises(ValueError, match="dropped"):
            kv.truncate(s, 2)
        kv.check_invariants()
        assert kv.seq_len(s, 0) == 21 and kv.block_table(s) == table
        # A cut whose next rows see only kept keys is fine, and the sequence keeps growing.
        kv.truncate(s, 19)
        assert kv.seq_len(s, 1) == 19
        for layer in range(LAYERS):
            k, v = randn(gen, (3, H, D), DTYPE, "cpu"), randn(gen, (3, H, D), DTYPE, "cpu")
            kv.append([s], layer, k, v)
            q = randn(gen, (3, 2, D), DTYPE, "cpu")
            out = kv.attend([s], layer, q)
            keys = (torch.cat([rows[layer][0][:19], k]), torch.cat([rows[layer][1][:19], v]))
            ref, _ = attention_ref(q, *keys, window=8)
            assert_close(out, ref, DTYPE)
        kv.check_invariants()
        kv.truncate(s, 0)  # nothing kept: nothing dropped in reach either
        kv.append([s], 0, *[randn(gen, (2, H, D), DTYPE, "cpu")] * 2)
        kv.check_invariants()
