"""``s2_attention``: the public entry point of the S2 kernel (validation, autograd, dispatch).

Arguments mirror FlashAttention's (``[batch, seq, heads, dim]``, ``softmax_scale``, ``cu_seqlens_*``,
``max_seqlen_*``). Layouts come from ``layout.get_layout`` and the kernel's tile lists from
``kernel.kernel_layout``, both cached, so a call with a known shape does no host work beyond
argument checks and never waits for the GPU (with packed input, pass ``max_seqlen_q`` and give
``cu_seqlens_k`` as None or the very tensor of ``cu_seqlens_q``: otherwise they are read back).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
from typing import Optional

import torch

from .layout import Pattern, Shard, get_layout, validate_layout_args
from .pattern import BlockMaskPattern, S2Pattern
from .reference import (
    merge_by_lse,
    s2_attention_reference,
    s2_attention_reference_backward,
    s2_attention_reference_grads,
)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_inputs(q, k, v, pattern, packed, head_start, num_q_heads, num_kv_heads, q_start, k_start) -> Shard:
    """Check one call's inputs; returns its ``Shard`` (head counts None: the local ones)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; s2_attention supports float16, bfloat16 and float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    rank = 3 if packed else 4
    form = "[tokens, heads, dim] (packed, with cu_seqlens)" if packed else "[batch, seq, heads, dim]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(f"{name} must be {form}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not packed and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k have different batch sizes: {q.shape[0]} and {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k have different head dims: {q.shape[-1]} and {k.shape[-1]}")
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if heads % kv_heads:
        raise ValueError(
            f"{heads} query heads are not a multiple of {kv_heads} KV heads: GQA needs whole groups"
        )
    if q.shape[-3] == 0 or k.shape[-3] == 0:
        raise ValueError("empty sequence: q and k need at least one token")
    num_q_heads = heads if num_q_heads is None else num_q_heads
    num_kv_heads = kv_heads if num_kv_heads is None else num_kv_heads
    # Local heads are whole KV groups, or (tensor parallelism with fewer KV groups than ranks) a
    # slice of one group whose KV head is replicated.
    same_ratio = num_q_heads * kv_heads == num_kv_heads * heads
    group = num_q_heads // num_kv_heads
    slice_of_one_group = kv_heads == 1 and num_q_heads % num_kv_heads == 0 and group % heads == 0
    if not (same_ratio or slice_of_one_group):
        raise ValueError(
            f"global heads {num_q_heads}/{num_kv_heads} and local heads {heads}/{kv_heads} have different "
            f"GQA ratios, and the local heads are not a slice of one KV group: pass the whole model's "
            f"num_q_heads and num_kv_heads"
        )
    validate_layout_args(pattern, num_q_heads, num_kv_heads, q.shape[-3], k.shape[-3], head_start, heads, q_start,
                         k_start)
    return Shard(num_q_heads, num_kv_heads, head_start, q_start, k_start)


def _check_key_range(q_len, kv_len, q_start, k_start):
    if k_start > q_start or q_start + q_len > k_start + kv_len:
        raise ValueError(
            f"the keys [{k_start}, {k_start + kv_len}) must cover the query positions "
            f"[{q_start}, {q_start + q_len}) so that every query sees itself: check q_start/k_start "
            f"and the key length, or pass return_lse=True to compute one part of a softmax split "
            f"by key ranges (rows without keys then give out 0 and lse -inf; merge parts by lse)"
        )


def _check_head_dim(q):
    from .kernel import SUPPORTED_HEAD_DIMS

    dim = q.shape[-1]
    if dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {dim} is not supported by the S2 kernel; use one of {SUPPORTED_HEAD_DIMS}")


def _check_packed(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_start, k_start):
    if cu_seqlens_q is None:
        raise ValueError("packed input needs cu_seqlens_q (cu_seqlens_k alone is not enough)")
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be a 1-D int32 tensor of sequence boundaries [0, ..., tokens]")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k hold different numbers of sequences")
    if cu_seqlens_k is not cu_seqlens_q and not torch.equal(cu_seqlens_q, cu_seqlens_k):
        raise ValueError(
            "packed S2 attention is self-attention: every sequence needs as many keys as queries "
            "(cu_seqlens_k must equal cu_seqlens_q; pass it as None or the same tensor)"
        )
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"packed q has {q.shape[0]} tokens but k has {k.shape[0]}")
    if q_start or k_start:
        raise ValueError("q_start/k_start must be 0 with packed sequences (positions restart at 0 in each)")
    if max_seqlen_q is None:  # costs one device sync; callers in a training loop pass it
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    if max_seqlen_k is not None and max_seqlen_k != max_seqlen_q:
        raise ValueError(f"max_seqlen_k={max_seqlen_k} differs from max_seqlen_q={max_seqlen_q}: packed S2 "
                         "attention is self-attention (pass the same value, or leave max_seqlen_k out)")
    if not isinstance(max_seqlen_q, (int, torch.SymInt)) or max_seqlen_q < 1:  # SymInt: under torch.compile
        raise ValueError(f"max_seqlen_q must be a positive int, got {max_seqlen_q!r}")
    return cu_seqlens_q, cu_seqlens_k, max_seqlen_q


