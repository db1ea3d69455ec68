"""The S2 Triton kernel (run by Triton's interpreter on CPU) against the float64 dense reference.

Every kernel buffer is poisoned with NaN before the kernels run, so an element a kernel forgets to
write fails the comparison (the fast backward's dQ accumulator too: its zeroing is tested). Inputs
and output gradients (of ``out`` and of ``lse``) are fresh random draws for every case. Tests that
run a backward take the ``backward_mode`` fixture: they run in the fast and the deterministic mode.
"""

import math

import pytest
import torch
from megatron_s2 import BlockMaskPattern, S2Pattern, get_layout, s2_attention, s2_block_mask
from megatron_s2.ops import attention, kernel
from megatron_s2.ops.attention import s2_attention_backward, s2_attention_into
from megatron_s2.ops.layout import Shard
from megatron_s2.ops.reference import s2_attention_reference
from tests.helpers import needs_triton_interpreter

pytestmark = needs_triton_interpreter

ATOL = 2e-5  # float32 kernel vs float64 reference, values of order 1


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernel, "new_output", poisoned)


@pytest.fixture(params=["fast", "deterministic"])
def backward_mode(request, monkeypatch):
    """Runs the test with either backward mode as the default of every entry point."""
    monkeypatch.setattr(attention, "DETERMINISTIC_BY_DEFAULT", request.param == "deterministic")
    return request.param


def spy_launches(monkeypatch, *names):
    """``[(launcher name, its keyword arguments), ...]`` of every launch of the named kernel
    launchers (``"_fused"``, ``"_dkdv"``, ...), which still run."""
    launches = []
    for name in names:
        launcher = getattr(kernel, name)
        monkeypatch.setattr(launcher, "launch", lambda *a, _name=name, _launch=launcher.launch, **kw: (
            launches.append((_name, kw)), _launch(*a, **kw)))
    return launches


def draw(*shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shapes]


def run(fn, q, k, v, grad_out, grad_lse, dtype, **kw):
    q, k, v = (t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v, return_lse=True, **kw)
    torch.autograd.backward((out, lse), (grad_out.to(out.dtype), grad_lse.to(lse.dtype)))
    return out, lse, q.grad, k.grad, v.grad


def compare(pattern, q, k, v, seed, **kw):
    """Kernel (float32) vs reference (float64): out, lse, dq, dk, dv."""
    out_shape = q.shape
    lse_shape = (q.shape[1], q.shape[0]) if q.dim() == 3 else (q.shape[0], q.shape[2], q.shape[1])
    grad_out, grad_lse = draw(out_shape, lse_shape, seed=seed + 1)
    got = run(lambda *a, **k2: s2_attention(*a, pattern, **k2), q, k, v, grad_out, grad_lse, torch.float32, **kw)
    want = run(lambda *a, **k2: s2_attention_reference(*a, pattern, **k2), q, k, v, grad_out, grad_lse,
               torch.float64, **kw)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape, name
        assert torch.isfinite(g).all(), f"{name} has unwritten (NaN) or non-finite elements"
        err = (g.double() - w).abs().max().item()
        assert err < ATOL * max(1.0, w.abs().max().item()), f"{name}: max error {err:.2e}"
    return got


CASES = {
    # name: (pattern kwargs, batch, seq, heads, kv_heads, dim)
    "mha_heterogeneous": (dict(block_size=16, local_blocks=2, vert_stride=3), 2, 70, 4, 4, 32),
    "gqa_kv_group_ragged": (dict(block_size=16, local_blocks=2, vert_stride=2, head_pattern="kv_group"),
                            1, 100, 4, 2, 32),
    "mqa_homogeneous": (dict(block_size=16, local_blocks=1, vert_stride=3, head_pattern="homogeneous"),
                        1, 64, 4, 1, 32),
    "dense_heads_offset1": (dict(block_size=16, local_blocks=2, vert_stride=4, num_dense_heads=1,
                                 head_sliding_offset=1), 1, 90, 3, 3, 16),
    "block64_two_unit_tiles": (dict(block_size=64, local_blocks=1, vert_stride=2), 1, 333, 2, 1, 32),
    "block32_head_dim64": (dict(block_size=32, local_blocks=2, vert_stride=2, head_sliding_step=1),
                           1, 150, 2, 2, 64),
    "block128_refined": (dict(block_size=128, local_blocks=1, vert_stride=2), 1, 300, 2, 2, 16),
    "single_token": (dict(block_size=16, local_blocks=2, vert_stride=3), 1, 1, 2, 1, 32),
    "window_gqa": (dict(block_size=16, local_blocks=2, vert_stride=0, head_pattern="kv_group"), 2, 100, 4, 2, 32),
    "window_dense_head": (dict(block_size=32, local_blocks=1, vert_stride=0, num_dense_heads=1), 1, 150, 2, 1, 16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(backward_mode, name):
    params, batch, seq, heads, kv_heads, dim = CASES[name]
    q, k, v = draw((batch, seq, heads, dim), (batch, seq, kv_heads, dim), (batch, seq, kv_heads, dim),
                   seed=len(name))
    compare(S2Pattern(**params), q, k, v, seed=seq)


def test_tensor_parallel_slice_equals_full_model_slice(backward_mode):
    """Rank 1 of TP=2 (global heads 2-3, KV head 1) equals the reference and the full run's slice."""
    pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=4)
    q, k, v = draw((1, 80, 4, 32), (1, 80, 2, 32), (1, 80, 2, 32), seed=3)
    kw = dict(head_start=2, num_q_heads=4, num_kv_heads=2)
    sliced = compare(pattern, q[:, :, 2:], k[:, :, 1:], v[:, :, 1:], seed=4, **kw)
    full = s2_attention(q, k, v, pattern)
    assert torch.allclose(sliced[0], full[:, :, 2:], atol=1e-6)


def test_context_parallel_chunk_equals_full_sequence_rows(backward_mode):
    pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=3)
    q, k, v = draw((1, 96, 2, 32), (1, 96, 2, 32), (1, 96, 2, 32), seed=5)
    chunk = compare(pattern, q[:, 32:80], k, v, seed=6, q_start=32)
    full = s2_attention(q, k, v, pattern)
    assert torch.allclose(chunk[0], full[:, 32:80], atol=1e-6)


