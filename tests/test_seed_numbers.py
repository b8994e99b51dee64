"""The seeds' numbers, number for number, on hand-built trees with every expected value worked out by hand here:
A/C in each seed table's unit (FLOPs: % per TFLOP; API: a fraction per US cent), the toy judge charged as
SpecReason's judge, the cascade's eq. (6) compute cost and its reference model M_k, RSD's PRM input, the scorers'
prompt presets word for word, Kaplan's non-embedding N, the grid a pick came from, the CMDP tables' Ext. Models,
a cascade without P(IK) showing no t_ik, and the policy's is_final under escalate=after."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from test_k_models import N_PARAMS, sized, three_models
from test_routers_baselines import run
from tracebuild import build_trace, comb_steps, default_manifest

from analysis.options import ALL_ROWS, REPORTED_ROWS, ReportOptions
from analysis.report import build_report
from analysis.report_inputs import sweep_grid
from replay.costs import KNOWN_PRICES, Price
from replay.params import parse_sweep
from replay.results import write_outcomes
from replay.routers import make_router
from tracestore.schema import Manifest

PAPERS = Path(__file__).resolve().parents[1].parent / "shared" / "papers"
SMALL_TOKENS, LARGE_TOKENS = 10, 50  # generated tokens of every small and every large step
N_SMALL, N_LARGE = 100_000, 800_000  # tracebuild's default manifest


def two_model_trace(root, wrong: set[str]):
    """Four problems of two-step solutions ("sL" comb); the large model is right except on ``wrong``."""
    steps = []
    for k in range(4):
        pid = f"p{k}"
        problem = comb_steps(pid, 2, correct=lambda path, pid=pid: path[-1] == "L" and pid not in wrong)
        for step in problem:
            step["n_gen_tokens"] = LARGE_TOKENS if step["path"][-1] == "L" else SMALL_TOKENS
        steps += problem
    return build_trace(root, steps)


def report_of(root, tmp_path, results: dict[str, pl.DataFrame], tables=("cmdp",), **options):
    paths = []
    for name, outcomes in results.items():
        paths.append(tmp_path / f"{name}.parquet")
        write_outcomes(outcomes, paths[-1])
    # every row, picked on and reported, the rows the routers were fitted on too
    every_row = dict(split=ALL_ROWS, pick_split=REPORTED_ROWS, allow_overlap=True)
    chosen = ReportOptions(tables=tables, bootstrap=10, **every_row, **options)
    return build_report(root, paths, chosen)


# item 1: A/C as each seed table prints it


def test_a_over_c_is_percent_per_tflop_under_flops_and_a_fraction_per_cent_under_api(tmp_path):
    root = two_model_trace(tmp_path / "t", wrong={"p3"})
    accuracy = 3 / 4
    # large-only writes "L" then "LL": 2 x 50 generated tokens at 2 x 800,000 FLOPs each
    tflops = 2 * N_LARGE * 2 * LARGE_TOKENS / 1e12  # 1.6e-4
    flops = run(root, make_router("large-only"))
    assert flops.a_over_c_unit == "accuracy % per TFLOP"
    row = flops.summary().row(0, named=True)
    assert row["cost"] == pytest.approx(tflops)
    assert row["a_over_c"] == pytest.approx(100 * 0.75 / 1.6e-4) == pytest.approx(468_750)

    # gpt-4.1-mini: $0.40 / $0.10 / $1.60 per 1M input / cached / output tokens; prompts of 20 and 24 tokens, all
    # new (tracebuild), so 44 uncached input tokens and 100 output tokens: (44 x 0.40 + 100 x 1.60) / 1e6 USD
    prices = {"small": Price(0.0, 0.0, 0.0), "large": KNOWN_PRICES["gpt-4.1-mini"]}
    cents = (44 * 0.40 + 100 * 1.60) / 1e6 * 100  # 0.01776 US cents
    api = run(root, make_router("large-only"), cost="api", prices=prices)
    assert api.a_over_c_unit == "accuracy (0-1) per US cent"
    row = api.summary().row(0, named=True)
    assert row["cost"] == pytest.approx(cents)
    assert row["a_over_c"] == pytest.approx(accuracy / cents) == pytest.approx(42.2297, rel=1e-5)  # not 4223

    small = run(root, make_router("small-only"), cost="api", prices=prices)
    report = report_of(root, tmp_path, {"large": api.outcomes, "small": small.outcomes})
    assert "A/C in accuracy (0-1) per US cent" in report.markdown
    cmdp = pl.read_csv(report.tables["table_cmdp.csv"])
    large = cmdp.filter(pl.col("method") == "large-only").row(0, named=True)
    assert large["a_over_c"] == pytest.approx(accuracy / cents, rel=1e-6)
    assert "A/C (accuracy (0-1) per US cent)" in report.tables["table_cmdp.md"].decode()


# item 2: a stand-in scorer is charged as the scorer it stands in for


def test_the_toy_judge_is_charged_one_large_model_token_per_call(tmp_path):
    from tracegen.scorers import make_scorer

    manifest = Manifest(default_manifest())
    judge = make_scorer("judge", manifest)
    entry = judge.manifest_entry()
    assert (judge.name, entry["generated_tokens"], entry["model"]) == ("toy-judge", 1, "large")
    assert entry["charged_as"].startswith("judge: one generated token")
    assert make_scorer("ptrue", manifest).manifest_entry()["generated_tokens"] == 1  # the toy P(True) likewise

    steps = comb_steps("p0", 3)
    for step in steps:
        step["n_gen_tokens"] = LARGE_TOKENS if step["path"][-1] == "L" else SMALL_TOKENS
    accept = [  # the judge accepts every small step (9 >= tau 7)
        {"step_id": f"p0/0/{s['path']}", "scorer": "judge", "value": 9.0, "detail": None, "n_tokens_processed": 30}
        for s in steps
        if s["path"][-1] == "s"
    ]
    root = build_trace(tmp_path / "t", steps, manifest=default_manifest(scorers={"judge": entry}), scores=accept)
    row = run(root, make_router("specreason")).outcomes.row(0, named=True)
    # three small steps kept, three judge calls, each one generated large-model token (2 x 800,000 FLOPs)
    assert (row["path"], row["n_small"]) == ("sss", 3)
    assert row["cost_scorer"] == pytest.approx(3 * 2 * N_LARGE / 1e12)
    assert row["cost"] == pytest.approx((3 * 2 * N_SMALL * SMALL_TOKENS + 3 * 2 * N_LARGE) / 1e12)


# items 3 and 4: the cascade's CC (eq. 6) and its reference model M_k


def cascade_trace(root):
    """Six problems over m0, m1, m2 (two-step solutions; N = 0.5e12, 1e12, 2e12). P(T) = exp(logprob_mean) of the
    final step: m0 is sure (0.99) of its answer on p0-p2, m1 sure on p3, so over m0 -> m1 -> m2 at t_true 0.9 m0
    answers 3 queries, m1 1 and m2 2. Every m1 and m2 answer is right; m0 is wrong on p2 (sure and wrong)."""
    steps = []
    for k in range(6):
        pid = f"p{k}"
        problem = sized(comb_steps(pid, 2, chars="012", correct=lambda path, k=k: path != "00" or k < 2))
        for step in problem:
            sure = (step["path"] == "00" and k < 3) or (step["path"] == "11" and k == 3)
            step["logprob_mean"] = -0.01 if sure else -3.0
        steps += problem
    return build_trace(root, steps, manifest=three_models())


def cascade_table(root, tmp_path, models: str) -> tuple[pl.DataFrame, str]:
    outcomes = run(root, make_router("cascade", models=models, pik=False, p_true="final_mean", t_true=0.9)).outcomes
    report = report_of(root, tmp_path, {"cascade": outcomes}, tables=("cascade",))
    return pl.read_csv(report.tables["table_cascade.csv"]), report.tables["table_cascade.md"].decode()


def test_cascade_cc_is_eq_6_over_the_queries_each_model_answered(tmp_path):
    table, _ = cascade_table(cascade_trace(tmp_path / "t"), tmp_path, "m0,m1,m2")
    chain = table.filter(pl.col("chain") == "m0 → m1 → m2").row(0, named=True)
    # eq. (6): CC = 2 x (3 x 0.5e12 + 1 x 1e12 + 2 x 2e12) = 13e12 FLOPs; m2 alone 2 x 6 x 2e12 = 24e12
    assert 2 * (3 * N_PARAMS["m0"] + 1 * N_PARAMS["m1"] + 2 * N_PARAMS["m2"]) == 13e12
    assert chain["cc_gflops"] == pytest.approx(13e12 / 1e9)
    assert chain["reduced_cc_pct"] == pytest.approx(100 * (1 - 13 / 24))  # 45.83
    # every attempt paid (two steps of 10 / 30 / 80 TFLOPs): 3 x 20 + 1 x (20 + 60) + 2 x (20 + 60 + 160) = 620
    # against m2 alone's 6 x 160 = 960
    assert chain["cost"] == pytest.approx(620 / 6)
    assert chain["reduced_cost_pct"] == pytest.approx(100 * (1 - 620 / 960))  # 35.42
    assert chain["accuracy_pct"] == pytest.approx(100 * 5 / 6)
    assert chain["pd_points"] == pytest.approx(100 * (5 / 6 - 1))
    assert chain["p_vs_last"] == pytest.approx(1.0)  # one discordant pair: exact binomial, p = 1
    m2 = table.filter(pl.col("chain") == "m2").row(0, named=True)
    assert m2["cc_gflops"] == pytest.approx(24e12 / 1e9)


def test_a_cascade_is_compared_with_its_own_last_model(tmp_path):
    table, markdown = cascade_table(cascade_trace(tmp_path / "t"), tmp_path, "m0,m1")
    chain = table.filter(pl.col("chain") == "m0 → m1").row(0, named=True)
    # M_k = m1: m0 answers p0-p2 and m1 the other three; CC = 2 x (3 x 0.5e12 + 3 x 1e12) = 9e12 against m1
    # alone's 2 x 6 x 1e12 = 12e12 (not m2's 24e12, which would read 62.5%)
    assert chain["reduced_cc_pct"] == pytest.approx(100 * (1 - 9 / 12))  # 25
    assert chain["cc_gflops"] == pytest.approx(9e12 / 1e9)
    # paid: 3 x 20 + 3 x (20 + 60) = 300 against m1 alone's 6 x 60 = 360
    assert chain["reduced_cost_pct"] == pytest.approx(100 * (1 - 300 / 360))
    assert chain["pd_points"] == pytest.approx(100 * (5 / 6 - 1))  # m1 alone is right on all six
    assert chain["operating_point"] == "t_true=0.9"  # pik=false: no t_ik
    assert "| LLM(s) |  | Operating point | Acc. (%) | PD (points) | Reduced CC, eq. 6 (%) |" in markdown
    assert "| m0 → m1 | without P(IK) | t_true=0.9 | 83.33 | -16.67 | 25.00 |" in markdown


# item 7: RSD's PRM input


class PieceTokenizer:
    """A tokenizer in which "\\n\\n" is one token (as in Qwen's vocabulary), then "\\n", then single characters."""

    bos_token = "<bos>"
    pieces = re.compile(r"<bos>|\n\n|\n|.", re.DOTALL)

    def __init__(self):
        self.vocabulary: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.vocabulary.setdefault(piece, len(self.vocabulary)) for piece in self.pieces.findall(text)]

    def decode(self, ids: list[int]) -> str:
        by_id = {i: piece for piece, i in self.vocabulary.items()}
        return "".join(by_id[i] for i in ids)


