"""S2CoreAttention and SDPACoreAttention against independent references (CPU, gloo ranks).

Each test body runs in forked ranks (tests/helpers.py) because the modules read Megatron's
process groups. References: ``s2_attention_reference`` in float64 on the *full* (TP=1) tensors, the
S2 mask formula written out here, and plain masked softmax attention for the dense module.
"""

import math

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_s2.core.core_attention import S2CoreAttention, SDPACoreAttention
from megatron_s2.ops.pattern import S2ConfigError, S2Pattern
from megatron_s2.ops.reference import s2_attention_reference
from tests.helpers import run_distributed

pytestmark = pytest.mark.distributed

HEAD_DIM = 16
TOL = 2e-5  # float32 modules against float64 references
# Block 16, window 1 block, stride 4: beyond the diagonal each head reads only the key blocks of its
# own stripe, so heads with different global indices give different outputs.
PATTERN = S2Pattern(block_size=16, local_blocks=1, vert_stride=4)


def make_config(heads=4, groups=None, tp=1, cp=1, **kw):
    kw.setdefault("attention_dropout", 0.0)
    return TransformerConfig(
        num_layers=1, hidden_size=heads * HEAD_DIM, num_attention_heads=heads,
        num_query_groups=groups or heads, kv_channels=HEAD_DIM, tensor_model_parallel_size=tp,
        context_parallel_size=cp, use_cpu_initialization=True, hidden_dropout=0.0, **kw,
    )


def make_s2(config, pattern=PATTERN, layer_number=1, **kw):
    return S2CoreAttention(config, layer_number, AttnMaskType.causal, "self", pattern=pattern, **kw)


def make_sdpa(config, **kw):
    return SDPACoreAttention(config, 1, AttnMaskType.causal, "self", **kw)


def full_qkv(seq, batch, heads, groups, dtype=torch.float32, seed=0):
    """Fresh random [s, b, h, d] tensors, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(seq, batch, heads, HEAD_DIM, generator=g, dtype=dtype)
    k = torch.randn(seq, batch, groups, HEAD_DIM, generator=g, dtype=dtype)
    v = torch.randn(seq, batch, groups, HEAD_DIM, generator=g, dtype=dtype)
    return q, k, v


def reference_sbhd(q, k, v, pattern, scale=None, **kw):
    """float64 reference on Megatron's [s, b, h, d] layout, returning [s, b, h, d]."""
    q, k, v = (t.double().transpose(0, 1) for t in (q, k, v))
    return s2_attention_reference(q, k, v, pattern, softmax_scale=scale, **kw).transpose(0, 1)


