"""What `trace report` reads, checked: the options, the results files of `trace replay --out` split into
one run per router, the baselines it replays itself, the splits, and the optional policy log and STEER
mixtures. A problem with an input is a TraceError saying which file and why, before anything is drawn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from analysis import plots
from analysis.options import ALL_ROWS, DEFAULT_ALPHA, REPORTED_ROWS, ReportOptions
from replay.costs import make_cost_model
from replay.data import ReplayData
from replay.params import params_text
from replay.routers import ROUTERS, make_router
from replay.routers.policy import load_policy
from replay.routers.steer import load_mixtures
from replay.run import replay
from replay.splits import SPLITS
from tracestore.errors import TraceError
from tracestore.schema import SCHEMAS

# column -> what its type must be: "string", "integer", "float" or "boolean"
RESULT_COLUMNS = {
    "router": "string",
    "params": "string",
    "config": "integer",
    "problem_id": "string",
    "world": "integer",
    "path": "string",
    "correct": "boolean",
    "cost": "float",
    "misses": "integer",
    "cost_model": "string",
    "cost_unit": "string",
    "cost_convention": "string",
    "a_over_c_unit": "string",
    "a_over_c_scale": "float",
}


@dataclass
class Run:
    """One router's outcomes from one results file (every configuration), and its chosen configuration."""

    router: str
    source: str
    outcomes: pl.DataFrame
    params: dict[int, dict]
    label: str = ""
    chosen: int = 0
    how: str = ""  # how the configuration was chosen, for the table's notes
    below_floor: bool = False
    training_flags: list[str] = field(default_factory=list)  # a policy run's file: how its training ended off target
    picked_on: str = ""  # where its operating point was chosen (analysis.protocol)
    dominated_by: list[str] = field(default_factory=list)  # rows at least as accurate and cheaper (analysis.protocol)
    rows: pl.DataFrame | None = field(default=None, repr=False)  # reported rows (all configurations)
    pick_rows: pl.DataFrame | None = field(default=None, repr=False)  # rows the operating point is chosen on

    @property
    def swept(self) -> bool:
        return len(self.params) > 1

    def at_chosen(self) -> pl.DataFrame:
        return self.rows.filter(pl.col("config") == self.chosen)

    def point_params(self) -> dict:
        """The chosen configuration's decision parameters (sweepable ones, or the ones this file swept), less
        those it does not read (a cascade's t_ik without P(IK))."""
        params = self.params[self.chosen]
        cls = ROUTERS.builtins().get(self.router)
        names = cls.sweepable if cls is not None else ()
        names = [name for name in names if name in params] or varying_params(self.params)
        idle = cls.idle_params(params) if cls is not None else ()
        return {name: params[name] for name in names if name not in idle}


def read_parquet_input(path: Path, what: str) -> pl.DataFrame:
    """Read one input Parquet file, or say in one sentence why it cannot be read."""
    if path.is_dir():
        raise TraceError(f"{what} {path} is a folder; pass the files in it, e.g. {path / '*.parquet'}")
    if not path.is_file():
        raise TraceError(f"{what} {path} does not exist")
    try:
        return pl.read_parquet(path, glob=False)
    except (pl.exceptions.PolarsError, OSError) as error:
        raise TraceError(f"{what} {path} is not a readable Parquet file ({str(error).splitlines()[0]})") from None


def read_results(path: Path, roles: list[str]) -> pl.DataFrame:
    """A `trace replay --out` file, checked for the columns the report reads."""
    return check_results(read_parquet_input(path, "results file"), path, roles)


def result_input(item, index: int, roles: list[str]) -> tuple[pl.DataFrame, str]:
    """(checked outcomes, source name) of one report input: a results file, or in memory a replay result
    (anything with ``outcomes``, such as replay.results.ReplayResult) or its outcomes DataFrame."""
    if isinstance(item, (str, Path)):
        return read_results(Path(item), roles), str(item)
    frame = getattr(item, "outcomes", item)
    if not isinstance(frame, pl.DataFrame):
        raise TraceError(
            f"report input {index} is a {type(item).__name__}; give a results file, a replay result or its outcomes"
        )
    routers = frame["router"].unique(maintain_order=True).to_list() if "router" in frame.columns else []
    source = f"result {index} ({', '.join(map(str, routers))})" if routers else f"result {index}"
    return check_results(frame, source, roles), source


