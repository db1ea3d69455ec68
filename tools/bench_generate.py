#!/usr/bin/env python3
"""Generation speed and memory of an S2 model (compacted KV cache, Triton decode kernel) against the
same weights decoding densely (SDPA), on one GPU.

    python tools/bench_generate.py --out runs/bench_generate          # 1B-class GQA 32/8, random weights
    python tools/bench_generate.py --hf hf/run --out runs/bench_hf    # an exported model: as trained vs dense
    python tools/bench_generate.py --contexts 32768 --batches 1 --variants kv_group dense

Without ``--hf`` the models are built from a config with random weights (no Megatron, no training
run): 16 layers, hidden 2048, 32 query / 8 KV heads of dim 64, MLP 8192, vocabulary 32000, bf16; S2
block 64, window 16 blocks, stride 16. Variants share the weights: ``kv_group`` and
``heterogeneous`` (all layers S2), ``*_hybrid`` (every 4th layer dense, from layer 0), ``dense``, and
``dense_splitkv``: every head dense, but cached and decoded like S2 layers (whole cache, the Triton
split-KV decode kernel), a memory-bound dense baseline for the attention step.
Neither the weights nor the cached values change the speed, so the cache is filled with random
keys and values instead of a long prefill.

For each variant, context N and batch b:
- ``ttft``: a prefill of N tokens into an empty cache, the cache's placement included (S2 Triton
  kernel, or SDPA causal for dense layers), only where b * N <= --ttft-max-tokens. Reported warm: the
  second prefill of that shape, what a server sees; the first (``ttft_cold_ms`` in the JSON, in
  brackets in the table) also pays one-time costs of a new length: the S2 layout and tile lists,
  Triton compilation of new specializations (a warm-up at 4096 tokens compiles the kernels first);
- ``decode``: one whole-model decode step at position N (static shapes, replayed as a CUDA graph, so
  Python overhead is out of both sides): ms per token;
- ``attn``: the decode attention of one layer alone (graph replay): the compacted-cache kernel, or
  SDPA over the full cache. SDPA does not split one query over the context, so at batch 1 it is far
  from memory-bound (H200: 1101 us at 128k for batch 1, 1106 us for batch 8): batch 8 is the fair
  comparison, batch 1 overstates the saving (docs/inference.md, "How to read the numbers");
- ``ideal``: N / (L + G (N - L) / V) in blocks, the K/V read saving of the attention step;
- ``kv GB``: cache buffers allocated; ``peak GB``: peak allocated while decoding (weights included;
  the JSON also has the prefill's peak).
Writes ``bench_generate.json`` under --out and prints a table last.
"""

import argparse
import datetime
import json
import os
import sys
import time

import torch


from megatron_s2 import S2Pattern
from megatron_s2.hf.configuration_s2_llama import S2LlamaConfig, s2_layer_entry
from megatron_s2.hf.modeling_s2_llama import S2LlamaForCausalLM
from megatron_s2.hf.token_masks import dense_attention

DEVICE = "cuda"
VARIANTS = ("kv_group", "dense", "heterogeneous", "kv_group_hybrid", "heterogeneous_hybrid", "dense_splitkv")
MODEL_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072 + 4096,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False)
PATTERN = dict(block_size=64, local_blocks=16, vert_stride=16)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", default=None, help="exported model folder (variants: its own pattern and dense)")
    parser.add_argument("--variants", nargs="+", default=None, help=f"of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768, 131072])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--ttft-max-tokens", type=int, default=262144, help="prefill only where batch*N <= this")
    parser.add_argument("--iters", type=int, default=20, help="graph replays per decode timing")
    parser.add_argument("--layers", type=int, default=None, help="override the built model's layer count")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: measure nothing new after this, and print the table of what ran")
    parser.add_argument("--out", default="runs/bench_generate")
    args = parser.parse_args(argv)
    known = ("exported", "dense") if args.hf else VARIANTS
    args.variants = args.variants or list(known)
    unknown = [v for v in args.variants if v not in known]
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {', '.join(known)}")
    if not torch.cuda.is_available():
        parser.error("bench_generate.py measures GPU decoding: it needs a CUDA GPU")
    return args


