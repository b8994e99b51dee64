"""The math-token predicate and the per-step confidence columns, on the toy tokenizer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from data.toy.tokenizer import build_tokenizer
from tracegen.backends import GeneratedStep
from tracegen.signals import MATH_SYMBOLS, is_math_text, math_token_flags, step_signals


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("text", ["7", " 42", "x2", "\\frac", "\\boxed{", " \\cdot", "\\pi"] + sorted(MATH_SYMBOLS))
def test_math_text(text):
    assert is_math_text(text)


@pytest.mark.parametrize("text", ["", " ", "\n\n", "So", " the answer", ".", ",", "'", "\\", "\\ ", "?", ":", "%"])
def test_not_math_text(text):
    assert not is_math_text(text)


def test_latex_command_needs_letters_after_the_backslash():
    assert is_math_text("a\\b") and not is_math_text("a\\ b") and not is_math_text("\\.")


def test_token_flags_decode_each_token_and_skip_special_tokens(tokenizer):
    ids = tokenizer("Add 3: x = (4)\\pi", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    flags = math_token_flags(ids, tokenizer)
    # the character tokenizer gives one token per character; "\\" alone and "pi" alone are not math
    expected = [ch.isdigit() or ch in MATH_SYMBOLS for ch in "Add 3: x = (4)\\pi"] + [False]
    assert flags == expected
    # EOS decodes to "<|im_end|>" with special tokens kept, which would look like math
    assert is_math_text(tokenizer.decode([tokenizer.eos_token_id]))


def _step(tokenizer, text: str, rng: np.random.Generator, topk: int = 3) -> GeneratedStep:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids)
    topk_logprobs = np.sort(rng.uniform(-6, -0.01, size=(n, topk)), axis=1)[:, ::-1]
    return GeneratedStep(
        token_ids=ids,
        text=text,
        finish_reason="delimiter",
        logprobs=list(topk_logprobs[:, -1] - rng.uniform(0, 1, size=n)),
        max_logits=list(rng.normal(12, 3, size=n)),
        topk_ids=[list(rng.choice(100, size=topk, replace=False)) for _ in range(n)],
        topk_logprobs=[list(row) for row in topk_logprobs],
        n_cached_tokens=0,
        gen_seconds=0.1,
    )


def test_step_signals_match_a_direct_computation(tokenizer):
    rng = np.random.default_rng(0)
    step = _step(tokenizer, "so 12 + 30 = 42 apples", rng)
    signals = step_signals(step, tokenizer)
    math_mask = np.array([ch.isdigit() or ch in "+=" for ch in step.text])
    assert signals.is_math == list(math_mask)
    max_logits, logprobs = np.array(step.max_logits), np.array(step.logprobs)
    top1 = np.array(step.topk_logprobs)[:, 0]
    fields = signals.step_fields
    assert fields["conf_max_logit_mean"] == pytest.approx(max_logits.mean())
    assert fields["conf_max_logit_math"] == pytest.approx(max_logits[math_mask].mean())
    assert fields["conf_top1_prob_min_math"] == pytest.approx(np.exp(top1[math_mask]).min())
    assert fields["logprob_mean"] == pytest.approx(logprobs.mean())
    assert fields["logprob_min"] == pytest.approx(logprobs.min())
    assert fields["first_token_logprob"] == step.logprobs[0]
    assert fields["conf_max_logit_math"] != pytest.approx(fields["conf_max_logit_mean"])


def test_step_without_math_tokens_has_null_math_signals(tokenizer):
    step = _step(tokenizer, "so the answer is clear", np.random.default_rng(1))
    fields = step_signals(step, tokenizer).step_fields
    assert fields["conf_max_logit_math"] is None and fields["conf_top1_prob_min_math"] is None
    assert math.isfinite(fields["conf_max_logit_mean"]) and math.isfinite(fields["logprob_min"])
