"""The vLLM backend against transformers on the toy model: same scores, same greedy steps, stop semantics.

Uses the session's shared vLLM backend of toy-small (tests/conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from data.toy import MODEL_ALIASES
from data.toy.task import generate
from tracegen.backends import StepRequest, StepSampling, load_backend
from tracegen.prompts import prompt_token_ids
from tracestore.errors import TraceError

pytestmark = pytest.mark.vllm

TOLERANCE = 1e-4
QUESTIONS = [problem.question for problem in generate(8, "test", 3, 0)]


MODEL_DIR = MODEL_ALIASES["toy-small"]


@pytest.fixture(scope="module")
def vllm_backend(vllm_small):
    return vllm_small


@pytest.fixture(scope="module")
def hf_backend():
    return load_backend("hf", str(MODEL_DIR), device="cpu")


@pytest.fixture(scope="module")
def prompts(hf_backend):
    return [tuple(prompt_token_ids(hf_backend.tokenizer, q)) for q in QUESTIONS]


SAMPLED = StepSampling(temperature=1.0, max_step_tokens=48, topk=5)


@pytest.fixture(scope="module")
def sampled_steps(vllm_backend, prompts):
    return vllm_backend.generate_steps([StepRequest(p, 1000 + i) for i, p in enumerate(prompts)], SAMPLED)


def test_scores_match_transformers_on_the_same_tokens(sampled_steps, hf_backend, prompts):
    for prompt, step in zip(prompts, sampled_steps):
        forced = hf_backend.teacher_force(list(prompt), step.token_ids, SAMPLED.topk)
        np.testing.assert_allclose(step.max_logits, forced.max_logits, atol=TOLERANCE)
        np.testing.assert_allclose(step.logprobs, forced.logprobs, atol=TOLERANCE)
        np.testing.assert_allclose(step.topk_logprobs, forced.topk_logprobs, atol=TOLERANCE)
        for ids, forced_ids, values in zip(step.topk_ids, forced.topk_ids, forced.topk_logprobs):
            clear = np.diff(values, prepend=np.inf, append=-np.inf)
            distinct = (np.abs(clear[:-1]) > TOLERANCE) & (np.abs(clear[1:]) > TOLERANCE)  # no near tie
            assert [i for i, keep in zip(ids, distinct) if keep] == [i for i, keep in zip(forced_ids, distinct) if keep]
        assert all(top[0] >= lp - TOLERANCE for top, lp in zip(step.topk_logprobs, step.logprobs))


def test_greedy_steps_match_transformers(vllm_backend, hf_backend, prompts):
    requests = [StepRequest(p, 0) for p in prompts]
    greedy = StepSampling(temperature=0, max_step_tokens=48)
    ours, theirs = vllm_backend.generate_steps(requests, greedy), hf_backend.generate_steps(requests, greedy)
    assert [(s.token_ids, s.text, s.finish_reason) for s in ours] == [
        (s.token_ids, s.text, s.finish_reason) for s in theirs
    ]


def test_steps_keep_delimiter_tokens_and_children_hit_the_prefix_cache(
    vllm_backend, hf_backend, sampled_steps, prompts
):
    tokenizer = hf_backend.tokenizer
    for step in sampled_steps:
        decoded = tokenizer.decode(step.token_ids, skip_special_tokens=True)
        assert SAMPLED.delimiter not in step.text and len(step.token_ids) == len(step.logprobs)
        if step.finish_reason == "delimiter":
            assert decoded.startswith(step.text + SAMPLED.delimiter)
            assert SAMPLED.delimiter not in tokenizer.decode(step.token_ids[:-1], skip_special_tokens=True)
        elif step.finish_reason == "eos":
            assert step.token_ids[-1] == tokenizer.eos_token_id and step.text == decoded
        else:
            assert step.finish_reason == "length" and len(step.token_ids) == SAMPLED.max_step_tokens
    # the parent's prompt and all but its last step token went through the engine, in whole cache blocks
    block = vllm_backend.engine_info()["block_size"]
    children = [StepRequest(p + tuple(s.token_ids), 7) for p, s in zip(prompts, sampled_steps)]
    cached = [step.n_cached_tokens for step in vllm_backend.generate_steps(children, SAMPLED)]
    assert cached == [block * ((len(child.prompt_ids) - 1) // block) for child in children]
    assert max(cached) > 0


def test_a_delimiter_cuts_the_step_at_its_first_occurrence(vllm_backend, prompts):
    request = StepRequest(prompts[1], 5)
    free = vllm_backend.generate_steps([request], StepSampling(temperature=1.0, max_step_tokens=40, delimiter="\x00"))[
        0
    ]
    delimiter = free.text[10:12]
    stopped = vllm_backend.generate_steps(
        [request], StepSampling(temperature=1.0, max_step_tokens=40, delimiter=delimiter)
    )[0]
    assert len(delimiter) == 2 and stopped.finish_reason == "delimiter"
    assert stopped.text == free.text[: free.text.find(delimiter)]
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]


def test_same_seeds_reproduce_and_rescoring_without_the_cache_agrees(vllm_backend, sampled_steps, prompts):
    again = vllm_backend.generate_steps([StepRequest(p, 1000 + i) for i, p in enumerate(prompts)], SAMPLED)
    # the first scoring pass cached prompt + step, so this time most hits reach into the step
    assert vllm_backend.last_batch["rescored"] > 0
    for first, second in zip(sampled_steps, again):
        assert first.token_ids == second.token_ids and first.text == second.text
        np.testing.assert_allclose(first.logprobs, second.logprobs, atol=1e-5)
        np.testing.assert_allclose(first.topk_logprobs, second.topk_logprobs, atol=1e-5)


def test_equal_requests_of_a_batch_are_scored_once(vllm_backend, prompts):
    """Sibling nodes with equal prefixes and steps send equal sequences to the scorer: one prefill serves all."""
    requests = [StepRequest(p, 2000 + i) for i, p in enumerate(prompts[:3])] * 2
    steps = vllm_backend.generate_steps(requests, SAMPLED)
    assert vllm_backend.last_batch["requests"] == 6 and vllm_backend.last_batch["scored"] == 3
    alone = vllm_backend.generate_steps(requests[:3], SAMPLED)
    for first, second, single in zip(steps[:3], steps[3:], alone):
        assert first.token_ids == second.token_ids == single.token_ids
        assert first.logprobs == second.logprobs and first.topk_logprobs == second.topk_logprobs
        np.testing.assert_allclose(first.logprobs, single.logprobs, atol=1e-5)


def test_engine_info_and_bad_requests(vllm_backend, prompts):
    info = vllm_backend.engine_info()
    assert (info["name"], info["logprobs_mode"], info["dtype"], info["prefix_caching"]) == (
        "vllm",
        "raw_logits",
        "float32",
        True,
    )
    with pytest.raises(TraceError, match="topk must be between 1 and 20"):
        vllm_backend.generate_steps([StepRequest(prompts[0], 0)], StepSampling(topk=21))
    too_long = StepRequest(prompts[0] * 6, 0)
    with pytest.raises(TraceError, match="request 0 has a .*-token prompt"):
        vllm_backend.generate_steps([too_long], SAMPLED)


def test_unknown_engine_arguments_are_refused_before_any_engine_starts():
    with pytest.raises(TraceError, match="unknown vLLM engine argument.*: max_batch_size"):
        load_backend("vllm", str(MODEL_DIR), max_batch_size=4)
