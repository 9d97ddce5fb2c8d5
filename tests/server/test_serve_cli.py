"""retrieval-attn serve from the command line: bad flags and a taken port are refused
before the model loads; the server's packages are optional."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import pytest

from retrieval_attn.tools import cli


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr("retrieval_attn.api.LLM.__init__", refuse)


def test_taken_port_is_refused_before_the_model_loads(capsys, no_model_load):
    pytest.importorskip("fastapi")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--config", "cpu-small", "--port", str(port)]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot listen on 127.0.0.1:{port}")


@pytest.mark.parametrize(("flags", "says"), [
    (["--max-waiting", "0"], "--max-waiting is 0"),
    (["--port", "70000"], "--port is 70000"),
])
def test_bad_flags_are_one_line(capsys, no_model_load, flags, says):
    assert cli.main(["serve", *flags]) == 2
    assert capsys.readouterr().err.startswith(f"error: {says}")


def test_without_the_serve_extra_it_says_what_to_install(capsys, monkeypatch, no_model_load):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # `import fastapi` raises ImportError
    monkeypatch.delitem(sys.modules, "retrieval_attn.server.app", raising=False)
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "needs fastapi" in err and "pip install 'retrieval-attn[serve]'" in err


def test_package_imports_without_fastapi():
    code = ("import sys\n"
            "for name in ('fastapi', 'uvicorn', 'prometheus_client'):\n"
            "    sys.modules[name] = None\n"
            "import retrieval_attn, retrieval_attn.tools.cli\n"
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_serve_command_answers_health():
    """the real command in a subprocess: binds (port 0: any free one), loads, answers"""
    httpx = pytest.importorskip("httpx")
    proc = subprocess.Popen([sys.executable, "-m", "retrieval_attn.tools.cli", "serve",
                             "--config", "cpu-small", "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        port, deadline = None, time.monotonic() + 240
        for line in proc.stderr:
            assert time.monotonic() < deadline
            port = port or (m := re.search(r"listening on http://127.0.0.1:(\d+)", line)) \
                and int(m.group(1))
            if "Application startup complete" in line:
                break
        assert port, "no 'listening on' line"
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).json() == \
            {"status": "ok"}
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()
        assert models["data"][0]["id"] == "SmolLM2-135M-Instruct.Q4_1"
    finally:
        proc.terminate()
        proc.wait(60)
