"""`trace report`: one page comparing routers from `trace replay --out` results on the trace they came from.

The page (``index.html``, its Markdown twin ``report.md`` and PNG figures next to them) holds:
- the seeds' Table 1: each router at its operating point plus small-only and large-only, with
  accuracy, mean cost per query, A/C, share of large-model steps and misses, and 95% bootstrap
  intervals (problems resampled, the worlds of a problem kept together);
- an accuracy-cost plot (a curve per swept router, a point per single model or fixed router);
- McNemar's test of every router against large-only, paired on (problem, world);
- where escalations happen: the share of large-model steps by step index, from each walk's path;
- with ``policy_log``: coverage against 1 - alpha and kappa over policy training;
- with ``steer_gmm``: STEER's fitted mixtures over the histogram of the small model's confidences.

Operating point of a swept router (several configurations in one results file): among the
configurations without misses (all, if every one missed), those whose accuracy reaches the floor
(default: large-only's accuracy minus 2 points); of these the one the rule prefers (``ac``: highest
A/C; ``cheapest``: lowest cost; ``accuracy``: highest accuracy, floor ignored). If none reaches
the floor, the most accurate one, flagged. ``at`` pins a router's configuration instead. Ties go
to higher accuracy, then lower cost, then the earlier configuration. The report states the rule.

Every number comes from the results files and the trace; small-only and large-only, when no
results file holds them, are replayed here on the same problems, worlds and cost model. The same
inputs give the same bytes.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from markdown_it import MarkdownIt

from analysis import plots
from analysis.stats import bootstrap_counts, mcnemar, percentile_interval, ratio, resampled_ratio
from replay.costs import make_cost_model, manifest_models
from replay.engine import ReplayData, replay, summarize
from replay.errors import TraceError
from replay.routers import ROUTERS, make_router
from replay.routers.steer import SIGNAL as STEER_SIGNAL
from replay.routers.steer import STEER_FORMAT, STEER_VERSION
from replay.splits import SPLITS
from replay.store import SCHEMAS, manifest_roles, model_char, open_trace

GENERATOR = "trace report"
PAGE, MARKDOWN = "index.html", "report.md"
FIGURES = {"pareto": "pareto.png", "escalation": "escalation.png", "policy": "policy_training.png",
           "steer": "steer_mixtures.png"}
REPORT_FILES = (PAGE, MARKDOWN, *FIGURES.values())
# column -> what its type must be: "string", "integer", "float" or "boolean"
RESULT_COLUMNS = {"router": "string", "params": "string", "config": "integer", "problem_id": "string",
                  "world": "integer", "path": "string", "correct": "boolean", "cost": "float", "misses": "integer",
                  "cost_model": "string", "cost_unit": "string"}
BASELINES = ("small-only", "large-only")
PICK_RULES = ("ac", "cheapest", "accuracy")
DEFAULT_FLOOR = "large-0.02"
DEFAULT_ALPHA = 0.02  # the policy seed's alpha, when the training log does not record its own
MAX_MIXTURE_PANELS = 9
LEVEL = 0.95


@dataclass(frozen=True)
class ReportOptions:
    """How operating points are chosen and which optional sections are drawn (see the module doc)."""

    pick: str = "ac"                      # ac | cheapest | accuracy
    accuracy_floor: str = DEFAULT_FLOOR   # large, large-D, or an accuracy in [0, 1]
    at: tuple[str, ...] = ()              # pinned configurations: ROUTER:name=value[,name=value]
    split: str | None = None              # report only rows of this split (default: every row)
    pick_split: str | None = None         # choose operating points on rows of this split (default: reported rows)
    bootstrap: int = 1000                 # bootstrap resamples
    seed: int = 0                         # bootstrap seed
    policy_log: Path | None = None
    steer_gmm: Path | None = None
    alpha: float | None = None            # policy coverage target 1 - alpha (default: the log's alpha column, else 0.02)


@dataclass
class Run:
    """One router's outcomes from one results file (every configuration), and its chosen configuration."""

    router: str
    source: str
    outcomes: pl.DataFrame
    params: dict[int, dict]
    label: str = ""
    chosen: int = 0
    how: str = ""                 # how the configuration was chosen, for the table's notes
    below_floor: bool = False
    rows: pl.DataFrame | None = field(default=None, repr=False)       # reported rows (all configurations)
    pick_rows: pl.DataFrame | None = field(default=None, repr=False)  # rows the operating point is chosen on

    @property
    def swept(self) -> bool:
        return len(self.params) > 1

    def at_chosen(self) -> pl.DataFrame:
        return self.rows.filter(pl.col("config") == self.chosen)

    def point_params(self) -> dict:
        """The chosen configuration's decision parameters (sweepable ones, or the ones this file swept)."""
        params = self.params[self.chosen]
        names = ROUTERS[self.router].sweepable if self.router in ROUTERS else ()
        names = [name for name in names if name in params] or varying_params(self.params)
        return {name: params[name] for name in names}


@dataclass
class Report:
    markdown: str
    figures: dict[str, bytes]  # file name -> PNG

    def files(self) -> dict[str, bytes]:
        return {MARKDOWN: self.markdown.encode(), PAGE: render_html(self.markdown).encode(), **self.figures}


