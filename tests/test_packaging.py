"""Packaging: pyproject lists every Python package of the repository (a kernel folder left
out installs fine in editable mode and breaks a wheel install at import), and Python
started in a clone's root never takes our top-level folders for packages of their own
names (transformers imports the PyPI package `kernels`; our kernels/ once shadowed it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = Path(__file__).resolve().parents[1]
LINKED = ("offload", "index", "kernels", "tools", "configs")  # retrieval_attn/<name> -> ../<name>


def test_every_package_folder_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = set()
    for folder, _, files in os.walk(ROOT / "retrieval_attn", followlinks=True):
        rel = Path(folder).relative_to(ROOT)
        if "__pycache__" not in rel.parts and any(f.endswith((".py", ".yaml")) for f in files):
            found.add(".".join(rel.parts))
    missing = sorted(found - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"


@pytest.mark.parametrize("name", LINKED)
def test_top_level_folders_are_linked_and_not_packages(name):
    link = ROOT / "retrieval_attn" / name
    assert link.is_symlink() and link.resolve() == (ROOT / name).resolve()
    assert not (ROOT / name / "__init__.py").exists(), (
        f"{name}/__init__.py makes `import {name}` from the clone root take our folder "
        "instead of an installed package of that name")


def _in_clone_root(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_clone_root_does_not_shadow_installed_packages():
    """From the clone root, a top-level name of ours resolves to an installed package
    where one exists, else to nothing of ours that could hold code."""
    code = ("import importlib.util, sys\n"
            f"for name in {LINKED!r}:\n"
            "    spec = importlib.util.find_spec(name)\n"
            "    origin = spec and spec.origin\n"
            "    assert origin is None or 'site-packages' in origin, (name, origin)\n"
            "print('ok')")
    proc = _in_clone_root(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.slow
def test_embedded_model_generates_from_the_clone_root():
    """The README's one-liner, run where a user runs it: the clone root."""
    proc = _in_clone_root("from retrieval_attn import LLM, SamplingParams\n"
                          "out = LLM().generate('The capital of France is', "
                          "SamplingParams(max_tokens=4))\n"
                          "print(out[0].text)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout
