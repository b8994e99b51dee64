"""``first_token``: the cascade seed's P(T) for generation tasks, first-token confidence.

Scores every final step, asked of the model that wrote it (manifest model "self"): the question with a
request to reply in the format "Answer: ..." worded by a named preset (``--preset``; trace.json records it):
``cascade`` (default) the seed's Table 7 template for open-ended questions verbatim, ``trace`` this project's
earlier wording. value = the probability that the first token of the reply is the first token of "Answer" (0
where it is not among the top-k). The prompt reads only the question, so one call per (problem, model) serves
all its final steps; each scored step records the call's tokens. A call reads the prompt and generates one
token.
"""

from __future__ import annotations

import math

from tracegen.prompts import FIRST_TOKEN_PRESETS, first_token_prompt_ids, preset_record
from tracegen.scorers.base import SCORERS, Item, Score
from tracegen.scorers.ptrue import PTrue


@SCORERS.register
class FirstTokenConfidence(PTrue):
    name = "first_token"
    signal = "first_token"
    presets = FIRST_TOKEN_PRESETS

    def method(self) -> dict:
        return {"preset": preset_record(self.preset_name, self.prompt)}

    def score_own(self, engine, tokenizer, items: list[Item]) -> list[Score]:
        questions = sorted({item.question for item in items})
        prompts = [first_token_prompt_ids(tokenizer, question, self.prompt) for question in questions]
        answer = tokenizer.encode(self.prompt.first_word, add_special_tokens=False)[0]
        by_question = {
            question: Score(value=math.exp(top[answer]) if answer in top else 0.0, n_tokens_processed=len(prompt) + 1)
            for question, prompt, top in zip(questions, prompts, engine.next_token_logprobs(prompts, self.prompt.top_k))
        }
        return [by_question[item.question] for item in items]
