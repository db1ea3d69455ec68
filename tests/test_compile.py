"""``s2_attention`` under ``torch.compile(fullgraph=True)``: its forward and backward are registered
custom ops with fake implementations, so Dynamo and AOTAutograd trace it without running the kernel.

On CPU both paths of the ops run: the Triton interpreter and the PyTorch reference fallback
(``TRITON_INTERPRET=0``). Compiled results must equal eager ones bit for bit (``aot_eager`` runs the
same kernels) and match the float64 reference; the GPU twin (inductor) is tests/gpu/test_compile_gpu.py.
"""

import functools

import pytest
import torch

from megatron_s2 import BlockMaskPattern, S2Pattern, s2_attention
from megatron_s2.ops.attention import _backward_op, _forward_op, _pattern_fields, _pattern_from_fields
from megatron_s2.ops.reference import s2_attention_reference
from tests.helpers import run_distributed

ATOL = 2e-5  # float32 vs float64, values of order 1


def in_forked_child(test):
    """Run the test in a forked child: torch.compile and opcheck start autograd's device threads, and
    a process holding them can no longer fork the multi-rank tests that come after this file."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        run_distributed(1, lambda rank, world_size: test(*args, **kwargs))

    return wrapper


@pytest.fixture(params=["interpreter", "reference"])
def cpu_path(request, monkeypatch):
    """The ops read TRITON_INTERPRET when they run: without it CPU tensors take the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "interpreter" else "0")
    return request.param


def draw(*shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shapes]


def block_mask_pattern(seed):
    """A random causal block mask over 4 heads x 4 blocks of 16, every diagonal block set."""
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(4, 4, 4, generator=gen) < 0.5) | torch.eye(4, dtype=torch.bool)
    return BlockMaskPattern(mask, block_size=16)


# (name, pattern, q shape, kv shape, s2_attention keywords): GQA with tensor-parallel head
# arguments and a context-parallel offset, a window-only pattern, packed sequences, a block mask.
CASES = [
    ("gqa_tp_cp", S2Pattern(block_size=16, local_blocks=2, vert_stride=2, head_pattern="kv_group",
                            head_sliding_offset=1, num_dense_heads=1),
     (2, 48, 4, 16), (2, 64, 2, 16), dict(num_q_heads=8, num_kv_heads=4, head_start=4, q_start=16)),
    ("window_only", S2Pattern(block_size=16, local_blocks=2, vert_stride=0), (1, 64, 2, 32), (1, 64, 1, 32),
     {}),
    ("packed", S2Pattern(block_size=16, local_blocks=1, vert_stride=2), (80, 2, 16), (80, 2, 16),
     dict(cu_seqlens_q=torch.tensor([0, 33, 80], dtype=torch.int32), max_seqlen_q=47)),
    ("block_mask", block_mask_pattern(0), (1, 64, 4, 16), (1, 64, 4, 16), {}),
]


def loss_of(attention, pattern, **kw):
    """A small model step: a query projection, S2 attention, a loss that uses out and lse."""

    def loss(x, weight, k, v, grad_out, grad_lse):
        out, lse = attention((x @ weight).view(grad_out.shape), k, v, pattern, return_lse=True, **kw)
        return (out * grad_out).sum() + (lse * grad_lse).sum()

    return loss


def run(fn, x, weight, k, v, grad_out, grad_lse, dtype):
    inputs = [t.detach().to(dtype).requires_grad_() for t in (x, weight, k, v)]
    value = fn(*inputs, grad_out.to(dtype), grad_lse.to(torch.float32 if dtype != torch.float64 else dtype))
    return (value, *torch.autograd.grad(value, inputs))


