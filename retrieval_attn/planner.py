"""Memory planner: the bytes every part of a run holds, by place, before anything is allocated.

plan_memory mirrors what the code allocates (model/loader.py, engine/runner.py, offload/,
index/retriever.py) part by part; check_budget refuses a config that would not fit, with
numbers and the change that would make it fit; search_config picks the best config that fits.
Letters as in config.py, plus: I MLP intermediate size, T prefill chunk tokens, n prompt
tokens, r low-rank dims, P quest page tokens, S sinks, W window, k top_k, b dtype bytes,
B runtime.max_batch (sequences decoded together; prefill runs one sequence at a time).

Phases (a part lives only in its phase; MemoryPlan.peak adds up what coexists):
  held         allocated when the engine starts, kept for the whole run
  setup        transient while the engine starts (rotary tables built in float64)
  prefill      kept through the prefill of one prompt
  chunk        one prefill chunk of one layer (on top of prefill)
  layer-end    the end of one prefill layer: index build (on top of prefill, not with chunk)
  decode       one decode step
  runtime      outside torch's allocator (CUDA context, libraries): estimates

search_config prefers, in order: (1) kv.policy dense, exact, if it fits at any prefill chunk;
(2) kv.policy retrieval with the best sketch that fits at any chunk: the largest rank
(powers of two, up to max_rank, at most head_dim), and at that rank the most precise of
kv.sketch_dtype auto, int8, int4, among sketches of at most half the bytes of the dense
keys (more is no longer cheap to score). Rank first: tools/eval_sketch measured int4 of
rank 64 (of 64) above float32 of rank 32, at half its bytes; (3) at that sketch, the largest
prefill chunk that fits.
top_k, window and sinks barely move memory; they are inputs (default: the issue's headline
2048 tokens + window 512 + 4 sinks), checked, not searched.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import yaml

from retrieval_attn.config import EngineConfig, check_for_shape
from retrieval_attn.errors import ConfigError
from retrieval_attn.kernels.select_scores import kernel_scores
from retrieval_attn.model.spec import ModelSpec
from retrieval_attn.offload.lowrank import STORE_BYTES_PER_VALUE, STORE_TOKENS
from retrieval_attn.offload.make import policy_class
from retrieval_attn.offload.tail import CHUNK as TAIL_CHUNK
from retrieval_attn.offload.tail import padded_chunks, sums_dtype

GiB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PHASES = ("held", "setup", "prefill", "chunk", "layer-end", "decode", "runtime")
# Memory outside torch's allocator: not in torch.cuda.max_memory_allocated, but in the budget.
# Estimates for torch 2.x with lazy CUDA module loading; measure and update.
CUDA_CONTEXT_BYTES = 1 * GiB  # CUDA context, cuBLAS/cuDNN handles and kernel images on the GPU
# Python, torch, CUDA libraries (RSS, before the model). CUDA: 0.75 GiB fits check-plan's
# peak RSS of the presets on the H100 (512k-llama3-8b with its store on the GPU: 2.1 GiB
# measured, 1.4 of them the rotary build; 1m-single-gpu 59.7 GiB, 1.3 GiB under a 2 GiB
# estimate); a CUDA build of torch takes it on the CPU too (_runtime). cpu: a CPU build
HOST_RUNTIME_BYTES = {"cuda": 3 * GiB // 4, "cpu": GiB // 2}
CHUNK_CHOICES = (8192, 4096, 2048, 1024, 512, 256, 128)  # prefill_chunk_tokens tried, largest first
# Search default for the largest chunk: beyond it the GEMMs gain little, while a later chunk's
# attention mask [T, n] grows with T (T·n·(1 + b) bytes: 6 GiB at T = 2048, n = 1M, bf16).
SEARCH_CHUNK_TOKENS = 2048
SEARCH_HEADROOM = 0.05  # share of each budget search_config leaves free
# kv.lookahead_sm_share search_config sets with the store on the device and lookahead on
# (Llama-3-8B 256K-512K, H100 and H200: docs/results.md)
DEVICE_LOOKAHEAD_SM_SHARE = 0.75


class Part(NamedTuple):
    name: str  # parts named "kv: ..." are the KV state, as KVPolicy.memory_bytes() counts it
    place: str  # "gpu" or "host"
    nbytes: int
    formula: str
    phase: str  # one of PHASES


@dataclass
class MemoryPlan:
    spec: ModelSpec
    config: EngineConfig
    device_type: str  # "cuda" or "cpu"
    prompt_tokens: int  # the prompt length planned for (top_k shares, masks, hidden states)
    parts: list[Part] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def phase_bytes(self, place: str, phase: str) -> int:
        return sum(p.nbytes for p in self.parts if p.place == place and p.phase == phase)

    def peak(self, place: str, runtime: bool = True) -> int:
        """Most bytes in use at once. runtime=False is what torch.cuda.max_memory_allocated
        sees on the GPU; runtime=True is the budget (and peak RSS on the host)."""
        b = lambda phase: self.phase_bytes(place, phase)  # noqa: E731
        prefill = b("prefill") + max(b("chunk"), b("layer-end"))
        return b("held") + max(b("setup"), prefill, b("decode")) + (b("runtime") if runtime else 0)

    @property
    def totals(self) -> dict[str, int]:
        return {place: self.peak(place) for place in ("gpu", "host")}

    def kv_bytes(self, place: str) -> int:
        """The KV state held for decode (parts named 'kv: ...'), as memory_bytes() counts it."""
        return sum(p.nbytes for p in self.parts
                   if p.place == place and p.phase == "held" and p.name.startswith("kv:"))

    def breakdown(self) -> dict[str, dict[str, int]]:
        """{place: {part name: bytes}}, to set beside measured memory."""
        out: dict[str, dict[str, int]] = {"gpu": {}, "host": {}}
        for p in self.parts:
            out[p.place][p.name] = out[p.place].get(p.name, 0) + p.nbytes
        return out

    def fits(self, gpu_bytes: int, host_bytes: int) -> bool:
        return self.peak("gpu") <= gpu_bytes and self.peak("host") <= host_bytes

    def table(self) -> str:
        s, rt, kv = self.spec, self.config.runtime, self.config.kv
        rows = [("part", "place", "phase", "bytes", "formula")]
        rows += [(p.name, p.place, p.phase, format_bytes(p.nbytes), p.formula)
                 for p in self.parts if p.nbytes]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
                 for r in rows]
        legend = (f"L={s.num_layers} H={s.num_heads} Hkv={s.num_kv_heads} D={s.head_dim} "
                  f"C={s.hidden_size} I={s.intermediate_size} V={s.vocab_size} "
                  f"N={rt.max_context_tokens} n={self.prompt_tokens} "
                  f"T={min(rt.prefill_chunk_tokens, self.prompt_tokens)} "
                  f"b={dtype_bytes(rt.dtype, self.device_type)}")
        if kv.policy != "dense":
            legend += (f" S={kv.sink_tokens} W={kv.window_tokens} k={kv.budget(self.prompt_tokens)}"
                       + (f" r={kv.rank}" if kv.policy == "retrieval" else "")
                       + (f" P={kv.page_tokens}" if kv.policy == "quest" else ""))
        lines += ["", legend]
        for place in ("gpu", "host"):
            lines.append(f"{place}: peak {format_bytes(self.peak(place))} "
                         f"(allocated by torch {format_bytes(self.peak(place, runtime=False))}, "
                         f"KV state {format_bytes(self.kv_bytes(place))})")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def dtype_bytes(dtype: str, device_type: str) -> int:
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" else "float32"
    return DTYPE_BYTES[dtype]


def param_count(spec: ModelSpec) -> int:
    """Parameters of model/llama.py's Llama for this spec (tied head counted once)."""
    C, inter, V, D = spec.hidden_size, spec.intermediate_size, spec.vocab_size, spec.head_dim
    qkv_out = (spec.num_heads + 2 * spec.num_kv_heads) * D
    layer = (C * qkv_out + (qkv_out if spec.qkv_bias else 0)  # qkv (+ bias)
             + spec.num_heads * D * C  # o_proj
             + 3 * C * inter  # gate_up, down
             + 2 * C)  # attn_norm, mlp_norm
    return V * C * (1 if spec.tie_word_embeddings else 2) + spec.num_layers * layer + C


