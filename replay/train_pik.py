"""`trace train pik`: fit the cascade's P(IK) probes and report how well they predict.

The probes are fitted as ``replay.pik`` describes (80/10/10 inside the replay's train split, the L2
penalty chosen on validation, metrics on the last 10%) and saved with their layers and metrics.
Because every problem a probe saw lies in the train split, `--router cascade --param probe=FILE`
can replay it on the test split without leakage.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict

from replay.artifacts import load_train_split
from replay.pik import AUTO_LAYER, DEFAULT_WHERE, PIK_FORMAT, PIK_VERSION, ProbeReport, fit_probes
from replay.splits import DEFAULT_FRACTIONS, DEFAULT_SPLIT_SEED
from tracestore.atomic import write_atomic
from tracestore.errors import TraceError
from tracestore.outputs import check_output_file


def train_pik(
    root: str | os.PathLike,
    out: str | os.PathLike,
    models: list[str],
    *,
    layer: int | str = AUTO_LAYER,
    where: str = DEFAULT_WHERE,
    seed: int = 0,
    split_seed: int = DEFAULT_SPLIT_SEED,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    force: bool = False,
) -> tuple[list[ProbeReport], dict[str, int]]:
    """Fit one probe per model in ``models`` on the train split of the trace at ``root``; write them to ``out``
    (replacing an existing file only with ``force``). Returns the probes' reports and the layer each read."""
    import joblib

    check_output_file(out, force=force)
    train = load_train_split(root, split_seed, fractions)
    unknown = [role for role in models if role not in train.roles]
    if unknown or not models:
        raise TraceError(
            f"--model must name models of the trace ({', '.join(train.roles)}); got {', '.join(models) or 'none'}"
        )
    probes, layers, reports, fitted_on = fit_probes(train, models, layer, where, seed)
    saved = {
        "format": PIK_FORMAT,
        "version": PIK_VERSION,
        "layers": layers,
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
    return reports, layers
