"""`trace diff A B`: paired per-problem comparison of two traces over the same problems, two grade sets of
one trace, or two replay result files.

Traces (or grade sets) are compared per model role on the solution that model writes alone from the root
(its chain); result files on the one router configuration each holds (or the one chosen). Every
(problem, world) walk with an outcome on both sides is a pair: both right, only A, only B or both wrong.
The test is McNemar's (exact below 25 discordant pairs) when there is one world, else a paired
permutation test with the problem as the unit (worlds of one problem share its difficulty); with several
worlds, McNemar's test is also given for each world alone.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from analysis.report_inputs import read_parquet_input
from analysis.stats import PairedTest, mcnemar, paired_problem_test
from replay.params import params_text
from tracestore.atomic import write_atomic
from tracestore.errors import TraceError
from tracestore.grades import graded_steps
from tracestore.outputs import check_output_file
from tracestore.schema import DEFAULT_GRADES, MANIFEST_FILE, model_char
from tracestore.store import Trace, open_trace

BOTH_RIGHT, ONLY_A, ONLY_B, BOTH_WRONG, EXCLUDED = "both right", "only A", "only B", "both wrong", "excluded"
OUTCOMES = (BOTH_RIGHT, ONLY_A, ONLY_B, BOTH_WRONG)
RESULT_COLUMNS = ("router", "params", "config", "problem_id", "world", "correct")
KEYS = ["problem_id", "world"]


@dataclass
class Comparison:
    """One paired comparison: the pairs, their counts per world, the test and the flipped walks."""

    label: str  # what is compared, e.g. "all-small chain"
    pairs: pl.DataFrame  # problem_id, world, a, b, outcome (EXCLUDED where a side has no outcome)
    by_world: pl.DataFrame  # world, both right, only A, only B, both wrong, excluded, test, p_value
    test: PairedTest

    @property
    def counts(self) -> dict[str, int]:
        return {outcome: int((self.pairs["outcome"] == outcome).sum()) for outcome in (*OUTCOMES, EXCLUDED)}

    def flipped(self, outcome: str) -> list[str]:
        """``problem_id/world`` of the walks with ``outcome`` (ONLY_A or ONLY_B), sorted."""
        rows = self.pairs.filter(pl.col("outcome") == outcome).sort(KEYS)
        return [f"{problem}/{world}" for problem, world in rows.select(KEYS).iter_rows()]


@dataclass
class DiffResult:
    a: str  # what A is, in words
    b: str
    comparisons: list[Comparison]


def run_diff(
    a: str | os.PathLike,
    b: str | os.PathLike,
    *,
    grades_a: str | None = None,
    grades_b: str | None = None,
    config_a: int | None = None,
    config_b: int | None = None,
    seed: int = 0,
) -> DiffResult:
    """Compare A and B (two traces or two result files); see the module doc. ``grades_*`` pick a trace's
    grade set, ``config_*`` a results file's configuration; ``seed`` seeds the permutation test."""
    a, b = Path(a), Path(b)
    kinds = _kind(a, "A"), _kind(b, "B")
    if kinds[0] != kinds[1]:
        raise TraceError(
            f"A ({a}) is a {kinds[0]} and B ({b}) a {kinds[1]}: diff compares two traces (or two grade sets of "
            "one) or two replay result files"
        )
    if kinds[0] == "trace":
        if config_a is not None or config_b is not None:
            raise TraceError("--config-a/--config-b choose a configuration of a results file, not of a trace")
        return _diff_traces(a, b, grades_a or DEFAULT_GRADES, grades_b or DEFAULT_GRADES, seed)
    if grades_a is not None or grades_b is not None:
        raise TraceError("--grades-a/--grades-b choose a trace's grade set; results files carry their grades")
    side_a, label_a = _results_outcomes(a, config_a, "A")
    side_b, label_b = _results_outcomes(b, config_b, "B")
    _check_same_walks(side_a, side_b, f"{a}", f"{b}")
    return DiffResult(
        f"{a} ({label_a})", f"{b} ({label_b})", [compare(side_a, side_b, f"{label_a} vs {label_b}", seed)]
    )


