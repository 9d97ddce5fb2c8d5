"""ModelRunner: the two prefill orders give the same logits and the same cache."""

import torch

from retrieval_attn.offload.dense import DenseKV


def test_chunk_major_prefill_equals_layer_major(cpu_llm):
    runner = cpu_llm.engine.runner
    chunk, runner.chunk = runner.chunk, 16  # 50 tokens: three full chunks and a partial
    ids = list(range(100, 150))
    try:
        kv = runner.kv
        assert isinstance(kv, DenseKV) and not kv.layer_major  # dense goes chunk-major
        kv.start_request(len(ids))
        chunk_major = runner.prefill(ids, all_logits=True)  # [n, V]
        last = runner.prefill(ids)  # [V]
        k, v = kv.k[:, :, :, :len(ids)].clone(), kv.v[:, :, :, :len(ids)].clone()
        kv.layer_major = True  # this instance only: the other order
        layer_major = runner.prefill(ids, all_logits=True)
    finally:
        runner.chunk = chunk
        del kv.layer_major
    assert chunk_major.shape == (len(ids), cpu_llm.loaded.spec.vocab_size)
    torch.testing.assert_close(chunk_major, layer_major, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, layer_major[-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kv.k[:, :, :, :len(ids)], k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv.v[:, :, :, :len(ids)], v, rtol=1e-5, atol=1e-5)
