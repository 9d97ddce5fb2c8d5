"""LLMExecutor: the scheduler's Executor over LLM.steps, one sequence at a time.

The engine decodes one sequence (or equal-length prompts in lockstep), so this executor
holds one running sequence: its token generator, advanced one token per step. Closing the
generator ends the request in the engine (the KV policy is reset by the next prefill).
"""

from __future__ import annotations

import logging

from retrieval_attn.api import LLM
from retrieval_attn.errors import RetrievalAttnError
from retrieval_attn.server.scheduler import Sequence, StepOutput

LOG = logging.getLogger(__name__)


class LLMExecutor:
    max_running = 1

    def __init__(self, llm: LLM) -> None:
        self.llm = llm

    def step(self, running: list[Sequence]) -> list[StepOutput]:
        return [self._advance(seq) for seq in running]

    def _advance(self, seq: Sequence) -> StepOutput:
        """One new token of seq (its first step prefills), with the text now safe to show;
        text flushed at the end rides with the last token."""
        if seq.state is None:
            # a shared context is loaded again for each request (one sequence at a time)
            seq.state = self.llm.steps({"prompt_token_ids": seq.prompt_ids}, seq.params,
                                       after=seq.context)
        text, token = "", None
        try:
            while token is None:
                token, piece = next(seq.state)
                text += piece
            return StepOutput(token, text)
        except StopIteration as done:
            return StepOutput(token, text, done.value.finish_reason)
        except RetrievalAttnError as e:
            return StepOutput(token, text, error=str(e))
        except Exception as e:  # noqa: BLE001 - one request's failure must not stop the rest
            LOG.exception("request %s failed in the engine", seq.request_id)
            return StepOutput(token, text, error=f"the engine failed: {type(e).__name__}")

    def free(self, seq: Sequence) -> None:
        if seq.state is not None:
            seq.state.close()
            seq.state = None