# ---------------------------------------------------------------------- inputs


def read_parquet_input(path: Path, what: str) -> pl.DataFrame:
    """Read one input Parquet file, or say in one sentence why it cannot be read."""
    if not path.is_file():
        raise TraceError(f"{what} {path} does not exist")
    try:
        return pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as error:
        raise TraceError(f"{what} {path} is not a readable Parquet file ({str(error).splitlines()[0]})") from None


def read_results(path: Path, roles: list[str]) -> pl.DataFrame:
    """A `trace replay --out` file, checked for the columns the report reads."""
    frame = read_parquet_input(path, "results file")
    missing = [column for column in RESULT_COLUMNS if column not in frame.columns]
    if missing:
        raise TraceError(f"{path} is not a trace replay result: it lacks column(s) {', '.join(missing)}")
    lacking = [f"n_{role}" for role in roles if f"n_{role}" not in frame.columns]
    if lacking:
        raise TraceError(f"{path} was not replayed on a trace with models {', '.join(roles)}: it lacks "
                         f"column(s) {', '.join(lacking)}")
    expected = {**RESULT_COLUMNS, **{f"n_{role}": "integer" for role in roles}}
    for column, kind in expected.items():
        dtype = frame.schema[column]
        if not {"string": dtype == pl.String, "integer": dtype.is_integer(), "float": dtype.is_float(),
                "boolean": dtype == pl.Boolean}[kind]:
            raise TraceError(f"{path} is not a trace replay result: column {column} holds {dtype}, not {kind}s")
    if frame.height == 0:
        raise TraceError(f"results file {path} holds no outcomes")
    return frame.with_columns(pl.col("world").cast(pl.Int32), pl.col("config").cast(pl.Int32))


def check_against_trace(frame: pl.DataFrame, path: Path, trace_dir, problem_ids: pl.Series,
                        worlds: list[int], finals: pl.DataFrame) -> None:
    """Every problem and world of the results is in the trace, and every finished walk ends at a final
    step the trace holds, graded the same."""
    unknown = frame.filter(~pl.col("problem_id").is_in(problem_ids.implode()))
    if unknown.height:
        raise TraceError(f"{path}: problem {unknown['problem_id'][0]!r} is not in trace {trace_dir} "
                         "(results from a different trace?)")
    other_worlds = sorted(set(frame["world"].unique().to_list()) - set(worlds))
    if other_worlds:
        raise TraceError(f"{path}: world {other_worlds[0]} is not in trace {trace_dir} (results from a different trace?)")
    finished = frame.filter(pl.col("misses") == 0).select("problem_id", "world", "path", "correct")
    matched = finished.join(finals, on=["problem_id", "world", "path"], how="left")
    wrong = matched.filter(pl.col("in_trace").is_null() | pl.col("correct").ne_missing(pl.col("trace_correct")))
    if wrong.height:
        row = wrong.row(0, named=True)
        raise TraceError(f"{path}: problem {row['problem_id']!r} world {row['world']} ends at node {row['path']!r}, "
                         f"which trace {trace_dir} does not hold as a final step graded {row['correct']} "
                         "(results from a different trace?)")


def varying_params(params: dict[int, dict]) -> list[str]:
    """Names of the parameters whose values differ between configurations, in name order."""
    names = sorted({name for config in params.values() for name in config})
    return [name for name in names if len({json.dumps(config.get(name)) for config in params.values()}) > 1]


def split_runs(frame: pl.DataFrame, source: str) -> list[Run]:
    runs = []
    for router in frame["router"].unique(maintain_order=True).to_list():
        outcomes = frame.filter(pl.col("router") == router)
        configs = outcomes.select("config", "params").unique().sort("config")
        if configs["config"].n_unique() != configs.height:
            raise TraceError(f"{source}: configuration numbers of router {router} map to more than one params value")
        try:
            params = {config: json.loads(text) for config, text in configs.iter_rows()}
        except json.JSONDecodeError:
            raise TraceError(f"{source}: the params column of router {router} is not JSON") from None
        runs.append(Run(router=router, source=source, outcomes=outcomes, params=params))
    return runs


def check_same_walks(runs: list[Run]) -> pl.DataFrame:
    """The (problem, world) pairs every configuration of every run covers; TraceError if they differ."""
    reference = runs[0].outcomes.select("problem_id", "world").unique().sort("problem_id", "world")
    for run in runs:
        per_config = run.outcomes.group_by("config").agg(n=pl.len(), pairs=pl.struct("problem_id", "world").n_unique())
        pairs = run.outcomes.select("problem_id", "world").unique()
        same = pairs.height == reference.height and pairs.join(reference, on=["problem_id", "world"], how="anti").height == 0
        if not same or (per_config["n"] != reference.height).any() or (per_config["pairs"] != reference.height).any():
            raise TraceError(f"{run.source} ({run.router}) does not cover the same {reference.height} (problem, world) "
                             f"walks per configuration as {runs[0].source}: replay every router on the same split and worlds")
    return reference