def plan_memory(spec: ModelSpec, config: EngineConfig, device_type: str,
                prompt_tokens: int | None = None) -> MemoryPlan:
    """Every part's bytes for this model and config on device_type ("cuda" or "cpu").

    prompt_tokens (default: max_context_tokens, the upper bound) sizes what depends on the
    prompt: a float top_k, prefill hidden states, masks and index builds. The plan's
    config is config for this shape (EngineConfig.for_shape: kv.rank a number).
    """
    if device_type not in ("cuda", "cpu"):
        raise ConfigError(f"device type {device_type!r}: plan for 'cuda' or 'cpu'")
    config = config.for_shape(spec.head_dim)
    rt, kv = config.runtime, config.kv
    check_for_shape(kv, spec.num_layers, spec.head_dim, "the model")
    N = rt.max_context_tokens
    n = min(prompt_tokens or N, N)
    L, H, Hkv, D = spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim
    C, inter, V = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    b, T = dtype_bytes(rt.dtype, device_type), min(rt.prefill_chunk_tokens, n)
    B = rt.max_batch
    dev = "gpu" if device_type == "cuda" else "host"
    plan = MemoryPlan(spec, config, device_type, n)
    add = lambda *a: plan.parts.append(Part(*a))  # noqa: E731

    add("weights", dev, param_count(spec) * b,
        "b·(V·C·(1 if tied else 2) + L·(C·(H+2Hkv)·D [+bias] + H·D·C + 3·C·I + 2·C) + C)", "held")
    add("rotary tables cos, sin", dev, 2 * N * D * b, "2·N·D·b  [N, D] ×2", "held")
    build = N * (8 + 20 * D) + (N * D * b if dev == "gpu" else 0)
    add("rotary tables, float64 build", "host", build,
        "N·(8 + 4·D + 8·D + 8·D) [+ N·D·b cast before the copy to the GPU]: positions, "
        "angles, emb, emb.cos() in float64", "setup")

    if kv.policy == "dense":
        add("kv: dense K,V", dev, 2 * L * B * Hkv * N * D * b,
            "2·L·B·Hkv·N·D·b  [L, B, Hkv, N, D] ×2", "held")
        add("dense slot index", dev, 8 * N, "8·N  int64 [N]", "held")
    else:
        _plan_sparse(plan, spec, n, b, dev)

    # prefill (engine/runner.py): offloading policies run it layer-major, every token's
    # hidden state staying on the device; dense chunk-major, one chunk's at a time
    if not policy_class(kv.policy).layer_major:
        add("prefill: hidden states", dev, T * C * b,
            "T·C·b  x [1, T, C] of one chunk (chunk-major prefill)", "prefill")
    else:
        add("prefill: hidden states", dev, n * C * b,
            "n·C·b  x [1, n, C] of every prompt token (layer-major prefill)", "prefill")
    add("prefill: token ids, positions", dev, 16 * n, "8·n + 8·n  int64", "prefill")
    attn = C + (H + 2 * Hkv) * D + 3 * H * D + Hkv * D
    mlp = 2 * C + 4 * inter
    add("prefill: chunk activations", dev, T * max(b * attn, b * mlp, 8 * C + b * C),
        "T·max(b·(C + (H+2Hkv)·D + 3·H·D + Hkv·D), b·(2·C + 4·I), 8·C + b·C): "
        "qkv + RoPE temporaries, SwiGLU [T, 4·I], RMSNorm float32", "chunk")
    # later chunks pass a bool mask [T, end]; SDPA turns it into an additive one, and makes
    # no further copy when end % 16 != 0 (measured: H200, torch 2.11, T = 2048, end ≈ 1M)
    if n > T:
        add("prefill: chunk attention mask", dev, T * n * (1 + b),
            "T·n·(1 + b)  bool [T, n] + SDPA's additive copy [T, n] in the model dtype", "chunk")
    plan.notes.append(
        f"SDPA kernels (flash, memory-efficient, cuDNN) do not materialise scores; if SDPA "
        f"fell back to its math kernel, one chunk's scores [H, T, n] would take H·T·n·b = "
        f"{format_bytes(H * T * n * b)} (not counted)")
    add("logits of the last token", dev, B * V * (b + 4),
        "B·V·(b + 4)  [B, V] and its float32 copy", "decode")
    if kv.policy == "dense" and dev == "gpu" and rt.cuda_graphs:
        add("decode: dense scores (graphed step)", dev, B * H * N * (8 + b),
            "B·H·N·(8 + b)  [B, Hkv, G, N] scores in float32 ×2 + probabilities", "decode")

    if dev == "gpu":
        add("CUDA context, kernels (estimate)", "gpu", CUDA_CONTEXT_BYTES,
            "not in max_memory_allocated", "runtime")
    add("Python, torch, libraries (estimate)", "host", HOST_RUNTIME_BYTES[_runtime(device_type)],
        "process RSS before the model", "runtime")
    return plan


