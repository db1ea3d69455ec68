"""Hugging Face export/import: exact logits against Megatron, generation, round trips, errors.

A tiny Llama-shaped GPTModel (GQA 4/2, untied, two S2 layers and one dense, block 16 so that S2
skips blocks at 96 tokens) is saved with dist_checkpointing at TP=2 and exported; the HF model must
give Megatron's logits. HF -> Megatron -> HF must give back the same tensors (tied embeddings, a
vocabulary that Megatron pads).
"""

import os
import sys
import zlib

import pytest
import torch

from megatron_s2 import S2Pattern, s2_block_mask
from megatron_s2.core.config import S2AttentionConfig
from megatron_s2.hf import checkpoints, convert, megatron_model, weight_mapping
from megatron_s2.hf.configuration_s2_llama import S2LlamaConfig
from megatron_s2.hf.modeling_s2_llama import S2LlamaForCausalLM, masked_attention, s2_token_mask
from megatron_s2.training.arguments import megatron_parser
from tests.helpers import RankError, launch, run_distributed, training_workdir

import tools.convert_from_hf as convert_from_hf
import tools.convert_to_hf as convert_to_hf

pytestmark = pytest.mark.distributed

SEQ = 96


S2_LAYERS = {"layers": "SDS", "defaults": {"block_size": 16, "local_blocks": 2, "vert_stride": 4}}


def _call(rank, world_size, fn, *args):
    return fn(*args)


def in_child(fn, *args):
    """Run work that starts torch.distributed (the converters, Megatron models) in a forked process:
    the test process itself never starts it, so that later forks (pretrain_gpt_s2.py runs) inherit
    no gloo threads."""
    return run_distributed(1, _call, fn, *args)[0]


def llama_kwargs(**overrides):
    kwargs = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kwargs.update(overrides)
    return kwargs


def s2_config(num_layers=3):
    return S2AttentionConfig.from_dict(S2_LAYERS, num_layers=num_layers)


def tokens(batch=2, length=SEQ, vocab=100, seed=7):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_pure_path_mask_equals_layout_mask():
    """The HF file's own formula against megatron_s2.s2_block_mask, every head pattern and dense heads."""
    heads, kv_heads, length = 8, 2, 200
    patterns = [
        S2Pattern(block_size=16, local_blocks=2, vert_stride=4),
        S2Pattern(block_size=16, local_blocks=1, vert_stride=8, head_pattern="kv_group", head_sliding_step=3),
        S2Pattern(block_size=32, local_blocks=3, vert_stride=2, head_pattern="homogeneous", num_dense_heads=2),
        S2Pattern.phi3_small(block_size=16, local_blocks=2),
        S2Pattern.window(block_size=16, local_blocks=3),
        S2Pattern.window(block_size=32, local_blocks=1, head_pattern="kv_group", num_dense_heads=2),
    ]
    positions = torch.arange(length)[None]
    for pattern in patterns:
        layer = convert.s2_layers_for_hf(
            S2AttentionConfig.from_dict({"layers": [{"type": "s2", **pattern.__dict__}],
                                         "allow_partial_coverage": True}), heads, kv_heads)[0]
        blocks = s2_block_mask(pattern, heads, kv_heads, length)
        expected = blocks.repeat_interleave(pattern.block_size, 1).repeat_interleave(pattern.block_size, 2)
        expected = expected[:, :length, :length] & torch.ones(length, length, dtype=torch.bool).tril()
        assert torch.equal(s2_token_mask(layer, positions, positions)[0], expected), pattern


