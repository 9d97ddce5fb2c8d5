import random

import numpy as np
import pytest
import torch

from retrieval_attn import LLM


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_poison_empty(monkeypatch):
    """Seed every RNG; fill torch.empty with NaN so reads of unwritten memory show up."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    from torch.utils._device import _device_constructors

    _device_constructors()  # cache the real factories so `with torch.device("meta")` works
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point() and t.device.type != "meta":
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)


@pytest.fixture(scope="session")
def cpu_llm() -> LLM:
    """The embedded SmolLM2 on the CPU in fp32 (config preset cpu-small), loaded once."""
    return LLM(config="cpu-small")


QWEN_SMALL = "qwen2.5-coder-0.5b-instruct"


@pytest.fixture(scope="session")
def qwen_llm() -> LLM:
    """The real 32K Qwen2.5-Coder-0.5B on the CPU in fp32 (the test extra installs its
    parts), loaded once: dense attention; sparse policies are made beside it."""
    return LLM(QWEN_SMALL, config={"runtime": {"device": "cpu", "dtype": "float32",
                                               "max_context_tokens": 4608,
                                               "prefill_chunk_tokens": 1024,
                                               "progress_bar": False}})
