"""`trace validate`: check every invariant of a trace, stop at the first violation with one clear sentence.

First a symbolic link that leads out of the trace is named (what it points to is not the trace's); then
every part is read whole through pyarrow with its page checksums verified, so that a damaged file is named
before anything else reads it; then come the tables' invariants, value ranges included.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import polars as pl

from tracestore.boundary import check_no_link_leaves
from tracestore.errors import TraceError
from tracestore.remote import local_path
from tracestore.schema import (
    DEFAULT_GRADES,
    FINISH_REASONS,
    ROW_KEYS,
    SCHEMAS,
    TABLES,
    TOKEN_ARRAY_COLUMNS,
    UNKNOWN_TOKEN_ID,
    model_char,
)
from tracestore.store import HEAVY_TABLES, Trace, open_trace, verify_part

FILE = "_file"  # column holding each row's part file, for messages
# Log-probabilities are computed in float32; the log-softmax of the likeliest token can round a hair above 0.
LOGPROB_SLACK = 1e-4


def validate(root: str | os.PathLike) -> dict[str, int]:
    """Raise TraceError on the first violated invariant; otherwise return row counts per table. ``root``: a
    path or file:// URL."""
    trace = open_trace(local_path(root, "validate"))
    check_no_link_leaves(trace.root)
    for table in TABLES:
        files = trace.files(table)  # recorded parts present, footers and column types, pages of the light tables
        if table in HEAVY_TABLES:
            for file in files:
                verify_part(file)
    try:
        return _validate_tables(trace)
    except pl.exceptions.PolarsError as error:  # the parts read whole above, so a reader error here is not theirs
        raise TraceError(f"{trace.root}: reading its tables failed: {str(error).splitlines()[0]}") from None


def _validate_tables(trace: Trace) -> dict[str, int]:
    leftovers = trace.uncommitted_files()
    if leftovers:
        raise TraceError(
            f"{leftovers[0]} has no steps part: it was left by an interrupted write "
            "(rerunning the command that wrote this trace finishes the work and removes it)"
        )
    for table in TABLES:
        _check_required(trace, table)

    roles = _manifest_roles(trace)
    problems = trace.scan("problems", with_file=FILE).select("problem_id", "dataset", FILE).collect()
    steps = trace.scan("steps", with_file=FILE).drop("text").collect()
    _check_unique(problems, "problems")
    _check_steps(steps, roles)
    _check_step_values(steps)
    _check_tree(steps)
    _first(
        steps.join(problems.select("problem_id"), on="problem_id", how="anti"),
        lambda row: f"step {row['step_id']!r} refers to problem {row['problem_id']!r}, which is not in problems",
    )
    n_tokens = _check_tokens(trace, steps)
    n_scores = _check_scores(trace, steps)
    _check_token_values(trace)
    n_hidden = _check_hidden(trace, problems, roles)
    n_grades = _check_grades(trace, steps)
    _check_manifest_counts(trace, problems)
    return {
        "problems": problems.height,
        "trees": steps.select("problem_id", "world").n_unique() if steps.height else 0,
        "steps": steps.height,
        "tokens": n_tokens,
        "scores": n_scores,
        "hidden": n_hidden,
        "grades": n_grades,
    }


def _first(violations: pl.DataFrame, message: Callable[[dict], str], order: str = "step_id") -> None:
    """Raise for the first violating row (in `order`), prefixed with the part file it is in."""
    if violations.height:
        row = violations.sort(order).row(0, named=True)
        where = f"{row[FILE]}: " if row.get(FILE) else ""
        raise TraceError(where + message(row))


def _check_required(trace: Trace, table: str) -> None:
    required = [field.name for field in SCHEMAS[table] if not field.nullable]
    nulls = trace.scan(table, with_file=FILE).filter(pl.any_horizontal(pl.col(required).is_null()))
    nulls = nulls.select(*dict.fromkeys([*ROW_KEYS[table], *required]), FILE).collect()
    if nulls.height:
        row = nulls.row(0, named=True)
        column = next(name for name in required if row[name] is None)
        key = "/".join(str(row[c]) for c in ROW_KEYS[table])
        raise TraceError(f"{row[FILE]}: {table} row {key!r} has a null {column}, which is required")


def _manifest_roles(trace: Trace) -> dict[str, str]:
    """Role -> path character of every model the manifest lists."""
    return {role: model_char(role) for role in trace.manifest.roles}


def _check_unique(problems: pl.DataFrame, table: str) -> None:
    _first(
        problems.filter(pl.col("problem_id").is_duplicated()),
        lambda row: f"problem_id {row['problem_id']!r} appears more than once in {table}",
        order="problem_id",
    )