def test_kernel_path_packing_equals_pure_path():
    """The GPU prefill path (per-sequence kernel calls that skip left padding) against the pure path.
    On CPU ``s2_attention`` runs its reference, so this checks the packing, not the kernel."""
    config = S2LlamaConfig(**llama_kwargs(), s2_layers=convert.s2_layers_for_hf(s2_config(), 4, 2))
    attention = S2LlamaForCausalLM(config).model.layers[0].self_attn
    assert attention.kernel_pattern is not None
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, SEQ, 16, generator=g, dtype=torch.float32)
    k, v = (torch.randn(2, 2, SEQ, 16, generator=g, dtype=torch.float32) for _ in range(2))
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, :21] = 0  # left padding
    positions = torch.where(mask.bool(), mask.cumsum(1) - 1, -1)
    pure = masked_attention(q, k, v, s2_token_mask(attention.s2_layer, positions, positions), attention.scaling)
    packed = attention._kernel_attention(q, k, v, left_padding=[0, 21])
    assert (packed[0] - pure[0]).abs().max() < 1e-5
    assert (packed[1, :, 21:] - pure[1, :, 21:]).abs().max() < 1e-5
    unpadded = attention._kernel_attention(q[:1], k[:1], v[:1], left_padding=None)  # one call, no copies
    assert (unpadded[0] - pure[0]).abs().max() < 1e-5


def _megatron_logits_tp2(rank, world_size, load_dir, input_ids):
    """Logits of a checkpoint loaded by Megatron itself at TP=2 (not through the converter's TP=1 path)."""
    from megatron.core import dist_checkpointing, tensor_parallel

    args = dist_checkpointing.load_common_state_dict(checkpoints.resolve_checkpoint_dir(load_dir))["args"]
    model = megatron_model.build_gpt_model(args, megatron_model.s2_config_from_args(args), tensor_parallel=2)
    metadata = megatron_model.sharded_metadata()
    model.load_state_dict(dist_checkpointing.load(
        {"model": model.sharded_state_dict(metadata=metadata)}, checkpoints.resolve_checkpoint_dir(load_dir))["model"])
    with torch.no_grad(), megatron_model.cpu_without_cuda():
        positions = torch.arange(input_ids.shape[1])[None].expand_as(input_ids)
        return tensor_parallel.gather_from_tensor_model_parallel_region(model(input_ids, positions, None))


GQA_FLAGS = ["--group-query-attention", "--num-query-groups", "2"]


@pytest.fixture(scope="module")
def pretrain_dir(tmp_path_factory):
    """The training helper's tiny hybrid model (layers D S S S) and a small corpus."""
    return training_workdir(tmp_path_factory.mktemp("pretrain_hf"), documents=4)


def train(root, name, tp, pp, extra=()):
    save = str(root / name)
    run = launch(root, name, ["--train-iters", "2", "--save", save, "--save-interval", "2",
                              "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
                              *GQA_FLAGS, *extra], world_size=2).check_ok()
    return save, run


@pytest.mark.slow  # trains with pretrain_gpt_s2.py
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_pretrain_gpt_s2_checkpoint_exports_with_equal_logits(pretrain_dir, tmp_path, tp, pp):
    """pretrain_gpt_s2.py trains a GQA hybrid model at TP=2 (or PP=2) and saves; the export gives the
    logits of Megatron's own TP=2 load of that checkpoint."""
    save, _ = train(pretrain_dir, f"tp{tp}pp{pp}", tp, pp)
    in_child(convert_to_hf.main, ["--load", save, "--out", str(tmp_path / "hf")])
    model = load_exported(tmp_path / "hf")
    assert model.config.num_key_value_heads == 2 and model.config.vocab_size == 257
    assert [e is None for e in model.config.s2_layers] == [True, False, False, False]
    input_ids = tokens(length=128, vocab=257)
    megatron_logits = run_distributed(2, _megatron_logits_tp2, save, input_ids, tp=2)[0]
    with torch.no_grad():
        hf_logits = model(input_ids).logits
    assert (hf_logits - megatron_logits[..., :257]).abs().max() < 1e-4


