"""``ptrue``: the probability a model gives that its own final answer is correct (the cascade's P(T)).

Scores every final step, asked of the model that wrote it (manifest model "self").

Real: Kadavath et al.'s prompt (``P_TRUE_PROMPT``: question, proposed answer, "(A) True (B)
False"); value = P(A) / (P(A) + P(B)) over the next-token top-k, detail = [P(A), P(B)]. A call
costs the prompt's prefill plus one token.

Toy: the toy models cannot answer a question about an answer, so P(True) is the probability the
model gives its own answer: the product of its probabilities of the tokens inside the final step's
\\boxed{...}, teacher forced after the same context (0 without a box). A call costs the prefill of
the context and the step.
"""

from __future__ import annotations

import math

import polars as pl

from tracegen.prompts import P_TRUE_PROMPT, user_prompt_ids
from tracegen.scorers.base import Item, LanguageModelScorer, Score, trace_model

TOP_K = 20
TOY_P_TRUE = "product of the model's probabilities of the tokens inside the final \\boxed{...}, teacher forced"
BOX_OPEN = "\\boxed{"


class PTrue(LanguageModelScorer):
    name = "ptrue"

    def __init__(self, manifest, *, model, backend, toy):
        if model is not None:
            from replay.errors import TraceError

            raise TraceError("ptrue asks the model that wrote each answer; it takes no --model")
        super().__init__(manifest, model=model, backend=backend, toy=toy)

    def wants(self) -> pl.Expr:
        return pl.col("is_final")

    def manifest_entry(self) -> dict:
        return {"model": "self", "prompt": TOY_P_TRUE if self.toy else P_TRUE_PROMPT,
                **({} if self.toy else {"top_k": TOP_K})}

    def score(self, items: list[Item]) -> list[Score]:
        scores: dict[str, Score] = {}
        for role in sorted({item.role for item in items}):
            engine, tokenizer = self.engine(role, trace_model(self.manifest, role))
            mine = [item for item in items if item.role == role]
            for item, score in zip(mine, self._toy(engine, tokenizer, mine) if self.toy
                                   else self._asked(engine, tokenizer, mine)):
                scores[item.step_id] = score
        return [scores[item.step_id] for item in items]

    @staticmethod
    def _toy(engine, tokenizer, items: list[Item]) -> list[Score]:
        logprobs = engine.continuation_logprobs([i.prefix_ids for i in items], [i.step_ids for i in items])
        scores = []
        for item, values in zip(items, logprobs):
            inside = _boxed_token_positions(tokenizer, item.step_ids)
            value = math.exp(sum(values[k] for k in inside)) if inside else 0.0
            scores.append(Score(value=value, n_tokens_processed=len(item.prefix_ids) + len(item.step_ids)))
        return scores

    @staticmethod
    def _asked(engine, tokenizer, items: list[Item]) -> list[Score]:
        prompts = [user_prompt_ids(tokenizer, P_TRUE_PROMPT.format(question=i.question, answer=i.answer or ""))
                   for i in items]
        scores = []
        for prompt, top in zip(prompts, engine.next_token_logprobs(prompts, TOP_K)):
            mass = {"A": 0.0, "B": 0.0}
            for token, logprob in top.items():
                letter = tokenizer.decode([token]).strip().lstrip("(")
                if letter in mass:
                    mass[letter] += math.exp(logprob)
            total = mass["A"] + mass["B"]
            scores.append(Score(value=mass["A"] / total if total > 0 else 0.5, detail=[mass["A"], mass["B"]],
                                n_tokens_processed=len(prompt) + 1))
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
