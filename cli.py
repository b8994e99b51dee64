"""The `trace` command line: the Typer app, assembled from the command groups in commands/ (one module each)."""

from __future__ import annotations

import typer

from commands import generation, inspection, profiling, replaying, reporting, training
from commands.console import user_errors

app = typer.Typer(
    help="Cache step trees of a small and a large LLM once (gen), then replay any router on a CPU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
train_app = typer.Typer(
    help="Fit routers' learned parts on a trace's train split (CPU) and save them for replay.", no_args_is_help=True
)

# `trace --help` lists the commands in this order
for command in (
    inspection.validate,
    inspection.info,
    inspection.sql,
    generation.gen,
    generation.score,
    profiling.profile,
    replaying.replay,
    reporting.report,
    generation.audit,
    generation.regrade,
    reporting.diff,
):
    app.command(context_settings=inspection.CONTEXT_SETTINGS.get(command.__name__))(user_errors(command))
app.add_typer(train_app, name="train")
for name, command in (
    ("policy", training.train_policy_command),
    ("pik", training.train_pik_command),
    ("steer", training.train_steer_command),
):
    train_app.command(name)(user_errors(command))


if __name__ == "__main__":
    app()
