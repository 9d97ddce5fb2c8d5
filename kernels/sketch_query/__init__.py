"""sketch_query: a decode query in the form select_scores scores a low-rank sketch with.

Where it runs: CUDA when q is on a CUDA device; the Triton interpreter on the CPU when
TRITON_INTERPRET=1 (tests); otherwise the reference `sketch_query_ref`. The kernel's dot
sums in its own order, so an int8 value may differ by one step from the reference's where
q @ basis falls on a rounding boundary.
"""

import torch

from .._launch import next_power_of_2, use_triton
from .ref import SketchQuery, sketch_query_ref

__all__ = ["SketchQuery", "sketch_query", "sketch_query_ref"]

MIN_HEAD_ROWS = 16  # tl.dot needs >= 16 rows: the G heads of a kv head are padded to this
NUM_WARPS = 4


def sketch_query(q: torch.Tensor, basis: torch.Tensor, scale: torch.Tensor | None,
                 mean: torch.Tensor, integer: bool) -> SketchQuery:
    """q [Hkv, G, D], basis [Hkv, D, r], scale [Hkv, r] float32 or None, mean [Hkv, D], all
    on one device -> SketchQuery (see ref.py). D and r powers of two >= 16 for the kernel."""
    hkv, g, d = q.shape
    r = basis.shape[-1]
    if (basis.shape != (hkv, d, r) or mean.shape != (hkv, d)
            or (scale is not None and scale.shape != (hkv, r))):
        raise ValueError(f"need basis [Hkv, D, r], scale [Hkv, r] or None, mean [Hkv, D] for "
                         f"q {tuple(q.shape)}; got {tuple(basis.shape)}, "
                         f"{None if scale is None else tuple(scale.shape)}, "
                         f"{tuple(mean.shape)}")
    device = q.device
    if (not use_triton(device) or any(x < 16 or x & (x - 1) for x in (d, r))
            or q.stride(-1) != 1 or basis.stride(-1) != 1 or mean.stride(-1) != 1
            or (scale is not None and scale.stride(-1) != 1)):
        return sketch_query_ref(q, basis, scale, mean, integer)
    from .kernel import sketch_query_kernel

    qr = torch.empty(hkv, g, r, dtype=torch.int8 if integer else torch.float32, device=device)
    step = torch.empty(hkv, dtype=torch.float32, device=device)
    const = torch.empty(hkv, g, dtype=torch.float32, device=device)
    sc = scale if scale is not None else step  # unread without a scale
    sketch_query_kernel[(hkv,)](
        q, basis, sc, mean, qr, step, const, g,
        q.stride(0), q.stride(1), basis.stride(0), basis.stride(1), sc.stride(0),
        mean.stride(0), qr.stride(0), qr.stride(1), const.stride(0),
        D=d, R=r, G_PAD=max(MIN_HEAD_ROWS, next_power_of_2(g)),
        HAS_SCALE=scale is not None, INTEGER=integer, num_warps=NUM_WARPS)
    return SketchQuery(qr, step, const)
