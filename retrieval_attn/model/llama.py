"""Llama-family decoder (Llama 2/3.x, Mistral, Qwen2, SmolLM2) in plain PyTorch.

Attention goes through a KVPolicy (offload/): the model never knows whether past tokens
are dense on the GPU or retrieved from host memory.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from retrieval_attn.kernels.guess_query import GuessWeights, guess_query, guess_query_ref
from retrieval_attn.model.layers import RMSNorm, SwiGLU, apply_rope, rope_inv_freq, rope_tables
from retrieval_attn.model.spec import ModelSpec
from retrieval_attn.offload.policy import AttnStep, KVPolicy


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.H, self.Hkv, self.D = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.split = [self.H * self.D, self.Hkv * self.D, self.Hkv * self.D]
        self.qkv = nn.Linear(spec.hidden_size, sum(self.split), bias=spec.qkv_bias)  # packed
        self.o_proj = nn.Linear(self.H * self.D, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVPolicy,
                step: AttnStep) -> torch.Tensor:
        B, T, _ = x.shape  # x [B, T, C]; cos, sin [T, D]
        q, k, v = self.qkv(x).split(self.split, dim=-1)
        q = apply_rope(q.view(B, T, self.H, self.D).transpose(1, 2), cos, sin)  # [B, H, T, D]
        k = apply_rope(k.view(B, T, self.Hkv, self.D).transpose(1, 2), cos, sin)  # [B,Hkv,T,D]
        v = v.view(B, T, self.Hkv, self.D).transpose(1, 2)
        out = kv.attend(self.layer, q, k, v, step)  # [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.H * self.D))

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The queries alone of x [B, T, C] -> [B, H, T, D] (post-RoPE)."""
        B, T, _ = x.shape
        n = self.H * self.D  # the packed weight's first rows
        bias = None if self.qkv.bias is None else self.qkv.bias[:n]
        q = nn.functional.linear(x, self.qkv.weight[:n], bias)
        return apply_rope(q.view(B, T, self.H, self.D).transpose(1, 2), cos, sin)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.attn = Attention(spec, layer)
        self.mlp_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = SwiGLU(spec.hidden_size, spec.intermediate_size)
        # an int8 copy of the query projection for guesses (prepare_guess), or None
        self.guess: GuessWeights | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVPolicy,
                step: AttnStep) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, kv, step)
        return x + self.mlp(self.mlp_norm(x))

    def guess_query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                    ) -> torch.Tensor:
        """This layer's queries [B, H, T, D] as if x [B, T, C] were its input: an earlier
        layer's hidden state gives a close guess (the residual stream changes little from
        one layer to the next). With prepare_guess's int8 weights, a decode token's (T = 1)
        in one kernel (kernels.guess_query: half the weight bytes; the guess only chooses
        which tokens the layer reads, checked against dense attention in docs/results.md): the
        Triton kernel on a GPU, its reference elsewhere (not the interpreter, which tests
        may have switched on for the whole process: it made a CPU decode ~10x slower)."""
        if self.guess is not None and x.shape[1] == 1:
            g, x1, c, s = self.guess, x[:, 0], cos[0], sin[0]
            q = (guess_query(x1, g, c, s) if x.is_cuda else
                 guess_query_ref(x1, g.rows, g.scale, g.bias, c, s, g.eps, g.heads))
            return q[:, :, None]
        return self.attn.query(self.attn_norm(x), cos, sin)

    @torch.no_grad()
    def prepare_guess(self) -> None:
        """Make the int8 query weights guess_query uses (kernels.GuessWeights)."""
        a, n = self.attn, self.attn.H * self.attn.D  # the packed weight's first rows
        bias = None if a.qkv.bias is None else a.qkv.bias[:n]
        self.guess = GuessWeights.of(a.qkv.weight[:n], self.attn_norm.weight, bias,
                                             self.attn_norm.eps, a.H)


class Llama(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        if not spec.tie_word_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.cos = self.sin = None  # [max_positions, D], set by setup_rope

    def setup_rope(self, max_positions: int) -> None:
        """Build the rotary tables for positions [0, max_positions) on the model's device."""
        p = self.embed.weight
        inv = rope_inv_freq(self.spec.head_dim, self.spec.rope_theta, self.spec.rope_scaling)
        self.cos, self.sin = rope_tables(inv, max_positions, p.device, p.dtype)

    def prepare_guesses(self, first: int) -> None:
        """int8 query weights for the guesses of layers first.. (kv.lookahead_from: a
        decode step guesses layer l's queries from layer l - 1's input; Block.guess_query),
        and none for the layers before (none at all for first 0: no lookahead); layers that
        have them keep them."""
        for i, block in enumerate(self.layers):
            if 0 < first <= i:
                if block.guess is None:
                    block.prepare_guess()
            else:
                block.guess = None

    def forward(self, ids: torch.Tensor, kv: KVPolicy, step: AttnStep,
                last_only: bool = True) -> torch.Tensor:
        """ids [B, T] -> logits [B, 1, V] (last token) or [B, T, V]."""
        if self.cos is None:
            raise RuntimeError("call setup_rope(max_positions) before the first forward")
        cos, sin = self.cos[step.positions], self.sin[step.positions]  # [T, D]
        x = self.embed(ids)
        # a decode step tells a policy that looks ahead how to guess the next layer's
        # queries from this layer's input (offload/policy.py)
        lookahead = getattr(kv, "lookahead", None) if ids.shape[1] == 1 else None
        for i, block in enumerate(self.layers):
            if lookahead is not None and i + 1 < len(self.layers):
                lookahead(i + 1, partial(self.layers[i + 1].guess_query, x, cos, sin), step)
            x = block(x, cos, sin, kv, step)
        return self.logits(x[:, -1:] if last_only else x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, T, C] -> logits [B, T, V]."""
        head = self.embed.weight if self.spec.tie_word_embeddings else self.lm_head.weight
        return self.norm(x) @ head.t()
