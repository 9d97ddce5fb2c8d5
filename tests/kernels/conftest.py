"""Kernel tests: without CUDA, run the Triton kernels in Triton's CPU interpreter.

Triton decides interpreter or compiler when a kernel is decorated, i.e. when a kernel's
`kernel.py` is first imported; the wrappers import it lazily on first call, so setting the
variable here (before any test runs) is early enough even though tests/conftest.py has
already imported retrieval_attn.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
