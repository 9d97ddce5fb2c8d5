"""PromptIngest: a prompt's K, V into SparseKV's state, by prefill or by ingest."""

import pytest
import torch

from retrieval_attn.config import KVConfig
from retrieval_attn.errors import RequestError
from retrieval_attn.offload.policy import AttnStep
from retrieval_attn.offload.sparse import SparseKV

L, H, HKV, D, N = 2, 4, 2, 16, 96


def decode(kv, q, k, v, start):
    out = []
    for t in range(start, q.shape[2]):
        step = AttnStep(torch.tensor([t]), t)
        out += [kv.attend(layer, q[:, :, t:t + 1], k[layer, :, :, t:t + 1],
                          v[layer, :, :, t:t + 1], step) for layer in range(L)]
    return torch.cat(out)


@pytest.mark.parametrize("policy", ["retrieval", "quest"])
def test_ingest_equals_the_prefill_hand_over(policy):
    """ingest(K, V) of a prompt leaves the state prefill's finish_layer leaves: the same
    decode outputs, bit for bit."""
    torch.manual_seed(0)
    cfg = KVConfig(policy=policy, sink_tokens=2, window_tokens=8, top_k=10, rank=8,
                   rerank_factor=2, page_tokens=8)
    n, T = 70, 80
    q = torch.randn(1, H, T, D)
    k, v = torch.randn(L, 1, HKV, T, D), torch.randn(L, 1, HKV, T, D)

    prefilled = SparseKV(cfg, L, H, HKV, D, N, torch.device("cpu"), torch.float32)
    prefilled.start_request(n)
    for layer in range(L):
        prefilled.attend(layer, q[:, :, :n], k[layer, :, :, :n], v[layer, :, :, :n],
                         AttnStep(torch.arange(n), 0))
        prefilled.finish_layer(layer, n)
    prefilled.finish_prefill(n)
    assert not prefilled.prompt_ingest.prefilling and prefilled.prompt_tokens == n

    ingested = SparseKV(cfg, L, H, HKV, D, N, torch.device("cpu"), torch.float32)
    ingested.ingest(k[:, 0, :, :n], v[:, 0, :, :n])
    assert ingested.budget == prefilled.budget
    torch.testing.assert_close(decode(ingested, q, k, v, n), decode(prefilled, q, k, v, n),
                               rtol=0, atol=0)


@pytest.mark.parametrize("policy, sketch", [("retrieval", "auto"), ("retrieval", "int4"),
                                           ("quest", "auto")])
def test_restored_state_decodes_as_the_prefilled_one(policy, sketch):
    """A saved context's way back (retrieval_attn/context.py): the prompt's K, V as the
    store reads them (restore_prompt) and the sketch's saved state (load_state) leave the
    state prefill left, the tail estimate's chunk sums included: the same decode outputs,
    bit for bit."""
    torch.manual_seed(0)
    cfg = KVConfig(policy=policy, sink_tokens=2, window_tokens=8, top_k=10, rank=8,
                   rerank_factor=2, page_tokens=8, sketch_dtype=sketch)
    n, T = 70, 80
    q = torch.randn(1, H, T, D)
    k, v = torch.randn(L, 1, HKV, T, D), torch.randn(L, 1, HKV, T, D)
    prefilled = SparseKV(cfg, L, H, HKV, D, N, torch.device("cpu"), torch.float32)
    prefilled.ingest(k[:, 0, :, :n], v[:, 0, :, :n])
    rows = [prefilled.store.read(layer, 0, n) for layer in range(L)]
    saved_k, saved_v = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    restored = SparseKV(cfg, L, H, HKV, D, N, torch.device("cpu"), torch.float32)
    restored.start_request(n)
    restored.restore_prompt(saved_k, saved_v)
    if restored.sketch is not None:
        restored.sketch.load_state(prefilled.sketch.state(n))
    restored.finish_prefill(n)
    assert restored.budget == prefilled.budget
    torch.testing.assert_close(decode(restored, q, k, v, n), decode(prefilled, q, k, v, n),
                               rtol=0, atol=0)


def test_batched_prompts_of_two_lengths_are_refused():
    """Sequences of a batch decode in lockstep: a second prompt of another length is
    refused before its prefill, and so is a sequence past the batch."""
    cfg = KVConfig(policy="retrieval", sink_tokens=2, window_tokens=8, top_k=10, rank=8)
    kv = SparseKV(cfg, L, H, HKV, D, N, torch.device("cpu"), torch.float32, batch=2)
    q, k, v = torch.randn(1, H, 40, D), torch.randn(1, HKV, 40, D), torch.randn(1, HKV, 40, D)
    kv.start_request(40, seq=0)
    for layer in range(L):
        kv.attend(layer, q, k, v, AttnStep(torch.arange(40), 0))
        kv.finish_layer(layer, 40)
    with pytest.raises(RequestError, match="one length"):
        kv.start_request(41, seq=1)
    with pytest.raises(ValueError, match="sequence 2 of a batch of 2"):
        kv.start_request(40, seq=2)
    kv.start_request(40, seq=1)  # the same length is taken
