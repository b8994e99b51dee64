"""What fitted files share: the splits they are fitted on, the record of where they were fitted, and the checks a
router runs when it loads one.

Every fitted part (a policy file, STEER mixtures, P(IK) probes, a router fitting itself) records, in ``fitted_on``
(``fit_record``): what it is, the trace directory, the digest of that trace's cache key (``manifest_digest``), its
dataset, the split and how splits were drawn, the ``setting`` (the cache-key fields a trace must share to be
replayed with it) and the ids of the problems it learned from. A router that loads it on another trace checks the
setting (``check_setting``: the first differing field is named, as `trace gen` names it for a trace), and the
replay marks every row whose problem the fit saw (``replay.run``), so that fitted data never leaks into the rows a
report shows.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from replay.data import ReplayData
from replay.splits import SPLITS, SplitSpec, trace_splits
from tracestore.errors import TraceError
from tracestore.schema import CACHE_KEY_FIELDS, first_difference, json_normal, lookup_field
from tracestore.store import Trace, open_trace

# Cache-key fields a fitted file does not need to share with the trace it replays on: the problems (train here,
# evaluate there) and the seeds of the sampling draw.
NOT_SETTING = ("dataset", "seeds")


def setting(manifest: Mapping, scorers: Iterable[str] = (), hidden_roles: Iterable[str] = ()) -> dict:
    """The manifest fields a fitted file shares with every trace it replays on: the cache key (models with their
    revisions, tokenizers and chat templates, prompt template, sampling, delimiter, grader, engine, schema version)
    but the dataset and the seeds; plus the entries of the ``scorers`` it read, and for the ``hidden_roles`` whose
    prompt hidden states it read, how they were stored."""
    manifest = dict(manifest)
    chosen = {key: manifest[key] for key in CACHE_KEY_FIELDS if key not in NOT_SETTING and key in manifest}
    for name in sorted(set(scorers)):
        chosen.setdefault("scorers", {})[name] = (manifest.get("scorers") or {}).get(name)
    hidden = manifest.get("hidden") or {}
    for role in sorted(set(hidden_roles)):
        chosen.setdefault("hidden", {"dtype": hidden.get("dtype"), "where": hidden.get("where"), "normed": {}})
        chosen["hidden"]["normed"][role] = (hidden.get("normed") or {}).get(role)
    return json_normal(chosen)


def digest(value) -> str:
    """SHA-256 of a JSON value's canonical text."""
    return hashlib.sha256(json.dumps(json_normal(value), sort_keys=True).encode()).hexdigest()


def manifest_digest(manifest: Mapping) -> str:
    """Digest of a trace's cache key (every CACHE_KEY_FIELDS entry it has): two traces of the same dataset grown with
    the same settings have the same one."""
    return digest({key: manifest[key] for key in CACHE_KEY_FIELDS if key in manifest})


def fit_record(
    data: ReplayData,
    what: str,
    problem_ids: Iterable[str] | None = None,
    scorers: Iterable[str] = (),
    hidden_roles: Iterable[str] = (),
) -> dict:
    """The ``fitted_on`` record of something fitted on ``data`` (on ``problem_ids`` of it, default all)."""
    origin = data.origin or {}
    ids = data.problems["problem_id"].to_list() if problem_ids is None else list(problem_ids)
    return {
        "what": what,
        "trace": origin.get("trace"),
        "manifest_digest": manifest_digest(data.manifest),
        "dataset": json_normal(data.manifest.get("dataset")),
        "split": origin.get("split"),
        "setting": setting(data.manifest, scorers, hidden_roles),
        "problem_ids": sorted(ids),
    }


def legacy_record(what: str, problem_ids: list[str] | None) -> dict | None:
    """The record of a file written before ``fitted_on``: its train problem ids, no setting to check."""
    if problem_ids is None:
        return None
    return {"what": what, "trace": None, "setting": None, "problem_ids": sorted(map(str, problem_ids))}


def check_record(record, path) -> dict:
    """A file's ``fitted_on`` record, checked for the fields the checks read."""
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("problem_ids"), list)
        or not isinstance(record.get("setting"), (dict, type(None)))
    ):
        raise TraceError(f"{path}: fitted_on must be a record with problem_ids and setting (see replay.artifacts)")
    return record


