"""KVStore: full K (post-RoPE, as attended) and V of every token, in host memory (or,
with kv.store_on device, in the GPU's own memory where the budget has room for it)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from retrieval_attn.errors import ConfigError
from retrieval_attn.kernels.formats import dequantize_rows, quantize_rows
from retrieval_attn.kernels.gather_kv import gather_k, gather_kv, gather_kv_ref


class KVStore:
    """K, V [L, Hkv, N, D] in host memory, pinned when a GPU will read it (or on the
    device: rows_device below).

    Pinned memory lets the gather kernel read selected rows straight from the GPU
    (zero-copy over PCIe) instead of staging a CPU-side gather. It is pinned by
    registering ordinary memory with CUDA (cudaHostRegister), not by torch's pinned
    allocator: that one rounds every block up to a power of two, so a 33 GiB K would take
    64 GiB of the host. Registration pins exactly the bytes asked for; it is undone when
    the store is deleted (views of k, v must not outlive it on the GPU's read path).

    Quantised (kv.host_dtype int8), k and v hold int8 rows and k_scale, v_scale
    [L, Hkv, N] float16 each row's scale, in device memory (kernels.quantize_rows): the
    host holds and the link carries half the bytes, and rows read back as ints * scale in
    `dtype`.

    rows_device (kv.store_on device): k, v live there instead, the same gather kernels
    read them from HBM rather than over PCIe (decode reads no host memory at all), for
    the GPU memory they take (the planner counts them there).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, max_tokens: int, head_dim: int,
                 dtype: torch.dtype, pin: bool, quantized: bool = False,
                 scale_device: torch.device | str = "cpu",
                 rows_device: torch.device | str | None = None) -> None:
        shape = (num_layers, num_kv_heads, max_tokens, head_dim)
        self._registered: list[int] = []  # host addresses registered with CUDA
        self.dtype = dtype  # rows read back in it
        rows = torch.int8 if quantized else dtype
        if rows_device is not None:
            self.k, self.v = (torch.zeros(shape, dtype=rows, device=rows_device)
                              for _ in range(2))
        else:
            self.k = self._allocate(shape, rows, pin)
            self.v = self._allocate(shape, rows, pin)
        self.k_scale = self.v_scale = None
        if quantized:
            self.k_scale, self.v_scale = (torch.zeros(shape[:3], dtype=torch.float16,
                                                      device=scale_device) for _ in range(2))
        self.max_tokens = max_tokens

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def pinned(self) -> bool:
        """Whether host memory was registered with CUDA for the GPU to read (a host store
        on a GPU machine)."""
        return bool(self._registered)

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
        t = torch.zeros(shape, dtype=dtype)
        nbytes = t.numel() * t.element_size()
        if pin and nbytes:
            err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)
            if int(err) != 0:
                raise ConfigError(f"could not pin {nbytes / 2**30:.2f} GiB of host memory for "
                                  f"the KV store (cudaHostRegister: {err}): lower "
                                  "runtime.max_context_tokens or runtime.max_batch, set "
                                  "kv.host_dtype int8, or free host memory")
            self._registered.append(t.data_ptr())
        return t

    def __del__(self) -> None:
        if self._registered:  # copies into, and kernels reading, the range must be done
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001 - at interpreter exit CUDA may be gone already
                pass
        for ptr in self._registered:  # before k, v are freed with the instance
            try:
                torch.cuda.cudart().cudaHostUnregister(ptr)
            except Exception:  # noqa: BLE001 - at interpreter exit CUDA may be gone already
                pass
        self._registered = []

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor,
              heads: slice = slice(None)) -> None:
        """k, v [Hkv, T, D] (any device) -> slots [start, start + T) of the layer's heads."""
        end = start + k.shape[1]
        if end > self.max_tokens:
            raise IndexError(f"host KV store holds {self.max_tokens} tokens; write ends at {end}")
        if not self.quantized:
            self.k[layer, heads, start:end].copy_(k, non_blocking=True)
            self.v[layer, heads, start:end].copy_(v, non_blocking=True)
            return
        # a chunk of tokens at a time: quantising takes float32 temporaries of its rows
        for i in range(0, k.shape[1], QUANTIZE_TOKENS):
            at = slice(start + i, min(start + i + QUANTIZE_TOKENS, end))
            for rows, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
                ints, scale = quantize_rows(x[:, i:i + QUANTIZE_TOKENS])
                rows[layer, heads, at].copy_(ints, non_blocking=True)
                scales[layer, heads, at].copy_(scale, non_blocking=True)

    def layer_rows(self, layer: int) -> tuple[StoreRows, StoreRows]:
        """One layer's K and V rows [Hkv, N, D] with their scales [Hkv, N] (None unless
        quantised), as the gather kernels read them."""
        return (StoreRows(self.k[layer], None if self.k_scale is None else self.k_scale[layer]),
                StoreRows(self.v[layer], None if self.v_scale is None else self.v_scale[layer]))

    def gather(self, layer: int, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [R, K, D] of positions [R, K] in `dtype` (an int8 store's rows times their
        scales), on positions' device: one gather_kv launch on a GPU, which reads pinned
        host rows directly; its reference elsewhere (not the interpreter)."""
        keys, values = self.layer_rows(layer)
        fn, quantized = (gather_kv if positions.is_cuda else gather_kv_ref), self.quantized
        return fn(keys.rows, values.rows, positions,
                  scales=(keys.scale, values.scale) if quantized else None,
                  dtype=self.dtype if quantized else None)

    def gather_keys(self, layer: int, positions: torch.Tensor) -> torch.Tensor:
        """K [R, C, D] of positions [R, C] (a re-rank's candidates), as gather's."""
        return self._gather_rows(self.layer_rows(layer)[0], positions)

    def gather_values(self, layer: int, positions: torch.Tensor) -> torch.Tensor:
        """V [R, K, D] of positions [R, K], as gather's (where the keys are at hand)."""
        return self._gather_rows(self.layer_rows(layer)[1], positions)

    def _gather_rows(self, src: StoreRows, positions: torch.Tensor) -> torch.Tensor:
        """One layer of K or of V, rows at positions [R, C] -> [R, C, D] in `dtype`. The
        kernel on a GPU, else its reference (not the interpreter, which tests may have
        switched on for the whole process: it made every CPU retrieval decode of the test
        suite ~5x slower)."""
        dtype = None if src.scale is None else self.dtype
        if positions.is_cuda:
            return gather_k(src.rows, positions, scale=src.scale, dtype=dtype)
        scales = None if src.scale is None else (src.scale, src.scale)
        return gather_kv_ref(src.rows, src.rows, positions, scales=scales, dtype=dtype)[0]

    def read(self, layer: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [lo, hi) of a layer as K, V [Hkv, hi - lo, D] in `dtype` on the host
        (dequantised when quantised; views of a store in host memory otherwise): saving a
        context, host indexes, diagnostics."""
        if not self.quantized:
            return self.k[layer, :, lo:hi].cpu(), self.v[layer, :, lo:hi].cpu()
        return tuple(dequantize_rows(rows[layer, :, lo:hi].cpu(),
                                     scales[layer, :, lo:hi].cpu(), self.dtype)
                     for rows, scales in ((self.k, self.k_scale), (self.v, self.v_scale)))

    def memory_bytes(self) -> dict[str, int]:
        place = "gpu" if self.k.is_cuda else "host"
        out = {place: 2 * self.k.numel() * self.k.element_size()}
        if self.quantized:
            place = "gpu" if self.k_scale.is_cuda else "host"
            out[place] = out.get(place, 0) + 2 * self.k_scale.numel() * 2
        return out


class StoreRows(NamedTuple):
    """One layer's rows [Hkv, N, D] of K or V in the store, and their scales [Hkv, N]
    (None for a float store)."""

    rows: torch.Tensor
    scale: torch.Tensor | None


# tokens quantised at a time when a prompt is stored: bounds the float32 temporaries
QUANTIZE_TOKENS = 1 << 16
