"""A decode step's attention over every layer, captured in a CUDA graph and replayed, gives the
same bytes as the eager calls (no allocation, host sync or metadata upload inside the capture)."""
import pytest
import torch

import pagedkv
from reference import randn


@pytest.mark.cuda
def test_decode_step_attention_replays_from_a_cuda_graph(cuda, gen):
    layers, hk, hq, d, batch = 4, 2, 8, 128, 3
    kv = pagedkv.PagedKV(num_layers=layers, num_kv_heads=hk, head_dim=d, block_size=16,
                         dtype=torch.bfloat16, device="cuda", device_blocks=256)
    seqs = [kv.add_sequence() for _ in range(batch)]
    for layer in range(layers):
        rows = randn(gen, (batch * 300, hk, d), torch.bfloat16, "cuda")
        kv.append(seqs, layer, rows, rows)
    qs = [randn(gen, (batch, hq, d), torch.bfloat16, "cuda") for _ in range(layers)]
    eager = [kv.attend(seqs, layer, qs[layer]) for layer in range(layers)]  # also the warm-up
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            outs = [kv.attend(seqs, layer, qs[layer]) for layer in range(layers)]
    for o in outs:
        o.fill_(float("nan"))  # poison: the replay must write every element
    graph.replay()
    torch.cuda.synchronize()
    for layer in range(layers):
        assert torch.equal(outs[layer], eager[layer]), f"layer {layer}"


@pytest.mark.cuda
@pytest.mark.parametrize("tiered", [False, True])
def test_whole_decode_steps_replay_from_one_capture(cuda, gen, tiered):
    """begin_step() outside the graph, every layer's append and attend inside: one capture serves
    step after step (while other sequences swap, with a host tier, and with the batch's
    sequences in another order each step), and the results equal plain calls on a second cache:
    gather bit for bit, attention to bf16 rounding (the step's table stride may split the keys
    differently)."""
    layers, hk, hq, d, batch = 4, 2, 8, 128, 3
    extra = dict(host_blocks=512) if tiered else {}

    def make():
        return pagedkv.PagedKV(num_layers=layers, num_kv_heads=hk, head_dim=d, block_size=16,
                               dtype=torch.bfloat16, device="cuda", device_blocks=256, **extra)

    plain, stepped = make(), make()
    a = [plain.add_sequence() for _ in range(batch)]
    b = [stepped.add_sequence() for _ in range(batch)]
    lens = [100, 257, 31]
    for layer in range(layers):
        rows = randn(gen, (sum(lens), hk, d), torch.bfloat16, "cuda")
        plain.append(a, layer, rows, rows, lengths=lens)
        stepped.append(b, layer, rows, rows, lengths=lens)
    others = [stepped.add_sequence() for _ in range(2)]
    if tiered:
        for layer in range(layers):
            rows = randn(gen, (60 * 16, hk, d), torch.bfloat16, "cuda")
            for s in others:
                stepped.append([s], layer, rows, rows)
        stepped.offload([others[1]])
    k_in = torch.empty(layers, batch, hk, d, dtype=torch.bfloat16, device="cuda")
    q_in = torch.empty(layers, batch, hq, d, dtype=torch.bfloat16, device="cuda")
    graph, outs = None, None
    for step in range(20):
        k_in.copy_(randn(gen, k_in.shape, torch.bfloat16, "cuda"))
        q_in.copy_(randn(gen, q_in.shape, torch.bfloat16, "cuda"))
        if tiered:  # swaps of other sequences around the step's blocks
            stepped.offload([others[step % 2]])
            stepped.prefetch([others[(step + 1) % 2]])
        turn = step % batch  # the same graph, the batch's rows in another order
        order_a, order_b = a[turn:] + a[:turn], b[turn:] + b[:turn]
        if stepped.begin_step(order_b, num_q_heads=hq) or graph is None:
            assert step == 0, "one capture holds while no sequence outgrows the table stride"
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
                outs = []
                for layer in range(layers):
                    stepped.append(order_b, layer, k_in[layer], k_in[layer])
                    outs.append(stepped.attend(order_b, layer, q_in[layer]))
            torch.cuda.current_stream().wait_stream(side)
        for o in outs:
            o.fill_(float("nan"))  # poison: the replay must write every element
        graph.replay()
        for layer in range(layers):
            plain.append(order_a, layer, k_in[layer], k_in[layer])
            want = plain.attend(order_a, layer, q_in[layer])
            torch.testing.assert_close(outs[layer], want, atol=1e-2, rtol=1.6e-2)
        stepped.check_invariants()
    torch.cuda.synchronize()
    stepped.end_step()
    for sa, sb in zip(a, b):
        for layer in range(layers):
            for x, y in zip(plain.gather(sa, layer), stepped.gather(sb, layer)):
                assert torch.equal(x, y)


@pytest.mark.cuda
def test_decode_steps_replay_one_capture_and_recapture_when_begin_step_says(cuda, gen):
    """pagedkv.DecodeSteps on CUDA: one capture serves step after step; a batch of another size
    captures again; each replay writes the outputs the capture returned, which equal plain calls
    on a second cache (to bf16 rounding: the step's table stride may split the keys otherwise)."""
    layers, hk, hq, d = 3, 2, 8, 128

    def make():
        return pagedkv.PagedKV(num_layers=layers, num_kv_heads=hk, head_dim=d, block_size=16,
                               dtype=torch.bfloat16, device="cuda", device_blocks=256)

    plain, stepped = make(), make()
    a = [plain.add_sequence() for _ in range(3)]
    b = [stepped.add_sequence() for _ in range(3)]
    lens = [100, 257, 31]
    for layer in range(layers):
        rows = randn(gen, (sum(lens), hk, d), torch.bfloat16, "cuda")
        plain.append(a, layer, rows, rows, lengths=lens)
        stepped.append(b, layer, rows, rows, lengths=lens)
    k_in = torch.empty(layers, 3, hk, d, dtype=torch.bfloat16, device="cuda")
    q_in = torch.empty(layers, 3, hq, d, dtype=torch.bfloat16, device="cuda")

    def step_layers(batch):
        n = len(batch)
        outs = []
        for layer in range(layers):
            stepped.append(batch, layer, k_in[layer, :n], k_in[layer, :n])
            outs.append(stepped.attend(batch, layer, q_in[layer, :n]))
        return outs

    with pagedkv.DecodeSteps(stepped, step_layers, num_q_heads=hq) as steps:
        assert steps.uses_graph
        for step in range(8):
            n = 3 if step < 5 else 2  # step 5: another batch size, a second capture
            k_in.copy_(randn(gen, k_in.shape, torch.bfloat16, "cuda"))
            q_in.copy_(randn(gen, q_in.shape, torch.bfloat16, "cuda"))
            outs = steps.step(b[:n])
            for layer in range(layers):
                plain.append(a[:n], layer, k_in[layer, :n], k_in[layer, :n])
                want = plain.attend(a[:n], layer, q_in[layer, :n])
                torch.testing.assert_close(outs[layer], want, atol=1e-2, rtol=1.6e-2)
            assert steps.captures == (1 if step < 5 else 2)
            for o in outs:
                o.fill_(float("nan"))  # poison: the next replay must write every element again
        stepped.check_invariants()
    torch.cuda.synchronize()
    for sa, sb in zip(a, b):
        for layer in range(layers):
            for x, y in zip(plain.gather(sa, layer), stepped.gather(sb, layer)):
                assert torch.equal(x, y)
