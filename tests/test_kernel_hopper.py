"""The Gluon forward for Hopper (megatron_s2/ops/kernel_hopper.py) without a GPU: it compiles for
sm_90a in every variant within its register and shared-memory budget (no spills), and it is chosen
only where it applies. Its results are checked against float64 on an H200 (tests/gpu)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_s2 import S2Pattern
from megatron_s2.ops import kernel
from megatron_s2.ops.attention import _hopper_kernel, kernel_problem
from megatron_s2.ops.layout import Shard
from tests.helpers import ROOT

hopper = _hopper_kernel()
needs_gluon = pytest.mark.skipif(hopper is None, reason="needs Triton's Gluon language for Hopper")
SHARED_MEMORY_PER_SM = 227 * 1024  # Hopper's shared memory for one program
VARIANTS = [dict(pack=1), dict(pack=2), dict(pack=4, varlen=True, resume=True), dict(pack=8)]


@pytest.fixture(scope="module")
def compile_reports():
    """``tools.tune_kernel.hopper_forward_report`` of each variant, compiled in a fresh process:
    Gluon compiles no kernel once Triton's interpreter is on (these tests' conftest turns it on)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    script = ("import json; import tools.tune_kernel as t; "
              f"print(json.dumps([t.hopper_forward_report(**v) for v in {VARIANTS!r}]))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_gluon
@pytest.mark.parametrize("variant", range(len(VARIANTS)), ids=[str(v) for v in VARIANTS])
def test_compiles_for_sm90_within_budget(compile_reports, variant):
    shared, details = compile_reports[variant]
    report = " ".join(details)
    assert "0 bytes spill stores" in report and "0 bytes spill loads" in report, report
    assert f"Used {hopper.MAX_REGISTERS} registers" in report, report
    assert shared <= SHARED_MEMORY_PER_SM, shared


@pytest.fixture
def gpu_of_capability(monkeypatch):
    """CPU tensors seen as on a GPU of the given capability (``applies`` reads no more than that)."""
    def set_capability(major):
        monkeypatch.setattr(hopper, "triton_supported", lambda: True)  # whichever Triton runs the tests
        monkeypatch.setattr(kernel, "INTERPRET", False)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    return set_capability


def problem_inputs(dtype=torch.bfloat16, dim=128, block_size=64, tokens=None):
    pattern = S2Pattern(block_size=block_size, local_blocks=4, vert_stride=4)
    q = torch.randn(1, tokens or hopper.MIN_TOKENS, 4, dim).to(dtype)
    return q, kernel_problem(q, q, pattern, Shard(4, 4), softmax_scale=None)


@needs_gluon
@pytest.mark.parametrize("major,dtype,dim,block_size,expected", [
    (9, torch.bfloat16, 128, 64, True), (9, torch.float16, 128, 64, True),
    (9, torch.float32, 128, 64, False), (9, torch.bfloat16, 64, 64, False), (9, torch.bfloat16, 128, 32, False),
    (8, torch.bfloat16, 128, 64, False), (10, torch.bfloat16, 128, 64, False)])
def test_applies_to_16_bit_head_dim_128_on_hopper_only(gpu_of_capability, major, dtype, dim, block_size, expected):
    q, problem = problem_inputs(dtype, dim, block_size)
    gpu_of_capability(major)
    assert hopper.applies(q, q, q, problem) is expected


@needs_gluon
def test_shorter_sequences_keep_the_triton_forward(gpu_of_capability):
    q, problem = problem_inputs(tokens=hopper.MIN_TOKENS - 64)
    gpu_of_capability(9)
    assert not hopper.applies(q, q, q, problem)


@needs_gluon
def test_does_not_apply_to_tensors_tma_cannot_address(gpu_of_capability):
    q, problem = problem_inputs()
    gpu_of_capability(9)
    assert hopper.applies(q, q, q, problem)
    tokens = q.shape[1]
    misaligned = torch.randn(1, tokens, 4 * 128 + 1, dtype=torch.bfloat16)[..., 1:].view(1, tokens, 4, 128)
    assert not hopper.applies(misaligned, q, q, problem)


@needs_gluon
def test_does_not_apply_on_a_triton_release_not_checked_on_a_gpu(gpu_of_capability, monkeypatch):
    q, problem = problem_inputs()
    gpu_of_capability(9)
    monkeypatch.setattr(hopper, "triton_supported", lambda: False)
    assert not hopper.applies(q, q, q, problem)


@needs_gluon
def test_not_switched_off_nor_on_the_interpreter(gpu_of_capability, monkeypatch):
    q, problem = problem_inputs()
    gpu_of_capability(9)
    assert hopper.applies(q, q, q, problem)
    monkeypatch.setattr(hopper, "ENABLED", False)
    assert not hopper.applies(q, q, q, problem)
    monkeypatch.setattr(hopper, "ENABLED", True)
    monkeypatch.setattr(kernel, "INTERPRET", True)
    assert not hopper.applies(q, q, q, problem)
