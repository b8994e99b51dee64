"""Cost models on hand-priced steps and scorer calls, each number computed by hand: flops (the seeds'
convention: generated tokens only, scorers included), flops+prefill, kaplan (eq. 2 of the cascade seed),
api (explicit per-role prices, a free open model); missing numbers and unpriced roles are errors."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from tracebuild import build_trace, comb_steps, default_manifest

from replay.costs import FREE, KNOWN_PRICES, Price, make_cost_model, parse_price
from replay.routers import make_router
from replay.run import replay_trace
from tracestore.errors import TraceError

# Qwen2.5-Math-1.5B- and 7B-like sizes: all parameters, and without the 151,936-row embedding (and, for the 7B,
# its untied output projection), Kaplan's N
SMALL = {"role": "small", "n_params": 1.5e9, "n_params_non_embedding": 1.5e9 - 151_936 * 1536, "n_layer": 28}
SMALL["d_model"] = 1536
LARGE = {"role": "large", "n_params": 7e9, "n_params_non_embedding": 7e9 - 2 * 151_936 * 3584, "n_layer": 28}
LARGE["d_model"] = 3584
MANIFEST = {
    "models": [SMALL, LARGE],
    "scorers": {
        "prm": {
            "model": "prm",
            "n_params": 1.5e9,
            "n_params_non_embedding": 1.5e9 - 151_936 * 1536,
            "n_layer": 28,
            "d_model": 1536,
            "generated_tokens": 0,
        },
        "judge": {"model": "large", "generated_tokens": 1},
        "ptrue": {"model": "self", "generated_tokens": 1},
    },
}
STEPS = pl.DataFrame(
    {
        "model": ["small", "large"],
        "n_gen_tokens": [100, 50],
        "n_prompt_tokens": [300, 400],
        "n_new_prefill_tokens": [300, 120],
        "n_cached_tokens": [0, 256],
    }
)
CALLS, ROLES = np.array([30, 40]), np.array(["small", "large"], dtype=object)


def test_flops_counts_generated_tokens_in_tflops():
    decode, prefill = make_cost_model("flops", MANIFEST).step_costs(STEPS)
    np.testing.assert_allclose(decode, [2 * 1.5e9 * 100 / 1e12, 2 * 7e9 * 50 / 1e12])
    np.testing.assert_array_equal(prefill, [0.0, 0.0])


def test_flops_charges_a_scorer_for_the_tokens_it_generates_only():
    flops = make_cost_model("flops", MANIFEST)
    # the judge writes one token per call with the large model: 2 * 7e9 FLOPs, whatever its context
    np.testing.assert_allclose(flops.scorer_costs("judge", CALLS, ROLES), [2 * 7e9 / 1e12] * 2)
    np.testing.assert_allclose(flops.scorer_costs("ptrue", CALLS, ROLES), [2 * 1.5e9 / 1e12, 2 * 7e9 / 1e12])
    np.testing.assert_array_equal(flops.scorer_costs("prm", CALLS, ROLES), [0.0, 0.0])  # a value head writes nothing


def test_flops_plus_prefill_adds_prefilled_tokens_for_steps_and_scorers():
    model = make_cost_model("flops+prefill", MANIFEST)
    decode, prefill = model.step_costs(STEPS)
    np.testing.assert_allclose(decode, [0.3, 0.7])
    np.testing.assert_allclose(prefill, [2 * 1.5e9 * 300 / 1e12, 2 * 7e9 * 120 / 1e12])
    np.testing.assert_allclose(model.scorer_costs("prm", CALLS, ROLES), [2 * 1.5e9 * 30 / 1e12, 2 * 1.5e9 * 40 / 1e12])
    np.testing.assert_allclose(model.scorer_costs("judge", CALLS, ROLES), [2 * 7e9 * 30 / 1e12, 2 * 7e9 * 40 / 1e12])


def test_kaplan_adds_the_context_term_per_generated_token_to_the_non_embedding_2n():
    kaplan = make_cost_model("kaplan", MANIFEST)
    decode, prefill = kaplan.step_costs(STEPS)
    # Kaplan's N: 1.5e9 - 151,936 * 1536 = 1,266,626,304 (small); 7e9 - 2 * 151,936 * 3584 = 5,910,922,752 (large)
    small_n, large_n = 1_266_626_304, 5_910_922_752
    # small step: 100 tokens after 300: sum over t < 100 of 2N + 2 * 28 * (300 + t) * 1536
    by_token = [2 * small_n + 2 * 28 * (300 + t) * 1536 for t in range(100)]
    large = [2 * large_n + 2 * 28 * (400 + t) * 3584 for t in range(50)]
    np.testing.assert_allclose(decode, [sum(by_token) / 1e12, sum(large) / 1e12])
    np.testing.assert_array_equal(prefill, [0.0, 0.0])
    # the judge's one token sees its context (n_tokens_processed - 1 tokens)
    judge = [(2 * large_n + 2 * 28 * (calls - 1) * 3584) / 1e12 for calls in CALLS]
    np.testing.assert_allclose(kaplan.scorer_costs("judge", CALLS, ROLES), judge)
    np.testing.assert_array_equal(kaplan.scorer_costs("prm", CALLS, ROLES), [0.0, 0.0])


def test_api_bills_in_cents_with_a_free_small_model():
    prices = {"small": FREE, "large": KNOWN_PRICES["gpt-4.1-mini"]}  # 0.40 / 0.10 / 1.60 USD per 1M
    decode, prefill = make_cost_model("api", MANIFEST, prices).step_costs(STEPS)
    cent = 100 / 1e6  # US cents per USD-per-1M-token price per token
    np.testing.assert_allclose(decode, [0.0, 50 * 1.60 * cent])
    # cached input = n_prompt_tokens - n_new_prefill_tokens = 280 of the large step's 400
    np.testing.assert_allclose(prefill, [0.0, 120 * 0.40 * cent + 280 * 0.10 * cent])
    api = make_cost_model("api", MANIFEST, {**prices, "judge": Price(2.0, 0.5, 8.0)})
    # a judge call: its context (n_tokens_processed - 1) as input, one output token
    np.testing.assert_allclose(
        api.scorer_costs("judge", CALLS, ROLES), [(29 * 2.0 + 8.0) * cent, (39 * 2.0 + 8.0) * cent]
    )
    # P(True) asks the model that wrote the answer: free for the small one, gpt-4.1-mini for the large
    np.testing.assert_allclose(api.scorer_costs("ptrue", CALLS, ROLES), [0.0, (39 * 0.40 + 1.60) * cent])


def test_missing_numbers_and_unpriced_roles_are_errors_never_zero():
    no_large = {"models": [SMALL, {"role": "large"}]}
    with pytest.raises(TraceError, match="needs n_params of large"):
        make_cost_model("flops", no_large).step_costs(STEPS)
    with pytest.raises(TraceError, match="parameter count of scorer 'judge'"):
        make_cost_model(
            "flops", {"models": MANIFEST["models"], "scorers": {"judge": {"generated_tokens": 1}}}
        ).scorer_costs("judge", CALLS, ROLES)
    with pytest.raises(TraceError, match="scorers.judge has no generated_tokens"):
        make_cost_model("flops", {"models": MANIFEST["models"], "scorers": {"judge": {"model": "large"}}}).scorer_costs(
            "judge", CALLS, ROLES
        )
    with pytest.raises(TraceError, match=r"kaplan needs trace.json models.large.n_layer"):
        make_cost_model("kaplan", {"models": [SMALL, {**LARGE, "n_layer": None}]})
    with pytest.raises(TraceError, match=r"kaplan needs trace.json models.large.n_params_non_embedding \(Kaplan's N"):
        make_cost_model("kaplan", {"models": [SMALL, {"role": "large", "n_params": 7e9, "n_layer": 28, "d_model": 9}]})
    with pytest.raises(TraceError, match="api needs prices: --price ROLE=... for each model role \\(small, large\\)"):
        make_cost_model("api", MANIFEST)
    with pytest.raises(TraceError, match="no price for large"):
        make_cost_model("api", MANIFEST, {"small": FREE}).step_costs(STEPS)
    with pytest.raises(TraceError, match="--price lrage: not a model role"):
        make_cost_model("api", MANIFEST, {"lrage": FREE})
    with pytest.raises(TraceError, match="unknown cost model 'watts'"):
        make_cost_model("watts", MANIFEST)
    with pytest.raises(TraceError, match="'models' must be a list of objects"):
        make_cost_model("flops", {"models": "small"})


def test_parse_price():
    assert parse_price("large=2/0.5/8") == ("large", Price(2.0, 0.5, 8.0))
    assert parse_price("large=gpt-4o-mini") == ("large", KNOWN_PRICES["gpt-4o-mini"])
    assert parse_price("small=0") == ("small", FREE)
    for bad in ("large=2/0.5", "large", "=1/2/3", "large=a/b/c", "large=gpt-5-imaginary"):
        with pytest.raises(TraceError, match="--price must look like"):
            parse_price(bad)
    for bad in ("large=nan/1/1", "large=-1/0/0", "large=inf/0/0"):
        with pytest.raises(TraceError, match="finite and not negative"):
            parse_price(bad)


def test_a_replay_states_its_cost_convention_and_prints_a_over_c_as_the_seeds_do(tmp_path):
    """A/C = accuracy (%) per cost unit; every outcome row names the cost model, unit and convention."""
    trace = build_trace(tmp_path / "t", comb_steps("p0", 2), manifest=default_manifest())
    result = replay_trace(trace, make_router("large-only"), split="all")
    row = result.summary().row(0, named=True)
    assert row["a_over_c"] == pytest.approx(100 * row["accuracy"] / row["cost"])
    outcomes = result.outcomes
    assert outcomes["cost_model"].unique().to_list() == ["flops"] and outcomes["cost_unit"][0] == "TFLOPs"
    assert "prefill not counted" in outcomes["cost_convention"][0]
