"""Deterministic train / calibration / test splits of a trace's problems.

By default a problem's split depends only on (seed, problem_id), drawn with the fractions given: adding
problems to a trace or reading its rows in another order never moves a problem to another split.

``SplitSpec.by`` takes a problem's split from its own label instead: a column of the problems table (``split``:
the dataset's own split, e.g. GSM8K's train and test files) or a file of ``problem_id split`` lines. A problem
labelled ``test`` is in test, one labelled ``calibration`` (or ``validation``, ``val``, ``dev``) in
calibration, and one labelled ``train`` in train or calibration, drawn by the same hash in the ratio of the
train and calibration fractions (the CMDP seed divides its training data D into D_train and D_cal so): with
``--split-fractions 0.8,0.2,0`` a fifth of the train-labelled problems calibrate. A problem an id file does not
list is in no split (only ``--split all`` replays it).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from tracestore.errors import TraceError

SPLITS = ("train", "calibration", "test")
CALIBRATION_LABELS = ("calibration", "validation", "val", "dev")  # a label that puts a problem in calibration
SHOWN_IDS = 3  # problem ids an error message names
DEFAULT_FRACTIONS = (0.5, 0.1, 0.4)
DEFAULT_SPLIT_SEED = 0


def hash_uniform(names: Iterable[str], seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per name, from a hash of (seed, name): stable across runs and machines."""
    values = []
    for name in names:
        digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
        values.append(int.from_bytes(digest, "big") / 2**64)
    return np.asarray(values, dtype=np.float64)


def parse_fractions(text: str) -> tuple[float, float, float]:
    """Parse ``"0.5,0.1,0.4"`` into (train, calibration, test) fractions that sum to 1."""
    parts = text.split(",")
    try:
        fractions = tuple(float(part) for part in parts)
    except ValueError:
        raise TraceError(f"split fractions must be three numbers like 0.5,0.1,0.4, got {text!r}") from None
    return check_fractions(fractions)


def check_fractions(fractions: tuple[float, ...]) -> tuple[float, float, float]:
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise TraceError(
            f"split fractions must be three non-negative numbers (train, calibration, test) "
            f"summing to 1, got {fractions}"
        )
    return fractions  # type: ignore[return-value]


def assign_splits(
    problem_ids: list[str], seed: int = DEFAULT_SPLIT_SEED, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> list[str]:
    """The split name of each problem id, in the same order."""
    check_fractions(fractions)
    edges = np.cumsum(fractions)[:-1]
    buckets = np.searchsorted(edges, hash_uniform(problem_ids, seed), side="right")
    return [SPLITS[bucket] for bucket in buckets]


@dataclass(frozen=True)
class SplitSpec:
    """How a trace's problems are divided into train, calibration and test (see the module doc)."""

    seed: int = DEFAULT_SPLIT_SEED
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    by: str | None = None  # a problems column or a file of (problem_id, split) lines; None: the hash alone

    def check(self) -> SplitSpec:
        check_fractions(tuple(self.fractions))
        return self

    def record(self) -> dict:
        """What a fitted file and a results file record of these splits."""
        record = {"seed": self.seed, "fractions": [float(f) for f in self.fractions], "by": self.by}
        if self.by is not None and Path(self.by).is_file():
            record["by_file_sha256"] = hashlib.sha256(Path(self.by).read_bytes()).hexdigest()
        return record

    def describe(self) -> str:
        fractions = ",".join(f"{f:g}" for f in self.fractions)
        if self.by is None:
            return f"hash of the problem id (seed {self.seed}, fractions {fractions})"
        return (
            f"--split-by {self.by} (train-labelled problems: train/calibration by hash, seed {self.seed}, {fractions})"
        )

    def assign(self, problems: pl.DataFrame) -> pl.DataFrame:
        """problem_id and split (null: in no split) of every row of ``problems``, which holds problem_id and, for
        a column ``by``, that column."""
        self.check()
        ids = problems["problem_id"].to_list()
        if self.by is None:
            return _split_frame(ids, assign_splits(ids, self.seed, self.fractions))
        labels = self._labels(problems)
        train, calibration = self.fractions[0], self.fractions[1]
        carve = assign_splits(ids, self.seed, _train_calibration(train, calibration))
        chosen = []
        for label, carved in zip(labels, carve):
            if label is None:
                chosen.append(None)
            elif label == "train":
                chosen.append(carved)
            else:
                chosen.append("calibration" if label in CALIBRATION_LABELS else label)
        return _split_frame(ids, chosen)

    def _labels(self, problems: pl.DataFrame) -> list[str | None]:
        path = Path(self.by)
        if path.is_file():
            labels = read_split_file(path)
            ids = problems["problem_id"].to_list()
            unknown = sorted(set(labels) - set(ids))
            if unknown:
                raise TraceError(
                    f"--split-by {path} names {len(unknown):,} problem id(s) not in the trace "
                    f"(first: {', '.join(unknown[:SHOWN_IDS])})"
                )
            values = [labels.get(problem_id) for problem_id in ids]
        elif self.by in problems.columns:
            values = [None if value is None else str(value) for value in problems[self.by].to_list()]
        else:
            raise TraceError(f"--split-by {self.by}: no file of that name and no problems column of that name")
        known = ("train", "test", *CALIBRATION_LABELS)
        odd = sorted({value for value in values if value is not None and value.lower() not in known})
        if odd:
            raise TraceError(
                f"--split-by {self.by}: label(s) {', '.join(map(repr, odd[:SHOWN_IDS]))} are not train, calibration "
                "(validation, val, dev) or test"
            )
        return [None if value is None else value.lower() for value in values]


def trace_splits(trace, spec: SplitSpec) -> pl.DataFrame:
    """problem_id and split of every problem of ``trace`` (a tracestore Trace) under ``spec``."""
    columns = trace.scan("problems").collect_schema().names()
    wanted = ["problem_id"]
    if spec.by is not None and not Path(spec.by).is_file():
        if spec.by not in columns:
            raise TraceError(
                f"--split-by {spec.by}: no file of that name and no problems column of that name "
                f"(columns: {', '.join(c for c in columns if c != 'problem_id')})"
            )
        wanted.append(spec.by)
    return spec.assign(trace.scan("problems").select(wanted).collect())


def _train_calibration(train: float, calibration: float) -> tuple[float, float, float]:
    """Fractions that divide train-labelled problems between train and calibration in the ratio given."""
    total = train + calibration
    return (1.0, 0.0, 0.0) if total <= 0 else (train / total, calibration / total, 0.0)


def _split_frame(ids: list[str], splits: list[str | None]) -> pl.DataFrame:
    return pl.DataFrame({"problem_id": ids, "split": splits}, schema={"problem_id": pl.String, "split": pl.String})


def read_split_file(path: Path) -> dict[str, str]:
    """problem id -> split label from a file of ``problem_id split`` lines (separated by a comma, a tab or
    spaces; blank lines, ``#`` comments and a ``problem_id,split`` header skipped)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise TraceError(f"--split-by {path} cannot be read ({error})") from None
    labels: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        fields = re.split(r"\s*[,\t]\s*|\s+", text)
        if len(fields) != 2:
            raise TraceError(f"--split-by {path}, line {number}: expected 'problem_id split', got {line.strip()!r}")
        problem_id, label = fields
        if not labels and (problem_id, label) == ("problem_id", "split"):
            continue
        if labels.get(problem_id, label) != label:
            raise TraceError(f"--split-by {path}, line {number}: problem {problem_id!r} is given two splits")
        labels[problem_id] = label
    if not labels:
        raise TraceError(f"--split-by {path} lists no problems")
    return labels