def _check_steps(steps: pl.DataFrame, roles: dict[str, str]) -> None:
    """Row-level invariants: ids, model roles, path/depth arithmetic, final answers."""
    _first(
        steps.filter(pl.col("step_id").is_duplicated()),
        lambda row: f"step_id {row['step_id']!r} appears more than once",
    )
    expected_id = pl.concat_str(pl.col("problem_id"), pl.col("world").cast(pl.String), pl.col("path"), separator="/")
    _first(
        steps.filter(pl.col("step_id") != expected_id),
        lambda row: (
            f"step {row['step_id']!r} should have step_id "
            f"{row['problem_id']}/{row['world']}/{row['path']} (problem_id/world/path)"
        ),
    )
    _first(
        steps.filter(~pl.col("finish_reason").is_in(FINISH_REASONS)),
        lambda row: (
            f"step {row['step_id']!r} has finish_reason {row['finish_reason']!r}; "
            f"expected one of {', '.join(FINISH_REASONS)}"
        ),
    )
    _first(
        steps.filter(~pl.col("model").is_in(list(roles))),
        lambda row: (
            f"step {row['step_id']!r} is by model {row['model']!r}, "
            f"which is not a role in trace.json (roles: {', '.join(roles)})"
        ),
    )
    char = pl.col("model").replace_strict(roles, return_dtype=pl.String)
    _first(
        steps.filter(pl.col("path") != pl.col("parent_path") + char),
        lambda row: (
            f"step {row['step_id']!r} by {row['model']} has path {row['path']!r}, "
            f"but parent_path {row['parent_path']!r} + {roles[row['model']]!r} is "
            f"{row['parent_path'] + roles[row['model']]!r}"
        ),
    )
    _first(
        steps.filter(pl.col("depth") != pl.col("parent_path").str.len_chars()),
        lambda row: (
            f"step {row['step_id']!r} has depth {row['depth']}, "
            f"but its parent_path {row['parent_path']!r} has length {len(row['parent_path'])}"
        ),
    )
    _first(
        steps.filter(pl.col("is_final") & (pl.col("answer").is_null() | pl.col("correct").is_null())),
        lambda row: (
            f"final step {row['step_id']!r} has a null "
            f"{'answer' if row['answer'] is None else 'correct'}; final steps must be graded"
        ),
    )
    _first(
        steps.filter(~pl.col("is_final") & (pl.col("answer").is_not_null() | pl.col("correct").is_not_null())),
        lambda row: (
            f"step {row['step_id']!r} is not final but has "
            f"{'an answer' if row['answer'] is not None else 'a correct flag'}"
        ),
    )


def _not_finite(column: str) -> pl.Expr:
    return pl.col(column).is_nan() | pl.col(column).is_infinite()


def _check_step_values(steps: pl.DataFrame) -> None:
    """Counts, log-probabilities and confidences within the ranges they can take."""
    counts = [
        (pl.col("world") < 0, "world", "a world index (>= 0)"),
        (pl.col("n_prompt_tokens") < 1, "n_prompt_tokens", "at least 1"),
        (pl.col("n_gen_tokens") < 1, "n_gen_tokens", "at least 1"),
        (
            (pl.col("n_new_prefill_tokens") < 0) | (pl.col("n_new_prefill_tokens") > pl.col("n_prompt_tokens")),
            "n_new_prefill_tokens",
            "between 0 and n_prompt_tokens",
        ),
        (
            (pl.col("n_cached_tokens") < 0) | (pl.col("n_cached_tokens") > pl.col("n_prompt_tokens")),
            "n_cached_tokens",
            "between 0 and n_prompt_tokens",
        ),
    ]
    for column in ("logprob_mean", "logprob_min", "first_token_logprob"):
        counts.append((_not_finite(column) | (pl.col(column) > LOGPROB_SLACK), column, "a log-probability (<= 0)"))
    counts += [
        (
            pl.col("logprob_min") > pl.col("logprob_mean") + LOGPROB_SLACK,
            "logprob_min",
            "at most logprob_mean",
        ),
        (
            _not_finite("conf_top1_prob_min_math")
            | ~pl.col("conf_top1_prob_min_math").is_between(0, 1 + LOGPROB_SLACK),
            "conf_top1_prob_min_math",
            "a probability",
        ),
        (_not_finite("conf_max_logit_mean"), "conf_max_logit_mean", "a finite number"),
        (_not_finite("conf_max_logit_math"), "conf_max_logit_math", "a finite number"),
        (_not_finite("gen_seconds") | (pl.col("gen_seconds") < 0), "gen_seconds", "seconds (>= 0)"),
    ]
    for violated, column, wanted in counts:
        _first(
            steps.filter(violated.fill_null(False)),
            lambda row, column=column, wanted=wanted: (
                f"step {row['step_id']!r} has {column} = {row[column]!r}, which must be {wanted}"
            ),
        )


