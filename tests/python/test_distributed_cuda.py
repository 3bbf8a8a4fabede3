"""The distributed path on one GPU (NCCL, world size 1): the merge's collectives, eager and
captured in a CUDA graph, against the engine's CPU merge and float64; a cache with a group
decoding through DecodeSteps' graph against one without. Multi-GPU runs are their own issue."""
import gc
import math
import socket

import pytest
import torch

import pagedkv

CUDA = pagedkv.cuda_available() and torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a GPU")
dist = pytest.importorskip("torch.distributed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def merge_checks():
    from pagedkv import distributed

    g = torch.Generator().manual_seed(0)
    rows, hq, D = 5, 8, 128
    out = torch.randn(rows, hq, D, generator=g).to(torch.bfloat16).cuda()
    lse = (torch.randn(rows, hq, generator=g) * 3).cuda()
    lse[0, 0] = -math.inf
    out[0, 0] = 0
    cpu = pagedkv.PagedKV(num_layers=1, num_kv_heads=1, head_dim=D, dtype=torch.bfloat16, device="cpu", device_blocks=2)
    for method in ("allreduce", "allgather"):
        gpu = pagedkv.PagedKV(num_layers=1, num_kv_heads=1, head_dim=D, dtype=torch.bfloat16, device="cuda",
                              device_blocks=2)
        fn = (lambda o, l, mo, ml: gpu._engine.merge_partials(o, l, mo, ml, gpu._stream())) if method == "allgather" else None
        eager = distributed.merge_collective(out, lse, dist.group.WORLD, 1, method, fn)
        # The same inside a CUDA graph: no host synchronisation in the merge.
        static_out, static_lse = out.clone(), lse.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            distributed.merge_collective(static_out, static_lse, dist.group.WORLD, 1, method, fn)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = distributed.merge_collective(static_out, static_lse, dist.group.WORLD, 1, method, fn)
        static_out.copy_(out)
        static_lse.copy_(lse)
        graph.replay()
        torch.cuda.synchronize()
        want_out = torch.empty(rows, hq, D, dtype=torch.bfloat16)
        want_lse = torch.empty(rows, hq)
        cpu._engine.merge_partials(out.cpu()[None], lse.cpu()[None], want_out, want_lse, 0)
        for o, l in (eager, captured):
            torch.testing.assert_close(o.cpu().float(), want_out.float(), atol=1e-2, rtol=1e-2)
            torch.testing.assert_close(l.cpu(), want_lse, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(o.cpu().double(), out.cpu().double(), atol=1e-2, rtol=1e-2)


def steps_checks():
    kw = dict(num_layers=2, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16, device="cuda",
              device_blocks=64)
    kv = pagedkv.PagedKV(**kw, group=dist.group.WORLD)
    ref = pagedkv.PagedKV(**kw)
    g = torch.Generator().manual_seed(1)
    seqs = [kv.add_sequence(), kv.add_sequence()]
    [ref.add_sequence(), ref.add_sequence()]
    k = torch.randn(2 * 100, 8, 128, generator=g).to(torch.bfloat16).cuda()
    for layer in range(2):
        kv.append(seqs, layer, k, k)
        ref.append(seqs, layer, k, k)
    step_k = torch.empty(2, 8, 128, dtype=torch.bfloat16, device="cuda")
    step_q = torch.empty(2, 32, 128, dtype=torch.bfloat16, device="cuda")

    def layers(cache):
        def run(batch):
            outs = []
            for layer in range(2):
                cache.append(batch, layer, step_k, step_k)
                outs.append(cache.attend(batch, layer, step_q))
            return outs
        return run

    with pagedkv.DecodeSteps(kv, layers(kv), num_q_heads=32) as ours, \
            pagedkv.DecodeSteps(ref, layers(ref), num_q_heads=32, graph=False) as theirs:
        for _ in range(5):
            step_k.copy_(torch.randn(2, 8, 128, generator=g).to(torch.bfloat16))
            step_q.copy_(torch.randn(2, 32, 128, generator=g).to(torch.bfloat16))
            got = [o.clone() for o in ours.step(seqs)]
            for o, w in zip(got, theirs.step(seqs)):
                torch.testing.assert_close(o.float(), w.float(), atol=2e-2, rtol=2e-2)
        assert ours.uses_graph and ours.captures >= 1
    a, b = kv.gather(seqs[1], 1), ref.gather(seqs[1], 1)
    assert torch.equal(a[0], b[0])
    assert kv.block_table(seqs[0])[0][0] == 0 and kv.stats(group=True) == kv.stats()
    return kv, ref


def worker(rank, port):
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    merge_checks()
    kept = list(steps_checks())
    kept.clear()
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def test_nccl_world_one_merge_graph_and_steps():
    if not dist.is_nccl_available():
        pytest.skip("torch.distributed without NCCL")
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(free_port(),), nprocs=1, join=True)