def check_results(frame: pl.DataFrame, path, roles: list[str]) -> pl.DataFrame:
    """Replay outcomes (from ``path``, a file or in-memory result), checked for the columns the report reads."""
    missing = [column for column in RESULT_COLUMNS if column not in frame.columns]
    if missing:
        raise TraceError(f"{path} is not a trace replay result: it lacks column(s) {', '.join(missing)}")
    lacking = [f"n_{role}" for role in roles if f"n_{role}" not in frame.columns]
    if lacking:
        raise TraceError(
            f"{path} was not replayed on a trace with models {', '.join(roles)}: it lacks "
            f"column(s) {', '.join(lacking)}"
        )
    expected = {**RESULT_COLUMNS, **{f"n_{role}": "integer" for role in roles}}
    for column, kind in expected.items():
        dtype = frame.schema[column]
        if not {
            "string": dtype == pl.String,
            "integer": dtype.is_integer(),
            "float": dtype.is_float(),
            "boolean": dtype == pl.Boolean,
        }[kind]:
            raise TraceError(f"{path} is not a trace replay result: column {column} holds {dtype}, not {kind}s")
    if frame.height == 0:
        raise TraceError(f"{'results file ' if isinstance(path, Path) else ''}{path} holds no outcomes")
    return frame.with_columns(pl.col("world").cast(pl.Int32), pl.col("config").cast(pl.Int32))


def check_against_trace(
    frame: pl.DataFrame, path: Path, trace_dir, problem_ids: pl.Series, worlds: list[int], finals: pl.DataFrame
) -> None:
    """Every problem and world of the results is in the trace, and every finished walk ends at a final
    step the trace holds, graded the same."""
    unknown = frame.filter(~pl.col("problem_id").is_in(problem_ids.implode()))
    if unknown.height:
        raise TraceError(
            f"{path}: problem {unknown['problem_id'][0]!r} is not in trace {trace_dir} "
            "(results from a different trace?)"
        )
    other_worlds = sorted(set(frame["world"].unique().to_list()) - set(worlds))
    if other_worlds:
        raise TraceError(
            f"{path}: world {other_worlds[0]} is not in trace {trace_dir} (results from a different trace?)"
        )
    finished = frame.filter(pl.col("misses") == 0).select("problem_id", "world", "path", "correct")
    matched = finished.join(finals, on=["problem_id", "world", "path"], how="left")
    wrong = matched.filter(pl.col("in_trace").is_null() | pl.col("correct").ne_missing(pl.col("trace_correct")))
    if wrong.height:
        row = wrong.row(0, named=True)
        raise TraceError(
            f"{path}: problem {row['problem_id']!r} world {row['world']} ends at node {row['path']!r}, "
            f"which trace {trace_dir} does not hold as a final step graded {row['correct']} "
            "(results from a different trace?); results replayed with --grades NAME need the same --grades here"
        )


def varying_params(params: dict[int, dict]) -> list[str]:
    """Names of the parameters whose values differ between configurations, in name order."""
    names = sorted({name for config in params.values() for name in config})
    return [name for name in names if len({json.dumps(config.get(name)) for config in params.values()}) > 1]


def sweep_grid(params: dict[int, dict]) -> str:
    """The grid a swept run's configurations span, per varying parameter: "tau 0 to 1 in steps of 0.1 (11
    values)" when evenly spaced, else the values ("tau 0.2, 0.5, 0.9")."""
    parts = []
    for name in varying_params(params):
        values = sorted({config[name] for config in params.values()}, key=str)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            values = sorted(values)
            steps = [b - a for a, b in zip(values, values[1:])]
            if len(values) > 2 and max(steps) - min(steps) <= 1e-9 * max(1.0, abs(values[-1])):
                first, last, step = values[0], values[-1], steps[0]
                parts.append(f"{name} {first:g} to {last:g} in steps of {step:.6g} ({len(values)} values)")
                continue
        parts.append(f"{name} " + ", ".join(str(shown(v)) for v in values))
    return " x ".join(parts)


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
        same = (
            pairs.height == reference.height
            and pairs.join(reference, on=["problem_id", "world"], how="anti").height == 0
        )
        if not same or (per_config["n"] != reference.height).any() or (per_config["pairs"] != reference.height).any():
            raise TraceError(
                f"{run.source} ({run.router}) does not cover the same {reference.height} (problem, world) "
                f"walks per configuration as {runs[0].source}: replay every router on the same split "
                "and worlds"
            )
    return reference


