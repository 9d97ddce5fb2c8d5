"""One-time export of a GGUF file to a safetensors checkpoint directory.

Reading GGUF metadata and de-quantizing takes 20+ s on a small CPU; the exported directory
(config.json, model.safetensors, tokenizer files) loads in about 2 s. transformers reads
the GGUF; we only write its result once, keyed by the file's content hash.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
from pathlib import Path

from retrieval_attn.errors import ModelLoadError

LOG = logging.getLogger(__name__)
GGUF_MAGIC = b"GGUF"


def file_digest(path: Path, chunk_bytes: int = 1 << 24) -> str:
    stat = path.stat()  # hashed once per process for a file that has not changed
    return _digest(path.resolve(), stat.st_size, stat.st_mtime_ns, chunk_bytes)


@functools.lru_cache(maxsize=16)
def _digest(path: Path, size: int, mtime_ns: int, chunk_bytes: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def exported_dir(gguf_path: Path, cache_dir: Path) -> Path:
    """The checkpoint directory for this GGUF, exporting it on first use."""
    with gguf_path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelLoadError(f"{gguf_path} is not a GGUF file (its first bytes are not "
                                 "'GGUF'): pass a .gguf model file or a HF checkpoint directory")
    target = cache_dir / f"{gguf_path.stem}-{file_digest(gguf_path)[:16]}"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    LOG.info("exporting %s to %s (once; later loads are fast)", gguf_path, target)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _export(gguf_path, tmp)
    except ModelLoadError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:  # transformers/gguf raise many types on a damaged file
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(f"could not read GGUF file {gguf_path}: {type(e).__name__}: {e}. "
                             "The file may be truncated or corrupt: download it again") from None
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _export(gguf_path: Path, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = hf.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(hf).__name__]
    state = {k: v.contiguous().clone() for k, v in hf.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # shared with the embedding; safetensors refuses aliases
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(out)
    hf.generation_config.save_pretrained(out)
