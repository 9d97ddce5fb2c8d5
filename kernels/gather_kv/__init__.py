"""gather_kv: bring the K and V rows of selected tokens, per kv head, to the output device.

The sources are one layer of a host KV store. In pinned host memory (`is_pinned()`) the
kernel reads them in place over PCIe (zero-copy, unified virtual addressing): no CPU gather,
no staging buffer, no host thread on the decode path. In device memory the same kernel is
an ordinary device gather (the fallback when a layer's KV is resident).

A quantised store (int8 rows, a scale per row in device memory) is read the same way, at
half the bytes; rows come out times their scales, in the model's dtype.

Where it runs: CUDA when idx is on a CUDA device; the Triton interpreter when idx is on the
CPU and TRITON_INTERPRET=1 (tests); otherwise (CPU without the interpreter) the reference
`gather_kv_ref`, which gives the same result.
"""

import torch

from retrieval_attn.kernels._launch import cdiv, next_power_of_2, use_triton
from retrieval_attn.kernels.gather_kv.ref import gather_kv_ref

__all__ = ["gather_k", "gather_kv", "gather_kv_ref"]

# Rows per tile of a program.
BLOCK_K = 16
NUM_WARPS = 4
# Programs per head of a launch from host memory, at most; each loops over its tiles. A
# program waiting on PCIe reads holds its SM slot the whole time, and the kernels beside
# it (decode's matmuls, attention) could not get onto those SMs: at 1M (H100, the
# 1m-single-gpu preset) one program per 16 rows (1024 for a layer's candidate keys) made
# a token 16.4-16.7 ms, 8 programs per head of 32-row tiles 15.6. A few tiles in flight
# per program still keep the link busy. Device sources take one program per tile.
MAX_HOST_PROGRAMS = 16
# Host memory read by one launch, at most. The GPU translates each zero-copy read of host
# memory, and scattered reads over a wide span miss its translation caches: on the H100,
# 8192 random rows per head of a 1M-token layer (4 heads, 1 GiB of K) were read at 15 GB/s
# in one launch, at 22 GB/s as two launches of 2 heads (512 MiB each); a 128K-token layer
# (128 MiB) at 38 GB/s. So the heads are gathered in groups spanning at most this.
MAX_HOST_SPAN = 512 << 20


