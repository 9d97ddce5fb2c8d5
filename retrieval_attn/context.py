"""Saved contexts: a prefilled prompt's KV state on disk, to decode from later.

A context is a folder:
  manifest.json          format, model shape, kv/index config, prompt ids, and for every
                         other file its size and sha256
  kv.safetensors         k, v [L, Hkv, n, D] (post-RoPE) as the host store holds them
  logits.safetensors     the prompt's last logits [V] (float32): the first new token
  lowrank.safetensors    mean [L, Hkv, D], basis [L, Hkv, D, r], keys [L, Hkv, n, r]
                         (int8, or uint8 [.., r / 2] packed int4, with scale [L, Hkv, r])
  index/layerNNN.safetensors   per kv head h, the index state arrays "h{h}.{name}"
  queries.safetensors    float16, per layer "build.{l}" [Hkv, G·M, D], the prefill queries
                         the index was built from, and "probe.{l}" [H, P, D], the last P
                         prompt positions' queries, held out of the build (inspect_index)

safetensors and JSON only, no pickle. Loading checks every file's size and checksum
before reading it, then that the model shape and the kv/index config match the engine's,
and fails naming the file and what mismatched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np
from safetensors.torch import load_file, save_file

from retrieval_attn.config import IndexConfig, KVConfig
from retrieval_attn.errors import ConfigError, RetrievalAttnError

FORMAT, VERSION = "retrieval-attn-context", 1
# A setting a manifest lacks was saved before the setting existed, with its default then:
# the current default, except where it has changed since (kv.sketch_dtype was auto).
FIRST_DEFAULTS = {"kv": {"sketch_dtype": "auto"}}
# The low-rank sketch's settings: they shape the saved state of kv.policy retrieval only
# (a context of another policy saved before their defaults changed still loads).
SKETCH_KEYS = ("rank", "sketch_dtype")


class ContextError(RetrievalAttnError):
    """A saved context is missing, altered, truncated or made for another model/config."""


@dataclass
class SavedContext:
    """A context on disk, checked and ready to decode from: pass it to LLM.generate."""

    path: Path
    prompt_token_ids: list[int]
    manifest: dict


def check_target(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse a folder save_context could not write, or would overwrite unasked; creates
    nothing. Cheap: call it before the prefill (and the model load)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ContextError(f"{path} is a file: a context is a folder of several files; "
                           "give a folder path that is new or empty")
    if path.is_dir() and not overwrite:
        if (path / "manifest.json").exists():
            raise ContextError(f"{path} already holds a saved context: choose another folder, "
                               "or pass overwrite=True (CLI: --overwrite) to replace it")
        if any(e.name != "index" or not e.is_dir() or any(e.iterdir())
               for e in path.iterdir()):  # an empty index/ (a save cut short) is no content
            raise ContextError(f"{path} is not empty (and holds no saved context): choose a "
                               "new or empty folder, or pass overwrite=True (CLI: --overwrite) "
                               "to write into it")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ContextError(f"cannot create the folder {path}: {existing} is a file; give a "
                           "path under a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ContextError(f"cannot create the folder {path}: {existing} is not writable; "
                           "give a path you can write to")
    return path


def prepare_target(path: str | Path, overwrite: bool = False) -> Path:
    """check_target, then create the folder and remove an old context's files from it (its
    manifest first: a save cut short leaves no folder that looks like a whole context)."""
    path = check_target(path, overwrite)
    try:
        old = path / "manifest.json"
        if old.exists():
            listed = json.loads(old.read_text()).get("files", {}) if _is_object(old) else {}
            old.unlink()
            for name in listed:
                (path / name).unlink(missing_ok=True)
            for f in (path / "index").glob("layer*.safetensors"):
                f.unlink()  # a layer not in the new save must not be loaded with it
        (path / "index").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ContextError(f"cannot write the context folder {path}: {e.strerror or e}; give "
                           "a path you can write to") from None
    return path


def _is_object(manifest: Path) -> bool:
    try:
        return isinstance(json.loads(manifest.read_text()), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def save_context(engine, prompt_ids: list[int], logits: torch.Tensor, path: str | Path,
                 overwrite: bool = False) -> Path:
    """Write the engine's current KV state (just after prefilling prompt_ids) to path.
    An existing context there is refused unless overwrite."""
    from retrieval_attn.offload.dense import DenseKV
    from retrieval_attn.offload.sparse import SparseKV

    _one_sequence(engine)
    path, kv, n = prepare_target(path, overwrite), engine.kv, len(prompt_ids)
    files: list[str] = []

    def put(name: str, tensors: dict, numpy: bool = False) -> None:
        (save_np if numpy else save_file)(tensors, str(path / name))
        files.append(name)

    if isinstance(kv, SparseKV):
        rows = [kv.store.read(layer, 0, n) for layer in range(kv.L)]  # in the model dtype
        put("kv.safetensors", {"k": torch.stack([k for k, _ in rows]),
                               "v": torch.stack([v for _, v in rows])})
        if kv.sketch is not None:
            put("lowrank.safetensors", kv.sketch.state(n))
        if kv.index_feed is not None:
            kv.install_ready(wait=True)  # every layer's index, not a partial set
            put("queries.safetensors", kv.index_feed.saved_queries(), numpy=True)
            for layer, states in kv.index_feed.index_states().items():
                arrays = {f"h{h}.{k}": np.ascontiguousarray(v)
                          for h, st in enumerate(states) for k, v in st.items()}
                put(f"index/layer{layer:03d}.safetensors", arrays, numpy=True)
    elif isinstance(kv, DenseKV):
        put("kv.safetensors", {"k": kv.k[:, 0, :, :n].contiguous().cpu(),
                               "v": kv.v[:, 0, :, :n].contiguous().cpu()})
    else:
        raise ContextError(f"save_context does not support the {type(kv).__name__} policy")
    put("logits.safetensors", {"logits": logits.float().cpu()})
    cfg = engine.config
    manifest = {"format": FORMAT, "version": VERSION, "model": engine.loaded.source,
                "spec": _spec(engine), "kv": dataclasses.asdict(cfg.kv),
                "index": dataclasses.asdict(cfg.index), "prompt_token_ids": list(prompt_ids),
                "files": {f: _digest(path / f) for f in files}}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return path


def read_manifest(path: str | Path) -> dict:
    """A context folder's manifest, checked for its format and layout (not its files:
    check_files). Cheap: call it before the model load."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise ContextError(f"{path} is not a saved context: {mpath} does not exist "
                           "(write one with LLM.save_context or retrieval-attn save-context)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ContextError(f"{mpath} is not valid JSON ({e}): the file is damaged; "
                           "save the context again") from None
    if not isinstance(manifest, dict):
        raise ContextError(f"{mpath} holds a JSON {type(manifest).__name__}, not an object: "
                           "it is not a context manifest; save the context again")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ContextError(f"{mpath}: format {manifest.get('format')!r} version "
                           f"{manifest.get('version')!r}, expected {FORMAT!r} {VERSION}")
    layout = {"model": str, "spec": dict, "kv": dict, "index": dict, "prompt_token_ids": list,
              "files": dict}
    for key, kind in layout.items():
        if not isinstance(manifest.get(key), kind):
            raise ContextError(f"{mpath}: {key!r} is missing or not a JSON "
                               f"{'object' if kind is dict else kind.__name__}: the manifest "
                               "is damaged; save the context again")
    ids = manifest["prompt_token_ids"]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ContextError(f"{mpath}: prompt_token_ids must be a non-empty list of integers: "
                           "the manifest is damaged; save the context again")
    for name, want in manifest["files"].items():
        if not (isinstance(want, dict) and isinstance(want.get("bytes"), int)
                and isinstance(want.get("sha256"), str)):
            raise ContextError(f"{mpath}: the entry of {name!r} needs 'bytes' and 'sha256': "
                               "the manifest is damaged; save the context again")
    return manifest


