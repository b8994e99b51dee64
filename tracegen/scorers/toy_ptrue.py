"""``toy-ptrue``: the toy world's P(True) (stores the ``ptrue`` signal).

The toy models cannot answer a question about an answer, so P(True) is the probability the model
gives its own answer: the product of its probabilities of the tokens inside the final step's
\\boxed{...}, teacher forced after the same context (0 without a box). A call reads the context and the
step and writes nothing, but it is charged as the scorer it stands in for: P(True), whose verdict is one
generated token of the model asked (``generated_tokens``; trace.json records ``charged_as``).
"""

from __future__ import annotations

import math

from tracegen.scorers.base import SCORERS, Item, Score
from tracegen.scorers.ptrue import PTrue

TOY_P_TRUE = "product of the model's probabilities of the tokens inside the final \\boxed{...}, teacher forced"
CHARGED_AS = "ptrue: one generated token of the model asked per call (it generates none itself)"
BOX_OPEN = "\\boxed{"


@SCORERS.register
class ToyPTrue(PTrue):
    name = "toy-ptrue"
    world = "toy"
    generated_tokens = PTrue.generated_tokens  # charged as P(True): one verdict token per call

    def method(self) -> dict:
        return {"prompt": TOY_P_TRUE, "charged_as": CHARGED_AS}

    def score_own(self, engine, tokenizer, items: list[Item]) -> list[Score]:
        logprobs = engine.continuation_logprobs([i.prefix_ids for i in items], [i.step_ids for i in items])
        scores = []
        for item, values in zip(items, logprobs):
            inside = _boxed_token_positions(tokenizer, item.step_ids)
            value = math.exp(sum(values[k] for k in inside)) if inside else 0.0
            scores.append(Score(value=value, n_tokens_processed=len(item.prefix_ids) + len(item.step_ids)))
        return scores


def _boxed_token_positions(tokenizer, token_ids: list[int]) -> list[int]:
    """Positions of the tokens that overlap the content of the last \\boxed{...} in the decoded step."""
    pieces = [tokenizer.decode([token]) for token in token_ids]
    text = "".join(pieces)
    start = text.rfind(BOX_OPEN)
    if start < 0:
        return []
    start += len(BOX_OPEN)
    end = text.find("}", start)
    end = len(text) if end < 0 else end
    positions, offset = [], 0
    for k, piece in enumerate(pieces):
        if offset < end and offset + len(piece) > start:
            positions.append(k)
        offset += len(piece)
    return positions
