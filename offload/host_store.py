"""HostKVStore: full K (post-RoPE, as attended) and V of every token, in host memory."""

from __future__ import annotations

import torch

from ..errors import ConfigError


class HostKVStore:
    """K, V [L, Hkv, N, D] in host memory, pinned when a GPU will read it.

    Pinned memory lets the gather kernel read selected rows straight from the GPU
    (zero-copy over PCIe) instead of staging a CPU-side gather. It is pinned by
    registering ordinary memory with CUDA (cudaHostRegister), not by torch's pinned
    allocator: that one rounds every block up to a power of two, so a 33 GiB K would take
    64 GiB of the host. Registration pins exactly the bytes asked for; it is undone when
    the store is deleted (views of k, v must not outlive it on the GPU's read path).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, max_tokens: int, head_dim: int,
                 dtype: torch.dtype, pin: bool) -> None:
        shape = (num_layers, num_kv_heads, max_tokens, head_dim)
        self._registered: list[int] = []  # host addresses registered with CUDA
        self.k = self._allocate(shape, dtype, pin)
        self.v = self._allocate(shape, dtype, pin)
        self.max_tokens = max_tokens

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
        t = torch.zeros(shape, dtype=dtype)
        nbytes = t.numel() * t.element_size()
        if pin and nbytes:
            err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)
            if int(err) != 0:
                raise ConfigError(f"could not pin {nbytes / 2**30:.2f} GiB of host memory for "
                                  f"the KV store (cudaHostRegister: {err}): lower "
                                  "runtime.max_context_tokens or runtime.max_batch, or free "
                                  "host memory")
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
        self.k[layer, heads, start:end].copy_(k, non_blocking=True)
        self.v[layer, heads, start:end].copy_(v, non_blocking=True)

    def memory_bytes(self) -> dict[str, int]:
        return {"host": 2 * self.k.numel() * self.k.element_size()}
