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
