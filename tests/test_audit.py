"""`trace audit` on the toy world: the transformers backend regenerates its own trace identically; what the audit
finds and reports, on a trace of the fake backend (seeded toy steps, no model). The vLLM runs: test_audit_vllm.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from test_gen import toy_models  # noqa: F401  (fixture: trained toy models, or random-weight stand-ins)
from tracebuild import rewrite_parts, toy_gen_options
from typer.testing import CliRunner

from cli import app
from tracegen.audit import AuditOptions, compare_tokens, run_audit, sample_steps
from tracegen.gen import run_gen
from tracestore.errors import TraceError
from tracestore.store import open_trace
from tracestore.validate import validate


@pytest.fixture(scope="module")
def hf_trace(toy_models, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("audit") / "toy"
    run_gen(toy_gen_options(out, small=toy_models[0], large=toy_models[1], limit=3, seed=5))
    return out


@pytest.fixture(scope="module")
def fake_trace(toy_models, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("audit-fake") / "toy"
    run_gen(toy_gen_options(out, small=toy_models[0], large=toy_models[1], limit=3, seed=5, backend="fake"))
    return out


@pytest.fixture
def trace_copy(fake_trace, tmp_path) -> Path:
    return shutil.copytree(fake_trace, tmp_path / "toy")


def strata_frame(sizes: dict[tuple[str, int], int]) -> pl.DataFrame:
    rows = [
        {"step_id": f"{model}-{depth}-{i:02d}", "model": model, "depth": depth}
        for (model, depth), n in sizes.items()
        for i in range(n)
    ]
    return pl.DataFrame(rows, schema={"step_id": pl.String, "model": pl.String, "depth": pl.Int32})


def test_the_sample_spreads_over_models_and_depths():
    steps = strata_frame({("small", 0): 10, ("small", 1): 10, ("small", 2): 1, ("large", 0): 2})
    sample = sample_steps(steps, 8, seed=0)
    counts = {(m, d): n for m, d, n in sample.group_by("model", "depth").len().rows()}
    # an equal share of 2 per stratum, the full ones (1 and 2 steps) take what they hold, the last step
    # goes to one of the two strata that still have room
    assert sample.height == 8 and counts[("small", 2)] == 1 and counts[("large", 0)] == 2
    assert sorted((counts[("small", 0)], counts[("small", 1)])) == [2, 3]
    assert sample_steps(steps, 8, seed=0).equals(sample)
    draws = {tuple(sample_steps(steps, 8, seed=s)["step_id"]) for s in range(6)}
    assert len(draws) > 1
    assert sample_steps(steps, 100, seed=0).height == steps.height
    with pytest.raises(TraceError, match="--sample must be at least 1"):
        sample_steps(steps, 0, seed=0)


def test_token_comparison_arithmetic():
    same = compare_tokens([1, 2, 3], [-0.5, -1.0, -2.0], [9.0, 8.0, 7.0], [1, 2, 3], [-0.5, -1.25, -2.0], [9, 8, 6.5])
    assert same["identical"] and same["first_divergence"] is None and same["n_agreeing"] == 3
    assert same["max_abs_delta_logprob"] == 0.25 and same["max_abs_delta_max_logit"] == 0.5
    # only the tokens before the divergence count for the deltas (the context differs after it)
    split = compare_tokens(
        [1, 2, 3, 4], [-0.5, -1.0, -2.0, 0], [9, 8, 7, 6], [1, 2, 5], [-0.75, -1.0, -9, 0], [9, 8, 0]
    )
    assert (split["identical"], split["first_divergence"], split["n_agreeing"]) == (False, 2, 2)
    assert (split["stored_token"], split["new_token"]) == (3, 5)
    assert split["max_abs_delta_logprob"] == 0.25 and split["max_abs_delta_max_logit"] == 0
    shorter = compare_tokens([1, 2], [-1, -1], [1, 1], [1, 2, 7], [-1, -1, -1], [1, 1, 1])
    assert (shorter["first_divergence"], shorter["stored_token"], shorter["new_token"]) == (2, None, 7)
    first = compare_tokens([4], [-1], [1], [5], [-1], [1])
    assert first["first_divergence"] == 0 and first["max_abs_delta_logprob"] is None


def test_the_same_engine_regenerates_every_step_identically(hf_trace, tmp_path):
    trace_copy = shutil.copytree(hf_trace, tmp_path / "toy")
    n_steps = open_trace(trace_copy).scan("steps").select(pl.len()).collect().item()
    result = run_audit(AuditOptions(trace_copy, sample=1000, seed=1))
    summary = result.summary
    assert summary["backend"] == "hf" and summary["same_engine"] and summary["engine_differs"] == []
    assert summary["audited"] == n_steps == result.details.height
    assert summary["identical"] == n_steps and summary["identical_share"] == 1.0 and summary["passed"]
    assert summary["estimated_identical_share"] == 1.0
    assert summary["max_abs_delta_logprob"] < 1e-4 and summary["max_abs_delta_max_logit"] < 1e-3
    assert summary["answers_changed"] == summary["correct_changed"] == summary["finality_changed"] == 0
    assert sum(v["audited"] for v in summary["by_model"].values()) == n_steps
    assert open_trace(trace_copy).manifest.audits == [summary]
    validate(trace_copy)


def test_an_injected_corruption_is_found_at_its_step_and_position(trace_copy, tmp_path):
    trace = open_trace(trace_copy)
    tokens = trace.scan("tokens").select("step_id", "token_ids").collect().sort("step_id")
    finals = set(trace.scan("steps").filter(pl.col("is_final")).select("step_id").collect()["step_id"])
    # a final step: no other step's prompt holds its tokens, so the corruption is in this step alone
    target = next(row for row in tokens.iter_rows(named=True) if len(row["token_ids"]) > 5 and row["step_id"] in finals)
    position = 3
    original = target["token_ids"][position]
    injected = (original + 1) % 40
    shifted = next(row for row in tokens.iter_rows(named=True) if row["step_id"] != target["step_id"])

    def corrupt(frame: pl.DataFrame) -> pl.DataFrame:
        rows = frame.to_dicts()
        for row in rows:
            if row["step_id"] == target["step_id"]:
                row["token_ids"][position] = injected
            if row["step_id"] == shifted["step_id"]:  # an agreeing token whose stored logprob is off by 0.5
                row["logprobs"][0] -= 0.5
        return pl.DataFrame(rows, schema=frame.schema)

    rewrite_parts(trace_copy, "tokens", corrupt)
    first = run_audit(AuditOptions(trace_copy, sample=3, seed=0)).summary  # a small audit first: history grows
    out = tmp_path / "audit.csv"
    result = CliRunner().invoke(app, ["audit", str(trace_copy), "--sample", "1000", "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "below --min-identical 1" in result.output
    details = pl.read_csv(out)
    divergent = details.filter(~pl.col("identical"))
    assert divergent["step_id"].to_list() == [target["step_id"]]
    row = divergent.row(0, named=True)
    assert (row["first_divergence"], row["stored_token"], row["new_token"]) == (position, injected, original)
    assert row["n_agreeing"] == position
    shifted_row = details.filter(pl.col("step_id") == shifted["step_id"]).row(0, named=True)
    assert shifted_row["identical"] and shifted_row["max_abs_delta_logprob"] == pytest.approx(0.5, abs=1e-4)
    audits = json.loads((trace_copy / "trace.json").read_text())["audits"]
    assert len(audits) == 2 and audits[0] == first
    summary = audits[1]
    assert summary["identical"] == summary["audited"] - 1 == details.height - 1
    assert summary["identical_share"] == pytest.approx((details.height - 1) / details.height)
    assert summary["first_divergences"] == [
        {"step_id": target["step_id"], "model": row["model"], "depth": row["depth"], "position": position}
    ]
    assert not summary["passed"] and summary["min_identical"] == 1.0
    info = CliRunner().invoke(app, ["info", str(trace_copy)])
    assert info.exit_code == 0 and "last audit (2 in trace.json)" in info.output
    assert f"{target['step_id']} @ token {position}" in info.output
    # the same corruption under a lower bar passes
    lenient = CliRunner().invoke(app, ["audit", str(trace_copy), "--sample", "1000", "--min-identical", "0.5"])
    assert lenient.exit_code == 0, lenient.output


def test_bad_audit_options_are_one_line(trace_copy, tmp_path):
    runner = CliRunner()
    cases = [
        (["--sample", "0"], "--sample must be at least 1"),
        (["--min-identical", "1.5"], "--min-identical must be in [0, 1]"),
        (["--backend", "tpu"], "unknown backend 'tpu'"),
        (["--out", str(tmp_path / "a.txt")], "must end in .csv"),
    ]
    for options, message in cases:
        result = runner.invoke(app, ["audit", str(trace_copy), *options])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output
    assert open_trace(trace_copy).manifest.audits == []
    missing = runner.invoke(app, ["audit", str(tmp_path / "none")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
