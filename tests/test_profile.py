"""`trace profile`: the latency profile of the toy models measured with the transformers backend at tiny sizes, and
an API role fitted from the stored timings (or refused without them)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tracebuild import build_trace, comb_steps, default_manifest
from typer.testing import CliRunner

from cli import app
from replay.latency import fit_request_time, read_profile
from tracegen.profile import measure_profile
from tracestore.errors import TraceError


def test_profile_of_the_toy_models_on_hf(tmp_path):
    root = build_trace(tmp_path / "t", comb_steps("p0", 2), manifest=default_manifest())
    before = sorted(path.name for path in root.rglob("*"))
    result = CliRunner().invoke(
        app,
        ["profile", str(root), "--backend", "hf", "--prefill", "8,96", "--decode", "1,12", "--repeats", "2"]
        + ["--threads", "1"],
    )
    assert result.exit_code == 0, result.output
    document = json.loads((root / "latency.json").read_text())
    assert document["engine"]["name"] == "hf" and document["engine"]["prefix_caching"] is False
    assert document["hardware"]["torch_threads"] == 1 and document["hardware"]["n_cpus"] >= 1
    assert {"torch", "transformers", "python"} <= set(document["versions"]) and document["batch_size"] == 1
    assert set(document["entries"]) == {"small", "large"}
    for role, entry in document["entries"].items():
        assert entry["model"] == f"toy-{role}" and entry["n_requests"] == 8
        assert entry["decode_s_per_token"] > 0 and entry["overhead_s"] + entry["prefill_s_per_token"] > 0
        assert entry["residual_rms_s"] >= 0 and np.isfinite(entry["relative_rms"])
    read_profile(root / "latency.json")  # what replay reads back
    assert sorted(path.name for path in root.rglob("*")) == sorted([*before, "latency.json"])  # tables untouched
    again = CliRunner().invoke(app, ["profile", str(root), "--backend", "hf"])
    assert again.exit_code == 1 and "exists; pass --force" in again.output


def test_fit_recovers_known_coefficients_and_states_residuals():
    rng = np.random.default_rng(0)
    prefill, decode = rng.integers(1, 500, 60), rng.integers(1, 60, 60)
    seconds = 0.02 + 1e-4 * prefill + 5e-3 * decode + rng.normal(0, 1e-4, 60)
    fit = fit_request_time(prefill, decode, seconds)
    assert fit["overhead_s"] == pytest.approx(0.02, rel=0.05)
    assert fit["prefill_s_per_token"] == pytest.approx(1e-4, rel=0.05)
    assert fit["decode_s_per_token"] == pytest.approx(5e-3, rel=0.05)
    assert 0 < fit["residual_rms_s"] < 3e-4 and fit["n_requests"] == 60


def _api_trace(tmp_path, gen_seconds):
    models = default_manifest()["models"]
    models[1] = {**models[1], "served_by": "openai"}
    steps = [
        {"path": "L" * depth, "n_new_prefill_tokens": 10 * depth, "n_gen_tokens": 2 + depth, "gen_seconds": seconds}
        for depth, seconds in zip(range(1, 6), gen_seconds)
    ]
    steps[-1] |= {"is_final": True, "correct": True}
    return build_trace(tmp_path / "t", steps, manifest=default_manifest(models=models))


def test_an_api_role_is_fitted_from_stored_timings(tmp_path):
    seconds = [0.1 + 0.001 * 10 * d + 0.02 * (2 + d) for d in range(1, 6)]
    root = _api_trace(tmp_path, seconds)
    _, document = measure_profile(root, backend="hf", prefill_lengths=(8,), decode_lengths=(1,), repeats=1)
    large = document["entries"]["large"]
    assert large["source"] == "the trace's stored gen_seconds" and large["residual_rms_s"] < 1e-6
    assert large["decode_s_per_token"] + large["prefill_s_per_token"] > 0


def test_an_api_role_without_stored_timings_is_refused(tmp_path):
    root = _api_trace(tmp_path, [None] * 5)
    with pytest.raises(TraceError, match="large is served by an API and the trace stores 0 timed step.*--timings"):
        measure_profile(root, backend="hf")
    assert not (root / "latency.json").exists()
