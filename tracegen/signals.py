"""Per-step confidence signals for the steps table, and the math-token predicate they depend on."""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass

from tracegen.backends.base import GeneratedStep

MATH_SYMBOLS = frozenset("+-*/=^_()[]{}<>|!")
_DIGIT_OR_LATEX = re.compile(r"\d|\\[A-Za-z]+")

# token id -> is it a math token, per tokenizer (decoding every token of every step again is slow)
_math_flags_by_tokenizer: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_math_text(text: str) -> bool:
    """A math token decodes to text containing a digit, a LaTeX command or one of ``+-*/=^_()[]{}<>|!``."""
    return bool(_DIGIT_OR_LATEX.search(text)) or not MATH_SYMBOLS.isdisjoint(text)


def math_token_flags(token_ids: list[int], tokenizer) -> list[bool]:
    """``is_math_text`` of each token decoded alone, special tokens (EOS, chat markers) decoding to nothing."""
    flags = _math_flags_by_tokenizer.setdefault(tokenizer, {})
    for token_id in set(token_ids) - flags.keys():
        flags[token_id] = is_math_text(tokenizer.decode([token_id], skip_special_tokens=True))
    return [flags[token_id] for token_id in token_ids]


@dataclass
class StepSignals:
    step_fields: dict  # steps-table columns: conf_max_logit_mean, conf_max_logit_math, ...
    is_math: list[bool]  # tokens-table column, one flag per generated token


def step_signals(step: GeneratedStep, tokenizer) -> StepSignals:
    """The steps-table confidence columns of one step (nulls where the step has no math token)."""
    if not step.token_ids:
        raise ValueError("a generated step has at least one token")
    if step.token_texts is not None:  # an endpoint that names tokens by text only
        is_math = [is_math_text(text) for text in step.token_texts]
    else:
        is_math = math_token_flags(step.token_ids, tokenizer)
    max_logits = step.max_logits or []  # None: an API step, whose raw-logit columns stay null
    math_max_logits = [value for value, flag in zip(max_logits, is_math) if flag]
    math_top1_logprobs = [top[0] for top, flag in zip(step.topk_logprobs, is_math) if flag]
    fields = {
        "conf_max_logit_mean": _mean(max_logits) if max_logits else None,
        "conf_max_logit_math": _mean(math_max_logits) if math_max_logits else None,
        "conf_top1_prob_min_math": math.exp(min(math_top1_logprobs)) if math_top1_logprobs else None,
        "logprob_mean": _mean(step.logprobs),
        "logprob_min": min(step.logprobs),
        "first_token_logprob": step.logprobs[0],
    }
    return StepSignals(step_fields=fields, is_math=is_math)


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)
