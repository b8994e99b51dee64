"""The cascade's P(IK) probes: their data, the 80/10/10 division, the fit, and the saved file.

A probe (``new_probe``: standardised prompt hidden state -> MLP with 64 hidden units, scikit-learn)
learns whether a model's own solution (its all-own-model chain from the root) ends correct. The
problems it may see (a replay's train split) are divided 80/10/10 by a hash of their ids
(``probe_parts``): it is fitted on 80% for each L2 penalty of a small grid, the one with the lowest
validation log loss is kept, and its accuracy, F1 and AUROC on the last 10% are its report. The same
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
from replay.splits import hash_uniform
from replay.walk import Costs, walk_chains
from tracestore.errors import TraceError

PIK_FORMAT = "trace-pik"
PIK_VERSION = 2  # 2: one layer per model ("layers"), chosen by probe_layer
PAPER_LAYER = 24
AUTO_LAYER = "auto"
DEFAULT_WHERE = "prompt_last"
PARTS = ("fit", "validation", "test")
PROBE_FRACTIONS = (0.8, 0.1, 0.1)
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def probe_layer(data: ReplayData, role: str, layer: int | str) -> int:
    """The hidden-state layer of ``role``'s probe: ``layer`` itself, or for ``auto`` the paper's layer 24 when
    the model has more than 24 layers, else its last (-1)."""
    if layer != AUTO_LAYER:
        try:
            return int(layer)
        except (TypeError, ValueError):
            raise TraceError(f"P(IK) layer must be an integer or {AUTO_LAYER}, got {layer!r}") from None
    n_layer = data.manifest.model(role).get("n_layer")
    if not isinstance(n_layer, int):
        raise TraceError(
            f"P(IK) layer {AUTO_LAYER} needs trace.json models.{role}.n_layer; name the layer instead (e.g. -1)"
        )
    return PAPER_LAYER if n_layer > PAPER_LAYER else -1


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


def fit_probe(features: np.ndarray, labels: np.ndarray, part: np.ndarray, role: str, seed: int):
    """The probe with the L2 penalty of L2_GRID whose validation log loss is lowest, fitted on the fit part, and
    its report on the test part."""
    from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score

    if len(np.unique(labels)) < 2:
        raise TraceError(
            f"cannot fit the P(IK) probe of model {role}: its {labels.size} complete solutions are all "
            f"{'correct' if labels.all() else 'wrong'} (a cascade can do without P(IK): pik=false)"
        )
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
            f"{'correct' if labels[fit].all() else 'wrong'} (a cascade can do without P(IK): pik=false)"
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


def fit_probes(train: ReplayData, roles: list[str], layer: int | str, where: str, seed: int):
    """One probe per role on ``train`` divided 80/10/10: (probes, layers, reports, problem ids fitted on)."""
    from threadpoolctl import threadpool_limits

    ids = train.problems["problem_id"].to_list()
    part_of = dict(zip(ids, probe_parts(ids, seed)))
    probes, layers, reports, fitted_on = {}, {}, [], set()
    for role in roles:
        layers[role] = probe_layer(train, role, layer)
        roots, labels = own_chain_labels(train, role)
        features = hidden_matrix(train, role, layers[role], where, roots["problem_id"])
        part = np.array([part_of[pid] for pid in roots["problem_id"].to_list()])
        with threadpool_limits(limits=1):  # BLAS splits the MLP's products by thread count: one, the same probe
            probes[role], report = fit_probe(features, labels, part, role, seed)
        reports.append(report)
        fitted_on |= set(roots["problem_id"].filter(pl.Series(part == "fit")).to_list())
    return probes, layers, reports, fitted_on


def load_probes(path: str | Path) -> dict:
    """The dict of a ``trace train pik`` file, checked."""
    import joblib

    return load_artifact(path, joblib.load, "P(IK) probe", PIK_FORMAT, PIK_VERSION, ("layers", "where", "probes"))
