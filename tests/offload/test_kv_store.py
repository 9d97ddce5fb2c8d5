"""KVStore: exact-size host memory, pinned by registration where a GPU reads it (or the
GPU's own memory, kv.store_on device)."""

from __future__ import annotations

import pytest
import torch

from retrieval_attn.kernels.gather_kv import gather_kv, gather_kv_ref
from retrieval_attn.kernels.store_kv import store_kv
from retrieval_attn.offload.kv_store import KVStore


def test_write_fills_the_given_heads_only():
    store = KVStore(2, 4, 10, 8, torch.float32, pin=False)
    k, v = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    store.write(1, 3, k, v, slice(2, 4))
    assert torch.equal(store.k[1, 2:4, 3:9], k) and torch.equal(store.v[1, 2:4, 3:9], v)
    assert store.k[1, :2].abs().sum() == 0 and store.k[0].abs().sum() == 0
    assert store.memory_bytes() == {"host": 2 * 2 * 4 * 10 * 8 * 4}
    with pytest.raises(IndexError, match="holds 10 tokens"):
        store.write(0, 8, k, v)


@pytest.mark.gpu
def test_registered_store_is_pinned_exact_and_read_by_the_kernels():
    # 3 MiB + a bit per tensor: torch's pinned allocator would round it to 4 MiB
    L, Hkv, N, D = 3, 2, 4100, 64
    store = KVStore(L, Hkv, N, D, torch.bfloat16, pin=True)
    assert store.k.is_pinned() and store.v.is_pinned()
    assert store.k.untyped_storage().nbytes() == L * Hkv * N * D * 2  # no rounding
    k = torch.randn(Hkv, N, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(Hkv, N, D, device="cuda", dtype=torch.bfloat16)
    store.write(1, 0, k, v)
    torch.cuda.synchronize()
    new_k = torch.randn(Hkv, 1, D, device="cuda", dtype=torch.bfloat16)
    store_kv(store.k[1], store.v[1], torch.tensor([N - 1], device="cuda"), new_k, new_k)
    idx = torch.randint(0, N, (Hkv, 300), device="cuda")
    idx[:, 0] = N - 1
    got_k, got_v = gather_kv(store.k[1], store.v[1], idx)  # zero-copy reads
    torch.cuda.synchronize()
    want_k, want_v = gather_kv_ref(store.k[1], store.v[1], idx.cpu())
    assert torch.equal(got_k.cpu(), want_k) and torch.equal(got_v.cpu(), want_v)
    assert torch.equal(got_k[:, 0].cpu(), new_k[:, 0].cpu())
    del store  # unregisters; a second store at the same size registers again
    again = KVStore(L, Hkv, N, D, torch.bfloat16, pin=True)
    assert again.k.is_pinned()


def test_quantized_store_keeps_int8_rows_and_reads_back_within_half_a_step(monkeypatch):
    from retrieval_attn.kernels.formats import quantize_rows
    from retrieval_attn.offload import kv_store

    monkeypatch.setattr(kv_store, "QUANTIZE_TOKENS", 4)  # several pieces per write
    store = KVStore(2, 3, 20, 16, torch.float32, pin=False, quantized=True)
    k, v = torch.randn(3, 11, 16) * 5, torch.randn(3, 11, 16)
    store.write(1, 6, k, v)
    assert store.k.dtype == torch.int8 and store.k_scale.dtype == torch.float16
    ints, scale = quantize_rows(k)  # in one piece: the same rows
    assert torch.equal(store.k[1, :, 6:17], ints) and torch.equal(store.k_scale[1, :, 6:17],
                                                                  scale)
    k_back, v_back = store.read(1, 6, 17)
    assert k_back.dtype == torch.float32
    for x, back, s in ((k, k_back, store.k_scale), (v, v_back, store.v_scale)):
        assert ((back - x).abs() <= s[1, :, 6:17, None].float() / 2 + 1e-6).all()
    assert store.read(0, 0, 20)[0].abs().sum() == 0
    keys, values = store.layer_rows(1)
    assert keys.rows.dtype == torch.int8 and values.scale.shape == (3, 20)
    assert store.memory_bytes() == {"host": 2 * 2 * 3 * 20 * 16 + 2 * 2 * 3 * 20 * 2}


@pytest.mark.gpu
@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "int8"])
def test_store_on_the_device_reads_back_on_the_host_and_counts_as_gpu(quantized):
    """kv.store_on device: the rows live in GPU memory (nothing pinned), the gather kernels
    read them there, read() still hands the host the same rows as a host store's."""
    L, Hkv, N, D = 2, 2, 300, 64
    k = torch.randn(Hkv, N, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(Hkv, N, D, device="cuda", dtype=torch.bfloat16)
    stores = [KVStore(L, Hkv, N, D, torch.bfloat16, pin=rows is None, quantized=quantized,
                      scale_device="cuda", rows_device=rows) for rows in (None, "cuda")]
    host, device = stores
    assert device.k.is_cuda and not device.pinned and host.pinned and host.k.is_pinned()
    for store in stores:
        store.write(1, 0, k, v)
    torch.cuda.synchronize()
    for a, b in zip(host.read(1, 5, 250), device.read(1, 5, 250), strict=True):
        assert a.device.type == b.device.type == "cpu" and torch.equal(a, b)
    rows = 2 * L * Hkv * N * D * (1 if quantized else 2)
    scales = 2 * L * Hkv * N * 2 if quantized else 0
    assert device.memory_bytes() == {"gpu": rows + scales}
    assert host.memory_bytes() == ({"host": rows, "gpu": scales} if quantized
                                   else {"host": rows})
    idx = torch.randint(0, N, (Hkv, 100), device="cuda")
    got = []
    for store in stores:
        keys, values = store.layer_rows(1)
        got.append(gather_kv(keys.rows, values.rows, idx,
                             scales=(keys.scale, values.scale) if quantized else None,
                             dtype=torch.bfloat16 if quantized else None))
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
