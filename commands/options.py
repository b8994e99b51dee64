"""Options and arguments that several commands take, each declared once here.

Where commands share an option's meaning word for word it is a constant; where each says what the option means
for it (what --out writes, what --force replaces) it is a function of that help text. Defaults are never written
here: each comes from the options dataclass or the library function the command calls (``parameter_default``)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import typer

from replay.splits import DEFAULT_FRACTIONS, DEFAULT_SPLIT_SEED


def parameter_default(function, name: str) -> Any:
    """The default of ``function``'s parameter ``name``: where a command calls a library function with keyword
    options, that function's signature is where each default is written."""
    return inspect.signature(function).parameters[name].default


def trace_dir_argument(help: str = "Trace directory.") -> Any:
    return typer.Argument(..., help=help)


TRACE_DIR = trace_dir_argument()
LOCAL_TRACE_DIR = trace_dir_argument("Trace directory: a path, or a file:// URL.")  # an argument of type str
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


def seed_option(help: str, default: int) -> Any:
    return typer.Option(default, "--seed", help=help)


def split_option(help: str, default: str) -> Any:
    return typer.Option(default, "--split", help=help)


def split_seed_option(help: str) -> Any:
    return typer.Option(DEFAULT_SPLIT_SEED, "--split-seed", help=help)


def split_fractions_option(help: str) -> Any:
    return typer.Option(",".join(f"{fraction:g}" for fraction in DEFAULT_FRACTIONS), "--split-fractions", help=help)


def split_by_option(
    help: str = (
        "Take each problem's split from a problems column (split: the dataset's own, e.g. GSM8K's train and test "
        "files) or a file of 'problem_id split' lines, instead of the hash: test-labelled problems are test, "
        "calibration (validation, dev) calibration, and train-labelled ones train or calibration, by the hash in "
        "the ratio of the first two --split-fractions."
    ),
) -> Any:
    return typer.Option(None, "--split-by", help=help)


def split_spec(split_seed: int, split_fractions: str, split_by: str | None):
    """The SplitSpec of the split options (--split-seed, --split-fractions, --split-by)."""
    from replay.splits import SplitSpec, parse_fractions

    return SplitSpec(split_seed, parse_fractions(split_fractions), split_by or None)


def cost_option(help: str, default: str) -> Any:
    return typer.Option(default, "--cost", help=help)


def price_option(help: str) -> Any:
    return typer.Option([], "--price", help=help)


def backend_option(help: str) -> Any:
    return typer.Option(None, "--backend", help=help)


LATENCY_PROFILE = typer.Option(
    None,
    "--latency-profile",
    help=(
        "With --cost latency: the latency profile (JSON written by trace profile, possibly measured on another "
        "machine) giving each model's and scorer's seconds per request; default TRACE_DIR/latency.json."
    ),
)
