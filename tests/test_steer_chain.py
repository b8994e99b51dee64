"""STEER along a chain of three models (m0 -> m1 -> m2) on tracebuild trees: each hop in both modes and both
escalate values, the chain parameters, the mixtures `trace train steer` saves for every model escalated from,
version 1 files, and the steps the comb lacks reported as misses.

The mixtures are given as a file (one per model, at step index 0: components at 5 and 15, so a step whose
confidence is 5 is unconfident and one at 15 is not, at tau 0.5). Three-step solutions; step costs as in
test_k_models (m0 10, m1 30, m2 80 TFLOPs).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_k_models import N_PARAMS, cost_of, sized, three_models
from test_routers_baselines import run
from tracebuild import build_trace, comb_steps

from analysis.report import report
from replay.artifacts import load_train_split
from replay.results import miss_list
from replay.routers import make_router
from replay.routers.steer import own_chain_steps
from replay.run import replay_trace
from replay.splits import SplitSpec
from replay.train_steer import train_steer
from tracestore.errors import TraceError

UNSURE = {"0", "01", "1"}  # m0's first step, m1's step after it, m1's first step
EVERY_PROBLEM = (1.0, 0.0, 0.0)  # the train split of `run`
TRAIN_ON_ALL = SplitSpec(fractions=EVERY_PROBLEM)
RIGHT = {"012", "222", "011", "022", "200", "111"}


def mixture(model: str | None) -> dict:
    entry = {"depth": 0, "n": 10, "weights": [0.5, 0.5], "means": [5.0, 15.0], "variances": [1.0, 1.0]}
    return {**entry, "low_component": 0} | ({"model": model} if model else {})


def gmm_file(path, models=("m0", "m1"), version=2):
    content = {"format": "trace-steer", "version": version, "signal": "conf_max_logit_math"}
    if version == 1:
        content["mixtures"] = [mixture(None)]
    else:
        content |= {"models": list(models), "mixtures": [mixture(model) for model in models]}
    path.write_text(json.dumps(content))
    return str(path)


def chain_trace(root, extra=()):
    steps = sized(comb_steps("p0", 3, chars="012", correct=lambda path: path in RIGHT))
    steps += sized([{"path": path, "is_final": len(path) == 3, "correct": path in RIGHT} for path in extra])
    for step in steps:
        step["conf_max_logit_math"] = 5.0 if step["path"] in UNSURE else 15.0
    return build_trace(root, steps, manifest=three_models())


def replayed(root, gmms, **params):
    result = run(root, make_router("steer", gmms=gmms, **params))
    return result.outcomes.row(0, named=True), miss_list(result)


def test_switch_after_escalates_from_m1_to_m2_and_misses_what_the_comb_lacks(tmp_path):
    gmms = gmm_file(tmp_path / "g.json")
    row, misses = replayed(chain_trace(tmp_path / "comb"), gmms)
    # "0" is unconfident: kept, m1 writes on; "01" is unconfident by m1's mixtures: m2 writes from "01",
    # a node of m1's completion, which the comb does not continue with m2
    assert (row["misses"], row["path"]) == (1, "01")
    assert [(m["path"], m["model"], m["scorer"]) for m in misses] == [("01", "m2", None)]
    row, misses = replayed(chain_trace(tmp_path / "grown", extra=["012"]), gmms)
    assert (row["misses"], row["path"], row["correct"]) == (0, "012", True) and misses == []
    assert (row["n_m0"], row["n_m1"], row["n_m2"], row["n_discarded"]) == (1, 1, 1, 0)
    assert row["cost"] == cost_of("012")


def test_switch_replace_rewrites_at_every_hop(tmp_path):
    row, _ = replayed(chain_trace(tmp_path / "t"), gmm_file(tmp_path / "g.json"), escalate="replace")
    # "0" discarded, m1 rewrites it as "1", unconfident by m1's mixtures: discarded, m2 writes "2" and the rest
    assert (row["path"], row["correct"], row["n_discarded"], row["n_m2"]) == ("222", True, 2, 3)
    assert row["cost"] == cost_of("222") + cost_of("0") + cost_of("1")
    assert row["cost_discarded"] == cost_of("0") + cost_of("1")


def test_step_mode_judges_the_rewritten_step_and_drafts_the_next_with_m0(tmp_path):
    gmms = gmm_file(tmp_path / "g.json")
    row, misses = replayed(chain_trace(tmp_path / "comb"), gmms, mode="step")
    # "0" discarded, "1" discarded (m1 unconfident), m2 writes "2"; m0 drafts the next step from "2": not in the comb
    assert (row["misses"], row["path"], row["n_discarded"]) == (1, "2", 2)
    assert [(m["path"], m["model"]) for m in misses] == [("2", "m0")]
    row, _ = replayed(chain_trace(tmp_path / "grown", extra=["20", "200"]), gmms, mode="step")
    assert (row["path"], row["correct"], row["n_m0"], row["n_m1"], row["n_m2"]) == ("200", True, 2, 0, 1)
    assert row["cost"] == cost_of("200") + cost_of("0") + cost_of("1")


def test_two_model_chains_on_a_three_model_trace(tmp_path):
    root, gmms = chain_trace(tmp_path / "t"), gmm_file(tmp_path / "g.json")
    # m1 is the chain's last model: never judged, "01" is kept however unconfident
    for params in ({"draft": "m0"}, {"target": "m1"}, {"models": "m0,m1"}, {"models": "m0,m1", "draft": "m0"}):
        assert replayed(root, gmms, **params)[0]["path"] == "011", params
    for params in ({"target": "m2"}, {"models": "m0,m2"}):
        assert replayed(root, gmms, **params)[0]["path"] == "022", params
    assert replayed(root, gmms, models="m1,m2")[0]["path"] == "122"  # "1" unconfident, kept: m2 writes on


@pytest.mark.parametrize(
    "params, message",
    [
        ({"models": "m0,m1,m2", "draft": "m1"}, "models=m0,m1,m2 and draft=m1 disagree"),
        ({"models": "m0,m1,m2", "target": "m2"}, "disagree"),
        ({"models": "m0,m1", "target": "m2"}, "disagree"),
        ({"models": "m2,m0"}, "smallest first"),
        ({"models": "m0"}, "two or more"),
        ({"models": "m0,m9"}, "two or more"),
    ],
)
def test_contradictory_chain_params_are_refused(tmp_path, params, message):
    with pytest.raises(TraceError, match=message):
        replayed(chain_trace(tmp_path / "t"), gmm_file(tmp_path / "g.json"), **params)


def test_gmm_files_must_hold_every_model_escalated_from(tmp_path):
    root = chain_trace(tmp_path / "t")
    with pytest.raises(TraceError, match=r"no mixtures of model\(s\) m1 \(it has m0\)"):
        replayed(root, gmm_file(tmp_path / "m0.json", models=("m0",)))
    with pytest.raises(TraceError, match=r"version 1\) holds one model's mixtures.*m0, m1"):
        replayed(root, gmm_file(tmp_path / "v1.json", version=1))
    # a version 1 file serves a two-model chain's draft model, as before
    assert replayed(root, gmm_file(tmp_path / "v1b.json", version=1), draft="m0")[0]["path"] == "011"


def test_train_steer_fits_every_model_but_the_largest_and_the_file_equals_refitting(tmp_path):
    rng = np.random.default_rng(0)
    steps = []
    for k in range(40):  # every model's steps: unsure (~5) on odd problems, sure (~15) on even ones
        for step in sized(comb_steps(f"p{k:02d}", 3, chars="012", correct=lambda path: path[-1] == "2")):
            step["conf_max_logit_math"] = float(rng.normal(5.0 if k % 2 else 15.0, 1.0))
            steps.append(step)
    root = build_trace(tmp_path / "t", steps, manifest=three_models())
    out = tmp_path / "steer.json"
    rows = train_steer(root, out, seed=1, fractions=EVERY_PROBLEM)
    saved = json.loads(out.read_text())
    assert saved["version"] == 2 and saved["models"] == ["m0", "m1"]
    assert [(m["model"], m["depth"]) for m in saved["mixtures"]] == [(r, d) for r in ("m0", "m1") for d in range(3)]
    assert rows.select("model", "depth").rows() == [(r, d) for r in ("m0", "m1") for d in range(3)]
    train = load_train_split(root, 0, EVERY_PROBLEM)
    for entry in saved["mixtures"]:  # each model's own chain from the root: m1's "1", "11", ..., not "01", "011"
        own = own_chain_steps(train.steps, entry["model"])
        assert entry["n"] == own.filter(own["depth"] == entry["depth"]).height == 40
    for mode, missing in (("switch", ("01", "m2")), ("step", ("2", "m0"))):
        loaded = run(root, make_router("steer", gmms=str(out), mode=mode))
        refit = run(root, make_router("steer", seed=1, mode=mode)).outcomes
        assert loaded.outcomes.drop("params", "fitted_on").equals(refit.drop("params", "fitted_on"))
        # the unsure (odd) problems go m0 -> m1 -> m2 and need steps off the comb; the sure ones stay with m0
        assert {(m["path"], m["model"]) for m in miss_list(loaded)} == {missing}
        assert loaded.outcomes["misses"].to_list() == [k % 2 for k in range(40)]


def test_report_labels_name_the_resolved_chain(tmp_path):
    steps = []
    for k in range(10):
        for step in sized(comb_steps(f"p{k}", 3, chars="012", correct=lambda path: path in RIGHT)):
            step["conf_max_logit_math"] = 5.0 if step["path"] in UNSURE else 15.0
            steps.append(step)
    root = build_trace(tmp_path / "t", steps, manifest=three_models())
    gmms = gmm_file(tmp_path / "g.json")
    results = [
        replay_trace(root, make_router("steer", gmms=gmms, **params), split="all", splits=TRAIN_ON_ALL)
        for params in ({}, {"target": "m2"}, {"models": "m1,m2"})
    ]
    markdown = report(root, results, split="all", pick_split="reported", bootstrap=5).markdown
    for label in ("steer (m0 → m1 → m2)", "steer (m0 → m2)", "steer (m1 → m2)"):
        assert re.search(rf"\| {re.escape(label)}( \*)? \|", markdown), label  # * where some walks missed
    assert "draft=" not in markdown and "target=" not in markdown


def test_specreason_reads_its_targets_own_judge(tmp_path):
    steps = sized(comb_steps("p0", 3, chars="012", correct=lambda path: path in RIGHT))
    # the largest model approves every draft; m1 rejects m0's first step only
    scores = [
        {"step_id": f"p0/0/{s['path']}", "scorer": scorer, "value": value, "detail": None, "n_tokens_processed": 7}
        for s in steps
        for scorer, value in (("judge", 9.0), ("judge@m1", 1.0 if s["path"] == "0" else 9.0))
        if s["path"][-1] == "0" or (scorer == "judge" and s["path"][-1] == "1")
    ]
    judges = {"judge": {"model": "m2", "generated_tokens": 1}, "judge@m1": {"model": "m1", "generated_tokens": 1}}
    manifest = three_models() | {"scorers": judges}  # as `trace score --scorer judge` and `judge@m1` record them
    scored = build_trace(tmp_path / "scored", steps, manifest=manifest, scores=scores)
    with_target = run(scored, make_router("specreason", target="m1")).outcomes.row(0, named=True)
    # "0" rejected by m1's verdict and rewritten by m1 ("1"); m0 drafts from "1": not in the comb
    assert (with_target["path"], with_target["n_discarded"], with_target["misses"]) == ("1", 1, 1)
    assert with_target["cost_scorer"] == 2 * N_PARAMS["m1"] * 1 / 1e12  # one judge call, one m1 token
    largest = run(scored, make_router("specreason")).outcomes.row(0, named=True)
    assert (largest["path"], largest["n_discarded"]) == ("000", 0)
    assert largest["cost_scorer"] == 3 * 2 * N_PARAMS["m2"] / 1e12
    unscored = build_trace(tmp_path / "unscored", steps, manifest=three_models(), scores=scores[:1])  # judge only
    message = r"reads judge@m1 scores \(the m1 model's own verdicts\), which .* does not have; "
    message += r"run `trace score .* --scorer judge@m1` first"
    with pytest.raises(TraceError, match=message):
        run(unscored, make_router("specreason", target="m1"))


def test_report_labels_round_floats_name_files_and_say_which_model(tmp_path):
    steps = []
    for k in range(10):
        steps += sized(comb_steps(f"p{k}", 3, chars="012", correct=lambda path: path in RIGHT))
    root = build_trace(tmp_path / "t", steps, manifest=three_models())
    results = [
        replay_trace(root, make_router("random", p=p), split="all", splits=TRAIN_ON_ALL) for p in (0.1 + 0.2, 0.5)
    ]
    results.append(replay_trace(root, make_router("only", model="m1"), split="all", splits=TRAIN_ON_ALL))
    markdown = report(root, results, split="all", pick_split="reported", bootstrap=5).markdown
    assert all(re.search(rf"\| random \(p={p}\)( \*)? \|", markdown) for p in ("0.3", "0.5"))  # * walks missed
    assert "0.30000000000000004" not in markdown
    assert "| only (m1) |" in markdown
