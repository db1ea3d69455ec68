"""A tiny Megatron GPTModel built from the S2 block spec: the same function at TP=2 as at TP=1,
identical checkpoint keys dense vs S2, and pipeline stages that pick layers by global number.

With ``use_cpu_initialization`` and a fixed seed Megatron builds the full weights and slices them, so
every TP size starts from the same model; dropout is 0, so losses and gradients must agree.
"""

import pytest
import torch
from megatron.core import parallel_state

from megatron_s2.core.config import S2AttentionConfig
from megatron_s2.core.core_attention import S2CoreAttention, SDPACoreAttention
from megatron_s2.ops.pattern import S2ConfigError
from megatron_s2.core.specs import get_s2_gpt_block_spec, stage_layer_indices
from tests.helpers import S2_DEFAULTS, batch, build_gpt, loss_and_grads, run_distributed, tiny_config

pytestmark = pytest.mark.distributed


def _tp_run(rank, world_size, heads, groups, s2_dict):
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return loss_and_grads(tiny_config(tp, heads, groups), s2_dict)


@pytest.mark.parametrize(
    "heads,groups,layers",
    [
        (4, 4, "SSSS"),
        (4, 2, "DSSD"),  # GQA, one KV group per TP rank, mixed dense and S2 layers
        # Fewer KV groups than TP ranks (replicated groups) is covered at core-attention level in
        # test_core_attention.py: Megatron's own path for it allocates on 'cuda' (no CPU run).
    ],
    ids=["mha_all_s2", "gqa_groups_split_mixed"],
)
def test_tp2_equals_tp1(heads, groups, layers):
    s2_dict = {"layers": layers, "defaults": S2_DEFAULTS}
    loss1, grads1, kinds = run_distributed(1, _tp_run, heads, groups, s2_dict)[0]
    expected_kinds = ["S2CoreAttention" if c == "S" else "SDPACoreAttention" for c in layers]
    assert kinds == expected_kinds
    for loss2, grads2, _ in run_distributed(2, _tp_run, heads, groups, s2_dict, tp=2):
        assert abs(loss2 - loss1) < 1e-5 * abs(loss1), (loss1, loss2)
        assert grads2.keys() == grads1.keys()
        for name, g1 in grads1.items():
            assert grads2[name].shape == g1.shape, name
            scale = g1.abs().max().item() + 1e-12
            assert (grads2[name] - g1).abs().max().item() < 1e-4 * scale, name


