"""append_token: a decode token's K, V into the store, window, tail sums and sketch, fused.

With torch ops a sparse decode step's append was about twenty small kernels per layer
(the store write, the window's ring arithmetic and two index copies, the tail's guarded
index_add, the sketch's centring, projection, rounding, clamping, cast and index copy); at
a few microseconds each, that was ~1.5 ms of a 1M-token step. Here it is one launch.

Where it runs: CUDA when k is on a CUDA device; the Triton interpreter on the CPU when
TRITON_INTERPRET=1 (tests); otherwise the reference `append_token_ref`. The kernel projects
the key in float32 with its own summation order, so an integer sketch value may differ by
one step from the reference's where the projection falls on a rounding boundary.
"""

import torch

from retrieval_attn.kernels._launch import next_power_of_2, use_triton
from retrieval_attn.kernels.append_token.ref import add_to_tail, append_token_ref
from retrieval_attn.kernels.formats import SketchLayer, TailLayer

__all__ = ["add_to_tail", "append_token", "append_token_ref"]

NUM_WARPS = 4


def append_token(
    pos: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    store: tuple[torch.Tensor, torch.Tensor],
    window: tuple[torch.Tensor, torch.Tensor],
    sinks: int,
    tail: TailLayer | None = None,
    sketch: SketchLayer | None = None,
    store_scale: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Write the token at position pos into one layer's decode state (see ref.py).

    Args:
        pos: [1] int tensor on k's device (no host sync: a CUDA graph may capture this).
        k, v: [R, D] the token's keys and values, last dim contiguous.
        store: (K, V) [R, N, D] in k's dtype: pinned host memory (written zero-copy) or on
            k's device. Positions must lie in [0, N) (not checked: no sync). int8 for a
            quantised store, with store_scale (K, V) [R, N] float16 on k's device: each
            row is written as its integers and its scale (formats.quantize_rows).
        window: (K, V) [R, S + W, D] on k's device; sinks = S.
        tail: the layer's TailLayer (sums [R, M, D] float32, last [R] int64), or None.
        sketch: the layer's SketchLayer, or None. Rank r even with r / 2 a power of two
            for the kernel (else the reference runs).
    """
    r_rows, d = k.shape
    device = k.device
    _check(pos, k, v, store, window, sinks, tail, sketch, store_scale)
    rank = sketch.basis.shape[-1] if sketch is not None else 2
    if not use_triton(device) or rank % 2 or rank // 2 != next_power_of_2(rank // 2):
        append_token_ref(pos, k, v, store, window, sinks, tail, sketch, store_scale)
        return
    from retrieval_attn.kernels.append_token.kernel import (
        FLOAT_SKETCH,
        INT4_SKETCH,
        INT8_SKETCH,
        NO_SKETCH,
        append_token_kernel,
    )

    sums, last, chunk = tail if tail is not None else (k, pos, 1)  # stand-ins: unread
    if sketch is None:
        mode, (mean, basis, scale, keys) = NO_SKETCH, (k, k[:, :, None], k, k[:, None])
    else:
        mode = {torch.int8: INT8_SKETCH, torch.uint8: INT4_SKETCH}.get(sketch.keys.dtype,
                                                                       FLOAT_SKETCH)
        mean, basis, scale, keys = sketch
    mode = mode.value  # a plain int for the launcher
    (sk, sv), (wk, wv) = store, window
    ck, cv = store_scale if store_scale is not None else (k, v)  # stand-ins: unread
    append_token_kernel[(r_rows,)](
        pos, k, v, sk, sv, wk, wv, ck, cv, sums, last, mean, basis, scale, keys,
        k.stride(0), v.stride(0), *sk.stride()[:2], *sv.stride()[:2], *ck.stride()[:2],
        *cv.stride()[:2], *wk.stride()[:2],
        *wv.stride()[:2], *sums.stride()[:2], mean.stride(0), *basis.stride()[:2],
        scale.stride(0), *keys.stride()[:2], sinks, wk.shape[1] - sinks,
        D=d, BLOCK_D=next_power_of_2(d), CHUNK=chunk, HAS_TAIL=tail is not None,
        SKETCH=mode, R_HALF=rank // 2, QUANT=store_scale is not None, num_warps=NUM_WARPS)


def _check(pos, k, v, store, window, sinks, tail, sketch, store_scale) -> None:
    r_rows, d = k.shape if k.dim() == 2 else (-1, -1)
    device = k.device
    if k.dim() != 2 or v.shape != k.shape or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"k, v must be [R, D] with a contiguous last dim; got "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if pos.shape != (1,) or pos.dtype not in (torch.int32, torch.int64) or pos.device != device:
        raise ValueError(f"pos must be [1] int32/int64 on {device}; got {tuple(pos.shape)} "
                         f"{pos.dtype} on {pos.device}")
    store_dtype = k.dtype if store_scale is None else torch.int8
    for name, t, dtype in (("store K", store[0], store_dtype), ("store V", store[1], store_dtype),
                           ("window K", window[0], k.dtype), ("window V", window[1], k.dtype)):
        if (t.dim() != 3 or t.shape[0] != r_rows or t.shape[2] != d or t.dtype != dtype
                or t.stride(-1) != 1):
            raise ValueError(f"{name} must be [R={r_rows}, N, D={d}] {dtype} with a "
                             f"contiguous last dim; got {tuple(t.shape)} {t.dtype}")
    for t in store_scale or ():
        if t.shape != store[0].shape[:2] or t.dtype != torch.float16 or t.device != device:
            raise ValueError(f"store_scale must be [R, N] = {tuple(store[0].shape[:2])} "
                             f"float16 on {device}; got {tuple(t.shape)} {t.dtype} on "
                             f"{t.device}")
    host_ok = device.type == "cuda" and store[0].is_pinned() and store[1].is_pinned()
    if store[0].device != device and not host_ok:
        raise ValueError(f"a store on {store[0].device} cannot be written from {device}: "
                         "host stores must be pinned")
    if window[0].device != device or not 0 <= sinks < window[0].shape[1]:
        raise ValueError(f"window must be on {device} with more slots than its {sinks} sinks")
    if tail is not None and (tail.sums.shape[::2] != (r_rows, d) or tail.last.shape != (r_rows,)
                             or tail.sums.dtype not in (torch.float32, torch.bfloat16)
                             or tail.last.dtype != torch.int64 or tail.chunk < 1):
        raise ValueError(f"tail must be sums [R={r_rows}, M, D={d}] float32 or bfloat16 and "
                         f"last [R] int64; got {tuple(tail.sums.shape)} {tail.sums.dtype}, "
                         f"{tuple(tail.last.shape)} {tail.last.dtype}")
    if sketch is not None:
        mean, basis, scale, keys = sketch
        r = basis.shape[-1]
        width = r // 2 if keys.dtype == torch.uint8 else r
        if (mean.shape != (r_rows, d) or basis.shape != (r_rows, d, r)
                or scale.shape != (r_rows, r) or keys.shape[::2] != (r_rows, width)
                or basis.stride(-1) != 1 or keys.stride(-1) != 1):
            raise ValueError(f"sketch must be mean [R, D], basis [R, D, r], scale [R, r], "
                             f"keys [R, N, r] (r / 2 packed int4) with contiguous last dims, "
                             f"R={r_rows}, D={d}; got {tuple(mean.shape)}, "
                             f"{tuple(basis.shape)}, {tuple(scale.shape)}, "
                             f"{tuple(keys.shape)} {keys.dtype}")