def _kind(path: Path, side: str) -> str:
    if path.is_dir():
        if not (path / MANIFEST_FILE).is_file():
            raise TraceError(f"{side} ({path}) is a folder without {MANIFEST_FILE}: not a trace")
        return "trace"
    if path.suffix == ".parquet":
        return "results file"
    if not path.exists():
        raise TraceError(f"{side} ({path}) does not exist")
    raise TraceError(f"{side} ({path}) is neither a trace directory nor a .parquet results file of trace replay")


def chain_outcomes(trace: Trace, grades: str) -> dict[str, pl.DataFrame]:
    """Per model role: problem_id, world, correct of the solution that model writes alone from the root,
    for every problem and world of the trace (correct null where that chain is not finished)."""
    steps = trace.scan("steps").select("step_id", "problem_id", "world", "path", "is_final", "answer", "correct")
    steps = graded_steps(trace, steps.collect(), grades)
    problems = trace.scan("problems").select("problem_id").collect()
    recorded = trace.manifest.worlds
    worlds = list(range(recorded)) if recorded is not None else sorted(steps["world"].unique().to_list()) or [0]
    keys = problems.join(pl.DataFrame({"world": worlds}, schema={"world": pl.Int32}), how="cross")
    outcomes = {}
    for role in trace.manifest.roles:
        chain = steps.filter(pl.col("is_final") & pl.col("path").str.contains(f"^{re.escape(model_char(role))}+$"))
        outcomes[role] = keys.join(chain.select(*KEYS, "correct"), on=KEYS, how="left").sort(KEYS)
    return outcomes


def _diff_traces(a: Path, b: Path, grades_a: str, grades_b: str, seed: int) -> DiffResult:
    trace_a, trace_b = open_trace(a), open_trace(b)
    if a.resolve() == b.resolve() and grades_a == grades_b:
        raise TraceError(
            f"A and B are grade set {grades_a!r} of the same trace; compare two traces, or two grade sets with "
            "--grades-a/--grades-b"
        )
    chains_a, chains_b = chain_outcomes(trace_a, grades_a), chain_outcomes(trace_b, grades_b)
    roles = [role for role in chains_a if role in chains_b]
    if not roles:
        raise TraceError(f"A ({a}) and B ({b}) have no model role in common")
    _check_same_walks(chains_a[roles[0]], chains_b[roles[0]], str(a), str(b))
    comparisons = [compare(chains_a[role], chains_b[role], f"all-{role} chain", seed) for role in roles]
    return DiffResult(f"{a} (grades {grades_a})", f"{b} (grades {grades_b})", comparisons)


def _results_outcomes(path: Path, config: int | None, side: str) -> tuple[pl.DataFrame, str]:
    frame = read_parquet_input(path, "results file")
    missing = [column for column in RESULT_COLUMNS if column not in frame.columns]
    if missing:
        raise TraceError(f"{path} is not a trace replay result: it lacks column(s) {', '.join(missing)}")
    if frame.schema["correct"] != pl.Boolean:
        raise TraceError(f"{path} is not a trace replay result: column correct holds {frame.schema['correct']}")
    configs = frame.select("router", "config", "params").unique().sort("router", "config")
    option = f"--config-{side.lower()}"
    if config is not None:
        frame = frame.filter(pl.col("config") == config)
        if frame.height == 0:
            raise TraceError(
                f"{path} has no configuration {config}; it has {_config_range(configs['config'].to_list())}"
            )
        configs = frame.select("router", "config", "params").unique()
    if configs.height > 1:
        raise TraceError(
            f"{path} holds {configs.height} router configurations ({_config_range(configs['config'].to_list())}); "
            f"choose one with {option}"
        )
    frame = frame.with_columns(pl.col("world").cast(pl.Int32))
    twice = frame.filter(pl.struct(KEYS).is_duplicated())
    if twice.height:
        raise TraceError(
            f"{path}: problem {twice['problem_id'][0]!r} world {twice['world'][0]} appears more than once in "
            f"configuration {configs['config'][0]}"
        )
    router, number, params = configs.row(0)
    try:
        shown = params_text({k: v for k, v in json.loads(params).items() if v not in ("", None)}, separator=" ")
    except (json.JSONDecodeError, AttributeError):
        raise TraceError(f"{path}: the params column is not a JSON object") from None
    label = f"{router} config {number}" + (f" ({shown})" if shown else "")
    return frame.select(*KEYS, "correct").sort(KEYS), label


