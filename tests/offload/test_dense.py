"""DenseKV: chunked prefill and the graph-safe decode path equal one-shot causal attention."""

import pytest
import torch
import torch.nn.functional as F

from retrieval_attn.offload.dense import DenseKV, dense_decode_attention
from retrieval_attn.offload.policy import AttnStep


def reference(q, k, v):
    """Causal attention over the whole sequence. q [B, H, T, D]; k, v [B, Hkv, T, D]."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    T = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("T,chunk,H,Hkv", [pytest.param(63, 16, 6, 2, id="T63-chunk16-gqa3"),
                                           pytest.param(40, 40, 4, 4, id="one-chunk-mha"),
                                           pytest.param(17, 5, 8, 1, id="odd-chunk-mqa")])
def test_chunked_prefill_then_decode_equals_reference(T, chunk, H, Hkv):
    B, D, N = 2, 16, 80
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    ref = reference(q, k, v)
    kv = DenseKV(1, B, Hkv, N, D, torch.device("cpu"), torch.float32)
    prefill = T - 3
    outs = []
    for s in range(0, prefill, chunk):
        e = min(s + chunk, prefill)
        outs.append(kv.attend(0, q[:, :, s:e], k[:, :, s:e], v[:, :, s:e],
                              AttnStep(torch.arange(s, e), s)))
    for t in range(prefill, T):  # the last tokens through the eager and the static path
        step = AttnStep(torch.tensor([t]), t if t % 2 else None)
        outs.append(kv.attend(0, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], step))
    torch.testing.assert_close(torch.cat(outs, dim=2), ref, atol=1e-5, rtol=1e-5)


def test_decode_attention_ignores_masked_slots():
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    valid = torch.arange(10) < 6
    out = dense_decode_attention(q, k, v, valid)
    ref = F.scaled_dot_product_attention(q, k[:, :, :6], v[:, :, :6], enable_gqa=True)
    torch.testing.assert_close(out, ref)
    k2 = k.clone()
    k2[:, :, 6:] = 1e4  # garbage past the valid slots must not leak in
    torch.testing.assert_close(dense_decode_attention(q, k2, v, valid), out)


def test_memory_accounting_counts_both_tensors():
    kv = DenseKV(3, 1, 2, 100, 16, torch.device("cpu"), torch.float32)
    assert kv.memory_bytes() == {"host": 2 * 3 * 2 * 100 * 16 * 4}


def test_flash_decode_equals_masked_attention():
    """The kernel path's arguments (length on the device, no second source) give the masked
    decode attention; on the CPU the kernel wrapper runs its reference."""
    from retrieval_attn.offload.dense import _flash_decode

    B, H, Hkv, N, D = 2, 6, 2, 50, 16
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D)
    k[:, :, 31:] = float("nan")  # past the length: must not be read into the result
    out = _flash_decode(q, k, v, torch.tensor([31]))
    ref = dense_decode_attention(q, k[:, :, :31], v[:, :, :31], torch.ones(31, dtype=bool))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [300, 70000], ids=["short", "many-splits"])
def test_graphed_decode_on_gpu_equals_reference(N):
    """On a GPU the static decode step runs the split kernel over the cache."""
    B, H, Hkv, D, n = 1, 28, 4, 128, N - 7
    dev = torch.device("cuda")
    kv = DenseKV(1, B, Hkv, N, D, dev, torch.bfloat16)
    kv.k[0, :, :, :n] = torch.randn(B, Hkv, n, D, device=dev)
    kv.v[0, :, :, :n] = torch.randn(B, Hkv, n, D, device=dev)
    q, k1, v1 = (torch.randn(B, h, 1, D, device=dev, dtype=torch.bfloat16) for h in (H, Hkv, Hkv))
    out = kv.attend(0, q, k1, v1, AttnStep(torch.tensor([n], device=dev), None))
    ref = dense_decode_attention(q.float(), kv.k[0].float(), kv.v[0].float(),
                                 kv.slots <= n)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
