"""`python -m pagedkv bench hf`: generate() on a Llama-3-8B-shaped model (random bf16 weights,
no download) with transformers' default cache, DynamicCache(offloading=True) and PagedKVCache.

Per prompt length: time to first token (when generate first asks for a token's logits to be
processed), decode tokens/s (the other `new - 1` tokens over the rest of the time) and peak
device memory, from one generate. Then greedy tokens of pagedkv against the default cache for
`--check-new` tokens, with the first divergence if any. pagedkv's pool and scratch buffers are allocated outside torch's allocator, so their
bytes are added to torch's peak.

pagedkv_host keeps a small device tier (two prefill chunks of blocks) and the rest on the pinned
host tier; generate runs with `prefill_chunk_size` so that no forward holds the whole prompt's
activations, and each layer's attention reads the host part of the context from staged slices.
The other columns run generate as transformers does by default (one prefill forward).
"""
from __future__ import annotations

import gc
import time

import torch

from ..bench.common import save

MODES = ("default", "offload", "pagedkv", "pagedkv_host")


def llama3_8b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, max_position_embeddings=131072 + 4096, rope_theta=500000.0,
                       bos_token_id=128000, eos_token_id=None, pad_token_id=0)


def build_model(layers: int, device: str):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama3_8b_config(layers)).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _cache(mode: str, model, prompt: int, new: int, block_size: int, chunk: int):
    from transformers import DynamicCache

    from .cache import PagedKVCache

    if mode in ("default", "eager"):
        model.set_attn_implementation("sdpa" if mode == "default" else "eager")
        return None, 0
    if mode == "offload":
        model.set_attn_implementation("sdpa")
        return DynamicCache(config=model.config, offloading=True), 0
    blocks = (prompt + new) // block_size + 2
    if mode == "pagedkv_host":
        device = min(blocks, 2 * chunk // block_size + 64)
        cache = PagedKVCache.from_model(model, device_blocks=device, host_blocks=blocks, block_size=block_size)
        return cache, device * cache.kv.block_bytes
    cache = PagedKVCache.from_model(model, device_blocks=blocks, block_size=block_size)
    return cache, blocks * cache.kv.block_bytes


class _FirstToken:
    """A logits processor that notes when generate first calls it: the prompt's forward is done."""

    def __init__(self):
        self.at = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            torch.cuda.synchronize()
            self.at = time.perf_counter()
        return scores


def _generate(model, mode, ids, new, block_size, chunk):
    """(seconds to the first token, seconds in all, peak bytes, tokens) of one generate of `new`
    tokens with a fresh cache."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cache, pool_bytes = _cache(mode, model, ids.shape[1], new, block_size, chunk)
    kwargs = {} if cache is None else {"past_key_values": cache}
    if mode == "pagedkv_host":
        kwargs["prefill_chunk_size"] = chunk
    first = _FirstToken()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, logits_processor=[first], **kwargs)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() + pool_bytes
    if cache is not None and hasattr(cache, "kv"):
        peak += cache.kv.stats()["device_scratch_bytes"]
    del cache
    return first.at - t0, seconds, peak, out[0, ids.shape[1]:]


def _forced_logits(model, mode: str, ids, tokens, block_size: int):
    """Float logits of each of `tokens` (teacher-forced: the same tokens fed to every mode) after
    the prompt `ids`, one decode step at a time on a fresh cache of `mode`."""
    from transformers import DynamicCache

    cache, _ = _cache(mode, model, ids.shape[1], len(tokens), block_size, 0)
    if cache is None:
        cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = [out.logits[0, -1].float()]
        for t in tokens[:-1]:
            out = model(input_ids=t.view(1, 1), past_key_values=cache, use_cache=True)
            logits.append(out.logits[0, -1].float())
    model.set_attn_implementation("sdpa")
    return torch.stack(logits)


def _agreement(ref, other) -> dict:
    """How `other`'s argmax agrees with `ref`'s step by step, beside ref's top-2 margins."""
    top2 = ref.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    differ = (ref.argmax(-1) != other.argmax(-1)).nonzero().flatten()
    return {"agree": int(ref.shape[0] - differ.numel()), "steps": int(ref.shape[0]),
            "max_abs_logit_diff": float((ref - other).abs().max()),
            "median_top2_margin": float(margin.median()),
            "margins_where_differ": [round(float(margin[i]), 5) for i in differ.tolist()]}


def check_greedy(model, prompt: int, new: int, block_size: int) -> dict:
    """Greedy tokens of pagedkv against the default cache (sdpa) on the same bf16 model; then,
    feeding both the default's tokens, where their argmaxes differ and by what top-2 margin,
    beside the same comparison of transformers' own eager attention against its sdpa (how far
    two correct bf16 attention kernels drift apart on this model)."""
    ids = torch.randint(1000, 100000, (1, prompt), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    want = _generate(model, "default", ids, new, block_size, 0)[3]
    got = _generate(model, "pagedkv", ids, new, block_size, 0)[3]
    eager = _generate(model, "eager", ids, new, block_size, 0)[3]
    model.set_attn_implementation("sdpa")

    def first(a, b):
        d = (a != b).nonzero()
        return None if d.numel() == 0 else int(d[0, 0])

    ref = _forced_logits(model, "default", ids, want, block_size)
    return {"prompt": prompt, "new_tokens": new, "identical": first(want, got) is None,
            "first_divergence": first(want, got), "eager_vs_sdpa_first_divergence": first(want, eager),
            "forced_pagedkv": _agreement(ref, _forced_logits(model, "pagedkv", ids, want, block_size)),
            "forced_eager": _agreement(ref, _forced_logits(model, "eager", ids, want, block_size))}


def measure(model, mode: str, prompt: int, new: int, block_size: int, chunk: int) -> dict:
    ids = torch.randint(1000, 100000, (1, prompt), device="cuda")
    try:
        ttft, total, peak, _ = _generate(model, mode, ids, new, block_size, chunk)
    except torch.OutOfMemoryError:
        return {"status": "OOM"}
    except MemoryError as e:           # pagedkv.OutOfBlocksError
        return {"status": f"out of blocks: {e}"}
    decode_s = max(total - ttft, 1e-9)
    return {"status": "ok", "ttft_s": ttft, "decode_tok_s": (new - 1) / decode_s,
            "peak_gib": peak / 2**30}


def run(layers: int = 32, prompts=(8192, 32768, 131072), new: int = 64, block_size: int = 16,
        modes=MODES, chunk: int = 4096, check_new: int = 256) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("bench hf: needs a CUDA GPU (bf16 Llama-3-8B-shaped model)")
    model = build_model(layers, "cuda")
    weights = torch.cuda.memory_allocated()
    greedy = check_greedy(model, 1000, check_new, block_size) if check_new else None
    if greedy:
        print(f"  greedy, prompt {greedy['prompt']}, {greedy['new_tokens']} new tokens: "
              + ("identical to the default cache" if greedy["identical"]
                 else f"first divergence at new token {greedy['first_divergence']}")
              + f" (transformers' eager vs its sdpa: {greedy['eager_vs_sdpa_first_divergence']})", flush=True)
        for name in ("pagedkv", "eager"):
            f = greedy[f"forced_{name}"]
            print(f"  teacher-forced on the default's tokens, {name} vs sdpa: argmax agrees {f['agree']}/{f['steps']}, "
                  f"max |logit diff| {f['max_abs_logit_diff']:.4f}, median top-2 margin {f['median_top2_margin']:.4f}, "
                  f"margins where they differ {f['margins_where_differ'][:8]}", flush=True)
    rows = []
    if prompts:
        print_header(modes)
    for prompt in prompts:
        row = {"prompt": prompt}
        for mode in modes:
            row[mode] = measure(model, mode, prompt, new, block_size, chunk)
        rows.append(row)
        print_row(row, modes)
    return {"config": dict(model="Llama-3-8B shape, random bf16 weights", layers=layers,
                           new_tokens=new, block_size=block_size, batch=1, host_prefill_chunk=chunk,
                           weights_gib=weights / 2**30),
            "greedy_check": greedy, "rows": rows}


def _cell(m: dict, key: str, fmt: str) -> str:
    return fmt.format(m[key]) if m.get("status") == "ok" else m["status"][:12]


def print_header(modes) -> None:
    print(f"{'prompt':>8} | " + " | ".join(f"{m:^30}" for m in modes))
    print(f"{'':>8} | " + " | ".join(f"{'tok/s':>8} {'TTFT s':>8} {'peak GiB':>10}" for _ in modes))


def print_row(row: dict, modes) -> None:
    cells = []
    for mode in modes:
        m = row[mode]
        if m.get("status") != "ok":
            cells.append(f"{m['status'][:30]:^30}")
        else:
            cells.append(f"{m['decode_tok_s']:>8.1f} {m['ttft_s']:>8.2f} {m['peak_gib']:>10.2f}")
    print(f"{row['prompt']:>8} | " + " | ".join(cells), flush=True)


def main(args) -> None:
    prompts = tuple(int(p) for p in str(args.prompts).split(",") if p)  # "": the greedy check only
    modes = tuple(args.modes.split(",")) if getattr(args, "modes", None) else MODES
    print(f"generate() on a Llama-3-8B-shaped model, {args.layers} layers, bf16, batch 1, "
          f"{args.new} new tokens; peak = torch peak + pagedkv pool")
    res = run(layers=args.layers, prompts=prompts, new=args.new, block_size=args.block_size, modes=modes,
              chunk=args.prefill_chunk, check_new=args.check_new)
    ratios = []
    for row in res["rows"]:
        d, o = row.get("default", {}), row.get("offload", {})
        for name in ("pagedkv", "pagedkv_host"):
            p = row.get(name, {})
            if d.get("status") == "ok" and p.get("status") == "ok":
                ratios.append(f"{row['prompt']}: {name}/default tok/s {p['decode_tok_s'] / d['decode_tok_s']:.2f}x, "
                              f"peak {p['peak_gib'] / d['peak_gib']:.2f}x")
            if o.get("status") == "ok" and p.get("status") == "ok":
                ratios.append(f"{row['prompt']}: {name}/offload tok/s {p['decode_tok_s'] / o['decode_tok_s']:.2f}x")
    for r in ratios:
        print("  " + r)
    print(f"  saved {save('hf', res)}")