def test_key_offset_chunk(backward_mode):
    """Keys starting later than position 0 (a CP rank that received keys from block 1 on)."""
    pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=2)
    q, k, v = draw((1, 40, 2, 32), (1, 56, 1, 32), (1, 56, 1, 32), seed=7)
    compare(pattern, q, k, v, seed=8, q_start=32, k_start=16)


def _split_by_keys(pattern, q, k, v, grad_out, q_start, split, dtype):
    """Queries at ``q_start`` over keys ``[0, split)`` and ``[split, end)`` in two calls, merged by
    lse (written out here), with gradients from ``s2_attention_backward`` given the merged result."""
    q, k, v, grad_out = (t.to(dtype) for t in (q, k, v, grad_out))
    ranges = [(k[:, :split], v[:, :split], 0), (k[:, split:], v[:, split:], split)]
    parts = [s2_attention(q, kr, vr, pattern, q_start=q_start, k_start=start, return_lse=True)
             for kr, vr, start in ranges]
    lse = torch.logaddexp(parts[0][1], parts[1][1])
    out = sum(o.double() * torch.exp(l - lse).transpose(1, 2)[..., None] for o, l in parts).to(dtype)
    heads = Shard(num_q_heads=q.shape[2], num_kv_heads=k.shape[2])
    grads = [s2_attention_backward(grad_out, q, kr, vr, out, lse, pattern, shard=heads.at(q_start, start))
             for kr, vr, start in ranges]
    dq = grads[0][0] + grads[1][0]
    dk, dv = (torch.cat([grads[0][i], grads[1][i]], 1) for i in (1, 2))
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_softmax_split_by_key_ranges_equals_one_call(monkeypatch, backward_mode, path):
    """Context parallelism's building block: partial key ranges merged by lse, and their backward
    from the merged output, equal one call over all keys (float64 reference, autograd)."""
    if path == "reference":
        monkeypatch.delenv("TRITON_INTERPRET")
    pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=4)
    q, k, v, grad_out = draw((2, 48, 4, 32), (2, 112, 2, 32), (2, 112, 2, 32), (2, 48, 4, 32), seed=30)
    # Keys [0, 32) end before every query: some heads have no stripe there (rows without keys).
    got = _split_by_keys(pattern, q, k, v, grad_out, q_start=64, split=32, dtype=torch.float32)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = s2_attention_reference(*ref, pattern, q_start=64, return_lse=True)
    ref_out.backward(grad_out.double())
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, (ref_out, ref_lse, *(t.grad for t in ref))):
        assert torch.isfinite(g).all(), name
        err = (g.double() - w).abs().max().item()
        assert err < ATOL * max(1.0, w.abs().max().item()), f"{name}: max error {err:.2e}"


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_resumed_softmax_into_views_equals_one_call(monkeypatch, path):
    """s2_attention_into: a first key range written into views of larger buffers, then a second
    range resumed into them (rows the first range does not reach start there), equals one call."""
    if path == "reference":
        monkeypatch.delenv("TRITON_INTERPRET")
    pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=4)
    q, k, v = draw((1, 48, 4, 32), (1, 112, 2, 32), (1, 112, 2, 32), seed=32)
    out = torch.full((1, 80, 4, 32), float("nan"))
    lse = torch.full((1, 4, 80), float("nan"))
    rows = slice(16, 64)  # strided views of the buffers
    heads = Shard(num_q_heads=4, num_kv_heads=2)
    s2_attention_into(q, k[:, :32], v[:, :32], pattern, out[:, rows], lse[:, :, rows], shard=heads.at(64, 0),
                      resume=False)
    s2_attention_into(q, k[:, 32:], v[:, 32:], pattern, out[:, rows], lse[:, :, rows], shard=heads.at(64, 32),
                      resume=True)
    want_out, want_lse = s2_attention_reference(q.double(), k.double(), v.double(), pattern, q_start=64,
                                                return_lse=True)
    assert (out[:, rows].double() - want_out).abs().max() < ATOL
    assert (lse[:, :, rows].double() - want_lse).abs().max() < ATOL
    assert out[:, :16].isnan().all() and lse[:, :, 64:].isnan().all()  # nothing outside the views


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_rows_without_keys_give_zero_and_minus_infinity(monkeypatch, path):
    if path == "reference":
        monkeypatch.delenv("TRITON_INTERPRET")
    pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=8)
    q, k, v = draw((1, 64, 4, 16), (1, 32, 4, 16), (1, 32, 4, 16), seed=31)
    out, lse = s2_attention(q, k, v, pattern, q_start=64, k_start=0, return_lse=True)
    reads = s2_block_mask(pattern, 4, 4, 64, 32, q_start=64).any(-1)  # [heads, query blocks]
    empty = ~reads.repeat_interleave(16, 1)  # [heads, queries]
    assert empty.any() and not empty.all()
    assert torch.equal(out.transpose(1, 2)[0][empty], torch.zeros(int(empty.sum()), 16))
    assert torch.isneginf(lse[0][empty]).all() and torch.isfinite(lse[0][~empty]).all()