def replay_baseline(
    name: str, trace, walks: pl.DataFrame, cost_model: str, params: dict | None = None, grades: str | None = None
) -> Run:
    """small-only or large-only (or ``only`` with ``params`` naming a model) replayed here on exactly ``walks``,
    its final steps graded by grade set ``grades``, priced like the results."""
    if cost_model == "api":
        raise TraceError(
            f"the results use the api cost model, whose prices they do not record: replay {name} "
            "with the same --price options and pass its results file too"
        )
    data = ReplayData.from_trace(trace, grades)
    data = ReplayData(
        data.manifest,
        data.steps,
        data.problems,
        scores=data.scores,
        hidden=data.hidden,
        worlds=sorted(walks["world"].unique().to_list()),
    ).subset(walks["problem_id"].unique().to_list())
    router = make_router(name, **(params or {})).fit(data)
    outcomes = replay(data, router, make_cost_model(cost_model, trace.manifest)).outcomes
    outcomes = outcomes.join(walks, on=["problem_id", "world"], how="semi", maintain_order="left")
    return Run(
        router=name, source="replayed from the trace", outcomes=outcomes, params={0: json.loads(outcomes["params"][0])}
    )


ROLE_PARAMS = ("draft", "target", "models")  # the parameters that name the models a router uses


def model_chain(router: str, params: dict, roles: list[str]) -> str | None:
    """The models a run's router uses, resolved on a trace with model ``roles`` ("m0 → m1 → m2": defaults
    filled in), or None when it takes no model parameters or they do not resolve."""
    cls = ROUTERS.builtins().get(router)
    if cls is None or not any(name in params for name in ROLE_PARAMS):
        return None
    if hasattr(cls, "chain"):  # the draft routers
        configured = cls(**{name: params[name] for name in cls.param_names() if name in params})
        try:
            chain = configured.chain(roles)
        except TraceError:
            return None
    else:
        chain = [role.strip() for role in params["models"].split(",")] if params.get("models") else roles
    return " → ".join(chain)


