"""One-time export of a GGUF file to a safetensors checkpoint directory, and a GGUF's
model shape read from its header alone (read_gguf_spec: what the planner needs).

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
import struct
from pathlib import Path
from typing import Any, BinaryIO

from retrieval_attn.errors import ModelLoadError
from retrieval_attn.model.spec import ModelSpec

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


# GGUF value types (gguf.GGUFValueType) -> struct format of one value; 8 string, 9 array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_gguf_header(path: Path) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """A GGUF file's metadata and tensor shapes, reading no tensor data -> (metadata
    {key: value}, {tensor name: dims, ggml order}). Arrays are not read: their value is
    their length (the tokenizer's vocabulary is one), so this takes milliseconds."""
    try:
        with path.open("rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ModelLoadError(f"{path} is not a GGUF file (its first bytes are not "
                                     "'GGUF'): pass a .gguf model file or a HF checkpoint "
                                     "directory")
            version, tensors, kvs = struct.unpack("<IQQ", _read(f, 20))
            if version < 2:
                raise ModelLoadError(f"{path} is GGUF version {version}; versions 2 and 3 are "
                                     "read: convert it again with a recent llama.cpp")
            meta = {}
            for _ in range(kvs):
                key = _string(f)
                meta[key] = _value(f, struct.unpack("<I", _read(f, 4))[0])
            shapes = {}
            for _ in range(tensors):
                name = _string(f)
                dims = struct.unpack("<I", _read(f, 4))[0]
                shapes[name] = list(struct.unpack(f"<{dims}Q", _read(f, 8 * dims)))
                _read(f, 12)  # ggml type u32, data offset u64
    except (EOFError, struct.error, UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(f"could not read the header of GGUF file {path} ({e}): the file "
                             "may be truncated or corrupt; download it again") from None
    return meta, shapes


def read_gguf_spec(path: Path) -> ModelSpec:
    """The ModelSpec of a .gguf from its header alone, as the export's config.json gives it
    (transformers' GGUF key mapping): no weights are read and nothing is exported."""
    meta, shapes = read_gguf_header(path)
    arch = meta.get("general.architecture")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    needed = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
    missing = [f"{arch}.{k}" for k in needed if get(k) is None]
    if missing:
        raise ModelLoadError(f"GGUF file {path} (architecture {arch!r}) lacks {missing}: it "
                             "is not a Llama-family model file")
    heads = get("attention.head_count")
    vocab = get("vocab_size") or meta.get("tokenizer.ggml.tokens")
    if not vocab and "token_embd.weight" in shapes:
        vocab = shapes["token_embd.weight"][-1]
    config = {
        "model_type": arch, "vocab_size": vocab, "hidden_size": get("embedding_length"),
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", get("rope.dimension_count")),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length", 8192),
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if get("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    return ModelSpec.from_hf_config(config)


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError(f"the file ends {n - len(data)} bytes early")
    return data


def _string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", _read(f, 8))
    return _read(f, n).decode("utf-8")


def _value(f: BinaryIO, kind: int) -> Any:
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item, count = struct.unpack("<IQ", _read(f, 12))
        if item == _STRING:
            for _ in range(count):
                (n,) = struct.unpack("<Q", _read(f, 8))
                f.seek(n, 1)
        elif item in _SCALARS:
            f.seek(count * struct.calcsize(_SCALARS[item]), 1)
        else:
            for _ in range(count):
                _value(f, item)
        return count
    if kind not in _SCALARS:
        raise ValueError(f"unknown GGUF value type {kind}")
    fmt = _SCALARS[kind]
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]