def test_prm_input_is_skywork_prepare_input():
    from tracegen.value_head import RSD_SEPARATOR, prm_input_ids

    tokenizer = PieceTokenizer()
    ids, ends = prm_input_ids(tokenizer, "What is 2+3?", ["2+3=5", "\\boxed{5}"], RSD_SEPARATOR)
    # BOS + question + "\n", then each step + the step token ("\n\n", one token)
    assert tokenizer.decode(ids) == "<bos>What is 2+3?\n2+3=5\n\n\\boxed{5}\n\n"
    assert len(ids) == 1 + 12 + 1 + 5 + 1 + 9 + 1
    assert ends == [19, 29] and {tokenizer.decode([ids[end]]) for end in ends} == {"\n\n"}
    # a PRM trained with "\n" (the toy PRM) gets "\n" after each step; the question still ends in "\n"
    ids, ends = prm_input_ids(tokenizer, "Q?", ["a", "b"], "\n")
    assert (tokenizer.decode(ids), ends) == ("<bos>Q?\na\nb\n", [5, 7])


# item 8: the prompt presets, word for word


CMDP_VERIFIER = """Task: Determine whether the final step is correct for the given problem.

Instructions:
– Reply with exactly one verdict: correct or incorrect.
– Do not explain, justify, or provide any reasoning.

Question:
What is 2+3?

Previous steps:
2+3=5

Last step:
So the answer is \\boxed{5}.

Verdict:
correct | incorrect"""


