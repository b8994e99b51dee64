"""The shipped toy PRM (data/toy/models/toy-prm): it loads as a value-head model, reads the input
`prm_input_ids` builds, and its step rewards separate toy-small's valid from invalid draft steps."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.toy import MODEL_ALIASES
from data.toy.task import STEP_DELIMITER, generate, step_text, verify_steps
from scripts.toy.evaluate import sample_solutions
from tracegen.value_head import load_value_head_model, prm_input_ids, trained_separator

N_HELDOUT = 100
# Measured when the PRM was trained (data/toy/CARD.md): AUROC 0.913 on these 100 drafts (0.934 on all
# 500); the bar is about 0.05 below it, so other thread counts or library versions (other samples) pass.
MIN_AUROC = 0.86
SEPARATOR = trained_separator(MODEL_ALIASES["toy-prm"])  # what its training.json records: "\n"


@pytest.fixture(scope="module")
def prm():
    path = MODEL_ALIASES["toy-prm"]
    return AutoTokenizer.from_pretrained(path), load_value_head_model(path)


@torch.no_grad()
def step_rewards(model, tokenizer, question, steps):
    ids, ends = prm_input_ids(tokenizer, question, steps, SEPARATOR)
    values = torch.sigmoid(model(torch.tensor([ids])))[0]
    return values[ends].tolist()


def test_prm_separates_valid_from_invalid_draft_steps(prm):
    tokenizer, model = prm
    drafter_path = MODEL_ALIASES["toy-small"]
    drafter = AutoModelForCausalLM.from_pretrained(drafter_path, dtype=torch.float32)
    problems = generate(N_HELDOUT, split="test", seed=0)
    drafts = sample_solutions(
        drafter, AutoTokenizer.from_pretrained(drafter_path), [p.question for p in problems], temperature=0.7, seed=1
    )
    labels, scores = [], []
    for problem, (text, _) in zip(problems, drafts):
        steps = text.split(STEP_DELIMITER)
        labels += verify_steps(problem.question, steps)
        scores += step_rewards(model, tokenizer, problem.question, steps)
    assert 0 < sum(labels) < len(labels), "the drafts need both valid and invalid steps"
    auroc = roc_auc_score(labels, scores)
    assert auroc >= MIN_AUROC, (auroc, np.mean(labels))


def boxed_too_early(problem, k):
    """Reference steps 0..k with step k (not the last) boxing its result: a slip toy-small makes."""
    values, (op, b) = problem.running_values(), problem.ops[k]
    return problem.solution_steps()[:k] + [step_text(values[k], op, b, is_last=True)]


def test_step_end_token_follows_every_step_and_rewards_are_probabilities(prm):
    tokenizer, model = prm
    problem = generate(1, split="test", seed=3)[0]
    step_end = tokenizer.encode(SEPARATOR, add_special_tokens=False)
    assert len(step_end) == 1
    question_ids = prm_input_ids(tokenizer, problem.question, [], SEPARATOR)[0]
    assert tokenizer.decode(question_ids) == problem.question + SEPARATOR
    for path in (problem.solution_steps(), boxed_too_early(problem, 1), [""], []):
        ids, ends = prm_input_ids(tokenizer, problem.question, path, SEPARATOR)
        assert len(ends) == len(path)
        assert ends == sorted(set(ends)) and (not ends or ends[-1] == len(ids) - 1)
        assert [ids[i] for i in ends] == step_end * len(path)
        starts = [len(question_ids)] + [e + 1 for e in ends[:-1]]
        assert [tokenizer.decode(ids[s:e]) for s, e in zip(starts, ends)] == path
        rewards = step_rewards(model, tokenizer, problem.question, path)
        assert len(rewards) == len(path)
        assert all(0.0 < r < 1.0 for r in rewards)


def test_prm_marks_down_an_answer_boxed_before_the_last_step(prm):
    """Weakly: toy-small rarely boxes early, so the PRM saw few such steps (card: AUROC 0.768 on this
    corruption; 0.5 would be blind to it)."""
    tokenizer, model = prm
    exact, early = [], []
    for problem in generate(100, split="test", seed=5):
        steps, wrong = problem.solution_steps(), boxed_too_early(problem, 1)
        assert verify_steps(problem.question, wrong) == [True, False]
        good = step_rewards(model, tokenizer, problem.question, steps)
        bad = step_rewards(model, tokenizer, problem.question, wrong)
        assert bad[0] == pytest.approx(good[0], abs=1e-5)  # causal: a later step cannot change an earlier reward
        exact.append(good[1])
        early.append(bad[1])
    assert np.mean(early) < np.mean(exact), (np.mean(early), np.mean(exact))
    assert sum(b < g for b, g in zip(early, exact)) >= 60


def test_the_toy_prm_records_its_separator_and_the_scorer_reads_it():
    """RSD's code puts "\n\n" after each step; the toy PRM was trained with "\n" and says so, and the prm
    scorer records the one it uses in trace.json."""
    from tracegen.scorers.prm import ProcessRewardModel
    from tracegen.value_head import RSD_SEPARATOR

    assert SEPARATOR == "\n" and RSD_SEPARATOR == "\n\n"
    scorer = ProcessRewardModel({"models": []}, model="toy-prm")
    entry = scorer.manifest_entry()
    assert (entry["step_separator"], entry["step_separator_from"]) == ("\n", "the PRM's training.json")
    assert trained_separator(MODEL_ALIASES["toy-small"]) == RSD_SEPARATOR  # no record: RSD's
