"""`python -m pagedkv demo`: a long-context decode loop over a model-shaped stack of layers.

Random q/k/v stand in for a model: per step and layer, append one token's K/V per sequence and
attend over everything cached. On CUDA the shape is Llama-3-8B's attention (32 layers, 32 query
heads, 8 KV heads, head_dim 128, bf16); on the CPU a smaller stack so the demo ends in a minute.
"""
from __future__ import annotations

import sys
import time

import torch

from . import default_device
from .cache import PagedKV


def _bar(done: int, total: int, width: int = 28) -> str:
    fill = int(width * done / max(total, 1))
    return "[" + "#" * fill + "." * (width - fill) + "]"


def run(device: str | None = None, batch: int | None = None, prompt: int | None = None,
        steps: int | None = None, layers: int | None = None) -> dict:
    device = device or default_device()
    cuda = device.startswith("cuda")
    shape = (dict(layers=32, q_heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16)
             if cuda else dict(layers=8, q_heads=16, kv_heads=4, head_dim=64, dtype=torch.float32))
    layers = layers or shape["layers"]
    batch = batch or (8 if cuda else 2)
    prompt = prompt if prompt is not None else (32768 if cuda else 4096)
    steps = steps or (256 if cuda else 64)
    bs = 16
    dtype, hq, hk, d = shape["dtype"], shape["q_heads"], shape["kv_heads"], shape["head_dim"]
    blocks = batch * ((prompt + steps) // bs + 2)
    kv = PagedKV(num_layers=layers, num_kv_heads=hk, head_dim=d, block_size=bs, dtype=dtype,
                 device=device, device_blocks=blocks)
    print(f"pagedkv demo on {device}: {layers} layers, {hq} q heads / {hk} kv heads, head_dim {d}, "
          f"{str(dtype)[6:]}, batch {batch}, prompt {prompt} tokens + {steps} decoded", flush=True)
    print(f"  cache: {kv}", flush=True)
    seqs = [kv.add_sequence() for _ in range(batch)]
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*s):
        return torch.randn(*s, generator=gen, device=device, dtype=torch.float32).to(dtype)

    # Prefill: the prompt's K/V written in chunks, attention for the chunk's rows (chunked prefill).
    t0 = time.perf_counter()
    chunk = 1024
    for start in range(0, prompt, chunk):
        n = min(chunk, prompt - start)
        k, v = rand(batch * n, hk, d), rand(batch * n, hk, d)
        for layer in range(layers):
            kv.append(seqs, layer, k, v)
            if cuda:
                kv.attend(seqs, layer, rand(batch * n, hq, d))
    if cuda:
        torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    last = t0
    tty = sys.stdout.isatty()
    for step in range(1, steps + 1):
        q, k, v = rand(layers, batch, hq, d), rand(layers, batch, hk, d), rand(layers, batch, hk, d)
        for layer in range(layers):
            kv.append(seqs, layer, k[layer], v[layer])
            kv.attend(seqs, layer, q[layer])
        now = time.perf_counter()
        if tty or step == steps or now - last > 5 or step % max(steps // 8, 1) == 0:
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            tps = step * batch / (now - t0)
            s = kv.stats()
            line = (f"  {_bar(step, steps)} {step}/{steps} steps | {tps:8.1f} tok/s | context "
                    f"{kv.seq_len(seqs[0])} | blocks {s['device_blocks_used']}/{kv.device_blocks}")
            print(("\r" + line) if tty else line, end="" if tty and step < steps else "\n", flush=True)
            last = now
    if cuda:
        torch.cuda.synchronize()
    decode_s = time.perf_counter() - t0
    s = kv.stats()
    res = dict(device=device, layers=layers, batch=batch, prompt=prompt, steps=steps,
               prefill_s=prefill_s, decode_s=decode_s, tokens_per_s=steps * batch / decode_s,
               context=kv.seq_len(seqs[0]), blocks_used=s["device_blocks_used"],
               kv_gib=s["device_blocks_used"] * kv.block_bytes / 2**30)
    print("summary")
    print(f"  prefill   {prompt * batch} tokens in {prefill_s:.2f} s"
          + ("" if cuda else " (K/V writes only: the CPU reference skips prompt attention)"))
    print(f"  decode    {steps * batch} tokens in {decode_s:.2f} s = {res['tokens_per_s']:.1f} tok/s "
          f"({decode_s / steps * 1e3:.2f} ms per step of {layers} layers)")
    print(f"  context   {res['context']} tokens per sequence, {batch} sequences")
    print(f"  memory    {res['blocks_used']} blocks of {bs} tokens = {res['kv_gib']:.3f} GiB of K/V")
    kv.check_invariants()
    return res