def test_verifier_presets_word_for_word():
    from tracegen.prompts import VERIFIER_PRESETS, verifier_prompt

    steps = ["2+3=5", "So the answer is \\boxed{5}."]
    assert verifier_prompt("What is 2+3?", steps, VERIFIER_PRESETS["cmdp"]) == CMDP_VERIFIER
    assert verifier_prompt("What is 2+3?", steps[:1], VERIFIER_PRESETS["trace"]) == (
        "Question: What is 2+3?\n\nEarlier steps:\n(none)\n\nLatest step:\n2+3=5\n\n"
        "Is the latest step correct? Reply with exactly one verdict: correct or incorrect."
    )
    paper = next(PAPERS.glob("001_*.txt"), None)
    if paper is not None:  # the template in the CMDP seed's Appendix A, filled in the same way
        text = paper.read_text()
        block = text.split("Prompt template for GPT stepwise verification", 1)[1].split("```")[1].strip("\n")
        filled = block.replace("{question}", "What is 2+3?").replace("{prefix}", steps[0])
        assert filled.replace("{answer}", steps[1]) == CMDP_VERIFIER


class ChatTokenizer(PieceTokenizer):
    """Qwen's chat layout over PieceTokenizer's pieces."""

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return self.encode(text + ("<|im_start|>assistant\n" if add_generation_prompt else ""))