def replay_baseline(name: str, trace, walks: pl.DataFrame, cost_model: str) -> Run:
    """small-only or large-only replayed here on exactly ``walks``, priced like the results."""
    if cost_model == "api":
        raise TraceError(f"the results use the api cost model, whose prices they do not record: replay {name} "
                         "with the same --price options and pass its results file too")
    data = ReplayData.from_trace(trace)
    data = ReplayData(data.manifest, data.steps, data.problems, scores=data.scores, hidden=data.hidden,
                      worlds=sorted(walks["world"].unique().to_list())).subset(walks["problem_id"].unique().to_list())
    router = make_router(name).fit(data)
    outcomes = replay(data, router, make_cost_model(cost_model, trace.manifest)).outcomes
    outcomes = outcomes.join(walks, on=["problem_id", "world"], how="semi", maintain_order="left")
    return Run(router=name, source="replayed from the trace", outcomes=outcomes,
               params={0: json.loads(outcomes["params"][0])})


def label_runs(runs: list[Run]) -> None:
    """Router name, plus the fixed parameters that tell apart runs of one router, plus the file if still needed."""
    for run in runs:
        same = [other for other in runs if other.router == run.router]
        fixed = {name: value for name, value in run.params[min(run.params)].items()
                 if name not in varying_params(run.params)}
        telling = [name for name in sorted(fixed)
                   if len({json.dumps(other.params[min(other.params)].get(name)) for other in same}) > 1]
        run.label = run.router + (" (" + ", ".join(f"{n}={fixed[n]}" for n in telling) + ")" if telling else "")
    for run in runs:
        if sum(other.label == run.label for other in runs) > 1:
            run.label += f" [{Path(run.source).name}]"


def select_splits(runs: list[Run], options: ReportOptions) -> None:
    """Set each run's reported rows and the rows its operating point is chosen on."""
    for chosen in (options.split, options.pick_split):
        if chosen is not None and chosen not in SPLITS:
            raise TraceError(f"unknown split {chosen!r}; choose one of {', '.join(SPLITS)}")
    splits = None
    if options.split or options.pick_split:
        with_split = [run for run in runs if "split" in run.outcomes.columns]
        if not with_split:
            raise TraceError("--split and --pick-split need results with a split column (from trace replay)")
        splits = pl.concat([run.outcomes.select("problem_id", "split") for run in with_split]).unique()
        if splits["problem_id"].n_unique() != splits.height:
            raise TraceError("the results assign some problem to different splits: replay them with the same "
                             "--split-seed and --split-fractions")

    def rows_of(run: Run, split: str | None) -> pl.DataFrame:
        if split is None:
            return run.outcomes
        ids = splits.filter(pl.col("split") == split)["problem_id"]
        rows = run.outcomes.filter(pl.col("problem_id").is_in(ids.implode()))
        if rows.height == 0:
            raise TraceError(f"the results hold no problems of split {split!r}: replay with --split {split} or all")
        return rows

    for run in runs:
        run.rows = rows_of(run, options.split)
        run.pick_rows = rows_of(run, options.pick_split) if options.pick_split else run.rows


# ---------------------------------------------------------------------- operating points


def parse_floor(text: str, large_accuracy: float | None) -> tuple[float, str]:
    """(accuracy floor, its description) from ``large``, ``large-D`` or a number in [0, 1]."""
    text = text.strip()
    try:
        if text.startswith("large"):
            rest = text[len("large"):].strip()
            drop = float(rest[1:]) if rest.startswith("-") else 0.0
            if rest and not rest.startswith("-"):
                raise ValueError
            if large_accuracy is None:
                raise TraceError("--accuracy-floor relative to large-only needs large-only outcomes without misses")
            return large_accuracy - drop, f"large-only accuracy {_pct(large_accuracy)}" + (
                f" minus {100 * drop:g} points" if drop else "")
        floor = float(text)
        if not 0 <= floor <= 1:
            raise ValueError
        return floor, f"{_pct(floor)} accuracy"
    except ValueError:
        raise TraceError(f"--accuracy-floor must be large, large-D (e.g. large-0.02) or an accuracy in [0, 1], "
                         f"got {text!r}") from None


def parse_pin(text: str) -> tuple[str, dict[str, str]]:
    """``steer:tau=0.3,mode=step`` -> ("steer", {"tau": "0.3", "mode": "step"})."""
    label, sep, assignments = text.rpartition(":")
    pairs = [part.partition("=") for part in assignments.split(",")] if sep else []
    if not sep or not label or not pairs or any(not eq or not name for name, eq, _ in pairs):
        raise TraceError(f"--at must look like ROUTER:name=value[,name=value], got {text!r}")
    return label.strip(), {name.strip(): value.strip() for name, _, value in pairs}


def _matches(value, wanted: str) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return abs(float(value) - float(wanted)) <= 1e-9 * max(1.0, abs(float(value)))
        except ValueError:
            return False
    return str(value).lower() == wanted.lower() if isinstance(value, bool) else str(value) == wanted


def pin(run: Run, wanted: dict[str, str], text: str) -> None:
    unknown = [name for name in wanted if name not in run.params[min(run.params)]]
    if unknown:
        raise TraceError(f"--at {text}: router {run.label} has no parameter {unknown[0]}")
    hits = [config for config, params in run.params.items()
            if all(_matches(params[name], value) for name, value in wanted.items())]
    if len(hits) != 1:
        shown = ", ".join(sorted({str(params[name]) for params in run.params.values() for name in wanted}))
        raise TraceError(f"--at {text}: {len(hits)} configurations of {run.label} match (values there: {shown})")
    run.chosen = hits[0]
    run.how = f"pinned with --at {text}"


