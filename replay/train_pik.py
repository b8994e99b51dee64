"""`trace train pik`: fit the cascade's P(IK) probes and report how well they predict.

For each model, the probe (``replay.routers.cascade.new_probe``: standardised prompt hidden state ->
MLP, scikit-learn) learns whether the model's own solution (its all-own-model chain) ends correct.
The problems of the replay's train split are divided 80/10/10 by a hash of their ids: the probe is
fitted on 80% for each L2 penalty of a small grid, the one with the lowest validation log loss is
kept, and its accuracy, F1 and AUROC on the last 10% are reported and saved with it. Because every
problem the probe saw lies in the train split, `--router cascade --param probe=FILE` can replay it
on the test split without leakage.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score

from replay.artifacts import load_train_split
from replay.atomic import write_atomic
from replay.errors import TraceError
from replay.outputs import check_output_file
from replay.routers.cascade import PIK_FORMAT, PIK_VERSION, hidden_matrix, new_probe, own_chain_labels
from replay.splits import DEFAULT_FRACTIONS, DEFAULT_SPLIT_SEED, hash_uniform

PARTS = ("fit", "validation", "test")
PROBE_FRACTIONS = (0.8, 0.1, 0.1)
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def probe_parts(problem_ids: list[str], seed: int) -> list[str]:
    """fit, validation or test for each problem id, 80/10/10 by a hash of (seed, id) salted so that it does not
    repeat the hash that drew the train split."""
    uniform = hash_uniform([f"pik/{problem_id}" for problem_id in problem_ids], seed)
    return [PARTS[i] for i in np.searchsorted(np.cumsum(PROBE_FRACTIONS)[:-1], uniform, side="right")]


@dataclass(frozen=True)
class ProbeReport:
    model: str
    n_fit: int  # (problem, world) pairs whose own-model solution is complete
    n_validation: int
    n_test: int
    positive_rate: float  # share of correct own solutions in the fit part
    l2: float  # chosen by validation log loss
    validation_log_loss: float
    test_accuracy: float
    test_f1: float
    test_auroc: float  # NaN when the test part holds one class only


def _fit_one(features: np.ndarray, labels: np.ndarray, part: np.ndarray, role: str, seed: int):
    for name in PARTS:
        if not (part == name).any():
            raise TraceError(
                f"the {name} part of model {role}'s P(IK) data is empty: the train split needs more "
                f"problems with a complete {role} solution ({labels.size} now)"
            )
    fit, validation, test = (part == name for name in PARTS)
    if len(np.unique(labels[fit])) < 2:
        raise TraceError(
            f"cannot fit the P(IK) probe of model {role}: its {int(fit.sum())} fit solutions are all "
            f"{'correct' if labels[fit].all() else 'wrong'}"
        )
    best = None
    for l2 in L2_GRID:
        probe = new_probe(seed, l2).fit(features[fit], labels[fit])
        loss = log_loss(labels[validation], probe.predict_proba(features[validation])[:, 1], labels=[False, True])
        if best is None or loss < best[0]:
            best = (loss, l2, probe)
    loss, l2, probe = best
    p_test = probe.predict_proba(features[test])[:, 1]
    y_test = labels[test]
    auroc = roc_auc_score(y_test, p_test) if len(np.unique(y_test)) == 2 else float("nan")
    report = ProbeReport(
        model=role,
        n_fit=int(fit.sum()),
        n_validation=int(validation.sum()),
        n_test=int(test.sum()),
        positive_rate=float(labels[fit].mean()),
        l2=l2,
        validation_log_loss=float(loss),
        test_accuracy=float(accuracy_score(y_test, p_test >= 0.5)),
        test_f1=float(f1_score(y_test, p_test >= 0.5, zero_division=0.0)),
        test_auroc=float(auroc),
    )
    return probe, report


def train_pik(
    root: str | os.PathLike,
    out: str | os.PathLike,
    models: list[str],
    *,
    layer: int = -1,
    where: str = "prompt_last",
    seed: int = 0,
    split_seed: int = DEFAULT_SPLIT_SEED,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    force: bool = False,
) -> list[ProbeReport]:
    """Fit one probe per model in ``models`` on the train split of the trace at ``root``; write them to ``out``
    (replacing an existing file only with ``force``)."""
    import joblib

    check_output_file(out, force=force)
    train = load_train_split(root, split_seed, fractions)
    unknown = [role for role in models if role not in train.roles]
    if unknown or not models:
        raise TraceError(
            f"--model must name models of the trace ({', '.join(train.roles)}); got {', '.join(models) or 'none'}"
        )
    ids = train.problems["problem_id"].to_list()
    part_of = dict(zip(ids, probe_parts(ids, seed)))
    probes, reports, fitted_on = {}, [], set()
    for role in models:
        roots, labels = own_chain_labels(train, role)
        features = hidden_matrix(train, role, layer, where, roots["problem_id"])
        part = np.array([part_of[pid] for pid in roots["problem_id"].to_list()])
        probes[role], report = _fit_one(features, labels, part, role, seed)
        reports.append(report)
        fitted_on |= set(roots["problem_id"].filter(pl.Series(part == "fit")).to_list())
    saved = {
        "format": PIK_FORMAT,
        "version": PIK_VERSION,
        "layer": layer,
        "where": where,
        "probes": probes,
        "metrics": {report.model: asdict(report) for report in reports},
        "seed": seed,
        "train_problem_ids": sorted(fitted_on),
        "split_seed": split_seed,
        "split_fractions": [float(f) for f in fractions],
    }
    buffer = io.BytesIO()
    joblib.dump(saved, buffer)
    write_atomic(out, buffer.getvalue())
    return reports
