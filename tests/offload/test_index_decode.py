"""Host indexes in real decoding: decode proceeds while Ray builds, and the tokens equal
those of the same run with every index built inline before the first step."""

from __future__ import annotations

import pytest

from retrieval_attn import LLM, EngineConfig, SamplingParams
from retrieval_attn.engine import GenerationStats
from retrieval_attn.tools.niah import build_prompt

pytest.importorskip("faiss")
ray = pytest.importorskip("ray")

@ray.remote(num_cpus=1)
class _Holder:
    def ready(self) -> bool:
        return True


KV = {"policy": "retrieval", "top_k": 0.1, "window_tokens": 128}


def _config(builder: str) -> EngineConfig:
    return EngineConfig.load("cpu-small").replace(
        kv=KV, index={"kind": "attention", "builder": builder},
        runtime={"progress_bar": False})


@pytest.mark.slow
def test_decode_runs_during_ray_build_and_matches_inline(cpu_llm):
    ids = cpu_llm.encode(build_prompt(cpu_llm, 1500, 0.4, "4817263"))
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    inline = LLM(config=_config("inline"))
    want = list(inline.engine.generate_ids(ids, params, GenerationStats()))
    assert inline.engine.kv.ann.served["lowrank"] == 0  # inline: indexes before step one
    del inline

    # A one-CPU Ray whose CPU is held by an actor: the builds queue until the test lets
    # them run, so "decode went on while the indexes were not built" is certain.
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    holder = _Holder.remote()
    ray.get(holder.ready.remote())
    llm = LLM(config=_config("ray"))
    kv = llm.engine.kv
    steps = llm.engine.generate_ids(ids, params, GenerationStats())
    got = [next(steps) for _ in range(4)]
    # decode did not wait: steps ran on the low-rank retriever while builds were pending
    assert kv.index_feed.pending == llm.loaded.spec.num_layers
    assert kv.ann.served == {"index": 0, "lowrank": 3 * llm.loaded.spec.num_layers}
    ray.kill(holder)
    kv.install_ready(wait=True)
    assert sorted(kv.ann.layers) == list(range(llm.loaded.spec.num_layers))
    before = kv.ann.served["index"]
    got += list(steps)
    assert kv.ann.served["index"] - before == 16 * llm.loaded.spec.num_layers
    assert got == want
    ray.shutdown()


@pytest.mark.slow
def test_thread_builds_serve_decode_like_inline(cpu_llm):
    """builder threads (machines without Ray): prefill returns with builds still running
    or done on host threads; once installed, decode gives the inline run's tokens."""
    ids = cpu_llm.encode(build_prompt(cpu_llm, 1500, 0.4, "4817263"))
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    inline = LLM(config=_config("inline"))
    want = list(inline.engine.generate_ids(ids, params, GenerationStats()))
    del inline
    llm = LLM(config=_config("threads"))
    kv, stats = llm.engine.kv, GenerationStats()
    logits = llm.engine.prefill(ids, stats)
    kv.install_ready(wait=True)
    assert sorted(kv.ann.layers) == list(range(llm.loaded.spec.num_layers))
    got = list(llm.engine.decode(logits, len(ids), params, stats))
    assert kv.ann.served["lowrank"] == 0 and got == want
