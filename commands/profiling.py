"""`trace profile`: measure a trace's models' latency on this machine, for `--cost latency`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from commands.console import console
from commands.options import (
    GENERATED_TRACE_DIR,
    backend_option,
    force_option,
    out_option,
    parameter_default,
    seed_option,
)
from tracegen import profile as profiling


def _lengths(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{option} must be comma-separated token counts like 16,64, got {text!r}") from None


def profile(
    trace_dir: str = GENERATED_TRACE_DIR,
    out: Path = out_option("Profile file to write (default TRACE_DIR/latency.json)."),
    backend: str = backend_option("Engine the models run on: vllm (default where installed) or hf."),
    prefill: str = typer.Option(
        ",".join(map(str, profiling.DEFAULT_PREFILL)), "--prefill", help="Prompt lengths timed (tokens)."
    ),
    decode: str = typer.Option(
        ",".join(map(str, profiling.DEFAULT_DECODE)), "--decode", help="Most tokens each timed request generates."
    ),
    repeats: int = typer.Option(
        parameter_default(profiling.measure_profile, "repeats"), "--repeats", help="Timed requests per grid point."
    ),
    seed: int = seed_option("Seed of the random prompts.", parameter_default(profiling.measure_profile, "seed")),
    threads: int = typer.Option(
        None, "--threads", help="torch intra-op threads (default torch's); measure as the deployment will run."
    ),
    force: bool = force_option("Replace an existing profile file."),
) -> None:
    """Measure the trace's models' seconds per request on this machine: a latency profile for --cost latency.

    Each model (and a scorer with its own model) is timed at batch size 1 at a grid of prompt and generation
    lengths; per entry overhead + s/prefill token + s/generated token is fitted by least squares and written with
    the fit's residuals, the hardware, engine and versions (TRACE_DIR/latency.json, or --out). API roles are
    fitted from the trace's stored gen_seconds (trace gen --timings). The trace's tables are not changed.

    Example: trace profile runs/toy --backend hf
    """
    path, written = profiling.measure_profile(
        trace_dir,
        out=out,
        backend=backend,
        prefill_lengths=_lengths(prefill, "--prefill"),
        decode_lengths=_lengths(decode, "--decode"),
        repeats=repeats,
        seed=seed,
        threads=threads,
        force=force,
    )
    from rich.table import Table

    table = Table(title=escape(f"latency profile: {written['engine']['name']} on {written['hardware']['summary']}"))
    for name in ("Entry", "Model", "Overhead (ms)", "Prefill (ms/token)", "Decode (ms/token)", "Fit RMS (ms)", "n"):
        table.add_column(name, justify="left" if name in ("Entry", "Model") else "right")
    for name, entry in written["entries"].items():
        table.add_row(
            name,
            escape(entry["model"]),
            f"{1e3 * entry['overhead_s']:.3g}",
            f"{1e3 * entry['prefill_s_per_token']:.3g}",
            f"{1e3 * entry['decode_s_per_token']:.3g}",
            f"{1e3 * entry['residual_rms_s']:.3g}",
            str(entry["n_requests"]),
        )
    console.print(table)
    if written["not_profiled"]:
        console.print(f"[yellow]not profiled (no engine to time here): {', '.join(written['not_profiled'])}[/]")
    console.print(f"wrote {escape(str(path))}", highlight=False)
