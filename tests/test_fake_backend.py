"""The fake backend (tracegen/backends/fake.py), the instant stand-in the orchestration tests grow traces with: a
function of (seed, prompt) alone, exact scores of its own logits, the toy world's steps (a smaller model wrong more
often, and less confident where it is wrong), the engines' stop rules, and a stream that answers out of order."""

from __future__ import annotations

import queue

import numpy as np
import pytest

from data.toy import MODEL_ALIASES, task
from tracegen.backends import StepRequest, StepSampling, load_backend
from tracegen.backends.fake import StreamingFakeBackend
from tracegen.grading import extract_answer, is_final_step
from tracegen.prompts import STEP_DELIMITER, prompt_token_ids
from tracestore.errors import TraceError

PROBLEMS = task.generate(40, "test", 3, seed=0)
SAMPLED = StepSampling(temperature=0.7, max_step_tokens=48, topk=5)


@pytest.fixture(scope="module")
def small():
    return load_backend("fake", str(MODEL_ALIASES["toy-small"]))


@pytest.fixture(scope="module")
def large():
    return load_backend("fake", str(MODEL_ALIASES["toy-large"]))


def prompt(backend, problem) -> tuple[int, ...]:
    return tuple(prompt_token_ids(backend.tokenizer, problem.question))


def solve(backend, problem, seed: int, sampling: StepSampling = SAMPLED) -> list:
    """One chain of steps, each continuing the last, until a final step (at most 6)."""
    ids, steps = prompt(backend, problem), []
    while len(steps) < 6:
        [step] = backend.generate_steps([StepRequest(ids, seed + len(steps))], sampling)
        steps.append(step)
        if is_final_step(step.text, step.finish_reason):
            break
        ids += tuple(step.token_ids)
    return steps


def test_a_step_is_a_function_of_seed_and_prompt_alone(small):
    prompts = [prompt(small, p) for p in PROBLEMS[:6]]
    alone = [small.generate_steps([StepRequest(p, 7 + i)], SAMPLED)[0] for i, p in enumerate(prompts)]
    together = small.generate_steps([StepRequest(p, 7 + i) for i, p in enumerate(prompts)], SAMPLED)
    for a, b in zip(alone, together):
        assert (a.token_ids, a.text, a.logprobs, a.max_logits, a.topk_ids) == (
            b.token_ids,
            b.text,
            b.logprobs,
            b.max_logits,
            b.topk_ids,
        )
    # the seed decides which steps slip: over many seeds a problem's first step is sometimes wrong, sometimes right
    texts = {small.generate_steps([StepRequest(prompts[0], seed)], SAMPLED)[0].text for seed in range(60)}
    assert len(texts) > 1
    # greedy ignores the seed and writes the reference step
    greedy = StepSampling(temperature=0, max_step_tokens=48)
    for problem, ids in zip(PROBLEMS[:6], prompts):
        steps = {small.generate_steps([StepRequest(ids, seed)], greedy)[0].text for seed in (0, 1, 2)}
        assert steps == {problem.solution_steps()[0]}


def test_scores_are_exact_for_its_logits(small, large):
    ids = prompt(small, PROBLEMS[0])
    [step] = small.generate_steps([StepRequest(ids, 3)], SAMPLED)
    assert len(step.token_ids) == len(step.logprobs) == len(step.max_logits) == len(step.topk_ids)
    for logprob, top_ids, top_logprobs, max_logit in zip(
        step.logprobs, step.topk_ids, step.topk_logprobs, step.max_logits
    ):
        assert len(top_ids) == len(top_logprobs) == SAMPLED.topk
        assert top_logprobs == sorted(top_logprobs, reverse=True) and logprob <= top_logprobs[0] + 1e-12
        assert max_logit > 0
    # teacher forcing the step scores it as generation did; the next token's top-k are the first position's
    assert small.continuation_logprobs([list(ids)], [step.token_ids]) == [step.logprobs]
    [top] = small.next_token_logprobs([list(ids)], SAMPLED.topk)
    assert list(top) == step.topk_ids[0] and list(top.values()) == step.topk_logprobs[0]
    np.testing.assert_allclose(np.exp(list(top.values())).sum(), 1, atol=0.5)  # top-5 of a peaked distribution
    # another model reads the same tokens otherwise
    assert large.continuation_logprobs([list(ids)], [step.token_ids]) != [step.logprobs]


def test_solutions_have_the_toy_worlds_shape_and_the_small_model_is_wrong_more_often(small, large):
    accuracy = {}
    for name, backend in (("small", small), ("large", large)):
        right = 0
        for index, problem in enumerate(PROBLEMS):
            steps = solve(backend, problem, seed=100 * index)
            texts = [step.text for step in steps]
            assert [step.finish_reason for step in steps] == ["delimiter"] * (len(steps) - 1) + ["eos"]
            assert len(steps) == len(problem.ops) and "\\boxed{" in texts[-1]
            assert all(STEP_DELIMITER not in text for text in texts)
            for step in steps[:-1]:  # a step's tokens hold its text and the delimiter
                assert backend.tokenizer.decode(step.token_ids) == step.text + STEP_DELIMITER
            assert steps[-1].token_ids[-1] == backend.tokenizer.eos_token_id
            # every step continues from the last one's result: wrong answers come from slipped steps
            valid = task.verify_steps(problem.question, texts)
            answer = extract_answer(STEP_DELIMITER.join(texts))
            right += task.grade(answer, str(problem.answer))
            if all(valid):
                assert task.grade(answer, str(problem.answer))
        accuracy[name] = right / len(PROBLEMS)
    assert accuracy["large"] >= 0.9 and accuracy["small"] < accuracy["large"] - 0.2, accuracy


