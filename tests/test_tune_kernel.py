"""tools/tune_kernel.py's stage ablations (``--ablate``): every edit still matches the kernel's source
exactly once, and an edited copy runs the edited code (an unedited copy the kernel's)."""

import pytest
import torch
import tools.tune_kernel as tune_kernel
from megatron_s2 import S2Pattern, s2_attention
from megatron_s2.ops import kernel
from megatron_s2.ops.reference import s2_attention_reference
from tests.helpers import needs_triton_interpreter

ABLATIONS = {**tune_kernel.FORWARD_ABLATIONS, **tune_kernel.KEY_PASS_ABLATIONS, **tune_kernel.FAST_PASS_ABLATIONS}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_every_ablation_edit_matches_the_kernel_once(name):
    source = tune_kernel.ablated_source(name, ABLATIONS[name])
    for _, new in ABLATIONS[name]:
        assert new in source


def test_an_edit_that_no_longer_matches_is_named():
    with pytest.raises(ValueError, match="'no such line' occurs 0 times"):
        tune_kernel.ablated_source("stale", [("no such line", "")])


@needs_triton_interpreter
def test_ablated_copy_runs_the_edited_kernel(monkeypatch, tmp_path):
    pattern = S2Pattern(block_size=16, local_blocks=2, vert_stride=2)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 96, 2, 32, generator=gen) for _ in range(3))
    want = s2_attention_reference(q.double(), k.double(), v.double(), pattern)
    for name, edits, exact in (("unedited copy", [], True),
                               ("no masked entries", ABLATIONS["without the masked entries"], False)):
        module = tune_kernel.load_ablated_kernel(name, edits, str(tmp_path))
        monkeypatch.setattr(kernel._fwd, "kernel", module._fwd_kernel)
        err = (s2_attention(q, k, v, pattern).double() - want).abs().max().item()
        assert (err < 1e-5) == exact, f"{name}: max error {err:.2e}"
