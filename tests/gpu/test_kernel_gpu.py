"""S2 kernel on a CUDA GPU: bf16/fp16 error against the float64 reference, determinism, long sequences,
GQA, packed sequences. Tests that run a backward take the ``backward_mode`` fixture (fast and
deterministic). Run: ``python -m pytest -q tests/gpu/test_kernel_gpu.py``."""

import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from megatron_s2 import S2Pattern, get_layout, s2_attention  # noqa: E402
from megatron_s2.ops import attention, kernel  # noqa: E402
from megatron_s2.ops.attention import s2_attention_backward, s2_attention_into  # noqa: E402
from megatron_s2.ops.layout import Shard  # noqa: E402
from megatron_s2.ops.reference import s2_attention_reference  # noqa: E402

DEVICE = "cuda"
# ||kernel - ref|| / ||ref|| with bf16/fp16 inputs and fp32 accumulation; gradients see one more
# rounding of P and dS to the input dtype.
TOL = {torch.bfloat16: (1.2e-2, 2.5e-2), torch.float16: (2e-3, 5e-3)}


@pytest.fixture(params=["fast", "deterministic"])
def backward_mode(request, monkeypatch):
    monkeypatch.setattr(attention, "DETERMINISTIC_BY_DEFAULT", request.param == "deterministic")
    return request.param


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(shape_q, shape_kv, dtype, seed):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    make = lambda shape: torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)
    return make(shape_q), make(shape_kv), make(shape_kv)


def run_kernel(q, k, v, pattern, grad_out, grad_lse, **kw):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = s2_attention(q, k, v, pattern, return_lse=True, **kw)
    torch.autograd.backward((out, lse), (grad_out, grad_lse))
    return out, lse, q.grad, k.grad, v.grad


def run_reference(q, k, v, pattern, grad_out, grad_lse, **kw):
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    out, lse = s2_attention_reference(q, k, v, pattern, return_lse=True, **kw)
    torch.autograd.backward((out, lse), (grad_out.double(), grad_lse.double()))
    return out, lse, q.grad, k.grad, v.grad


def check_close(got, want, dtype):
    tol_out, tol_grad = TOL[dtype]
    names = ("out", "lse", "dq", "dk", "dv")
    errs = {n: rel_err(g, w) for n, g, w in zip(names, got, want)}
    for n, g in zip(names, got):
        assert torch.isfinite(g).all(), f"{n} has non-finite values"
    assert errs["out"] < tol_out and errs["lse"] < 1e-3, errs
    assert max(errs["dq"], errs["dk"], errs["dv"]) < tol_grad, errs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim,heads,kv_heads,seq,head_pattern", [
    (128, 4, 4, 2048, "heterogeneous"), (64, 8, 2, 1500, "heterogeneous"), (32, 4, 1, 777, "heterogeneous"),
    (128, 8, 2, 2048, "kv_group"), (64, 8, 2, 1500, "kv_group")])
def test_matches_float64_reference(backward_mode, dtype, dim, heads, kv_heads, seq, head_pattern):
    pattern = S2Pattern(block_size=64, local_blocks=4, vert_stride=4, head_pattern=head_pattern)
    q, k, v = inputs((2, seq, heads, dim), (2, seq, kv_heads, dim), dtype, seed=dim + seq)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    grad_out = torch.randn(q.shape, generator=g, device=DEVICE).to(dtype)
    grad_lse = torch.randn((2, heads, seq), generator=g, device=DEVICE)
    got = run_kernel(q, k, v, pattern, grad_out, grad_lse)
    want = run_reference(q, k, v, pattern, grad_out, grad_lse)
    check_close(got, want, dtype)


def test_head_dim_256_and_block_128(backward_mode):
    pattern = S2Pattern(block_size=128, local_blocks=2, vert_stride=3, num_dense_heads=1)
    q, k, v = inputs((1, 1100, 4, 256), (1, 1100, 2, 256), torch.bfloat16, seed=3)
    grad_out = torch.randn_like(q)
    grad_lse = torch.randn((1, 4, 1100), device=DEVICE)
    check_close(run_kernel(q, k, v, pattern, grad_out, grad_lse),
                run_reference(q, k, v, pattern, grad_out, grad_lse), torch.bfloat16)


