"""Lookahead through the engine on the embedded model: a policy that looks ahead gets its
guessed layers' int8 query weights, and decodes with them."""

import pytest

from retrieval_attn import LLM
from retrieval_attn.config import KVConfig
from retrieval_attn.engine import GenerationStats
from retrieval_attn.sampling import SamplingParams


@pytest.mark.parametrize("rerank", [2, 1], ids=["rerank", "final"])
def test_lookahead_with_a_budget_of_everything_decodes_as_dense(rerank):
    """int8 guesses choose every offloaded token when the budget covers them all (re-ranked
    or final), so greedy decoding follows dense attention token for token."""
    llm = LLM(config="cpu-small")  # its own model: guesses are made on it
    engine, model = llm.engine, llm.loaded.model
    assert all(b.guess is None for b in model.layers)
    ids = list(range(200, 520))  # 320 prompt tokens
    dense = engine.kv
    dense.start_request(len(ids))
    logits = engine.runner.prefill(ids)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    want = list(engine.decode(logits, len(ids), params, GenerationStats()))
    cfg = KVConfig(policy="retrieval", sink_tokens=4, window_tokens=64, top_k=len(ids),
                   rank=16, rerank_factor=rerank, select_block=4, lookahead_from=3)
    kv = engine.make_policy(cfg)
    assert [b.guess is not None for b in model.layers] == [
        i >= 3 for i in range(len(model.layers))]
    kv.ingest(dense.k[:, 0, :, :len(ids)].clone(), dense.v[:, 0, :, :len(ids)].clone())
    used, take = [], kv.ahead.take

    def record(layer, step):  # whether each choice attend takes was final (read ahead)
        choice = take(layer, step)
        if choice is not None:
            used.append(choice.ready is not None)
        return choice
    kv.ahead.take = record
    got = list(engine.decode(logits, len(ids), params, GenerationStats(), kv=kv))
    assert got == want
    steps = len(want) - 1  # the first token comes from the prefill's logits
    assert used == [rerank == 1] * (steps * (len(model.layers) - 3))
    engine.make_policy(KVConfig(policy="dense"))  # no lookahead: the int8 copies are freed
    assert all(b.guess is None for b in model.layers)
