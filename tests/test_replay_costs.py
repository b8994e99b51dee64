"""Cost models on one hand-priced step: flops, flops+prefill, api; scorer calls; missing numbers are errors."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from replay.costs import GPT_41_MINI, Price, make_cost_model, parse_price
from replay.errors import TraceError

MANIFEST = {
    "models": [{"role": "small", "n_params": 1.5e9}, {"role": "large", "n_params": 7e9}],
    "scorers": {
        "prm": {"model": "skywork", "n_params": 1.5e9},
        "judge": {"model": "large"},
        "ptrue": {"model": "self"},
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


def test_flops_counts_generated_tokens_in_tflops():
    decode, prefill = make_cost_model("flops", MANIFEST).step_costs(STEPS)
    np.testing.assert_allclose(decode, [2 * 1.5e9 * 100 / 1e12, 2 * 7e9 * 50 / 1e12])
    np.testing.assert_array_equal(prefill, [0.0, 0.0])


def test_flops_plus_prefill_adds_newly_prefilled_tokens():
    decode, prefill = make_cost_model("flops+prefill", MANIFEST).step_costs(STEPS)
    np.testing.assert_allclose(decode, [0.3, 0.7])
    np.testing.assert_allclose(prefill, [2 * 1.5e9 * 300 / 1e12, 2 * 7e9 * 120 / 1e12])


def test_api_prices_uncached_cached_and_output_tokens():
    decode, prefill = make_cost_model("api", MANIFEST).step_costs(STEPS)  # GPT-4.1-mini for both
    np.testing.assert_allclose(decode, [100 * 1.60e-6, 50 * 1.60e-6])
    np.testing.assert_allclose(prefill, [300 * 0.40e-6, (400 - 256) * 0.40e-6 + 256 * 0.10e-6])
    prices = {"small": Price(0.1, 0.05, 0.2), "large": Price(2.0, 0.5, 8.0)}
    decode, prefill = make_cost_model("api", MANIFEST, prices).step_costs(STEPS)
    np.testing.assert_allclose(decode, [100 * 0.2e-6, 50 * 8.0e-6])
    np.testing.assert_allclose(prefill, [300 * 0.1e-6, 144 * 2.0e-6 + 256 * 0.5e-6])


def test_scorer_calls_use_the_scorers_model():
    flops = make_cost_model("flops", MANIFEST)
    tokens, roles = np.array([30, 40]), np.array(["small", "large"], dtype=object)
    np.testing.assert_allclose(flops.scorer_costs("prm", tokens, roles), [2 * 1.5e9 * 30 / 1e12, 2 * 1.5e9 * 40 / 1e12])
    np.testing.assert_allclose(flops.scorer_costs("judge", tokens, roles), [2 * 7e9 * 30 / 1e12, 2 * 7e9 * 40 / 1e12])
    np.testing.assert_allclose(flops.scorer_costs("ptrue", tokens, roles), [2 * 1.5e9 * 30 / 1e12, 2 * 7e9 * 40 / 1e12])
    api = make_cost_model("api", MANIFEST, {"small": GPT_41_MINI, "large": Price(2.0, 0.5, 8.0)})
    np.testing.assert_allclose(api.scorer_costs("judge", tokens, roles), [30 * 2e-6, 40 * 2e-6])
    np.testing.assert_allclose(api.scorer_costs("ptrue", tokens, roles), [30 * 0.4e-6, 40 * 2e-6])


def test_missing_numbers_are_errors_never_zero():
    no_large = {"models": [{"role": "small", "n_params": 1.5e9}, {"role": "large"}]}
    with pytest.raises(TraceError, match="needs n_params of model role\\(s\\) large"):
        make_cost_model("flops", no_large).step_costs(STEPS)
    with pytest.raises(TraceError, match="parameter count of scorer 'prm'"):
        make_cost_model("flops", {"models": MANIFEST["models"]}).scorer_costs("prm", np.array([1]), np.array(["small"]))
    with pytest.raises(TraceError, match="no price for large"):
        make_cost_model("api", MANIFEST, {"small": GPT_41_MINI}).step_costs(STEPS)
    with pytest.raises(TraceError, match="no price for prm"):
        make_cost_model("api", MANIFEST, {"small": GPT_41_MINI}).scorer_costs("prm", np.array([1]), np.array(["small"]))
    with pytest.raises(TraceError, match="unknown cost model 'watts'"):
        make_cost_model("watts", MANIFEST)
    with pytest.raises(TraceError, match="'models' must be a list of objects"):
        make_cost_model("flops", {"models": "small"})


def test_parse_price():
    assert parse_price("large=2/0.5/8") == ("large", Price(2.0, 0.5, 8.0))
    for bad in ("large=2/0.5", "large", "=1/2/3", "large=a/b/c"):
        with pytest.raises(TraceError, match="--price must look like"):
            parse_price(bad)
