"""SamplingParams validation and the sampler: greedy, top-k, top-p, temperature, seeding."""

from __future__ import annotations

import pytest
import torch

from retrieval_attn.errors import RequestError
from retrieval_attn.sampling import SamplingParams, sample


def draws(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [sample(logits, params, gen) for _ in range(n)]


def frequencies(ids: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(ids), minlength=vocab).double() / len(ids)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs, field", [
    pytest.param({"temperature": -0.1}, "temperature", id="temperature-negative"),
    pytest.param({"top_p": 0.0}, "top_p", id="top_p-0"),
    pytest.param({"top_p": -0.5}, "top_p", id="top_p-negative"),
    pytest.param({"top_p": 1.5}, "top_p", id="top_p-1.5"),
    pytest.param({"top_k": -1}, "top_k", id="top_k-negative"),
    pytest.param({"top_k": 2.5}, "top_k", id="top_k-float"),
    pytest.param({"max_tokens": 0}, "max_tokens", id="max_tokens-0"),
    pytest.param({"max_tokens": -3}, "max_tokens", id="max_tokens-negative"),
    pytest.param({"max_tokens": 8.0}, "max_tokens", id="max_tokens-float"),
    pytest.param({"stop": [""]}, "stop", id="stop-empty-in-list"),
    pytest.param({"stop": ["ok", ""]}, "stop", id="stop-one-empty"),
    pytest.param({"stop": ""}, "stop", id="stop-empty-str"),
    pytest.param({"stop": [3]}, "stop", id="stop-not-str"),
    pytest.param({"stop": 3}, "stop", id="stop-int"),
    # issue 27: these ended in a TypeError or a RuntimeError inside generate
    pytest.param({"temperature": "0.5"}, "temperature", id="temperature-str"),
    pytest.param({"temperature": None}, "temperature", id="temperature-none"),
    pytest.param({"temperature": float("nan")}, "temperature", id="temperature-nan"),
    pytest.param({"temperature": float("inf")}, "temperature", id="temperature-inf"),
    pytest.param({"top_p": "0.9"}, "top_p", id="top_p-str"),
    pytest.param({"top_p": float("nan")}, "top_p", id="top_p-nan"),
    pytest.param({"seed": "x"}, "seed", id="seed-str"),
    pytest.param({"seed": 1.5}, "seed", id="seed-float"),
    pytest.param({"seed": 2**70}, "seed", id="seed-too-big"),
    pytest.param({"seed": -1}, "seed", id="seed-negative"),
    pytest.param({"max_tokens": True}, "max_tokens", id="max_tokens-bool"),
    pytest.param({"ignore_eos": "yes"}, "ignore_eos", id="ignore_eos-str"),
])
def test_invalid_params(kwargs, field):
    with pytest.raises(RequestError) as e:
        SamplingParams(**kwargs)
    assert isinstance(e.value, ValueError)
    assert str(e.value).startswith(field)


@pytest.mark.parametrize("kwargs", [
    pytest.param({}, id="defaults"),
    pytest.param({"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_tokens": 1}, id="edges"),
    pytest.param({"temperature": 2.0, "top_p": 1e-9, "top_k": 50}, id="sampling"),
])
def test_valid_params(kwargs):
    params = SamplingParams(**kwargs)
    for key, value in kwargs.items():
        assert getattr(params, key) == value


def test_stop_string_becomes_list():
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(stop=["a", "bc"]).stop == ["a", "bc"]
    assert SamplingParams(stop=("a",)).stop == ["a"]
    assert SamplingParams().stop == []


def test_stop_none_means_no_stop_strings():
    """as in vLLM: None is the default 'no stop strings', not a TypeError (issue 27)"""
    assert SamplingParams(stop=None).stop == []


def test_largest_seed_draws():
    """seeds up to 2**64 - 1 reach torch's generator (larger ones overflowed in generate)"""
    params = SamplingParams(temperature=1.0, seed=2**64 - 1)
    gen = torch.Generator().manual_seed(params.seed)
    assert 0 <= sample(torch.zeros(10), params, gen) < 10


@pytest.mark.parametrize("kwargs, greedy", [
    pytest.param({}, True, id="default"),
    pytest.param({"temperature": 0.8}, False, id="temperature"),
    pytest.param({"temperature": 0.8, "top_k": 1}, True, id="top_k-1"),
    pytest.param({"temperature": 0.8, "top_k": 2}, False, id="top_k-2"),
])
def test_greedy_property(kwargs, greedy):
    assert SamplingParams(**kwargs).greedy is greedy


# ---------------------------------------------------------------- greedy


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_temperature_zero_is_argmax(seed, dtype):
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(seed)).to(dtype)
    out = sample(logits, SamplingParams(temperature=0.0))
    assert out == int(torch.argmax(logits))
    assert isinstance(out, int)


@pytest.mark.parametrize("seed", range(5))
def test_top_k_1_is_argmax_at_high_temperature(seed):
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(seed))
    params = SamplingParams(temperature=100.0, top_k=1)
    assert set(draws(logits, params, 50, seed)) == {int(torch.argmax(logits))}


def test_tiny_top_p_keeps_only_argmax():
    logits = torch.tensor([1.0, 1.2, 0.9, 1.1, 1.15])  # nearly flat: any leak would show
    params = SamplingParams(temperature=1.0, top_p=1e-6)
    assert set(draws(logits, params, 500)) == {1}


# ---------------------------------------------------------------- truncation


def test_top_k_2_samples_only_the_two_best():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(7))
    best2 = set(torch.topk(logits, 2).indices.tolist())
    params = SamplingParams(temperature=5.0, top_k=2)  # flat-ish: others would show if kept
    got = draws(logits, params, 2000)
    assert set(got) == best2  # never outside, and both actually drawn


def test_top_k_larger_than_vocab():
    logits = torch.tensor([0.0, 0.1, 0.2])
    got = draws(logits, SamplingParams(temperature=1.0, top_k=50), 300)
    assert set(got) == {0, 1, 2}


def test_top_p_renormalises_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()
    # sorted: 0.5, 0.3 | 0.15, 0.05 -> mass before 0.15 is 0.8 >= 0.7: keep {1, 3}
    params = SamplingParams(temperature=1.0, top_p=0.7)
    freq = frequencies(draws(logits, params, 4000), 4)
    expected = torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8], dtype=torch.float64)
    assert freq[0] == 0 and freq[2] == 0
    torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)


# ---------------------------------------------------------------- seeding and temperature


def test_same_seed_same_draws():
    logits = torch.zeros(1000)  # uniform: draws differ run to run unless seeded
    params = SamplingParams(temperature=1.0, seed=123)
    a = draws(logits, params, 50, seed=123)
    b = draws(logits, params, 50, seed=123)
    c = draws(logits, params, 50, seed=124)
    assert a == b
    assert a != c


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies_match_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    params = SamplingParams(temperature=temperature)
    freq = frequencies(draws(logits, params, 4000, seed=11), 5)
    expected = torch.softmax(logits.double() / temperature, dim=-1)
    torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)