def test_judge_and_first_token_presets_word_for_word():
    from tracegen.prompts import (
        FIRST_TOKEN_PRESETS,
        JUDGE_PRESETS,
        SYSTEM_PROMPT,
        first_token_prompt_ids,
        judge_prompt_ids,
    )

    tokenizer = ChatTokenizer()
    prompt = tokenizer.decode(judge_prompt_ids(tokenizer, "What is 2+3?", ["2+3=5", "5"], JUDGE_PRESETS["specreason"]))
    request = (  # SpecReason's get_score, verbatim
        "Evaluate the last reasoning step solely based on factual correctness and logical validity. Ignore style, "
        "phrasing, or overall usefulness—only judge whether the step is objectively correct and logically follows "
        "from prior steps. Assign a score from 0 to 9."
    )
    assert prompt == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        "<|im_start|>assistant\n2+3=5\n\n5\n\n<|im_end|>\n"  # steps joined by "\n\n", one more after the last
        f"<|im_start|>user\n{request}<|im_end|>\n<|im_start|>assistant\nI think the quality score is: "
    )
    assert JUDGE_PRESETS["specreason"].top_k == 10  # its code asks for logprobs=10
    earlier = tokenizer.decode(judge_prompt_ids(tokenizer, "Q", ["a", "b"], JUDGE_PRESETS["trace"]))
    assert "<|im_start|>assistant\na\n\nb<|im_end|>" in earlier and JUDGE_PRESETS["trace"].top_k == 20

    prompt = tokenizer.decode(first_token_prompt_ids(tokenizer, "Who wrote Hamlet?", FIRST_TOKEN_PRESETS["cascade"]))
    assert prompt == (  # the cascade seed's Table 7, open-ended questions
        "<|im_start|>system\nThe following are questions about entity relationship. Please determine the correct "
        'answer in the format "Answer: <answer>".<|im_end|>\n<|im_start|>user\nQuestion: Who wrote Hamlet?'
        "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_presets_are_recorded_in_trace_json_and_a_scorer_refuses_an_unknown_one():
    from tracegen.scorers import make_scorer
    from tracestore.errors import TraceError

    manifest = Manifest(default_manifest(dataset={"name": "gsm8k", "file_hash": "t"}))
    entry = make_scorer("judge", manifest).manifest_entry()
    assert entry["preset"]["name"] == "specreason" and entry["preset"]["request"].startswith("Evaluate the last")
    assert entry["preset"]["trailing_delimiter"] is True and entry["preset"]["top_k"] == 10
    entry = make_scorer("verifier", manifest, preset="trace").manifest_entry()
    assert entry["preset"]["name"] == "trace" and entry["preset"]["no_prefix"] == "(none)"
    assert make_scorer("first_token", manifest).manifest_entry()["preset"]["name"] == "cascade"
    with pytest.raises(TraceError, match="no prompt preset 'nope'; presets: specreason, trace"):
        make_scorer("judge", manifest, preset="nope")
    with pytest.raises(TraceError, match="asks no prompt"):
        make_scorer("prm", manifest, preset="trace")


# item 9


def test_parameter_counts_give_kaplans_non_embedding_n(tmp_path):
    import torch
    from safetensors.torch import save_file

    from tracegen.models import parameter_counts

    vocabulary, width, layers = 100, 16, 2
    tensors = {"model.embed_tokens.weight": torch.zeros(vocabulary, width), "lm_head.weight": torch.zeros(100, 16)}
    for i in range(layers):
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = torch.zeros(4 * width, width)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.zeros(width)
    tensors["model.norm.weight"] = torch.zeros(width)
    save_file(tensors, tmp_path / "model.safetensors")
    # embeddings and output projection: 2 x 100 x 16 = 3,200; the rest: 2 x (64 x 16 + 16) + 16 = 2,096
    assert parameter_counts(tmp_path) == {"n_params": 3_200 + 2_096, "n_params_non_embedding": 2_096}


def test_the_report_names_the_grid_a_pick_came_from(tmp_path):
    _, grid = parse_sweep("tau=0:1:0.1")
    params = {i: {"tau": float(tau)} for i, tau in enumerate(grid)}
    assert sweep_grid(params) == "tau 0 to 1 in steps of 0.1 (11 values)"
    assert sweep_grid({0: {"tau": 0.2}, 1: {"tau": 0.5}, 2: {"tau": 0.9}}) == "tau 0.2, 0.5, 0.9"
    root = two_model_trace(tmp_path / "t", wrong=set())
    steer = run(root, make_router("steer", min_samples=2), sweep={"tau": grid})
    report = report_of(root, tmp_path, {"steer": steer.outcomes})
    assert re.search(r"- steer: .*; grid tau 0 to 1 in steps of 0\.1 \(11 values\) \(steer\.parquet\)", report.markdown)


def test_study_files_sweep_the_baselines_on_the_seeds_grid():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    for name in ("routers.toml", "routers3.toml"):
        for router in tomllib.loads((root / "data" / "toy" / name).read_text())["router"]:
            for sweep in router.get("sweep", []):
                parameter, _, grid = sweep.partition("=")
                step = float(grid.split(":")[2])
                assert step == (1 if router["name"] == "specreason" else 0.1), (name, router["name"], sweep)


def test_ext_models_column_and_no_t_ik_without_p_ik(tmp_path):
    steps = comb_steps("p0", 2)
    scores = [
        {"step_id": f"p0/0/{s['path']}", "scorer": scorer, "value": 0.9, "detail": None, "n_tokens_processed": 5}
        for s in steps
        if s["path"][-1] == "s"
        for scorer in ("prm", "judge")
    ]
    manifest = default_manifest(
        scorers={
            "prm": {"model": "prm", "n_params": 1000, "generated_tokens": 0},
            "judge": {"model": "large", "generated_tokens": 1},
        }
    )
    root = build_trace(tmp_path / "t", steps, manifest=manifest, scores=scores)
    results = {
        name: run(root, make_router(name, **params)).outcomes
        for name, params in {
            "rsd": {},
            "specreason": {},
            "cascade": {"pik": False, "p_true": "final_mean"},
            "small-only": {},
            "large-only": {},
        }.items()
    }
    report = report_of(root, tmp_path, results)
    cmdp = pl.read_csv(report.tables["table_cmdp.csv"])
    ext = {method.removesuffix(" *"): models for method, models in cmdp.select("method", "ext_models").iter_rows()}
    assert ext == {"small-only": "–", "large-only": "–", "rsd": "✓", "specreason": "×", "cascade": "×"}
    cascade = cmdp.filter(pl.col("method") == "cascade").row(0, named=True)
    assert cascade["operating_point"] == "t_true=0.9"  # no t_ik: P(IK) is off
    assert "| Method | Ext. Models | Operating point |" in report.tables["table_cmdp.md"].decode()
    params = json.loads(results["cascade"]["params"][0])
    assert "t_ik" in params  # the replay keeps every parameter; only what is shown leaves it out


def test_is_final_is_constant_under_escalate_after_and_varies_under_replace(tmp_path):
    from replay.routers.policy import load_policy
    from replay.train_policy import Hyperparameters, train_policy

    steps = []
    for k in range(6):
        steps += comb_steps(f"p{k}", 3, correct=lambda path: path[-1] == "L")
    root = build_trace(tmp_path / "t", steps)
    saved = {}
    for escalate in ("after", "replace"):
        out = tmp_path / f"{escalate}.pt"
        train_policy(root, out, Hyperparameters(steps=1, escalate=escalate, split_fractions=(1.0, 0.0, 0.0)))
        _, policy = load_policy(out)
        where = policy["features"].index("is_final")
        saved[escalate] = (policy["feature_mean"][where], policy["feature_std"][where])
    # after: decisions after steps 1 and 2 of each 3-step small chain, never after the final one
    assert saved["after"] == (0.0, 1.0)
    # replace: decisions after steps 1, 2 and 3: one in three is final; std of a 1/3 Bernoulli
    assert saved["replace"] == pytest.approx((1 / 3, np.sqrt(1 / 3 * 2 / 3)))
