"""The NIAH demo finds the needle with exact dense attention on the CPU."""

import pytest

from retrieval_attn.tools.niah import build_prompt, run_niah


def test_prompt_length_and_needle_placement(cpu_llm):
    messages = build_prompt(cpu_llm, 1024, 0.25, "1234567")
    n = len(cpu_llm.encode(messages))
    assert 1000 <= n <= 1024
    text = messages[0]["content"]
    at = text.index("1234567") / len(text)
    assert 0.15 < at < 0.3


@pytest.mark.slow
@pytest.mark.parametrize("length", [2048, 4096])
def test_needle_found(cpu_llm, length):
    result = run_niah(cpu_llm, length, depth=0.5)
    assert result.prompt_tokens > length - 32
    assert result.found, result.answer