@pytest.mark.parametrize("head_pattern", ["heterogeneous", "kv_group"])  # kv_group: GQA packing
def test_packed_sequences_gqa(backward_mode, head_pattern):
    pattern = S2Pattern(block_size=64, local_blocks=3, vert_stride=4, head_pattern=head_pattern)
    lengths = [700, 64, 1, 2000, 333]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    tokens = sum(lengths)
    q, k, v = inputs((tokens, 8, 128), (tokens, 2, 128), torch.bfloat16, seed=5)
    grad_out = torch.randn_like(q)
    grad_lse = torch.randn((8, tokens), device=DEVICE)
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))
    check_close(run_kernel(q, k, v, pattern, grad_out, grad_lse, **kw),
                run_reference(q, k, v, pattern, grad_out, grad_lse, **kw), torch.bfloat16)


@pytest.mark.parametrize("head_pattern", ["heterogeneous", "kv_group"])  # dK/dV per GQA group / per head
def test_deterministic_backward_is_bit_identical(head_pattern):
    pattern = S2Pattern(block_size=64, local_blocks=4, vert_stride=4, head_pattern=head_pattern)
    q, k, v = inputs((1, 4096, 16, 128), (1, 4096, 4, 128), torch.bfloat16, seed=7)
    grad_out = torch.randn_like(q)
    grad_lse = torch.zeros((1, 16, 4096), device=DEVICE)
    first = run_kernel(q, k, v, pattern, grad_out, grad_lse, deterministic=True)
    second = run_kernel(q, k, v, pattern, grad_out, grad_lse, deterministic=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("split", [True, False], ids=["per_head", "per_group"])
def test_gqa_key_programs_per_head_or_per_group(monkeypatch, backward_mode, split):
    monkeypatch.setattr(kernel, "SPLIT_HEADS", {"fast": split, "deterministic": split})
    pattern = S2Pattern(block_size=64, local_blocks=4, vert_stride=4)
    q, k, v = inputs((1, 2000, 8, 128), (1, 2000, 2, 128), torch.bfloat16, seed=9)
    grad_out = torch.randn_like(q)
    grad_lse = torch.randn((1, 8, 2000), device=DEVICE)
    check_close(run_kernel(q, k, v, pattern, grad_out, grad_lse),
                run_reference(q, k, v, pattern, grad_out, grad_lse), torch.bfloat16)


@pytest.mark.parametrize("dim,kv_heads,head_pattern,packed", [(128, 8, "heterogeneous", False),
                                                               (64, 2, "kv_group", False), (128, 2, "kv_group", True)])
def test_pointer_loads_and_atomic_dq_adds(monkeypatch, backward_mode, dim, kv_heads, head_pattern, packed):
    """The paths of GPUs before Hopper (kernel.TMA_LOADS, TMA_REDUCE and TMA_DS_STORE off: per-element
    pointer loads and dS stores, per-element atomic dQ adds) against float64; on Hopper the other tests run the
    descriptor paths (test_hopper_takes_the_descriptor_paths)."""
    monkeypatch.setattr(kernel, "TMA_LOADS", False)
    monkeypatch.setattr(kernel, "TMA_REDUCE", False)
    monkeypatch.setattr(kernel, "TMA_DS_STORE", False)
    pattern = S2Pattern(block_size=64, local_blocks=4, vert_stride=4, head_pattern=head_pattern)
    q, k, v = inputs((1, 2100, 8, dim), (1, 2100, kv_heads, dim), torch.bfloat16, seed=19)
    assert not kernel.use_tma(k, v) and not kernel.use_tma_reduce(q.float())
    grad_out = torch.randn_like(q)
    grad_lse = torch.randn((1, 8, 2100), device=DEVICE)
    kw = {}
    if packed:  # sequences of 1000 and 1100 tokens
        q, k, v, grad_out = (t[0] for t in (q, k, v, grad_out))
        grad_lse = grad_lse[0]
        cu = torch.tensor([0, 1000, 2100], dtype=torch.int32, device=DEVICE)
        kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=1100, max_seqlen_k=1100)
    check_close(run_kernel(q, k, v, pattern, grad_out, grad_lse, **kw),
                run_reference(q, k, v, pattern, grad_out, grad_lse, **kw), torch.bfloat16)


