"""Decode steps planned once for every layer (begin_step): the same bytes as plain append/attend
calls, the step's blocks kept on the device while other sequences move, clear errors for calls
that would break the step, and a flag that says when a captured graph must be captured again.
The CUDA graph capture of whole steps is in test_cuda_graph.py."""
import pytest
import torch

import pagedkv
from pagedkv.policies import Window
from reference import assert_bits_equal, assert_close, attention_ref, best_dtype, randn

H, HQ, D, BS, LAYERS = 2, 4, 64, 4, 3


def make(device, dtype, device_blocks=96, **kw):
    return pagedkv.PagedKV(num_layers=LAYERS, num_kv_heads=H, head_dim=D, block_size=BS, dtype=dtype,
                           device=device, device_blocks=device_blocks, **kw)


def prefill(kvs, gen, dtype, device, lens):
    """The same ragged prompts in every cache of `kvs`; returns the sequences and the rows."""
    seqs = [[kv.add_sequence() for _ in lens] for kv in kvs]
    rows = []
    for layer in range(LAYERS):
        k = randn(gen, (sum(lens), H, D), dtype, device)
        v = randn(gen, (sum(lens), H, D), dtype, device)
        for kv, s in zip(kvs, seqs):
            kv.append(s, layer, k, v, lengths=lens)
        rows.append((k, v))
    return seqs, rows


@pytest.mark.parametrize("scope", [dict(), dict(window=9, sink_tokens=3, retain=False),
                                   dict(window=13, sink_tokens=0)], ids=["full", "window-drop", "window"])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("tiers", [False, True], ids=["resident", "tiered"])
def test_steps_equal_plain_calls(device, gen, scope, tokens, tiers):
    dtype = best_dtype(device)
    # Tiered: a proactive offload that wants 90% of the device free moves whatever is not pinned.
    extra = dict(device_blocks=40, host_blocks=64, watermarks=(0.8, 0.9)) if tiers else {}
    plain, stepped = make(device, dtype, **scope), make(device, dtype, **scope, **extra)
    (a, b), _ = prefill([plain, stepped], gen, dtype, device, [5, 17, 8])
    # A forked sequence: the first step's write into the shared last block copies it.
    a.append(plain.fork(a[1]))
    b.append(stepped.fork(b[1]))
    n = len(a)
    for step in range(7):
        assert stepped.begin_step(b, tokens=tokens) == (step == 0)
        for layer in range(LAYERS):
            k = randn(gen, (n * tokens, H, D), dtype, device)
            v = randn(gen, (n * tokens, H, D), dtype, device)
            q = randn(gen, (n * tokens, HQ, D), dtype, device)
            plain.append(a, layer, k, v)
            stepped.append(b, layer, k, v)
            want, want_lse = plain.attend(a, layer, q, return_lse=True)
            got, got_lse = stepped.attend(b, layer, q, return_lse=True)
            if device == "cpu":  # the same reference over the same table
                assert_bits_equal(got, want, f"step {step} layer {layer} out")
                assert_bits_equal(got_lse, want_lse, f"step {step} layer {layer} lse")
            else:  # the step's wider table stride may split the keys differently
                assert_close(got, want.double(), dtype, what=f"step {step} layer {layer} out")
        stepped.check_invariants()
    stepped.end_step()
    for sa, sb in zip(a, b):
        for layer in range(LAYERS):
            assert plain.seq_len(sa, layer) == stepped.seq_len(sb, layer)
            if scope.get("retain", True):
                for x, y in zip(plain.gather(sa, layer), stepped.gather(sb, layer)):
                    assert_bits_equal(y, x, "gather")
        tiers_of = [[t for t, _ in kv.block_table(s)] for kv, s in ((plain, sa), (stepped, sb))]
        if tiers:  # the same blocks dropped; the others wherever the offload put them
            tiers_of = [[t == "dropped" for t in x] for x in tiers_of]
        assert tiers_of[0] == tiers_of[1]
    for key in ("drops",) if tiers else ("device_blocks_used", "drops"):
        assert plain.stats()[key] == stepped.stats()[key], key
    if tiers and scope.get("window") and scope.get("retain", True):  # out of every window: down
        assert stepped.stats()["blocks_to_host"] > 0


