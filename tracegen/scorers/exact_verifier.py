"""``exact-verifier``: the toy world's exact step verifier (stores the ``verifier`` signal).

``data.toy.task.step_is_valid``: the step continues from the previous result, applies the question's
next operation and is written exactly right. No model, no cost.
"""

from __future__ import annotations

import polars as pl

from data.toy.task import step_is_valid
from tracegen.scorers.base import SCORERS, Item, Score, Scorer

EXACT = "data.toy.task.step_is_valid (exact arithmetic and format check)"


@SCORERS.register
class ExactVerifier(Scorer):
    name = "exact-verifier"
    world = "toy"
    signal = "verifier"
    generated_tokens = 0

    def wants(self) -> pl.Expr:
        return pl.lit(True)

    def describe(self) -> dict:
        return {"model": "exact", "prompt": EXACT}

    def score(self, items: list[Item]) -> list[Score]:
        return [
            Score(value=float(step_is_valid(i.question, i.step_texts[:-1], i.step_texts[-1])), n_tokens_processed=0)
            for i in items
        ]