def _state_keys(rank, world_size):
    config = tiny_config(heads=4, groups=2)
    keys = {}
    for name, layers in [("dense", "DDDD"), ("s2", "SSSS"), ("mixed", "DSSD")]:
        model = build_gpt(config, {"layers": layers, "defaults": S2_DEFAULTS})
        sharded = model.sharded_state_dict(prefix="", metadata={"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)})
        keys[name] = (sorted(model.state_dict().keys()), sorted(sharded.keys()),
                      sorted(n for n, _ in model.named_parameters()))
    return keys


def test_dense_and_s2_models_have_identical_state_dict_keys():
    keys = run_distributed(1, _state_keys)[0]
    assert keys["dense"][0]  # non-empty
    assert keys["s2"] == keys["dense"]
    assert keys["mixed"] == keys["dense"]


def test_pipeline_and_virtual_stages_pick_global_layers():
    # 8 layers, PP=2, VP=2: Megatron's interleaving gives rank r, virtual stage v the layers
    # v*4 + r*2 + {0, 1}.
    config = tiny_config(num_layers=8, pipeline_model_parallel_size=2,
                         virtual_pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    for pp_rank in range(2):
        for vp_stage in range(2):
            expected = [vp_stage * 4 + pp_rank * 2 + i for i in range(2)]
            assert stage_layer_indices(config, vp_stage=vp_stage, pp_rank=pp_rank) == expected

    s2 = S2AttentionConfig.from_dict({"layers": "DSSSSDSS", "defaults": S2_DEFAULTS, "cp_exchange": "allgather",
                                      "cp_overlap": False, "overrides": [{"layers": 6, "vert_stride": 2}]})
    for pp_rank in range(2):
        for vp_stage in range(2):
            spec = get_s2_gpt_block_spec(config, s2, vp_stage=vp_stage, pp_rank=pp_rank,
                                         use_transformer_engine=False)
            for index, layer_spec in zip(stage_layer_indices(config, vp_stage=vp_stage, pp_rank=pp_rank),
                                         spec.layer_specs):
                core = layer_spec.submodules.self_attention.submodules.core_attention
                assert core.keywords["cp_overlap"] is False  # the YAML's CP settings reach every layer
                if s2.layers[index].is_dense:
                    assert core.func is SDPACoreAttention
                else:
                    assert core.func is S2CoreAttention
                    assert core.keywords["cp_exchange"] == "allgather"
                    assert core.keywords["layer_index"] == index
                    assert core.keywords["pattern"] == s2.layers[index].pattern


def _pp_build(rank, world_size):
    """Build each pipeline stage's block for real: core attention cross-checks its layer number."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    config = tiny_config(num_layers=4, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    s2 = S2AttentionConfig.from_dict({"layers": "DSSS", "defaults": S2_DEFAULTS,
                                      "overrides": [{"layers": 3, "vert_stride": 2}]})
    block = TransformerBlock(config, get_s2_gpt_block_spec(config, s2))
    return [(layer.layer_number, type(layer.self_attention.core_attention).__name__,
             getattr(layer.self_attention.core_attention, "pattern", None)) for layer in block.layers]


def test_pipeline_stages_build_their_layers():
    ranks = run_distributed(2, _pp_build, pp=2)
    s2 = S2AttentionConfig.from_dict({"layers": "DSSS", "defaults": S2_DEFAULTS,
                                      "overrides": [{"layers": 3, "vert_stride": 2}]})
    built = [entry for rank in ranks for entry in rank]
    assert [b[0] for b in built] == [1, 2, 3, 4]  # Megatron's numbers, from 1
    for layer_number, kind, pattern in built:
        expected = s2.layers[layer_number - 1]
        assert kind == ("SDPACoreAttention" if expected.is_dense else "S2CoreAttention")
        assert pattern == expected.pattern


def _packed_gpt(rank, world_size):
    """Per-token losses of a packed THD batch equal those of each sequence run on its own."""
    from megatron.core.packed_seq_params import PackedSeqParams

    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = build_gpt(tiny_config(tp, 4, 2), {"layers": "DSSD", "defaults": S2_DEFAULTS})
    lengths = [50, 30, 48]
    tokens, _, labels = batch()
    tokens, labels = tokens[0, :sum(lengths)], labels[0, :sum(lengths)]
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, 50, 80, 128], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    packed = model(tokens[None], positions[None], None, labels=labels[None], packed_seq_params=params)[0]
    alone = torch.cat([
        model(tokens[None, a:b], positions[None, a:b], None, labels=labels[None, a:b])[0]
        for a, b in zip(cu.tolist(), cu.tolist()[1:])
    ])
    return packed.detach(), alone.detach()


def test_packed_sequences_through_gpt():
    (packed1, alone1), = run_distributed(1, _packed_gpt)
    assert (packed1 - alone1).abs().max().item() < 1e-5
    for packed2, alone2 in run_distributed(2, _packed_gpt, tp=2):
        assert (packed2 - alone2).abs().max().item() < 1e-5
        assert (packed2 - packed1).abs().max().item() < 1e-5


def test_spec_rejects_what_the_core_attentions_cannot_do():
    """Validated once, where the spec is built: the core attentions trust these settings."""
    s2 = S2AttentionConfig.from_dict({"layers": "DSSS", "defaults": S2_DEFAULTS})
    dense = S2AttentionConfig.dense(4)
    cases = [
        (tiny_config(attention_dropout=0.1), s2, "--attention-dropout 0"),
        (tiny_config(num_layers=6), s2, "layers"),
        (tiny_config(softmax_type="off-by-one"), s2, "--softmax-type vanilla"),
        (tiny_config(window_size=(8, 0)), dense, "--window-size"),  # dense layers on SDPA
        (tiny_config(), S2AttentionConfig.from_dict({"layers": "DSSS", "defaults": {
            **S2_DEFAULTS, "num_dense_heads": 5}}), "num_dense_heads"),
    ]
    for config, s2_config, message in cases:
        with pytest.raises(S2ConfigError, match=message):
            get_s2_gpt_block_spec(config, s2_config, use_transformer_engine=False)