@pytest.mark.parametrize("policy", ["lru", Window(recent_blocks=1, sink_blocks=0)], ids=["lru", "window"])
def test_step_blocks_stay_while_other_sequences_move(device, gen, policy):
    """A tiered cache under pressure: between begin_step and the layer calls other sequences are
    offloaded and prefetched; the step's blocks never leave (the window policy would pick them
    first), and the results match the oracle."""
    dtype = best_dtype(device)
    kv = make(device, dtype, device_blocks=24, host_blocks=64, policy=policy)
    lens = [21, 14]
    (batch,), rows = prefill([kv], gen, dtype, device, lens)
    (others,), _ = prefill([kv], gen, dtype, device, [30, 30])
    model = [[(list(rows[layer][0].split(lens))[i], list(rows[layer][1].split(lens))[i])
              for layer in range(LAYERS)] for i in range(len(lens))]
    for step in range(5):
        kv.offload(batch if step == 2 else [])  # blocks come back up at begin_step
        kv.begin_step(batch)
        kv.prefetch([others[step % 2]])  # needs room: evicts, but never the step's blocks
        kv.offload([others[(step + 1) % 2]])
        kv.check_invariants()
        for layer in range(LAYERS):
            k = randn(gen, (2, H, D), dtype, device)
            q = randn(gen, (2, HQ, D), dtype, device)
            kv.append(batch, layer, k, k)
            out = kv.attend(batch, layer, q)
            for i in range(2):
                mk, mv = model[i][layer]
                model[i][layer] = (torch.cat([mk, k[i:i + 1]]), torch.cat([mv, k[i:i + 1]]))
                ref, _ = attention_ref(q[i:i + 1], *model[i][layer])
                assert_close(out[i:i + 1], ref, dtype, what=f"step {step} layer {layer} seq {i}")
        kv.end_step()
        kv.check_invariants()
    for i, s in enumerate(batch):
        for layer in range(LAYERS):
            got_k, got_v = kv.gather(s, layer)
            assert_bits_equal(got_k, model[i][layer][0], "gather k")
            assert_bits_equal(got_v, model[i][layer][1], "gather v")


def test_calls_that_would_break_a_step_are_clear_errors(gen):
    kv = make("cpu", torch.float32, host_blocks=16)
    (seqs,), _ = prefill([kv], gen, torch.float32, "cpu", [6, 6, 6])
    step, other = seqs[:2], seqs[2]
    kv.begin_step(step)
    k = randn(gen, (2, H, D), torch.float32, "cpu")
    for call in (lambda: kv.append([step[0]], 0, k[:1], k[:1]),
                 lambda: kv.attend([step[0], other], 0, randn(gen, (2, HQ, D), torch.float32, "cpu")),
                 lambda: kv.fork(step[0]), lambda: kv.free(step[1]), lambda: kv.truncate(step[0], 2),
                 lambda: kv.offload([step[1]])):
        with pytest.raises(ValueError, match="open decode step"):
            call()
    with pytest.raises(ValueError, match="rows per sequence"):
        kv.append(step, 0, randn(gen, (4, H, D), torch.float32, "cpu"), randn(gen, (4, H, D), torch.float32, "cpu"),
                  lengths=[1, 3])
    with pytest.raises(ValueError, match="window"):
        kv.attend(step, 0, randn(gen, (2, HQ, D), torch.float32, "cpu"), window=4)
    kv.append(step, 0, k, k)
    with pytest.raises(ValueError, match="already appended"):
        kv.append(step, 0, k, k)
    kv.append([other], 0, k[:1], k[:1])  # a sequence outside the step is free to go its own way
    kv.check_invariants()
    # Layers of `other` now differ in length: no step can append one set of rows to all of them.
    before = (kv.stats(), [kv.seq_len(s, 1) for s in seqs])
    with pytest.raises(ValueError, match="different numbers of tokens"):
        kv.begin_step([other])
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        kv.begin_step(step, tokens=0)
    with pytest.raises(TypeError, match="tokens"):
        kv.begin_step(step, tokens=1.0)
    with pytest.raises(ValueError, match="num_q_heads"):
        kv.begin_step(step, num_q_heads=3)
    with pytest.raises(KeyError):
        kv.begin_step([99])
    assert (kv.stats(), [kv.seq_len(s, 1) for s in seqs]) == before
    # The failed calls left the step open and unchanged.
    kv.append(step, 1, k, k)
    kv.end_step()
    kv.fork(step[0])
    kv.free(step[1])
    kv.check_invariants()