def check_files(path: str | Path) -> dict:
    """A context folder's manifest, after checking every file's size and sha256."""
    path = Path(path)
    mpath = path / "manifest.json"
    manifest = read_manifest(path)
    for name, want in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise ContextError(f"{f} is missing (listed in {mpath}): save the context again")
        got = _digest(f)
        if got["bytes"] != want["bytes"]:
            raise ContextError(f"{f} has {got['bytes']} bytes, the manifest says "
                               f"{want['bytes']}: the file is truncated or was replaced")
        if got["sha256"] != want["sha256"]:
            raise ContextError(f"{f}: sha256 {got['sha256'][:16]}… does not match the "
                               f"manifest's {want['sha256'][:16]}…: the file was altered")
    return manifest


def _one_sequence(engine) -> None:
    if engine.config.runtime.max_batch != 1:
        raise ConfigError(f"saved contexts hold one sequence's KV state, and this engine's "
                          f"runtime.max_batch is {engine.config.runtime.max_batch}: save and "
                          "load contexts with runtime.max_batch 1")


def open_context(engine, path: str | Path) -> SavedContext:
    """Read and check a context's manifest and files (sizes, checksums, model, config)."""
    _one_sequence(engine)
    path = Path(path)
    manifest = check_files(path)
    spec = _spec(engine)
    if manifest["spec"] != spec:
        diff = {k: (v, spec.get(k)) for k, v in manifest["spec"].items() if spec.get(k) != v}
        raise ContextError(f"{path} was saved from a model of another shape "
                           f"({manifest['model']}); differs in {diff}: load it with that model")
    cfg = engine.config
    for section, now, default in (("kv", dataclasses.asdict(cfg.kv), KVConfig()),
                                  ("index", dataclasses.asdict(cfg.index), IndexConfig())):
        keys = ("kind",) if section == "index" else tuple(now)
        if section == "kv" and now["policy"] != "retrieval":
            keys = tuple(k for k in keys if k not in SKETCH_KEYS)
        first = FIRST_DEFAULTS.get(section, {})
        saved = {k: manifest[section].get(k, first.get(k, getattr(default, k))) for k in keys}
        diff = {k: (saved[k], now[k]) for k in keys if saved[k] != now[k]}
        if diff:
            raise ContextError(f"{path} was saved with other {section} settings "
                               f"(saved, now): {diff}; load it with the config it was saved with")
    n = len(manifest["prompt_token_ids"])
    if n >= engine.max_tokens:
        raise ContextError(f"{path} holds {n} tokens but runtime.max_context_tokens is "
                           f"{engine.max_tokens}: raise it above {n}")
    return SavedContext(path, manifest["prompt_token_ids"], manifest)


