"""The cascade's P(IK) probes: their data, the fit, and the saved file.

A probe (``new_probe``: standardised prompt hidden state -> MLP with 64 hidden units, scikit-learn)
learns whether a model's own solution (its all-own-model chain from the root; never steps another model's
step precedes, so the probe does not depend on which routers a trace was closed over) ends correct. As the
paper does it (its 80/10/10 is ``--split-fractions 0.8,0.1,0.1``): it is fitted on the train split for each
L2 penalty of a small grid, the penalty with the lowest log loss on the calibration split is kept, and its
accuracy, F1 and AUROC on the test split are its report. A small trace gives a weaker probe, never an error:
without calibration rows the penalty is the grid's first, without test rows the metrics are NaN, and when
every train solution is right (or every one wrong) the probe is that rate (``ConstantProbe``). The same
procedure serves `trace train pik` and the cascade router fitting its own probes.

The hidden state is read at the paper's layer 24 when the model has that many layers, else at its
last (``probe_layer``; trace.json's ``n_layer`` says which).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from replay.artifacts import load_artifact
from replay.data import ReplayData
from replay.walk import Costs, walk_chains
from tracestore.errors import TraceError

PIK_FORMAT = "trace-pik"
PIK_VERSION = 2  # 2: one layer per model ("layers"), chosen by probe_layer
PAPER_LAYER = 24
AUTO_LAYER = "auto"
DEFAULT_WHERE = "prompt_last"
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def probe_layer(data: ReplayData, role: str, layer: int | str) -> int:
    """The hidden-state layer of ``role``'s probe: ``layer`` itself, or for ``auto`` the paper's layer 24 when
    the model has more than 24 layers, else its last (-1)."""
    if layer != AUTO_LAYER:
        return layer_for_blocks(layer, None)
    n_layer = data.manifest.model(role).get("n_layer")
    if not isinstance(n_layer, int):
        raise TraceError(
            f"P(IK) layer {AUTO_LAYER} needs trace.json models.{role}.n_layer; name the layer instead (e.g. -1)"
        )
    return layer_for_blocks(layer, n_layer)


def layer_for_blocks(layer: int | str, n_layer: int | None) -> int:
    """``layer`` as an integer; ``auto``: the paper's layer 24 for a model of more than 24 blocks (``n_layer``),
    else its last (-1)."""
    if layer == AUTO_LAYER:
        return PAPER_LAYER if n_layer > PAPER_LAYER else -1
    try:
        return int(layer)
    except (TypeError, ValueError):
        raise TraceError(f"P(IK) layer must be an integer or {AUTO_LAYER}, got {layer!r}") from None


def new_probe(seed: int, l2: float = 1e-4):
    """An unfitted P(IK) probe (a scikit-learn Pipeline): standardised hidden state -> MLP with 64 hidden
    units (L2 penalty ``l2``)."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(), MLPClassifier(hidden_layer_sizes=(64,), alpha=l2, max_iter=2000, random_state=seed)
    )


def own_chain_labels(data: ReplayData, role: str) -> tuple[pl.DataFrame, np.ndarray]:
    """(problem_id and world of every root whose all-``role`` solution is cached to its end, whether that
    solution is correct)."""
    roots = data.roots
    chain = walk_chains(data, Costs(data, None), roots["node"].to_numpy(), data.roles.index(role))
    done = chain.final_step >= 0
    return roots.filter(pl.Series(done)).select("problem_id", "world"), data.tree.step_correct[chain.final_step[done]]


def hidden_matrix(data: ReplayData, role: str, layer: int, where: str, problem_ids: pl.Series) -> np.ndarray:
    """The hidden-state vector of ``role`` at (``layer``, ``where``) for each problem id, as rows of a matrix."""
    vectors = (
        data.hidden.filter((pl.col("model") == role) & (pl.col("layer") == layer) & (pl.col("where") == where))
        .select("problem_id", "vector")
        .collect()
    )
    if vectors["problem_id"].is_duplicated().any():
        raise TraceError(
            f"hidden has more than one {where} vector of model {role} at layer {layer} "
            f"for problem {vectors.filter(pl.col('problem_id').is_duplicated())['problem_id'][0]!r}"
        )
    aligned = pl.DataFrame({"problem_id": problem_ids}).join(
        vectors, on="problem_id", how="left", maintain_order="left"
    )
    lacking = aligned.filter(pl.col("vector").is_null())
    if lacking.height:
        raise TraceError(
            f"P(IK) needs the {where} hidden state of model {role} at layer {layer}, "
            f"which the trace lacks for problem {lacking['problem_id'][0]!r} (store it with trace gen "
            "--hidden-layers; a cascade can do without: pik=false)"
        )
    widths = aligned["vector"].list.len().unique()
    if len(widths) != 1:
        raise TraceError(f"hidden vectors of model {role} at layer {layer} differ in length")
    return aligned["vector"].explode().to_numpy().astype(np.float64).reshape(aligned.height, widths[0])