def test_a_step_that_does_not_fit_changes_nothing(gen):
    kv = make("cpu", torch.float32, device_blocks=10, host_blocks=40)
    (seqs,), _ = prefill([kv], gen, torch.float32, "cpu", [20, 20])  # 5 + 5 blocks, + 2 new
    before = (kv.stats(), [kv.block_table(s) for s in seqs], [kv.seq_len(s) for s in seqs])
    with pytest.raises(pagedkv.OutOfBlocksError, match="begin_step"):
        kv.begin_step(seqs)
    assert (kv.stats(), [kv.block_table(s) for s in seqs], [kv.seq_len(s) for s in seqs]) == before
    kv.check_invariants()
    kv.begin_step(seqs[:1])  # one of them fits


def test_begin_step_says_when_a_capture_must_be_redone(gen):
    kv = make("cpu", torch.float32, device_blocks=400)
    (seqs,), _ = prefill([kv], gen, torch.float32, "cpu", [3, 40])
    row = randn(gen, (2, H, D), torch.float32, "cpu")
    flags = []
    for _ in range(64 * BS):  # the longest sequence crosses the 64-block stride once
        flags.append(kv.begin_step(seqs))
        for layer in range(LAYERS):
            kv.append(seqs, layer, row, row)
    assert flags[0] and sum(flags) == 2, [i for i, f in enumerate(flags) if f]

    def again(batch, **kw):  # the previous step's rows given back unwritten (end_step), then a step
        kv.end_step()
        return kv.begin_step(batch, **kw)

    assert not again(seqs[::-1])    # other sequences in a batch of the same size: it holds
    assert again(seqs[:1])          # another batch size
    assert again(seqs[::-1]) and not again(seqs[::-1])  # back; then the same again
    assert again(seqs, tokens=2)    # another number of rows


def test_a_step_may_hold_the_device_past_the_watermarks(device, gen):
    """The proactive offload keeps free blocks between its watermarks with whatever is not pinned:
    a step whose own blocks fill the device leaves them alone (and nothing to evict is fine)."""
    dtype = best_dtype(device)
    kv = make(device, dtype, device_blocks=40, host_blocks=40, watermarks=(0.2, 0.3))
    plain = make(device, dtype, device_blocks=200)
    (seqs, ref), _ = prefill([kv, plain], gen, dtype, device, [70, 70])  # 36 of 40 blocks
    for step in range(2):
        kv.begin_step(seqs)
        assert all(t == "device" for sq in seqs for t, _ in kv.block_table(sq))
        assert kv.stats()["device_blocks_free"] == 4  # under the low watermark (8): nothing may go
        for layer in range(LAYERS):
            k = randn(gen, (2, H, D), dtype, device)
            q = randn(gen, (2, HQ, D), dtype, device)
            kv.append(seqs, layer, k, k)
            plain.append(ref, layer, k, k)
            got, want = kv.attend(seqs, layer, q), plain.attend(ref, layer, q)
            if device == "cpu":
                assert_bits_equal(got, want, f"layer {layer}")
            else:  # the step's wider table stride may split the keys differently
                assert_close(got, want.double(), dtype, what=f"layer {layer}")
        kv.end_step()
        kv.check_invariants()