def test_packed_sequences(backward_mode):
    pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=3, head_pattern="kv_group")
    lengths = [37, 16, 1, 50]
    cu = torch.tensor([0, 37, 53, 54, 104], dtype=torch.int32)
    q, k, v = draw((104, 4, 32), (104, 2, 32), (104, 2, 32), seed=9)
    got = compare(pattern, q, k, v, seed=10, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths),
                  max_seqlen_k=max(lengths))
    # Each sequence alone gives the same rows: nothing leaks across sequence boundaries.
    alone = s2_attention(q[None, 54:104], k[None, 54:104], v[None, 54:104], pattern)
    assert torch.allclose(got[0][54:104], alone[0], atol=1e-6)


def test_packed_short_sequence_cuts_long_lists(backward_mode):
    """64-token units with stripes: the lists serve the layout's length (1024 tokens), so a short
    sequence's key tiles list unmasked query units past its end. The dK/dV pass must stop its
    unmasked entries at the sequence's last unit and still run the masked ones after them."""
    pattern = S2Pattern(block_size=64, local_blocks=4, vert_stride=2)
    cu = torch.tensor([0, 300, 400], dtype=torch.int32)
    layout = get_layout(pattern, 2, 2, 512)
    k_tiles = kernel.kernel_layout(layout, 16, 1).k_tiles
    short_units = 2  # the 100-token sequence
    entries = k_tiles.entries.long()
    starts, nfull = k_tiles.ptr[:-1].tolist(), k_tiles.nfull.tolist()
    tile_units = k_tiles.units.flatten(0, 1)  # [heads * tiles, units per tile], one KV head per head here
    past_end = [int(units[units >= 0].min()) < short_units
                and bool(((entries[s:s + n] >> kernel._FLAG_BITS) >= short_units).any())
                for units, s, n in zip(tile_units, starts, nfull) if (units >= 0).any()]
    assert any(past_end), "the case must have unmasked entries past the short sequence's end"
    q, k, v = draw((400, 2, 16), (400, 2, 16), (400, 2, 16), seed=25)
    got = compare(pattern, q, k, v, seed=26, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=300, max_seqlen_k=300)
    alone = s2_attention(q[None, 300:], k[None, 300:], v[None, 300:], pattern)
    assert torch.allclose(got[0][300:], alone[0], atol=1e-6)


def test_window_only_tp_slice_cp_offsets_and_packed(backward_mode):
    """Window-only (no stripes): a TP head slice, CP chunks at query/key offsets, packed sequences."""
    pattern = S2Pattern.window(block_size=16, local_blocks=2)
    q, k, v = draw((1, 96, 4, 16), (1, 96, 2, 16), (1, 96, 2, 16), seed=21)
    full = s2_attention(q, k, v, pattern)
    sliced = compare(pattern, q[:, :, 2:], k[:, :, 1:], v[:, :, 1:], seed=22, head_start=2, num_q_heads=4,
                     num_kv_heads=2)
    assert torch.allclose(sliced[0], full[:, :, 2:], atol=1e-6)
    # Queries of blocks 3-4 read blocks 2-4 only: keys from block 1 on (k_start) give the same rows.
    chunk = compare(pattern, q[:, 48:80], k[:, 16:80], v[:, 16:80], seed=23, q_start=48, k_start=16)
    assert torch.allclose(chunk[0], full[:, 48:80], atol=1e-6)
    cu = torch.tensor([0, 40, 41, 96], dtype=torch.int32)
    packed = compare(pattern, q[0], k[0], v[0], seed=24, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=55,
                     max_seqlen_k=55)
    alone = s2_attention(q[:, 41:96], k[:, 41:96], v[:, 41:96], pattern)
    assert torch.allclose(packed[0][41:96], alone[0], atol=1e-6)


def test_explicit_block_mask(backward_mode):
    gen = torch.Generator().manual_seed(11)
    mask = torch.rand(3, 6, 6, generator=gen) < 0.4
    mask |= torch.eye(6, dtype=torch.bool)
    pattern = BlockMaskPattern(mask, block_size=16)
    q, k, v = draw((1, 90, 3, 32), (1, 90, 3, 32), (1, 90, 3, 32), seed=12)
    compare(pattern, q, k, v, seed=13)


def test_softmax_scale(backward_mode):
    pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=2)
    q, k, v = draw((1, 50, 2, 32), (1, 50, 2, 32), (1, 50, 2, 32), seed=14)
    compare(pattern, q, k, v, seed=15, softmax_scale=0.37)


LAUNCHERS = (kernel._fwd, kernel._dkdv, kernel._dq, kernel._fused)


@pytest.mark.parametrize("index", range(1, max(len(c) for launcher in LAUNCHERS for c in launcher.config_lists)))
def test_every_launch_config(monkeypatch, backward_mode, index):
    """Each config (key units per step, dK/dV query step) computes the same function; config
    ``index`` of every list is moved to the front, where the launcher takes it from."""
    for launcher in LAUNCHERS:
        lists = [c[index % len(c):] + c[:index % len(c)] for c in launcher.config_lists]
        monkeypatch.setattr(launcher, "config_lists", lists)
    q, k, v = draw((1, 333, 2, 32), (1, 333, 1, 32), (1, 333, 1, 32), seed=16 + index)
    compare(S2Pattern(block_size=64, local_blocks=1, vert_stride=2), q, k, v, seed=17)


