"""``judge``: SpecReason's verdict of the large model on each step the small model wrote.

Real: the large model reads the question, the earlier steps and the latest step (prompt
``JUDGE_PROMPT``) and rates it 0-9: value = the likeliest digit, detail = the probabilities of the
digits 0-9 among its top-k next tokens (0 where a digit is not in the top-k). A call costs the
prompt's prefill plus one token.

Toy: the toy large model cannot follow instructions, so its verdict is its own opinion of the step
read another way: the mean log-probability it assigns to the small model's step tokens after the
same context (teacher forcing through the engine), p = exp(mean), mapped to 9p. value = round(9p);
detail puts 9p between its two neighbouring digits, so the expected digit is 9p. A call costs the
prefill of the context and the step.
"""

from __future__ import annotations

import math

import polars as pl

from tracegen.prompts import JUDGE_PROMPT, earlier_steps_text, user_prompt_ids
from tracegen.scorers.base import Item, LanguageModelScorer, Score, model_entry, named_model, trace_model

DIGITS = tuple(str(d) for d in range(10))
TOP_K = 20
TOY_JUDGE = "9 * exp(mean logprob of the step's tokens under the large model, teacher forced)"


class Judge(LanguageModelScorer):
    name = "judge"

    def __init__(self, manifest, *, model, backend, toy):
        super().__init__(manifest, model=model, backend=backend, toy=toy)
        self._checkpoint = named_model(model, "judge") if model else trace_model(manifest, "large")

    def wants(self) -> pl.Expr:
        return pl.col("model") == "small"

    def manifest_entry(self) -> dict:
        who = {"model": "large"} if self.model is None else {**model_entry(self._checkpoint), "model": "judge"}
        variant = {"prompt": TOY_JUDGE} if self.toy else {"prompt": JUDGE_PROMPT, "top_k": TOP_K}
        return {**who, **variant}

    def score(self, items: list[Item]) -> list[Score]:
        engine, tokenizer = self.engine("large" if self.model is None else "judge", self._checkpoint)
        if self.toy:
            logprobs = engine.continuation_logprobs([i.prefix_ids for i in items], [i.step_ids for i in items])
            return [_toy_verdict(values, len(i.prefix_ids) + len(i.step_ids)) for i, values in zip(items, logprobs)]
        prompts = [user_prompt_ids(tokenizer, JUDGE_PROMPT.format(
            question=i.question, earlier=earlier_steps_text(i.step_texts[:-1]), step=i.step_texts[-1])) for i in items]
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


def _toy_verdict(logprobs: list[float], n_tokens: int) -> Score:
    rating = 9 * math.exp(sum(logprobs) / len(logprobs))
    low = min(int(rating), 8)
    detail = [0.0] * 10
    detail[low], detail[low + 1] = low + 1 - rating, rating - low
    return Score(value=float(round(rating)), detail=detail, n_tokens_processed=n_tokens)
