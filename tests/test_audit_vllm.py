"""`trace audit` of a vLLM-grown toy trace: with vLLM itself and cross-checked with transformers (slow:
`pytest -m vllm`). The session's shared vLLM engines of toy-small and toy-large (tests/conftest.py) serve it."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest
from tracebuild import rewrite_parts, toy_gen_options

from tracegen.audit import AuditOptions, run_audit
from tracegen.gen import run_gen
from tracestore.store import open_trace

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_trace(vllm_engines, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audit-vllm") / "toy"
    run_gen(toy_gen_options(out, limit=4, seed=11, backend="vllm"), backends=vllm_engines)
    return out


@pytest.fixture
def trace_copy(vllm_trace, tmp_path) -> Path:
    return shutil.copytree(vllm_trace, tmp_path / "toy")


def stored_tokens(root: Path) -> dict[str, list[int]]:
    return dict(open_trace(root).scan("tokens").select("step_id", "token_ids").collect().iter_rows())


def test_the_recording_engine_regenerates_every_step(trace_copy, vllm_engines):
    result = run_audit(AuditOptions(trace_copy, sample=1000, seed=0), backends=vllm_engines)
    summary = result.summary
    n_steps = len(stored_tokens(trace_copy))
    assert summary["same_engine"] and summary["backend"] == "vllm" and summary["min_identical"] == 1.0
    assert summary["audited"] == n_steps and summary["identical"] == n_steps and summary["passed"]
    assert summary["answers_changed"] == summary["correct_changed"] == 0
    assert summary["max_abs_delta_logprob"] < 1e-4 and summary["max_abs_delta_max_logit"] < 1e-4


def test_an_injected_corruption_is_found_by_the_recording_engine(trace_copy, vllm_engines):
    steps = open_trace(trace_copy).scan("steps").collect()
    tokens = stored_tokens(trace_copy)
    finals = steps.filter(pl.col("is_final")).sort("step_id")["step_id"]
    target = next(step_id for step_id in finals if len(tokens[step_id]) > 4)
    position, original = 2, tokens[target][2]

    def corrupt(frame: pl.DataFrame) -> pl.DataFrame:
        rows = frame.to_dicts()
        for row in rows:
            if row["step_id"] == target:
                row["token_ids"][position] = (original + 7) % 40
        return pl.DataFrame(rows, schema=frame.schema)

    rewrite_parts(trace_copy, "tokens", corrupt)
    result = run_audit(AuditOptions(trace_copy, sample=1000, seed=0), backends=vllm_engines)
    divergent = result.details.filter(~pl.col("identical"))
    assert divergent["step_id"].to_list() == [target]
    row = divergent.row(0, named=True)
    assert (row["first_divergence"], row["new_token"], row["stored_token"]) == (position, original, (original + 7) % 40)
    assert not result.passed and result.summary["identical"] == result.summary["audited"] - 1


def test_transformers_cross_checks_the_vllm_trace(trace_copy):
    result = run_audit(AuditOptions(trace_copy, sample=1000, seed=0, backend="hf"))
    summary, details = result.summary, result.details
    assert not summary["same_engine"] and "name" in summary["engine_differs"]
    assert summary["min_identical"] == 0.0 and summary["passed"]  # another engine: measured, not required
    # the report's arithmetic
    identical = int(details["identical"].sum())
    assert summary["identical"] == identical and summary["audited"] == details.height
    assert summary["identical_share"] == identical / details.height
    assert summary["divergent"] == details.height - identical
    tokens = stored_tokens(trace_copy)
    for row in details.filter(~pl.col("identical")).iter_rows(named=True):
        stored = tokens[row["step_id"]]
        assert row["n_agreeing"] == row["first_divergence"] <= len(stored)
        first = row["first_divergence"]
        assert row["stored_token"] == (stored[first] if first < len(stored) else None)
    # on the tokens both engines agree on, the two float32 engines score them alike
    assert summary["max_abs_delta_logprob"] < 1e-3 and summary["max_abs_delta_max_logit"] < 1e-3


def test_continuous_growth_writes_the_files_of_round_by_round_growth(vllm_engines, tmp_path, monkeypatch):
    """Children join their engines as soon as their parents are written (``StepStream``), yet every round's part
    files hold the same steps, bit for bit, as growing round by round; only ``n_cached_tokens``, vLLM's measured
    prefix-cache hits, depends on the engines' schedule."""
    import tracegen.continuous
    from tracegen.backends.vllm_engine import VLLMBackend

    def options(out: Path):
        return toy_gen_options(out, limit=6, seed=3, backend="vllm")

    open_stream, streams = VLLMBackend.open_stream, []
    monkeypatch.setattr(VLLMBackend, "open_stream", lambda *args: streams.append(args) or open_stream(*args))
    continuous = run_gen(options(tmp_path / "continuous"), backends=vllm_engines)
    assert len(streams) == 2  # one per model
    monkeypatch.setattr(tracegen.continuous, "can_stream", lambda backends: False)
    rounds = run_gen(options(tmp_path / "rounds"), backends=vllm_engines)
    assert len(streams) == 2 and rounds.rounds == continuous.rounds > 2
    assert rounds.new_steps == continuous.new_steps > 0
    for table in ("steps", "tokens"):
        parts = [sorted((tmp_path / run / table).glob("part-*")) for run in ("rounds", "continuous")]
        assert len(parts[0]) == len(parts[1]) == rounds.rounds  # one part a round, named by its digest
        for first, second in zip(*parts):
            assert first.name.rsplit("-", 1)[0] == second.name.rsplit("-", 1)[0]  # writer and sequence number
            first, second = pl.read_parquet(first), pl.read_parquet(second)
            if table == "steps":
                first, second = first.drop("n_cached_tokens"), second.drop("n_cached_tokens")
            assert first.equals(second)
