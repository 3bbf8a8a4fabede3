"""Ordering: copies racing kernels. Large blocks make each transfer long, and every read or write
follows the transfer it depends on at once, so a missing fence or event wait shows as wrong bytes.
On the CPU the copies run on the engine's worker thread behind the same fences."""
import pytest
import torch

import pagedkv
from reference import best_dtype, randn

LAYERS, H, D, BS = 8, 4, 128, 16  # 256 KiB blocks in bf16


def make(device, device_blocks, host_blocks):
    return pagedkv.PagedKV(num_layers=LAYERS, num_kv_heads=H, head_dim=D, block_size=BS,
                           dtype=best_dtype(device), device=device, device_blocks=device_blocks,
                           host_blocks=host_blocks, watermarks=(0, 0))


def fill(kv, seq, tokens, gen, device):
    rows = []
    for layer in range(LAYERS):
        k = randn(gen, (tokens, H, D), kv.dtype, device)
        kv.append([seq], layer, k, k)
        rows.append(k)
    return rows


def test_slots_freed_by_an_eviction_are_written_only_after_it(device, gen):
    kv = make(device, device_blocks=64, host_blocks=64)
    a, b = kv.add_sequence(), kv.add_sequence()
    rows_a = fill(kv, a, 64 * BS // 2, gen, device)       # half the device tier
    kv.offload([a])                                        # D2H of 32 blocks, asynchronous
    rows_b = fill(kv, b, 64 * BS, gen, device)             # reuses every slot a just left
    for layer in (0, LAYERS - 1):
        assert torch.equal(kv.gather(a, layer)[0], rows_a[layer])
        assert torch.equal(kv.gather(b, layer)[0], rows_b[layer])
    kv.check_invariants()


def test_reads_wait_for_prefetches_landing(device, gen):
    kv = make(device, device_blocks=96, host_blocks=96)
    big = make(device, device_blocks=96, host_blocks=0)
    a, a_ref = kv.add_sequence(), big.add_sequence()
    b = kv.add_sequence()
    for layer in range(LAYERS):
        k = randn(gen, (40 * BS, H, D), kv.dtype, device)
        kv.append([a], layer, k, k)
        big.append([a_ref], layer, k, k)
    fill(kv, b, 40 * BS, gen, device)
    q = randn(gen, (1, 4 * H, D), kv.dtype, device)
    for _ in range(3):
        kv.offload([a])
        kv.prefetch([a])                                   # H2D in flight ...
        out = kv.attend([a], LAYERS - 1, q)                # ... read at once by the kernel
        assert torch.equal(out, big.attend([a_ref], LAYERS - 1, q))
        k, _ = kv.gather(a, 0)                             # ... and by gather
        assert torch.equal(k, big.gather(a_ref, 0)[0])
    kv.check_invariants()


def test_evicting_a_block_just_written_copies_the_new_bytes(device, gen):
    kv = make(device, device_blocks=8, host_blocks=64)
    a, b = kv.add_sequence(), kv.add_sequence()
    k = randn(gen, (8 * BS - 3, H, D), kv.dtype, device)
    kv.append([a], 0, k, k)                                # the last rows land by kernel/memcpy ...
    kb = randn(gen, (8 * BS, H, D), kv.dtype, device)
    kv.append([b], 0, kb, kb)                              # ... and are evicted right after
    assert all(t == "host" for t, _ in kv.block_table(a))
    assert torch.equal(kv.gather(a, 0)[0], k)
    kv.check_invariants()


def test_staged_reads_wait_for_evictions_and_slots_wait_for_staged_reads(device, gen):
    """A scope larger than the device tier is read from staged slices of host blocks: the staging
    must follow the evictions still writing those host slots, and a host slot a staging copy
    still reads must not be rewritten (freeing `a` and spilling new blocks into its slots)."""
    kv = make(device, device_blocks=24, host_blocks=96)
    big = make(device, device_blocks=96, host_blocks=0)
    a, a_ref = kv.add_sequence(), big.add_sequence()
    for layer in range(LAYERS):
        k = randn(gen, (64 * BS, H, D), kv.dtype, device)   # 64 blocks through a 24-block tier
        kv.append([a], layer, k, k)
        big.append([a_ref], layer, k, k)
    q = randn(gen, (1, 4 * H, D), kv.dtype, device)
    for layer in (0, LAYERS - 1):
        assert torch.equal(kv.attend([a], layer, q), big.attend([a_ref], layer, q))
    before = kv.stats()["slices_staged"]
    kv.offload([a])                                          # D2H still writing host slots ...
    out = kv.attend([a], LAYERS - 1, q)                      # ... staged from them at once
    assert kv.stats()["slices_staged"] - before == 64
    b = kv.add_sequence()
    kv.free(a)                                               # a's host slots go back while read
    rows_b = fill(kv, b, 64 * BS, gen, device)               # b's evictions reuse them
    assert torch.equal(out, big.attend([a_ref], LAYERS - 1, q))  # the first look at `out`
    for layer in (0, LAYERS - 1):
        assert torch.equal(kv.gather(b, layer)[0], rows_b[layer])
    kv.check_invariants()
