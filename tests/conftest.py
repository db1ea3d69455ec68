"""Test-session setup that must happen before any test module imports Triton kernels."""

import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. Triton decides
# between compiled and interpreted kernels when a kernel is defined, so this must come first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
