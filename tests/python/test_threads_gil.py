"""The threading contract (docs/DESIGN.md §5): calls that move data release the GIL, so other
Python threads run meanwhile; an engine may be shared by threads, each public call holding its
lock, and a thread waiting for that lock holds no GIL (tests/python/test_thread_stress.py runs
threads x tiers x operations). Also the tuning
arguments of PagedKV() (staging, gather_shape, copy_batch): accepted values change no result, bad
ones raise ValueError naming the argument."""
import threading
import time

import pytest
import torch

import pagedkv


def _long_cache(tokens=1 << 15, heads=8, dim=128):
    kv = pagedkv.PagedKV(num_layers=1, num_kv_heads=heads, head_dim=dim, block_size=16,
                         dtype=torch.float32, device="cpu", device_blocks=tokens // 16 + 4)
    s = kv.add_sequence()
    g = torch.Generator().manual_seed(1)
    k = torch.randn(tokens, heads, dim, generator=g)
    kv.append([s], 0, k, k.clone())
    return kv, s


def _progress_during(call):
    """Runs call() on this thread while another thread spins, noting the time every 1000 turns;
    returns (start, end, [times]). A call holding the GIL leaves no note strictly inside it (the
    spinner only runs between bytecodes of this thread, and a C call has none)."""
    stop = threading.Event()
    notes = []

    def spin():
        n = 0
        while not stop.is_set():
            n += 1
            if n % 1000 == 0:
                notes.append(time.perf_counter())

    t = threading.Thread(target=spin)
    t.start()
    time.sleep(0.02)
    start = time.perf_counter()
    call()
    end = time.perf_counter()
    stop.set()
    t.join()
    return start, end, notes


@pytest.mark.parametrize("which", ["gather", "attend"])
def test_long_calls_release_the_gil(which):
    kv, s = _long_cache()
    q = torch.randn(16, 8, 128)  # 16 rows over 32k keys: a long call of the CPU reference
    call = (lambda: kv.gather(s, 0)) if which == "gather" else (lambda: kv.attend([s], 0, q))
    start, end, notes = _progress_during(call)
    span = end - start
    assert span > 0.02, "the call was too short to tell"
    middle = [t for t in notes if start + 0.25 * span < t < end - 0.25 * span]
    assert len(middle) >= 5, f"the other thread made no progress during the middle half of a {span:.3f}s {which}"


def test_a_second_thread_waits_for_a_busy_engine_and_nothing_breaks():
    """Defect 1 of issue 18: a second thread entering an engine used to crash it (later: raise).
    Now it waits for the engine's lock; both threads' calls complete, whole."""
    kv, s = _long_cache()
    q = torch.randn(64, 8, 128)
    want = kv.attend([s], 0, q)
    stop = threading.Event()
    errors, outs = [], []

    def hammer():
        try:
            while not stop.is_set():
                outs.append(kv.attend([s], 0, q))
        except Exception as e:  # noqa: BLE001 - any error at all fails the test
            errors.append(e)

    t = threading.Thread(target=hammer)
    t.start()
    other = kv.add_sequence()
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(40, 8, 128, generator=g)
    deadline = time.time() + 2
    calls = 0
    while time.time() < deadline and t.is_alive():
        assert kv.stats()["num_sequences"] == 2
        assert kv.seq_len(s, 0) == 1 << 15
        if calls < 40:  # (the 4 free blocks hold 64 rows)
            kv.append([other], 0, rows[calls:calls + 1], rows[calls:calls + 1])
        calls += 1
    stop.set()
    t.join()
    assert not errors, errors
    assert outs and calls
    assert all(torch.equal(o, want) for o in outs)
    kv.check_invariants()
    n = min(calls, 40)
    assert kv.seq_len(other, 0) == n
    assert torch.equal(kv.gather(other, 0)[0], rows[:n])


@pytest.mark.parametrize("layer", ["python", "engine"])
def test_a_thread_waiting_for_the_engine_does_not_hold_the_gil(layer):
    """While one thread is inside a long gather and a second waits for the engine (through
    PagedKV's lock, or the C++ engine's own lock called directly), a third Python thread runs."""
    kv, s = _long_cache()
    entered = threading.Event()

    def long_call():
        entered.set()
        for _ in range(3):
            kv.gather(s, 0)

    def waiter():
        if layer == "python":
            kv.stats()
        else:
            kv._engine.stats()

    def both():
        a = threading.Thread(target=long_call)
        a.start()
        entered.wait()
        time.sleep(0.005)
        b = threading.Thread(target=waiter)
        b.start()
        b.join()
        a.join()

    start, end, notes = _progress_during(both)
    span = end - start
    assert span > 0.02, "the calls were too short to tell"
    middle = [t for t in notes if start + 0.25 * span < t < end - 0.25 * span]
    assert len(middle) >= 5, f"the spinning thread made no progress during {span:.3f}s of waiting"


def test_different_engines_on_different_threads_are_independent():
    results = {}

    def work(i):
        kv = pagedkv.PagedKV(num_layers=2, num_kv_heads=2, head_dim=16, block_size=4,
                             dtype=torch.float32, device="cpu", device_blocks=64, host_blocks=64)
        g = torch.Generator().manual_seed(i)
        s = kv.add_sequence()
        for _ in range(20):
            k = torch.randn(3, 2, 16, generator=g)
            kv.append([s], 0, k, k)
            kv.attend([s], 0, torch.randn(1, 4, 16, generator=g))
            kv.offload([s])
            kv.prefetch([s])
            kv.check_invariants()
        results[i] = kv.gather(s, 0)[0].shape[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: 60 for i in range(4)}


@pytest.mark.parametrize("kwargs", [dict(staging="dma"), dict(staging="kernel"),
                                    dict(gather_shape=(4, 256, 8)), dict(gather_shape=None),
                                    dict(copy_batch="overlap"), dict(copy_batch="off"),
                                    dict(copy_batch="batch")])
def test_tuning_arguments_change_no_result(kwargs):
    def run(**kw):
        kv = pagedkv.PagedKV(num_layers=2, num_kv_heads=2, head_dim=16, block_size=4,
                             dtype=torch.float32, device="cpu", device_blocks=8, host_blocks=64, **kw)
        g = torch.Generator().manual_seed(3)
        s = kv.add_sequence()
        k = torch.randn(100, 2, 16, generator=g)
        kv.append([s], 0, k, k * 2)
        return kv.attend([s], 0, torch.randn(1, 4, 16, generator=g))

    assert torch.equal(run(**kwargs), run())


@pytest.mark.parametrize("kwargs, name", [
    (dict(staging="fast"), "staging"), (dict(staging=None), "staging"),
    (dict(copy_batch="0"), "copy_batch"), (dict(copy_batch=True), "copy_batch"),
    (dict(gather_shape=(8, 512)), "gather_shape"), (dict(gather_shape="8,512,4"), "gather_shape"),
    (dict(gather_shape=(3, 512, 4)), "gather_shape"), (dict(gather_shape=(8, 100, 4)), "gather_shape"),
    (dict(gather_shape=(8, 512, 0)), "gather_shape")])
def test_bad_tuning_arguments_raise_value_error(kwargs, name):
    with pytest.raises(ValueError) as e:
        pagedkv.PagedKV(num_layers=1, num_kv_heads=1, head_dim=16, device="cpu", device_blocks=4, **kwargs)
    assert name in str(e.value)