def restore_context(engine, ctx: SavedContext) -> torch.Tensor:
    """Load a checked context into the engine's policy -> the prompt's last logits [V]."""
    from retrieval_attn.offload.dense import DenseKV
    from retrieval_attn.offload.sparse import SparseKV

    kv, n, path = engine.kv, len(ctx.prompt_token_ids), ctx.path
    tensors = load_file(str(path / "kv.safetensors"))
    k, v = tensors["k"], tensors["v"]  # [L, Hkv, n, D]
    kv.start_request(n)
    if isinstance(kv, DenseKV):
        kv.k[:, 0, :, :n] = k.to(kv.k.device, kv.k.dtype)
        kv.v[:, 0, :, :n] = v.to(kv.v.device, kv.v.dtype)
    elif isinstance(kv, SparseKV):
        kv.restore_prompt(k, v)
        if kv.sketch is not None:  # kv.sketch_dtype is checked equal with the manifest
            kv.sketch.load_state(load_file(str(path / "lowrank.safetensors")))
        if kv.index_feed is not None:
            kv.index_feed.load_queries(load_np(str(path / "queries.safetensors")))
            for layer in range(kv.L):
                f = path / f"index/layer{layer:03d}.safetensors"
                if not f.is_file():
                    continue  # saved before this layer's index was built: low-rank serves
                arrays = load_np(str(f))
                states = [{name.split(".", 1)[1]: a for name, a in arrays.items()
                           if name.startswith(f"h{h}.")} for h in range(kv.Hkv)]
                kv.index_feed.install(layer, states)
    kv.finish_prefill(n)
    return load_file(str(path / "logits.safetensors"))["logits"].to(kv_device(engine))


def kv_device(engine) -> torch.device:
    return engine.loaded.model.embed.weight.device


def _spec(engine) -> dict:
    spec = dataclasses.asdict(engine.loaded.spec)
    spec["eos_token_ids"] = list(spec["eos_token_ids"])
    return json.loads(json.dumps(spec))  # as the manifest stores it


def _digest(f: Path) -> dict:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return {"bytes": f.stat().st_size, "sha256": h.hexdigest()}
