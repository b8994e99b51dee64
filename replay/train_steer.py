"""`trace train steer`: fit STEER's per-step-index Gaussian mixtures on the train split and save them, for
every model of the trace but the largest (every model a chain can escalate from).

The fitting is the router's own (`replay.routers.steer.Steer`: each model's confidences on its own solutions,
the all-own-model chain from the root, in the train split); this only picks the split, fits on one thread (the
same file at any thread count) and writes the JSON that `--router steer --param gmms=FILE` loads instead of
refitting, on this trace or on another one of the same setting (its ``fitted_on`` record).
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from replay.artifacts import load_train_split
from replay.routers.steer import Steer
from replay.splits import DEFAULT_FRACTIONS, DEFAULT_SPLIT_SEED
from tracestore.outputs import check_output_file


def train_steer(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    min_samples: int = 10,
    seed: int = 0,
    split_seed: int = DEFAULT_SPLIT_SEED,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    split_by: str | None = None,
    force: bool = False,
) -> pl.DataFrame:
    """Fit the mixtures on the train split of the trace at ``root``, write them to ``out`` (replacing an
    existing file only with ``force``); returns one row per model and step index: model, depth, n, and weight, mean and
    standard deviation of the low and high components."""
    from threadpoolctl import threadpool_limits

    check_output_file(out, force=force)
    train = load_train_split(root, split_seed, fractions, split_by)
    with threadpool_limits(limits=1):  # the k-means start's OpenMP sums and BLAS split work by thread count
        router = Steer(min_samples=min_samples, seed=seed).fit(train)
    router.save(Path(out))
    rows = []
    for role, fitted in router.by_role_.items():
        for depth, mixture in sorted(fitted.mixtures.items()):
            low = fitted.low_component[depth]
            order = {"low": low, "high": 1 - low}
            row = {"model": role, "depth": depth, "n": fitted.n_samples[depth]}
            for name, k in order.items():
                row[f"{name}_weight"] = float(mixture.weights_[k])
                row[f"{name}_mean"] = float(mixture.means_[k, 0])
                row[f"{name}_std"] = float(mixture.covariances_[k, 0, 0] ** 0.5)
            rows.append(row)
    return pl.DataFrame(rows)
