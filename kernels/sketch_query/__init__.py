"""sketch_query: a decode query in the form select_scores scores a low-rank sketch with.

Where it runs: CUDA when q is on a CUDA device; the Triton interpreter on the CPU when
TRITON_INTERPRET=1 (tests); otherwise the reference `sketch_query_ref`. The kernel's dot
sums in its own order, so an int8 value may differ by one step from the reference's where
q @ basis falls on a rounding boundary.
"""

import torch

from retrieval_attn.kernels._launch import next_power_of_2, use_triton
from retrieval_attn.kernels.formats import SketchQuery
from retrieval_attn.kernels.sketch_query.ref import sketch_query_ref, sketch_scores_at_ref

__all__ = ["sketch_query", "sketch_query_ref", "sketch_scores_at", "sketch_scores_at_ref"]

BLOCK = 64  # positions per program of sketch_scores_at

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
    from retrieval_attn.kernels.sketch_query.kernel import sketch_query_kernel

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


def sketch_scores_at(query: SketchQuery, keys: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    """Sketched q·k [Hkv, G, K] float32 of positions [Hkv, K] (int, each in [0, N): not
    checked, no sync) of one layer's sketch keys [Hkv, N, w]; what a tail estimate takes
    out of the sketch's mass for the tokens it attends exactly. Ranks that are not powers
    of two >= 16 (packed int4: >= 32, two dots of half the rank) take the reference."""
    hkv, g, r = query.qr.shape
    if keys.dim() != 3 or keys.shape[0] != hkv or positions.shape[0] != hkv:
        raise ValueError(f"keys [Hkv={hkv}, N, w] and positions [Hkv, K] for a query of "
                         f"{hkv} kv heads; got {tuple(keys.shape)}, {tuple(positions.shape)}")
    device = keys.device
    packed = keys.dtype == torch.uint8
    if (not use_triton(device) or keys.shape[-1] != (r // 2 if packed else r)
            or r < (32 if packed else 16) or r & (r - 1) or keys.stride(-1) != 1
            or query.qr.stride(-1) != 1):
        return sketch_scores_at_ref(query, keys, positions)
    from retrieval_attn.kernels.sketch_query.kernel import sketch_scores_at_kernel

    k = positions.shape[1]
    out = torch.empty(hkv, g, k, dtype=torch.float32, device=device)
    if k == 0:
        return out
    sketch_scores_at_kernel[(hkv, -(-k // BLOCK))](
        query.qr, query.step, query.const, keys, positions, out, g, k,
        query.qr.stride(0), query.qr.stride(1), query.const.stride(0), keys.stride(0),
        keys.stride(1), positions.stride(0), out.stride(0), out.stride(1),
        R=r, G_PAD=max(MIN_HEAD_ROWS, next_power_of_2(g)), BLOCK=BLOCK, PACKED=packed,
        num_warps=NUM_WARPS)
    return out
