"""The public API on the embedded model: answers, batching, streaming, stops, errors."""

import sys

import pytest

from retrieval_attn import LLM, SamplingParams
from retrieval_attn.errors import ConfigError, ModelLoadError, RequestError

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_answer_names_paris(cpu_llm):
    out = cpu_llm.generate(CAPITAL, SamplingParams(max_tokens=20))
    assert len(out) == 1
    assert "Paris" in out[0].text
    assert out[0].finish_reason == "stop"
    assert out[0].timings.prompt_tokens == len(out[0].prompt_token_ids)


def test_batch_keeps_order_and_matches_single_runs(cpu_llm):
    prompts = ["The capital of Germany is", CAPITAL]
    params = SamplingParams(max_tokens=6)
    batch = cpu_llm.generate(prompts, params)
    singles = [cpu_llm.generate(p, params)[0] for p in prompts]
    assert [o.token_ids for o in batch] == [o.token_ids for o in singles]
    assert batch[0].prompt == prompts[0]


def test_stream_pieces_join_to_generate_text(cpu_llm):
    params = SamplingParams(max_tokens=12)
    pieces = list(cpu_llm.stream(CAPITAL, params))
    assert len(pieces) > 1
    assert "".join(pieces) == cpu_llm.generate(CAPITAL, params)[0].text


def test_stop_string_cuts_text(cpu_llm):
    full = cpu_llm.generate(CAPITAL, SamplingParams(max_tokens=20))[0].text
    assert "Paris" in full
    out = cpu_llm.generate(CAPITAL, SamplingParams(max_tokens=20, stop=["Paris"]))[0]
    assert out.text == full[:full.index("Paris")]
    assert out.finish_reason == "stop"


def test_max_tokens_gives_length_finish(cpu_llm):
    out = cpu_llm.generate("Once upon a time", SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5
    assert out.finish_reason == "length"


def test_seeded_sampling_is_reproducible(cpu_llm):
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    a = cpu_llm.generate("Once upon a time", params)[0].token_ids
    b = cpu_llm.generate("Once upon a time", params)[0].token_ids
    assert a == b


def test_prompt_over_max_context_is_refused_before_running(cpu_llm):
    limit = cpu_llm.config.runtime.max_context_tokens
    with pytest.raises(RequestError, match="max_context_tokens") as e:
        cpu_llm.generate(["hello", {"prompt_token_ids": [1] * limit}])
    assert str(limit) in str(e.value)


@pytest.mark.parametrize("prompt", ["", {"prompt_token_ids": []}, []], ids=["text", "ids", "list"])
def test_empty_prompt_is_refused(cpu_llm, prompt):
    with pytest.raises(RequestError, match="empty"):
        cpu_llm.generate(prompt)


def test_token_ids_outside_vocabulary_are_refused(cpu_llm):
    with pytest.raises(RequestError, match="vocabulary"):
        cpu_llm.generate({"prompt_token_ids": [1, 10**9]})


def test_bad_chat_message_is_refused(cpu_llm):
    with pytest.raises(RequestError, match="role"):
        cpu_llm.generate([[{"content": "no role"}]])


def test_unknown_config_key_is_refused():
    with pytest.raises(ConfigError, match="unknown key 'max_ctx' in section 'runtime'"):
        LLM(config={"runtime": {"max_ctx": 10}})


def test_missing_model_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(tmp_path / "nope")


def test_cuda_requested_without_cuda_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ConfigError, match="no CUDA device"):
        LLM(config={"runtime": {"device": "cuda"}})


# ---------------------------------------------------------------- issue 27: bad inputs


def test_params_as_a_dict_are_refused(cpu_llm):
    with pytest.raises(RequestError, match=r"pass a SamplingParams, e.g. SamplingParams\(\*\*"):
        cpu_llm.generate("hi", {"max_tokens": 4})
    with pytest.raises(RequestError, match="pass a SamplingParams"):
        next(cpu_llm.stream("hi", {"max_tokens": 4}))


