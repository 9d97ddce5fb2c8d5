"""select_topk: each row's k largest values as indices in increasing order, one launch.

torch.topk of a few short rows (the re-rank's 2048 of 4096 candidates per kv head) runs one
thread block per row and took ~20 µs a layer on the H100; this keeps the row in registers
and radix-selects the cut. Ties at the cut keep the lower indices (torch.topk may keep
others: same values, other positions).

Where it runs: CUDA when x is on a CUDA device; the Triton interpreter on the CPU when
TRITON_INTERPRET=1 (tests); otherwise, or for rows longer than MAX_COLUMNS, the reference.
"""

import torch

from retrieval_attn.kernels._launch import next_power_of_2, use_triton
from retrieval_attn.kernels.select_topk.ref import select_topk_ref, select_topk_values_ref

__all__ = ["select_topk", "select_topk_ref", "select_topk_values", "select_topk_values_ref",
           "topk_indices"]

MAX_COLUMNS = 8192  # a row lives in registers: longer rows take the reference
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
    if not use_triton(x.device) or c > MAX_COLUMNS or x.stride(-1) != 1:
        return select_topk_ref(x, k)
    from retrieval_attn.kernels.select_topk.kernel import select_topk_kernel

    out = torch.empty(rows, k, dtype=torch.int64, device=x.device)
    if k == 0 or rows == 0:
        return out
    select_topk_kernel[(rows,)](x, out, x, out, c, k, x.stride(0), out.stride(0), 0, 0,
                                BLOCK_C=next_power_of_2(c), LOW_BITS=LOW_BITS.get(x.dtype, 0),
                                HAS_VALUES=False, ALWAYS=0, ALWAYS_PAD=1, num_warps=NUM_WARPS)
    return out


def select_topk_values(x: torch.Tensor, k: int, values: torch.Tensor, always: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """select_topk's columns of x [R, C], then the `always` columns C .. C + always - 1
    after them (kept whatever their score), and values [R, C + always] at those columns:
    -> (columns [R, k + always] int64, values [R, k + always]). One launch on a GPU: a
    re-rank's chosen candidates and their positions (the partial block always kept)."""
    if x.dim() != 2 or not 0 <= k <= x.shape[1] or always < 0:
        raise ValueError(f"select_topk_values takes x [R, C], 0 <= k <= C and always >= 0; "
                         f"got {tuple(x.shape)}, k={k}, always={always}")
    rows, c = x.shape
    if values.shape != (rows, c + always) or values.device != x.device:
        raise ValueError(f"values must be [R, C + always] = [{rows}, {c + always}] on "
                         f"{x.device}; got {tuple(values.shape)} on {values.device}")
    if (not use_triton(x.device) or c > MAX_COLUMNS or x.stride(-1) != 1
            or values.stride(-1) != 1):
        return select_topk_values_ref(x, k, values, always)
    from retrieval_attn.kernels.select_topk.kernel import select_topk_kernel

    out = torch.empty(rows, k + always, dtype=torch.int64, device=x.device)
    taken = torch.empty(rows, k + always, dtype=values.dtype, device=x.device)
    if rows == 0 or k + always == 0:
        return out, taken
    select_topk_kernel[(rows,)](x, out, values, taken, c, k, x.stride(0), out.stride(0),
                                values.stride(0), taken.stride(0),
                                BLOCK_C=next_power_of_2(c), LOW_BITS=LOW_BITS.get(x.dtype, 0),
                                HAS_VALUES=True, ALWAYS=always,
                                ALWAYS_PAD=next_power_of_2(max(always, 1)),
                                num_warps=NUM_WARPS)
    return out, taken


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [R, C] -> [R, k] int64 column indices of each row's k largest values, in no
    promised order (the set torch.topk(x, k).indices holds, up to ties).

    For rows longer than one program holds (the candidate runs of a 1M-token layer:
    262K block sums a row), in stages of select_topk: the top k of each MAX_COLUMNS
    columns, then of those, until one chunk is left: 3 launches at 1M, where torch.topk
    takes ~15 small ones, each waiting for the SMs the decode step's matmuls hold (H100
    profile). Needs 4k <= MAX_COLUMNS (each stage keeps at most a quarter) and no -inf
    in x (a short chunk pads with -inf); elsewhere (CPU without the interpreter, larger
    k) torch.topk."""
    if x.dim() != 2 or not 0 <= k <= x.shape[1]:
        raise ValueError(f"topk_indices takes x [R, C] and 0 <= k <= C; got "
                         f"{tuple(x.shape)}, k={k}")
    rows, c = x.shape
    if not use_triton(x.device) or 4 * k > MAX_COLUMNS or k == 0 or x.stride(-1) != 1:
        return x.topk(k, dim=-1, sorted=False).indices
    from retrieval_attn.kernels.select_topk.kernel import select_topk_chunks_kernel

    values = None
    while True:
        chunks = -(-c // MAX_COLUMNS)
        xo = torch.empty(rows, chunks, k, dtype=x.dtype, device=x.device)
        vo = torch.empty(rows, chunks, k, dtype=torch.int64, device=x.device)
        select_topk_chunks_kernel[(rows, chunks)](
            x, x if values is None else values, xo, vo, c, k, x.stride(0),
            0 if values is None else values.stride(0), xo.stride(0), xo.stride(1),
            CHUNK=MAX_COLUMNS, LOW_BITS=LOW_BITS.get(x.dtype, 0),
            HAS_VALUES=values is not None, num_warps=NUM_WARPS)
        if chunks == 1:
            return vo[:, 0]
        x, values, c = xo.view(rows, -1), vo.view(rows, -1), chunks * k
