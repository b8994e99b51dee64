"""Every default is written once: each option of a command that the options dataclass it builds (or the library
function it calls) also has defaults to the library's value, read from the command line Typer builds, so the two
cannot drift apart. Each test names the options it compares, so an option that loses its counterpart fails too."""

from __future__ import annotations

import dataclasses
import inspect

import typer.main

from analysis.options import ReportOptions
from cli import app
from replay import api
from replay.splits import SplitSpec, parse_fractions
from replay.train_pik import train_pik
from replay.train_policy import Hyperparameters
from replay.train_steer import train_steer
from tracegen.backends.base import StepSampling
from tracegen.backends.endpoint_spec import ClientOptions
from tracegen.distributed import run_distributed
from tracegen.hidden import parse_layers
from tracegen.options import AuditOptions, GenOptions, RayOptions
from tracegen.prompts import STEP_DELIMITER


def cli_defaults(*path: str) -> dict:
    """The defaults of the optional options of `trace PATH...`, by parameter name."""
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {p.name: p.default for p in command.params if p.param_type_name == "option" and not p.required}


def dataclass_defaults(cls) -> dict:
    return {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }


def parameter_defaults(function) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items() if p.default is not p.empty}


def compare(cli: dict, library: dict, renamed: dict | None = None, cli_form: dict | None = None) -> set[str]:
    """Assert that each option that ``library`` has (as ``renamed[option]`` where the names differ) defaults to its
    value there (after ``cli_form[option]`` turns the command line's text into it); the options compared."""
    renamed, cli_form = renamed or {}, cli_form or {}
    compared = set()
    for option, default in cli.items():
        name = renamed.get(option, option)
        if name in library:
            value = cli_form[option](default) if option in cli_form else default
            assert value == library[name], f"--{option.replace('_', '-')}: {default!r}, the library: {library[name]!r}"
            compared.add(option)
    return compared


def test_gen_defaults_are_gen_options():
    cli = cli_defaults("gen")
    compared = compare(
        cli,
        dataclass_defaults(GenOptions),
        cli_form={"hidden_layers": parse_layers, "routers": lambda v: v or (), "api": lambda v: tuple(v or ())},
    )
    assert compared == {
        "split", "limit", "level", "worlds", "expand", "depth", "temperature", "top_p", "max_step_tokens", "max_steps",
        "topk", "hidden_layers", "backend", "shard", "seed", "timings", "routers", "budget_tokens", "api",
    }  # fmt: skip
    assert compare(cli, dataclass_defaults(RayOptions), renamed={"ray": "address"}) == {
        "ray",
        "workers",
        "gpus_per_worker",
        "cpus_per_worker",
    }
    api_client = compare(cli, dataclass_defaults(ClientOptions), renamed={"request_timeout": "timeout"})
    assert api_client == {"concurrency", "request_timeout", "max_retries", "budget_usd"}


def test_the_sampling_defaults_are_the_engines_and_ray_workers_default_alike():
    options = GenOptions(small="s", large="l", dataset="toy", out="t")
    assert options.step_sampling() == StepSampling(delimiter=STEP_DELIMITER)
    library = parameter_defaults(run_distributed)
    assert [library[name] for name in ("workers", "gpus_per_worker", "cpus_per_worker")] == [
        RayOptions.workers,
        RayOptions.gpus_per_worker,
        RayOptions.cpus_per_worker,
    ]


def test_audit_defaults_are_audit_options():
    compared = compare(cli_defaults("audit"), dataclass_defaults(AuditOptions))
    assert compared == {"sample", "seed", "backend", "min_identical", "out", "force"}


def test_replay_defaults_are_the_python_apis():
    cli = cli_defaults("replay")
    compared = compare(
        cli,
        {**parameter_defaults(api.replay), **dataclass_defaults(api.SweepLimits)},
        renamed={"price": "prices"},
        cli_form={
            "worlds": lambda v: None if v == "all" else v,
            "price": lambda v: v or None,
            "sweep": lambda v: v or None,
        },
    )
    assert compared == {
        "sweep", "split", "cost", "price", "worlds", "allow_overlap", "max_configs", "grades", "memory_check",
        "latency_profile",
    }  # fmt: skip
    compared = compare(
        cli,
        dataclass_defaults(SplitSpec),
        renamed={"split_seed": "seed", "split_fractions": "fractions", "split_by": "by"},
        cli_form={"split_fractions": parse_fractions},
    )
    assert compared == {"split_seed", "split_fractions", "split_by"}


def test_report_defaults_are_report_options():
    compared = compare(
        cli_defaults("report"),
        dataclass_defaults(ReportOptions),
        renamed={"table": "tables"},
        cli_form={"at": tuple, "table": tuple, "policy_log": tuple, "pick_on": tuple},
    )
    assert compared == {
        "pick", "accuracy_floor", "at", "split", "pick_split", "bootstrap", "seed", "policy_log", "steer_gmm", "alpha",
        "table", "grades", "pick_on", "allow_overlap", "latency_profile",
    }  # fmt: skip


def test_train_policy_defaults_are_its_hyperparameters():
    compared = compare(
        cli_defaults("train", "policy"),
        dataclass_defaults(Hyperparameters),
        renamed={"price": "prices"},
        cli_form={
            "split_fractions": parse_fractions,
            "split_by": lambda v: v or "",
            "price": tuple,
            "features": lambda v: v or Hyperparameters.features,
        },
    )
    assert compared == {
        "alpha", "steps", "lr", "batch", "eta", "seed", "delta", "kappa", "entropy_coef", "features", "escalate",
        "cost", "price", "eta_decay", "split_seed", "split_fractions", "split_by", "latency_profile",
    }  # fmt: skip


def test_train_pik_and_steer_defaults_are_their_functions():
    fractions = {"split_fractions": parse_fractions}
    compared = compare(
        cli_defaults("train", "pik"), parameter_defaults(train_pik), {"split_fractions": "fractions"}, fractions
    )
    assert compared == {"layer", "where", "seed", "split_seed", "split_fractions", "split_by", "force"}
    compared = compare(
        cli_defaults("train", "steer"), parameter_defaults(train_steer), {"split_fractions": "fractions"}, fractions
    )
    assert compared == {"min_samples", "seed", "split_seed", "split_fractions", "split_by", "force"}
