"""Tiers and offload: blocks moving device <-> host <-> disk under constant pressure must never
change a bit. Oracle: the same operations on a cache whose device tier holds everything;
`gather` must equal what was appended and `attend` must equal the all-resident result exactly."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pagedkv
from pagedkv.policies import LRU, Hybrid, Window
from reference import best_dtype, randn

H, D, BS, LAYERS = 2, 64, 4, 2


def make(device, dtype, tmp_path, *, device_blocks, host_blocks=0, disk_blocks=0, **kw):
    return pagedkv.PagedKV(num_layers=LAYERS, num_kv_heads=H, head_dim=D, block_size=BS, dtype=dtype,
                           device=device, device_blocks=device_blocks, host_blocks=host_blocks,
                           disk_blocks=disk_blocks, disk_path=tmp_path if disk_blocks else None, **kw)


def _cut(chunks, n):
    """The first n rows of a list of (k, v) chunks."""
    out, have = [], 0
    for k, v in chunks:
        if have >= n:
            break
        take = min(k.shape[0], n - have)
        out.append((k[:take], v[:take]))
        have += take
    return out


def tier_counts(kv, seq):
    out = {}
    for tier, _ in kv.block_table(seq):
        out[tier] = out.get(tier, 0) + 1
    return out


@pytest.mark.parametrize("policy", ["lru", Window(recent_blocks=2, sink_blocks=1), Hybrid()],
                         ids=["lru", "window", "hybrid"])
def test_random_walk_is_bit_exact_under_pressure(device, tmp_path, rng, gen, policy):
    dtype = best_dtype(device)
    small = make(device, dtype, tmp_path, device_blocks=6, host_blocks=5, disk_blocks=40, policy=policy)
    big = make(device, dtype, tmp_path, device_blocks=64)
    pairs = {}  # small id -> big id
    rows = {}   # small id -> per layer list of (k, v)
    moved = 0
    for step in range(300):  # the engine's invariant checker runs after every operation
        op = rng.random()
        live = list(pairs)
        if op < 0.12 or not live:
            s, b = small.add_sequence(), big.add_sequence()
            pairs[s], rows[s] = b, [[] for _ in range(LAYERS)]
        elif op < 0.18 and len(live) > 1:
            s = rng.choice(live)
            small.free(s)
            big.free(pairs.pop(s))
            rows.pop(s)
        elif op < 0.24:
            s = rng.choice(live)
            t, u = small.fork(s), big.fork(pairs[s])
            pairs[t], rows[t] = u, [list(r) for r in rows[s]]
        elif op < 0.28:
            small.prefetch([rng.choice(live)])  # asynchronous: later reads must wait for it
        elif op < 0.31:
            s = rng.choice(live)
            n = rng.randrange(0, 12)
            small.truncate(s, n)
            big.truncate(pairs[s], n)
            rows[s] = [_cut(r, n) for r in rows[s]]
        elif op < 0.62:
            s = rng.choice(live)
            layer = rng.randrange(LAYERS)
            n = rng.choice([1, 1, 2, 5])
            k, v = randn(gen, (n, H, D), dtype, device), randn(gen, (n, H, D), dtype, device)
            try:
                small.append([s], layer, k, v)
            except pagedkv.OutOfBlocksError:
                small.check_invariants()
                continue
            big.append([pairs[s]], layer, k, v)
            rows[s][layer].append((k, v))
        else:
            s = rng.choice(live)
            layer = rng.randrange(LAYERS)
            n = small.seq_len(s, layer)
            if n == 0:
                continue
            q = randn(gen, (min(n, 2), 2 * H, D), dtype, device)
            try:
                got = small.attend([s], layer, q)
            except pagedkv.OutOfBlocksError:
                small.check_invariants()
                continue
            small.check_invariants()  # attend may have moved blocks up or staged slices
            want = big.attend([pairs[s]], layer, q)
            if len(small.block_table(s)) <= 6 + 5:  # resident, or host slices staged: the same kernel
                assert torch.equal(got, want), f"step {step}: attend differs from the all-resident cache"
            else:  # more blocks than device and host hold: passed through in parts, merged by LSE
                assert torch.allclose(got.float(), want.float(), atol=1e-2 if dtype != torch.float32 else 1e-6)
            k, v = small.gather(s, layer)
            if rows[s][layer]:
                assert torch.equal(k, torch.cat([r[0] for r in rows[s][layer]]))
                assert torch.equal(v, torch.cat([r[1] for r in rows[s][layer]]))
        small.check_invariants()
        moved = small.stats()["blocks_to_host"]
    st = small.stats()
    assert moved > 20 and st["blocks_from_host"] > 10, st  # the walk really moved blocks
    assert st["blocks_to_disk"] > 0 and st["blocks_from_disk"] > 0, st
    assert st["bytes_to_host"] == st["blocks_to_host"] * small.block_bytes


def test_blocks_go_down_and_come_back(device, tmp_path, gen):
    dtype = best_dtype(device)
    kv = make(device, dtype, tmp_path, device_blocks=4, host_blocks=4, disk_blocks=8)
    seqs = [kv.add_sequence() for _ in range(3)]
    kvs = {}
    for s in seqs:  # 3 x 3 blocks = 9 > device 4: six go down, two of them to disk
        k, v = randn(gen, (12, H, D), dtype, device), randn(gen, (12, H, D), dtype, device)
        for layer in range(LAYERS):
            kv.append([s], layer, k, v)
        kvs[s] = (k, v)
        kv.check_invariants()
    assert tier_counts(kv, seqs[0]).get("device", 0) == 0
    assert sum(tier_counts(kv, s).get("disk", 0) for s in seqs) == 1
    before = kv.stats()
    q = randn(gen, (1, H, D), dtype, device)
    kv.attend([seqs[0]], 0, q)  # hits count once per step, at layer 0
    after = kv.stats()
    assert tier_counts(kv, seqs[0]) == {"device": 3}
    assert after["device_misses"] - before["device_misses"] == 3
    assert after["blocks_from_host"] - before["blocks_from_host"] == 3
    for s in seqs:
        k, v = kv.gather(s, 1)
        assert torch.equal(k, kvs[s][0]) and torch.equal(v, kvs[s][1])
    hits = after["device_hits"]
    kv.attend([seqs[0]], 0, q)
    assert kv.stats()["device_hits"] == hits + 3 and kv.stats()["device_misses"] == after["device_misses"]


def test_prefetch_makes_the_next_attend_a_hit(device, tmp_path, gen):
    dtype = best_dtype(device)
    kv = make(device, dtype, tmp_path, device_blocks=4, host_blocks=8)
    a, b, c = kv.add_sequence(), kv.add_sequence(), kv.add_sequence()
    for s in (a, b, c):
        k = randn(gen, (8, H, D), dtype, device)
        kv.append([s], 0, k, k)
    assert tier_counts(kv, a) == {"host": 2}
    kv.prefetch([a])
    assert tier_counts(kv, a) == {"device": 2}
    misses = kv.stats()["device_misses"]
    kv.attend([a], 0, randn(gen, (1, H, D), dtype, device))
    assert kv.stats()["device_misses"] == misses
    kv.check_invariants()


def test_every_tier_full_raises_and_changes_nothing(device, tmp_path, gen):
    dtype = best_dtype(device)
    kv = make(device, dtype, tmp_path, device_blocks=2, host_blocks=2)
    s = kv.add_sequence()
    k = randn(gen, (16, H, D), dtype, device)
    kv.append([s], 0, k, k)  # 4 blocks: 2 on device, 2 on host
    table, stats = kv.block_table(s), kv.stats()
    with pytest.raises(pagedkv.OutOfBlocksError):
        kv.append([s], 0, randn(gen, (1, H, D), dtype, device), randn(gen, (1, H, D), dtype, device))
    assert kv.block_table(s) == table and kv.seq_len(s) == 16
    assert {k_: v_ for k_, v_ in kv.stats().items() if k_ != "transfer_wait_s"} == \
        {k_: v_ for k_, v_ in stats.items() if k_ != "transfer_wait_s"}
    q = randn(gen, (1, 2 * H, D), dtype, device)
    out = kv.attend([s], 0, q)  # 4 blocks > device 2: the 2 on the host pass through, nothing moves
    assert kv.block_table(s) == table and kv.stats()["slices_staged"] == 2
    resident = make(device, dtype, tmp_path, device_blocks=8)
    r = resident.add_sequence()
    resident.append([r], 0, k, k)
    assert torch.equal(out, resident.attend([r], 0, q))
    kv.check_invariants()
    assert torch.equal(kv.gather(s)[0], k)


def test_watermarks_keep_device_blocks_free(device, tmp_path, gen):
    dtype = best_dtype(device)
    kv = make(device, dtype, tmp_path, device_blocks=20, host_blocks=40, watermarks=(0.2, 0.4))
    s = kv.add_sequence()
    for _ in range(120):  # 30 blocks through a 20-block device tier
        k = randn(gen, (1, H, D), dtype, device)
        kv.append([s], 0, k, k)
        kv.check_invariants()
        assert kv.stats()["device_blocks_free"] >= 4 - 1  # low watermark, minus the block just made
    assert kv.stats()["evictions"] > 0


def test_unwritable_disk_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match="disk_path"):  # an OSError with its errno
        make("cpu", torch.float32, missing, device_blocks=2, host_blocks=2, disk_blocks=2)
    with pytest.raises(ValueError, match="host_blocks"):
        make("cpu", torch.float32, tmp_path, device_blocks=2, disk_blocks=2)


FAULT_SCRIPT = textwrap.dedent("""
    import os, resource, signal, sys, torch, pagedkv
    kind, path = sys.argv[1], sys.argv[2]
    kv = pagedkv.PagedKV(num_layers=2, num_kv_heads=2, head_dim=64, block_size=4, dtype=torch.float32,
                         device="cpu", device_blocks=2, host_blocks=2, disk_blocks=64, disk_path=path)
    s = kv.add_sequence()
    g = torch.Generator().manual_seed(0)
    k = torch.randn(16, 2, 64, generator=g)
    kv.append([s], 0, k, k)          # 2 blocks on device, 2 on host
    table = kv.block_table(s)
    k2 = torch.randn(8, 2, 64, generator=g)
    try:
        if kind == "full":
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1, hard))  # every disk write now fails (EFBIG)
            kv.append([s], 0, k2, k2)  # needs room: the host tier spills to disk
        else:
            kv.append([s], 0, k2, k2)  # two blocks spill to disk
            table = kv.block_table(s)
            assert any(t == "disk" for t, _ in table), table
            for fd in os.listdir("/proc/self/fd"):  # truncate the file under the engine
                try:
                    target = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    continue
                if "pagedkv-" in target:
                    os.ftruncate(int(fd), 0)
            kv.gather(s, 0)  # reads the spilled blocks back
        print("no error")
    except OSError as e:  # errno set: EFBIG for the full disk, EIO for the cut file (CorruptBlockError)
        assert e.errno in (27, 5), e.errno
        print("error:", e.strerror)  # the whole message: test_errors checks it names no source file
    assert kv.block_table(s) == table, "state changed"
    kv.check_invariants()
    if kind == "full":
        assert torch.equal(kv.gather(s, 0)[0], k), "data changed"
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        kv.append([s], 0, k2, k2)     # usable afterwards
        assert torch.equal(kv.gather(s, 0)[0], torch.cat([k, k2]))
        kv.check_invariants()
    print("ok")
