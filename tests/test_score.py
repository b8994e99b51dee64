"""`trace score` on a toy trace grown by `trace gen` with the fake backend (seeded toy steps, no model): each
scorer's values checked against an independent computation (the toy models' through transformers), resume, and
refusals."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from tracebuild import toy_gen_options
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from cli import app
from data.toy import MODEL_ALIASES
from data.toy.task import step_is_valid
from tracegen.gen import run_gen
from tracegen.prompts import prompt_token_ids
from tracegen.scorers.toy_ptrue import _boxed_token_positions
from tracegen.scoring import run_score
from tracestore.errors import TraceError
from tracestore.store import open_trace
from tracestore.validate import validate

N_PROBLEMS = 5


@pytest.fixture(scope="module")
def toy_trace(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("score") / "toy"
    run_gen(toy_gen_options(out, limit=N_PROBLEMS, seed=5, backend="fake"))
    return out


@pytest.fixture
def trace(toy_trace, tmp_path) -> Path:
    return shutil.copytree(toy_trace, tmp_path / "toy")


def joined(root: Path, scorer: str) -> pl.DataFrame:
    t = open_trace(root)
    return (
        t.scan("scores")
        .filter(pl.col("scorer") == scorer)
        .join(t.scan("steps"), on="step_id")
        .join(t.scan("tokens"), on="step_id")
        .join(t.scan("problems").select("problem_id", "question"), on="problem_id")
        .sort("step_id")
        .collect()
    )


def path_texts(steps: pl.DataFrame, row: dict) -> list[str]:
    text = dict(steps.select("step_id", "text").iter_rows())
    base = f"{row['problem_id']}/{row['world']}/"
    return [text[base + row["path"][:end]] for end in range(1, len(row["path"]) + 1)]


def test_verifier_is_the_exact_step_check_and_a_rerun_adds_nothing(trace):
    summary = run_score(trace, "verifier")
    steps = open_trace(trace).scan("steps").collect()
    assert summary.new == summary.wanted == steps.height
    scores = joined(trace, "verifier")
    for row in scores.iter_rows(named=True):
        texts = path_texts(steps, row)
        assert row["value"] == float(step_is_valid(row["question"], texts[:-1], texts[-1]))
        assert row["n_tokens_processed"] == 0
    assert 0 < scores["value"].mean() < 1, "the toy trace should hold valid and invalid steps"
    parts = sorted((trace / "scores").iterdir())
    assert run_score(trace, "verifier").new == 0
    assert sorted((trace / "scores").iterdir()) == parts
    assert validate(trace)["scores"] == steps.height
    assert json.loads((trace / "trace.json").read_text())["scorers"]["verifier"]["model"] == "exact"


def large_logprobs(prompt: list[int], continuation: list[int]) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(MODEL_ALIASES["toy-large"], dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + continuation])).logits[0, len(prompt) - 1 : -1]
    return logits.log_softmax(-1).gather(-1, torch.tensor(continuation)[:, None])[:, 0].numpy()


def test_toy_judge_is_the_large_models_teacher_forced_opinion_of_small_steps(trace):
    run_score(trace, "judge", backend="hf")
    scores = joined(trace, "judge")
    steps = open_trace(trace).scan("steps").collect()
    assert scores.height == steps.filter(pl.col("model") == "small").height > 0
    tokenizer = AutoTokenizer.from_pretrained(MODEL_ALIASES["toy-large"])
    tokens = dict(open_trace(trace).scan("tokens").select("step_id", "token_ids").collect().iter_rows())
    for row in scores.head(6).iter_rows(named=True):
        base = f"{row['problem_id']}/{row['world']}/"
        prefix = prompt_token_ids(tokenizer, row["question"])
        for end in range(1, len(row["path"])):
            prefix += list(tokens[base + row["path"][:end]])
        rating = 9 * math.exp(large_logprobs(prefix, list(row["token_ids"])).mean())
        expected_digit = np.dot(row["detail"], np.arange(10))
        assert expected_digit == pytest.approx(rating, abs=1e-3)
        assert row["value"] == round(rating)
        assert row["n_tokens_processed"] == len(prefix) + row["n_gen_tokens"]
    assert scores["value"].is_between(0, 9).all()
    np.testing.assert_allclose(scores["detail"].list.sum().to_numpy(), 1.0, atol=1e-6)


def test_toy_ptrue_is_the_probability_of_the_boxed_answer_under_its_own_model(trace):
    run_score(trace, "ptrue", backend="fake")  # the engine that wrote the trace
    scores = joined(trace, "ptrue")
    steps = open_trace(trace).scan("steps").collect()
    assert scores.height == steps.filter(pl.col("is_final")).height > 0
    tokenizer = AutoTokenizer.from_pretrained(MODEL_ALIASES["toy-small"])
    for row in scores.iter_rows(named=True):
        # the final step's own token logprobs, stored by gen, came from the same model and context
        inside = _boxed_token_positions(tokenizer, list(row["token_ids"]))
        stored = math.exp(sum(row["logprobs"][k] for k in inside)) if inside else 0.0
        assert row["value"] == pytest.approx(stored, abs=1e-4)
        assert 0 <= row["value"] <= 1
    assert open_trace(trace).manifest["scorers"]["ptrue"]["model"] == "self"


def test_boxed_token_positions_cover_the_answer_only():
    tokenizer = AutoTokenizer.from_pretrained(MODEL_ALIASES["toy-small"])
    ids = tokenizer.encode("64+9: 4+9=13, 6+0+1=7, so \\boxed{73}", add_special_tokens=False)
    positions = _boxed_token_positions(tokenizer, ids)
    assert tokenizer.decode([ids[k] for k in positions]) == "73"
    assert _boxed_token_positions(tokenizer, tokenizer.encode("12+3: 2+3=5, 1+0=1, so 15")) == []


def test_scores_are_deterministic(trace, tmp_path):
    again = shutil.copytree(trace, tmp_path / "again")
    for root in (trace, again):
        run_score(root, "judge", backend="fake", batch=3)
    first, second = (joined(root, "judge").select("step_id", "value", "detail") for root in (trace, again))
    assert first.equals(second)


def test_refusals_leave_the_trace_unchanged(trace):
    run_score(trace, "judge", backend="fake")
    before = {p: p.read_bytes() for p in trace.rglob("*") if p.is_file()}
    with pytest.raises(TraceError, match="unknown scorer 'nope'"):
        run_score(trace, "nope")
    with pytest.raises(TraceError, match="not a process reward model"):
        run_score(trace, "prm", model="toy-small")
    with pytest.raises(TraceError, match=r"scorers\.judge\.d_model"):
        run_score(trace, "judge", model="toy-small", backend="fake")
    with pytest.raises(TraceError, match="takes no --model"):
        run_score(trace, "ptrue", model="toy-large")
    result = CliRunner().invoke(app, ["score", str(trace), "--scorer", "prm", "--model", "toy-small"])
    assert result.exit_code == 1 and "not a process reward model" in result.output
    assert "Traceback" not in result.output
    assert {p: p.read_bytes() for p in trace.rglob("*") if p.is_file()} == before


def test_rsd_replays_on_prm_scores(trace):
    from replay.routers import make_router
    from replay.run import replay_trace

    run_score(trace, "prm")
    prm = joined(trace, "prm")
    assert prm.height > 0 and prm["value"].is_between(0, 1).all()
    # a call reads the step and its end token (the PRM caches the prefix): one token per character here
    assert (
        prm["n_tokens_processed"]
        == prm["text"].str.len_chars() + 1 + np.where(prm["depth"] == 0, prm["question"].str.len_chars() + 1, 0)
    ).all()
    result = replay_trace(trace, make_router("rsd", tau=0.0), split="all")
    summary = result.summary().row(0, named=True)
    assert summary["misses"] == 0 and summary["large_share"] == 0  # tau 0 accepts every draft
    assert (result.outcomes["cost_scorer"] == 0).all()  # flops: a PRM generates no token
    with_prefill = replay_trace(trace, make_router("rsd", tau=0.0), split="all", cost="flops+prefill").outcomes
    assert (with_prefill["cost_scorer"] > 0).all()  # it reads every step it scores


def test_a_toy_trace_runs_the_toy_variants_under_the_signal_names(trace):
    run_score(trace, "judge", backend="fake")
    run_score(trace, "verifier")
    scorers = open_trace(trace).manifest.scorers
    assert scorers["judge"]["scorer"] == "toy-judge" and scorers["verifier"]["scorer"] == "exact-verifier"
    assert set(pl.read_parquet(trace / "scores")["scorer"]) == {"judge", "verifier"}


@pytest.mark.parametrize("name", ["judge", "verifier", "ptrue"])
def test_the_real_scorers_run_on_the_toy_models(trace, name):
    """The instruction-following scorers, as real models run them, through the same code path (on the fake backend:
    the toy models cannot follow the instructions, so only the form of the values is checked, and the prompt's
    cost)."""
    from tracegen.scorers import SCORERS
    from tracegen.scoring import score_pending

    scorer = SCORERS.get(name)(open_trace(trace).manifest, backend="fake")
    try:
        summary = score_pending(trace, scorer)
    finally:
        scorer.close()
    scores = joined(trace, name)
    assert summary.new == scores.height > 0
    assert open_trace(trace).manifest.scorers[name]["scorer"] == name
    detail = np.stack(scores["detail"].to_numpy())
    assert ((detail >= 0) & (detail <= 1 + 1e-6)).all() and (detail.sum(axis=1) <= 1 + 1e-5).all()
    if name == "judge":
        assert scores["value"].is_in([float(d) for d in range(10)]).all() and detail.shape[1] == 10
    elif name == "verifier":
        assert scores["value"].is_in([0.0, 1.0]).all()
        assert (scores["value"] == (detail[:, 0] > detail[:, 1])).all()
    else:
        assert scores["value"].is_between(0, 1).all() and detail.shape[1] == 2
    # a call reads the question and (for judge and verifier) the steps, and writes one token
    assert (scores["n_tokens_processed"] > scores["question"].str.len_chars()).all()


def test_the_judge_prompt_is_laid_out_as_specreason_lays_it_out():
    from tracegen.prompts import JUDGE_PRESETS, judge_prompt_ids

    preset = JUDGE_PRESETS["specreason"]
    tokenizer = AutoTokenizer.from_pretrained(MODEL_ALIASES["toy-large"])
    text = tokenizer.decode(judge_prompt_ids(tokenizer, "Compute 2+3.", ["2+3=5", "so \\boxed{5}"], preset))
    question, steps, request = (
        text.index("Compute 2+3."),
        text.index("2+3=5\n\nso \\boxed{5}\n\n<|im_end|>"),  # joined by "\n\n" and followed by one more
        text.index(preset.request.split("\u2014")[0]),  # the toy vocabulary has no em dash: up to it
    )
    assert preset.request.split("\u2014")[1] in text
    assert question < steps < request and text.endswith("assistant\n" + preset.prefill)
    assert text[question:steps].count("<|im_start|>assistant") == 1  # the steps are the assistant's own turn


def test_first_token_confidence_is_the_probability_that_the_reply_starts_with_answer(trace):
    """The cascade seed's P(T) for generation tasks, asked of the model that wrote each final answer: the
    probability of "Answer"'s first token right after the request, computed here with transformers."""
    from tracegen.prompts import FIRST_TOKEN_PRESETS

    preset = FIRST_TOKEN_PRESETS["cascade"]  # the default: the seed's Table 7 (system, then "Question: ...")

    run_score(trace, "first_token", backend="hf")
    scores = joined(trace, "first_token")
    assert scores.height == open_trace(trace).scan("steps").filter(pl.col("is_final")).collect().height > 0
    for role in ("small", "large"):
        tokenizer = AutoTokenizer.from_pretrained(MODEL_ALIASES[f"toy-{role}"])
        model = AutoModelForCausalLM.from_pretrained(MODEL_ALIASES[f"toy-{role}"], dtype=torch.float32).eval()
        answer = tokenizer.encode("Answer", add_special_tokens=False)[0]
        for row in scores.filter(pl.col("model") == role).iter_rows(named=True):
            messages = [
                {"role": "system", "content": preset.system},
                {"role": "user", "content": f"Question: {row['question']}"},
            ]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompt = tokenizer.encode(text, add_special_tokens=False)
            with torch.no_grad():
                probabilities = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1)
            in_top_k = int((probabilities > probabilities[answer]).sum()) < 20
            expected = float(probabilities[answer]) if in_top_k else 0.0
            assert row["value"] == pytest.approx(expected, abs=1e-4)
            assert row["n_tokens_processed"] == len(prompt) + 1
    recorded = open_trace(trace).manifest.scorers["first_token"]
    assert recorded["model"] == "self" and recorded["preset"] == {"name": "cascade", **asdict(preset)}
