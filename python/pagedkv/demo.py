"""`python -m pagedkv demo`: a long streaming generation at constant memory.

Random q/k/v stand in for a model: per step and layer, append one token's K/V per sequence and
attend over what the scope keeps. The scope is a sliding window with attention sinks
(StreamingLLM) and `retain=False`, so blocks that fall out of every future window return to the
pool at once and memory stays flat however long the stream runs; `--window 0` runs full causal
attention instead (memory then grows with the context). On CUDA the shape is Llama-3-8B's
attention (32 layers, 32 query heads, 8 KV heads, head_dim 128, bf16); on the CPU a smaller one.
"""
from __future__ import annotations

import sys
import time

import torch

from . import default_device
from .bench.common import device_used_bytes
from .cache import PagedKV


def _bar(done: int, total: int, width: int = 24) -> str:
    fill = int(width * done / max(total, 1))
    return "[" + "#" * fill + "." * (width - fill) + "]"


def run(device: str | None = None, batch: int | None = None, prompt: int | None = None,
        steps: int | None = None, layers: int | None = None, window: int | None = None,
        sinks: int = 4) -> dict:
    device = device or default_device()
    cuda = device.startswith("cuda")
    shape = (dict(layers=32, q_heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16)
             if cuda else dict(layers=8, q_heads=16, kv_heads=4, head_dim=64, dtype=torch.float32))
    layers = layers or shape["layers"]
    batch = batch or (4 if cuda else 2)
    window = (4096 if cuda else 1024) if window is None else window
    prompt = prompt if prompt is not None else (2 * window if window else 4096)
    steps = steps or (8192 if cuda else 600)
    bs, chunk = 16, 512
    dtype, hq, hk, d = shape["dtype"], shape["q_heads"], shape["kv_heads"], shape["head_dim"]
    if window:
        # per sequence: the scope, plus a prefill chunk's rows (layer 0 runs a chunk ahead of the last)
        blocks = batch * ((window + sinks + 2 * chunk) // bs + 4)
        scope = dict(window=window, sink_tokens=sinks, retain=False)
    else:
        blocks = batch * ((prompt + steps) // bs + 2)
        scope = {}
    kv = PagedKV(num_layers=layers, num_kv_heads=hk, head_dim=d, block_size=bs, dtype=dtype,
                 device=device, device_blocks=blocks, **scope)
    what = f"window {window} + {sinks} sinks, retain=False" if window else "full causal attention"
    print(f"pagedkv demo on {device}: {layers} layers, {hq} q / {hk} kv heads, head_dim {d}, "
          f"{str(dtype)[6:]}, batch {batch}, {what}; prompt {prompt} + {steps} generated tokens", flush=True)
    seqs = [kv.add_sequence() for _ in range(batch)]
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*s):
        return torch.randn(*s, generator=gen, device=device, dtype=torch.float32).to(dtype)

    t0 = time.perf_counter()
    for start in range(0, prompt, chunk):  # chunked prefill: each chunk attends to its own scope
        n = min(chunk, prompt - start)
        k, v = rand(batch * n, hk, d), rand(batch * n, hk, d)
        for layer in range(layers):
            kv.append(seqs, layer, k, v)
            if cuda:
                kv.attend(seqs, layer, rand(batch * n, hq, d))
    if cuda:
        torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    mem_start, blocks_start = device_used_bytes(device) / 2**20, kv.stats()["device_blocks_used"]

    t0 = last = time.perf_counter()
    marks = []  # (step, seconds) for the first and last tenth
    tty = sys.stdout.isatty()
    for step in range(1, steps + 1):
        q, k, v = rand(layers, batch, hq, d), rand(layers, batch, hk, d), rand(layers, batch, hk, d)
        for layer in range(layers):
            kv.append(seqs, layer, k[layer], v[layer])
            kv.attend(seqs, layer, q[layer])
        if step in (steps // 10, steps - steps // 10) or step == steps:
            if cuda:
                torch.cuda.synchronize()
            marks.append((step, time.perf_counter() - t0))
        now = time.perf_counter()
        if tty or step == steps or now - last > 5 or step % max(steps // 8, 1) == 0:
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            s = kv.stats()
            line = (f"  {_bar(step, steps)} {step}/{steps} | {step * batch / (now - t0):8.1f} tok/s | context "
                    f"{kv.seq_len(seqs[0])} | blocks device {s['device_blocks_used']}/{kv.device_blocks} "
                    f"dropped {s['drops']}" + (f" | GPU MiB {device_used_bytes(device) / 2**20:.0f}" if cuda else ""))
            print(("\r" + line) if tty else line, end="" if tty and step < steps else "\n", flush=True)
            last = now
    decode_s = time.perf_counter() - t0
    s = kv.stats()
    early = marks[0][0] * batch / marks[0][1] if marks and marks[0][1] > 0 else float("nan")
    late = ((steps - marks[1][0]) * batch / (marks[2][1] - marks[1][1])
            if len(marks) == 3 and marks[2][1] > marks[1][1] else float("nan"))
    res = dict(device=device, layers=layers, batch=batch, prompt=prompt, steps=steps, window=window,
               sinks=sinks, prefill_s=prefill_s, decode_s=decode_s, tokens_per_s=steps * batch / decode_s,
               tokens_per_s_first_tenth=early, tokens_per_s_last_tenth=late,
               context=kv.seq_len(seqs[0]), blocks_start=blocks_start, blocks_end=s["device_blocks_used"],
               device_mib_start=mem_start, device_mib_end=device_used_bytes(device) / 2**20, drops=s["drops"],
               kv_gib=s["device_blocks_used"] * kv.block_bytes / 2**30)
    print("summary")
    print(f"  {'':<22}{'start':>14}{'end':>14}")
    print(f"  {'context per sequence':<22}{prompt:>14}{res['context']:>14}")
    print(f"  {'device blocks in use':<22}{blocks_start:>14}{res['blocks_end']:>14}")
    if cuda:
        print(f"  {'GPU memory (driver)':<22}{mem_start:>11.0f} MiB{res['device_mib_end']:>10.0f} MiB")
    print(f"  {'tokens/s':<22}{early:>14.1f}{late:>14.1f}   (first and last tenth of the decode)")
    print(f"  decoded {steps * batch} tokens in {decode_s:.2f} s = {res['tokens_per_s']:.1f} tok/s; "
          f"{s['drops']} blocks dropped, K/V held {res['kv_gib']:.3f} GiB; prefill {prefill_s:.2f} s"
          + ("" if cuda else " (K/V writes only on the CPU)"))
    kv.check_invariants()
    return res