def test_a_wrong_step_is_less_confident(small):
    """The signal STEER reads: over the small model's first steps, the mean max logit of slipped steps is lower."""
    by_validity = {True: [], False: []}
    for index, problem in enumerate(PROBLEMS):
        for seed in range(5):
            [step] = small.generate_steps([StepRequest(prompt(small, problem), 1000 * index + seed)], SAMPLED)
            valid = task.step_is_valid(problem.question, [], step.text)
            by_validity[valid].append(np.mean(step.max_logits))
    assert by_validity[False] and by_validity[True]
    assert np.mean(by_validity[False]) < np.mean(by_validity[True]) - 0.5


def test_steps_stop_at_a_delimiter_the_length_and_the_context(small):
    ids = prompt(small, PROBLEMS[1])
    [free] = small.generate_steps(
        [StepRequest(ids, 5)], StepSampling(temperature=0.7, max_step_tokens=200, delimiter="\x00")
    )
    # without its delimiter the model writes on into the next steps until its final one
    assert free.finish_reason == "eos" and STEP_DELIMITER in free.text and "\\boxed{" in free.text
    [cut] = small.generate_steps(
        [StepRequest(ids, 5)], StepSampling(temperature=0.7, max_step_tokens=200, delimiter=", ")
    )
    assert cut.finish_reason == "delimiter" and cut.text == free.text[: free.text.find(", ")]
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)]
    [short] = small.generate_steps([StepRequest(ids, 5)], StepSampling(temperature=0.7, max_step_tokens=6))
    assert short.finish_reason == "length" and len(short.token_ids) == 6 and short.text == free.text[:6]
    tight = load_backend("fake", str(MODEL_ALIASES["toy-small"]), max_model_len=len(ids) + 4)
    [full] = tight.generate_steps([StepRequest(ids, 5)], SAMPLED)
    assert full.finish_reason == "length" and len(ids) + len(full.token_ids) == tight.max_total_tokens


def test_a_question_of_another_world_gets_one_final_step(small):
    ids = tuple(prompt_token_ids(small.tokenizer, "What is 2 + 3?"))
    [step] = small.generate_steps([StepRequest(ids, 1)], SAMPLED)
    assert step.finish_reason == "eos" and is_final_step(step.text, step.finish_reason)
    assert extract_answer(step.text).isdigit()


def test_the_stream_gives_the_steps_of_a_batch_in_a_seeded_shuffled_order():
    backend = StreamingFakeBackend(str(MODEL_ALIASES["toy-small"]), order_seed=4)
    requests = [StepRequest(prompt(backend, p), 50 + i) for i, p in enumerate(PROBLEMS[:12])]
    batch = backend.generate_steps(requests, SAMPLED)
    events: queue.Queue = queue.Queue()
    stream = backend.open_stream(SAMPLED, "small", events)
    try:
        stream.generate(list(enumerate(requests)))
        drafts = {}
        order = []
        while len(drafts) < len(requests):
            kind, role, key, (draft, seconds) = events.get(timeout=30)
            assert (kind, role) == ("generated", "small") and seconds >= 0
            drafts[key] = draft
            order.append(key)
        stream.score([(key, list(requests[key].prompt_ids), drafts[key].token_ids) for key in range(len(requests))])
        scores = {}
        while len(scores) < len(requests):
            kind, _, key, position_scores = events.get(timeout=30)
            assert kind == "scored"
            scores[key] = position_scores
    finally:
        stream.close()
    assert order != sorted(order)  # steps finish as their lengths and the shuffle say, not in request order
    for key, step in enumerate(batch):
        scored = drafts[key].scored(scores[key], step.gen_seconds)
        assert (scored.token_ids, scored.text, scored.finish_reason) == (step.token_ids, step.text, step.finish_reason)
        assert (scored.logprobs, scored.max_logits, scored.topk_ids, scored.topk_logprobs) == (
            step.logprobs,
            step.max_logits,
            step.topk_ids,
            step.topk_logprobs,
        )


def test_bad_arguments_are_refused(small):
    with pytest.raises(TraceError, match="unknown fake engine argument.*: tensor_parallel_size"):
        load_backend("fake", str(MODEL_ALIASES["toy-small"]), tensor_parallel_size=2)
    with pytest.raises(TraceError, match="step_validity must be between 0.5 and 1"):
        load_backend("fake", str(MODEL_ALIASES["toy-small"]), step_validity=0.2)
    with pytest.raises(TraceError, match="topk must be between 1 and 20"):
        small.generate_steps([StepRequest(prompt(small, PROBLEMS[0]), 0)], StepSampling(topk=21))
    info = small.engine_info()
    assert (info["name"], info["model"], info["step_validity"]) == ("fake", "toy-small", 0.72)