@pytest.mark.parametrize("ids", [["a"], [1.5], [1, True], "12"],
                         ids=["str-id", "float-id", "bool-id", "str"])
def test_token_ids_that_are_not_integers_are_refused(cpu_llm, ids):
    with pytest.raises(RequestError, match="prompt_token_ids") as e:
        cpu_llm.generate({"prompt_token_ids": ids})
    assert "integer" in str(e.value)


def test_numpy_token_ids_are_taken():
    import numpy as np

    assert LLM._encode(None, {"prompt_token_ids": list(np.arange(3))}) == [0, 1, 2]


@pytest.mark.parametrize("key, value", [("content", None), ("role", 1)])
def test_chat_message_of_another_type_is_refused(cpu_llm, key, value):
    message = {"role": "user", "content": "hi", key: value}
    with pytest.raises(RequestError, match=f"its '{key}' is .*it must be a string"):
        cpu_llm.generate([message])


def test_config_of_another_type_is_refused_before_loading():
    with pytest.raises(ConfigError, match="config is a list"):
        LLM(config=["kv"])


def test_stream_returns_the_request_output(cpu_llm):
    """the generator's return value carries the finish reason and timings (the CLI prints
    them after the text)"""
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    stream = cpu_llm.stream("Once upon a time", params)
    pieces = []
    with pytest.raises(StopIteration) as done:
        while True:
            pieces.append(next(stream))
    out = done.value.value
    assert out.text == "".join(pieces) and out.finish_reason == "length"
    assert out.token_ids == cpu_llm.generate("Once upon a time", params)[0].token_ids
    assert out.timings.generated_tokens == 3 and out.timings.prefill_s > 0


def test_lookahead_past_the_last_layer_is_refused_before_loading():
    """kv.lookahead_from 1000 on the 30-layer model was taken silently (issue 27)"""
    with pytest.raises(ConfigError, match="kv.lookahead_from is 1000 but .* has 30 layers"):
        LLM(config={"runtime": {"device": "cpu"},
                    "kv": {"policy": "retrieval", "lookahead_from": 1000}})


def test_attention_index_without_faiss_is_refused_before_loading(monkeypatch):
    """it raised ModuleNotFoundError once prefill's first layer ended (issue 27)"""
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    with pytest.raises(ConfigError, match="index.kind is attention, which needs faiss"):
        LLM(config={"runtime": {"device": "cpu"}, "kv": {"policy": "retrieval"},
                    "index": {"kind": "attention", "builder": "inline"}})


def test_engine_refuses_an_index_without_its_library(cpu_llm, monkeypatch):
    """the same check where the build service starts (engines made without LLM)"""
    from retrieval_attn.config import IndexConfig, KVConfig

    monkeypatch.setitem(sys.modules, "hnswlib", None)
    with pytest.raises(ConfigError, match="index.kind is hnswlib, which needs hnswlib"):
        cpu_llm.engine.make_policy(KVConfig(policy="retrieval"),
                                   IndexConfig(kind="hnswlib", builder="inline"))


def test_steps_give_each_token_with_its_text(cpu_llm):
    """LLM.steps (the server's per-token feed): one (id, piece) per new token, then any
    held-back text as (None, rest); ids and text equal generate's"""
    params = SamplingParams(max_tokens=8, stop=["Paris"])
    steps = cpu_llm.steps(CAPITAL, params)
    got = []
    with pytest.raises(StopIteration) as done:
        while True:
            got.append(next(steps))
    want = cpu_llm.generate(CAPITAL, params)[0]
    assert [t for t, _ in got if t is not None] == want.token_ids
    assert all(t is not None for t, _ in got[:-1])
    assert "".join(p for _, p in got) == want.text == done.value.value.text
    assert done.value.value.finish_reason == want.finish_reason
