"""pagedkv.hf inside transformers: generate() on PagedKVCache gives the same tokens as
transformers' own DynamicCache with "sdpa"/"eager" attention (the oracle), on small randomly
initialised Llama, Qwen2 (mixed sliding/full layers), Mistral (sliding window) and Gemma-2/3
style models, float32 on the CPU, block_size 4 so prompts of 5, 17 and 33 tokens cross blocks."""
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
import pagedkv.hf as phf  # noqa: E402

BLOCK = 4
NEW = 24
WINDOW = 8           # smaller than the prompts, so the sliding layers' window matters
SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _configs():
    t = transformers
    yield "llama", t.LlamaConfig(**SMALL), t.LlamaForCausalLM
    yield "qwen2", t.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=WINDOW,
                                 max_window_layers=1), t.Qwen2ForCausalLM
    yield "mistral", t.MistralConfig(**SMALL, sliding_window=WINDOW), t.MistralForCausalLM
    yield "gemma2", t.Gemma2Config(**SMALL, sliding_window=WINDOW, attn_logit_softcapping=None,
                                   query_pre_attn_scalar=16), t.Gemma2ForCausalLM
    if hasattr(t, "Gemma3TextConfig"):
        yield "gemma3", t.Gemma3TextConfig(**SMALL, sliding_window=WINDOW, query_pre_attn_scalar=16,
                                           layer_types=["sliding_attention", "full_attention"]), \
            t.Gemma3ForCausalLM


# transformers 5.24 renamed generate's past_key_values to cache (the old name still works, warning)
CACHE_KW = "cache" if "cache" in inspect.signature(transformers.GenerationMixin.generate).parameters \
    else "past_key_values"
# Gemma-2 has no sdpa path in newer 5.x; eager is the oracle there
REF_ATTN = {"gemma2": "eager"}
CONFIGS = {name: (cfg, cls) for name, cfg, cls in _configs()}
_models = {}


def model_for(name: str):
    if name not in _models:
        cfg, cls = CONFIGS[name]
        torch.manual_seed(1234)
        model = cls(cfg).eval()
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = None   # always NEW tokens: nothing stops early
        _models[name] = model
    return _models[name]


def left_padded(lengths, gen):
    """input_ids [B, max] and attention_mask, each prompt's pads on its left."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, 96, (n,), generator=gen)
        mask[row, width - n:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def reference(model, inputs, attn=None, **gen_kwargs):
    model.set_attn_implementation(attn or REF_ATTN.get(model.config.model_type, "sdpa"))
    return model.generate(**inputs, max_new_tokens=NEW, **gen_kwargs)


def paged(model, inputs, blocks=256, host_blocks=0, **gen_kwargs):
    cache = phf.PagedKVCache.from_model(model, device_blocks=blocks, host_blocks=host_blocks, block_size=BLOCK)
    out = model.generate(**inputs, max_new_tokens=NEW, **{CACHE_KW: cache}, **gen_kwargs)
    cache.kv.check_invariants()
    return out, cache


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("lengths", [[5], [17], [33], [5, 17, 33, 12]], ids=["b1-5", "b1-17", "b1-33", "b4-left"])
def test_greedy_matches_default_cache(name, lengths, gen):
    model = model_for(name)
    inputs = left_padded(lengths, gen)
    want = reference(model, inputs, do_sample=False)
    got, cache = paged(model, inputs, do_sample=False)
    assert torch.equal(got, want)
    # only real tokens are stored: each sequence holds its prompt plus the generated tokens
    # (the last one is never fed back)
    held = [cache.kv.seq_len(s, layer) for s in cache._seqs for layer in range(2)]
    assert held == [n + NEW - 1 for n in lengths for _ in range(2)]
    assert cache.get_seq_length() == max(lengths) + NEW - 1


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_host_tier_with_chunked_prefill_matches_default_cache(name, gen):
    """A device tier of 6 blocks for contexts of up to 14: the rest sits on the host tier and
    passes through each layer's attention as staged slices; prefill runs in chunks of 8."""
    model = model_for(name)
    inputs = left_padded([33, 17], gen)
    want = reference(model, inputs, do_sample=False)
    got, cache = paged(model, inputs, blocks=6, host_blocks=64, do_sample=False, prefill_chunk_size=8)
    assert torch.equal(got, want)
    st = cache.kv.stats()
    assert st["slices_staged"] > 0 and st["blocks_to_host"] > 0, st


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_greedy_matches_eager(name, gen):
    model = model_for(name)
    inputs = left_padded([9, 17], gen)
    assert torch.equal(paged(model, inputs, do_sample=False)[0],
                       reference(model, inputs, attn="eager", do_sample=False))