@pytest.mark.slow  # trains with pretrain_gpt_s2.py
def test_window_model_trains_exports_and_generates(pretrain_dir, tmp_path):
    """The quality experiment's control: pretrain_gpt_s2.py with window-only layers (W), export, and the
    HF model gives Megatron's logits and generates alike with the default and the S2 KV cache (which
    keeps only the window)."""
    save, run = train(pretrain_dir, "window", 2, 1, ["--s2-override", "layers=WWSD"])
    assert "layers 0-1: window-only: each query reads only the last 32 tokens" in run.logs[0]
    in_child(convert_to_hf.main, ["--load", save, "--out", str(tmp_path / "hf")])
    model = load_exported(tmp_path / "hf")
    assert [e and e["vert_stride"] for e in model.config.s2_layers] == [0, 0, 4, None]
    input_ids = tokens(length=128, vocab=257)
    megatron_logits = run_distributed(2, _megatron_logits_tp2, save, input_ids, tp=2)[0]
    with torch.no_grad():
        assert (model(input_ids).logits - megatron_logits[..., :257]).abs().max() < 1e-4
        prompt = input_ids[:1, :70]
        expected = _greedy_without_cache(model, prompt, 12)
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        cache = model.make_s2_kv_cache()
        assert torch.equal(model.generate(prompt, **kw), expected)
        assert torch.equal(model.generate(prompt, cache=cache, **kw), expected)
    stats = cache.kv_cache_stats()
    assert stats["kept_entries"] < stats["full_entries"], stats


@pytest.mark.slow  # trains with pretrain_gpt_s2.py
def test_imported_checkpoint_trains_in_pretrain_gpt_s2_like_the_original(pretrain_dir, tmp_path):
    """Megatron (TP=2) -> HF -> Megatron (--tensor-parallel 2): pretrain_gpt_s2.py --finetune from the
    converted checkpoint gives the same losses as from the original one."""
    original = str(pretrain_dir / "tp2pp1")
    if not os.path.exists(original):
        original, _ = train(pretrain_dir, "tp2pp1", 2, 1)
    # Keep Megatron's padded vocabulary rows: its loss normalizes over them too.
    in_child(convert_to_hf.main, ["--load", original, "--out", str(tmp_path / "hf"), "--vocab-size", "512"])
    in_child(convert_from_hf.main, ["--hf", str(tmp_path / "hf"), "--save", str(tmp_path / "imported"),
                                    "--tensor-parallel", "2", "--make-vocab-size-divisible-by", "256"])
    losses = []
    for name, load in (("from_original", original), ("from_imported", str(tmp_path / "imported"))):
        _, run = train(pretrain_dir, name, 2, 1, ["--load", load, "--finetune"])
        losses.append(run.losses)
    assert sorted(losses[0]) == [1, 2] and losses[0] == losses[1]


def _fill(model, rank):
    """Fresh values: TP-sharded weights differ per rank, replicated ones (norms) are equal."""
    for name, param in model.named_parameters():
        sharded = getattr(param, "tensor_model_parallel", False)
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + (rank if sharded else 0))
        values = torch.randn(param.shape, generator=g)
        param.data.copy_(1 + 0.2 * values if name.endswith("weight") and param.dim() == 1 else 0.05 * values)


