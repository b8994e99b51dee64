"""``judge``: SpecReason's verdict of the large model on each step the small model wrote.

The large model (or ``--model``) reads the question, the earlier steps and the latest step (prompt
``JUDGE_PROMPT``) and rates it 0-9: value = the likeliest digit, detail = the probabilities of the
digits 0-9 among its top-k next tokens (0 where a digit is not in the top-k). A call costs the
prompt's prefill plus one token.
"""

from __future__ import annotations

import math

import polars as pl

from replay.schema import SMALL
from tracegen.prompts import JUDGE_PROMPT
from tracegen.scorers.base import Item, LargeModelScorer, Score, step_prompt_ids

DIGITS = tuple(str(d) for d in range(10))
TOP_K = 20


class Judge(LargeModelScorer):
    name = "judge"
    signal = "judge"
    generated_tokens = 1  # the verdict digit

    def wants(self) -> pl.Expr:
        return pl.col("model") == SMALL

    def describe(self) -> dict:
        return {**self.model_fields(), **self.method()}

    def method(self) -> dict:
        """The prompt (and top-k) of the verdict, recorded in trace.json."""
        return {"prompt": JUDGE_PROMPT, "top_k": TOP_K}

    def score(self, items: list[Item]) -> list[Score]:
        engine, tokenizer = self.engine(self.engine_role, self.checkpoint)
        prompts = step_prompt_ids(tokenizer, JUDGE_PROMPT, items)
        digit_ids = {tokenizer.convert_tokens_to_ids(d): int(d) for d in DIGITS}
        scores = []
        for prompt, top in zip(prompts, engine.next_token_logprobs(prompts, TOP_K)):
            probabilities = [0.0] * 10
            for token, logprob in top.items():
                if token in digit_ids:
                    probabilities[digit_ids[token]] += math.exp(logprob)
            value = float(max(range(10), key=probabilities.__getitem__)) if any(probabilities) else 0.0
            scores.append(Score(value=value, detail=probabilities, n_tokens_processed=len(prompt) + 1))
        return scores