def choose_operating_point(run: Run, rule: str, floor: float, roles: list[str]) -> None:
    summary = summarize(run.pick_rows, roles).filter(pl.col("accuracy").is_not_null())
    if summary.height == 0:
        raise TraceError(f"{run.source}: every walk of router {run.label} missed; it has no accuracy to report")
    candidates = summary.filter(pl.col("misses") == 0)
    eligible = f"{candidates.height} of {len(run.params)} configurations without misses"
    if candidates.height == 0:
        candidates, eligible = summary, f"every one of {len(run.params)} configurations missed some walks"
    by_accuracy = candidates.sort(["accuracy", "cost", "config"], descending=[True, False, False])
    meeting = candidates.filter(pl.col("accuracy") >= floor - 1e-12)
    if rule == "accuracy":
        best, how = by_accuracy, "highest accuracy"
    elif meeting.height == 0:
        best, how = by_accuracy, "no configuration reaches the floor: highest accuracy"
        run.below_floor = True
    elif rule == "ac":
        best, how = meeting.sort(["a_over_c", "accuracy", "cost", "config"], descending=[True, True, False, False]), \
            "highest A/C at or above the floor"
    else:
        best, how = meeting.sort(["cost", "accuracy", "config"], descending=[False, True, False]), \
            "cheapest at or above the floor"
    run.chosen = int(best["config"][0])
    run.how = f"{how}; {eligible}"


# ---------------------------------------------------------------------- numbers


@dataclass(frozen=True)
class Estimate:
    value: float | None
    interval: tuple[float, float] | None


@dataclass(frozen=True)
class Row:
    run: Run
    accuracy: Estimate
    cost: Estimate
    a_over_c: Estimate
    large_share: Estimate
    misses: int
    walks: int


def per_problem_sums(rows: pl.DataFrame, problems: list[str], roles: list[str]) -> dict[str, np.ndarray]:
    """Sums over the worlds of each problem (in ``problems`` order) of what the table's ratios need."""
    done = pl.col("misses") == 0
    sums = rows.group_by("problem_id").agg(
        correct=(pl.col("correct").fill_null(False) & done).sum(),
        finished=done.sum(),
        cost=pl.col("cost").filter(done).sum(),
        large=pl.col(f"n_{roles[-1]}").filter(done).sum(),
        steps=pl.sum_horizontal(pl.col(f"n_{role}") for role in roles).filter(done).sum(),
    )
    aligned = pl.DataFrame({"problem_id": problems}).join(sums, on="problem_id", how="left", maintain_order="left")
    return {name: aligned[name].fill_null(0).cast(pl.Float64).to_numpy() for name in aligned.columns[1:]}


def table_row(run: Run, problems: list[str], counts: np.ndarray, roles: list[str]) -> Row:
    rows = run.at_chosen()
    sums = per_problem_sums(rows, problems, roles)

    def estimate(numerator: str, denominator: str) -> tuple[Estimate, np.ndarray]:
        value = float(ratio(sums[numerator].sum(), sums[denominator].sum()))
        samples = resampled_ratio(counts, sums[numerator], sums[denominator])
        return Estimate(None if np.isnan(value) else value, percentile_interval(samples, LEVEL)), samples

    accuracy, accuracy_samples = estimate("correct", "finished")
    cost, cost_samples = estimate("cost", "finished")
    a_over_c = Estimate(accuracy.value / cost.value if accuracy.value is not None and cost.value else None,
                        percentile_interval(ratio(accuracy_samples, cost_samples), LEVEL))
    large_share, _ = estimate("large", "steps")
    return Row(run, accuracy, cost, a_over_c, large_share, int(rows["misses"].sum()), rows.height)


def escalation_by_depth(rows: pl.DataFrame, large_char: str) -> pl.DataFrame:
    """Per step index of the finished walks: walks with a step there, and the share the large model wrote.
    A walk's path spells who wrote each kept step, so the index of a path character is its step index."""
    chars = (rows.filter(pl.col("misses") == 0)
             .select(char=pl.col("path").str.split(""))
             .with_columns(depth=pl.int_ranges(pl.col("char").list.len()))
             .explode("char", "depth"))
    return (chars.group_by("depth").agg(walks=pl.len(), large=(pl.col("char") == large_char).sum())
            .with_columns(share=pl.col("large") / pl.col("walks")).sort("depth"))


def first_escalation(rows: pl.DataFrame, large_char: str) -> dict:
    finished = rows.filter(pl.col("misses") == 0)
    first = finished["path"].str.find(large_char, literal=True).drop_nulls()
    return {"walks": finished.height, "escalated": first.len(),
            "median": None if first.len() == 0 else float(first.median())}


# ---------------------------------------------------------------------- optional inputs