def masked_softmax_attention(q, k, v, mask, scale):
    """Plain float64 attention on [s, b, h, d] (GQA by repetition) under a bool mask [h or 1, sq, sk]."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v)


def s2_token_mask(pattern, offsets, seq):
    """The S2 rule of docs/semantics.md written out per token, for the given per-head offsets."""
    pos = torch.arange(seq)
    qb, kb = pos[:, None] // pattern.block_size, pos[None, :] // pattern.block_size
    masks = []
    for off in offsets:
        blocks = (kb <= qb) & ((qb - kb < pattern.local_blocks) | ((kb + off) % pattern.vert_stride == 0))
        masks.append(blocks & (pos[None, :] <= pos[:, None]))
    return torch.stack(masks)


# -- single rank ----------------------------------------------------------------------------------


def _matches_reference(rank, world_size):
    results = {}
    for name, heads, groups, pattern in [
        ("mha", 4, 4, PATTERN),
        ("gqa_kv_group", 4, 2, S2Pattern(block_size=16, local_blocks=2, vert_stride=2, head_pattern="kv_group")),
    ]:
        config = make_config(heads, groups)
        module = make_s2(config, pattern)
        q, k, v = full_qkv(96, 2, heads, groups)
        out = module(q, k, v, None)
        expected = reference_sbhd(q, k, v, pattern).reshape(96, 2, -1)
        # Independent check of the reference's mask too: the formula written out.
        offsets = pattern.head_offsets(heads, groups)
        manual = masked_softmax_attention(q, k, v, s2_token_mask(pattern, offsets, 96), 1 / math.sqrt(HEAD_DIM))
        results[name] = (out.shape == (96, 2, heads * HEAD_DIM),
                         (out - expected).abs().max().item(),
                         (expected - manual.reshape(96, 2, -1)).abs().max().item())
    # softmax_scale from the config is honoured.
    config = make_config(4, softmax_scale=0.3)
    q, k, v = full_qkv(64, 1, 4, 4, seed=1)
    out = make_s2(config)(q, k, v, None)
    results["scale"] = (True, (out - reference_sbhd(q, k, v, PATTERN, scale=0.3).reshape(64, 1, -1)).abs().max().item(), 0.0)
    return results


def test_s2_core_attention_matches_reference():
    results = run_distributed(1, _matches_reference)[0]
    for name, (shape_ok, err, ref_err) in results.items():
        assert shape_ok, name
        assert err < TOL, (name, err)
        assert ref_err < 1e-10, (name, ref_err)


def _global_heads(rank, world_size, heads, groups, pattern):
    config = make_config(heads, groups, tp=world_size)
    module = make_s2(config, pattern)
    q, k, v = full_qkv(128, 2, heads, groups, seed=3)
    hl, gl = heads // world_size, max(1, groups // world_size)
    g0 = (rank * groups // world_size) if groups >= world_size else rank // (world_size // groups)
    ql, kl, vl = q[:, :, rank * hl:(rank + 1) * hl], k[:, :, g0:g0 + gl], v[:, :, g0:g0 + gl]
    out = module(ql, kl, vl, None).reshape(128, 2, hl, HEAD_DIM)
    # The global formula, from the full tensors: this rank's slice of the TP=1 result.
    full = masked_softmax_attention(q, k, v, s2_token_mask(pattern, pattern.head_offsets(heads, groups), 128),
                                    1 / math.sqrt(HEAD_DIM))[:, :, rank * hl:(rank + 1) * hl]
    # What the classic bug (local head indices) would compute: must differ on rank 1, or this
    # test could not catch it.
    local_offsets = pattern.head_offsets(heads, groups)[:hl]
    buggy = masked_softmax_attention(ql, kl, vl, s2_token_mask(pattern, local_offsets, 128), 1 / math.sqrt(HEAD_DIM))
    return module.shard.head_start, (out - full).abs().max().item(), (buggy - full).abs().max().item()


@pytest.mark.parametrize(
    "heads,groups,pattern,tp",
    [
        (4, 4, PATTERN, 2),
        (4, 2, S2Pattern(block_size=16, local_blocks=1, vert_stride=2, head_pattern="kv_group"), 2),
        # Fewer KV groups than TP ranks: Megatron replicates the group, heads still split in order.
        (4, 1, PATTERN, 2),
        (4, 2, S2Pattern(block_size=16, local_blocks=1, vert_stride=2, head_pattern="kv_group"), 4),
    ],
    ids=["mha", "gqa_split_groups", "gqa_replicated_group", "kv_group_replicated_tp4"],
)
def test_tp_ranks_use_global_head_indices(heads, groups, pattern, tp):
    results = run_distributed(tp, _global_heads, heads, groups, pattern, tp=tp)
    assert [r[0] for r in results] == [rank * heads // tp for rank in range(tp)]
    for rank, (_, err, bug_gap) in enumerate(results):
        assert err < TOL, (rank, err)
    assert max(r[2] for r in results) > 1e-3  # local indices would have changed some rank's output


def _packed(rank, world_size, padded):
    config = make_config(4, 2)
    lengths = [40, 70, 18]
    cu = torch.tensor([0, 40, 110, 128], dtype=torch.int32)
    q, k, v = (t[:, 0] for t in full_qkv(128, 1, 4, 2, seed=5))  # THD: [t, h, d]
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    if padded:  # Megatron's padded layout: the real lengths are shorter, the layout uses padded bounds
        params.cu_seqlens_q = params.cu_seqlens_kv = torch.tensor([0, 35, 101, 117], dtype=torch.int32)
        params.cu_seqlens_q_padded = params.cu_seqlens_kv_padded = cu
    errors = []
    for module in (make_s2(config), make_sdpa(config)):
        out = module(q, k, v, None, attn_mask_type=AttnMaskType.padding_causal, packed_seq_params=params)
        assert out.shape == (128, 4 * HEAD_DIM)
        for s0, s1 in zip(cu.tolist(), cu.tolist()[1:]):
            # Each sequence alone, from position 0: packing must not leak across boundaries.
            qs, ks, vs = (t[s0:s1, None] for t in (q, k, v))
            if isinstance(module, S2CoreAttention):
                expected = reference_sbhd(qs, ks, vs, PATTERN)
            else:
                causal = torch.ones(s1 - s0, s1 - s0, dtype=torch.bool).tril()[None]
                expected = masked_softmax_attention(qs, ks, vs, causal, 1 / math.sqrt(HEAD_DIM))
            errors.append((out[s0:s1] - expected.reshape(s1 - s0, -1)).abs().max().item())
    return errors


@pytest.mark.parametrize("padded", [False, True])
def test_packed_sequences(padded):
    errors = run_distributed(1, _packed, padded)[0]
    assert max(errors) < TOL, errors


def _sdpa_dense(rank, world_size):
    errors = []
    for heads, groups in [(4, 4), (4, 2)]:
        module = make_sdpa(make_config(heads, groups))
        q, k, v = full_qkv(80, 2, heads, groups, seed=7)
        causal = torch.ones(80, 80, dtype=torch.bool).tril()[None]
        expected = masked_softmax_attention(q, k, v, causal, 1 / math.sqrt(HEAD_DIM))
        errors.append((module(q, k, v, None) - expected.reshape(80, 2, -1)).abs().max().item())
        # Decoding: 3 queries at the end of 80 keys (bottom-right aligned causality).
        out = module(q[-3:], k, v, None)
        errors.append((out - expected[-3:].reshape(3, 2, -1)).abs().max().item())
    # Attention dropout (dense layers only): active in training, off in evaluation.
    module = make_sdpa(make_config(4, 2, attention_dropout=0.5))
    q, k, v = full_qkv(80, 2, 4, 2, seed=7)
    expected = masked_softmax_attention(q, k, v, torch.ones(80, 80, dtype=torch.bool).tril()[None],
                                        1 / math.sqrt(HEAD_DIM)).reshape(80, 2, -1)
    errors.append((module.eval()(q, k, v, None) - expected).abs().max().item())
    errors.append(1.0 if torch.allclose(module.train()(q, k, v, None).double(), expected, atol=1e-3) else 0.0)
    # S2 decode step: the last queries see the same keys as in the full pass.
    module = make_s2(make_config(4, 2))
    q, k, v = full_qkv(80, 1, 4, 2, seed=8)
    errors.append((module(q[-5:], k, v, None) - module(q, k, v, None)[-5:]).abs().max().item())
    return errors


def test_sdpa_core_attention_dense_and_gqa():
    errors = run_distributed(1, _sdpa_dense)[0]
    assert max(errors) < TOL, errors


def _context_parallel(rank, world_size):
    from megatron.core import parallel_state

    cp = parallel_state.get_context_parallel_world_size()
    q, k, v = full_qkv(128, 1, 4, 2, seed=9)
    chunk = 128 // (2 * cp)
    mine = torch.cat([torch.arange(rank * chunk, (rank + 1) * chunk),
                      torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)])
    config = make_config(4, 2, cp=cp)
    errors = []
    for module, expected in [
        (make_s2(config), reference_sbhd(q, k, v, PATTERN)),
        (make_sdpa(config), masked_softmax_attention(q, k, v, torch.ones(128, 128, dtype=torch.bool).tril()[None],
                                                     1 / math.sqrt(HEAD_DIM))),
    ]:
        out = module(q[mine], k[mine], v[mine], None)
        errors.append((out - expected[mine].reshape(len(mine), 1, -1)).abs().max().item())
    return errors


def test_context_parallel_core_attention():
    for errors in run_distributed(2, _context_parallel, cp=2):
        assert max(errors) < TOL, errors


# -- rejected configurations ----------------------------------------------------------------------


def _errors(rank, world_size):
    q, k, v = full_qkv(32, 1, 4, 4)
    cases = {
        "mask_type": lambda: S2CoreAttention(make_config(), 1, AttnMaskType.no_mask, "self", pattern=PATTERN),
        "forward_mask_type": lambda: make_s2(make_config())(q, k, v, None, attn_mask_type=AttnMaskType.padding),
        "bias": lambda: make_s2(make_config())(q, k, v, None, attention_bias=torch.zeros(1)),
        "layer_index": lambda: make_s2(make_config(), layer_number=3, layer_index=0),
        "thd_format": lambda: make_s2(make_config())(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="bshd")),
    }
    messages = {}
    for name, build in cases.items():
        try:
            build()
            messages[name] = None
        except S2ConfigError as err:
            messages[name] = str(err)
    return messages


def test_rejects_layer_and_call_inputs_it_cannot_handle():
    """Model-level settings are checked where the spec is built (test_megatron_tp.py)."""
    messages = run_distributed(1, _errors)[0]
    hints = {
        "mask_type": "causal only",
        "forward_mask_type": "causal only",
        "bias": "attention bias",
        "layer_index": "pipeline stage",
        "thd_format": "thd",
    }
    for name, hint in hints.items():
        assert messages[name] is not None, f"{name} was accepted"
        assert hint in messages[name], (name, messages[name])


def _backward_mode(rank, world_size):
    import megatron_s2.core.core_attention as core_attention

    seen = []
    real = core_attention.s2_attention

    def recording(*args, **kwargs):
        seen.append(kwargs["deterministic"])
        return real(*args, **kwargs)

    core_attention.s2_attention = recording
    for deterministic_mode in (True, False):
        q, k, v = full_qkv(32, 1, 4, 4)
        make_s2(make_config(4, deterministic_mode=deterministic_mode))(q, k, v, None)
    return seen


def test_deterministic_mode_selects_the_deterministic_kernel_backward():
    """--deterministic-mode asks the kernel for its deterministic backward; otherwise its default."""
    assert run_distributed(1, _backward_mode)[0] == [True, None]
