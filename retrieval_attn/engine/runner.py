"""ModelRunner: chunked prefill and one-token decode steps, graphed on CUDA.

The decode step has static shapes (one token, KV cache of max_tokens slots), so on a GPU
it is captured once in a CUDA graph: for a small model the step is otherwise bound by
the launch of a few hundred small kernels from Python.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from retrieval_attn.model.llama import Llama
from retrieval_attn.offload.policy import AttnStep, KVPolicy


class ModelRunner:
    def __init__(self, model: Llama, kv: KVPolicy, max_tokens: int, prefill_chunk_tokens: int,
                 use_cuda_graph: bool, batch: int = 1) -> None:
        self.model, self.kv = model, kv
        self.device = model.embed.weight.device
        self.chunk = prefill_chunk_tokens
        self.use_graph = use_cuda_graph and self.device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_kv: KVPolicy | None = None  # the policy the graph was captured with
        self.graph_version = -1  # and the version of its state then
        self.batch = batch  # sequences per decode step (the policy holds state for each)
        self.static_ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)  # [B, 1]
        self.static_pos = torch.zeros(1, dtype=torch.long, device=self.device)  # [1]
        self.static_logits: torch.Tensor | None = None
        model.setup_rope(max_tokens)

    @torch.inference_mode()
    def prefill(self, ids: list[int], all_logits: bool = False,
                progress: bool = False) -> torch.Tensor:
        """Run the prompt in chunks of tokens, in the order the policy needs.

        Layer-major (kv.layer_major, the offloading policies): every chunk of a layer, then
        the next layer. Only one layer's full K, V need exist on the device: the policy
        gets each layer's K, V (finish_layer) as soon as the layer is done, so a
        million-token prompt never holds every layer's KV on the device; the hidden states
        of all tokens [1, n, C] stay on the device between layers.
        Chunk-major (dense, whose cache holds every layer on the device anyway): each chunk
        through every layer, so only one chunk's hidden states [1, T, C] exist.
        Returns logits [V] of the last token, or [n, V] if all_logits.
        """
        n = len(ids)
        ids_t = torch.tensor([ids], dtype=torch.long, device=self.device)  # [1, n]
        chunks = [(s, min(s + self.chunk, n)) for s in range(0, n, self.chunk)]
        bar = tqdm(total=n, unit="tok", desc="prefill", disable=not progress, leave=False,
                   dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.0f}/{total} "
                   "[{elapsed}<{remaining}, {rate_fmt}]")
        with bar:
            if self.kv.layer_major:
                x = self._prefill_layer_major(ids_t, chunks, bar)  # [1, n, C]
                logits = self.model.logits(x if all_logits else x[:, -1:])[0].float()
            else:
                logits = self._prefill_chunk_major(ids_t, chunks, all_logits, bar)
        return logits if all_logits else logits[-1]  # [n or 1, V] -> [n, V] or [V]

    def _prefill_layer_major(self, ids: torch.Tensor, chunks: list[tuple[int, int]],
                             bar) -> torch.Tensor:
        model, n = self.model, ids.shape[1]
        x = model.embed(ids)  # [1, n, C]
        steps = [AttnStep(torch.arange(s, e, device=self.device), s) for s, e in chunks]
        layers = len(model.layers)  # the bar counts prompt tokens: a chunk of a layer
        for i, block in enumerate(model.layers):  # is 1/layers of its tokens
            for (s, e), step in zip(chunks, steps, strict=True):
                x[:, s:e] = block(x[:, s:e], model.cos[s:e], model.sin[s:e], self.kv, step)
                bar.update((e - s) / layers)
            self.kv.finish_layer(i, n)
        return x

    def _prefill_chunk_major(self, ids: torch.Tensor, chunks: list[tuple[int, int]],
                             all_logits: bool, bar) -> torch.Tensor:
        """-> logits [n, V] (all_logits) or [1, V] of the last token, float32."""
        model, n = self.model, ids.shape[1]
        out = []  # logits [T or 1, V] of the chunks that need them
        for s, e in chunks:
            step = AttnStep(torch.arange(s, e, device=self.device), s)
            logits = model(ids[:, s:e], self.kv, step, last_only=not all_logits)  # [1, ., V]
            if all_logits or e == n:
                out.append(logits[0].float())
            bar.update(e - s)
        for i in range(len(model.layers)):
            self.kv.finish_layer(i, n)
        return torch.cat(out)

    def decode(self, token: int, pos: int) -> torch.Tensor:
        """Feed one token at position pos; logits [V] for the next one. In a batched
        runner the token is fed to every sequence and sequence 0's logits come back."""
        return self.decode_batch([token] * self.batch, pos)[0]

    @torch.inference_mode()
    def decode_batch(self, tokens: list[int], pos: int) -> torch.Tensor:
        """Feed tokens[b] to sequence b, all at position pos (lockstep); logits [B, V]."""
        if len(tokens) != self.batch:
            raise ValueError(f"{len(tokens)} tokens for a batch of {self.batch} sequences")
        ids = torch.tensor(tokens, device=self.device)[:, None]  # [B, 1]
        if not (self.use_graph and self.kv.graph_safe):
            step = AttnStep(torch.tensor([pos], device=self.device), pos)
            return self.model(ids, self.kv, step)[:, -1].float()
        self.static_ids.copy_(ids)
        self.static_pos.fill_(pos)
        # A graph replays fixed tensor addresses: capture again for another policy, or when
        # the policy reallocated its state (a new request).
        # The captured policy is held (not just its id) so that it cannot be freed and a
        # new policy take its address.
        if (self.graph is None or self.graph_kv is not self.kv
                or self.graph_version != self.kv.state_version):
            self.graph = None
            self._capture()
            self.graph_kv, self.graph_version = self.kv, self.kv.state_version
        self.graph.replay()
        # a copy: the static output is overwritten by the next replay (and .float() of a
        # float32 model's logits would hand out that very buffer)
        return self.static_logits[:, -1].to(torch.float32, copy=True)

    def _capture(self) -> None:
        # Warm up on a side stream (allocator and kernel selection), then capture. The
        # warm-up runs the real step with the real token, so what it writes is correct.
        step = AttnStep(self.static_pos, None)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model(self.static_ids, self.kv, step)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_logits = self.model(self.static_ids, self.kv, step)