def gather_kv(
    k_src: torch.Tensor,
    v_src: torch.Tensor,
    idx: torch.Tensor,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_host_span: int | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather k_src[h, idx[h, j]] and v_src[h, idx[h, j]] into [Hkv, K, D] outputs.

    Args:
        k_src, v_src: [Hkv, N, D], same shape and dtype. Last dim contiguous; other strides
            arbitrary (a slice of a [layers, Hkv, N, D] store is fine). Either pinned host
            memory (read zero-copy) or on idx's device.
        idx: [Hkv, K] int32 or int64 token indices per kv head, on the output device.
            Range is the caller's job: every index must lie in [0, N); an index out of
            range reads arbitrary memory (or faults), it is not checked here, since
            checking would need a device-to-host sync per call.
        out: optional preallocated (k_out, v_out), each [Hkv, K, D] on idx's device in the
            output dtype with last dim contiguous, reused across decode steps.
        max_host_span: bytes of host rows one launch may read (default MAX_HOST_SPAN);
            a benchmark's knob.
        scales: for int8 sources (a quantised store), each row's scale (k_scale, v_scale)
            [Hkv, N] on idx's device: a row comes out as its integers times its scale, in
            `dtype` (required then).

    Returns:
        (k_out, v_out): [Hkv, K, D] on idx's device, in dtype (the sources' by default).
    """
    dtype = _check_sources(k_src, v_src, idx, scales, dtype)
    hkv, _, d = k_src.shape
    device = idx.device
    k = idx.shape[1]
    if out is None:
        k_out = torch.empty(hkv, k, d, dtype=dtype, device=device)
        v_out = torch.empty(hkv, k, d, dtype=dtype, device=device)
    else:
        k_out, v_out = out
        for o in (k_out, v_out):
            if o.shape != (hkv, k, d) or o.dtype != dtype or o.device != device:
                raise ValueError(f"out tensors must be [{hkv}, {k}, {d}] {dtype} on "
                                 f"{device}; got {tuple(o.shape)} {o.dtype} on {o.device}")
            if o.stride(-1) != 1:
                raise ValueError("out tensors need a contiguous last dim")
    if k == 0 or hkv == 0:
        return k_out, v_out
    if not use_triton(device):
        return gather_kv_ref(k_src, v_src, idx, out=(k_out, v_out), scales=scales,
                             dtype=dtype)

    _launch(k_src, v_src, idx, k_out, v_out, True, max_host_span or MAX_HOST_SPAN, scales)
    return k_out, v_out


def gather_k(k_src: torch.Tensor, idx: torch.Tensor, max_host_span: int | None = None,
             scale: torch.Tensor | None = None, dtype: torch.dtype | None = None
             ) -> torch.Tensor:
    """Rows of one source only: k_src[h, idx[h, j]] -> [Hkv, K, D] on idx's device. Half the
    traffic of gather_kv: K of candidates whose values are not needed, or V of tokens whose
    keys are already on the device; same rules for where k_src may live (and the same
    max_host_span, and scale [Hkv, N] with dtype for an int8 source)."""
    scales = None if scale is None else (scale, scale)
    dtype = _check_sources(k_src, k_src, idx, scales, dtype)
    hkv, k, d = k_src.shape[0], idx.shape[1], k_src.shape[2]
    k_out = torch.empty(hkv, k, d, dtype=dtype, device=idx.device)
    if k == 0 or hkv == 0:
        return k_out
    if not use_triton(idx.device):
        return gather_kv_ref(k_src, k_src, idx, scales=scales, dtype=dtype)[0]
    _launch(k_src, k_src, idx, k_out, k_out, False, max_host_span or MAX_HOST_SPAN, scales)
    return k_out


def _check_scales(k_src: torch.Tensor, idx: torch.Tensor,
                  scales: tuple[torch.Tensor, torch.Tensor] | None,
                  dtype: torch.dtype | None) -> torch.dtype:
    """-> the output dtype."""
    if scales is None:
        if dtype not in (None, k_src.dtype):
            raise ValueError(f"rows of {k_src.dtype} sources come out as they are, not "
                             f"{dtype}: only int8 sources (with scales) convert")
        return k_src.dtype
    if k_src.dtype != torch.int8 or dtype is None or not dtype.is_floating_point:
        raise ValueError(f"scales go with int8 sources and a float output dtype; got "
                         f"{k_src.dtype} sources and dtype {dtype}")
    for s in scales:
        if s.shape != k_src.shape[:2] or s.device != idx.device:
            raise ValueError(f"scales must be [Hkv, N] = {tuple(k_src.shape[:2])} on "
                             f"{idx.device}; got {tuple(s.shape)} on {s.device}")
    return dtype


def _check_sources(k_src: torch.Tensor, v_src: torch.Tensor, idx: torch.Tensor,
                   scales: tuple[torch.Tensor, torch.Tensor] | None = None,
                   dtype: torch.dtype | None = None) -> torch.dtype:
    """Raise on bad arguments -> the output dtype."""
    if k_src.dim() != 3 or k_src.shape != v_src.shape:
        raise ValueError(f"k_src, v_src must both be [Hkv, N, D]; got {tuple(k_src.shape)} "
                         f"and {tuple(v_src.shape)}")
    if k_src.dtype != v_src.dtype or k_src.device != v_src.device:
        raise ValueError("k_src and v_src must share dtype and device")
    hkv, _, d = k_src.shape
    if idx.dim() != 2 or idx.shape[0] != hkv:
        raise ValueError(f"idx must be [Hkv={hkv}, K]; got {tuple(idx.shape)}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be int32 or int64; got {idx.dtype}")
    if k_src.stride(-1) != 1 or v_src.stride(-1) != 1:
        raise ValueError("k_src and v_src need a contiguous last dim")
    device = idx.device
    src_ok = k_src.device == device or (
        device.type == "cuda" and k_src.device.type == "cpu" and k_src.is_pinned()
        and v_src.is_pinned())
    if not src_ok:
        raise ValueError(f"sources on {k_src.device} cannot be read from {device}: host "
                         "sources must be pinned (tensor.pin_memory())")
    return _check_scales(k_src, idx, scales, dtype)


def _launch(k_src: torch.Tensor, v_src: torch.Tensor, idx: torch.Tensor, k_out: torch.Tensor,
            v_out: torch.Tensor, has_v: bool, max_span: int,
            scales: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    from retrieval_attn.kernels.gather_kv.kernel import gather_kv_kernel

    # A pinned CPU tensor is passed as is: Triton's CUDA launcher turns every pointer
    # argument into a device address with cuPointerGetAttribute(DEVICE_POINTER), which for
    # page-locked host memory returns its mapped (under UVA: identical) address. Pageable
    # host memory fails there ("cannot be accessed from Triton (cpu tensor?)"), hence the
    # is_pinned() check in _check_sources.
    hkv, k, d = k_src.shape[0], idx.shape[1], k_src.shape[2]
    span = k_src.shape[1] * k_src.stride(1) * k_src.element_size()  # one head's rows
    programs = cdiv(k, BLOCK_K)
    if k_src.is_cuda:
        step = hkv  # device memory: one launch
    elif has_v and 2 * span > max_span:  # K and V apart: half the span per launch
        k_scale, v_scale = scales or (None, None)
        _launch(k_src, k_src, idx, k_out, k_out, False, max_span,
                scales and (k_scale, k_scale))
        _launch(v_src, v_src, idx, v_out, v_out, False, max_span,
                scales and (v_scale, v_scale))
        return
    else:  # heads per launch, rounded to nearest: a store sized for 1M + a few decode
        # tokens spans a hair over 256 MiB a head and should still go two heads a launch
        # (one a launch read runs of 4 at 191 µs a layer against 165: bench --gathers at
        # 1048596 and 1048576 tokens, H100)
        step = max(1, round(max_span / (span * (2 if has_v else 1))))
        programs = min(programs, MAX_HOST_PROGRAMS)
    k_scale, v_scale = scales or (idx, idx)  # stand-ins: unread without HAS_SCALE
    for h in range(0, hkv, step):
        heads = slice(h, min(h + step, hkv))
        ks, vs, ix, ko, vo, kc, vc = (t[heads] for t in (k_src, v_src, idx, k_out, v_out,
                                                          k_scale, v_scale))
        gather_kv_kernel[(ks.shape[0], programs)](
            ks, vs, ix, ko, vo, kc, vc, k,
            *ks.stride()[:2], *vs.stride()[:2], *ix.stride(),
            *ko.stride()[:2], *vo.stride()[:2], *kc.stride(), *vc.stride(),
            D=d, BLOCK_K=BLOCK_K, BLOCK_D=next_power_of_2(d), HAS_V=has_v,
            HAS_SCALE=scales is not None, num_warps=NUM_WARPS,
        )
