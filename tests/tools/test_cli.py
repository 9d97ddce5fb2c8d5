"""The CLI: streams text; bad input ends with one clear line, exit code 2, no traceback."""

import subprocess
import sys

import pytest
import torch

from retrieval_attn.tools.cli import main


def test_generate_streams_answer(capsys):
    rc = main(["generate", "--config", "cpu-small", "--max-tokens", "12",
               "--prompt", "What is the capital of France?"])
    assert rc == 0
    assert "Paris" in capsys.readouterr().out


def test_bad_temperature_is_one_line(capsys):
    rc = main(["generate", "--config", "cpu-small", "--temperature", "-1", "--prompt", "hi"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: temperature is -1.0")


def test_unknown_key_in_yaml_exits_2_without_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("runtime:\n  max_context: 100\n")
    proc = subprocess.run([sys.executable, "-m", "retrieval_attn.tools.cli", "generate",
                           "--config", str(cfg), "--prompt", "hi"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "unknown key 'max_context' in section 'runtime'" in proc.stderr
    assert "max_context_tokens" in proc.stderr  # lists the valid keys
    assert "Traceback" not in proc.stderr


def test_bench_without_a_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: bench would run")
    assert main(["bench", "--contexts", "4096"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_check_plan_runs_through_the_cli(capsys):
    """planned vs measured on the CPU preset (a short prompt; the preset test in
    test_check_plan.py checks the figures in a fresh process)."""
    assert main(["check-plan", "--config", "cpu-small", "--prompt-tokens", "256",
                 "--new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "host (peak RSS)" in out and "prompt 256 tokens" in out