@dataclass(frozen=True)
class ProbeReport:
    model: str
    n_fit: int  # (problem, world) pairs of the train split whose own-model solution is complete
    n_calibration: int  # ... of the calibration split (the L2 penalty is chosen on them)
    n_test: int  # ... of the test split (the metrics)
    positive_rate: float  # share of correct own solutions in the train split
    l2: float  # chosen by calibration log loss (the grid's first without calibration rows)
    calibration_log_loss: float  # NaN without calibration rows
    test_accuracy: float  # NaN without test rows
    test_f1: float
    test_auroc: float  # NaN when the test split holds one class only
    constant: bool  # every train solution right (or every one wrong): the probe is that rate


class ConstantProbe:
    """P(IK) = the train split's rate of correct solutions, for every prompt: the probe when that rate is 0 or 1."""

    def __init__(self, rate: float):
        self.rate = rate

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return np.tile([1.0 - self.rate, self.rate], (len(features), 1))


@dataclass(frozen=True)
class ProbeData:
    """One split's rows for one model's probe: the problems, their hidden states and whether the solution is
    right."""

    problem_ids: list[str]
    features: np.ndarray
    labels: np.ndarray

    @classmethod
    def of(cls, data: ReplayData | None, role: str, layer: int, where: str) -> ProbeData:
        if data is None or data.problems.height == 0:
            return cls([], np.zeros((0, 0)), np.zeros(0, dtype=bool))
        roots, labels = own_chain_labels(data, role)
        features = hidden_matrix(data, role, layer, where, roots["problem_id"]) if roots.height else np.zeros((0, 0))
        return cls(roots["problem_id"].to_list(), features, np.asarray(labels, dtype=bool))


def fit_probe(fit: ProbeData, calibration: ProbeData, test: ProbeData, role: str, seed: int):
    """The probe with the L2 penalty of L2_GRID whose calibration log loss is lowest, fitted on ``fit``, and its
    report on ``test``."""
    from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score

    if fit.labels.size == 0:
        raise TraceError(
            f"cannot fit the P(IK) probe of model {role}: the train split holds no complete {role} solution "
            "(a cascade can do without P(IK): pik=false)"
        )
    constant = len(np.unique(fit.labels)) < 2
    best = (float("nan"), L2_GRID[0], ConstantProbe(float(fit.labels.mean())))
    if not constant:
        for l2 in L2_GRID:
            probe = new_probe(seed, l2).fit(fit.features, fit.labels)
            if calibration.labels.size == 0:
                best = (float("nan"), l2, probe)
                break
            p_calibration = probe.predict_proba(calibration.features)[:, 1]
            loss = log_loss(calibration.labels, p_calibration, labels=[False, True])
            if np.isnan(best[0]) or loss < best[0]:
                best = (loss, l2, probe)
    loss, l2, probe = best
    nan = float("nan")
    accuracy = f1 = auroc = nan
    if test.labels.size:
        p_test = probe.predict_proba(test.features)[:, 1]
        accuracy = float(accuracy_score(test.labels, p_test >= 0.5))
        f1 = float(f1_score(test.labels, p_test >= 0.5, zero_division=0.0))
        auroc = float(roc_auc_score(test.labels, p_test)) if len(np.unique(test.labels)) == 2 else nan
    report = ProbeReport(
        model=role,
        n_fit=int(fit.labels.size),
        n_calibration=int(calibration.labels.size),
        n_test=int(test.labels.size),
        positive_rate=float(fit.labels.mean()),
        l2=l2,
        calibration_log_loss=float(loss),
        test_accuracy=accuracy,
        test_f1=f1,
        test_auroc=auroc,
        constant=constant,
    )
    return probe, report


def fit_probes(
    train: ReplayData,
    calibration: ReplayData | None,
    test: ReplayData | None,
    roles: list[str],
    layer: int | str,
    where: str,
    seed: int,
):
    """One probe per role, fitted on ``train``, its L2 penalty chosen on ``calibration``, its report on ``test``
    (either may be None: none held out): (probes, layers, reports, problem ids fitted on)."""
    from threadpoolctl import threadpool_limits

    probes, layers, reports, fitted_on = {}, {}, [], set()
    for role in roles:
        layers[role] = probe_layer(train, role, layer)
        parts = [ProbeData.of(data, role, layers[role], where) for data in (train, calibration, test)]
        with threadpool_limits(limits=1):  # BLAS splits the MLP's products by thread count: one, the same probe
            probes[role], report = fit_probe(*parts, role, seed)
        reports.append(report)
        fitted_on |= set(parts[0].problem_ids)
    return probes, layers, reports, fitted_on


def load_probes(path: str | Path) -> dict:
    """The dict of a ``trace train pik`` file, checked."""
    import joblib

    return load_artifact(path, joblib.load, "P(IK) probe", PIK_FORMAT, PIK_VERSION, ("layers", "where", "probes"))
