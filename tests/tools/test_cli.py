"""The CLI: streams text; bad input ends with one clear line, exit code 2, no traceback."""

import subprocess
import sys

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
