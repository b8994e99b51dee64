"""``api-verifier``: the per-step ``verifier`` signal asked of a chat model behind an OpenAI-compatible endpoint
(the CMDP seed's open-to-closed setting checks steps with GPT-4o-mini).

``--model`` gives the endpoint as ``url=BASE_URL,model=NAME[,key-env=VAR][,price=...]`` (the settings of
``trace gen --api``; the key is read from $VAR and never stored). The prompt is the verifier's (one user
message worded by its preset, ``--preset``: the CMDP seed's Appendix A template by default); the reply is one
greedy token with its top-20 log-probabilities:
value = 1 if the tokens that begin "correct" are likelier than those that begin "incorrect", detail =
[P(correct), P(incorrect)]. A call costs the billed prompt tokens plus one generated token. Every response is
stored in the trace (``_api/verifier``) as it arrives, so a rerun pays for nothing twice.
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from tracegen.prompts import VERIFIER_PRESETS, preset_record, verifier_prompt
from tracegen.scorers.base import SCORERS, Item, Score, Scorer
from tracestore.errors import TraceError


@SCORERS.register
class ApiVerifier(Scorer):
    name = "api-verifier"
    signal = "verifier"
    generated_tokens = 1
    default_batch = 64
    presets = VERIFIER_PRESETS

    trace_root: Path | None = None  # set by tracegen.scoring.open_scorer: where responses are stored

    @property
    def spec(self):
        from tracegen.backends.endpoint_spec import parse_api_spec

        if not self.model:
            raise TraceError(
                "scorer api-verifier needs --model url=BASE_URL,model=NAME[,key-env=VAR] (its endpoint and model)"
            )
        return parse_api_spec(f"{self.signal}:{self.model},mode=chat")

    def check(self) -> None:
        if self.spec.model is None:
            raise TraceError("scorer api-verifier needs model=NAME in --model (e.g. model=gpt-4o-mini)")

    def wants(self) -> pl.Expr:
        return pl.lit(True)

    def describe(self) -> dict:
        return {
            "model": self.signal,
            "name": self.spec.model,
            "served_by": "openai",
            "preset": preset_record(self.preset_name, self.prompt),
        }

    def _load(self) -> None:
        from tracegen.backends.openai_endpoint import open_api_backend

        if self.trace_root is None:
            raise TraceError("scorer api-verifier must be opened on a trace (tracegen.scoring.open_scorer)")
        self._backend = open_api_backend(self.spec, self.trace_root, model_name=self.spec.model)

    def score(self, items: list[Item]) -> list[Score]:
        prompts = [verifier_prompt(i.question, i.step_texts, self.prompt) for i in items]
        scores = []
        for top, usage in self._backend.chat_next_token(prompts, self.prompt.top_k):
            p_correct = sum(math.exp(lp) for token, lp in top if _begins("correct", token))
            p_incorrect = sum(math.exp(lp) for token, lp in top if _begins("incorrect", token))
            scores.append(
                Score(
                    value=float(p_correct > p_incorrect),
                    detail=[p_correct, p_incorrect],
                    n_tokens_processed=usage["prompt_tokens"] + self.generated_tokens,
                )
            )
        return scores


def _begins(word: str, token: str) -> bool:
    """Whether ``token`` (any case, leading space) is the start of ``word``."""
    text = token.strip().lower()
    return bool(text) and word.startswith(text)
