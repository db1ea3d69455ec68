"""The S2 decode kernel and the compacted KV cache on one GPU (no Megatron needed).

    python -m pytest -q -s tests/gpu/test_hf_decode_gpu.py      # skipped without CUDA; prints a table

- the Triton decode kernel in bf16/fp16 against float64 attention over the full, uncompacted keys
  (GQA 32/8, block 64, window 16 blocks, stride 16, left-padded batch, ~12k tokens): its error must be
  of the size of dense masked SDPA's own error in the same dtype;
- greedy generation of a model decoding through the kernel equals decoding without a cache (fp32);
- a decode step captured as a CUDA graph gives the eager step's logits (what bench_generate.py times);
- host syncs (torch.cuda.set_sync_debug_mode): a warm prefill of a left-padded batch makes as many
  with 1 as with 4 S2 layers (the padding is read once per forward, not per layer), a decoding step
  with its attention_mask none.
"""

import warnings

import pytest
import torch


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from megatron_s2 import S2Pattern
from megatron_s2.hf.configuration_s2_llama import S2LlamaConfig, s2_layer_entry
from megatron_s2.hf.modeling_s2_llama import S2LlamaForCausalLM
from megatron_s2.hf.s2_decode_kernel import s2_decode_attention
from megatron_s2.hf.s2_kv_cache import S2KVCache
from megatron_s2.hf.token_masks import masked_attention, s2_token_mask

HEADS, KV_HEADS = 32, 8
PATTERNS = {
    "kv_group": S2Pattern(block_size=64, local_blocks=16, vert_stride=16, head_pattern="kv_group"),
    "heterogeneous": S2Pattern(block_size=64, local_blocks=16, vert_stride=16),
    "dense_heads": S2Pattern(block_size=64, local_blocks=8, vert_stride=8, num_dense_heads=4),
}
RESULTS = []


def config(s2_layers, heads=HEADS, kv_heads=KV_HEADS, dim=64, **overrides):
    kwargs = dict(vocab_size=1000, hidden_size=heads * dim, intermediate_size=1024,
                  num_hidden_layers=len(s2_layers), num_attention_heads=heads, num_key_value_heads=kv_heads,
                  head_dim=dim, max_position_embeddings=16384, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kwargs.update(overrides)
    return S2LlamaConfig(**kwargs, s2_layers=s2_layers)


@pytest.mark.parametrize("name, dim, dtype", [
    ("kv_group", 64, torch.bfloat16), ("kv_group", 64, torch.float16), ("kv_group", 128, torch.bfloat16),
    ("heterogeneous", 64, torch.bfloat16), ("dense_heads", 128, torch.float16),
])
def test_decode_kernel_against_float64_full_attention(name, dim, dtype):
    layer = s2_layer_entry(PATTERNS[name], HEADS, KV_HEADS)
    cache = S2KVCache(config([layer], dim=dim))
    lengths, steps = (12000, 7000), 3
    width = max(lengths)
    cols = torch.arange(width, device="cuda")
    positions = torch.stack([torch.where(cols >= width - n, cols - (width - n), -1) for n in lengths])
    g = torch.Generator(device="cuda").manual_seed(dim)
    keys, values = (torch.randn(2, KV_HEADS, width, dim, device="cuda", generator=g).to(dtype) for _ in range(2))
    prompt = width - steps
    cache.s2_store(0, keys[:, :, :prompt], values[:, :, :prompt], positions[:, :prompt])
    for t in range(prompt, width):
        cache.s2_store(0, keys[:, :, t:t + 1], values[:, :, t:t + 1], positions[:, t:t + 1])
    q = torch.randn(2, HEADS, dim, device="cuda", generator=g).to(dtype)
    stored_k, stored_v = cache.buffers[0]
    out = s2_decode_attention(q, stored_k, stored_v, cache.last_position[0], cache.geometry[0], dim**-0.5)

    allowed = s2_token_mask(layer, positions[:, -1:], positions)
    reference = masked_attention(q.double()[:, :, None], keys.double(), values.double(), allowed, dim**-0.5)[:, :, 0]
    same_dtype = masked_attention(q[:, :, None], keys, values, allowed, dim**-0.5)[:, :, 0]
    err = (out.double() - reference).abs().max().item()
    err_sdpa = (same_dtype.double() - reference).abs().max().item()
    scale = reference.abs().max().item()
    RESULTS.append(f"| {name} | {dim} | {str(dtype)[6:]} | {err:.2e} | {err_sdpa:.2e} | {scale:.3f} |")
    assert err <= 2 * err_sdpa + 1e-3 * scale


def _model(s2_layers, dtype, **kw):
    torch.manual_seed(0)
    model = S2LlamaForCausalLM(config(s2_layers, **kw)).to("cuda", dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # peaked logits: greedy ties are rare
    return model


def test_greedy_generation_through_the_kernel_equals_no_cache():
    layers = [s2_layer_entry(PATTERNS[name], 16, 4) if name else None for name in ("kv_group", None, "heterogeneous")]
    model = _model(layers, torch.float32, heads=16, kv_heads=4)
    prompts = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)).cuda() for n in (2500, 1700)]
    steps = 24
    with torch.no_grad():
        expected = []
        for prompt in prompts:
            sequence = prompt[None]
            for _ in range(steps):
                token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                sequence = torch.cat([sequence, token], dim=1)
            expected.append(sequence[0, len(prompt):])
        width = max(len(p) for p in prompts)
        pad = [torch.zeros(width - len(p), dtype=torch.long, device="cuda") for p in prompts]
        ids = torch.stack([torch.cat([zeros, p]) for zeros, p in zip(pad, prompts)])
        mask = torch.stack([torch.arange(width, device="cuda") >= width - len(p) for p in prompts])
        cache = model.make_s2_kv_cache()
        out = model.generate(ids, attention_mask=mask.long(), past_key_values=cache, max_new_tokens=steps,
                             do_sample=False, pad_token_id=0)[:, width:]
    match = [(out[i] == expected[i]).float().mean().item() for i in range(2)]
    stats = cache.kv_cache_stats()
    RESULTS.append(f"generation through the kernel (fp32): tokens equal to no-cache {match}, "
                   f"KV kept {stats['kept_entries'] / stats['full_entries']:.1%} of full")
    assert min(match) >= 0.9 and all(out[i, 0] == expected[i][0] for i in range(2))