def _save_tp2(rank, world_size, save_dir, args, s2, input_ids):
    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel

    model = megatron_model.build_gpt_model(args, s2, tensor_parallel=2)
    _fill(model, rank)
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    directory = os.path.join(save_dir, "iter_0000005")
    os.makedirs(directory, exist_ok=True)
    with torch.no_grad(), megatron_model.cpu_without_cuda(), megatron_model.in_process_checkpoint_writes():
        positions = torch.arange(input_ids.shape[1])[None].expand_as(input_ids)
        logits = model(input_ids, positions, None)
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        dist_checkpointing.save(
            {"model": model.sharded_state_dict(metadata=metadata), "args": args, "iteration": 5,
             "checkpoint_version": 3.0},
            directory, content_metadata={k: v for k, v in metadata.items() if k != "dp_cp_group"})
    if rank == 0:
        with open(os.path.join(save_dir, checkpoints.TRACKER_FILE), "w") as f:
            f.write("5")
    return logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A TP=2 Megatron checkpoint, its Megatron logits, and its HF export."""
    root = tmp_path_factory.mktemp("hf")
    s2 = s2_config()
    args = convert.megatron_args_from_hf(S2LlamaConfig(**llama_kwargs()), tensor_parallel=2, s2_config=s2)
    args.vocab_size = None  # as with a tokenizer-defined vocabulary: keep the padded rows
    input_ids = tokens()
    logits = run_distributed(2, _save_tp2, str(root / "mg"), args, s2, input_ids, tp=2)[0]
    in_child(convert_to_hf.main, ["--load", str(root / "mg"), "--out", str(root / "hf")])
    return root, input_ids, logits


def load_exported(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def test_tp2_megatron_checkpoint_exports_with_equal_logits(exported):
    root, input_ids, megatron_logits = exported
    model = load_exported(root / "hf")
    assert type(model).__name__ == "S2LlamaForCausalLM"
    assert [e is None for e in model.config.s2_layers] == [False, True, False]
    # Query chunks of the pure path (1024 by default) shortened so that they are exercised too.
    chunk = sys.modules[type(model).__module__]
    default_chunk, chunk._QUERY_CHUNK = chunk._QUERY_CHUNK, 40
    try:
        with torch.no_grad():
            hf_logits = model(input_ids).logits
    finally:
        chunk._QUERY_CHUNK = default_chunk
    assert hf_logits.shape == megatron_logits.shape
    assert (hf_logits - megatron_logits).abs().max() < 1e-4
    # Training through the export: the loss is the mean cross-entropy of the next tokens.
    loss = model(input_ids, labels=input_ids).loss
    expected = torch.nn.functional.cross_entropy(megatron_logits[:, :-1].reshape(-1, 256), input_ids[:, 1:].reshape(-1))
    assert abs(loss.item() - expected.item()) < 1e-4
    # The S2 pattern matters here: dense attention on the same weights gives other logits.
    dense = S2LlamaForCausalLM(S2LlamaConfig(**{**model.config.to_dict(), "s2_layers": None})).eval()
    dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (dense(input_ids).logits - megatron_logits).abs().max() > 1e-2


def _greedy_without_cache(model, prompt, steps):
    sequence = prompt
    for _ in range(steps):
        with torch.no_grad():
            next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    return sequence


def test_generation_cache_left_padding_and_s2_cache(exported):
    root = exported[0]
    model = load_exported(root / "hf")
    steps = 24
    prompts = [tokens(1, 60, seed=1)[0], tokens(1, 37, seed=2)[0]]
    expected = [_greedy_without_cache(model, p[None], steps)[0, len(p):] for p in prompts]
    # Batched, left-padded: positions (and S2 blocks) count from each prompt's first token.
    width = max(len(p) for p in prompts)
    input_ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - len(p) for p in prompts]).long()
    kw = dict(attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        generated = model.generate(input_ids, **kw)[:, width:]
        cache = model.make_s2_kv_cache()
        compact = model.generate(input_ids, past_key_values=cache, **kw)[:, width:]
    for row, want in enumerate(expected):
        assert torch.equal(generated[row], want), row
        assert torch.equal(compact[row], want), row
    stats = cache.kv_cache_stats()
    assert 0 < stats["kept_entries"] < stats["full_entries"], stats


@pytest.mark.parametrize("tied", [True, False])
def test_hf_to_megatron_to_hf_round_trip(tmp_path, tied):
    torch.manual_seed(3)
    config = S2LlamaConfig(**llama_kwargs(tie_word_embeddings=tied),
                           s2_layers=convert.s2_layers_for_hf(s2_config(), 4, 2))
    model = S2LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "src")
    in_child(convert_from_hf.main,
             ["--hf", str(tmp_path / "src"), "--save", str(tmp_path / "mg"), "--tensor-parallel", "2"])
    in_child(convert_to_hf.main, ["--load", str(tmp_path / "mg"), "--out", str(tmp_path / "back")])
    back = load_exported(tmp_path / "back")
    assert back.config.s2_layers == config.s2_layers
    assert back.config.tie_word_embeddings == tied
    original, returned = model.state_dict(), back.state_dict()
    assert original.keys() == returned.keys()
    for key in original:
        assert torch.equal(original[key], returned[key]), key
    # And the Megatron model in between computes the same logits (tied/untied output layer, GQA).
    input_ids = tokens(length=64)
    padded, megatron_logits = in_child(_megatron_logits_tp1, str(tmp_path / "mg"), input_ids)
    assert padded == 256
    with torch.no_grad():
        assert (model(input_ids).logits - megatron_logits[..., :100]).abs().max() < 1e-4


@pytest.mark.slow  # trains with pretrain_gpt_s2.py
def test_mup_model_exports_with_equal_logits(pretrain_dir, tmp_path):
    """A run with --use-mup (softmax scale 1/kv_channels, embedding and logit multipliers) exports to the
    HF model that gives Megatron's logits; a dense (stock Llama) export, which cannot express them, is
    refused with the fix named."""
    save, _ = train(pretrain_dir, "mup", 1, 1, ["--use-mup", "--mup-base-hidden-size", "32",
                                                "--mup-embedding-mult", "1.5"])
    in_child(convert_to_hf.main, ["--load", save, "--out", str(tmp_path / "hf")])
    model = load_exported(tmp_path / "hf")
    assert model.config.softmax_scale == 1 / 16 and model.config.logits_multiplier == 0.5
    input_ids = tokens(length=128, vocab=257)
    megatron_logits = in_child(_megatron_logits_tp1, save, input_ids)[1]
    with torch.no_grad():
        assert (model(input_ids).logits - megatron_logits[..., :257]).abs().max() < 1e-4
    with pytest.raises(RankError, match="UnsupportedArchitectureError: .*--use-mup.*export without --dense"):
        in_child(convert_to_hf.main, ["--load", save, "--out", str(tmp_path / "dense"), "--dense"])
    with pytest.raises(convert.UnsupportedArchitectureError, match="softmax_scale.*MuP export"):
        convert.megatron_args_from_hf(model.config)


def _megatron_logits_tp1(load_dir, input_ids):
    margs, state, s2 = checkpoints.load_megatron_checkpoint(load_dir)
    with megatron_model.single_process_megatron():
        megatron = megatron_model.build_gpt_model(margs, s2)
        megatron.load_state_dict(state, strict=False)
        with torch.no_grad(), megatron_model.cpu_without_cuda():
            logits = megatron(input_ids, torch.arange(input_ids.shape[1])[None].expand_as(input_ids), None)
    return state["embedding.word_embeddings.weight"].shape[0], logits


# A tiny Llama as pretrain_gpt_s2.py's flags give it, with flags that change the function and that the
# converter has no code for (--glu-linear-offset), that it handled itself before (--norm-epsilon,
# the rope scaling factor), and options a training run sets (initialization, fp32 residuals).
FUNCTION_FLAGS = [
    "--num-layers", "3", "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--max-position-embeddings", "256", "--seq-length", "96",
    "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--position-embedding-type", "rope",
    "--untie-embeddings-and-output-weights", "--attention-dropout", "0", "--hidden-dropout", "0",
    "--norm-epsilon", "1e-3", "--use-rope-scaling", "--rope-scaling-factor", "32", "--rotary-base", "50000",
    "--glu-linear-offset", "0.5", "--no-bias-swiglu-fusion", "--no-rope-fusion",
    "--fp32-residual-connection", "--init-method-std", "0.01",
]


def run_args(*extra, params_dtype=torch.float32):
    """A run's arguments for FUNCTION_FLAGS (plus ``extra``), with what validation and the tokenizer set-up add."""
    args = megatron_parser().parse_args(FUNCTION_FLAGS + list(extra))
    args.params_dtype, args.padded_vocab_size = params_dtype, 128
    return args