@pytest.mark.parametrize("pattern", [
    S2Pattern(), S2Pattern(block_size=32, local_blocks=3, vert_stride=5, head_pattern="homogeneous",
                           head_sliding_step=2, head_sliding_offset=1, num_dense_heads=2),
    S2Pattern.window(), block_mask_pattern(1),
])
def test_pattern_travels_through_op_arguments(pattern):
    """The ops get a pattern as ints, a string and a mask; rebuilt, it must be the same pattern (an
    S2Pattern equal by value; for a BlockMaskPattern the same object every time, on the same mask
    tensor, so that its cached layout is found)."""
    rebuilt = _pattern_from_fields(*_pattern_fields(pattern))
    if isinstance(pattern, S2Pattern):
        assert rebuilt == pattern
    else:
        assert _pattern_from_fields(*_pattern_fields(pattern)) is rebuilt and rebuilt.mask is pattern.mask


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@in_forked_child
def test_compiled_equals_eager_and_reference(case, cpu_path):
    name, pattern, q_shape, kv_shape, kw = case
    heads, dim = q_shape[-2], q_shape[-1]
    tokens = q_shape[:-2]
    lse_shape = (heads, tokens[0]) if len(tokens) == 1 else (tokens[0], heads, tokens[1])
    x, weight, k, v, grad_out, grad_lse = draw((*tokens, heads * dim), (heads * dim, heads * dim), kv_shape,
                                               kv_shape, q_shape, lse_shape, seed=len(name))
    loss = loss_of(s2_attention, pattern, **kw)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = run(compiled, x, weight, k, v, grad_out, grad_lse, torch.float32)
    eager = run(loss, x, weight, k, v, grad_out, grad_lse, torch.float32)
    want = run(loss_of(s2_attention_reference, pattern, **kw), x, weight, k, v, grad_out, grad_lse, torch.float64)
    for label, g, e, w in zip(("loss", "dx", "dweight", "dk", "dv"), got, eager, want):
        assert torch.equal(g, e), f"{label}: compiled differs from eager"
        torch.testing.assert_close(g.double(), w, atol=ATOL * max(1.0, w.abs().max().item()), rtol=1e-4,
                                   msg=lambda m: f"{label}: {m}")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@in_forked_child
def test_opcheck(case, cpu_path):
    """Schema, fake implementation (shapes and strides of the real outputs), autograd registration
    and AOT dispatch of both ops, as PyTorch checks custom ops."""
    name, pattern, q_shape, kv_shape, kw = case
    packed = len(q_shape) == 3
    q, k, v = (t[None] if packed else t for t in draw(q_shape, kv_shape, kv_shape, seed=len(name)))
    q.requires_grad_()
    cu_seqlens = kw.get("cu_seqlens_q")
    static = (*_pattern_fields(pattern), 0.25, kw.get("head_start", 0), kw.get("num_q_heads", q.shape[2]),
              kw.get("num_kv_heads", k.shape[2]), kw.get("q_start", 0), 0, kw.get("max_seqlen_q", 0))
    torch.library.opcheck(_forward_op, (q, k, v, cu_seqlens, *static, True, True))
    out, lse = _forward_op(q, k, v, cu_seqlens, *static, True, True)
    dout, dlse = draw(out.shape, lse.shape, seed=len(name) + 1)
    # The reference backward runs torch.func.vjp, whose wrapped tensors the schema checker cannot read.
    checks = ("test_faketensor", "test_aot_dispatch_dynamic") if cpu_path == "reference" else None
    torch.library.opcheck(_backward_op, (dout, q.detach(), k, v, out.detach(), lse.detach(), dlse, cu_seqlens,
                                         *static, True), **({} if checks is None else dict(test_utils=checks)))


@in_forked_child
def test_packed_batches_with_new_longest_sequences_reuse_the_compiled_graph(monkeypatch):
    """Packed training passes a new max_seqlen_q (and sequence count) each batch: once Dynamo's
    recompiles have made them symbolic, later batches must run the same graph (and equal eager)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    pattern = S2Pattern(block_size=16, local_blocks=1, vert_stride=2)

    def step(q, k, v, cu_seqlens, max_seqlen):
        return s2_attention(q, k, v, pattern, cu_seqlens_q=cu_seqlens, max_seqlen_q=max_seqlen).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    graphs = []
    for seed, bounds in enumerate([[0, 33, 80], [0, 20, 80], [0, 10, 45, 80], [0, 50, 80], [0, 5, 70, 80],
                                   [0, 30, 40, 55, 80]]):
        q, k, v = draw((80, 2, 16), (80, 2, 16), (80, 2, 16), seed=seed)
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        assert torch.equal(compiled(q, k, v, cu_seqlens, longest), step(q, k, v, cu_seqlens, longest))
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[-3:] == [graphs[2]] * 3, graphs