@pytest.mark.parametrize("dim,kv_heads,head_pattern", [(128, 8, "heterogeneous"), (64, 2, "kv_group")])
def test_descriptor_loads_in_the_key_pass(monkeypatch, backward_mode, dim, kv_heads, head_pattern):
    """kernel.TMA_KEY_PASS (off by default, for the tuner): Q/dO descriptor loads in the dK/dV pass
    against float64, ragged length."""
    monkeypatch.setattr(kernel, "TMA_KEY_PASS", True)
    pattern = S2Pattern(block_size=64, local_blocks=4, vert_stride=4, head_pattern=head_pattern)
    q, k, v = inputs((1, 2100, 8, dim), (1, 2100, kv_heads, dim), torch.bfloat16, seed=21)
    grad_out = torch.randn_like(q)
    grad_lse = torch.randn((1, 8, 2100), device=DEVICE)
    check_close(run_kernel(q, k, v, pattern, grad_out, grad_lse),
                run_reference(q, k, v, pattern, grad_out, grad_lse), torch.bfloat16)


def test_hopper_takes_the_descriptor_paths():
    """The defaults load through tensor descriptors and add dQ by descriptor reductions on Hopper,
    so that the other tests check those paths there."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("descriptor paths need a Hopper or newer GPU")
    q, k, v = inputs((1, 100, 4, 64), (1, 100, 2, 64), torch.bfloat16, seed=2)
    assert kernel.use_tma(k, v) and kernel.use_tma_reduce(q.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_pattern,packed,q_start", [
    (8, 8, "heterogeneous", False, 0), (8, 2, "heterogeneous", False, 0), (8, 2, "kv_group", False, 0),
    (16, 2, "kv_group", False, 0), (8, 4, "kv_group", True, 0), (8, 2, "heterogeneous", True, 0),
    (8, 8, "heterogeneous", False, 1024)])
def test_hopper_forward_against_float64_and_the_triton_forward(monkeypatch, dtype, heads, kv_heads, head_pattern,
                                                               packed, q_start):
    """kernel_hopper's forward (Gluon) serves these calls on Hopper (also below its MIN_TOKENS here):
    MHA, GQA (heads packed 4 and 8 per program with kv_group), packed sequences, a CP chunk's query
    offset. Its error against float64 is that of the Triton forward."""
    hopper = hopper_forward(monkeypatch)
    pattern = S2Pattern(block_size=64, local_blocks=4, vert_stride=4, head_pattern=head_pattern)
    if packed:
        lengths = [700, 64, 1, 2000, 333]
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
        q, k, v = inputs((sum(lengths), heads, 128), (sum(lengths), kv_heads, 128), dtype, seed=17)
        kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))
    else:
        q, k, v = inputs((2, 1500, heads, 128), (2, 1500 + q_start, kv_heads, 128), dtype, seed=19)
        kw = dict(q_start=q_start) if q_start else {}
    calls = []
    gluon_forward = hopper.forward
    monkeypatch.setattr(hopper, "forward", lambda *args: calls.append(1) or gluon_forward(*args))
    out, lse = s2_attention(q, k, v, pattern, return_lse=True, **kw)
    assert calls, "the call did not take the Gluon forward"
    monkeypatch.setattr(hopper, "ENABLED", False)
    triton_out, triton_lse = s2_attention(q, k, v, pattern, return_lse=True, **kw)
    want_out, want_lse = s2_attention_reference(q.double(), k.double(), v.double(), pattern, return_lse=True, **kw)
    errors = {name: (rel_err(got, want), rel_err(triton, want)) for name, got, triton, want in
              (("out", out, triton_out, want_out), ("lse", lse, triton_lse, want_lse))}
    assert errors["out"][0] < TOL[dtype][0] and errors["lse"][0] < 1e-3, errors
    # Same tiles, entries and masks: only the float32 sums' order differs from the Triton forward's.
    assert errors["out"][0] < 1.1 * errors["out"][1] and errors["lse"][0] < 2 * errors["lse"][1] + 1e-6, errors


def hopper_forward(monkeypatch):
    """kernel_hopper, taken for every length (else the test is skipped)."""
    hopper = attention._hopper_kernel()
    if hopper is None or torch.cuda.get_device_capability()[0] != 9 or not hopper.triton_supported():
        pytest.skip("the Gluon forward runs on Hopper GPUs with the Triton release kernel_hopper.CHECKED_TRITON")
    monkeypatch.setattr(hopper, "MIN_TOKENS", 0)
    return hopper


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hopper_forward_resumes_a_softmax(monkeypatch, dtype):
    """Context parallelism's second call into the same out/lse (resume) through the Gluon forward:
    as the Triton forward's, against float64."""
    hopper = hopper_forward(monkeypatch)
    pattern = S2Pattern(block_size=64, local_blocks=4, vert_stride=4, head_pattern="kv_group")
    q, k, v = inputs((2, 1024, 8, 128), (2, 3072, 2, 128), dtype, seed=43)
    heads = Shard(num_q_heads=8, num_kv_heads=2)
    calls = []
    gluon_forward = hopper.forward
    monkeypatch.setattr(hopper, "forward", lambda *args: calls.append(args[-1]) or gluon_forward(*args))
    results = []
    for gluon in (True, False):
        monkeypatch.setattr(hopper, "ENABLED", gluon)
        out = torch.empty_like(q)
        lse = torch.empty(2, 8, 1024, device=DEVICE)
        for resume, (start, end) in enumerate([(2048, 3072), (0, 2048)]):  # own keys first
            s2_attention_into(q, k[:, start:end], v[:, start:end], pattern, out, lse, shard=heads.at(2048, start),
                              resume=bool(resume))
        results.append((out, lse))
    want_out, want_lse = s2_attention_reference(q.double(), k.double(), v.double(), pattern, return_lse=True,
                                                q_start=2048)
    (out, lse), (triton_out, triton_lse) = results
    assert calls == [False, True], calls  # both Gluon calls, the second resuming
    assert rel_err(out, want_out) < TOL[dtype][0] and rel_err(lse, want_lse) < 1e-3
    assert rel_err(out, want_out) < 1.1 * rel_err(triton_out, want_out)