def _config_range(numbers: list[int]) -> str:
    numbers = sorted(set(numbers))
    return f"config {numbers[0]}" if len(numbers) == 1 else f"configs {numbers[0]}..{numbers[-1]}"


def _check_same_walks(a: pl.DataFrame, b: pl.DataFrame, name_a: str, name_b: str) -> None:
    """Paired data needs the same (problem, world) walks on both sides."""
    for first, second, name_first, name_second in ((a, b, name_a, name_b), (b, a, name_b, name_a)):
        extra = first.select(KEYS).join(second.select(KEYS), on=KEYS, how="anti").sort(KEYS)
        if extra.height:
            problem, world = extra.row(0)
            raise TraceError(
                f"{name_first} has problem {problem!r} world {world}, which {name_second} lacks ({extra.height} "
                "such walk(s)): diff compares the same problems and worlds"
            )


def _outcome(a: pl.Expr, b: pl.Expr) -> pl.Expr:
    return (
        pl.when(a.is_null() | b.is_null())
        .then(pl.lit(EXCLUDED))
        .when(a & b)
        .then(pl.lit(BOTH_RIGHT))
        .when(a)
        .then(pl.lit(ONLY_A))
        .when(b)
        .then(pl.lit(ONLY_B))
        .otherwise(pl.lit(BOTH_WRONG))
    )


def compare(a: pl.DataFrame, b: pl.DataFrame, label: str, seed: int = 0) -> Comparison:
    """Pair ``a`` and ``b`` (problem_id, world, correct; null = no outcome) walk by walk and test them."""
    pairs = (
        a.select(*KEYS, pl.col("correct").alias("a"))
        .join(b.select(*KEYS, pl.col("correct").alias("b")), on=KEYS, how="inner")
        .sort(KEYS)
        .with_columns(outcome=_outcome(pl.col("a"), pl.col("b")))
    )
    paired = pairs.filter(pl.col("outcome") != EXCLUDED)
    if paired.height == 0:
        raise TraceError(f"{label}: no (problem, world) walk has an outcome on both sides")
    first, second = paired["a"].to_numpy(), paired["b"].to_numpy()
    worlds = sorted(paired["world"].unique().to_list())
    if len(worlds) == 1:
        test = mcnemar(first, second)
    else:
        test = paired_problem_test(first, second, paired["problem_id"].to_numpy(), seed=seed)
    rows = []
    for world in worlds:
        in_world = pairs.filter(pl.col("world") == world)
        done = in_world.filter(pl.col("outcome") != EXCLUDED)
        world_test = mcnemar(done["a"].to_numpy(), done["b"].to_numpy())
        rows.append(
            {
                "world": world,
                **{outcome: int((in_world["outcome"] == outcome).sum()) for outcome in (*OUTCOMES, EXCLUDED)},
                "test": world_test.test,
                "p_value": world_test.p_value,
            }
        )
    by_world = pl.DataFrame(
        rows,
        schema={"world": pl.Int32, **dict.fromkeys((*OUTCOMES, EXCLUDED), pl.Int64)}
        | {
            "test": pl.String,
            "p_value": pl.Float64,
        },
    )
    return Comparison(label=label, pairs=pairs, by_world=by_world, test=test)


def pairs_csv(result: DiffResult) -> pl.DataFrame:
    """Every pair of every comparison, for --out: comparison, problem_id, world, a_correct, b_correct, outcome."""
    return pl.concat(
        [
            c.pairs.select(
                pl.lit(c.label).alias("comparison"),
                *KEYS,
                pl.col("a").alias("a_correct"),
                pl.col("b").alias("b_correct"),
                "outcome",
            )
            for c in result.comparisons
        ]
    )


def check_out_path(out: str | os.PathLike, *, force: bool = False) -> Path:
    """``out`` if the pairs CSV may be written there (checked before the comparison runs)."""
    if Path(out).suffix != ".csv":
        raise TraceError(f"--out {out}: the file name must end in .csv")
    return check_output_file(out, force=force)


def write_pairs(result: DiffResult, out: str | os.PathLike, *, force: bool = False) -> int:
    """Write the pairs CSV atomically (an existing file is replaced only with ``force``); returns its rows."""
    out = check_out_path(out, force=force)
    frame = pairs_csv(result)
    write_atomic(out, lambda temp: frame.write_csv(temp))
    return frame.height
