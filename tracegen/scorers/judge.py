"""``judge``: SpecReason's verdict of the large model on each step the small model wrote.

``judge@ROLE`` asks the trace's ROLE model instead of its largest, on the steps of every smaller model, and
stores the verdicts as scorer ``judge@ROLE``: SpecReason with ``target=ROLE`` reads them.

Laid out as SpecReason's public code lays it out (``tracegen.prompts.judge_prompt_ids``): the question
as the user's turn, the steps so far as the assistant's reasoning, a request to rate the last step 0-9,
and the assistant's reply prefilled with "I think the quality score is: ". The request's words, the steps'
layout and the top-k come from a named preset (``--preset``; trace.json records all of it): ``specreason``
(default) as SpecReason's code asks, ``trace`` this project's earlier wording. value = the greedy next token's
digit (a non-digit counts as 0); detail = the probabilities of the digits 0-9 among the top-k next tokens (0
where a digit is not in the top-k), from which ``--param score=expected`` takes the expected digit. A call
reads the prompt and generates one token.
"""

from __future__ import annotations

import math

import polars as pl

from tracegen.prompts import JUDGE_PRESETS, judge_prompt_ids, preset_record
from tracegen.scorers.base import SCORERS, Item, LargeModelScorer, Score

DIGITS = tuple(str(d) for d in range(10))


@SCORERS.register
class Judge(LargeModelScorer):
    name = "judge"
    signal = "judge"
    per_role = True  # judge@ROLE: the verdict of the trace's ROLE model (SpecReason with target=ROLE)
    generated_tokens = 1  # the verdict digit
    presets = JUDGE_PRESETS

    def wants(self) -> pl.Expr:
        roles = self.manifest.roles
        return pl.col("model").is_in(roles[: roles.index(self.largest_role)])  # the drafts: every smaller model's

    def describe(self) -> dict:
        return {**self.model_fields(), **self.method()}

    def method(self) -> dict:
        """The prompt preset (its texts and top-k) of the verdict, recorded in trace.json."""
        return {
            "layout": "system, user: question; assistant: steps; user: request; assistant: prefill",
            "preset": preset_record(self.preset_name, self.prompt),
            "value": "greedy next token's digit, non-digit 0",
        }

    def score(self, items: list[Item]) -> list[Score]:
        engine, tokenizer = self.engine(self.engine_role, self.checkpoint)
        prompts = [judge_prompt_ids(tokenizer, item.question, item.step_texts, self.prompt) for item in items]
        digit_ids = {tokenizer.convert_tokens_to_ids(d): int(d) for d in DIGITS}
        scores = []
        for prompt, top in zip(prompts, engine.next_token_logprobs(prompts, self.prompt.top_k)):
            probabilities = [0.0] * 10
            for token, logprob in top.items():
                if token in digit_ids:
                    probabilities[digit_ids[token]] += math.exp(logprob)
            greedy = max(top, key=top.__getitem__)
            value = float(digit_ids.get(greedy, 0))  # SpecReason: a non-digit verdict counts as 0
            scores.append(Score(value=value, detail=probabilities, n_tokens_processed=len(prompt) + 1))
        return scores