@pytest.mark.parametrize("policy", ["lru", Window(recent_blocks=1, sink_blocks=0)], ids=["lru", "window"])
def test_random_steps_among_other_work_match_the_resident_cache(device, rng, gen, policy):
    """A random walk: sequences come, fork and go; steps over random batches run every layer
    while other sequences are offloaded and prefetched between the layers, in a device tier a
    few sequences fill. Every attend equals the all-resident cache's, gather equals every row."""
    dtype = best_dtype(device)
    small = make(device, dtype, device_blocks=16, host_blocks=48, policy=policy)
    big = make(device, dtype, device_blocks=600)
    pairs, model, steps = {}, {}, 0

    def prefill(n):
        s, b = small.add_sequence(), big.add_sequence()
        model[s] = []
        for layer in range(LAYERS):
            k, v = randn(gen, (n, H, D), dtype, device), randn(gen, (n, H, D), dtype, device)
            small.append([s], layer, k, v)
            big.append([b], layer, k, v)
            model[s].append((k, v))
        pairs[s] = b

    for it in range(80):
        live = list(pairs)
        op = rng.random()
        if (op < 0.2 or len(live) < 3) and len(live) < 5:  # at most 5 x 8 blocks of 64 in the tiers
            prefill(rng.randrange(1, 14))
        elif op < 0.3 or len(live) >= 5 or max(small.seq_len(s) for s in live) > 28:
            s = max(live, key=small.seq_len) if op >= 0.2 else rng.choice(live)
            small.free(s)
            big.free(pairs.pop(s))
            model.pop(s)
        elif op < 0.4 and len(live) < 5:
            s = rng.choice(live)
            t = small.fork(s)
            pairs[t], model[t] = big.fork(pairs[s]), list(model[s])
        else:
            batch = rng.sample(live, rng.randint(1, min(2, len(live))))
            tokens = rng.choice([1, 1, 2])
            try:
                small.begin_step(batch, tokens=tokens)
            except pagedkv.OutOfBlocksError:
                small.check_invariants()
                continue
            small.check_invariants()
            steps += 1
            others = [s for s in live if s not in batch]
            for layer in range(LAYERS):
                if others and rng.random() < 0.6:  # other work between the layers
                    try:
                        (small.offload if rng.random() < 0.5 else small.prefetch)([rng.choice(others)])
                    except pagedkv.OutOfBlocksError:
                        pass
                    small.check_invariants()
                n = len(batch) * tokens
                k, v = randn(gen, (n, H, D), dtype, device), randn(gen, (n, H, D), dtype, device)
                q = randn(gen, (n, HQ, D), dtype, device)
                small.append(batch, layer, k, v)
                small.check_invariants()
                big.append([pairs[s] for s in batch], layer, k, v)
                got, want = small.attend(batch, layer, q), big.attend([pairs[s] for s in batch], layer, q)
                small.check_invariants()
                if device == "cpu":
                    assert_bits_equal(got, want, f"it {it} layer {layer}")
                else:
                    assert_close(got, want.double(), dtype, what=f"it {it} layer {layer}")
                for i, s in enumerate(batch):
                    mk, mv = model[s][layer]
                    rows = slice(i * tokens, (i + 1) * tokens)
                    model[s][layer] = (torch.cat([mk, k[rows]]), torch.cat([mv, v[rows]]))
            small.end_step()
        small.check_invariants()  # after every operation of the walk (DESIGN.md §5)
    for s in pairs:
        for layer in range(LAYERS):
            got_k, got_v = small.gather(s, layer)
            assert_bits_equal(got_k, model[s][layer][0], f"seq {s} layer {layer} k")
            assert_bits_equal(got_v, model[s][layer][1], f"seq {s} layer {layer} v")
    st = small.stats()
    assert steps > 15 and st["blocks_to_host"] > 10 and st["blocks_from_host"] > 5, (steps, st)


# ---------------------------------------------------------------------------------------------
# pagedkv.DecodeSteps: the loop above as public API (steps.py). On the CPU it runs the calls
# eagerly after each begin_step; its CUDA graph path is in test_cuda_graph.py.


