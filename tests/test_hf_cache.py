"""The exported model's compacted S2 KV cache and its Triton decode kernel (CPU: Triton's interpreter).

References, all independent of the cache's slot arithmetic: generation without any cache (the whole
sequence recomputed each step), attention over the full uncompacted keys under ``s2_token_mask`` in
float64, the kept set written out as loops over positions, and S = N / (L + G (N - L) / V).
"""

import sys

import pytest
import torch

from megatron_s2 import S2Pattern
from megatron_s2.hf.configuration_s2_llama import S2LlamaConfig, s2_layer_entry
from megatron_s2.hf.modeling_s2_llama import S2LlamaForCausalLM
from megatron_s2.hf.s2_decode_kernel import s2_decode_attention
from megatron_s2.hf.s2_kv_cache import S2KVCache
from megatron_s2.hf.token_masks import s2_token_mask
from tests.helpers import needs_triton_interpreter

HEADS, KV_HEADS, DIM = 8, 2, 16


def s2_layer(heads=HEADS, kv_heads=KV_HEADS, **fields):
    return s2_layer_entry(S2Pattern(**{"block_size": 16, "local_blocks": 2, "vert_stride": 4, **fields}),
                          heads, kv_heads)


WINDOW_ONLY = {"block_size": 16, "local_blocks": 2, "vert_stride": 0, "head_offsets": [0] * HEADS}
LAYERS = {
    "heterogeneous": s2_layer(),
    "kv_group": s2_layer(head_pattern="kv_group", head_sliding_step=1),
    "dense_heads": s2_layer(num_dense_heads=2, local_blocks=1, vert_stride=8),  # KV heads keep 4 and 8 residues
    "window_only": WINDOW_ONLY,
}