def test_32k_tokens_last_chunk_against_reference(backward_mode):
    """At 32k the dense reference is too big; the last 512 queries and keys are checked exactly:
    their dq and the last keys' dk/dv only depend on the last queries' loss."""
    seq, tail, heads, dim = 32768, 512, 8, 128
    pattern = S2Pattern(block_size=64, local_blocks=16, vert_stride=16)
    q, k, v = inputs((1, seq, heads, dim), (1, seq, heads // 2, dim), torch.bfloat16, seed=11)
    grad_out = torch.zeros_like(q)
    grad_out[:, -tail:] = torch.randn_like(q[:, -tail:])
    grad_lse = torch.zeros((1, heads, seq), device=DEVICE)
    out, lse, dq, dk, dv = run_kernel(q, k, v, pattern, grad_out, grad_lse)
    for t in (out, lse, dq, dk, dv):
        assert torch.isfinite(t).all()
    want = run_reference(q[:, -tail:], k, v, pattern, grad_out[:, -tail:], grad_lse[..., -tail:],
                         q_start=seq - tail)
    got = (out[:, -tail:], lse[..., -tail:], dq[:, -tail:], dk[:, -tail:], dv[:, -tail:])
    check_close(got, (want[0], want[1], want[2], want[3][:, -tail:], want[4][:, -tail:]), torch.bfloat16)
    # Every other query has zero incoming gradient, so dq must be exactly zero there.
    assert dq[:, :-tail].abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_window_only_matches_float64_reference(dtype):
    """The sliding-window control (no stripes) at the quality experiment's head shape, GQA."""
    pattern = S2Pattern.window(block_size=64, local_blocks=8)
    q, k, v = inputs((2, 3000, 8, 64), (2, 3000, 2, 64), dtype, seed=13)
    g = torch.Generator(device=DEVICE).manual_seed(2)
    grad_out = torch.randn(q.shape, generator=g, device=DEVICE).to(dtype)
    grad_lse = torch.randn((2, 8, 3000), generator=g, device=DEVICE)
    check_close(run_kernel(q, k, v, pattern, grad_out, grad_lse),
                run_reference(q, k, v, pattern, grad_out, grad_lse), dtype)


@pytest.mark.parametrize("kv_heads,head_pattern", [(8, "heterogeneous"), (4, "kv_group")])
def test_context_parallel_chunk_offsets(backward_mode, kv_heads, head_pattern):
    """A CP chunk (query offset) of a TP rank's heads (the second half of the model's)."""
    pattern = S2Pattern(block_size=64, local_blocks=4, vert_stride=4, head_pattern=head_pattern)
    seq, q_start = 3072, 1024
    q, k, v = inputs((1, 1024, 8, 64), (1, seq, kv_heads, 64), torch.bfloat16, seed=13)
    grad_out = torch.randn_like(q)
    grad_lse = torch.randn((1, 8, 1024), device=DEVICE)
    kw = dict(q_start=q_start, head_start=8, num_q_heads=16, num_kv_heads=2 * kv_heads)
    check_close(run_kernel(q, k, v, pattern, grad_out, grad_lse, **kw),
                run_reference(q, k, v, pattern, grad_out, grad_lse, **kw), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_softmax_split_by_key_ranges(backward_mode, dtype):
    """Context parallelism's calls: the earlier keys resumed into the softmax of a chunk's own keys
    (s2_attention_into), and each range's backward from the merged result, against float64."""
    pattern = S2Pattern(block_size=64, local_blocks=4, vert_stride=4)
    q, k, v = inputs((2, 1024, 8, 128), (2, 3072, 2, 128), dtype, seed=41)
    g = torch.Generator(device=DEVICE).manual_seed(2)
    grad_out = torch.randn(q.shape, generator=g, device=DEVICE).to(dtype)
    out = torch.empty_like(q)
    lse = torch.empty(2, 8, 1024, device=DEVICE)
    ranges = [(k[:, 2048:], v[:, 2048:], 2048), (k[:, :2048], v[:, :2048], 0)]  # own keys first
    heads = Shard(num_q_heads=8, num_kv_heads=2)
    for resume, (kr, vr, start) in enumerate(ranges):
        s2_attention_into(q, kr, vr, pattern, out, lse, shard=heads.at(2048, start), resume=bool(resume))
    grads = [s2_attention_backward(grad_out, q, kr, vr, out, lse, pattern, shard=heads.at(2048, start))
             for kr, vr, start in ranges]
    got = (out, lse, grads[0][0] + grads[1][0], torch.cat([grads[1][1], grads[0][1]], 1),
           torch.cat([grads[1][2], grads[0][2]], 1))
    want = run_reference(q, k, v, pattern, grad_out, torch.zeros_like(lse), q_start=2048)
    check_close(got, want, dtype)


@pytest.mark.parametrize("dim,kv_heads,head_pattern", [(128, 8, "heterogeneous"), (128, 2, "kv_group"),
                                                       (64, 8, "heterogeneous")])
def test_stored_ds_in_chunks_or_recomputed(monkeypatch, dim, kv_heads, head_pattern):
    """The deterministic backward's dQ from stored dS in one chunk, in a chunk per KV group, and
    recomputed (no stored dS): each against float64, chunked equal to one chunk bit for bit; for
    kv_group heads also chunks whose long dK/dV programs run per head."""
    pattern = S2Pattern(block_size=64, local_blocks=4, vert_stride=4, head_pattern=head_pattern)
    q, k, v = inputs((1, 2100, 8, dim), (1, 2100, kv_heads, dim), torch.bfloat16, seed=23)
    grad_out = torch.randn_like(q)
    grad_lse = torch.randn((1, 8, 2100), device=DEVICE)
    want = run_reference(q, k, v, pattern, grad_out, grad_lse)
    group = 8 // kv_heads
    kl = kernel.kernel_layout(get_layout(pattern, 8, kv_heads, 2100, device=DEVICE), dim, group)
    starts = kl.k_head_starts
    block_bytes = math.prod(kl.ds_block_shape) * q.element_size()
    per_group = max(starts[g + group] - starts[g] for g in range(0, 8, group)) * block_bytes
    got = {}
    for name, budget in (("one chunk", 1 << 40), ("chunk per group", per_group), ("recomputed", 0)):
        monkeypatch.setattr(kernel, "STORED_DS_BYTES", budget)
        plan = kernel.stored_ds_plan(kl, kl.k_work_per_group, 1, 8, group, q.element_size(), 1)
        chunks = 0 if plan is None else len(plan)
        assert chunks == {"one chunk": 1, "chunk per group": kv_heads, "recomputed": 0}[name]
        got[name] = run_kernel(q, k, v, pattern, grad_out, grad_lse, deterministic=True)
        check_close(got[name], want, torch.bfloat16)
    for a, b in zip(got["one chunk"], got["chunk per group"]):
        assert torch.equal(a, b)
    if head_pattern == "kv_group":
        # As many SMs as per-head programs keep busy in a chunk per group: the group programs of
        # stripe tiles are then too long, and run per head (float32 partials summed per group).
        entries = min(starts[g + group] - starts[g] for g in range(0, 8, group))
        num_sms = entries // max(kl.k_work_per_head.longest_per_group)
        monkeypatch.setattr(kernel, "_sm_count", lambda device: num_sms)
        monkeypatch.setattr(kernel, "STORED_DS_BYTES", per_group)
        plans = [kernel.stored_ds_plan(kl, work, 1, 8, group, q.element_size(), num_sms)
                 for work in (kl.k_work_per_group, kl.k_work_long_per_head)]
        assert plans[0] is None and len(plans[1]) == kv_heads and kl.k_work_long_per_head.split is not None
        check_close(run_kernel(q, k, v, pattern, grad_out, grad_lse, deterministic=True), want, torch.bfloat16)


LAUNCHERS = (kernel._fwd, kernel._dkdv, kernel._dq, kernel._dq_stored, kernel._fused)


@pytest.mark.parametrize("dim", [128, 64])
@pytest.mark.parametrize("index", range(max(len(c) for launcher in LAUNCHERS for c in launcher.config_lists)))
def test_every_launch_config(monkeypatch, backward_mode, index, dim):
    """S2_AUTOTUNE=1 or tools/tune_kernel.py may pick any config: each must be right (config ``index``
    of every list first, the tuner switched off)."""
    for launcher in LAUNCHERS:
        lists = [c[index % len(c):] + c[:index % len(c)] for c in launcher.config_lists]
        monkeypatch.setattr(launcher, "config_lists", lists)
        monkeypatch.setattr(launcher, "tuned", [None] * len(lists))
    pattern = S2Pattern(block_size=64, local_blocks=4, vert_stride=4)
    q, k, v = inputs((1, 3000, 8, dim), (1, 3000, 2, dim), torch.bfloat16, seed=17 + index)
    grad_out = torch.randn_like(q)
    grad_lse = torch.randn((1, 8, 3000), device=DEVICE)
    check_close(run_kernel(q, k, v, pattern, grad_out, grad_lse),
                run_reference(q, k, v, pattern, grad_out, grad_lse), torch.bfloat16)
