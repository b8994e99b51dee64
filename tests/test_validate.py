"""`validate` passes a sound trace and names the first violation of each invariant it claims."""

from __future__ import annotations

import json

import polars as pl
import pytest
from tracebuild import build_trace, comb_steps, default_manifest, default_problem, rewrite_parts

from tracestore.errors import TraceError
from tracestore.schema import MANIFEST_FILE, TOKEN_ARRAY_COLUMNS
from tracestore.validate import validate


def test_sound_comb_trace_passes(comb_trace):
    # 3 problems x 2 worlds; a 3-step comb has 3 small steps and 3 + 2 + 1 large ones
    assert validate(comb_trace) == {
        "problems": 3,
        "trees": 6,
        "steps": 54,
        "tokens": 54,
        "scores": 0,
        "hidden": 0,
        "grades": 0,
    }


def test_scores_and_hidden_count(tmp_path):
    root = build_trace(
        tmp_path / "t",
        comb_steps("p0", 2),
        scores=[{"step_id": "p0/0/s", "scorer": "prm", "value": 0.5, "n_tokens_processed": 3}],
        hidden=[{"problem_id": "p0", "model": "small", "layer": -1, "where": "prompt_last", "vector": [1.0, 2.0]}],
    )
    assert validate(root) == {"problems": 1, "trees": 1, "steps": 5, "tokens": 5, "scores": 1, "hidden": 1, "grades": 0}


# -- steps written as given (the writer does not check tree structure)


@pytest.mark.parametrize(
    "steps, message",
    [
        ([{"path": "s", "finish_reason": "stop"}], "step 'p0/0/s' has finish_reason 'stop'; expected one of"),
        ([{"path": "s", "model": "medium"}], "step 'p0/0/s' is by model 'medium', which is not a role in trace.json"),
        (
            [{"path": "s"}, {"path": "sL", "model": "small"}],
            "step 'p0/0/sL' by small has path 'sL', but parent_path 's' \\+ 's' is 'ss'",
        ),
        (
            [{"path": "s"}, {"path": "ss", "depth": 0}],
            "step 'p0/0/ss' has depth 0, but its parent_path 's' has length 1",
        ),
        (
            [{"path": "s"}, {"path": "sLs"}],
            "step 'p0/0/sLs' continues node 'sL', which no step of problem 'p0' world 0 creates",
        ),
        (
            [{"path": "s", "world": 1}, {"path": "ss"}],
            "step 'p0/0/ss' continues node 's', which no step of problem 'p0' world 0",
        ),
        ([{"path": "s", "is_final": True, "answer": None}], "final step 'p0/0/s' has a null answer"),
        ([{"path": "s", "is_final": True, "correct": None}], "final step 'p0/0/s' has a null correct"),
        ([{"path": "s", "answer": "7"}], "step 'p0/0/s' is not final but has an answer"),
        ([{"path": "s", "correct": False}], "step 'p0/0/s' is not final but has a correct flag"),
    ],
    ids=[
        "finish_reason",
        "model_role",
        "path_char",
        "depth",
        "parent_missing",
        "parent_other_world",
        "final_answer",
        "final_correct",
        "nonfinal_answer",
        "nonfinal_correct",
    ],
)
def test_step_invariants(tmp_path, steps, message):
    root = build_trace(tmp_path / "t", steps)
    with pytest.raises(TraceError, match=message):
        validate(root)


def test_steps_name_their_part_file(tmp_path):
    root = build_trace(tmp_path / "t", [{"path": "s"}, {"path": "ss", "depth": 5}], parts=2)
    with pytest.raises(TraceError, match=r"steps/part-w0-00003-[0-9a-f]+\.parquet: step 'p0/0/ss' has depth 5"):
        validate(root)


def test_problem_missing(tmp_path):
    root = build_trace(tmp_path / "t", [{"path": "s"}], problems=[default_problem("p9")])
    with pytest.raises(TraceError, match="step 'p0/0/s' refers to problem 'p0', which is not in problems"):
        validate(root)


def test_model_missing_from_manifest(tmp_path):
    manifest = default_manifest()
    manifest["models"] = manifest["models"][:1]
    root = build_trace(tmp_path / "t", [{"path": "s"}, {"path": "L"}], manifest=manifest)
    with pytest.raises(
        TraceError, match="step 'p0/0/L' is by model 'large', which is not a role in trace.json \\(roles: small\\)"
    ):
        validate(root)


# -- corrupted after writing (the writer refuses these)


def test_duplicate_step_id(comb_trace):
    rewrite_parts(comb_trace, "steps", lambda f: pl.concat([f, f.head(1)]))
    with pytest.raises(TraceError, match="step_id '.*' appears more than once"):
        validate(comb_trace)


def test_step_id_not_problem_world_path(comb_trace):
    rewrite_parts(
        comb_trace,
        "steps",
        lambda f: f.with_columns(
            step_id=pl.when(pl.col("step_id") == "p1/1/sL").then(pl.lit("p1/9/sL")).otherwise("step_id")
        ),
    )
    with pytest.raises(TraceError, match="step 'p1/9/sL' should have step_id p1/1/sL"):
        validate(comb_trace)


def test_null_in_required_column(comb_trace):
    rewrite_parts(
        comb_trace,
        "steps",
        lambda f: f.with_columns(text=pl.when(pl.col("step_id") == "p2/0/ss").then(None).otherwise("text")),
    )
    with pytest.raises(TraceError, match="steps row 'p2/0/ss' has a null text, which is required"):
        validate(comb_trace)


