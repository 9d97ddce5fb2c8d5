"""select_topk: each row's k largest values as indices in increasing order, one launch.

torch.topk of a few short rows (the re-rank's 2048 of 4096 candidates per kv head) runs one
thread block per row and took ~20 µs a layer on the H100; this keeps the row in registers
and radix-selects the cut. Ties at the cut keep the lower indices (torch.topk may keep
others: same values, other positions).

Where it runs: CUDA when x is on a CUDA device; the Triton interpreter on the CPU when
TRITON_INTERPRET=1 (tests); otherwise, or for rows longer than MAX_COLUMNS, the reference.
"""

import torch

from .._launch import next_power_of_2, use_triton
from .ref import select_topk_ref

__all__ = ["select_topk", "select_topk_ref"]

MAX_COLUMNS = 8192  # a row lives in registers; longer 16-bit rows are split over programs
SLICE = 4096  # positions per program of a long row
NUM_WARPS = 8
# float32 bits below a 16-bit float's mantissa: equal in every value, so not searched
# (H100, [4, 4096] bfloat16, k 2048: 11.4 µs searching all 32 bits; torch.topk 20.7)
LOW_BITS = {torch.bfloat16: 16, torch.float16: 13}


def select_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [R, C] float16/bfloat16/float32 (no NaN) -> [R, k] int64 indices of each row's k
    largest values, increasing; 0 <= k <= C."""
    if x.dim() != 2 or not 0 <= k <= x.shape[1]:
        raise ValueError(f"select_topk takes x [R, C] and 0 <= k <= C; got "
                         f"{tuple(x.shape)}, k={k}")
    rows, c = x.shape
    long = c > MAX_COLUMNS
    if not use_triton(x.device) or x.stride(-1) != 1 or (long and x.dtype not in LOW_BITS):
        if long and x.is_cuda:  # float32: torch's top-k (ties kept as it keeps them)
            return x.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
        return select_topk_ref(x, k)
    out = torch.empty(rows, k, dtype=torch.int64, device=x.device)
    if k == 0 or rows == 0:
        return out
    if long:
        return _select_long(x, k, out)
    from .kernel import select_topk_kernel

    select_topk_kernel[(rows,)](x, out, c, k, x.stride(0), out.stride(0),
                                BLOCK_C=next_power_of_2(c), LOW_BITS=LOW_BITS.get(x.dtype, 0),
                                num_warps=NUM_WARPS)
    return out


def _select_long(x: torch.Tensor, k: int, out: torch.Tensor) -> torch.Tensor:
    """Rows over MAX_COLUMNS of a 16-bit float: radix select over programs of SLICE
    positions (kernel.py), four launches."""
    from .kernel import topk_count_kernel, topk_hist_kernel, topk_write_kernel

    rows, c = x.shape
    n_slices = -(-c // SLICE)
    hist = torch.zeros(2, rows, 512, dtype=torch.int32, device=x.device)
    counts = torch.empty(rows, n_slices, 2, dtype=torch.int32, device=x.device)
    grid = (rows, n_slices)
    for level in (1, 2):
        topk_hist_kernel[grid](x, hist[0], hist[1], c, k, x.stride(0), SLICE=SLICE,
                               LEVEL=level, num_warps=NUM_WARPS)
    topk_count_kernel[grid](x, hist[0], hist[1], counts, c, k, x.stride(0), counts.stride(0),
                            SLICE=SLICE, num_warps=NUM_WARPS)
    topk_write_kernel[grid](x, hist[0], hist[1], counts, out, c, k, n_slices, x.stride(0),
                            counts.stride(0), out.stride(0), SLICE=SLICE,
                            S_PAD=next_power_of_2(n_slices), num_warps=NUM_WARPS)
    return out
