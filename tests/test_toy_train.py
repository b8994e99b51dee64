"""The pieces of the toy models' training that repair needs: which prefixes teach a repair, what a repair example
asks the model to write, and growing a trained model by layers that start as the identity."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from data.toy import MODEL_ALIASES
from data.toy.task import DEFAULT_LEVEL, STEP_DELIMITER, generate, is_repair, verify_steps
from data.toy.tokenizer import build_tokenizer
from scripts.toy.evaluate import repair_prefix
from scripts.toy.train import encode, encode_repair, initial_weights, make_batch, shared_prefix, step_start_weights


def wrong(step: str) -> str:
    """``step`` with its units column written wrong (the result left as it is)."""
    head, rest = step.split(": ", 1)
    return f"{head}: 9{rest}"


def test_repair_prefix_cuts_after_the_first_invalid_step_when_a_step_can_follow():
    p = generate(1, level=DEFAULT_LEVEL, seed=3)[0]
    steps = p.solution_steps()
    assert repair_prefix(p, p.solution()) is None
    for k in range(len(steps) - 1):
        draft = steps[:k] + [wrong(steps[k])] + steps[k + 1 :]
        assert repair_prefix(p, STEP_DELIMITER.join(draft)) == draft[: k + 1]
        assert repair_prefix(p, STEP_DELIMITER.join(draft[: k + 1])) is None  # the draft ended at the wrong step
    boxed = steps[:-1] + [wrong(steps[-1]), "more"]
    assert repair_prefix(p, STEP_DELIMITER.join(boxed)) is None  # a box ends the solution
    unboxed = steps[:-1] + [steps[-1].replace("\\boxed{", "").rstrip("}"), "more"]
    assert repair_prefix(p, STEP_DELIMITER.join(unboxed)) == unboxed[:-1]


def test_a_repair_example_asks_for_the_repair_then_the_rest_of_the_solution():
    tokenizer = build_tokenizer()
    for p in generate(20, level=DEFAULT_LEVEL, seed=4):
        steps = p.solution_steps()
        for k in range(len(steps)):
            prefix = steps[:k] + [wrong(steps[k])]
            prompt, target = encode_repair(tokenizer, p, prefix)
            clean_prompt, _ = encode(tokenizer, p)
            assert prompt[: len(clean_prompt)] == clean_prompt
            assert tokenizer.decode(prompt[len(clean_prompt) :]) == STEP_DELIMITER.join(prefix) + STEP_DELIMITER
            assert target[-1] == tokenizer.eos_token_id
            written = tokenizer.decode(target[:-1]).split(STEP_DELIMITER)
            assert is_repair(written[0]) and not any(is_repair(s) for s in written[1:])
            assert verify_steps(p.question, prefix + written) == [True] * k + [False] + [True] * len(written)


def test_step_start_weights_fall_on_the_first_character_of_every_target_step():
    tokenizer = build_tokenizer()
    problems = generate(6, level=DEFAULT_LEVEL, seed=6)
    examples = [encode(tokenizer, p) for p in problems[:3]]
    examples += [encode_repair(tokenizer, p, [wrong(p.solution_steps()[0])]) for p in problems[3:]]
    ids, labels, _ = make_batch(tokenizer, examples, len(shared_prefix(tokenizer)))
    weights = step_start_weights(tokenizer, labels, 5.0)
    assert torch.equal(weights > 0, labels != -100)
    for row, (_, target) in enumerate(examples):
        steps = tokenizer.decode(target[:-1]).split(STEP_DELIMITER)
        heavy = tokenizer.decode(ids[row][weights[row] == 5.0].tolist())
        assert heavy == "".join(step[0] for step in steps)
        assert heavy[0] == ("R" if row >= 3 else problems[row].solution()[0])


def test_added_layers_start_as_the_identity():
    tokenizer = build_tokenizer()
    base = AutoModelForCausalLM.from_pretrained(MODEL_ALIASES["toy-small"], dtype=torch.float32)
    grown = initial_weights(MODEL_ALIASES["toy-small"], "small", 1, tokenizer)
    assert grown.config.num_hidden_layers == base.config.num_hidden_layers + 1
    problem = generate(1, level=DEFAULT_LEVEL, seed=5)[0]
    ids = torch.tensor([sum(encode(tokenizer, problem), [])])
    with torch.no_grad():
        assert torch.equal(grown(ids).logits, base(ids).logits)


def test_init_of_another_width_is_refused():
    with pytest.raises(SystemExit, match="is not a toy-large checkpoint"):
        initial_weights(MODEL_ALIASES["toy-small"], "large", 0, build_tokenizer())
