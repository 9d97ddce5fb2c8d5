"""HostKVStore: layout, writes, memory accounting; huge-page registered memory on a GPU."""

import pytest
import torch

from retrieval_attn.offload import HostKVStore
from retrieval_attn.offload.host_store import HUGE_2M, _thp_mode


def test_pageable_store_writes_and_counts_its_bytes():
    store = HostKVStore(2, 3, 40, 16, torch.bfloat16, pin=False)
    assert store.backing == "pageable" and store.k.shape == (2, 3, 40, 16)
    assert not store.k.any() and not store.v.any()
    k, v = torch.randn(3, 5, 16).bfloat16(), torch.randn(3, 5, 16).bfloat16()
    store.write(1, 7, k, v)
    assert torch.equal(store.k[1, :, 7:12], k) and torch.equal(store.v[1, :, 7:12], v)
    assert store.memory_bytes() == {"host": 2 * 2 * 3 * 40 * 16 * 2}
    with pytest.raises(IndexError):
        store.write(0, 38, k, v)


def test_thp_mode_is_one_of_the_kernel_settings():
    assert _thp_mode() in ("always", "madvise", "never", "unknown")


@pytest.mark.gpu
@pytest.mark.parametrize("huge_pages", ["auto", "off"])
def test_pinned_store_is_read_zero_copy_by_the_gather(huge_pages):
    from retrieval_attn.kernels import gather_kv, gather_kv_ref

    L, hkv, n, d = 2, 4, 70000, 128
    store = HostKVStore(L, hkv, n, d, torch.bfloat16, pin=True, huge_pages=huge_pages)
    assert store.k.is_pinned() and store.v.is_pinned()
    if huge_pages == "off":
        assert store.backing == "pinned"
    nbytes = L * hkv * n * d * 2
    held = store.memory_bytes()["host"]
    if store.backing == "pinned":
        assert held == 2 * nbytes
    else:  # whole huge pages
        assert held % (2 * HUGE_2M) == 0 and 2 * nbytes <= held < 2 * nbytes + 2 * 2**30 + 1
    k = torch.randn(hkv, n, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(hkv, n, d, device="cuda", dtype=torch.bfloat16)
    store.write(1, 0, k, v)
    torch.cuda.synchronize()
    idx = torch.randint(0, n, (hkv, 2048), device="cuda")
    k_out, v_out = gather_kv(store.k[1], store.v[1], idx)
    k_ref, v_ref = gather_kv_ref(k, v, idx)
    assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)
    del store, k_out, v_out  # unregisters and unmaps; a second store must be fine
    again = HostKVStore(L, hkv, n, d, torch.bfloat16, pin=True, huge_pages=huge_pages)
    assert again.k.is_pinned() and not again.k[1].any()