# What the converter changes on purpose: CPU placement, no initialization, no fused kernels (TE or CUDA).
CONVERSION_FIELDS = {"use_cpu_initialization", "perform_initialization", "transformer_impl", "bias_activation_fusion",
                     "bias_dropout_fusion", "masked_softmax_fusion", "gradient_accumulation_fusion",
                     "apply_rope_fusion", "persist_layer_norm"}


def _converter_config_against_megatrons(rank, world_size, args):
    import dataclasses
    import functools

    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.training.argument_utils import gpt_config_from_args

    model = megatron_model.build_gpt_model(args, s2_config())
    megatron = gpt_config_from_args(args).transformer
    differences = {}
    for field in dataclasses.fields(megatron):
        ours, theirs = getattr(model.config, field.name), getattr(megatron, field.name)
        if isinstance(theirs, functools.partial):  # initialization functions, rebuilt per config
            continue
        if field.name not in CONVERSION_FIELDS and ours != theirs:
            differences[field.name] = (ours, theirs)
    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=50000, rope_scaling=True,
                           rope_scaling_factor=32.0, use_cpu_initialization=True)
    return differences, torch.equal(model.rotary_pos_emb.inv_freq, rope.inv_freq)


def test_converter_builds_megatrons_model_of_the_run_arguments():
    """The converter's Megatron model is the one Megatron's own gpt_config_from_args describes for a run's
    arguments (training's path): every TransformerConfig field equal but the conversion settings, so
    a flag that changes the function reaches it without converter code; RoPE gets the run's scaling
    factor, which megatron-core 0.19.2 does not copy."""
    differences, rope_scaled = run_distributed(1, _converter_config_against_megatrons, run_args())[0]
    assert differences == {}
    assert rope_scaled


