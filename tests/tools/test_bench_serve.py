"""tools/bench_serve: real clients against a real server in-process; --check compares every
answer with the offline greedy one."""

from __future__ import annotations

import pytest

from retrieval_attn.errors import ConfigError
from retrieval_attn.tools.bench_serve import Request, Result, main, percentile, table

pytest.importorskip("fastapi")
pytest.importorskip("openai")


def test_table_counts_failures_and_wrong_answers():
    ok = Result(Request(0, "a", True), submitted=0.0, token_times=[0.5, 0.6, 0.8],
                text="x", tokens=3)
    wrong = Result(Request(1, "b", False), submitted=0.0, token_times=[1.0], text="z",
                   tokens=2)
    failed = Result(Request(2, "c", True), submitted=0.0, error="APIError: boom")
    lines = table([ok, wrong, failed], wall_s=2.0, offline_tps=1.0, expected=["x", "y", "w"])
    text = "\n".join(lines)
    assert "requests done / failed            2 / 1" in text
    assert "answers unlike offline greedy     1" in text
    assert "server output tok/s               2.5" in text  # 5 tokens in 2 s
    assert "TTFT p50 / p99 (ms)               500.0 / 500.0" in text  # streamed only
    assert "error (request 2): APIError: boom" in text
    assert percentile([], 0.5) != percentile([], 0.5)  # nan without samples


def test_bad_arguments_are_refused_before_the_model_loads():
    with pytest.raises(ConfigError, match="--clients"):
        main(["--model", "/no/such", "--clients", "0"])


@pytest.mark.slow
def test_clients_against_the_server_lose_nothing(capsys):
    assert main(["--config", "cpu-small", "--clients", "3", "--requests", "4",
                 "--prompt-tokens", "8", "24", "--max-tokens", "3", "--check"]) == 0
    out = capsys.readouterr().out
    assert "requests done / failed            4 / 0" in out
    assert "answers unlike offline greedy     0" in out
