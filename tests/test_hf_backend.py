"""The transformers backend on a random-weight toy model: seeds, batch independence, stops, exact scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Qwen2ForCausalLM

from data.toy.tokenizer import build_tokenizer
from scripts.toy.train import model_config
from tracegen.backends import StepRequest, StepSampling, load_backend
from tracegen.prompts import prompt_token_ids
from tracestore.errors import TraceError

QUESTIONS = ["Compute 3 + 4.", "Compute 12 * 3 - 5.", "Compute 7.", "Compute 100 - 58 + 2 * 9 - 1."]


def save_random_toy_model(out, seed: int = 0):
    """A toy-small-shaped Qwen2 checkpoint with random weights (near-uniform next-token distributions)."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(model_config("small", tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_random_toy_model(tmp_path_factory.mktemp("toy-random"))


@pytest.fixture(scope="module")
def backend(model_dir):
    return load_backend("hf", str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def prompts(backend):
    return [tuple(prompt_token_ids(backend.tokenizer, q)) for q in QUESTIONS]


SAMPLED = StepSampling(temperature=1.0, max_step_tokens=32, topk=4, delimiter="\n\n")


def test_same_seed_same_step_and_other_seeds_differ(backend, prompts):
    requests = [StepRequest(prompts[0], seed) for seed in (5, 5, 6)]
    first, again, other = backend.generate_steps(requests, SAMPLED)
    assert first.token_ids == again.token_ids
    np.testing.assert_allclose(first.logprobs, again.logprobs, atol=1e-5)  # batch rows differ by float rounding
    assert first.token_ids != other.token_ids
    assert backend.generate_steps(requests[:1], SAMPLED)[0].token_ids == first.token_ids


def test_step_does_not_depend_on_its_batch_mates(backend, model_dir, prompts):
    alone = [backend.generate_steps([StepRequest(p, 11 + i)], SAMPLED)[0] for i, p in enumerate(prompts)]
    together = backend.generate_steps([StepRequest(p, 11 + i) for i, p in enumerate(prompts)], SAMPLED)
    in_pairs = load_backend("hf", str(model_dir), device="cpu", max_batch_size=2).generate_steps(
        [StepRequest(p, 11 + i) for i, p in reversed(list(enumerate(prompts)))], SAMPLED
    )[::-1]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: the batch is left-padded
    for a, b, c in zip(alone, together, in_pairs):
        assert a.token_ids == b.token_ids == c.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
        np.testing.assert_allclose(a.max_logits, c.max_logits, atol=1e-5)


def test_cached_decoding_scores_equal_a_full_forward(backend, prompts):
    steps = backend.generate_steps([StepRequest(p, 3) for p in prompts], SAMPLED)
    for prompt, step in zip(prompts, steps):
        forced = backend.teacher_force(list(prompt), step.token_ids, SAMPLED.topk)
        np.testing.assert_allclose(step.logprobs, forced.logprobs, atol=1e-5)
        np.testing.assert_allclose(step.max_logits, forced.max_logits, atol=1e-5)
        np.testing.assert_allclose(step.topk_logprobs, forced.topk_logprobs, atol=1e-5)
        ids = torch.tensor([list(prompt) + step.token_ids])
        with torch.no_grad():
            logits = backend.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double()
        exact = logits.log_softmax(-1)
        np.testing.assert_allclose(
            step.logprobs, exact.gather(-1, torch.tensor(step.token_ids)[:, None])[:, 0], atol=1e-5
        )
        np.testing.assert_allclose(step.max_logits, logits.max(-1).values, atol=1e-5)
        assert [row[0] for row in step.topk_ids] == exact.argmax(-1).tolist()


def test_tiny_top_p_is_greedy(backend, prompts):
    requests = [StepRequest(p, 40 + i) for i, p in enumerate(prompts)]
    greedy = backend.generate_steps(requests, StepSampling(temperature=0, max_step_tokens=16))
    nucleus = backend.generate_steps(requests, StepSampling(temperature=1.0, top_p=1e-6, max_step_tokens=16))
    assert [s.token_ids for s in greedy] == [s.token_ids for s in nucleus]
    for step in greedy:
        assert step.token_ids == [row[0] for row in step.topk_ids]


def test_finish_reasons_follow_the_tokens(backend, prompts):
    requests = [StepRequest(prompts[i % len(prompts)], 100 + i) for i in range(32)]
    sampling = StepSampling(temperature=1.0, max_step_tokens=48, delimiter="=")
    steps = backend.generate_steps(requests, sampling)
    tokenizer = backend.tokenizer
    for step in steps:
        decoded = tokenizer.decode(step.token_ids, skip_special_tokens=True)
        if step.finish_reason == "eos":
            assert step.token_ids[-1] == tokenizer.eos_token_id
            assert step.text == decoded and "=" not in step.text
        elif step.finish_reason == "delimiter":
            assert "=" not in tokenizer.decode(step.token_ids[:-1], skip_special_tokens=True)
            assert decoded.startswith(step.text + "=") and "=" not in step.text
        else:
            assert step.finish_reason == "length" and len(step.token_ids) == 48
            assert step.text == decoded and "=" not in step.text
        assert len(step.token_ids) == len(step.logprobs) == len(step.max_logits) == len(step.topk_ids)
    assert {s.finish_reason for s in steps} == {"eos", "delimiter", "length"}
    assert sum(s.gen_seconds for s in steps) > 0


def test_multi_token_delimiter_cuts_at_its_first_occurrence(backend, prompts):
    never = StepSampling(temperature=1.0, max_step_tokens=40, delimiter="\x00")
    request = StepRequest(prompts[1], 77)
    free = backend.generate_steps([request], never)[0]
    assert free.finish_reason in ("length", "eos")
    delimiter = free.text[20:22]
    cut = free.text.find(delimiter)
    stopped = backend.generate_steps([request], StepSampling(temperature=1.0, max_step_tokens=40, delimiter=delimiter))[
        0
    ]
    assert stopped.finish_reason == "delimiter" and stopped.text == free.text[:cut]
    n = len(stopped.token_ids)
    assert stopped.token_ids == free.token_ids[:n]
    assert delimiter in backend.tokenizer.decode(stopped.token_ids)
    assert delimiter not in backend.tokenizer.decode(stopped.token_ids[:-1])


def test_steps_stop_at_the_context_limit(model_dir, prompts):
    short = load_backend("hf", str(model_dir), device="cpu", max_model_len=len(prompts[0]) + 4)
    assert short.max_total_tokens == len(prompts[0]) + 3
    step = short.generate_steps([StepRequest(prompts[0], 1)], StepSampling(temperature=1.0, delimiter="\x00"))[0]
    assert len(step.token_ids) == 3 and step.finish_reason in ("length", "eos")
    with pytest.raises(TraceError, match="request 1 has a .*-token prompt"):
        short.generate_steps([StepRequest(prompts[0], 1), StepRequest(prompts[3], 1)], SAMPLED)


@pytest.mark.parametrize(
    "requests, sampling, message",
    [
        ([StepRequest((), 0)], SAMPLED, "request 0 has an empty prompt"),
        ([StepRequest((1, 500), 0)], SAMPLED, "token id 500 outside"),
        ([StepRequest((1, 2), 0)], StepSampling(topk=0), "topk must be"),
        ([StepRequest((1, 2), 0)], StepSampling(top_p=0), "top_p must be"),
        ([StepRequest((1, 2), 0)], StepSampling(delimiter=""), "delimiter must not be empty"),
        ([StepRequest((1, 2), 0)], StepSampling(max_step_tokens=0), "max_step_tokens"),
    ],
)
def test_bad_requests_raise_trace_errors(backend, requests, sampling, message):
    with pytest.raises(TraceError, match=message):
        backend.generate_steps(requests, sampling)


def test_load_backend_refuses_unknown_names(model_dir, tmp_path):
    with pytest.raises(TraceError, match="unknown backend"):
        load_backend("tgi", str(model_dir))
    with pytest.raises(TraceError, match="does not exist"):
        load_backend("hf", str(tmp_path / "missing"))
    with pytest.raises(TraceError, match="unknown hf engine argument"):
        load_backend("hf", str(model_dir), tensor_parallel_size=2)


def test_engine_info_names_the_engine(backend):
    info = backend.engine_info()
    assert info["name"] == "hf" and info["dtype"] == "float32" and info["max_total_tokens"] == 511