def test_converter_fills_arguments_an_older_checkpoint_lacks():
    """A checkpoint saved by an older Megatron-Core (or an earlier convert_from_hf.py) lacks the flags
    added since: the converter's model gets Megatron's defaults for them, the stored values for the rest."""
    args = run_args()
    del args.glu_linear_offset, args.use_mup, args.qk_clip
    config = megatron_model.model_config(args, s2_config())
    assert (config.glu_linear_offset, config.use_mup, config.layernorm_epsilon) == (0.0, False, 1e-3)


def test_converter_model_of_a_tp1_run_at_tp2():
    """Sizes Megatron's validation derives from the run's TP (weight shards, expert TP) follow the TP the
    converter builds at."""
    args = run_args()
    args.tensor_parallel_num_weight_shards, args.gtp_weight_remat_size = 1, 1  # as validate_args sets them at TP=1
    args.expert_tensor_parallel_size = 1
    config = megatron_model.model_config(args, s2_config(), tensor_parallel=2)
    assert (config.tensor_model_parallel_size, config.gtp_weight_remat_size, config.expert_tensor_parallel_size) == (
        2, 1, 2)


def test_converter_precision_follows_the_weights_dtype():
    """Loading a run's weights in bfloat16 (as tests/gpu/test_hf_gpu.py does) gives a bf16 model, as
    --bf16 would."""
    config = megatron_model.model_config(run_args(params_dtype=torch.bfloat16), s2_config())
    assert (config.params_dtype, config.bf16, config.fp16) == (torch.bfloat16, True, False)


def _converter_logits(rank, world_size, args, input_ids):
    model = megatron_model.build_gpt_model(args, s2_config())
    _fill(model, rank)
    with torch.no_grad(), megatron_model.cpu_without_cuda():
        return model(input_ids, torch.arange(input_ids.shape[1])[None], None)


def test_run_with_cuda_graphs_converts_without_a_gpu():
    """A run's CUDA-graph setting is a GPU execution detail: the converter builds the same model without it."""
    logits = []
    for extra in ([], ["--cuda-graph-impl", "local"]):
        logits.append(run_distributed(1, _converter_logits, run_args(*extra), tokens(1, 32))[0])
    assert torch.isfinite(logits[0]).all() and torch.equal(logits[0], logits[1])