def test_sampling_matches_default_cache(gen):
    model = model_for("mistral")
    inputs = left_padded([6, 17, 11], gen)
    torch.manual_seed(7)
    want = reference(model, inputs, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(7)
    got, _ = paged(model, inputs, do_sample=True, top_k=20, temperature=0.9)
    assert torch.equal(got, want)


def test_beam_search_matches_default_cache(gen):
    model = model_for("llama")
    inputs = left_padded([7, 13], gen)
    want = reference(model, inputs, num_beams=3, do_sample=False)
    got, cache = paged(model, inputs, num_beams=3, do_sample=False)
    assert torch.equal(got, want)
    assert cache.stats()["num_sequences"] == 6


def test_assisted_decoding_matches_default_cache(gen):
    model = model_for("llama")
    cfg, cls = CONFIGS["llama"]
    torch.manual_seed(99)
    assistant = cls(cfg.__class__(**{**SMALL, "num_hidden_layers": 1})).eval()
    assistant.generation_config.pad_token_id = 0
    inputs = left_padded([17], gen)
    want = reference(model, inputs, assistant_model=assistant, do_sample=False)
    got, _ = paged(model, inputs, assistant_model=assistant, do_sample=False)
    assert torch.equal(got, want)
    assert torch.equal(got, reference(model, inputs, do_sample=False))


def test_crop_and_continue(gen):
    """Crop 5 tokens, feed them again: the logits match a cache that never had them removed."""
    model = model_for("qwen2")
    model.set_attn_implementation("sdpa")
    inputs = left_padded([5, 17], gen)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    cache = phf.PagedKVCache.from_model(model, device_blocks=64, block_size=BLOCK)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache).logits
        cache.crop(-5)
        assert cache.get_seq_length() == 12
        assert [cache.kv.seq_len(s) for s in cache._seqs] == [0, 12]
        again = model(input_ids=ids[:, -5:], attention_mask=mask, position_ids=pos[:, -5:],
                      past_key_values=cache).logits
    torch.testing.assert_close(again[1], full[1, -5:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again[0], full[0, -5:], rtol=1e-5, atol=1e-5)
    cache.crop(15)                                   # deprecated form: the length to keep
    assert cache.get_seq_length() == 15 and cache.kv.seq_len(cache._seqs[1]) == 15
    cache.kv.check_invariants()


def test_reorder_and_batch_select(gen):
    """After reorder/select/repeat, each row continues like the row it came from."""
    model = model_for("llama")
    inputs = left_padded([6, 9, 4], gen)
    cache = phf.PagedKVCache.from_model(model, device_blocks=64, block_size=BLOCK)
    with torch.no_grad():
        model(**inputs, position_ids=(inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0),
              past_key_values=cache)
    before = [cache.kv.gather(s, 1)[0] for s in cache._seqs]
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert [torch.equal(cache.kv.gather(s, 1)[0], before[i]) for s, i in zip(cache._seqs, [2, 0, 0])] == [True] * 3
    cache.batch_select_indices(torch.tensor([1, 2]))
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 4
    assert all(torch.equal(cache.kv.gather(s, 1)[0], before[0]) for s in cache._seqs)
    cache.kv.check_invariants()
    assert cache.stats()["num_sequences"] == 4


def test_softcapping_raises():
    cfg = transformers.Gemma2Config(**SMALL, attn_logit_softcapping=50.0)
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    with pytest.raises(NotImplementedError, match="attn_logit_softcapping"):
        phf.PagedKVCache.from_model(model, device_blocks=16, block_size=BLOCK)


def test_streaming_arguments_are_checked():
    with pytest.raises(ValueError, match="window"):
        phf.PagedKVCache.from_model(model_for("llama"), device_blocks=16, positions="cache")
    with pytest.raises(ValueError, match="positions='cache'"):
        phf.PagedKVCache.from_model(model_for("llama"), device_blocks=16, window=16, sink_tokens=4)
    with pytest.raises(NotImplementedError, match="sliding"):
        phf.PagedKVCache.from_model(model_for("mistral"), device_blocks=16, window=16, sink_tokens=4,
                                    positions="cache")


def test_streaming_generation_runs_at_constant_memory(gen):
    """StreamingLLM inside generate(): identical tokens while everything fits in the window (no
    sink shift yet), then a flat block count however long the generation runs."""
    model = model_for("llama")
    window, sinks, prompt = 24, 4, 8
    inputs = left_padded([prompt], gen)
    want = reference(model, inputs)[0, prompt:prompt + window - prompt]
    cache = phf.PagedKVCache.from_model(model, device_blocks=64, block_size=BLOCK, window=window,
                                        sink_tokens=sinks, positions="cache")
    out = model.generate(**inputs, max_new_tokens=120, **{CACHE_KW: cache})
    assert torch.equal(out[0, prompt:prompt + window - prompt], want)
    assert out.shape[1] == prompt + 120
    bound = -(-(window + sinks) // BLOCK) + 2
    assert cache.kv.stats()["device_blocks_used"] <= bound
    assert cache.kv.stats()["drops"] > 0
    assert cache.get_seq_length() == prompt + 120 - 1
    cache.kv.check_invariants()


def test_cache_without_pagedkv_attention_raises(gen):
    model = model_for("llama")
    cache = phf.PagedKVCache.from_model(model, device_blocks=64, block_size=BLOCK)
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="set_attn_implementation"):
        model.generate(**left_padded([5], gen), max_new_tokens=2, **{CACHE_KW: cache})


def test_forward_without_paged_cache_uses_dense_path(gen):
    """With attention switched to pagedkv, a forward with no cache or a DynamicCache still works."""
    model = model_for("mistral")
    inputs = left_padded([9, 17], gen)
    want = reference(model, inputs, do_sample=False)
    phf.PagedKVCache.from_model(model, device_blocks=16)
    got = model.generate(**inputs, max_new_tokens=NEW, do_sample=False,
                         **{CACHE_KW: transformers.DynamicCache(config=model.config)})
    assert torch.equal(got, want)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, use_cache=False).logits[inputs["attention_mask"].bool()],
                                   _logits(model, inputs, REF_ATTN.get("mistral", "sdpa")), rtol=1e-5, atol=1e-5)


def _logits(model, inputs, attn):
    model.set_attn_implementation(attn)
    with torch.no_grad():
        out = model(**inputs, use_cache=False).logits[inputs["attention_mask"].bool()]
    model.set_attn_implementation("pagedkv")
    return out


def test_out_of_blocks_is_a_memory_error(gen):
    import pagedkv
    model = model_for("llama")
    with pytest.raises(pagedkv.OutOfBlocksError):
        paged(model, left_padded([33], gen), blocks=4)