def test_duplicate_problem(comb_trace):
    rewrite_parts(comb_trace, "problems", lambda f: pl.concat([f, f.filter(pl.col("problem_id") == "p1")]))
    with pytest.raises(TraceError, match="problem_id 'p1' appears more than once in problems"):
        validate(comb_trace)


def test_step_without_tokens_row(comb_trace):
    rewrite_parts(comb_trace, "tokens", lambda f: f.filter(pl.col("step_id") != "p0/1/LL"))
    with pytest.raises(TraceError, match="step 'p0/1/LL' has no tokens row"):
        validate(comb_trace)


def test_tokens_row_without_step(comb_trace):
    rewrite_parts(comb_trace, "tokens", lambda f: f.with_columns(pl.col("step_id").str.replace("p0/1/LL", "p0/1/LLLL")))
    with pytest.raises(TraceError, match="tokens row for step 'p0/1/LLLL', which is not in steps"):
        validate(comb_trace)


def test_two_tokens_rows(comb_trace):
    rewrite_parts(comb_trace, "tokens", lambda f: pl.concat([f, f.filter(pl.col("step_id") == "p2/0/s")]))
    with pytest.raises(TraceError, match="step 'p2/0/s' has more than one tokens row"):
        validate(comb_trace)


@pytest.mark.parametrize("column", TOKEN_ARRAY_COLUMNS)
def test_token_array_length(comb_trace, column):
    rewrite_parts(
        comb_trace,
        "tokens",
        lambda f: f.with_columns(
            pl.when(pl.col("step_id") == "p1/0/sLL").then(pl.col(column).list.head(1)).otherwise(column).alias(column)
        ),
    )
    with pytest.raises(TraceError, match=f"tokens.{column} of step 'p1/0/sLL' has 1 entries, but n_gen_tokens is 4"):
        validate(comb_trace)


def test_score_for_missing_step(tmp_path):
    score = {"step_id": "p0/0/sss", "scorer": "prm", "value": 0.5, "n_tokens_processed": 3}
    root = build_trace(tmp_path / "t", comb_steps("p0", 2), scores=[score])
    with pytest.raises(TraceError, match="prm score for step 'p0/0/sss', which is not in steps"):
        validate(root)


def test_score_of_an_undescribed_scorer(tmp_path):
    score = {"step_id": "p0/0/s", "scorer": "prm", "value": 0.5, "n_tokens_processed": 3}
    root = build_trace(tmp_path / "t", comb_steps("p0", 2), scores=[score])
    manifest = json.loads((root / "trace.json").read_text())
    del manifest["scorers"]["prm"]
    (root / "trace.json").write_text(json.dumps(manifest))
    with pytest.raises(TraceError, match="prm score for step 'p0/0/s', but trace.json has no scorers.prm entry"):
        validate(root)


def test_duplicate_score(tmp_path):
    score = {"step_id": "p0/0/s", "scorer": "prm", "value": 0.5, "n_tokens_processed": 3}
    root = build_trace(tmp_path / "t", comb_steps("p0", 2), scores=[score])
    rewrite_parts(root, "scores", lambda f: pl.concat([f, f]))
    with pytest.raises(TraceError, match="step 'p0/0/s' has more than one prm score"):
        validate(root)


@pytest.mark.parametrize(
    "hidden, message",
    [
        ({"problem_id": "p7"}, "hidden vector for problem 'p7', which is not in problems"),
        ({"model": "huge"}, "hidden vector of problem 'p0' is for model 'huge', which is not a role"),
    ],
)
def test_hidden_references(tmp_path, hidden, message):
    row = {"problem_id": "p0", "model": "small", "layer": -1, "where": "prompt_last", "vector": [1.0]}
    root = build_trace(tmp_path / "t", comb_steps("p0", 1), hidden=[{**row, **hidden}])
    with pytest.raises(TraceError, match=message):
        validate(root)


def test_duplicate_hidden(tmp_path):
    row = {"problem_id": "p0", "model": "small", "layer": 2, "where": "prompt_last", "vector": [1.0]}
    root = build_trace(tmp_path / "t", comb_steps("p0", 1), hidden=[row])
    rewrite_parts(root, "hidden", lambda f: pl.concat([f, f]))
    with pytest.raises(TraceError, match="problem 'p0' has more than one small hidden vector for layer 2"):
        validate(root)


def test_manifest_problem_count(comb_trace):
    manifest = json.loads((comb_trace / MANIFEST_FILE).read_text())
    (comb_trace / MANIFEST_FILE).write_text(json.dumps({**manifest, "n_problems": 4}))
    with pytest.raises(TraceError, match="records n_problems = 4, but problems has 3 rows"):
        validate(comb_trace)


def test_manifest_dataset_name(tmp_path):
    root = build_trace(tmp_path / "t", comb_steps("p0", 1), manifest=default_manifest(dataset={"name": "gsm8k"}))
    with pytest.raises(TraceError, match="problem 'p0' is from dataset 'toy', but trace.json records dataset 'gsm8k'"):
        validate(root)


def test_unknown_schema_version(comb_trace):
    manifest = json.loads((comb_trace / MANIFEST_FILE).read_text())
    (comb_trace / MANIFEST_FILE).write_text(json.dumps({**manifest, "schema_version": 3}))
    with pytest.raises(TraceError, match="has schema_version 3; this version of trace reads schema_version 1 and 2"):
        validate(comb_trace)


def test_truncated_part(comb_trace):
    part = sorted((comb_trace / "steps").glob("part-*"))[-1]
    part.write_bytes(part.read_bytes()[:200])
    with pytest.raises(TraceError, match=f"{part} is not a readable Parquet file"):
        validate(comb_trace)