def shown(value):
    """A parameter value as a label shows it: floats to 4 significant digits, a file by its name."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and "/" in value:
        return Path(value).name
    return value


def label_runs(runs: list[Run], roles: list[str]) -> None:
    """Router name, plus the fixed parameters that tell apart runs of one router (the model parameters as the
    resolved chain of models, "m0 → m1"), plus the file if still needed."""
    for run in runs:
        same = [other for other in runs if other.router == run.router]
        fixed = {
            name: value for name, value in run.params[min(run.params)].items() if name not in varying_params(run.params)
        }
        cls = ROUTERS.builtins().get(run.router)
        ignored = cls.idle_params(fixed) if cls is not None else ()
        telling = [
            name
            for name in sorted(fixed)
            if name not in ignored
            and len({json.dumps(other.params[min(other.params)].get(name)) for other in same}) > 1
        ]
        chain = model_chain(run.router, fixed, roles) if set(telling) & set(ROLE_PARAMS) else None
        named = [n for n in telling if n not in ROLE_PARAMS] if chain is not None else telling
        parts = [chain] if chain is not None else []
        if named:
            parts.append(params_text({n: shown(fixed[n]) for n in named}))
        if fixed.get("model") and "model" not in telling:  # `only`: which model, even when it is the only run
            parts.insert(0, str(fixed["model"]))
        run.label = run.router + (" (" + ", ".join(parts) + ")" if parts else "")
    for run in runs:
        if sum(other.label == run.label for other in runs) > 1:
            run.label += f" [{Path(run.source).name}]"


POLICY_MARK = "‡"


def mark_policy_runs(runs: list[Run]) -> None:
    """Mark (``POLICY_MARK`` after the label) each policy run whose policy file, where it can still be read,
    records that its training ended off target (`trace train policy`'s flags: coverage target out of reach or
    not reached on the train split, kappa at 0 or 1)."""
    for run in runs:
        path = run.params[min(run.params)].get("path") if run.router == "policy" else None
        if not path or not Path(path).is_file():
            continue
        try:
            _, saved = load_policy(path)
        except TraceError:
            continue
        run.training_flags = list(saved.get("flags") or [])
        if run.training_flags:
            run.label += f" {POLICY_MARK}"


def select_splits(runs: list[Run], options: ReportOptions) -> None:
    """Set each run's reported rows and the rows its operating point is chosen on (with ``pick_on``, those are set
    from the --pick-on results: analysis.protocol)."""
    pick_split = REPORTED_ROWS if options.pick_on else options.pick_split
    for chosen, special in ((options.split, ALL_ROWS), (options.pick_split, REPORTED_ROWS)):
        if chosen not in (*SPLITS, special):
            raise TraceError(f"unknown split {chosen!r}; choose one of {', '.join(SPLITS)}, {special}")
    splits = None
    if options.split != ALL_ROWS or pick_split != REPORTED_ROWS:
        with_split = [run for run in runs if "split" in run.outcomes.columns]
        if not with_split:
            raise TraceError(
                f"--split and --pick-split need results with a split column (from trace replay); pass --split "
                f"{ALL_ROWS} --pick-split {REPORTED_ROWS} to report every row"
            )
        splits = pl.concat([run.outcomes.select("problem_id", "split") for run in with_split]).unique()
        if splits["problem_id"].n_unique() != splits.height:
            raise TraceError(
                "the results assign some problem to different splits: replay them with the same "
                "--split-seed and --split-fractions"
            )

    def rows_of(run: Run, split: str) -> pl.DataFrame:
        if split == ALL_ROWS:
            return run.outcomes
        ids = splits.filter(pl.col("split") == split)["problem_id"]
        rows = run.outcomes.filter(pl.col("problem_id").is_in(ids.implode()))
        if rows.height == 0:
            raise TraceError(
                f"the results hold no problems of split {split!r}: replay with --split all (operating points are "
                f"chosen on the calibration split and reported on test), or choose other --split/--pick-split"
            )
        return rows

    for run in runs:
        run.rows = rows_of(run, options.split)
        run.pick_rows = run.rows if pick_split == REPORTED_ROWS else rows_of(run, pick_split)
        run.picked_on = "the reported rows" if pick_split == REPORTED_ROWS else f"split {pick_split} of the results"


# ---------------------------------------------------------------------- optional inputs


def read_policy_log(path: Path, alpha: float | None) -> tuple[pl.DataFrame, float, str]:
    """(log with step, coverage, kappa; alpha; where alpha came from) from a training log Parquet."""
    log = read_parquet_input(path, "policy log")
    missing = [column for column in ("step", "coverage", "kappa") if column not in log.columns]
    if missing:
        raise TraceError(f"{path} is not a policy training log: it lacks column(s) {', '.join(missing)}")
    log = (
        log.select("step", "coverage", "kappa", *(["alpha"] if "alpha" in log.columns else []))
        .drop_nulls(["step", "coverage", "kappa"])
        .sort("step")
    )
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
    (format ``trace-steer``, see replay.routers.steer); of a file fitted on several models, the first model's."""
    saved = load_mixtures(path, "STEER mixture")
    if saved.signal not in SCHEMAS["steps"].names:
        raise TraceError(f"{path}: signal {saved.signal!r} is not a column of the steps table")
    if not saved.mixtures:
        raise TraceError(f"{path} holds no mixtures")
    mixtures = [  # the first model's: the report draws them over the smallest model's confidences
        plots.Mixture(entry.depth, entry.weights, entry.means, entry.variances, entry.low_component)
        for entry in saved.of(saved.models[0])
    ]
    return saved.signal, mixtures, saved.train_problem_ids
