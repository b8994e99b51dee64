"""``first_token``: the cascade seed's P(T) for generation tasks, first-token confidence.

Scores every final step, asked of the model that wrote it (manifest model "self"): the question with a
request to reply in the format "Answer: ..." (``FIRST_TOKEN_PROMPT``); value = the probability that the
first token of the reply is the first token of "Answer" (0 where it is not among the top-k). The
prompt reads only the question, so one call per (problem, model) serves all its final steps; each
scored step records the call's tokens. A call reads the prompt and generates one token.
"""

from __future__ import annotations

import math

from tracegen.prompts import FIRST_TOKEN, FIRST_TOKEN_PROMPT, user_prompt_ids
from tracegen.scorers.base import SCORERS, Item, Score
from tracegen.scorers.ptrue import TOP_K, PTrue


@SCORERS.register
class FirstTokenConfidence(PTrue):
    name = "first_token"
    signal = "first_token"

    def method(self) -> dict:
        return {"prompt": FIRST_TOKEN_PROMPT, "first_token_of": FIRST_TOKEN, "top_k": TOP_K}

    def score_own(self, engine, tokenizer, items: list[Item]) -> list[Score]:
        questions = sorted({item.question for item in items})
        prompts = [user_prompt_ids(tokenizer, FIRST_TOKEN_PROMPT.format(question=q)) for q in questions]
        answer = tokenizer.encode(FIRST_TOKEN, add_special_tokens=False)[0]
        by_question = {
            question: Score(value=math.exp(top[answer]) if answer in top else 0.0, n_tokens_processed=len(prompt) + 1)
            for question, prompt, top in zip(questions, prompts, engine.next_token_logprobs(prompts, TOP_K))
        }
        return [by_question[item.question] for item in items]
