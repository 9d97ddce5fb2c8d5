"""TailEstimate: the unselected tokens' attention, estimated from the sketch and V chunk sums."""

import pytest
import torch
from test_sparse import L, run_policy  # the same prefill-then-decode driver (L layers)

from retrieval_attn.config import KVConfig
from retrieval_attn.offload.dense import DenseKV
from retrieval_attn.offload.make import make_kv_policy
from retrieval_attn.offload.tail import CHUNK, TailEstimate

H, HKV, D = 6, 2, 16


def _chunk_constant_values(T: int) -> torch.Tensor:
    """V [1, Hkv, T, D] equal within every CHUNK-token chunk: the chunk mean is exact."""
    per_chunk = torch.randn(1, HKV, -(-T // CHUNK), D)
    return per_chunk.repeat_interleave(CHUNK, dim=2)[:, :, :T]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_exact_sketch_and_chunk_constant_values_give_dense_attention(dtype, tol):
    # rank = head_dim: sketch scores are exact; V constant per chunk: the means are exact.
    # Then window + top-k + estimated tail is the whole softmax: equal to dense attention
    # (in bfloat16, the chunk sums are bfloat16 too: dense's to bfloat16's precision)
    N, prompt, T = 400, 300, 310
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, T, D, generator=gen) * 0.3  # diffuse attention
    k = torch.randn(1, HKV, T, D, generator=gen)
    v = _chunk_constant_values(T)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    dense = run_policy(DenseKV(L, 1, HKV, N, D, torch.device("cpu"), dtype), q, k, v, prompt)
    outs = {}
    for tail in (True, False):
        cfg = KVConfig(policy="retrieval", sink_tokens=2, window_tokens=16, top_k=12,
                       rank=D, sketch_dtype="auto", rerank_factor=2, tail_estimate=tail)
        kv = make_kv_policy(cfg, L, H, HKV, D, N, torch.device("cpu"), dtype)
        assert (kv.tail is not None) == tail
        if tail:
            assert kv.tail.sums.dtype == (torch.bfloat16 if dtype == torch.bfloat16
                                          else torch.float32)
        outs[tail] = run_policy(kv, q, k, v, prompt)[L:]  # decode steps
    for a, b in zip(outs[True], dense[L:], strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)
    err = max((a.float() - b.float()).abs().max().item()
              for a, b in zip(outs[False], dense[L:], strict=True))
    assert err > 10 * tol  # without the tail, the top-k alone is visibly off


def test_chunk_sums_follow_build_and_append():
    tail = TailEstimate(1, 2, 200, 4, torch.device("cpu"))
    v = torch.randn(2, 130, 4)
    tail.build(0, v)
    torch.testing.assert_close(tail.sums[0, :, 1], v[:, 64:128].sum(1))
    torch.testing.assert_close(tail.sums[0, :, 2], v[:, 128:].sum(1))
    new = torch.randn(2, 1, 4)
    tail.append(0, torch.tensor([130]), new)
    torch.testing.assert_close(tail.sums[0, :, 2], v[:, 128:].sum(1) + new[:, 0])
    assert tail.sums[0, :, 4:].abs().sum() == 0  # chunks past the context stay 0
    assert tail.memory_bytes() == {"host": 2 * 64 * 4 * 4}  # 4 chunks, padded to 64


def test_a_16_bit_model_keeps_bfloat16_sums_rounded_once_per_token():
    tail = TailEstimate(1, 2, 200, 4, torch.device("cpu"), torch.bfloat16)
    assert tail.sums.dtype == torch.bfloat16
    assert tail.memory_bytes() == {"host": 2 * 64 * 4 * 2}  # half the float32 sums' bytes
    v = torch.randn(2, 130, 4, generator=torch.Generator().manual_seed(0)) * 3
    tail.build(0, v.bfloat16())
    # the prompt's sums made in float32, rounded once
    want = v.bfloat16().float()[:, 64:128].sum(1)
    assert torch.equal(tail.sums[0, :, 1], want.bfloat16())
    new = torch.randn(2, 1, 4).bfloat16()
    for _ in range(2):  # a repeat (graph warm-up) adds nothing
        tail.append(0, torch.tensor([130]), new)
    # a decode token added in float32 to the rounded sum, then rounded again
    built = v.bfloat16().float()[:, 128:].sum(1).bfloat16()
    assert torch.equal(tail.sums[0, :, 2], (built.float() + new[:, 0].float()).bfloat16())
    half = TailEstimate(1, 2, 200, 4, torch.device("cpu"), torch.float16)
    assert half.sums.dtype == torch.bfloat16  # a float16 sum of 64 values could overflow
    assert TailEstimate(1, 2, 200, 4, torch.device("cpu")).sums.dtype == torch.float32


def test_appending_one_position_twice_counts_it_once():
    # a CUDA graph capture runs the decode step at one position more than once
    tail = TailEstimate(1, 2, 200, 4, torch.device("cpu"))
    v = torch.randn(2, 130, 4)
    tail.build(0, v)
    new = torch.randn(2, 1, 4)
    for _ in range(3):
        tail.append(0, torch.tensor([130]), new)
    torch.testing.assert_close(tail.sums[0, :, 2], v[:, 128:].sum(1) + new[:, 0])
    tail.append(0, torch.tensor([131]), new)
    torch.testing.assert_close(tail.sums[0, :, 2], v[:, 128:].sum(1) + 2 * new[:, 0])