def _uses_reference(q) -> bool:
    """CPU tensors take the PyTorch reference path, unless Triton's interpreter runs the kernel; bf16
    always does: the interpreter multiplies bf16 matrices wrongly (Triton 3.8: errors of order 1e10
    in a 16 x 16 product), while float16 and float32 are exact there."""
    return q.device.type == "cpu" and (not _interpreting() or q.dtype == torch.bfloat16)


def kernel_problem(q, k, pattern, shard: Shard, *, softmax_scale, packed=None):
    """The kernel's Problem for ``q [b, s, h, d]``, ``k [b, s_k, h_kv, d]``; packed input passes
    ``(num_seqs, longest, layout length, cu_seqlens)`` for its ``[1, tokens, h, d]`` views."""
    from . import kernel

    _check_head_dim(q)
    if packed is None:
        num_seqs, q_len, kv_len, cu_seqlens = q.shape[0], q.shape[1], k.shape[1], None
        layout_q_len, layout_k_len = q_len, kv_len
    else:
        num_seqs, q_len, layout_q_len, cu_seqlens = packed
        kv_len, layout_k_len = q_len, layout_q_len
    layout = get_layout(pattern, shard.num_q_heads, shard.num_kv_heads, layout_q_len, layout_k_len,
                        head_start=shard.head_start, num_local_heads=q.shape[-2], q_start=shard.q_start,
                        k_start=shard.k_start, device=q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return kernel.Problem(
        layout=kernel.kernel_layout(layout, q.shape[-1], q.shape[-2] // k.shape[-2]), num_seqs=num_seqs,
        len_q=q_len, len_k=kv_len, q_pos0=shard.q_start, k_pos0=shard.k_start, sm_scale=scale, cu_q=cu_seqlens,
        cu_k=cu_seqlens,
    )


def kernel_forward(q, k, v, problem, out=None, lse=None, resume=False):
    """``kernel.forward`` (arguments and results as there) by the fastest kernel that serves the call:
    ``kernel_hopper``'s Gluon forward where it applies (Hopper, head dim 128, 16k tokens or more, the
    Triton release it was checked with), else kernel.py's Triton forward."""
    from . import kernel

    hopper = _hopper_kernel()
    forward = hopper.forward if hopper is not None and hopper.applies(q, k, v, problem) else kernel.forward
    return forward(q, k, v, problem, out, lse, resume)


@functools.cache
def _hopper_kernel():
    """``kernel_hopper``, or None with a Triton that has no Gluon language for Hopper."""
    try:
        from . import kernel_hopper
    except ImportError:
        return None
    return kernel_hopper


def _last_dim_contiguous(*tensors):
    """The kernels address rows through strides but need each row's head dim contiguous."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


# The backward mode when the caller does not choose (deterministic=None). None: the faster one for
# the head dim, as measured on an H200 (BENCHMARKS.md): the fast backward (dQ added in the dK/dV pass)
# up to FAST_BACKWARD_MAX_HEAD_DIM (head dim 64: forward+backward 5% faster at 32k), the deterministic
# one (a dQ pass over stored dS) above it (head dim 128: 14-15% faster at 32k and 128k). True or False fix
# the mode for every head dim. Here, not in kernel.py, so that CPU calls never import Triton.
DETERMINISTIC_BY_DEFAULT: Optional[bool] = None
FAST_BACKWARD_MAX_HEAD_DIM = 64


def _deterministic(deterministic: Optional[bool], head_dim: int) -> bool:
    if deterministic is not None:
        return bool(deterministic)
    if DETERMINISTIC_BY_DEFAULT is not None:
        return DETERMINISTIC_BY_DEFAULT
    return head_dim > FAST_BACKWARD_MAX_HEAD_DIM


# torch.compile: the forward and backward are registered custom ops with fake implementations, so
# Dynamo traces ``s2_attention`` into one graph (fullgraph=True) and treats the kernel as opaque.
# Op arguments must be tensors or scalars: the pattern travels as its fields (an S2Pattern) or its
# mask tensor (a BlockMaskPattern) and is rebuilt inside the op; layouts stay cached by value.
# Every S2Pattern field but head_pattern is an int >= 0 or None (sent as -1), so new fields travel too.
_INT_FIELDS = tuple(f.name for f in dataclasses.fields(S2Pattern) if f.name != "head_pattern")


def _pattern_fields(pattern: Pattern):
    """``(ints, head_pattern, mask)``: the op arguments that name ``pattern``."""
    if isinstance(pattern, BlockMaskPattern):
        return [pattern.block_size], "", pattern.mask
    values = (getattr(pattern, name) for name in _INT_FIELDS)
    return [-1 if value is None else value for value in values], pattern.head_pattern, None


# Patterns rebuilt from op arguments, most recent last, so that every call of a layer gets the same
# object back (no re-validation; a BlockMaskPattern's cached layout is found by identity). Bounded
# like the layout cache: a caller with a new mask per batch must not hold every mask forever.
_rebuilt_patterns: "collections.OrderedDict[tuple, Pattern]" = collections.OrderedDict()
_REBUILT_PATTERNS = 128


def _pattern_from_fields(ints, head_pattern, mask) -> Pattern:
    key = (tuple(ints), head_pattern, None if mask is None else id(mask))
    pattern = _rebuilt_patterns.get(key)
    if pattern is None or (mask is not None and pattern.mask is not mask):
        if mask is None:
            values = (None if value == -1 else value for value in ints)
            pattern = S2Pattern(head_pattern=head_pattern, **dict(zip(_INT_FIELDS, values)))
        else:
            pattern = BlockMaskPattern(mask, block_size=ints[0])
        _rebuilt_patterns[key] = pattern
        if len(_rebuilt_patterns) > _REBUILT_PATTERNS:
            _rebuilt_patterns.popitem(last=False)
    _rebuilt_patterns.move_to_end(key)
    return pattern


def _op_options(cu_seqlens, pattern_ints, head_pattern, block_mask, softmax_scale, head_start, num_q_heads,
                num_kv_heads, q_start, k_start, max_seqlen):
    """The pattern and the keyword options of ``_problem`` / ``_reference_4d``, from op arguments."""
    return _pattern_from_fields(pattern_ints, head_pattern, block_mask), dict(
        softmax_scale=softmax_scale, head_start=head_start, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
        q_start=q_start, k_start=k_start, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def _reference_4d(reference, tensors, pattern, *, cu_seqlens, max_seqlen, **options):
    """A reference function on the op's 4-D views (packed input is ``[1, tokens, heads, dim]``)."""
    if cu_seqlens is None:
        return reference(*tensors, pattern, **options)
    results = reference(*(t[0] for t in tensors), pattern, cu_seqlens_q=cu_seqlens, **options)
    return tuple(r[None] for r in results)


def _problem(q, k, pattern, *, cu_seqlens, max_seqlen, softmax_scale, head_start, num_q_heads, num_kv_heads,
             q_start, k_start):
    packed = None
    if cu_seqlens is not None:
        # The layout of a longer length serves every shorter sequence: round up so that batches
        # with different longest sequences share a few cached layouts.
        layout_len = max_seqlen if isinstance(pattern, BlockMaskPattern) else max(
            16 * pattern.block_size, 1 << (max_seqlen - 1).bit_length())
        packed = (cu_seqlens.numel() - 1, max_seqlen, layout_len, cu_seqlens)
    shard = Shard(num_q_heads, num_kv_heads, head_start, q_start, k_start)
    return kernel_problem(q, k, pattern, shard, softmax_scale=softmax_scale, packed=packed)


@torch.library.custom_op("megatron_s2::s2_attention_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                pattern_ints: list[int], head_pattern: str, block_mask: Optional[torch.Tensor],
                softmax_scale: float, head_start: int, num_q_heads: int, num_kv_heads: int, q_start: int,
                k_start: int, max_seqlen: int, return_lse: bool,
                deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of 4-D ``q, k, v`` (packed: ``[1, tokens, heads, dim]`` with ``cu_seqlens``)."""
    pattern, options = _op_options(cu_seqlens, pattern_ints, head_pattern, block_mask, softmax_scale,
                                   head_start, num_q_heads, num_kv_heads, q_start, k_start, max_seqlen)
    if _uses_reference(q):
        out, lse = _reference_4d(s2_attention_reference, (q, k, v), pattern, return_lse=True, **options)
        return out.contiguous(), lse.contiguous()  # the strides that the fake implementation promises
    return kernel_forward(q, k, v, _problem(q, k, pattern, **options))


@_forward_op.register_fake
def _(q, k, v, cu_seqlens, pattern_ints, head_pattern, block_mask, softmax_scale, head_start, num_q_heads,
      num_kv_heads, q_start, k_start, max_seqlen, return_lse, deterministic):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("megatron_s2::s2_attention_backward", mutates_args=())
def _backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, dlse: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                 pattern_ints: list[int], head_pattern: str, block_mask: Optional[torch.Tensor],
                 softmax_scale: float, head_start: int, num_q_heads: int, num_kv_heads: int, q_start: int,
                 k_start: int, max_seqlen: int,
                 deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of ``_forward_op`` given the gradients of ``out`` and (optionally) ``lse``."""
    pattern, options = _op_options(cu_seqlens, pattern_ints, head_pattern, block_mask, softmax_scale,
                                   head_start, num_q_heads, num_kv_heads, q_start, k_start, max_seqlen)
    if _uses_reference(q):
        dlse = torch.zeros_like(lse) if dlse is None else dlse
        grads = _reference_4d(s2_attention_reference_grads, (dout, dlse, q, k, v), pattern, **options)
        return tuple(g.contiguous() for g in grads)
    from . import kernel

    (dout,) = _last_dim_contiguous(dout)
    return kernel.backward(dout, q, k, v, out, lse, dlse, _problem(q, k, pattern, **options), deterministic)


@_backward_op.register_fake
def _(dout, q, k, v, out, lse, dlse, *static):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, pattern_ints, head_pattern, block_mask, *scalars, return_lse, deterministic = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens, block_mask)
    ctx.pattern = (pattern_ints, head_pattern)
    ctx.scalars = scalars
    ctx.return_lse = return_lse
    ctx.deterministic = deterministic
    ctx.num_inputs = len(inputs)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens, block_mask = ctx.saved_tensors
    # Autograd hands in zeros for an lse the caller never saw: leave its term out.
    dlse = dlse if ctx.return_lse else None
    dq, dk, dv = _backward_op(dout, q, k, v, out, lse, dlse, cu_seqlens, *ctx.pattern, block_mask, *ctx.scalars,
                              ctx.deterministic)
    return (dq, dk, dv) + (None,) * (ctx.num_inputs - 3)


torch.library.register_autograd("megatron_s2::s2_attention_forward", _backward, setup_context=_setup_context)


def s2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    *,
    softmax_scale: Optional[float] = None,
    head_start: int = 0,
    num_q_heads: Optional[int] = None,
    num_kv_heads: Optional[int] = None,
    q_start: int = 0,
    k_start: int = 0,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    return_lse: bool = False,
    deterministic: Optional[bool] = None,
):
    """S2 attention: causal attention restricted to the blocks of ``pattern``.

    ``q [batch, seq, heads, dim]`` (or ``[tokens, heads, dim]`` with ``cu_seqlens_*``), ``k, v
    [batch, seq_k, kv_heads, dim]``; local query head ``h`` reads KV head ``h // (heads // kv_heads)``.
    ``num_q_heads``/``num_kv_heads`` are the model's global head counts and ``head_start`` the global
    index of the first local head (tensor parallelism); ``q_start``/``k_start`` are the absolute
    positions of the first query/key (context parallelism). Returns ``out`` like ``q`` and, with
    ``return_lse``, the natural-log ``lse`` float32 ``[batch, heads, seq]`` (packed:
    ``[heads, tokens]``), whose gradient flows. The keys must cover the queries' positions unless
    ``return_lse`` is set: a key range may then end before some queries (context parallelism splits
    a softmax by key ranges); rows without keys give out 0 and lse -inf. With packed input,
    ``max_seqlen_q`` must be at least the longest sequence (it is not checked, to avoid a device
    sync; omitted, it is computed). ``deterministic`` chooses the backward: True gives gradients
    bit-identical from run to run (dQ in its own pass), False the faster backward whose dQ is summed
    by float32 atomic adds (last bits vary); None the faster of the two for the head dim
    (``DETERMINISTIC_BY_DEFAULT`` of this module).
    """
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    shard = _check_inputs(q, k, v, pattern, packed, head_start, num_q_heads, num_kv_heads, q_start, k_start)
    if packed:  # checked before the CPU fallback too, so that CPU runs refuse what the GPU would
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q = _check_packed(
            q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_start, k_start)
    if not packed and not return_lse:
        _check_key_range(q.shape[1], k.shape[1], q_start, k_start)
    q4, k4, v4 = _last_dim_contiguous(*((t[None] for t in (q, k, v)) if packed else (q, k, v)))
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    out, lse = _forward_op(q4, k4, v4, cu_seqlens_q, *_pattern_fields(pattern), scale, shard.head_start,
                           shard.num_q_heads, shard.num_kv_heads, shard.q_start, shard.k_start, max_seqlen_q or 0,
                           return_lse, _deterministic(deterministic, q.shape[-1]))
    if packed:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


def s2_attention_into(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    shard: Shard,
    resume: bool,
    softmax_scale: Optional[float] = None,
) -> None:
    """``s2_attention(..., return_lse=True)`` of the heads and positions of ``shard``, written into
    ``out [b, s, h, d]`` and ``lse [b, h, s]`` (float32; views allowed), without autograd. With
    ``resume`` the keys join the softmax that ``out``/``lse`` already hold over other keys (rows
    with lse -inf hold none), as if one call had read both key ranges: context parallelism builds a
    chunk's softmax from key ranges that become available at different times, and its backward uses
    ``s2_attention_backward``. Unpacked input only.
    """
    _check_key_range_inputs(q, k, v, pattern, out, lse, shard)
    if _uses_reference(q):
        part = s2_attention_reference(q, k, v, pattern, softmax_scale=softmax_scale, return_lse=True,
                                      **vars(shard))
        merged = merge_by_lse((out, lse), part) if resume else part
        out.copy_(merged[0])
        lse.copy_(merged[1])
        return
    if out.stride(-1) != 1 or lse.stride(-1) != 1:
        raise ValueError("out and lse must be contiguous in their last dimension")
    q, k, v = _last_dim_contiguous(q, k, v)
    problem = kernel_problem(q, k, pattern, shard, softmax_scale=softmax_scale)
    kernel_forward(q, k, v, problem, out=out, lse=lse, resume=resume)


def _check_key_range_inputs(q, k, v, pattern, out, lse, shard: Shard) -> None:
    """Checks shared by the split-softmax entry points."""
    _check_inputs(q, k, v, pattern, False, **vars(shard))
    if out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must be {q.dtype} {tuple(q.shape)} like q, got {out.dtype} {tuple(out.shape)}")
    lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    if lse.shape != lse_shape or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 {lse_shape} ([batch, heads, seq]), "
                         f"got {lse.dtype} {tuple(lse.shape)}")


