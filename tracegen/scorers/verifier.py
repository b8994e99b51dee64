"""``verifier``: a per-step correct/incorrect verdict (value 1 or 0), for the CMDP policy's κ calibration.

Toy: the toy world's exact step verifier (``data.toy.task.step_is_valid``: the step continues from
the previous result, applies the question's next operation and is written exactly right); no model,
no cost. Real: the large model reads the question and the steps (``VERIFIER_PROMPT``, "Reply with
exactly one verdict: correct or incorrect"); value = 1 if "correct" is likelier than "incorrect" as
the next token, detail = [P(correct), P(incorrect)] over the top-k. A call costs the prompt's
prefill plus one token.
"""

from __future__ import annotations

import math

import polars as pl

from tracegen.prompts import VERIFIER_PROMPT, earlier_steps_text, user_prompt_ids
from tracegen.scorers.base import Item, LanguageModelScorer, Score, model_entry, named_model, trace_model

TOP_K = 20
EXACT = "data.toy.task.step_is_valid (exact arithmetic and format check)"


class StepVerifier(LanguageModelScorer):
    name = "verifier"

    def __init__(self, manifest, *, model, backend, toy):
        super().__init__(manifest, model=model, backend=backend, toy=toy)
        self._checkpoint = None if toy else (named_model(model, "verifier") if model else trace_model(manifest, "large"))

    def wants(self) -> pl.Expr:
        return pl.lit(True)

    def manifest_entry(self) -> dict:
        if self.toy:
            return {"model": "exact", "prompt": EXACT}
        who = {"model": "large"} if self.model is None else {**model_entry(self._checkpoint), "model": "verifier"}
        return {**who, "prompt": VERIFIER_PROMPT, "top_k": TOP_K}

    def score(self, items: list[Item]) -> list[Score]:
        if self.toy:
            from data.toy.task import step_is_valid

            return [Score(value=float(step_is_valid(i.question, i.step_texts[:-1], i.step_texts[-1])),
                          n_tokens_processed=0) for i in items]
        engine, tokenizer = self.engine("large" if self.model is None else "verifier", self._checkpoint)
        prompts = [user_prompt_ids(tokenizer, VERIFIER_PROMPT.format(
            question=i.question, earlier=earlier_steps_text(i.step_texts[:-1]), step=i.step_texts[-1])) for i in items]
        first = {word: tokenizer.encode(word, add_special_tokens=False)[0] for word in ("correct", "incorrect")}
        scores = []
        for prompt, top in zip(prompts, engine.next_token_logprobs(prompts, TOP_K)):
            p_correct, p_incorrect = (math.exp(top[first[w]]) if first[w] in top else 0.0
                                      for w in ("correct", "incorrect"))
            scores.append(Score(value=float(p_correct > p_incorrect), detail=[p_correct, p_incorrect],
                                n_tokens_processed=len(prompt) + 1))
        return scores