def _check_token_values(trace: Trace) -> None:
    """Per generated token: log-probabilities <= 0 with the sampled one at most the top-1, top-k lists
    sorted from likeliest down, every position with k alternatives; token ids >= 0 (-1: a token an API named
    by its text only), max logits finite (null for API-served steps)."""
    k = (trace.manifest.get("sampling") or {}).get("topk")
    for file in trace.files("tokens"):
        tokens = pl.read_parquet(file, glob=False).with_columns(pl.lit(file).alias(FILE))
        bad_logit = pl.element().is_nan() | pl.element().is_infinite()
        _first(
            tokens.filter(pl.col("max_logits").list.eval(bad_logit).list.any().fill_null(False)),
            lambda row: f"tokens row of step {row['step_id']!r} has a max_logit that is not a finite number",
        )
        per_token = tokens.select("step_id", FILE, "token_ids", "logprobs", "topk_ids", "topk_logprobs")
        per_token = per_token.explode("token_ids", "logprobs", "topk_ids", "topk_logprobs")
        per_token = per_token.filter(pl.col("token_ids").is_not_null())  # rows of steps without tokens
        checks = [
            (pl.col("token_ids") < UNKNOWN_TOKEN_ID, f"a token id below {UNKNOWN_TOKEN_ID}"),
            (_not_finite("logprobs") | (pl.col("logprobs") > LOGPROB_SLACK), "a logprob that is not <= 0"),
            (pl.col("topk_logprobs").list.max() > LOGPROB_SLACK, "a top-k logprob above 0"),
            (pl.col("topk_logprobs").list.eval(pl.element().is_nan()).list.any(), "a top-k logprob that is NaN"),
            (
                pl.col("topk_logprobs").list.diff(null_behavior="drop").list.max() > 0,
                "top-k logprobs not sorted from the likeliest down",
            ),
            (
                pl.col("logprobs") > pl.col("topk_logprobs").list.first() + LOGPROB_SLACK,
                "a sampled logprob above the top-1 logprob",
            ),
            (
                pl.col("topk_ids").list.len() != pl.col("topk_logprobs").list.len(),
                "top-k ids and logprobs of different lengths",
            ),
        ]
        if isinstance(k, int):
            checks.append((pl.col("topk_ids").list.len() != k, f"not k = {k} top-k entries (trace.json sampling.topk)"))
        for violated, what in checks:
            _first(
                per_token.filter(violated.fill_null(False)),
                lambda row, what=what: f"tokens row of step {row['step_id']!r} has {what}",
            )


def _check_tree(steps: pl.DataFrame) -> None:
    """Every step continues the root or a node some step of the same (problem, world) created."""
    nodes = steps.select("problem_id", "world", pl.col("path").alias("parent_path"))
    orphans = steps.filter(pl.col("parent_path") != "").join(
        nodes, on=["problem_id", "world", "parent_path"], how="anti"
    )
    _first(
        orphans,
        lambda row: (
            f"step {row['step_id']!r} continues node {row['parent_path']!r}, "
            f"which no step of problem {row['problem_id']!r} world {row['world']} creates"
        ),
    )


def _check_tokens(trace: Trace, steps: pl.DataFrame) -> int:
    lengths = (
        trace.scan("tokens", with_file=FILE)
        .select("step_id", FILE, *(pl.col(c).list.len().alias(c) for c in TOKEN_ARRAY_COLUMNS))
        .collect()
    )
    _first(
        lengths.filter(pl.col("step_id").is_duplicated()),
        lambda row: f"step {row['step_id']!r} has more than one tokens row",
    )
    _first(
        lengths.join(steps.select("step_id"), on="step_id", how="anti"),
        lambda row: f"tokens row for step {row['step_id']!r}, which is not in steps",
    )
    _first(
        steps.join(lengths.select("step_id"), on="step_id", how="anti"),
        lambda row: f"step {row['step_id']!r} has no tokens row",
    )
    joined = lengths.join(steps.select("step_id", "n_gen_tokens"), on="step_id")
    for column in TOKEN_ARRAY_COLUMNS:
        _first(
            joined.filter(pl.col(column) != pl.col("n_gen_tokens")),
            lambda row, column=column: (
                f"tokens.{column} of step {row['step_id']!r} has {row[column]} entries, "
                f"but n_gen_tokens is {row['n_gen_tokens']}"
            ),
        )
    return lengths.height


