"""Test-session setup that must happen before any test module imports Triton kernels: the one place
that decides whether the kernels run compiled or in Triton's interpreter."""

import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors (the CPU kernel tests
# need it: tests.helpers.needs_triton_interpreter). Triton decides between compiled and interpreted
# kernels when a kernel is defined, so this must come first. With a GPU the kernels run compiled
# (tests/gpu/); `TRITON_INTERPRET=1 pytest tests/test_attention.py` runs the CPU ones there too.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