def s2_layers(variant, num_layers, heads, kv_heads):
    if variant == "dense":
        return [None] * num_layers
    if variant == "dense_splitkv":
        return [s2_layer_entry(S2Pattern(**PATTERN, num_dense_heads=heads), heads, kv_heads)] * num_layers
    entry = s2_layer_entry(S2Pattern(**PATTERN, head_pattern=variant.removesuffix("_hybrid")), heads, kv_heads)
    return [None if variant.endswith("_hybrid") and i % 4 == 0 else entry for i in range(num_layers)]


class Models:
    """Each variant's model on the GPU in bf16, all with the weights of the first one built."""

    def __init__(self, args):
        self.args = args
        self.weights = None
        if args.hf:
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(args.hf, trust_remote_code=True, dtype=torch.bfloat16)
            self.model_class, self.config = type(base), base.config
            self.weights = {k: v.to(DEVICE) for k, v in base.state_dict().items()}
            del base
        else:
            self.model_class = S2LlamaForCausalLM
            self.config = S2LlamaConfig(**{**MODEL_1B, **({"num_hidden_layers": args.layers} if args.layers else {})})

    def build(self, variant):
        config = self.config.to_dict()
        if variant != "exported":
            config["s2_layers"] = s2_layers(variant, self.config.num_hidden_layers,
                                            self.config.num_attention_heads, self.config.num_key_value_heads)
        skip = ("model_type", "transformers_version")
        config = type(self.config)(**{k: v for k, v in config.items() if k not in skip})
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(DEVICE):
                model = self.model_class(config)
        finally:
            torch.set_default_dtype(default)
        if self.weights is None:
            self.weights = model.state_dict()
        else:
            model.load_state_dict(self.weights)
        return model.eval()