def test_cuda_graph_decode_step_equals_eager():
    layers = [s2_layer_entry(PATTERNS["kv_group"], HEADS, KV_HEADS), None]
    model = _model(layers, torch.bfloat16)
    context = 5000
    prompt = torch.randint(0, 1000, (2, context), generator=torch.Generator().manual_seed(1)).cuda()
    token = torch.full((2, 1), 7, device="cuda")
    with torch.no_grad():
        eager_cache, graph_cache = (model.make_s2_kv_cache(capacity=context + 2) for _ in range(2))
        for cache in (eager_cache, graph_cache):
            model(prompt, past_key_values=cache)
        eager = model(token, past_key_values=eager_cache).logits
        stream = torch.cuda.Stream()  # warm-up on a side stream, on the cache already used
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(token, past_key_values=eager_cache)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(token, past_key_values=graph_cache).logits
        graph.replay()
        torch.cuda.synchronize()
    diff = (eager - captured).abs().max().item()
    RESULTS.append(f"CUDA-graph decode step vs eager: max logit diff {diff:.2e}")
    assert diff <= 1e-2 * eager.abs().max().item()


def _host_syncs(call):
    """How many synchronizing CUDA operations (device-to-host reads, blocking copies) ``call`` makes."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_prefill_reads_the_padding_once_and_a_decoding_step_not_at_all():
    lengths = (3000, 2000)
    width = max(lengths)
    ids = torch.randint(0, 1000, (2, width), generator=torch.Generator().manual_seed(2)).cuda()
    prompt_mask = torch.stack([torch.arange(width, device="cuda") >= width - n for n in lengths]).long()
    step_mask = torch.cat([prompt_mask, torch.ones(2, 1, dtype=torch.long, device="cuda")], dim=1)
    token = torch.full((2, 1), 7, device="cuda")
    syncs = {}
    for s2_layers in (1, 4):
        model = _model([s2_layer_entry(PATTERNS["kv_group"], 16, 4)] * s2_layers + [None], torch.bfloat16,
                       heads=16, kv_heads=4)
        with torch.no_grad():
            for _ in range(2):  # the second time warm: kernels compiled, layouts and cache geometry built
                cache = model.make_s2_kv_cache()
                prefill = _host_syncs(lambda: model(ids, attention_mask=prompt_mask, past_key_values=cache))
                step = _host_syncs(lambda: model(token, attention_mask=step_mask, past_key_values=cache))
        syncs[s2_layers] = (prefill, step)
    RESULTS.append(f"host syncs (prefill, decoding step) with 1 / 4 S2 layers: {syncs[1]} / {syncs[4]}")
    assert syncs[1][0] == syncs[4][0] and syncs[1][1] == syncs[4][1] == 0, syncs


def teardown_module(module):
    """The results table, after the module's tests (run with -s to see it)."""
    print("\n| pattern | head dim | dtype | kernel err vs fp64 | masked SDPA err | max abs |")
    print("|---|---|---|---|---|---|")
    for line in RESULTS:
        print(line)
