"""HostKVStore: full K (post-RoPE, as attended) and V of every token, in host memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import torch

LOG = logging.getLogger(__name__)

HUGE_2M = 1 << 21
HUGE_1G = 1 << 30
# Linux mmap/madvise constants (asm-generic; the same on x86-64 and arm64).
PROT_RW = 0x1 | 0x2
MAP_PRIVATE, MAP_ANONYMOUS, MAP_HUGETLB, MAP_HUGE_SHIFT = 0x02, 0x20, 0x40000, 26
MADV_HUGEPAGE = 14
DEFAULT_HUGE_PAGES = "auto"  # HostKVStore's huge_pages when not given (benchmarks flip it)
MAP_FAILED = ctypes.c_void_p(-1).value
# cudaHostRegisterPortable | cudaHostRegisterMapped: visible to every context, and a
# device address exists (under UVA it is the host address itself).
CUDA_HOST_REGISTER_FLAGS = 0x1 | 0x2


class HostKVStore:
    """K, V [L, Hkv, N, D] in host memory, page-locked when a GPU will read it.

    Page-locked memory lets the gather kernel read selected rows straight from the GPU
    (zero-copy over PCIe) instead of staging a CPU-side gather. With pin=True each of K
    and V is, by preference, huge-page memory registered with CUDA (`backing` says which
    one was had): decode reads scattered rows of the whole store, so each read is likely a
    GPU TLB miss, and 2 MB pages cover 512 times more of a 60 GB store per TLB entry than
    4 KB ones. Without huge pages it is torch's pinned memory. huge_pages: "auto" tries
    hugetlbfs (1 GB, then 2 MB pages), then transparent huge pages; "off" uses torch.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, max_tokens: int, head_dim: int,
                 dtype: torch.dtype, pin: bool, huge_pages: str | None = None) -> None:
        shape = (num_layers, num_kv_heads, max_tokens, head_dim)
        huge_pages = huge_pages or DEFAULT_HUGE_PAGES
        self.k, backing_k, self._k_bytes = _host_tensor(shape, dtype, pin, huge_pages)
        self.v, backing_v, self._v_bytes = _host_tensor(shape, dtype, pin, huge_pages)
        self.backing = backing_k if backing_k == backing_v else f"{backing_k}/{backing_v}"
        self.max_tokens = max_tokens
        if pin:
            LOG.info("host KV store: %.2f GiB in %s memory",
                     (self._k_bytes + self._v_bytes) / 2**30, self.backing)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [Hkv, T, D] (any device) -> slots [start, start + T) of the layer."""
        end = start + k.shape[1]
        if end > self.max_tokens:
            raise IndexError(f"host KV store holds {self.max_tokens} tokens; write ends at {end}")
        self.k[layer, :, start:end].copy_(k, non_blocking=True)
        self.v[layer, :, start:end].copy_(v, non_blocking=True)

    def memory_bytes(self) -> dict[str, int]:
        """Host bytes held: the tensors, rounded up to whole huge pages where used."""
        return {"host": self._k_bytes + self._v_bytes}


def _host_tensor(shape: tuple[int, ...], dtype: torch.dtype, pin: bool,
                 huge_pages: str) -> tuple[torch.Tensor, str, int]:
    """A zeroed host tensor -> (tensor, backing, bytes held)."""
    nbytes = dtype.itemsize
    for s in shape:
        nbytes *= s
    if pin and huge_pages != "off" and nbytes > 0 and torch.cuda.is_available():
        try:
            region = _HugeRegion(nbytes)
        except OSError as e:
            LOG.info("no huge-page registered host memory (%s); using torch's pinned memory", e)
        else:
            return region.tensor(dtype, shape), region.backing, region.length
    t = torch.zeros(shape, dtype=dtype, pin_memory=pin)
    return t, ("pinned" if pin else "pageable"), nbytes


class _HugeRegion:
    """Anonymous huge-page memory, page-locked and mapped for CUDA (cudaHostRegister);
    unregistered and unmapped when the last tensor viewing it is gone."""

    def __init__(self, nbytes: int) -> None:
        libc = _libc()
        self._libc, self._cudart = libc, torch.cuda.cudart()
        self.base = self.map_length = 0
        for page, label in ((HUGE_1G, "hugetlb-1g"), (HUGE_2M, "hugetlb-2m")):
            length = -(-nbytes // page) * page
            flags = (MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB
                     | (page.bit_length() - 1) << MAP_HUGE_SHIFT)
            addr = libc.mmap(None, length, PROT_RW, flags, -1, 0)
            if addr not in (None, MAP_FAILED):
                self.base = self.ptr = addr
                self.map_length = self.length = length
                self.backing = label
                break
        else:  # transparent huge pages: a 2 MB-aligned anonymous range, advised
            if _thp_mode() == "never":
                raise OSError("hugetlbfs pages unavailable and transparent huge pages are off")
            self.length = -(-nbytes // HUGE_2M) * HUGE_2M
            self.map_length = self.length + HUGE_2M  # room to align the start
            addr = libc.mmap(None, self.map_length, PROT_RW, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            if addr in (None, MAP_FAILED):
                raise OSError(f"mmap of {self.map_length} bytes failed: {_errno()}")
            self.base, self.ptr = addr, -(-addr // HUGE_2M) * HUGE_2M
            self.backing = "thp"
            if libc.madvise(ctypes.c_void_p(self.ptr), self.length, MADV_HUGEPAGE) != 0:
                self._unmap()
                raise OSError(f"madvise(MADV_HUGEPAGE) failed: {_errno()}")
        err = int(self._cudart.cudaHostRegister(self.ptr, self.length, CUDA_HOST_REGISTER_FLAGS))
        if err != 0:
            self._unmap()
            raise OSError(f"cudaHostRegister failed with CUDA error {err}")
        self.registered = True

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        buf = (ctypes.c_uint8 * (n * dtype.itemsize)).from_address(self.ptr)
        buf.region = self  # the tensor keeps buf alive (frombuffer), buf keeps the region
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)

    def _unmap(self) -> None:
        if self.base:
            self._libc.munmap(ctypes.c_void_p(self.base), self.map_length)
            self.base = 0

    def __del__(self) -> None:
        if getattr(self, "registered", False):
            self._cudart.cudaHostUnregister(self.ptr)
            self.registered = False
        self._unmap()


def _libc():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _errno() -> str:
    return os.strerror(ctypes.get_errno())


def _thp_mode() -> str:
    """The kernel's transparent huge page setting: always, madvise, never (or unknown)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "unknown"
    return text.split("[")[1].split("]")[0] if "[" in text else "unknown"