def config(s2_layers, heads=HEADS, kv_heads=KV_HEADS, **overrides):
    kwargs = dict(vocab_size=120, hidden_size=heads * DIM, intermediate_size=96, num_hidden_layers=len(s2_layers),
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                  tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kwargs.update(overrides)
    return S2LlamaConfig(**kwargs, s2_layers=s2_layers)


def left_padded(lengths, width):
    """Positions ``[b, width]`` of left-padded sequences (-1 on padding)."""
    cols = torch.arange(width)
    return torch.stack([torch.where(cols >= width - n, cols - (width - n), -1) for n in lengths])


def fill(cache, layer_idx, keys, values, positions, chunks):
    """Store the tokens through ``s2_store`` in chunks of the given lengths, then one at a time."""
    start = 0
    for size in chunks:
        cache.s2_store(layer_idx, keys[:, :, start:start + size], values[:, :, start:start + size],
                       positions[:, start:start + size])
        start += size
    for t in range(start, keys.shape[2]):
        cache.s2_store(layer_idx, keys[:, :, t:t + 1], values[:, :, t:t + 1], positions[:, t:t + 1])


def random_kv(batch, kv_heads, length, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, kv_heads, length, DIM, generator=g, dtype=torch.float32) for _ in range(2))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_cache_keeps_exactly_the_window_and_the_stripes_of_each_kv_head(name):
    layer = LAYERS[name]
    cache = S2KVCache(config([layer]))
    positions = left_padded([150, 93], 150)
    keys, values = random_kv(2, KV_HEADS, 150, seed=1)
    fill(cache, 0, keys, values, positions, chunks=[50, 37])
    stored_k, stored_v, stored_pos = cache.s2_entries(0)
    block, window, stride = layer["block_size"], layer["local_blocks"] * layer["block_size"], layer["vert_stride"]
    group = HEADS // KV_HEADS
    for b in range(2):
        last = int(positions[b, -1])
        for h in range(KV_HEADS):
            offsets = layer["head_offsets"][h * group:(h + 1) * group]
            expected = set()
            for p in range(last + 1):
                stripe = any(o is None or (stride > 0 and (p // block + o) % stride == 0) for o in offsets)
                if p > last - window or stripe:
                    expected.add(p)
            held = stored_pos[b, h]
            assert set(held[held >= 0].tolist()) == expected, (b, h)
            column = {int(p): i for i, p in enumerate(positions[b]) if p >= 0}
            for slot in torch.nonzero(held >= 0).flatten().tolist():
                source = column[int(held[slot])]
                assert torch.equal(stored_k[b, h, slot], keys[b, h, source])
                assert torch.equal(stored_v[b, h, slot], values[b, h, source])


@pytest.mark.parametrize("pattern, distinct", [("kv_group", 1), ("heterogeneous", 4)])
def test_cache_memory_matches_the_formula(pattern, distinct):
    """S = N / (L + G (N - L) / V) at N = L + 3 V blocks (whole stripe cycles), one sequence."""
    heads, kv_heads, block, local, stride = 8, 2, 16, 3, 4
    layer = s2_layer(heads, kv_heads, block_size=block, local_blocks=local, vert_stride=stride,
                     head_pattern=pattern, head_sliding_step=1)
    n_blocks = local + 3 * stride
    length = n_blocks * block
    cache = S2KVCache(config([layer, None], heads, kv_heads), capacity=length)
    keys, values = random_kv(1, kv_heads, length, seed=2)
    positions = torch.arange(length)[None]
    fill(cache, 0, keys, values, positions, chunks=[length - 5])
    cache.dense_update(1, keys, values)
    expected_s = n_blocks / (local + distinct * (n_blocks - local) / stride)
    s2_layer_entries = kv_heads * length / expected_s
    stats = cache.kv_cache_stats()
    assert stats["full_entries"] == 2 * kv_heads * length
    assert stats["kept_entries"] == s2_layer_entries + kv_heads * length  # the dense layer keeps all
    assert stats["allocated_entries"] == stats["kept_entries"]  # capacity: nothing allocated in vain


KERNEL_CASES = {  # name: (layer, query heads, splits of the context)
    **{name: (layer, HEADS, splits) for (name, layer), splits in zip(sorted(LAYERS.items()), (5, 3, 1, 2))},
    "mha_kv_group": (s2_layer(2, KV_HEADS, head_pattern="kv_group", vert_stride=2), 2, 4),
    "all_dense_heads": (s2_layer(num_dense_heads=HEADS), HEADS, 3),  # bench_generate's dense_splitkv
}


@needs_triton_interpreter
@pytest.mark.parametrize("name", sorted(KERNEL_CASES))
def test_decode_kernel_matches_float64_attention_over_the_full_keys(name):
    layer, heads, splits = KERNEL_CASES[name]
    kv_heads = KV_HEADS
    cache = S2KVCache(config([layer], heads=heads, kv_heads=kv_heads))
    positions = left_padded([131, 70], 131)
    keys, values = random_kv(2, kv_heads, 131, seed=3)
    fill(cache, 0, keys, values, positions, chunks=[100])
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, heads, DIM, generator=g)
    stored_k, stored_v = cache.buffers[0]
    last = cache.last_position[0]
    out = s2_decode_attention(q, stored_k, stored_v, last, cache.geometry[0], DIM**-0.5, num_splits=splits)

    allowed = s2_token_mask(layer, positions[:, -1:], positions)[:, :, 0]  # [b, h, keys]
    group = heads // kv_heads
    scores = torch.einsum("bhd,bhkd->bhk", q.double(), keys.double().repeat_interleave(group, 1)) * DIM**-0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    reference = torch.einsum("bhk,bhkd->bhd", probs, values.double().repeat_interleave(group, 1))
    assert (out.double() - reference).abs().max() < 1e-5


@needs_triton_interpreter
@pytest.mark.parametrize("name", ["dense_heads", "heterogeneous", "kv_group"])
def test_decode_store_kernel_fills_the_cache_like_the_pytorch_path(name, monkeypatch):
    positions = left_padded([120, 77], 120)
    keys, values = random_kv(2, KV_HEADS, 120, seed=5)
    caches = []
    for kernel in (False, True):
        monkeypatch.setattr(sys.modules[S2KVCache.__module__], "s2_decode_kernel_runs_on", lambda t, k=kernel: k)
        cache = S2KVCache(config([LAYERS[name]]))
        fill(cache, 0, keys, values, positions, chunks=[30])
        caches.append(cache.s2_entries(0))
    (torch_k, torch_v, torch_pos), (kernel_k, kernel_v, kernel_pos) = caches
    held = torch_pos >= 0  # other slots are scratch (dropped tokens, a grown buffer's old last slot)
    assert torch.equal(torch_pos, kernel_pos)
    assert torch.equal(torch_k[held], kernel_k[held]) and torch.equal(torch_v[held], kernel_v[held])


def _model(s2_layers, seed=0, **overrides):
    torch.manual_seed(seed)
    model = S2LlamaForCausalLM(config(s2_layers, **overrides)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4)  # peaked logits: greedy ties are rare
    return model


def _greedy_without_cache(model, prompt, steps):
    sequence = prompt[None]
    for _ in range(steps):
        with torch.no_grad():
            next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    return sequence[0, len(prompt):]


def _prompts(lengths, vocab=120):
    g = torch.Generator().manual_seed(sum(lengths))
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def _batch(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - len(p) for p in prompts]).long()
    return ids, mask


MODELS = {
    "hybrid_heterogeneous_kv_group": ([LAYERS["heterogeneous"], None, LAYERS["kv_group"]], {}),
    "all_s2_dense_heads_mha": ([s2_layer(4, 4, num_dense_heads=1), s2_layer(4, 4, vert_stride=2)],
                               {"num_attention_heads": 4, "num_key_value_heads": 4}),
    "gqa_4_1_kv_group": ([s2_layer(4, 1, head_pattern="kv_group", local_blocks=1)],
                         {"num_attention_heads": 4, "num_key_value_heads": 1}),
}


# Left-padded batches, and one without padding (SDPA's unmasked path in the dense layer).
@pytest.mark.parametrize("name, lengths", [(name, (70, 41)) for name in sorted(MODELS)]
                         + [("hybrid_heterogeneous_kv_group", (57, 57))])
def test_greedy_generation_with_the_compacted_cache_equals_no_cache(name, lengths):
    layers, overrides = MODELS[name]
    heads = overrides.get("num_attention_heads", HEADS)
    model = _model(layers, heads=heads, kv_heads=overrides.get("num_key_value_heads", KV_HEADS))
    steps = 30
    prompts = _prompts(list(lengths))
    expected = [_greedy_without_cache(model, p, steps) for p in prompts]
    ids, mask = _batch(prompts)
    cache = model.make_s2_kv_cache()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=steps,
                             do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    for row, want in enumerate(expected):
        assert torch.equal(out[row], want), row
    stats = cache.kv_cache_stats()
    assert stats["kept_entries"] < stats["full_entries"], stats


def test_chunked_prefill_against_the_cache_equals_one_forward():
    """A left-padded prompt fed in pieces (some of a single token) gives the logits of one no-cache
    forward, and greedy decoding goes on from it unchanged."""
    model = _model(MODELS["hybrid_heterogeneous_kv_group"][0])
    prompts = _prompts([95, 60])
    ids, mask = _batch(prompts)
    with torch.no_grad():
        whole = model(ids, attention_mask=mask, use_cache=False).logits
        cache = model.make_s2_kv_cache()
        pieces, start = [], 0
        for size in (10, 1, 29, 1, 33, 21):  # the first single token is padding in row 1
            pieces.append(model(ids[:, start:start + size], attention_mask=mask[:, :start + size],
                                past_key_values=cache).logits)
            start += size
        assert (torch.cat(pieces, dim=1) - whole)[mask.bool()].abs().max() < 1e-4
        steps = 12
        token = pieces[-1][:, -1].argmax(-1, keepdim=True)
        generated = [token]
        for _ in range(steps - 1):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            token = model(token, attention_mask=mask, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
            generated.append(token)
    generated = torch.cat(generated, dim=1)
    for row, prompt in enumerate(prompts):
        assert torch.equal(generated[row], _greedy_without_cache(model, prompt, steps)), row


def test_beam_search_with_the_compacted_cache_equals_the_default_cache():
    model = _model(MODELS["hybrid_heterogeneous_kv_group"][0])
    ids, mask = _batch(_prompts([66, 50]))
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=3, pad_token_id=0)
    with torch.no_grad():
        default = model.generate(ids, **kw)
        compact = model.generate(ids, past_key_values=model.make_s2_kv_cache(), **kw)
    assert torch.equal(default, compact)


@needs_triton_interpreter
def test_model_decodes_through_the_kernel_like_the_reference(monkeypatch):
    """The model's decode steps through the Triton kernel (interpreted) give the no-cache tokens."""
    model = _model(MODELS["hybrid_heterogeneous_kv_group"][0])
    prompts = _prompts([70, 41])
    expected = [_greedy_without_cache(model, p, 5) for p in prompts]
    monkeypatch.setattr(sys.modules[S2KVCache.__module__], "s2_decode_kernel_runs_on", lambda q: True)
    ids, mask = _batch(prompts)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, past_key_values=model.make_s2_kv_cache(), max_new_tokens=5,
                             do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    for row, want in enumerate(expected):
        assert torch.equal(out[row], want), row


def test_full_capacity_cache_is_refused_with_the_fix():
    model = _model([LAYERS["kv_group"], None])  # the dense layer needs a slot per token
    with torch.no_grad(), pytest.raises(ValueError, match="capacity"):
        model.generate(_prompts([40])[0][None], past_key_values=model.make_s2_kv_cache(capacity=45),
                       max_new_tokens=10, do_sample=False)
