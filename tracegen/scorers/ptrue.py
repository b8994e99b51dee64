"""``ptrue``: the probability a model gives that its own final answer is correct (the cascade's P(T)).

Scores every final step, asked of the model that wrote it (manifest model "self"): Kadavath et al.'s
prompt (``P_TRUE_PROMPT``: question, proposed answer, "(A) True (B) False"); value = P(A) / (P(A) +
P(B)) over the next-token top-k, detail = [P(A), P(B)]. A call costs the prompt's prefill plus one
token.
"""

from __future__ import annotations

import math

import polars as pl

from tracegen.models import trace_model
from tracegen.prompts import P_TRUE_PROMPT, user_prompt_ids
from tracegen.scorers.base import SCORERS, Item, LanguageModelScorer, Score
from tracestore.errors import TraceError

TOP_K = 20


@SCORERS.register
class PTrue(LanguageModelScorer):
    name = "ptrue"
    signal = "ptrue"
    generated_tokens = 1  # the letter of the verdict

    def check(self) -> None:
        if self.model is not None:
            raise TraceError(f"{self.signal} asks the model that wrote each answer; it takes no --model")

    def wants(self) -> pl.Expr:
        return pl.col("is_final")

    def describe(self) -> dict:
        return {"model": "self", **self.method()}

    def method(self) -> dict:
        """The prompt (and top-k) of the question, recorded in trace.json."""
        return {"prompt": P_TRUE_PROMPT, "top_k": TOP_K}

    def score(self, items: list[Item]) -> list[Score]:
        scores: dict[str, Score] = {}
        for role in sorted({item.role for item in items}):
            engine, tokenizer = self.engine(role, trace_model(self.manifest, role))
            mine = [item for item in items if item.role == role]
            for item, score in zip(mine, self.score_own(engine, tokenizer, mine)):
                scores[item.step_id] = score
        return [scores[item.step_id] for item in items]

    def score_own(self, engine, tokenizer, items: list[Item]) -> list[Score]:
        """Scores of final steps that the model behind ``engine`` wrote."""
        prompts = [
            user_prompt_ids(tokenizer, P_TRUE_PROMPT.format(question=i.question, answer=i.answer or "")) for i in items
        ]
        scores = []
        for prompt, top in zip(prompts, engine.next_token_logprobs(prompts, TOP_K)):
            mass = {"A": 0.0, "B": 0.0}
            for token, logprob in top.items():
                letter = tokenizer.decode([token]).strip().lstrip("(")
                if letter in mass:
                    mass[letter] += math.exp(logprob)
            total = mass["A"] + mass["B"]
            scores.append(
                Score(
                    value=mass["A"] / total if total > 0 else 0.5,
                    detail=[mass["A"], mass["B"]],
                    n_tokens_processed=len(prompt) + 1,
                )
            )
        return scores
