"""Options and arguments that several commands take, each declared once here.

Where commands share an option's meaning word for word it is a constant; where each says what the option means
for it (what --out writes, what --force replaces) it is a function of that help text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def trace_dir_argument(help: str = "Trace directory.") -> Any:
    return typer.Argument(..., help=help)


TRACE_DIR = trace_dir_argument()
GENERATED_TRACE_DIR = trace_dir_argument("Trace directory (written by trace gen).")


def out_option(help: str, default: Path | None = None) -> Any:
    """``--out``; ``default=...`` makes it required."""
    return typer.Option(default, "--out", help=help)


def force_option(help: str = "Replace the --out file if it exists.") -> Any:
    return typer.Option(False, "--force", help=help)


FORCE = force_option()


def grades_option(
    help: str = "Grade set of the final steps: default (the steps' own grades) or one written by trace regrade.",
) -> Any:
    return typer.Option(None, "--grades", help=help)


GRADES = grades_option()


def split_option(help: str) -> Any:
    return typer.Option("test", "--split", help=help)


def split_seed_option(help: str) -> Any:
    return typer.Option(0, "--split-seed", help=help)


def split_fractions_option(help: str) -> Any:
    return typer.Option("0.5,0.1,0.4", "--split-fractions", help=help)


def cost_option(help: str) -> Any:
    return typer.Option("flops", "--cost", help=help)


def price_option(help: str) -> Any:
    return typer.Option([], "--price", help=help)


def seed_option(help: str) -> Any:
    return typer.Option(0, "--seed", help=help)


def backend_option(help: str) -> Any:
    return typer.Option(None, "--backend", help=help)
