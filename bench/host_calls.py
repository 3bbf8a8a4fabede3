"""Where the host's time goes in eager decode calls (a diagnostic run on a GPU machine).

For each kind of call it times the host while the GPU is held busy by a sleeping kernel: a call
that waits for the GPU then takes as long as the sleep; one that only queues work returns at once.
Usage: python bench/host_calls.py
"""
import time

import torch

from pagedkv import DecodeSteps, PagedKV

LAYERS, HK, HQ, D, BS = 32, 8, 32, 128, 16


def host_time(fn, stall_ms=0.0):
    torch.cuda.synchronize()
    if stall_ms:
        torch.cuda._sleep(int(stall_ms * 1.5e6))  # ~1.5 GHz clock: cycles for that many ms
    t0 = time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    torch.cuda.synchronize()
    return t


def main():
    batch, ctx = 8, 8192
    kv = PagedKV(num_layers=LAYERS, num_kv_heads=HK, head_dim=D, block_size=BS, dtype=torch.bfloat16,
                 device="cuda", device_blocks=batch * (ctx // BS + 8), host_blocks=64, watermarks=(0, 0))
    seqs = [kv.add_sequence() for _ in range(batch)]
    rows = torch.randn(batch * ctx, HK, D, device="cuda", dtype=torch.bfloat16)
    for layer in range(LAYERS):
        kv.append(seqs, layer, rows, rows)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, HK, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    eng, st = kv._engine, torch.cuda.current_stream().cuda_stream

    def calls(batch):
        for layer in range(LAYERS):
            kv.append(batch, layer, k, k)
            kv.attend(batch, layer, q)

    eager_steps = DecodeSteps(kv, calls, HQ, graph=False)

    def plain():
        calls(seqs)

    def planned():
        eager_steps.step(seqs)
        eager_steps.close()

    def planned_raw():  # the same without the Python layer's checks
        kv.begin_step(seqs, num_q_heads=HQ)
        lens = [1] * batch
        for layer in range(LAYERS):
            eng.append(seqs, layer, lens, k, k, st)
            eng.attend(seqs, layer, lens, q, out, None, HQ, 0.08838834764831845, -1, -1, st)
        kv.end_step()

    def attends_only():
        for layer in range(LAYERS):
            kv.attend(seqs, layer, q)

    def empties():
        for _ in range(LAYERS):
            torch.empty_like(q)

    def sleeps():
        for _ in range(2 * LAYERS):
            torch.cuda._sleep(10)

    print(f"card: {torch.cuda.get_device_name()}; batch {batch} x {ctx}, {LAYERS} layers; host ms per step")
    print(f"  {'calls':<34}{'GPU idle':>10}{'GPU busy 50 ms':>16}")
    for name, fn in (("append+attend", plain), ("begin_step, append+attend", planned),
                     ("begin_step, raw _C calls", planned_raw), ("attend only", attends_only),
                     ("torch.empty_like x32", empties), ("64 tiny kernels (torch)", sleeps)):
        fn()
        idle = min(host_time(fn) for _ in range(5))
        busy = min(host_time(fn, 50) for _ in range(3))
        print(f"  {name:<34}{idle * 1e3:>10.2f}{busy * 1e3:>16.2f}")


if __name__ == "__main__":
    main()
