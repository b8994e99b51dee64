"""``toy-judge``: the toy world's stand-in for SpecReason's judge (stores the ``judge`` signal).

The toy large model cannot follow instructions, so its verdict is its own opinion of the step read
another way: the mean log-probability it assigns to the small model's step tokens after the same
context (teacher forcing through the engine), p = exp(mean), mapped to 9p. value = round(9p);
detail puts 9p between its two neighbouring digits, so the expected digit is 9p. A call reads the context
and the step and writes nothing, but it is charged as the scorer it stands in for: SpecReason's judge, whose
verdict is one generated large-model token (``generated_tokens``; trace.json records ``charged_as``).
"""

from __future__ import annotations

import math

from tracegen.scorers.base import SCORERS, Item, Score
from tracegen.scorers.judge import Judge

TOY_JUDGE = "9 * exp(mean logprob of the step's tokens under the large model, teacher forced)"
CHARGED_AS = "judge: one generated token of its model per call (it generates none itself)"


@SCORERS.register
class ToyJudge(Judge):
    name = "toy-judge"
    world = "toy"
    generated_tokens = Judge.generated_tokens  # charged as SpecReason's judge: one verdict token per call
    presets = {}  # it asks no prompt

    def method(self) -> dict:
        return {"prompt": TOY_JUDGE, "charged_as": CHARGED_AS}

    def score(self, items: list[Item]) -> list[Score]:
        engine, _ = self.engine(self.engine_role, self.checkpoint)
        logprobs = engine.continuation_logprobs([i.prefix_ids for i in items], [i.step_ids for i in items])
        return [_verdict(values, len(i.prefix_ids) + len(i.step_ids)) for i, values in zip(items, logprobs)]


def _verdict(logprobs: list[float], n_tokens: int) -> Score:
    rating = 9 * math.exp(sum(logprobs) / len(logprobs))
    low = min(int(rating), 8)
    detail = [0.0] * 10
    detail[low], detail[low + 1] = low + 1 - rating, rating - low
    return Score(value=float(round(rating)), detail=detail, n_tokens_processed=n_tokens)