def test_dense_export_is_stock_llama(exported, tmp_path):
    root, input_ids, _ = exported
    in_child(convert_to_hf.main, ["--load", str(root / "mg"), "--out", str(tmp_path), "--dense"])
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(dense).__name__ == "LlamaForCausalLM"
    assert "NOT" in dense.config.s2_export_note
    # Within the local window (2 blocks of 16) S2 attention is dense: both exports agree there.
    short = input_ids[:, :32]
    with torch.no_grad():
        assert (dense(short).logits - load_exported(root / "hf")(short).logits).abs().max() < 1e-4


def test_weight_mapping_reads_transformer_engine_norm_names():
    """TE specs fuse the norms into the next linear (``layer_norm_weight``); both layouts map back."""
    shape = weight_mapping.LlamaShape(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_heads=4, num_kv_heads=2,
                               head_dim=8, vocab_size=64, tied_embeddings=False)
    config = S2LlamaConfig(**llama_kwargs(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2))
    torch.manual_seed(4)
    hf = {k: torch.randn_like(v) for k, v in S2LlamaForCausalLM(config).state_dict().items()}
    for fused in (False, True):
        megatron = weight_mapping.hf_to_megatron_weights(hf, shape, fused_norms=fused)
        assert ("decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in megatron) == fused
        back = weight_mapping.megatron_to_hf_weights(megatron, shape)
        assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)


@pytest.mark.parametrize("change, named", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type='yarn'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 2.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}, "low_freq_factor"),
])
def test_unsupported_hf_architectures_are_named(change, named):
    from transformers import LlamaConfig

    with pytest.raises(convert.UnsupportedArchitectureError, match=named):
        convert.megatron_args_from_hf(LlamaConfig(**{**llama_kwargs(), **change}))


def test_imported_model_arguments_are_the_training_parsers():
    """HF -> Megatron: the checkpoint's arguments are what pretrain_gpt_s2.py's parser makes of the
    model's flags (every Megatron argument there, as in a checkpoint a training run saves)."""
    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = S2LlamaConfig(**llama_kwargs(rms_norm_eps=1e-6, rope_parameters=rope))
    args = convert.megatron_args_from_hf(config, tensor_parallel=2)
    assert set(vars(megatron_parser().parse_args([]))) <= set(vars(args))
    assert (args.layernorm_epsilon, args.use_rope_scaling, args.rope_scaling_factor, args.rotary_base) == (
        1e-6, True, 32.0, 500000)
    assert (args.num_query_groups, args.kv_channels, args.vocab_size, args.padded_vocab_size) == (2, 16, 100, 256)
    convert.check_megatron_llama_args(args)


def test_unsupported_model_types_and_megatron_args_are_named():
    from argparse import Namespace

    from transformers import MixtralConfig, Qwen2Config

    with pytest.raises(convert.UnsupportedArchitectureError, match="num_local_experts"):
        convert.megatron_args_from_hf(MixtralConfig(num_local_experts=4))
    with pytest.raises(convert.UnsupportedArchitectureError, match="model_type='qwen2'"):
        convert.megatron_args_from_hf(Qwen2Config())
    args = convert.megatron_args_from_hf(S2LlamaConfig(**llama_kwargs()))
    convert.check_megatron_llama_args(args)
    bad = Namespace(**{**vars(args), "normalization": "LayerNorm", "add_bias_linear": True, "num_experts": 8,
                       "apply_residual_connection_post_layernorm": True, "no_rope_freq": 4,
                       "glu_linear_offset": 0.5})
    with pytest.raises(convert.UnsupportedArchitectureError,
                       match="normalization.*add-bias-linear.*num-experts.*apply-residual-connection-post-layernorm"
                             ".*glu-linear-offset.*no-rope-freq"):
        convert.check_megatron_llama_args(bad)