def test_lse_only_gradient(backward_mode):
    """Only lse feeds the loss: the output gradient is absent and the lse gradient alone flows."""
    pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=3)
    q, k, v = draw((1, 48, 2, 32), (1, 48, 2, 32), (1, 48, 2, 32), seed=18)
    grads = []
    for fn, dtype in ((s2_attention, torch.float32), (s2_attention_reference, torch.float64)):
        qq, kk, vv = (t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v))
        _, lse = fn(qq, kk, vv, pattern, return_lse=True)
        (lse.sin().sum()).backward()
        grads.append((qq.grad, kk.grad, vv.grad))
    for g, w in zip(*grads):
        w = torch.zeros_like(g, dtype=torch.float64) if w is None else w  # lse does not depend on v
        assert (g.double() - w).abs().max().item() < ATOL


def test_strided_and_broadcast_output_gradients(backward_mode):
    """Autograd hands the backward whatever strides the graph produced: a transposed grad_out (as
    after Megatron's [s, b, h, d] reshape) and a broadcast grad_lse (from ``lse.sum()``)."""
    pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=3)
    q, k, v, grad_out = draw((2, 40, 4, 32), (2, 40, 2, 32), (2, 40, 2, 32), (40, 2, 4, 32), seed=33)
    grads = {}
    for name, fn, dtype in (("kernel", s2_attention, torch.float32),
                            ("reference", s2_attention_reference, torch.float64)):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves, pattern, return_lse=True)
        torch.autograd.backward((out, lse), (grad_out.to(dtype).transpose(0, 1),
                                             torch.ones((), dtype=torch.float32).expand(lse.shape)))
        grads[name] = [t.grad for t in leaves]
    for got, want in zip(grads["kernel"], grads["reference"]):
        assert (got.double() - want).abs().max() < ATOL * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("split", [True, False], ids=["per_head", "per_group"])