@pytest.mark.parametrize("tokens", [1, 2])
def test_decode_steps_eager_equal_plain_calls(gen, tokens):
    dtype = torch.float32
    plain, stepped = make("cpu", dtype), make("cpu", dtype)
    (a, b), _ = prefill([plain, stepped], gen, dtype, "cpu", [5, 17, 8])
    n = len(a)
    k_in = torch.empty(LAYERS, n * tokens, H, D, dtype=dtype)  # static inputs, as a graph would read
    q_in = torch.empty(LAYERS, n * tokens, HQ, D, dtype=dtype)
    calls = []

    def layers(batch):
        calls.append(list(batch))
        outs = []
        for layer in range(LAYERS):
            stepped.append(batch, layer, k_in[layer], k_in[layer])
            outs.append(stepped.attend(batch, layer, q_in[layer]))
        return outs

    with pagedkv.DecodeSteps(stepped, layers, num_q_heads=HQ, tokens=tokens) as steps:
        assert not steps.uses_graph  # the cache is on the CPU, whatever `graph` says
        for step in range(6):
            k_in.copy_(randn(gen, k_in.shape, dtype, "cpu"))
            q_in.copy_(randn(gen, q_in.shape, dtype, "cpu"))
            turn = step % n  # the batch's sequences in another order each step
            order_a, order_b = a[turn:] + a[:turn], b[turn:] + b[:turn]
            outs = steps.step(order_b)
            assert calls[-1] == order_b
            for layer in range(LAYERS):
                plain.append(order_a, layer, k_in[layer], k_in[layer])
                want = plain.attend(order_a, layer, q_in[layer])
                assert_bits_equal(outs[layer], want, f"step {step} layer {layer}")
            stepped.check_invariants()
            with pytest.raises(ValueError, match="open decode step"):
                stepped.fork(b[0])  # the step is open until close()
    assert len(calls) == 6 and steps.captures == 0
    stepped.fork(b[0])  # leaving the `with` block ended the step
    stepped.check_invariants()
    for sa, sb in zip(a, b):
        for layer in range(LAYERS):
            assert stepped.seq_len(sb, layer) == plain.seq_len(sa, layer) == stepped.seq_len(sb, 0)
            for x, y in zip(plain.gather(sa, layer), stepped.gather(sb, layer)):
                assert_bits_equal(y, x, "gather")


def test_decode_steps_close_ends_the_step_and_a_later_step_reopens_it(gen):
    kv = make("cpu", torch.float32)
    (seqs,), _ = prefill([kv], gen, torch.float32, "cpu", [3, 9])
    row = randn(gen, (2, H, D), torch.float32, "cpu")

    def layers(batch):
        for layer in range(LAYERS):
            kv.append(batch, layer, row, row)

    steps = pagedkv.DecodeSteps(kv, layers, num_q_heads=HQ, graph=False)
    assert steps.step(seqs) is None  # layers() returned nothing
    with pytest.raises(ValueError, match="open decode step"):
        kv.truncate(seqs[0], 2)
    steps.close()
    steps.close()  # twice is harmless
    kv.truncate(seqs[0], 2)  # allowed once the step is closed
    steps.step(seqs)  # opens a new step
    assert [kv.seq_len(s, layer) for s in seqs for layer in range(LAYERS)] == [3] * LAYERS + [11] * LAYERS
    with pytest.raises(ValueError, match="open decode step"):
        kv.free(seqs[1])
    steps.close()
    kv.free(seqs[1])
    kv.check_invariants()


@pytest.mark.parametrize("bad,exc,word", [(dict(num_q_heads=0), ValueError, "num_q_heads"),
                                          (dict(num_q_heads=4.0), TypeError, "num_q_heads"),
                                          (dict(tokens=0), ValueError, "tokens"),
                                          (dict(tokens=True), TypeError, "tokens"),
                                          (dict(layers_fn=None), TypeError, "layers_fn")])
def test_decode_steps_rejects_bad_arguments(bad, exc, word):
    kv = make("cpu", torch.float32)
    kw = {"layers_fn": lambda batch: None, "num_q_heads": HQ, **bad}
    with pytest.raises(exc, match=word):
        pagedkv.DecodeSteps(kv, **kw)
