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
    out = capsys.readouterr()
    assert "Paris" in out.out
    # how it ended and how fast, on stderr (stdout holds only the answer)
    assert "[finish: " in out.err and "tok/s" in out.err and "finish" not in out.out


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


# ---------------------------------------------------------------- issue 27: bad inputs

NO_MODEL = ["--model", "/no/such/model"]  # an error about a flag shows it came before the load


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "error: temperature is nan: it must be a finite number"),
    (["--temperature", "0.7", "--seed", "1180591620717411303424"],
     "error: seed is 1180591620717411303424: it must be an integer in [0, 2**64)"),
    (["--top-p", "0"], "error: top_p is 0.0"),
])
def test_bad_sampling_flags_are_refused_before_the_model_loads(capsys, flags, message):
    assert main(["generate", *NO_MODEL, "--prompt", "hi", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_config_path_that_is_a_directory(capsys, tmp_path):
    assert main(["generate", "--config", str(tmp_path), "--prompt", "hi"]) == 2
    assert "is a directory: pass a YAML file" in capsys.readouterr().err


def test_save_context_into_a_file_or_under_one_is_refused(capsys, tmp_path):
    f = tmp_path / "afile.txt"
    f.write_text("mine")
    assert main(["save-context", str(f), *NO_MODEL, "--prompt", "hi"]) == 2
    assert "afile.txt is a file" in capsys.readouterr().err
    assert main(["save-context", str(f / "ctx"), *NO_MODEL, "--prompt", "hi"]) == 2
    assert "cannot create the folder" in capsys.readouterr().err
    assert f.read_text() == "mine"


def test_save_context_where_no_folder_can_be_made(capsys):
    assert main(["save-context", "/proc/self/no-such/ctx", "--config", "cpu-small",
                 "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot ")


def test_save_overwrite_and_generate_from_a_context(capsys, tmp_path):
    ctx = str(tmp_path / "ctx")
    small = ["--config", "cpu-small"]
    assert main(["save-context", ctx, *small, "--prompt", "What is the capital of France?"]) == 0
    capsys.readouterr()
    # kept unless asked: refused before the model loads
    assert main(["save-context", ctx, *NO_MODEL, "--prompt", "hi"]) == 2
    assert "already holds a saved context" in capsys.readouterr().err
    assert main(["generate", *small, "--context", ctx, "--max-tokens", "12"]) == 0
    out = capsys.readouterr()
    assert "Paris" in out.out and "loaded" in out.err
    assert main(["save-context", ctx, *small, "--prompt", "Say hi", "--overwrite"]) == 0
    assert "saved" in capsys.readouterr().out


def test_generate_from_a_folder_that_is_no_context(capsys, tmp_path):
    assert main(["generate", *NO_MODEL, "--context", str(tmp_path)]) == 2
    assert "is not a saved context" in capsys.readouterr().err


def test_version(capsys):
    from retrieval_attn import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"retrieval-attn {__version__}"


@pytest.mark.parametrize("command", ["bench", "check-plan", "plan", "inspect", "eval"])
def test_help_names_the_command(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert out.startswith(f"usage: retrieval-attn {command} ")


def test_check_plan_help_says_a_whole_sentence(capsys):
    with pytest.raises(SystemExit):
        main(["check-plan", "--help"])
    assert "a few decode tokens." in " ".join(capsys.readouterr().out.split())


def test_sampling_flags_have_help(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--temperature", "--top-p", "--top-k", "--seed", "--max-tokens"):
        after = out.split(f"{flag} {flag[2:].upper().replace('-', '_')} ", 1)[1]
        assert not after.startswith("--"), flag  # some words of help follow the flag


@pytest.mark.parametrize("yaml_text, message", [
    ("kv: {policy: retrieval}\nindex: {kind: attention, builder: inline}\n",
     "index.kind is attention, which needs faiss"),
    ("kv: {policy: retrieval, lookahead_from: 1000}\n",
     "kv.lookahead_from is 1000 but the embedded model has 30 layers"),
])
def test_config_the_model_or_machine_cannot_serve(capsys, tmp_path, monkeypatch, yaml_text,
                                                   message):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("runtime: {device: cpu}\n" + yaml_text)
    assert main(["generate", "--config", str(cfg), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_generate_from_a_manifest_that_is_not_an_object(capsys, tmp_path):
    (tmp_path / "manifest.json").write_text("[1, 2, 3]")
    assert main(["generate", *NO_MODEL, "--context", str(tmp_path)]) == 2
    assert "holds a JSON list, not an object" in capsys.readouterr().err