def read_policy_log(path: Path, alpha: float | None) -> tuple[pl.DataFrame, float, str]:
    """(log with step, coverage, kappa; alpha; where alpha came from) from a training log Parquet."""
    log = read_parquet_input(path, "policy log")
    missing = [column for column in ("step", "coverage", "kappa") if column not in log.columns]
    if missing:
        raise TraceError(f"{path} is not a policy training log: it lacks column(s) {', '.join(missing)}")
    log = log.select("step", "coverage", "kappa", *(["alpha"] if "alpha" in log.columns else [])).drop_nulls(
        ["step", "coverage", "kappa"]).sort("step")
    if log.height == 0:
        raise TraceError(f"policy log {path} has no rows with step, coverage and kappa")
    if alpha is not None:
        return log, alpha, "given with --alpha"
    if "alpha" in log.columns and log["alpha"].drop_nulls().len():
        values = log["alpha"].drop_nulls().unique()
        if values.len() > 1:
            raise TraceError(f"policy log {path}: column alpha changes during training; pass --alpha")
        return log, float(values[0]), "from the log"
    return log, DEFAULT_ALPHA, "the policy seed's default; the log has no alpha column"


def read_steer_mixtures(path: Path) -> tuple[str, list[plots.Mixture], list[str] | None]:
    """(signal, mixtures by step index, train problem ids if recorded) from a `trace train steer` file
    (format ``trace-steer``, see replay.routers.steer)."""
    if not path.is_file():
        raise TraceError(f"STEER mixture file {path} does not exist")
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TraceError(f"STEER mixture file {path} is not JSON ({error})") from None
    if not isinstance(saved, dict) or saved.get("format") != STEER_FORMAT:
        raise TraceError(f"{path} is not a STEER mixture file (no format {STEER_FORMAT!r}; write one with trace train steer)")
    if saved.get("version") != STEER_VERSION:
        raise TraceError(f"{path} has STEER mixture version {saved.get('version')!r}; this report reads {STEER_VERSION}")
    signal = saved.get("signal", STEER_SIGNAL)
    if signal not in SCHEMAS["steps"].names:
        raise TraceError(f"{path}: signal {signal!r} is not a column of the steps table")
    mixtures = []
    for number, entry in enumerate(saved.get("mixtures") or []):
        try:
            depth, low = int(entry["depth"]), int(entry["low_component"])
            weights, means, variances = (np.asarray(entry[key], dtype=np.float64) for key in ("weights", "means", "variances"))
            if not (weights.shape == means.shape == variances.shape == (2,)) or (variances <= 0).any() \
                    or low not in (0, 1) or not np.isfinite(np.concatenate([weights, means, variances])).all():
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise TraceError(f"{path}: mixture {number} needs depth, low_component (0 or 1) and two weights, means "
                             "and positive variances") from None
        mixtures.append(plots.Mixture(depth, weights, means, variances, low))
    if not mixtures:
        raise TraceError(f"{path} holds no mixtures")
    train_ids = saved.get("train_problem_ids")
    return signal, sorted(mixtures, key=lambda mixture: mixture.depth), train_ids if isinstance(train_ids, list) else None


# ---------------------------------------------------------------------- Markdown


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _with_interval(estimate: Estimate, fmt) -> str:
    if estimate.value is None:
        return "-"
    if estimate.interval is None:
        return fmt(estimate.value)
    low, high = estimate.interval
    return f"{fmt(estimate.value)} [{fmt(low)}, {fmt(high)}]"


def _pct_bare(value: float) -> str:
    return f"{100 * value:.1f}"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(headers: list[str], rows: list[list], right: set[int] = frozenset()) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) or "-"


