"""``torch.compile`` (default inductor backend, fullgraph) of a model step using ``s2_attention`` on a
CUDA GPU equals eager: the kernel runs as an opaque custom op, so out, lse and the gradients must
agree with the eager run (bit for bit for the attention alone in deterministic mode; within bf16
rounding where inductor fuses the surrounding projection). Run:
``python -m pytest -q tests/gpu/test_compile_gpu.py`` (about a minute on an H200, mostly compiling)."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from megatron_s2 import S2Pattern, s2_attention  # noqa: E402

DEVICE = "cuda"
PATTERN = S2Pattern(block_size=64, local_blocks=4, vert_stride=4, head_pattern="kv_group")


def draw(*shapes, seed, dtype=torch.bfloat16):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return [torch.randn(s, generator=gen, device=DEVICE).to(dtype) for s in shapes]


def attention_step(q, k, v, grad_out, grad_lse, **kw):
    out, lse = s2_attention(q, k, v, PATTERN, return_lse=True, deterministic=True, **kw)
    return (out.float() * grad_out.float()).sum() + (lse * grad_lse).sum()


def model_step(x, weight, k, v, grad_out, grad_lse, **kw):
    q = torch.nn.functional.silu(x @ weight).view(grad_out.shape)
    return attention_step(q, k, v, grad_out, grad_lse, **kw)


def grads(fn, tensors, fixed, **kw):
    inputs = [t.detach().clone().requires_grad_() for t in tensors]
    value = fn(*inputs, *fixed, **kw)
    return (value, *torch.autograd.grad(value, inputs))


@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
def test_compiled_attention_equals_eager_bitwise(packed):
    torch._dynamo.reset()
    if packed:
        cu = torch.tensor([0, 1000, 3000, 4096], dtype=torch.int32, device=DEVICE)
        q_shape, kv_shape, lse_shape, kw = (4096, 8, 128), (4096, 2, 128), (8, 4096), dict(
            cu_seqlens_q=cu, max_seqlen_q=2000)
    else:
        q_shape, kv_shape, lse_shape, kw = (2, 4096, 8, 128), (2, 4096, 2, 128), (2, 8, 4096), {}
    q, k, v, grad_out = draw(q_shape, kv_shape, kv_shape, q_shape, seed=1)
    (grad_lse,) = draw(lse_shape, seed=2, dtype=torch.float32)
    compiled = torch.compile(attention_step, fullgraph=True)
    got = grads(compiled, (q, k, v), (grad_out, grad_lse), **kw)
    want = grads(attention_step, (q, k, v), (grad_out, grad_lse), **kw)
    for name, g, w in zip(("dq", "dk", "dv"), got[1:], want[1:]):
        assert torch.equal(g, w), f"{name}: compiled differs from eager"
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=0)  # inductor may sum in another order


def test_compiled_model_step_equals_eager():
    torch._dynamo.reset()
    x, weight, k, v, grad_out = draw((2, 2048, 1024), (1024, 1024), (2, 2048, 2, 128), (2, 2048, 2, 128),
                                     (2, 2048, 8, 128), seed=3)
    (grad_lse,) = draw((2, 8, 2048), seed=4, dtype=torch.float32)
    compiled = torch.compile(model_step, fullgraph=True)
    got = grads(compiled, (x, weight, k, v), (grad_out, grad_lse))
    want = grads(model_step, (x, weight, k, v), (grad_out, grad_lse))
    for name, g, w in zip(("loss", "dx", "dweight", "dk", "dv"), got, want):
        err = ((g.double() - w.double()).norm() / w.double().norm()).item()
        print(f"{name:8s} relative difference compiled vs eager {err:.2e}")
        assert err < 2e-2, f"{name}: compiled differs from eager by {err:.2e}"