def _runtime(device_type: str) -> str:
    """Which HOST_RUNTIME_BYTES a process takes: a CUDA build of torch maps the CUDA
    libraries into host memory at import (import torch: 502 MiB peak RSS against 218 MiB
    for the CPU build), also when it runs on the CPU."""
    import torch

    return "cuda" if device_type == "cuda" or torch.version.cuda else "cpu"


def _plan_sparse(plan: MemoryPlan, spec: ModelSpec, n: int, b: int, dev: str) -> None:
    kv, N = plan.config.kv, plan.config.runtime.max_context_tokens
    L, H, D = spec.num_layers, spec.num_heads, spec.head_dim
    B = plan.config.runtime.max_batch
    Hkv = B * spec.num_kv_heads  # rows: a batch is B·Hkv kv heads to the KV state
    add = lambda *a: plan.parts.append(Part(*a))  # noqa: E731
    store = dev if kv.store_on == "device" else "host"  # kv.store_on
    name = "kv: K,V store on the device" if store == dev != "host" else "kv: host K,V store"
    note = ", pinned by registration: exact size" if store != dev else ""
    if kv.host_dtype == "int8":  # offload/kv_store.py: int8 rows, float16 scales
        add(name, store, 2 * L * Hkv * N * D,
            "2·L·B·Hkv·N·D·1  int8 K, V [L, B·Hkv, N, D]" + note, "held")
        add("kv: store's row scales", dev, 2 * L * Hkv * N * 2,
            "2·L·B·Hkv·N·2  float16 [L, B·Hkv, N]", "held")
    else:
        add(name, store, 2 * L * Hkv * N * D * b,
            "2·L·B·Hkv·N·D·b  K, V [L, B·Hkv, N, D]" + note, "held")
    extra = kv.budget(n) if kv.policy == "streaming" else 0
    add("kv: window + sinks K,V", dev, 2 * L * Hkv * (kv.sink_tokens + kv.window_tokens + extra)
        * D * b, "2·L·B·Hkv·(S + W" + (" + k" if extra else "") + ")·D·b", "held")
    r, G = kv.rank, H // spec.num_kv_heads
    if kv.policy == "retrieval":
        if kv.sketch_dtype == "auto":
            add("kv: low-rank keys", dev, L * Hkv * (D + D * r + N * r) * b,
                "L·B·Hkv·(D + D·r + N·r)·b  mean, basis [L, B·Hkv, D, r], keys "
                "[L, B·Hkv, N, r]", "held")
        else:  # offload/lowrank.py: integer keys, float32 mean, basis and per-dim scales
            per = _value_bytes(kv.sketch_dtype, b)
            add("kv: low-rank keys", dev, L * Hkv * ((D + D * r + r) * 4 + int(N * r * per)),
                f"L·B·Hkv·((D + D·r + r)·4 + N·r·{per:g})  float32 mean, basis and scales, "
                f"{kv.sketch_dtype} keys [L, B·Hkv, N, r]", "held")
        if kv.tail_estimate and plan.config.index.kind == "lowrank":  # offload/tail.py
            chunks = padded_chunks(N)
            sums = sums_dtype(b)
            add("kv: tail V chunk sums", dev, L * Hkv * chunks * D * sums.itemsize,
                f"L·B·Hkv·M·D·{sums.itemsize}  {str(sums).removeprefix('torch.')} "
                f"[L, B·Hkv, M, D], M = ceil(N/{TAIL_CHUNK}) rounded up to a multiple of 64",
                "held")
            fused = dev == "gpu" and kernel_scores(r, _key_bits(kv.sketch_dtype))
            add("decode: tail chunk masses", dev, B * H * chunks * 8 + (0 if fused else
                                                                       B * H * N * 4),
                "B·H·M·8  mass [B·Hkv, G, M] float32 and its "
                "update" + ("" if fused else " + B·H·N·4 padded probabilities (PyTorch "
                            "path)"), "decode")
        guessed = L - max(kv.lookahead_from, 1) if kv.lookahead_from else 0
        if guessed > 0:  # model/llama.py Block.prepare_guess, kernels/guess_query
            C, bias = spec.hidden_size, b if spec.qkv_bias else 0
            add("lookahead: int8 query weights", dev, guessed * H * D * (C + 4 + bias),
                f"(L - {max(kv.lookahead_from, 1)})·H·D·(C + 4{' + b' if bias else ''})  int8 "
                "[H·D, C], float32 scales" + (", bias" if bias else "")
                + " of each guessed layer", "held")
        # (an int8 store's quantising temporaries, pieces of QUANTIZE_TOKENS tokens, are
        # freed before the fit starts and are smaller than it: not counted)
        f32 = b != 4  # a float32 model's keys are used in place, not copied
        one_seq = spec.num_kv_heads  # the fit runs on one sequence's keys at a time
        if kv.sketch_dtype == "auto":
            add("layer end: low-rank fit", dev, one_seq * n * (4 * D * (1 + f32)
                                                              + r * (4 + b * f32)),
                "Hkv·n·(4·D·2 + r·(4 + b))  keys and centred keys in float32, projection "
                "(float32 model: Hkv·n·(4·D + 4·r))", "layer-end")
        else:  # quantised in pieces of STORE_TOKENS tokens
            piece = min(n, STORE_TOKENS) * r * STORE_BYTES_PER_VALUE
            add("layer end: low-rank fit", dev, one_seq * (n * (4 * D * (1 + f32) + 4 * r)
                                                           + piece),
                f"Hkv·(n·(4·D·2 + 4·r) + min(n, {STORE_TOKENS})·r·{STORE_BYTES_PER_VALUE})  "
                "keys and centred keys in float32, projection, one piece's rounding and "
                "packing (float32 model: 4·D·1)", "layer-end")
        P = kv.select_block
        sums, sums_note = (Hkv * (N // P) * 4, f" + B·Hkv·N/{P}·4 block sums") if P > 1 else (0, "")
        if dev == "gpu" and kernel_scores(r, _key_bits(kv.sketch_dtype)):
            sb = 2 if kv.rerank_factor > 1 else 4  # re-rank candidates need only bfloat16
            add("decode: low-rank selection scores", dev, Hkv * N * sb + sums,
                f"B·Hkv·N·{sb}  group shares [B·Hkv, N] {'bfloat16' if sb == 2 else 'float32'}"
                f" (fused select_scores kernel){sums_note}", "decode")
        else:  # its PyTorch reference
            add("decode: low-rank selection scores", dev,
                B * H * N * (b + 8) + Hkv * N * 4 + sums,
                "B·H·N·(b + 8) + B·Hkv·N·4  scores [B·Hkv, G, N], two float32 copies, group sum "
                f"(PyTorch path: a rank that is not a power of two >= 16, or no GPU){sums_note}",
                "decode")
    elif kv.policy == "quest":
        pages = -(-N // kv.page_tokens)
        add("kv: quest page bounds", dev, 2 * L * Hkv * pages * D * b,
            "2·L·B·Hkv·ceil(N/P)·D·b  kmin, kmax [L, B·Hkv, pages, D]", "held")
        add("decode: quest page bounds of the query", dev, 3 * Hkv * G * pages * D * b,
            "3·B·H·ceil(N/P)·D·b  q·kmin, q·kmax, max [B·Hkv, G, pages, D]", "decode")
    add("prefill: one-layer K,V scratch", dev, 2 * spec.num_kv_heads * N * D * b,
        "2·Hkv·N·D·b  DenseKV [1, 1, Hkv, N, D] ×2 (layer-major prefill)", "prefill")
    add("prefill: scratch slot index", dev, 8 * N, "8·N  int64 [N]", "prefill")


def check_budget(plan: MemoryPlan, gpu_bytes: int, host_bytes: int) -> None:
    """Raise ConfigError naming what the plan needs, what is available and what would fit."""
    over = [(place, plan.peak(place), have)
            for place, have in (("gpu", gpu_bytes), ("host", host_bytes))
            if plan.peak(place) > have]
    if not over:
        return
    problems = []
    for place, need, have in over:
        big = sorted((p for p in plan.parts if p.place == place), key=lambda p: -p.nbytes)[:3]
        problems.append(f"{place} memory: needs {format_bytes(need)} at its peak, "
                        f"{format_bytes(have)} available (largest: "
                        + ", ".join(f"{p.name} {format_bytes(p.nbytes)}" for p in big) + ")")
    fixes = _fixes(plan, gpu_bytes, host_bytes)
    if not fixes:
        least = _replan(plan, runtime={"max_context_tokens": 2})
        fixes = [f"use a machine with more memory: the model alone (2 tokens of context) "
                 f"needs gpu {format_bytes(least.peak('gpu'))}, host "
                 f"{format_bytes(least.peak('host'))}"]
    raise ConfigError(f"{_describe(plan)} does not fit: " + "; ".join(problems) + ". To fit: "
                      + ", or ".join(fixes))


def _describe(plan: MemoryPlan) -> str:
    rt, kv = plan.config.runtime, plan.config.kv
    what = f"kv.policy {kv.policy}" + (f", kv.rank {kv.rank}" if kv.policy == "retrieval" else "")
    return (f"{plan.config.model.path or 'the model'} at runtime.max_context_tokens "
            f"{rt.max_context_tokens} ({what}, prefill_chunk_tokens {rt.prefill_chunk_tokens}, "
            f"{plan.device_type})")


def _replan(plan: MemoryPlan, **sections: dict) -> MemoryPlan:
    prompt = None if plan.prompt_tokens == plan.config.runtime.max_context_tokens \
        else plan.prompt_tokens
    return plan_memory(plan.spec, plan.config.replace(**sections), plan.device_type, prompt)


def _fixes(plan: MemoryPlan, gpu: int, host: int) -> list[str]:
    rt, kv = plan.config.runtime, plan.config.kv
    fixes = []
    fits = lambda **s: _replan(plan, **s).fits(gpu, host)  # noqa: E731
    if rt.max_batch > 1:
        batch = largest_batch(plan.spec, plan.config, gpu, host, plan.device_type,
                              rt.max_batch - 1)
        if batch:
            fixes.append(f"lower runtime.max_batch to {batch}")
    lo, hi = 1, rt.max_context_tokens  # largest max_context_tokens that fits: binary search
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(runtime={"max_context_tokens": mid}) else (lo, mid)
    if lo >= 2 and fits(runtime={"max_context_tokens": lo}):
        fixes.append(f"lower runtime.max_context_tokens to {lo}")
    b = dtype_bytes(plan.config.runtime.dtype, plan.device_type)
    if kv.store_on == "device" and kv.policy != "dense" and fits(kv={"store_on": "host"}):
        fixes.insert(0, "set kv.store_on host (the K,V store in host memory)")
    if kv.policy == "retrieval":
        rank = next((r for r in _ranks(kv.rank - 1) if r % 2 == 0 or kv.sketch_dtype != "int4"
                     if fits(kv={"rank": r})), None)
        if rank:
            fixes.append(f"lower kv.rank to {rank}")
        smaller = [d for d in ("int8", "int4")
                   if _value_bytes(d, b) < _value_bytes(kv.sketch_dtype, b)]
        sketch = next((d for d in smaller if kernel_scores(kv.rank, _key_bits(d))
                       and fits(kv={"sketch_dtype": d})), None)
        if sketch:
            fixes.append(f"set kv.sketch_dtype {sketch} (same rank, fewer bytes)")
    if kv.policy == "dense" and plan.device_type == "cuda":
        best = next((c for c in _sketches(plan.spec.head_dim, b)
                     if fits(kv={"policy": "retrieval", "rank": c[0], "sketch_dtype": c[1]})),
                    None)
        if best:
            fixes.append(f"use kv.policy retrieval (with kv.rank {best[0]}, kv.sketch_dtype "
                         f"{best[1]})")
    chunk = largest_prefill_chunk(plan, gpu, host, rt.prefill_chunk_tokens - 1)
    if chunk:
        fixes.append(f"lower runtime.prefill_chunk_tokens to {chunk}")
    return fixes


def largest_batch(spec: ModelSpec, config: EngineConfig, gpu_bytes: int, host_bytes: int,
                  device_type: str = "cuda", limit: int = 4096) -> int:
    """The largest runtime.max_batch (<= limit) at which config fits the budget; 0 if not
    even one sequence fits. Every part grows with the batch, so a bisection finds it."""
    fits = lambda b: plan_memory(spec, config.replace(runtime={"max_batch": b}),  # noqa: E731
                                 device_type).fits(gpu_bytes, host_bytes)
    if not fits(1):
        return 0
    lo, hi = 1, limit + 1  # fits(lo), not known for hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def largest_prefill_chunk(plan: MemoryPlan, gpu_bytes: int, host_bytes: int,
                          at_most: int) -> int | None:
    """The largest of CHUNK_CHOICES (<= at_most) at which the plan's config fits the
    budget; None if none does. The chunk sets prefill's activations and attention mask."""
    return next((c for c in CHUNK_CHOICES if c <= at_most and _replan(
        plan, runtime={"prefill_chunk_tokens": c}).fits(gpu_bytes, host_bytes)), None)


def _ranks(top: int) -> list[int]:
    """Powers of two <= top, largest first. Only these: the fused scoring kernel
    (kernels/select_scores) needs a power-of-two rank >= 16; other ranks take a PyTorch
    path that measured 2.7x slower per decode step (Llama-3-8B shape, 512K, H200: rank
    40 121.5 ms/token, rank 32 45.0, rank 64 50.5)."""
    return [1 << i for i in range(max(top, 0).bit_length() - 1, -1, -1)]


def _sketches(head_dim: int, dtype_bytes: int, max_rank: int | None = None
              ) -> list[tuple[int, str]]:
    """(kv.rank, kv.sketch_dtype) in search order (module docstring): rank first, then
    precision, each at most half the bytes of the dense keys per token."""
    cap = head_dim * dtype_bytes / 2
    top = head_dim if max_rank is None else min(max_rank, head_dim)
    out = []
    for rank in _ranks(top):
        for sketch in ("auto", "int8", "int4"):
            per = _value_bytes(sketch, dtype_bytes)
            # integer sketches only where the kernel scores them: the PyTorch fallback
            # materialises [Hkv, G, N] and decodes several times slower
            if rank * per <= cap and (sketch == "auto" or kernel_scores(rank, _key_bits(sketch))):
                out.append((rank, sketch))
    return out


def _key_bits(sketch_dtype: str) -> int:
    """kernels.KEY_BITS of a kv.sketch_dtype (auto: a float sketch)."""
    return {"auto": 16, "int8": 8, "int4": 4}[sketch_dtype]


def _value_bytes(sketch_dtype: str, dtype_bytes: int) -> float:
    """Bytes per stored sketch value: the model dtype's for auto, else the integers'."""
    return dtype_bytes if sketch_dtype == "auto" else _key_bits(sketch_dtype) / 8


def search_config(spec: ModelSpec, context_tokens: int, gpu_bytes: int, host_bytes: int, *,
                  device_type: str = "cuda", model_path: str | None = None,
                  policy: str | None = None, dtype: str = "auto", top_k: int | float = 2048,
                  window_tokens: int = 512, sink_tokens: int = 4, max_rank: int | None = None,
                  max_kv_gpu_bytes: int | None = None,
                  prefill_chunk_tokens: int = SEARCH_CHUNK_TOKENS, tail_estimate: bool = True,
                  rerank_factor: int = 4, select_block: int = 1,
                  host_dtype: str = "auto", lookahead_from: int = 0, store_on: str = "host",
                  headroom: float = SEARCH_HEADROOM) -> EngineConfig:
    """The config of best expected quality that fits (preference order: module docstring).

    context_tokens is runtime.max_context_tokens (prompt + new tokens); policy restricts the
    search to one kv.policy; max_kv_gpu_bytes caps the KV state on the GPU; headroom is the
    share of each budget the search leaves free (allocator fragmentation, what no plan sees).
    max_rank caps kv.rank (default head_dim); sketches are also capped at half the bytes of
    the dense keys (module docstring). host_dtype and lookahead_from are set as given
    (kv.host_dtype, kv.lookahead_from: speed against accuracy, not memory fit alone).
    store_on is kv.store_on, or "auto": the best config found with the store in host
    memory, moved onto the device where it still fits (the same quality, faster decode).
    """
    if prefill_chunk_tokens < 1:
        raise ConfigError(f"prefill_chunk_tokens is {prefill_chunk_tokens}: the largest "
                          "prefill chunk to consider must be >= 1 token")
    if max_rank is not None and max_rank < 1:
        raise ConfigError(f"max_rank is {max_rank}: the largest kv.rank to consider must be "
                          ">= 1 (or None: head_dim)")
    gpu_bytes, host_bytes = int(gpu_bytes * (1 - headroom)), int(host_bytes * (1 - headroom))
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" else "float32"
    base = EngineConfig.from_dict({
        "model": {"path": model_path},
        "runtime": {"device": device_type, "dtype": dtype, "max_context_tokens": context_tokens,
                    "cuda_graphs": device_type == "cuda"},
        "kv": {"policy": "dense", "sink_tokens": sink_tokens, "window_tokens": window_tokens,
               "top_k": top_k, "tail_estimate": tail_estimate,
               "rerank_factor": rerank_factor, "select_block": select_block,
               "host_dtype": host_dtype, "lookahead_from": lookahead_from}})
    # below the smallest choice, the given chunk itself (not a larger one than asked)
    chunks = [c for c in CHUNK_CHOICES if c <= prefill_chunk_tokens] or [prefill_chunk_tokens]
    kv_cap = max_kv_gpu_bytes if max_kv_gpu_bytes is not None else math.inf

    def first_fit(kv: dict) -> EngineConfig | None:
        for chunk in chunks:
            cfg = base.replace(runtime={"prefill_chunk_tokens": chunk}, kv=kv)
            plan = plan_memory(spec, cfg, device_type)
            if plan.fits(gpu_bytes, host_bytes) and plan.kv_bytes("gpu") <= kv_cap:
                return cfg
        return None

    def on_device(cfg: EngineConfig) -> EngineConfig:
        if store_on == "auto" and cfg.kv.policy != "dense":
            moved = first_fit({**dataclasses.asdict(cfg.kv), "store_on": "device"})
            cfg = moved if moved is not None else cfg
        if cfg.kv.store_on == "device" and cfg.kv.lookahead_from:
            # lookahead's scoring pass leaves SMs to the layer beside it (kv config)
            cfg = cfg.replace(kv={"lookahead_sm_share": DEVICE_LOOKAHEAD_SM_SHARE})
        return cfg

    if store_on != "auto":
        base = base.replace(kv={"store_on": store_on})
    order = [policy] if policy else ["dense", "retrieval"]
    for pol in order:
        if pol == "retrieval":
            for rank, sketch in _sketches(spec.head_dim, DTYPE_BYTES[dtype], max_rank):
                if cfg := first_fit({"policy": pol, "rank": rank, "sketch_dtype": sketch}):
                    return on_device(cfg)
        elif cfg := first_fit({"policy": pol}):
            return cfg
    smallest = base.replace(runtime={"prefill_chunk_tokens": chunks[-1]},
                            kv={"policy": order[-1], "rank": 1, "sketch_dtype": "auto"})
    plan = plan_memory(spec, smallest, device_type)
    if plan.fits(gpu_bytes, host_bytes) and max_kv_gpu_bytes is not None:  # only the cap
        raise ConfigError(f"no config keeps the GPU KV state under {format_bytes(kv_cap)}: "
                          f"even kv.rank 1 needs {format_bytes(plan.kv_bytes('gpu'))}; raise the "
                          "cap or lower the context")
    try:
        check_budget(plan, gpu_bytes, host_bytes)
    except ConfigError as e:
        raise ConfigError(f"no config fits (the search keeps {headroom:.0%} of each budget "
                          f"free); the smallest, {e}") from None
    raise AssertionError("unreachable: check_budget raises for a plan that does not fit")


def to_yaml(config: EngineConfig, header: str | None = None) -> str:
    """YAML that EngineConfig.from_yaml loads back equal to config; header lines become comments."""
    text = yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, default_flow_style=False)
    if header:
        text = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines()) + text
    return text


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """'80GiB' (2^30), '128GB' (10^9), '1.5TiB', '1073741824' (bytes) -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m and unit not in _UNITS and unit in ("k", "m", "g", "t"):
        raise ConfigError(f"memory size {text!r}: unit {m.group(2)!r} is ambiguous; write "
                          f"{m.group(2).upper()}B (powers of 10) or {m.group(2).upper()}iB "
                          "(powers of 2)")
    if not m or unit not in _UNITS:
        raise ConfigError(f"{text!r} is not a memory size: write a number and a unit, e.g. "
                          "80GiB (2^30 bytes), 128GB (10^9 bytes) or 1073741824 (bytes)")
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: int | float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def spec_for(path: str | None, cache_dir: str = "~/.cache/retrieval-attn") -> ModelSpec:
    """A model's spec without loading weights: 'random:<shape>' or a shape name, a HF
    checkpoint directory (config.json), a .gguf file (its header: nothing is exported), or
    None (the embedded GGUF)."""
    from retrieval_attn.model.gguf import read_gguf_spec
    from retrieval_attn.model.loader import checkpoint_dir, embedded_model_path, read_spec
    from retrieval_attn.model.spec import NAMED_SHAPES, named_shape

    if path is not None and (path.startswith("random:") or path in NAMED_SHAPES):
        return named_shape(path.removeprefix("random:"))
    src = embedded_model_path() if path is None else Path(path).expanduser()
    if src.is_file() and src.suffix == ".gguf":
        return read_gguf_spec(src)
    return read_spec(checkpoint_dir(path, cache_dir))


def available_memory(device) -> tuple[int, int]:
    """(GPU bytes, host bytes) this process can use on `device` (a torch.device): what is
    free plus what this process already holds (a plan counts the weights already loaded)."""
    import os

    import torch

    gpu = 0
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        gpu = free + torch.cuda.memory_reserved(device)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        host = int(info["MemAvailable"].split()[0]) * 1024
        rss_pages = int(Path("/proc/self/statm").read_text().split()[1])
        host += rss_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, KeyError, ValueError):
        pass
    return gpu, host
