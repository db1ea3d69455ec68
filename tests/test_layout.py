"""Patterns and layouts against the S2 formula written out by hand, head by head, block by block."""

import dataclasses
import math

import pytest
import torch

from megatron_s2 import BlockMaskPattern, S2ConfigError, S2CoverageError, S2Pattern, get_layout, s2_block_mask
from megatron_s2.ops.layout import clear_layout_cache
from megatron_s2.ops.reference import s2_attention_reference


def formula_mask(num_q_heads, num_kv_heads, q_blocks, k_blocks, *, block_size, local_blocks, vert_stride,
                 head_pattern="heterogeneous", step=None, offset=0, num_dense_heads=0,
                 head_start=0, num_local_heads=None, q_block_start=0, k_block_start=0):
    """docs/semantics.md's rule, one (head, qb, kb) at a time."""
    groups = {"heterogeneous": num_q_heads, "kv_group": num_kv_heads, "homogeneous": 1}[head_pattern]
    if step is None:
        step = max(1, vert_stride // groups)
    num_local_heads = num_q_heads - head_start if num_local_heads is None else num_local_heads
    mask = torch.zeros(num_local_heads, q_blocks, k_blocks, dtype=torch.bool)
    for h in range(num_local_heads):
        head = head_start + h
        g = {"heterogeneous": head, "kv_group": head // (num_q_heads // num_kv_heads), "homogeneous": 0}[head_pattern]
        dense = head >= num_q_heads - num_dense_heads
        for i in range(q_blocks):
            qb = q_block_start + i
            for j in range(k_blocks):
                kb = k_block_start + j
                if kb > qb:
                    continue
                stripe = vert_stride > 0 and (kb + g * step + offset) % vert_stride == 0  # 0: window-only
                mask[h, i, j] = dense or qb - kb < local_blocks or stripe
    return mask


def lists_to_mask(ptr, idx, rows, cols):
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        mask[r, idx[ptr[r]:ptr[r + 1]].long()] = True
    return mask


CASES = [
    dict(num_q_heads=8, num_kv_heads=8, head_pattern="heterogeneous", local_blocks=3, vert_stride=4),
    dict(num_q_heads=8, num_kv_heads=2, head_pattern="kv_group", local_blocks=2, vert_stride=2),
    dict(num_q_heads=4, num_kv_heads=1, head_pattern="homogeneous", local_blocks=1, vert_stride=3),
    dict(num_q_heads=6, num_kv_heads=3, head_pattern="heterogeneous", local_blocks=2, vert_stride=5,
         step=2, offset=1, num_dense_heads=2),
    dict(num_q_heads=4, num_kv_heads=4, head_pattern="heterogeneous", local_blocks=1, vert_stride=1),
    dict(num_q_heads=8, num_kv_heads=2, head_pattern="kv_group", local_blocks=3, vert_stride=0),
    dict(num_q_heads=4, num_kv_heads=4, head_pattern="heterogeneous", local_blocks=1, vert_stride=0,
         num_dense_heads=1),
]


def make_pattern(case, block_size):
    return S2Pattern(block_size=block_size, local_blocks=case["local_blocks"], vert_stride=case["vert_stride"],
                     head_pattern=case["head_pattern"], head_sliding_step=case.get("step"),
                     head_sliding_offset=case.get("offset", 0), num_dense_heads=case.get("num_dense_heads", 0))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("q_len,kv_len,q_start,k_start,head_start,num_local", [
    (200, None, 0, 0, 0, None),        # whole sequence, length not a block multiple
    (48, 112, 64, 0, 0, None),         # CP chunk: queries at an offset, keys from the start
    (40, 40, 96, 96, 0, None),         # a chunk attending only to itself
    (160, None, 0, 0, 2, 2),           # TP slice of two heads
])
def test_block_mask_and_lists_match_formula(case, q_len, kv_len, q_start, k_start, head_start, num_local):
    block = 16
    pattern = make_pattern(case, block)
    hq, hkv = case["num_q_heads"], case["num_kv_heads"]
    kv = q_len if kv_len is None else kv_len
    expected = formula_mask(hq, hkv, math.ceil(q_len / block), math.ceil(kv / block), block_size=block,
                            local_blocks=case["local_blocks"], vert_stride=case["vert_stride"],
                            head_pattern=case["head_pattern"], step=case.get("step"), offset=case.get("offset", 0),
                            num_dense_heads=case.get("num_dense_heads", 0), head_start=head_start,
                            num_local_heads=num_local, q_block_start=q_start // block, k_block_start=k_start // block)
    kw = dict(head_start=head_start, num_local_heads=num_local, q_start=q_start, k_start=k_start)
    assert torch.equal(s2_block_mask(pattern, hq, hkv, q_len, kv_len, **kw), expected)

    layout = get_layout(pattern, hq, hkv, q_len, kv_len, **kw)
    heads, nq, nk = expected.shape
    q2k = lists_to_mask(layout.q2k_ptr, layout.q2k_idx, heads * nq, nk).view(heads, nq, nk)
    k2q = lists_to_mask(layout.k2q_ptr, layout.k2q_idx, heads * nk, nq).view(heads, nk, nq)
    assert torch.equal(q2k, expected)
    assert torch.equal(k2q.transpose(1, 2), expected)
    for ptr, idx in ((layout.q2k_ptr, layout.q2k_idx), (layout.k2q_ptr, layout.k2q_idx)):
        for r in range(ptr.numel() - 1):
            row = idx[ptr[r]:ptr[r + 1]]
            assert torch.all(row[1:] > row[:-1]), "lists must be strictly ascending"
    assert layout.nnz == int(expected.sum())
    assert layout.max_q2k == int(expected.sum(-1).max())
    assert layout.max_k2q == int(expected.sum(-2).max())
    assert layout.q2k_idx.dtype == torch.int32


def test_tp_slices_are_slices_of_the_full_mask():
    pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=16)
    full = s2_block_mask(pattern, 16, 4, 300)
    for tp in (2, 4):
        per_rank = 16 // tp
        for rank in range(tp):
            local = s2_block_mask(pattern, 16, 4, 300, head_start=rank * per_rank, num_local_heads=per_rank)
            assert torch.equal(local, full[rank * per_rank:(rank + 1) * per_rank])
    # Local head indices would repeat the first ranks' offsets: the slices must differ from that.
    wrong = s2_block_mask(pattern, 16, 4, 300, head_start=0, num_local_heads=8)
    assert not torch.equal(wrong, full[8:])


def test_cp_chunk_is_a_block_of_the_full_mask():
    pattern = S2Pattern(block_size=16, local_blocks=3, vert_stride=4)
    full = s2_block_mask(pattern, 4, 4, 256)
    chunk = s2_block_mask(pattern, 4, 4, 64, 192, q_start=128, k_start=0)
    assert torch.equal(chunk, full[:, 8:12, :12])


def test_presets_reproduce_published_formulas():
    # DKernel: step from the number of query heads, offset 0, even when heads share per KV group.
    hq, hkv, vs = 8, 2, 16
    dk = S2Pattern.dkernel(hq, block_size=16, local_blocks=2, vert_stride=vs, head_pattern="kv_group")
    assert dk.head_sliding_step == max(1, vs // hq)
    assert dk.head_offsets(hq, hkv) == [(h // 4) * 2 for h in range(hq)]
    # Phi-3-small / vLLM: (kb + h * step + 1) % vert_stride == 0, step = max(1, V // heads).
    phi = S2Pattern.phi3_small()
    assert (phi.block_size, phi.local_blocks, phi.vert_stride) == (64, 16, 8)
    mask = s2_block_mask(phi, 32, 8, 64 * 40)
    for h in (0, 5, 31):
        for qb in (20, 39):
            for kb in range(qb + 1):
                want = qb - kb < 16 or (kb + h * 1 + 1) % 8 == 0
                assert bool(mask[h, qb, kb]) == want


def test_coverage_error_names_missing_residues():
    pattern = S2Pattern(vert_stride=16, head_pattern="kv_group")
    with pytest.raises(S2CoverageError) as err:
        pattern.check_coverage(32, 8)
    # 8 groups, step 2: offsets 0,2,..,14 read residues 0,14,12,..,2; odd residues are missing.
    assert str([1, 3, 5, 7, 9, 11, 13, 15]) in str(err.value)
    S2Pattern(vert_stride=16).check_coverage(32, 8)  # heterogeneous covers all 16
    pattern.check_coverage(32, 8, seq_len=16 * 64)  # fits in the local window
    S2Pattern(vert_stride=16, head_pattern="homogeneous", num_dense_heads=1).check_coverage(32, 8)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(block_size=48), "power of two"),
    (dict(block_size=8), "block_size"),
    (dict(local_blocks=0), "local_blocks"),
    (dict(vert_stride=-1), "vert_stride"),
    (dict(head_pattern="random"), "head_pattern"),
    (dict(num_dense_heads=-1), "num_dense_heads"),
])
def test_bad_patterns_are_refused(kwargs, fragment):
    with pytest.raises(S2ConfigError, match=fragment):
        S2Pattern(**kwargs)


def test_bad_layout_arguments_are_refused():
    pattern = S2Pattern(block_size=16)
    with pytest.raises(S2ConfigError, match="q_start"):
        s2_block_mask(pattern, 4, 4, 32, q_start=8)
    with pytest.raises(S2ConfigError, match="head_start"):
        s2_block_mask(pattern, 4, 4, 32, head_start=3, num_local_heads=2)
    with pytest.raises(S2ConfigError, match="multiple"):
        s2_block_mask(pattern, 6, 4, 32)
    with pytest.raises(S2ConfigError, match="num_dense_heads"):
        s2_block_mask(S2Pattern(block_size=16, num_dense_heads=5), 4, 4, 32)
    with pytest.raises(S2ConfigError, match="diagonal"):
        BlockMaskPattern(torch.zeros(2, 3, 3, dtype=torch.bool), 16)


def test_explicit_block_mask_pattern():
    torch.manual_seed(0)
    mask = torch.rand(4, 6, 6) < 0.4
    mask |= torch.eye(6, dtype=torch.bool)
    pattern = BlockMaskPattern(mask, 16)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(s2_block_mask(pattern, 4, 2, 90), mask & causal)
    layout = get_layout(pattern, 4, 2, 90, head_start=2, num_local_heads=2)
    assert torch.equal(layout.to_block_mask(), (mask & causal)[2:])
    with pytest.raises(S2ConfigError, match="larger mask"):
        s2_block_mask(pattern, 4, 2, 200)


def test_layout_cache_hits_and_keys_on_block_counts():
    clear_layout_cache()
    pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=4)
    first = get_layout(pattern, 4, 4, 100)
    assert get_layout(pattern, 4, 4, 100) is first
    assert get_layout(pattern, 4, 4, 97) is first  # same number of blocks
    assert get_layout(pattern, 4, 4, 129) is not first
    assert get_layout(pattern, 4, 4, 100, head_start=2, num_local_heads=2) is not first


def test_reference_matches_per_query_softmax():
    """The reference itself, against attention written one query at a time from the formula."""
    torch.manual_seed(1)
    block, hq, hkv, seq, dim = 16, 4, 2, 70, 8
    pattern = S2Pattern(block_size=block, local_blocks=1, vert_stride=2)
    q = torch.randn(1, seq, hq, dim, dtype=torch.float64)
    k = torch.randn(1, seq, hkv, dim, dtype=torch.float64)
    v = torch.randn(1, seq, hkv, dim, dtype=torch.float64)
    out, lse = s2_attention_reference(q, k, v, pattern, softmax_scale=0.3, return_lse=True)
    blocks = formula_mask(hq, hkv, 5, 5, block_size=block, local_blocks=1, vert_stride=2)
    for h in range(hq):
        for i in range(seq):
            keys = [j for j in range(i + 1) if blocks[h, i // block, j // block]]
            s = torch.stack([q[0, i, h] @ k[0, j, h // 2] for j in keys]) * 0.3
            p = torch.softmax(s, 0)
            want = sum(p[n] * v[0, j, h // 2] for n, j in enumerate(keys))
            torch.testing.assert_close(out[0, i, h], want)
            torch.testing.assert_close(lse[0, h, i].double(), torch.logsumexp(s, 0), rtol=1e-6, atol=1e-6)


# -- window-only (vert_stride 0) ---------------------------------------------------------------


def test_window_preset_is_the_band_of_local_blocks():
    pattern = S2Pattern.window(block_size=16, local_blocks=3)
    assert pattern == S2Pattern(block_size=16, local_blocks=3, vert_stride=0)
    assert pattern.is_window and not pattern.is_dense and pattern.window_tokens == 48
    assert not S2Pattern(vert_stride=1).is_window and S2Pattern(vert_stride=1).is_dense
    mask = s2_block_mask(pattern, 2, 1, 16 * 10)
    band = torch.tensor([[0 <= qb - kb < 3 for kb in range(10)] for qb in range(10)])
    assert torch.equal(mask, band.expand(2, 10, 10))


def test_window_coverage_is_reported_not_refused():
    pattern = S2Pattern.window(block_size=64, local_blocks=16)
    pattern.check_coverage(8, 8, seq_len=8192)  # asked for explicitly: no error
    assert not pattern.covers(8, 8, seq_len=8192) and not pattern.covers(8, 8)
    assert pattern.missing_residues(8, 8) == []  # no stripes, no residues
    notice = pattern.coverage_notice(8192)
    assert "only the last 1024 tokens" in notice and "8192-token context" in notice and "not covered" in notice
    # Inside the window, or with a dense head, the layer covers the context: nothing to report.
    assert pattern.covers(8, 8, seq_len=1024) and pattern.coverage_notice(1024) is None
    with_dense = S2Pattern.window(block_size=64, local_blocks=16, num_dense_heads=1)
    assert with_dense.covers(8, 8) and with_dense.coverage_notice(8192) is None


@pytest.mark.parametrize("seq_len", [96, 100])  # 100: a ragged last block
def test_window_flops_count_the_window_pairs(seq_len):
    from megatron_s2.ops import flops

    block, local, heads = 16, 2, 3
    # A query q in block qb reads keys from the first token of block qb - local + 1 up to itself.
    per_head = sum(q - max(0, (q // block - local + 1) * block) + 1 for q in range(seq_len))
    assert flops.attended_pairs(S2Pattern.window(block, local), heads, heads, seq_len) == heads * per_head


# -- the coverage error suggests fixes for this pattern (issue 14) -------------------------------


def _coverage_fix_text(pattern, heads, kv_heads):
    with pytest.raises(S2CoverageError) as err:
        pattern.check_coverage(heads, kv_heads)
    return str(err.value).split("Fix (any one):")[1]


def test_coverage_fixes_of_a_heterogeneous_pattern_are_concrete():
    # 8 heads, stride 16: step 2 reads only even residues; no step can spread 8 groups over 16.
    pattern = S2Pattern(vert_stride=16)
    fixes = _coverage_fix_text(pattern, 8, 8)
    assert "heterogeneous" not in fixes  # it already is
    assert "head_sliding_step" not in fixes
    assert "vert_stride: 8 " in fixes and "--num-attention-heads 16)" in fixes and "num_dense_heads: 1" in fixes
    S2Pattern(vert_stride=8).check_coverage(8, 8)
    pattern.check_coverage(16, 8)
    # An explicit step that skips residues: step 1 is the fix.
    stepped = S2Pattern(vert_stride=16, head_sliding_step=2)
    fixes = _coverage_fix_text(stepped, 16, 4)
    assert "head_sliding_step: 1 " in fixes and "heterogeneous" not in fixes
    S2Pattern(vert_stride=16, head_sliding_step=1).check_coverage(16, 4)


def test_coverage_fixes_of_a_kv_group_pattern_name_heads_and_pattern():
    pattern = S2Pattern(vert_stride=16, head_pattern="kv_group")  # 8 KV groups read 8 of 16 residues
    fixes = _coverage_fix_text(pattern, 32, 8)
    assert "head_pattern: heterogeneous" in fixes and "vert_stride: 8 " in fixes
    assert "--num-query-groups 16)" in fixes
    dataclasses.replace(pattern, head_pattern="heterogeneous").check_coverage(32, 8)
    pattern.check_coverage(32, 16)