def check_setting(record: dict, manifest: Mapping, path, root, done: str = "fitted") -> None:
    """TraceError naming the first field where the setting ``record`` was fitted (or ``done``: replayed) in differs
    from the trace at ``root`` (nothing to check for a file that records no setting)."""
    fitted = record.get("setting")
    if fitted is None:
        return
    here = setting(manifest, (fitted.get("scorers") or {}).keys(), ((fitted.get("hidden") or {}).get("normed") or {}))
    differing = first_difference(fitted, here)
    if differing:
        where = f" ({record['trace']})" if record.get("trace") else ""
        raise TraceError(
            f"{path} was {done} on a trace{where} with {differing} = {lookup_field(fitted, differing)!r}, but "
            f"{root} has {differing} = {lookup_field(here, differing)!r}; {done.removesuffix('ed')} it on a trace of "
            "this one's setting"
        )


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes: what the `trace train` commands print for the file they wrote, so that two
    machines can tell whether they trained the same thing."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def describe_record(record: dict) -> str:
    """One line for a report: what was fitted where, on how many problems (a record, or its summary in outcomes)."""
    split = record.get("split") or {}
    where = record.get("trace") or "a trace it does not name"
    split_text = f" split {split['name']}" if split.get("name") else ""
    n_problems = len(record["problem_ids"]) if "problem_ids" in record else record.get("n_problems", 0)
    return f"{record.get('what', 'fitted')} on {where}{split_text} ({n_problems:,} problems)"


# ---------------------------------------------------------------------- the data fitted on


@dataclass(frozen=True)
class SplitData:
    """A trace's rows divided into train, calibration and test (``ReplayData`` each, with its ``origin``)."""

    train: ReplayData
    calibration: ReplayData
    test: ReplayData
    splits: object  # polars DataFrame: problem_id, split (null: in no split)

    def of(self, name: str) -> ReplayData:
        return getattr(self, name)


def split_data(data: ReplayData, trace: Trace, spec: SplitSpec) -> SplitData:
    """``data`` (every problem of ``trace``) divided by ``spec``; each part records where it comes from."""
    import polars as pl

    splits = trace_splits(trace, spec)
    parts = {}
    for name in SPLITS:
        part = data.subset(splits.filter(pl.col("split") == name)["problem_id"].to_list())
        part.origin = {"trace": str(trace.root), "split": {"name": name, **spec.record()}}
        parts[name] = part
    return SplitData(**parts, splits=splits)


def load_split_data(root: str | os.PathLike, spec: SplitSpec, grades: str | None = None) -> SplitData:
    """The trace at ``root`` divided by ``spec``, its final steps graded by grade set ``grades``."""
    trace = open_trace(root)
    return split_data(ReplayData.from_trace(trace, grades), trace, spec.check())


def load_train_split(
    root: str | os.PathLike, split_seed: int, fractions: tuple[float, float, float], split_by: str | None = None
) -> ReplayData:
    """The train split of the trace at ``root``, drawn exactly as `trace replay` draws it."""
    spec = SplitSpec(split_seed, tuple(fractions), split_by or None)
    train = load_split_data(root, spec).train
    if train.problems.height == 0:
        raise TraceError(f"the train split of {root} holds no problems ({spec.describe()})")
    return train


def load_artifact(
    path: str | os.PathLike,
    read: Callable[[Path], object],
    kind: str,
    fmt: str,
    version: int | tuple[int, ...],
    keys: tuple[str, ...],
) -> dict:
    """Read a saved fitted part with ``read`` and check its format tag, version (or one of several) and required
    keys."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{kind} file {path} does not exist")
    try:
        saved = read(path)
    except Exception as error:  # unpicklers raise many types for foreign or truncated files
        raise TraceError(f"{path} is not a readable {kind} file ({str(error).splitlines()[0]})") from None
    if not isinstance(saved, dict) or saved.get("format") != fmt:
        raise TraceError(f"{path} is not a trace {kind} file (no format {fmt!r})")
    versions = version if isinstance(version, tuple) else (version,)
    if saved.get("version") not in versions:
        raise TraceError(
            f"{path} has {kind} version {saved.get('version')!r}; this trace reads {' or '.join(map(str, versions))}"
        )
    for key in keys:
        if key not in saved:
            raise TraceError(f"{kind} file {path} has no {key!r}")
    return saved


def saved_record(saved: dict, path, what: str) -> dict | None:
    """The ``fitted_on`` record of a loaded file (a file from before records: its ``train_problem_ids``)."""
    if "fitted_on" in saved:
        return {**check_record(saved["fitted_on"], path), "file": str(path)}
    record = legacy_record(what, saved.get("train_problem_ids"))
    return None if record is None else {**record, "file": str(path)}