def s2_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    pattern: Pattern,
    *,
    shard: Shard,
    softmax_scale: Optional[float] = None,
    deterministic: Optional[bool] = None,
):
    """``(dq, dk, dv)`` of one key range of a softmax that was split by key ranges.

    ``q, k, v``, ``shard`` and ``softmax_scale`` are those of one ``s2_attention_into`` call (or
    ``s2_attention(..., return_lse=True)``); ``out`` and ``lse`` are the merged results over *all*
    key ranges and ``grad_out`` the gradient of the merged output. Summing ``dq`` over the ranges (and
    taking ``dk, dv`` of each) gives the gradient of the whole softmax, as in FlashAttention's
    backward, which needs only the final output and lse. For one range alone, pass its own ``out``
    and ``lse``. Unpacked input only (``[batch, seq, heads, dim]``). ``deterministic`` as in
    ``s2_attention``.
    """
    if grad_out.shape != q.shape:
        raise ValueError(f"grad_out {tuple(grad_out.shape)} must have q's shape {tuple(q.shape)}")
    _check_key_range_inputs(q, k, v, pattern, out, lse, shard)
    if _uses_reference(q):
        return s2_attention_reference_backward(grad_out, q, k, v, out, lse, pattern, softmax_scale=softmax_scale,
                                               **vars(shard))
    from . import kernel

    grad_out, q, k, v, out = _last_dim_contiguous(grad_out, q, k, v, out)
    problem = kernel_problem(q, k, pattern, shard, softmax_scale=softmax_scale)
    return kernel.backward(grad_out, q, k, v, out, lse, None, problem, _deterministic(deterministic, q.shape[-1]))