""")


def disk_fault_error(kind: str, path) -> str:
    """Runs FAULT_SCRIPT (a disk that fills up, or a file cut short under the engine) in a
    process of its own and returns the error message it printed, whole."""
    r = subprocess.run([sys.executable, "-c", FAULT_SCRIPT, kind, str(path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("ok"), r.stdout
    errors = [line[len("error: "):] for line in r.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stdout
    return errors[0]


@pytest.mark.parametrize("kind", ["full", "short"])
def test_disk_faults_are_clean_errors(tmp_path, kind):
    message = disk_fault_error(kind, tmp_path)
    assert message.startswith("disk tier: "), message


@pytest.mark.parametrize("window,sinks", [(None, 0), (37, 5), (23, 0)])
def test_context_larger_than_the_device_tier_passes_through(device, tmp_path, gen, window, sinks):
    dtype = best_dtype(device)
    kw = dict(window=window, sink_tokens=sinks) if window else {}
    small = make(device, dtype, tmp_path, device_blocks=8, host_blocks=64, **kw)
    big = make(device, dtype, tmp_path, device_blocks=64, **kw)
    s, b = small.add_sequence(), big.add_sequence()
    k, v = randn(gen, (130, H, D), dtype, device), randn(gen, (130, H, D), dtype, device)  # 33 blocks
    for kv, seq in ((small, s), (big, b)):
        kv.append([seq], 0, k, v)
    q = randn(gen, (3, 4 * H, D), dtype, device)
    before = small.stats()
    got, got_lse = small.attend([s], 0, q, return_lse=True)
    want, want_lse = big.attend([b], 0, q, return_lse=True)
    assert torch.equal(got, want) and torch.equal(got_lse, want_lse)  # the same kernel, staged slices
    after = small.stats()
    if window is None:  # 33 blocks in scope through an 8-block device tier: 25 host blocks staged
        assert after["slices_staged"] - before["slices_staged"] == 25
        assert after["bytes_staged"] - before["bytes_staged"] == 25 * small.block_bytes // LAYERS
        assert after["blocks_from_host"] == before["blocks_from_host"]  # nothing moved up whole
    small.check_invariants()
    assert torch.equal(small.gather(s)[0], k)


def test_offload_larger_than_the_host_tier_spills_to_disk_and_comes_back(device, tmp_path, gen):
    dtype = best_dtype(device)
    kv = make(device, dtype, tmp_path, device_blocks=10, host_blocks=3, disk_blocks=12)
    s = kv.add_sequence()
    k = randn(gen, (8 * BS, H, D), dtype, device)  # 8 blocks; the host tier holds 3
    for layer in range(LAYERS):
        kv.append([s], layer, k, k)
    kv.offload([s])
    assert tier_counts(kv, s) == {"host": 3, "disk": 5}
    kv.prefetch([s])                                # disk -> host -> device, 3 host slots at a time
    assert tier_counts(kv, s) == {"device": 8}
    st = kv.stats()
    assert st["blocks_to_disk"] == 5 and st["blocks_from_disk"] == 5, st
    for layer in range(LAYERS):
        assert torch.equal(kv.gather(s, layer)[0], k)
    kv.check_invariants()


def test_staged_decode_steps_match_the_resident_cache(device, tmp_path, gen):
    """Decode steps over a context 4x the device tier, every layer its own K/V: the staged plan
    is reused from layer to layer and rebuilt when a step adds a block."""
    dtype = best_dtype(device)
    small = make(device, dtype, tmp_path, device_blocks=8, host_blocks=40)
    big = make(device, dtype, tmp_path, device_blocks=48)
    s, b = small.add_sequence(), big.add_sequence()
    for layer in range(LAYERS):
        k, v = randn(gen, (32 * BS - 3, H, D), dtype, device), randn(gen, (32 * BS - 3, H, D), dtype, device)
        small.append([s], layer, k, v)
        big.append([b], layer, k, v)
    for _ in range(2 * BS):  # crosses block boundaries
        for layer in range(LAYERS):
            k, v = randn(gen, (1, H, D), dtype, device), randn(gen, (1, H, D), dtype, device)
            small.append([s], layer, k, v)
            big.append([b], layer, k, v)
            q = randn(gen, (1, 2 * H, D), dtype, device)
            assert torch.equal(small.attend([s], layer, q), big.attend([b], layer, q))
    assert small.stats()["slices_staged"] > 0
    small.check_invariants()