def render_html(markdown: str) -> str:
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    title = html.escape(markdown.splitlines()[0].lstrip("# ").strip())
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="{GENERATOR}">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; }}
th {{ background: #f2f2f2; }}
img {{ max-width: 100%; }}
code {{ background: #f4f4f4; padding: 0 0.2em; }}
</style>
</head>
<body>
{body}</body>
</html>
"""


# ---------------------------------------------------------------------- the report


def build_report(trace_dir, result_paths: list[Path], options: ReportOptions) -> Report:
    """Read, check and compare; everything in memory (nothing is written here)."""
    if not result_paths:
        raise TraceError("give at least one results file from trace replay --out")
    if options.pick not in PICK_RULES:
        raise TraceError(f"--pick must be one of {', '.join(PICK_RULES)}, got {options.pick!r}")
    if options.bootstrap < 1:
        raise TraceError(f"--bootstrap must be at least 1, got {options.bootstrap}")
    pins = [(text, *parse_pin(text)) for text in options.at]
    policy_log = read_policy_log(options.policy_log, options.alpha) if options.policy_log is not None else None
    steer_mixtures = read_steer_mixtures(options.steer_gmm) if options.steer_gmm is not None else None
    trace = open_trace(trace_dir)
    roles = manifest_roles(trace.manifest)
    problem_ids = trace.scan("problems").select("problem_id").collect()["problem_id"]
    steps = trace.scan("steps").select("problem_id", "world", "path", "model", "depth", "is_final", "correct").collect()
    worlds = sorted(steps["world"].unique().to_list())
    finals = steps.filter(pl.col("is_final")).select("problem_id", "world", "path", trace_correct="correct",
                                                     in_trace=pl.lit(True))
    runs: list[Run] = []
    for path in result_paths:
        frame = read_results(path, roles)
        check_against_trace(frame, path, trace_dir, problem_ids, worlds, finals)
        runs += split_runs(frame, str(path))
    cost_models = sorted({pair for run in runs for pair in run.outcomes.select("cost_model", "cost_unit").unique().rows()})
    if len(cost_models) > 1:
        raise TraceError("the results use different cost models (" + ", ".join(f"{m} in {u}" for m, u in cost_models)
                         + "): replay every router with the same --cost")
    cost_model, cost_unit = cost_models[0]
    walks = check_same_walks(runs)
    baselines = {}
    for name in BASELINES:
        given = [run for run in runs if run.router == name]
        if len(given) > 1:
            raise TraceError(f"{name} appears in {given[0].source} and {given[1].source}; pass it once")
        baselines[name] = given[0] if given else replay_baseline(name, trace, walks, cost_model)
    routers = [run for run in runs if run.router not in BASELINES]
    everyone = [baselines["small-only"], baselines["large-only"], *routers]
    select_splits(everyone, options)
    for run in everyone:
        if run.swept and run.router in BASELINES:
            raise TraceError(f"{run.source}: {run.router} has {len(run.params)} configurations; expected one")
    label_runs(everyone)

    large_summary = summarize(baselines["large-only"].pick_rows, roles)
    large_accuracy = large_summary["accuracy"][0] if large_summary["misses"][0] == 0 else None
    needs_floor = options.pick != "accuracy" and any(run.swept for run in routers)
    floor, floor_text = parse_floor(options.accuracy_floor, large_accuracy) if needs_floor else (0.0, "none")
    pinned = set()
    for text, label, wanted in pins:
        matching = [run for run in routers if run.label == label] or [run for run in routers if run.router == label]
        if len(matching) != 1:
            known = ", ".join(run.label for run in routers) or "none"
            raise TraceError(f"--at {label}:...: {'no' if not matching else 'more than one'} router is called "
                             f"{label!r}; routers: {known}")
        pin(matching[0], wanted, text)
        pinned.add(id(matching[0]))
    for run in everyone:
        if id(run) in pinned:
            continue
        if run.swept:
            choose_operating_point(run, options.pick, floor, roles)
        else:
            run.chosen = min(run.params)
            run.how = "its only configuration"

    problems = sorted(everyone[0].rows["problem_id"].unique().to_list())
    counts = bootstrap_counts(len(problems), options.bootstrap, options.seed)
    table = [table_row(run, problems, counts, roles) for run in everyone]
    figures: dict[str, bytes] = {}
    sections = [
        _header(trace_dir, trace.manifest, roles, result_paths, everyone, problems, cost_model, cost_unit, options),
        _main_table(table, cost_unit, options, floor_text, any(run.swept for run in routers)),
        _pareto_section(everyone, roles, cost_unit, figures),
        _mcnemar_section(everyone, baselines["large-only"]),
        _escalation_section(routers, roles, figures),
    ]
    if policy_log is not None:
        sections.append(_policy_section(options.policy_log, *policy_log, figures))
    if steer_mixtures is not None:
        sections.append(_steer_section(options.steer_gmm, *steer_mixtures, trace, figures))
    return Report("\n\n".join(sections) + "\n", figures)


def _header(trace_dir, manifest, roles, result_paths, runs, problems, cost_model, cost_unit, options) -> str:
    models = manifest_models(manifest)

    def describe(role: str) -> str:
        n_params = models[role].get("n_params")
        size = f" ({int(n_params):,} parameters)" if isinstance(n_params, (int, float)) and n_params else ""
        return f"{role}: {models[role].get('name', '?')}{size}"

    model_text = "; ".join(describe(role) for role in roles)
    dataset = manifest.get("dataset", {})
    dataset_name = dataset.get("name", "?") if isinstance(dataset, dict) else dataset
    n_walks = runs[0].at_chosen().height
    split_text = f"split {options.split}" if options.split else "every row of the results"
    lines = [
        f"# Routing report: {Path(trace_dir).name}",
        "",
        f"- Trace: `{trace_dir}` (dataset {dataset_name}; models {model_text})",
        f"- Evaluated on {split_text}: {len(problems):,} problems, {n_walks:,} (problem, world) walks per router",
        f"- Cost model: {cost_model}, mean cost per query in {cost_unit}",
        "- Results: " + ", ".join(f"`{Path(path).name}`" for path in result_paths),
    ]
    return "\n".join(lines)


def _main_table(table: list[Row], cost_unit: str, options: ReportOptions, floor_text: str, swept: bool) -> str:
    headers = ["Router", "Operating point", "Acc (%) ↑", f"Cost ({cost_unit}) ↓", "A/C ↑", "Large steps (%)", "Misses"]
    rows = []
    for row in table:
        flag = " †" if row.run.below_floor else ""
        rows.append([
            row.run.label + flag,
            _params_text(row.run.point_params()),
            _with_interval(row.accuracy, _pct_bare),
            _with_interval(row.cost, _num),
            _with_interval(row.a_over_c, _num),
            _with_interval(row.large_share, _pct_bare),
            f"{row.misses} of {row.walks}" if row.misses else "0",
        ])
    rule = {"ac": "the highest accuracy per cost (A/C)", "cheapest": "the lowest cost",
            "accuracy": "the highest accuracy"}[options.pick]
    pick_rows = f"rows of split {options.pick_split}" if options.pick_split else "the reported rows"
    floor_clause = "" if options.pick == "accuracy" else f"those with accuracy at least the floor ({floor_text}), then "
    notes = [
        "## Routers at their operating points",
        "",
        md_table(headers, rows, right={2, 3, 4, 5, 6}),
        "",
        f"Accuracy and cost are over the walks that finished; A/C is accuracy (0-1) per {cost_unit}; large steps "
        "is the share of kept steps written by the large model. Brackets: 95% percentile bootstrap intervals, "
        f"{options.bootstrap:,} resamples of the problems (the worlds of a problem stay together), seed {options.seed}.",
        "",
        (f"**Operating point rule.** A router replayed over a sweep is shown at one configuration, chosen on "
         f"{pick_rows}: among configurations without misses, {floor_clause}{rule}; ties go to higher accuracy, "
         "lower cost, earlier configuration; `--at` pins one instead."
         + (" † no configuration reached the floor; the most accurate one is shown." if any(
             r.run.below_floor for r in table) else "")) if swept else
        "**Operating point rule.** Every router has a single configuration; each is shown at it.",
        "",
    ]
    notes += [f"- {row.run.label}: {row.run.how} ({Path(row.run.source).name})" for row in table]
    return "\n".join(notes)


def _pareto_section(runs: list[Run], roles: list[str], cost_unit: str, figures: dict[str, bytes]) -> str:
    curves, points = [], []
    for run in runs:
        summary = summarize(run.rows, roles).filter(pl.col("accuracy").is_not_null() & pl.col("cost").is_not_null())
        if run.swept:
            if summary.height == 0:
                continue
            configs = summary["config"].to_list()
            chosen = configs.index(run.chosen) if run.chosen in configs else 0
            curves.append(plots.Curve(run.label, summary["cost"].to_numpy(), summary["accuracy"].to_numpy(),
                                      (summary["misses"] > 0).to_numpy(), chosen))
        else:
            chosen = summary.filter(pl.col("config") == run.chosen)
            if chosen.height:
                kind = {"small-only": "small", "large-only": "large"}.get(run.router, "router")
                points.append(plots.Point(run.label, float(chosen["cost"][0]), float(chosen["accuracy"][0]), kind))
    figures[FIGURES["pareto"]] = plots.pareto_png(curves, points, cost_unit)
    swept = [f"{curve.label} ({len(curve.cost)} configurations)" for curve in curves]
    return "\n".join([
        "## Accuracy against cost",
        "",
        f"![Accuracy against mean cost per query]({FIGURES['pareto']})",
        "",
        "One line per swept router (" + (", ".join(swept) if swept else "none") + "), its chosen operating point "
        "circled; configurations where some walk missed are hollow and not joined (their accuracy and cost cover "
        "only the walks that finished). One marker per single model or fixed-configuration router.",
    ])


def _mcnemar_section(runs: list[Run], large: Run) -> str:
    reference = large.at_chosen().select("problem_id", "world", large_correct="correct", large_misses="misses")
    rows = []
    for run in runs:
        if run is large:
            continue
        paired = (run.at_chosen().join(reference, on=["problem_id", "world"], how="inner")
                  .filter((pl.col("misses") == 0) & (pl.col("large_misses") == 0)))
        test = mcnemar(paired["correct"].to_numpy(), paired["large_correct"].to_numpy())
        rows.append([run.label, test.n_pairs, test.only_first, test.only_second, test.test,
                     f"{test.statistic:.4g}", f"{test.p_value:.4g}", "yes" if test.p_value < 0.05 else "no"])
    return "\n".join([
        "## Significance against large-only (McNemar)",
        "",
        md_table(["Router", "Pairs", "Router right, large wrong", "Router wrong, large right", "Test", "Statistic",
                  "p-value", "p < 0.05"], rows, right={1, 2, 3, 5, 6}),
        "",
        "Paired on (problem, world) at each router's operating point; pairs where either walk missed are left out. "
        "Exact two-sided binomial test when the discordant pairs number fewer than 25 (statistic: the smaller "
        "discordant count), else chi-square with continuity correction, 1 degree of freedom.",
    ])


def _escalation_section(routers: list[Run], roles: list[str], figures: dict[str, bytes]) -> str:
    title = "## Where escalations happen"
    if not routers:
        return f"{title}\n\nNo router besides the single models was given."
    large_char = model_char(roles[-1])
    by_depth = {run.label: escalation_by_depth(run.at_chosen(), large_char) for run in routers}
    figures[FIGURES["escalation"]] = plots.escalation_png(
        {label: (frame["depth"].to_numpy(), frame["share"].to_numpy()) for label, frame in by_depth.items()}, roles[-1])
    depths = sorted({depth for frame in by_depth.values() for depth in frame["depth"].to_list()})
    depth_rows = []
    for depth in depths:
        cells = [depth]
        for frame in by_depth.values():
            at = frame.filter(pl.col("depth") == depth)
            cells.append(f"{_pct(at['share'][0])} of {at['walks'][0]}" if at.height else "-")
        depth_rows.append(cells)
    first_rows = []
    for run in routers:
        first = first_escalation(run.at_chosen(), large_char)
        share = first["escalated"] / first["walks"] if first["walks"] else None
        first_rows.append([run.label, first["walks"], f"{first['escalated']} ({_pct(share)})",
                           "-" if first["median"] is None else f"{first['median']:g}"])
    return "\n".join([
        title,
        "",
        f"![Share of {roles[-1]}-model steps by step index]({FIGURES['escalation']})",
        "",
        f"Share of the steps at each step index (0 = first step) that the {roles[-1]} model wrote, over the finished "
        "walks at each router's operating point (read from each walk's path; discarded drafts are not steps).",
        "",
        md_table(["Step index", *by_depth], depth_rows, right=set(range(len(by_depth) + 1))),
        "",
        md_table(["Router", "Finished walks", f"Walks with a {roles[-1]} step", "Median first index"], first_rows,
                 right={1, 2, 3}),
    ])


def _policy_section(path: Path, log: pl.DataFrame, alpha: float, alpha_source: str, figures: dict[str, bytes]) -> str:
    figures[FIGURES["policy"]] = plots.policy_training_png(log["step"].to_numpy(), log["coverage"].to_numpy(),
                                                           log["kappa"].to_numpy(), alpha)
    tail = log.tail(max(1, log.height // 10))
    return "\n".join([
        "## Policy training",
        "",
        f"![Coverage and kappa over training]({FIGURES['policy']})",
        "",
        f"From `{path.name}`: {log.height:,} logged updates, steps {log['step'][0]}-{log['step'][-1]}. Target coverage "
        f"1 - alpha = {1 - alpha:g} (alpha {alpha:g}, {alpha_source}). Over the last {tail.height:,} logged updates: "
        f"mean coverage {tail['coverage'].mean():.4f}, mean kappa {tail['kappa'].mean():.4f}; final kappa "
        f"{log['kappa'][-1]:.4f}.",
    ])


def _steer_section(path: Path, signal: str, mixtures: list[plots.Mixture], train_ids: list[str] | None, trace,
                   figures: dict[str, bytes]) -> str:
    small = manifest_roles(trace.manifest)[0]
    steps = trace.scan("steps").filter((pl.col("model") == small) & pl.col(signal).is_not_null())
    if train_ids is not None:
        steps = steps.filter(pl.col("problem_id").is_in(pl.Series(train_ids, dtype=pl.String).implode()))
    values = steps.select("depth", signal).collect()
    shown = mixtures[:MAX_MIXTURE_PANELS]
    confidences = {mixture.depth: values.filter(pl.col("depth") == mixture.depth)[signal].cast(pl.Float64).to_numpy()
                   for mixture in shown}
    figures[FIGURES["steer"]] = plots.steer_mixtures_png(shown, confidences, signal)
    high = [1 - m.low for m in shown]
    rows = [[m.depth, confidences[m.depth].size, f"{m.means[m.low]:.4g}", f"{np.sqrt(m.variances[m.low]):.4g}",
             f"{m.weights[m.low]:.3f}", f"{m.means[h]:.4g}", f"{np.sqrt(m.variances[h]):.4g}"] for m, h in zip(shown, high)]
    omitted = f" Step indices after {shown[-1].depth} ({len(mixtures) - len(shown)} more) are not drawn." \
        if len(mixtures) > len(shown) else ""
    over = (f"the {len(train_ids):,} train problems the file lists (what the mixtures were fitted on)"
            if train_ids is not None else "every problem of the trace")
    return "\n".join([
        "## STEER confidence mixtures",
        "",
        f"![STEER mixtures over the small model's confidences]({FIGURES['steer']})",
        "",
        f"Mixtures from `{path.name}` over the histogram of `{signal}` of the {small}-model steps of {over}. Red: the "
        f"low-confidence component, whose posterior STEER compares with tau.{omitted}",
        "",
        md_table(["Step index", "Small steps", "Low mean", "Low std", "Low weight", "High mean", "High std"], rows,
                 right=set(range(7))),
    ])


# ---------------------------------------------------------------------- the output folder


def is_previous_report(folder: Path) -> bool:
    page = folder / PAGE
    try:
        return f'<meta name="generator" content="{GENERATOR}">' in page.read_text(errors="replace")[:2000]
    except OSError:
        return False


def check_out_dir(out: Path) -> None:
    """``out`` may be new, empty, or hold an earlier report; anything else is refused."""
    if out.exists() and not out.is_dir():
        raise TraceError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_previous_report(out):
        raise TraceError(f"--out {out} holds files that are not a trace report; choose a new or empty folder")


def write_report(report: Report, out: Path) -> list[Path]:
    """Write the report's files into ``out`` (each atomically) and remove figures of an earlier report
    that this one lacks; other files in ``out`` are left alone."""
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    files = report.files()
    written = []
    for name, data in files.items():
        target = out / name
        temp = out / f".{name}.tmp"
        temp.write_bytes(data)
        os.replace(temp, target)
        written.append(target)
    for name in REPORT_FILES:
        if name not in files and (out / name).exists():
            (out / name).unlink()
    return written


def make_report(trace_dir, result_paths: list[Path], out: Path, options: ReportOptions) -> list[Path]:
    """Check ``out``, build the report in memory, then write it: bad input leaves ``out`` untouched."""
    check_out_dir(out)
    return write_report(build_report(trace_dir, result_paths, options), out)
