"""``verifier``: a per-step correct/incorrect verdict (value 1 or 0), for the CMDP policy's κ calibration.

The large model (or ``--model``) reads the question, the earlier steps and the step judged in one user message
worded by a named preset (``--preset``; trace.json records it): ``cmdp`` (default) the CMDP seed's Appendix A
template verbatim ("Verdict: correct | incorrect"), ``trace`` this project's earlier wording. value = 1 if
"correct" is likelier than "incorrect" as the next token, detail = [P(correct), P(incorrect)] over the top-k. A
call costs the prompt's prefill plus one token.
"""

from __future__ import annotations

import math

import polars as pl

from tracegen.prompts import VERIFIER_PRESETS, preset_record, user_prompt_ids, verifier_prompt
from tracegen.scorers.base import SCORERS, Item, LargeModelScorer, Score


@SCORERS.register
class StepVerifier(LargeModelScorer):
    name = "verifier"
    signal = "verifier"
    generated_tokens = 1  # "correct" or "incorrect"
    presets = VERIFIER_PRESETS

    def wants(self) -> pl.Expr:
        return pl.lit(True)

    def describe(self) -> dict:
        return {**self.model_fields(), "preset": preset_record(self.preset_name, self.prompt)}

    def score(self, items: list[Item]) -> list[Score]:
        engine, tokenizer = self.engine(self.engine_role, self.checkpoint)
        prompts = [user_prompt_ids(tokenizer, verifier_prompt(i.question, i.step_texts, self.prompt)) for i in items]
        first = {word: tokenizer.encode(word, add_special_tokens=False)[0] for word in ("correct", "incorrect")}
        scores = []
        for prompt, top in zip(prompts, engine.next_token_logprobs(prompts, self.prompt.top_k)):
            p_correct, p_incorrect = (
                math.exp(top[first[w]]) if first[w] in top else 0.0 for w in ("correct", "incorrect")
            )
            scores.append(
                Score(
                    value=float(p_correct > p_incorrect),
                    detail=[p_correct, p_incorrect],
                    n_tokens_processed=len(prompt) + 1,
                )
            )
        return scores
