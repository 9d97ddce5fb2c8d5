"""store_kv against store_kv_ref: a copy, so results must match exactly."""

import pytest
import torch

from retrieval_attn.kernels.store_kv import store_kv, store_kv_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("hkv, n, d, t, dtype", [
    pytest.param(1, 10, 64, 1, torch.float32, id="one-row"),
    pytest.param(3, 100, 64, 5, torch.bfloat16, id="five-rows-bf16"),
    pytest.param(2, 257, 48, 3, torch.float16, id="d48-fp16"),
])
def test_store_matches_reference(hkv, n, d, t, dtype):
    dst = [torch.randn(3, hkv, n, d).to(dtype)[1] for _ in range(2)]  # layer slices
    ref = [x.clone() for x in dst]
    pos = torch.randperm(n)[:t].to(DEVICE)
    new = [torch.randn(hkv, t, d).to(dtype).to(DEVICE) for _ in range(2)]
    dst = [x.to(DEVICE) for x in dst]
    store_kv(dst[0], dst[1], pos, new[0], new[1])
    store_kv_ref(ref[0], ref[1], pos.cpu(), new[0].cpu(), new[1].cpu())
    assert torch.equal(dst[0].cpu(), ref[0]) and torch.equal(dst[1].cpu(), ref[1])


def test_rejects_mismatched_rows():
    dst = torch.zeros(2, 8, 16)
    with pytest.raises(ValueError, match="k_new"):
        store_kv(dst, dst.clone(), torch.tensor([1]), torch.zeros(2, 2, 16), torch.zeros(2, 1, 16))


@pytest.mark.gpu
def test_store_into_pinned_host_memory_from_a_cuda_graph():
    hkv, n, d = 8, 4096, 128
    k_dst = torch.zeros(hkv, n, d, dtype=torch.bfloat16).pin_memory()
    v_dst = torch.zeros(hkv, n, d, dtype=torch.bfloat16).pin_memory()
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    k_new = torch.randn(hkv, 1, d, device="cuda").bfloat16()
    v_new = torch.randn(hkv, 1, d, device="cuda").bfloat16()
    store_kv(k_dst, v_dst, pos, k_new, v_new)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        store_kv(k_dst, v_dst, pos, k_new, v_new)
    for p in (7, 4095):
        pos.fill_(p)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(k_dst[:, p], k_new[:, 0].cpu())
        assert torch.equal(v_dst[:, p], v_new[:, 0].cpu())