def fill_cache(model, cache, batch, context):
    """The cache after a prefill of ``context`` tokens, with random keys and values (speed does not
    depend on them)."""
    config = model.config
    positions = torch.arange(context, device=DEVICE).expand(batch, -1)
    for layer, entry in enumerate(config.s2_layers):
        keys, values = (torch.randn(batch, config.num_key_value_heads, context, config.head_dim,
                                    device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
        if entry is None:
            cache.dense_update(layer, keys, values)
        else:
            cache.s2_store(layer, keys, values, positions)
        del keys, values


def replay_ms(step, reset, iters):
    """(milliseconds per call of ``step`` replayed as a CUDA graph, "graph"); ``reset`` restores the
    host-side state a call advances (the cache's lengths), so every replay is the same step. If the
    capture fails, eager timing and "eager" (printed, so a number still comes back)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compiles the kernels outside the capture
            reset()
            step()
    torch.cuda.current_stream().wait_stream(stream)
    reset()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
        run, mode = graph.replay, "graph"
    except RuntimeError as error:
        print(f"CUDA graph capture failed, timing eagerly: {error}", file=sys.stderr)
        run, mode = step, "eager"
    reset()
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        run()
        if mode == "eager":
            reset()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, mode


def ideal_ratio(entry, context, kv_heads):
    """N / (L + G (N - L) / V) in blocks (G: stripe residues a KV head keeps): how many times fewer K/V
    bytes the decode attention of an S2 layer reads than a dense layer's."""
    if entry is None:
        return 1.0
    blocks, local, stride = context / entry["block_size"], entry["local_blocks"], entry["vert_stride"]
    group = len(entry["head_offsets"]) // kv_heads
    kept = 0
    for h in range(kv_heads):
        offsets = entry["head_offsets"][h * group:(h + 1) * group]
        if None in offsets:
            kept = max(kept, stride or 1)  # a dense head: every block
        elif stride:
            kept = max(kept, len({(-o) % stride for o in offsets}))
    return blocks / (min(local, blocks) + kept * max(blocks - local, 0) / (stride or 1))


def prefill_ms(model, batch, context):
    """Time to the first token, ``(warm, cold)`` in ms: two prefills of the same shape, each into an
    empty cache, after a warm-up at 4096 tokens that compiles the kernels. The first (cold) also builds
    what a new length needs once (S2 layout and tile lists, kernel specializations); the second is
    what a server sees for a length it has served before."""
    vocab = model.config.vocab_size
    model(torch.randint(0, vocab, (batch, 4096), device=DEVICE), past_key_values=model.make_s2_kv_cache(),
          logits_to_keep=1)
    prompt = torch.randint(0, vocab, (batch, context), device=DEVICE)
    times = []
    for _ in range(2):
        cache = model.make_s2_kv_cache(capacity=context + 1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(prompt, past_key_values=cache, logits_to_keep=1)
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
        del cache
    cold, warm = times
    return warm, cold


def measure(model, variant, context, batch, args):
    config = model.config
    row = {"variant": variant, "context": context, "batch": batch}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        if batch * context <= args.ttft_max_tokens:
            try:
                row["ttft_ms"], row["ttft_cold_ms"] = prefill_ms(model, batch, context)
            except torch.cuda.OutOfMemoryError:
                row["ttft_error"] = "out of memory"
            row["prefill_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

        cache = model.make_s2_kv_cache(capacity=context + 1)
        fill_cache(model, cache, batch, context)
        row["kv_gb"] = sum(t.numel() * t.element_size() for pair in cache.buffers.values() for t in pair) / 1e9
        seen, last = dict(cache.seen_tokens), dict(cache.last_position)

        def reset():
            cache.seen_tokens.update(seen)
            cache.last_position.update(last)

        token = torch.randint(0, config.vocab_size, (batch, 1), device=DEVICE)
        row["decode_ms"], row["decode_mode"] = replay_ms(
            lambda: model(token, past_key_values=cache, logits_to_keep=1), reset, args.iters)

        layer = max(range(config.num_hidden_layers), key=lambda i: config.s2_layers[i] is not None)
        entry = config.s2_layers[layer]
        q = torch.randn(batch, config.num_attention_heads, 1, config.head_dim, device=DEVICE, dtype=torch.bfloat16)
        scale = config.head_dim ** -0.5
        if entry is None:
            keys, values = (t[:, :, :context] for t in cache.buffers[layer])
            attend = lambda: dense_attention(q, keys, values, None, None, scale, unpadded=True)  # noqa: E731
        else:
            attend = lambda: cache.s2_decode(layer, q, scale)  # noqa: E731
        attn_ms, row["attn_mode"] = replay_ms(attend, reset, args.iters * 5)
        row["attn_us"] = 1e3 * attn_ms
        row["ideal"] = ideal_ratio(entry, context, config.num_key_value_heads)
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        del cache
    return row


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    models = Models(args)
    rows = []
    started = time.perf_counter()
    for variant in args.variants:
        model = None
        for context in args.contexts:
            for batch in args.batches:
                if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
                    print(f"time budget of {args.time_budget:.0f} s spent: {variant} N={context} b={batch} "
                          f"not measured", flush=True)
                    continue
                model = model or models.build(variant)
                try:
                    row = measure(model, variant, context, batch, args)
                except torch.cuda.OutOfMemoryError:
                    row = {"variant": variant, "context": context, "batch": batch, "error": "out of memory"}
                    torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                rows.append(row)
        del model
        torch.cuda.empty_cache()

    dense = {(r["context"], r["batch"]): r for r in rows if r["variant"] == "dense"}
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": sys.argv, "rows": rows}
    with open(os.path.join(args.out, "bench_generate.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"\n{record['device']}, torch {torch.__version__}, {record['date']}; speed-ups are over 'dense' "
          f"(same weights, SDPA), TTFT warm (cold: first prefill of that length), decode = one CUDA-graph step "
          f"at position N")
    print("| variant | N | b | TTFT ms (cold) | decode ms/tok | x dense | attn us | x dense | ideal | KV GB | x dense "
          "| peak GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {r['context'] // 1024}k | {r['batch']} | {r['error']} |")
            continue
        d = dense.get((r["context"], r["batch"]), {})
        ratio = lambda key: f"{d[key] / r[key]:.2f}" if key in d and key in r else "-"  # noqa: E731
        ttft = f"{r['ttft_ms']:.0f} ({r['ttft_cold_ms']:.0f})" if "ttft_ms" in r else r.get("ttft_error", "-")
        eager = " (eager)" if r["decode_mode"] == "eager" else ""
        print(f"| {r['variant']}{eager} | {r['context'] // 1024}k | {r['batch']} | {ttft} | {r['decode_ms']:.2f} | "
              f"{ratio('decode_ms')} | {r['attn_us']:.1f} | {ratio('attn_us')} | {r['ideal']:.1f} | "
              f"{r['kv_gb']:.2f} | {ratio('kv_gb')} | {r['peak_gb']:.1f} |")


if __name__ == "__main__":
    main()
