"""`trace train pik`: fit the cascade's P(IK) probes and report how well they predict.

The probes are fitted as ``replay.pik`` describes (on the train split's own-model solutions, the L2 penalty
chosen on the calibration split, metrics on the test split) and saved with their layers, metrics and where they
were fitted (``fitted_on``), so that `--router cascade --param probe=FILE` replays them on this trace's test split
or on another trace of the same setting, and the rows of the problems they saw are marked.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict

from replay.artifacts import fit_record, load_split_data
from replay.pik import AUTO_LAYER, DEFAULT_WHERE, PIK_FORMAT, PIK_VERSION, ProbeReport, fit_probes
from replay.splits import DEFAULT_FRACTIONS, DEFAULT_SPLIT_SEED, SplitSpec
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
    split_by: str | None = None,
    force: bool = False,
) -> tuple[list[ProbeReport], dict[str, int]]:
    """Fit one probe per model in ``models`` on the splits of the trace at ``root``; write them to ``out``
    (replacing an existing file only with ``force``). Returns the probes' reports and the layer each read."""
    import joblib

    check_output_file(out, force=force)
    spec = SplitSpec(split_seed, tuple(fractions), split_by or None)
    data = load_split_data(root, spec)
    if data.train.problems.height == 0:
        raise TraceError(f"the train split of {root} holds no problems ({spec.describe()})")
    unknown = [role for role in models if role not in data.train.roles]
    if unknown or not models:
        raise TraceError(
            f"--model must name models of the trace ({', '.join(data.train.roles)}); got {', '.join(models) or 'none'}"
        )
    probes, layers, reports, fitted_on = fit_probes(data.train, data.calibration, data.test, models, layer, where, seed)
    saved = {
        "format": PIK_FORMAT,
        "version": PIK_VERSION,
        "layers": layers,
        "where": where,
        "probes": probes,
        "metrics": {report.model: asdict(report) for report in reports},
        "seed": seed,
        "fitted_on": fit_record(data.train, "P(IK) probes", fitted_on, hidden_roles=models),
    }
    buffer = io.BytesIO()
    joblib.dump(saved, buffer)
    write_atomic(out, buffer.getvalue())
    return reports, layers