def test_deterministic_backward_is_bit_identical(monkeypatch, split):
    """deterministic=True overrides a fast default; dK/dV programs per query head (float32 partials
    summed per group) and per GQA group."""
    monkeypatch.setattr(attention, "DETERMINISTIC_BY_DEFAULT", False)
    monkeypatch.setattr(kernel, "SPLIT_HEADS", {"fast": split, "deterministic": split})
    pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=3)
    q, k, v = draw((1, 64, 4, 32), (1, 64, 1, 32), (1, 64, 1, 32), seed=19)
    grad_out, grad_lse = draw((1, 64, 4, 32), (1, 4, 64), seed=20)
    first, second = (run(lambda *a, **kw: s2_attention(*a, pattern, deterministic=True, **kw), q, k, v,
                         grad_out, grad_lse, torch.float32) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("budget", ["all_heads", "group_per_chunk", "none"])
@pytest.mark.parametrize("case", ["packed_gqa", "varlen_mha"])
def test_stored_ds_in_chunks_or_recomputed(monkeypatch, case, budget):
    """The deterministic backward's dQ from the dS the dK/dV pass stored: all heads in one chunk, a
    chunk per KV group (a budget that fits one group), or no stored dS (budget 0: the dQ pass
    recomputes it). Each matches the float64 reference, and chunked equals one chunk bit for bit."""
    monkeypatch.setattr(attention, "DETERMINISTIC_BY_DEFAULT", True)
    launches = spy_launches(monkeypatch, "_dq_stored", "_dq")
    if case == "packed_gqa":  # kv_group heads: GQA packing in the dQ pass (4 heads per program)
        pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=3, head_pattern="kv_group")
        heads, kv_heads, seq, options = 8, 2, 90, {}
        q, k, v = draw((1, seq, heads, 32), (1, seq, kv_heads, 32), (1, seq, kv_heads, 32), seed=41)
    else:  # packed sequences with 64-token units and stripes
        pattern = S2Pattern(block_size=64, local_blocks=2, vert_stride=2)
        heads, kv_heads, seq = 4, 4, 300
        cu = torch.tensor([0, 300, 400], dtype=torch.int32)
        options = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=seq, max_seqlen_k=seq)
        q, k, v = draw((400, heads, 16), (400, kv_heads, 16), (400, kv_heads, 16), seed=42)
    group = heads // kv_heads
    plan = kernel.stored_ds_plan
    chosen = {"budget": budget}

    def plan_with_budget(layout, work, num_seqs, heads, group, element_size, num_sms):
        """The plan for a budget of all heads' dS, or of the largest group's, or none."""
        starts = layout.k_head_starts
        block_bytes = num_seqs * math.prod(layout.ds_block_shape) * element_size
        per_group = [(starts[g + group] - starts[g]) * block_bytes for g in range(0, heads, group)]
        bytes_ = {"all_heads": sum(per_group), "group_per_chunk": max(per_group), "none": 0}[chosen["budget"]]
        return plan(layout, work, num_seqs, heads, group, element_size, num_sms, bytes_)

    monkeypatch.setattr(kernel, "stored_ds_plan", plan_with_budget)
    got = compare(pattern, q, k, v, seed=43, **options)
    names = [name for name, _ in launches]
    expected = {"all_heads": ["_dq_stored"], "group_per_chunk": ["_dq_stored"] * (heads // group), "none": ["_dq"]}
    assert names == expected[budget]
    if budget == "group_per_chunk":
        launches.clear()
        chosen["budget"] = "all_heads"
        one_chunk = compare(pattern, q, k, v, seed=43, **options)
        assert [name for name, _ in launches] == ["_dq_stored"]
        for a, b in zip(got, one_chunk):
            assert torch.equal(a, b)


@pytest.mark.parametrize("programs", ["per_head", "per_group"])
def test_stored_ds_chunks_only_when_no_program_outlasts_its_chunk(programs):
    """Chunks of heads wait for their longest dK/dV program: a plan of several chunks is refused
    when a program's list entries exceed its chunk's entries per SM (one chunk is always fine)."""
    pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=3, head_pattern="kv_group")
    layout = kernel.kernel_layout(get_layout(pattern, 8, 2, 200), 32, 4)
    per_head = (layout.k_tiles.ptr[1:] - layout.k_tiles.ptr[:-1]).view(2, 4, -1).long()
    program = per_head if programs == "per_head" else per_head.sum(1, keepdim=True)
    work = layout.k_work_per_head if programs == "per_head" else layout.k_work_per_group
    starts = layout.k_head_starts
    entries = [starts[4] - starts[0], starts[8] - starts[4]]  # of each group, a chunk each
    longest = [int(program[g].max()) for g in (0, 1)]
    block_bytes = math.prod(layout.ds_block_shape) * 2
    two_chunks = max(entries) * block_bytes

    def chunks(num_sms, budget):
        plan = kernel.stored_ds_plan(layout, work, 1, 8, 4, 2, num_sms, budget)
        return None if plan is None else len(plan)

    fits = min(e // n for e, n in zip(entries, longest))  # the most SMs both chunks keep busy
    assert fits >= 1
    assert chunks(fits, two_chunks) == 2
    assert chunks(fits + 1, two_chunks) is None
    assert chunks(10**6, starts[8] * block_bytes) == 1


@pytest.mark.parametrize("heads,kv_heads,chunks", [(5, 5, 3), (6, 3, 2), (7, 7, 7)])
def test_stored_ds_chunks_are_balanced_and_keep_the_work_order(heads, kv_heads, chunks):
    """Chunks hold whole KV groups, sizes within one group of each other, and each chunk's dK/dV work
    items are exactly its programs in the heaviest-first order of all programs."""
    group = heads // kv_heads
    pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=3)
    layout = kernel.kernel_layout(get_layout(pattern, heads, kv_heads, 150), 32, group)
    starts, tiles = layout.k_head_starts, layout.k_tiles.num_tiles
    block_bytes = math.prod(layout.ds_block_shape) * 4
    bounds = [(i * kv_heads // chunks * group, (i + 1) * kv_heads // chunks * group) for i in range(chunks)]
    budget = max(starts[hi] - starts[lo] for lo, hi in bounds) * block_bytes
    plan = kernel.stored_ds_plan(layout, layout.k_work_per_group, 1, heads, group, 4, 1, budget)
    assert 1 < len(plan) <= chunks
    sizes = [chunk.head_hi - chunk.head_lo for chunk in plan]
    assert plan[0].head_lo == 0 and plan[-1].head_hi == heads and max(sizes) - min(sizes) <= group
    everything = layout.k_work_per_group.order.tolist()
    for chunk in plan:
        assert all(size % group == 0 for size in sizes)
        assert chunk.first_entry == starts[chunk.head_lo] and chunk.blocks == starts[chunk.head_hi] - chunk.first_entry
        mine = [w for w in everything if chunk.head_lo <= w // tiles * group < chunk.head_hi]
        assert chunk.order.tolist() == mine


def test_stored_ds_chunks_fall_back_to_per_head_programs_for_long_ones(monkeypatch):
    """kv_group heads: when some of a group's dK/dV programs are too long for chunks but one head's
    are not, the deterministic backward runs those per head (float32 partials, summed per group)
    and the rest per group, on stored dS: exact, and each chunk runs its own items."""
    monkeypatch.setattr(attention, "DETERMINISTIC_BY_DEFAULT", True)
    pattern = S2Pattern(block_size=16, local_blocks=1, vert_stride=8, head_pattern="kv_group")
    layout = kernel.kernel_layout(get_layout(pattern, 8, 2, 512), 32, 4)
    starts = layout.k_head_starts
    entries = min(starts[4] - starts[0], starts[8] - starts[4])
    num_sms = entries // max(layout.k_work_per_head.longest_per_group)  # per-head programs fit, group ones not
    assert max(layout.k_work_per_group.longest_per_group) * num_sms > max(starts[4] - starts[0], starts[8] - starts[4])
    monkeypatch.setattr(kernel, "_sm_count", lambda device: num_sms)
    monkeypatch.setattr(kernel, "STORED_DS_BYTES", max(starts[4] - starts[0], starts[8] - starts[4])
                        * math.prod(layout.ds_block_shape) * 4)
    launches = spy_launches(monkeypatch, "_dkdv", "_dq_stored", "_dq")
    q, k, v = draw((1, 512, 8, 32), (1, 512, 2, 32), (1, 512, 2, 32), seed=44)
    compare(pattern, q, k, v, seed=45)
    assert [name for name, _ in launches] == ["_dkdv", "_dq_stored"] * 2
    items = [kw["ORDER"].tolist() for name, kw in launches if name == "_dkdv"]
    assert sorted(items[0] + items[1]) == sorted(layout.k_work_long_per_head.order.tolist())
    tiles = layout.k_tiles.num_tiles
    for kv_head, chunk in enumerate(items):  # a chunk per KV group, both kinds of items in each
        assert {w // tiles if w >= 0 else ~w // tiles // 4 for w in chunk} == {kv_head}
        assert min(chunk) < 0 <= max(chunk)


@pytest.mark.parametrize("value,gib", [(None, 8), ("0.5", 0.5), ("0", 0), ("-1", None), ("lots", None), ("nan", None)])
def test_stored_ds_budget_from_the_environment(monkeypatch, value, gib):
    if value is None:
        monkeypatch.delenv("S2_DS_BUFFER_GB", raising=False)
    else:
        monkeypatch.setenv("S2_DS_BUFFER_GB", value)
    if gib is None:
        with pytest.raises(ValueError, match="S2_DS_BUFFER_GB.*0 to recompute"):
            kernel.stored_ds_budget()
    else:
        assert kernel.stored_ds_budget() == int(gib * 2**30)
    monkeypatch.setattr(kernel, "STORED_DS_BYTES", 12345)  # the module setting wins
    assert kernel.stored_ds_budget() == 12345


def test_fast_mode_at_head_dim_256_is_exact(monkeypatch):
    """Head dim 256 has its own fused (atomic dQ) config list, with dQ's product in the direct form:
    the fast mode there must run the fused kernel, and be exact."""
    monkeypatch.setattr(attention, "DETERMINISTIC_BY_DEFAULT", False)
    launches = spy_launches(monkeypatch, "_fused", "_dkdv", "_dq")
    for block, seq in ((64, 200), (16, 40)):  # query steps 32 and 16
        q, k, v = draw((1, seq, 2, 256), (1, seq, 1, 256), (1, seq, 1, 256), seed=23)
        compare(S2Pattern(block_size=block, local_blocks=1, vert_stride=2), q, k, v, seed=24)
    assert [name for name, _ in launches] == ["_fused", "_fused"]


@pytest.mark.parametrize("split", [True, False], ids=["per_head", "per_group"])
def test_gqa_key_programs_per_head_or_per_group(monkeypatch, backward_mode, split):
    """Both ways of serving a GQA group in the dK/dV pass compute the same gradients."""
    monkeypatch.setattr(kernel, "SPLIT_HEADS", {"fast": split, "deterministic": split})
    launches = spy_launches(monkeypatch, "_fused", "_dkdv")
    pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=3, head_pattern="kv_group")
    q, k, v = draw((1, 50, 6, 32), (1, 50, 2, 32), (1, 50, 2, 32), seed=34)
    compare(pattern, q, k, v, seed=35)
    layout = kernel.kernel_layout(get_layout(pattern, 6, 2, 50), 32, 3)
    assert torch.equal(launches[0][1]["ORDER"], (layout.k_work_per_head if split else layout.k_work_per_group).order)


@pytest.mark.parametrize("heads,kv_heads,head_pattern", [(4, 4, "heterogeneous"), (8, 2, "heterogeneous"),
                                                         (8, 2, "kv_group")])
def test_key_works_run_every_program_once_heaviest_first(heads, kv_heads, head_pattern):
    """Every (head, key tile) exactly once, heaviest first: in programs per query head (cost: its
    list entries), per GQA group (the entries of the group's heads), and per group except where that
    exceeds the group's longest single-head program (those per head); with each group's item count
    and longest program."""
    group = heads // kv_heads
    pattern = S2Pattern(block_size=64, local_blocks=2, vert_stride=4, head_pattern=head_pattern)
    kl = kernel.kernel_layout(get_layout(pattern, heads, kv_heads, 40 * 64), 128, group)
    tiles = kl.k_tiles.num_tiles
    per_head = (kl.k_tiles.ptr[1:] - kl.k_tiles.ptr[:-1]).long().view(kv_heads, group, tiles)
    per_group = per_head.sum(1)
    head_longest = per_head.flatten(1).max(1).values
    expected_split = {"per_head": torch.ones_like(per_group, dtype=torch.bool),
                      "per_group": torch.zeros_like(per_group, dtype=torch.bool),
                      "long_per_head": per_group > head_longest[:, None]}
    for name, by_head in expected_split.items():
        work = getattr(kl, f"k_work_{name}")
        seen = torch.zeros(kv_heads, group, tiles, dtype=torch.long)
        costs, group_of = [], []
        for w in work.order.tolist():
            if w >= 0:
                kv_head, tile = divmod(w, tiles)
                assert not by_head[kv_head, tile]
                seen[kv_head, :, tile] += 1
                costs.append(int(per_group[kv_head, tile]))
            else:
                head, tile = divmod(~w, tiles)
                kv_head = head // group
                assert by_head[kv_head, tile]
                seen[kv_head, head % group, tile] += 1
                costs.append(int(per_head[kv_head, head % group, tile]))
            group_of.append(kv_head)
        assert (seen == 1).all()
        assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1]
        assert work.items_per_group == tuple(group_of.count(g) for g in range(kv_heads))
        assert work.order_groups.tolist() == group_of
        assert work.longest_per_group == tuple(max(c for c, g in zip(costs, group_of) if g == kv_head)
                                               for kv_head in range(kv_heads))
        split = torch.nonzero(by_head.flatten()).flatten().tolist()
        assert (work.split is None and not split) or work.split.tolist() == split
    if head_pattern == "kv_group":  # stripe tiles: a group's program is 4 heads' long lists
        assert kl.k_work_long_per_head.split is not None
        assert max(kl.k_work_long_per_head.longest_per_group) == max(kl.k_work_per_head.longest_per_group)


def test_tile_lists_are_cached(monkeypatch):
    pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=3)
    q, k, v = draw((1, 40, 2, 32), (1, 40, 2, 32), (1, 40, 2, 32), seed=21)
    s2_attention(q, k, v, pattern)
    calls = []
    real = kernel._merge_lists
    monkeypatch.setattr(kernel, "_merge_lists", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    s2_attention(q, k, v, pattern)
    assert not calls


def test_key_tiles_pair_units_with_alike_lists():
    """dK/dV tiles hold each key unit exactly once per KV head, and pair stripe units with stripe
    units of the same head (else a tile computes a stripe's long query list for both units)."""
    pattern = S2Pattern(block_size=64, local_blocks=2, vert_stride=4)
    heads, kv_heads, units = 8, 2, 40
    layout = get_layout(pattern, heads, kv_heads, units * 64)
    tiles = kernel.kernel_layout(layout, 128, heads // kv_heads).k_tiles
    for g in range(kv_heads):
        slots = [u for u in tiles.units[g].flatten().tolist() if u >= 0]
        assert sorted(slots) == list(range(units))
    offsets = pattern.head_offsets(heads, kv_heads)
    for g in range(kv_heads):
        for a, b in tiles.units[g].tolist():
            if min(a, b) < 0:
                continue  # one unit of its kind left over
            for h in range(g * 4, g * 4 + 4):
                stripe = [(u + offsets[h]) % 4 == 0 and u < units - 2 for u in (a, b)]
                assert stripe[0] == stripe[1], (g, a, b, h)


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=3)
    q, k, v = draw((1, 40, 2, 32), (1, 40, 2, 32), (1, 40, 2, 32), seed=22)
    assert torch.equal(s2_attention(q, k, v, pattern), s2_attention_reference(q, k, v, pattern))
    # The fallback checks packed arguments as the kernel path does.
    packed = [t[0] for t in (q, k, v)]
    with pytest.raises(ValueError, match="int32"):
        s2_attention(*packed, pattern, cu_seqlens_q=torch.tensor([0, 15, 40]))


def test_bfloat16_on_the_interpreter_takes_the_reference_path(backward_mode):
    """Triton's interpreter multiplies bf16 matrices wrongly, so bf16 CPU calls take the reference
    path even when it runs: out, lse and gradients within bf16 rounding of float64."""
    pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=2)
    q, k, v = draw((1, 96, 4, 32), (1, 96, 2, 32), (1, 96, 2, 32), seed=31)
    grad_out, grad_lse = draw((1, 96, 4, 32), (1, 4, 96), seed=32)
    got = run(lambda *a, **kw: s2_attention(*a, pattern, **kw), q, k, v, grad_out, grad_lse, torch.bfloat16)
    want = run(lambda *a, **kw: s2_attention_reference(*a, pattern, **kw), q, k, v, grad_out, grad_lse,
               torch.float64)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        err = (g.double() - w).abs().max().item()
        assert err < 0.05 * max(1.0, w.abs().max().item()), f"{name}: max error {err:.2e}"


PATTERN = S2Pattern(block_size=16, local_blocks=2, vert_stride=3)
Q, K, V = draw((1, 32, 4, 32), (1, 32, 2, 32), (1, 32, 2, 32), seed=23)
CU = torch.tensor([0, 10, 32], dtype=torch.int32)
BAD_INPUTS = [
    (dict(q=Q.half(), k=K, v=V), TypeError, "one dtype"),
    (dict(q=Q.long()), TypeError, "supports float16"),
    (dict(q=Q[0]), ValueError, r"\[batch, seq, heads, dim\]"),
    (dict(v=V[:, :16]), ValueError, "same shape"),
    (dict(q=Q[:, :, :3]), ValueError, "multiple of 2 KV heads"),
    (dict(q=Q[..., :24], k=K[..., :24], v=V[..., :24]), ValueError, "head dim 24"),
    (dict(k=K[..., :16], v=V[..., :16]), ValueError, "different head dims"),
    (dict(q_start=8), ValueError, "multiple of block_size"),
    (dict(q_start=16), ValueError, "must cover the query positions"),
    (dict(num_q_heads=8, num_kv_heads=2), ValueError, "GQA ratios"),
    (dict(head_start=2, num_q_heads=4, num_kv_heads=2), Exception, "head"),
    (dict(q=Q[0], k=K[0], v=V[0], cu_seqlens_q=CU.long()), ValueError, "int32"),
    (dict(q=Q[0], k=K[0], v=V[0], cu_seqlens_q=CU, cu_seqlens_k=torch.tensor([0, 16, 32], dtype=torch.int32)),
     ValueError, "self-attention"),
    (dict(q=Q[0], k=K[0], v=V[0], cu_seqlens_q=CU, q_start=16), ValueError, "packed"),
]


@pytest.mark.parametrize("overrides,error,message", BAD_INPUTS)
def test_input_errors(overrides, error, message):
    args = dict(q=Q, k=K, v=V)
    args.update(overrides)
    with pytest.raises(error, match=message):
        s2_attention(args.pop("q"), args.pop("k"), args.pop("v"), PATTERN, **args)


@pytest.mark.parametrize("pack,block,kv_heads,rows", [
    (True, 16, 2, (4, 32)), (True, 16, 1, (8, 16)), (True, 64, 2, (4, 32)), (False, 16, 2, (1, 128))],
    ids=["packed_group4", "packed_group8", "packed_two_programs_per_unit", "one_head"])
def test_gqa_packing(monkeypatch, backward_mode, pack, block, kv_heads, rows):
    """Forward and dQ programs stack the query heads of a KV group (kv_group heads share their
    lists) in their 128 rows, ``128 / group`` positions per head (with 64-token units, two programs
    per unit), or serve one head: same function."""
    monkeypatch.setattr(kernel, "PACK_GQA", pack)
    pattern = S2Pattern(block_size=block, local_blocks=2, vert_stride=3, head_pattern="kv_group")
    seq = 40 if block == 16 else 230
    q, k, v = draw((1, seq, 8, 32), (1, seq, kv_heads, 32), (1, seq, kv_heads, 32), seed=36)
    kl = kernel.kernel_layout(get_layout(pattern, 8, kv_heads, seq), 32, 8 // kv_heads)
    assert (kl.dq_tiling.pack, kl.dq_tiling.positions) == rows
    assert kl.forward_tiling is kl.dq_tiling  # head dim 32: both passes take 128-row tiles
    compare(pattern, q, k, v, seed=37)


@pytest.mark.parametrize("name", ["block64_two_unit_tiles", "gqa_kv_group_ragged", "block32_head_dim64"])
def test_forward_tiles_of_other_rows_than_the_dq_tiles(monkeypatch, backward_mode, name):
    """The forward's query tiles (FORWARD_TILE_ROWS: one 64-token unit at head dim 128) may have
    other rows than the dQ pass's (DQ_TILE_ROWS), whose tiles the stored dS is indexed by: the
    same function, with GQA packing and with 16- or 32-token units too."""
    monkeypatch.setattr(kernel, "FORWARD_TILE_ROWS", {**kernel.FORWARD_TILE_ROWS, 64: 64})
    params, batch, seq, heads, kv_heads, dim = CASES[name]
    layout = kernel.kernel_layout(get_layout(S2Pattern(**params), heads, kv_heads, seq), dim, heads // kv_heads)
    forward, dq = layout.forward_tiling, layout.dq_tiling
    assert forward.pack * forward.positions == 64 and dq.pack * dq.positions == 128
    assert forward.tiles.num_tiles != dq.tiles.num_tiles or forward.pack != dq.pack
    q, k, v = draw((batch, seq, heads, dim), (batch, seq, kv_heads, dim), (batch, seq, kv_heads, dim), seed=70)
    compare(S2Pattern(**params), q, k, v, seed=71)


def test_heads_share_lists_only_in_kv_groups_that_read_the_same_blocks():
    def shares(group, **kw):
        return kernel._group_shares_lists(get_layout(S2Pattern(block_size=16, local_blocks=2, vert_stride=4, **kw),
                                                     8, 8 // group, 200), group)

    assert shares(4, head_pattern="kv_group") and shares(8, head_pattern="homogeneous")
    assert not shares(4) and not shares(4, head_pattern="homogeneous", num_dense_heads=1)


@pytest.mark.parametrize("step", [1, 2])
@pytest.mark.parametrize("tma", [True, False], ids=["descriptors", "pointers"])
@pytest.mark.parametrize("name", ["block64_two_unit_tiles", "gqa_kv_group_ragged", "block32_head_dim64"])
def test_descriptor_and_pointer_loads(monkeypatch, backward_mode, name, tma, step):
    """The inner loops load through tensor descriptors (kernel.TMA_LOADS and TMA_KEY_PASS; the
    interpreter emulates them) or through per-element pointers (older GPUs, misaligned tensors):
    both compute the same function, one or two key units per forward and dQ step, ragged ends."""
    monkeypatch.setattr(kernel, "TMA_LOADS", tma)
    monkeypatch.setattr(kernel, "TMA_KEY_PASS", tma)
    for launcher in (kernel._fwd, kernel._dq):
        lists = [sorted(configs, key=lambda c: c.kwargs["STEP"] != step) for configs in launcher.config_lists]
        monkeypatch.setattr(launcher, "config_lists", lists)
    params, batch, seq, heads, kv_heads, dim = CASES[name]
    q, k, v = draw((batch, seq, heads, dim), (batch, seq, kv_heads, dim), (batch, seq, kv_heads, dim), seed=38)
    assert kernel.use_tma(k, v) == tma
    layout = kernel.kernel_layout(get_layout(S2Pattern(**params), heads, kv_heads, seq), dim, heads // kv_heads)
    assert layout.forward_tiling.tiles.nfull.sum() > 0  # the unmasked loop has work
    compare(S2Pattern(**params), q, k, v, seed=39)


def test_misaligned_heads_fall_back_to_pointer_loads():
    """A head stride that breaks TMA's 16-byte alignment (heads of 6 float32 values) must not reach
    the descriptors."""
    assert not kernel.use_tma(*[torch.randn(1, 40, 2, 6)] * 2)
    assert kernel.use_tma(*[torch.randn(1, 40, 2, 8)] * 2)


@pytest.mark.parametrize("dim,mode", [(64, "_fused"), (128, "_dkdv")])
def test_default_backward_mode_is_the_faster_one_for_the_head_dim(monkeypatch, dim, mode):
    """deterministic=None runs the fast backward up to attention.FAST_BACKWARD_MAX_HEAD_DIM and the
    deterministic one above it (measured on an H200); exact either way."""
    monkeypatch.setattr(attention, "DETERMINISTIC_BY_DEFAULT", None)
    launches = spy_launches(monkeypatch, "_fused", "_dkdv")
    q, k, v = draw((1, 40, 2, dim), (1, 40, 2, dim), (1, 40, 2, dim), seed=41)
    compare(S2Pattern(block_size=16, local_blocks=1, vert_stride=2), q, k, v, seed=42)
    assert [name for name, _ in launches] == [mode]
