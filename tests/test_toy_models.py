"""The shipped toy models: loadable by transformers and vLLM, the same greedy tokens in both,
and the shape the toy world promises (sizes, head_dim, a large model that is better)."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from data.toy import LANGUAGE_MODELS, MODEL_ALIASES, MODELS_DIR
from data.toy.task import DEFAULT_LEVEL, extract_boxed, generate, grade
from scripts.toy.evaluate import evaluate, sample_solutions
from tracegen.prompts import prompt_token_ids

NAMES = sorted(LANGUAGE_MODELS)
N_PROMPTS = 16


def load(name):
    path = MODEL_ALIASES[name]
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def questions(n=N_PROMPTS):
    return [p.question for p in generate(n, level=DEFAULT_LEVEL, seed=7)]


def n_params(name) -> int:
    return sum(p.numel() for p in load(name)[1].parameters())


@pytest.mark.parametrize("name", NAMES)
def test_config_fits_vllm_cpu_kernels(name):
    config = AutoConfig.from_pretrained(MODEL_ALIASES[name])
    assert config.architectures == ["Qwen2ForCausalLM"]
    assert config.hidden_size // config.num_attention_heads >= 64


def test_large_has_at_least_four_times_the_parameters():
    assert n_params("toy-large") >= 4 * n_params("toy-small")


def test_medium_lies_between_in_parameters():
    assert n_params("toy-small") < n_params("toy-medium") < n_params("toy-large")


def test_shipped_toy_files_fit_the_size_budget():
    total = sum(f.stat().st_size for f in MODELS_DIR.rglob("*") if f.is_file())
    assert total <= 30 * 2**20


@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_round_trips_and_uses_the_chat_template(name):
    tokenizer, _ = load(name)
    problem = generate(1, seed=7)[0]
    text = problem.solution()
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    prompt = tokenizer.decode(prompt_token_ids(tokenizer, problem.question))
    assert prompt.startswith("<|im_start|>system\nPlease reason step by step")
    assert prompt.endswith(problem.question + "<|im_end|>\n<|im_start|>assistant\n")


def test_large_model_solves_more_than_small():
    problems = generate(40, level=DEFAULT_LEVEL, seed=11)
    accuracy = {}
    for name in NAMES:
        tokenizer, model = load(name)
        solutions = sample_solutions(model, tokenizer, [p.question for p in problems])
        accuracy[name] = sum(
            grade(extract_boxed(text), str(p.answer)) for p, (text, _) in zip(problems, solutions)
        ) / len(problems)
    assert accuracy["toy-large"] >= 0.75, accuracy
    assert accuracy["toy-large"] > accuracy["toy-medium"] > accuracy["toy-small"], accuracy


def test_small_models_step_confidence_separates_valid_from_invalid_steps():
    """The signal confidence routers read: a step's mean raw max-logit is lower when the step is wrong."""
    tokenizer, model = load("toy-small")
    result = evaluate(model, tokenizer, n=200, level=DEFAULT_LEVEL)
    assert 0.2 < result["step_validity"] < 0.95, result
    assert result["step_auroc"] >= 0.65, result


def test_medium_models_step_confidence_separates_valid_from_invalid_steps():
    tokenizer, model = load("toy-medium")
    result = evaluate(model, tokenizer, n=200, level=DEFAULT_LEVEL)
    assert 0.8 < result["step_validity"] < 1.0 and 0.75 < result["accuracy"] < 0.95, result
    assert result["step_auroc"] >= 0.65, result


def test_data_card_states_the_measured_targets():
    card = (MODELS_DIR.parent / "CARD.md").read_text()
    measured = json.loads((MODELS_DIR.parent / "measured.json").read_text())
    for name in NAMES:
        assert name in card
        assert f"{measured[name]['greedy']['accuracy']:.1%}" in card


def hf_greedy(name, prompts, max_new_tokens=120):
    tokenizer, model = load(name)
    out = []
    with torch.no_grad():
        for ids in prompts:
            result = model.generate(
                torch.tensor([ids]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            out.append(result[0, len(ids) :].tolist())
    return out


@pytest.mark.vllm
@pytest.mark.parametrize("name", NAMES)
def test_vllm_and_transformers_give_the_same_greedy_tokens(name, request):
    """Through the generating engine of the session's shared vLLM backend of the model (tests/conftest.py)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = request.getfixturevalue(f"vllm_{name.removeprefix('toy-')}").generator
    assert engine.llm_engine.model_config.dtype == torch.float32
    tokenizer, _ = load(name)
    prompts = [prompt_token_ids(tokenizer, q) for q in questions()]
    params = SamplingParams(temperature=0.0, max_tokens=120)
    outputs = engine.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    vllm_tokens = [list(o.outputs[0].token_ids) for o in outputs]
    hf_tokens = hf_greedy(name, prompts)

    def strip(ids):
        return [t for t in ids if t not in (tokenizer.eos_token_id, tokenizer.pad_token_id)]

    assert [strip(t) for t in vllm_tokens] == [strip(t) for t in hf_tokens]