def _check_scores(trace: Trace, steps: pl.DataFrame) -> int:
    scores = trace.scan("scores", with_file=FILE).select("step_id", "scorer", FILE).collect()
    _first(
        scores.join(steps.select("step_id"), on="step_id", how="anti"),
        lambda row: f"{row['scorer']} score for step {row['step_id']!r}, which is not in steps",
    )
    _first(
        scores.filter(pl.struct("step_id", "scorer").is_duplicated()),
        lambda row: f"step {row['step_id']!r} has more than one {row['scorer']} score",
    )
    described = list(trace.manifest.scorers)
    _first(
        scores.filter(~pl.col("scorer").is_in(described)),
        lambda row: (
            f"{row['scorer']} score for step {row['step_id']!r}, but trace.json has no scorers.{row['scorer']} "
            "entry (its model and prompt)"
        ),
    )
    values = trace.scan("scores", with_file=FILE).select(
        "step_id",
        "scorer",
        FILE,
        "value",
        "n_tokens_processed",
        bad_detail=pl.col("detail").list.eval(pl.element().is_nan() | pl.element().is_infinite()).list.any(),
    )
    _first(
        values.filter(_not_finite("value") | pl.col("bad_detail").fill_null(False)).collect(),
        lambda row: f"{row['scorer']} score of step {row['step_id']!r} is not a finite number ({row['value']!r})",
    )
    _first(
        values.filter(pl.col("n_tokens_processed") < 0).collect(),
        lambda row: f"{row['scorer']} score of step {row['step_id']!r} has n_tokens_processed below 0",
    )
    if steps.height:
        present = set(scores["scorer"].unique().to_list())
        lost = [name for name in described if name not in present]
        if lost:
            raise TraceError(
                f"{trace.root}/trace.json lists the scorer(s) {', '.join(lost)}, but the scores table holds none of "
                f"their scores: they were lost; run `trace score {trace.root} --scorer {lost[0]}` again"
            )
    return scores.height


def _check_grades(trace: Trace, steps: pl.DataFrame) -> int:
    """Grades of `trace regrade`: one per (final step, grade set), of a grade set trace.json describes."""
    grades = trace.scan("grades", with_file=FILE).select("step_id", "grade_set", FILE).collect()
    _first(
        grades.join(steps.filter(pl.col("is_final")).select("step_id"), on="step_id", how="anti"),
        lambda row: f"grade set {row['grade_set']!r} grades step {row['step_id']!r}, which is not a final step",
    )
    _first(
        grades.filter(pl.struct("step_id", "grade_set").is_duplicated()),
        lambda row: f"step {row['step_id']!r} has more than one grade in grade set {row['grade_set']!r}",
    )
    described = [name for name in trace.manifest.grade_sets if name != DEFAULT_GRADES]
    _first(
        grades.filter(~pl.col("grade_set").is_in(described)),
        lambda row: (
            f"grade of step {row['step_id']!r} in grade set {row['grade_set']!r}, but trace.json has no "
            f"grade_sets.{row['grade_set']} entry (its grader)"
        ),
    )
    return grades.height


def _check_hidden(trace: Trace, problems: pl.DataFrame, roles: dict[str, str]) -> int:
    hidden = trace.scan("hidden", with_file=FILE).select("problem_id", "model", "layer", "where", FILE).collect()
    _first(
        hidden.join(problems.select("problem_id"), on="problem_id", how="anti"),
        lambda row: f"hidden vector for problem {row['problem_id']!r}, which is not in problems",
        order="problem_id",
    )
    _first(
        hidden.filter(~pl.col("model").is_in(list(roles))),
        lambda row: (
            f"hidden vector of problem {row['problem_id']!r} is for model {row['model']!r}, "
            "which is not a role in trace.json"
        ),
        order="problem_id",
    )
    _first(
        hidden.filter(pl.struct("problem_id", "model", "layer", "where").is_duplicated()),
        lambda row: (
            f"problem {row['problem_id']!r} has more than one {row['model']} hidden vector "
            f"for layer {row['layer']} at {row['where']}"
        ),
        order="problem_id",
    )
    return hidden.height


def _check_manifest_counts(trace: Trace, problems: pl.DataFrame) -> None:
    """What the manifest records about the dataset must match the problems table."""
    n_problems = trace.manifest.n_problems
    if n_problems is not None and n_problems != problems.height:
        raise TraceError(
            f"{trace.root}/trace.json records n_problems = {n_problems}, but problems has {problems.height} rows"
        )
    name = trace.manifest.dataset_name
    if name is not None:
        _first(
            problems.filter(pl.col("dataset") != name),
            lambda row: (
                f"problem {row['problem_id']!r} is from dataset {row['dataset']!r}, "
                f"but trace.json records dataset {name!r}"
            ),
            order="problem_id",
        )
