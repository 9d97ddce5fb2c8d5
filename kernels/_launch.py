"""Where a Triton kernel can run, and how wide the GPU is.

Triton is imported only by the kernel modules (`<op>/kernel.py`), which the wrappers import
on first use, so `import retrieval_attn` works without Triton and TRITON_INTERPRET=1 can be
set by a test's conftest after the package was imported (Triton reads it when a kernel is
decorated, i.e. when kernel.py is first imported).
"""

import functools
import os

import torch

# Programs to aim for per streaming multiprocessor when a wrapper sizes a split-K grid.
PROGRAMS_PER_SM = 2
# Stand-in for the SM count where there is no CUDA device (interpreter runs on the CPU):
# small, so that CPU tests launch few programs.
CPU_SM_COUNT = 4


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(device: torch.device) -> bool:
    """Whether the Triton kernel runs for outputs on `device`.

    CUDA devices: yes. CPU: only under the interpreter (TRITON_INTERPRET=1); otherwise the
    wrappers fall back to the float32 reference, so CPU-only code paths keep working.
    """
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (CPU_SM_COUNT on the CPU)."""
    if device.type != "cuda":
        return CPU_SM_COUNT
    return _cuda_sm_count(device.index if device.index is not None else 0)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Plain-Python twins of triton.cdiv / triton.next_power_of_2: those are JIT-callable
# wrappers costing microseconds per call, which adds up on the decode path.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1
