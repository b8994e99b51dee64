"""`trace train policy|pik|steer`: fit routers' learned parts on a trace's train split (CPU)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from commands.console import console
from commands.options import (
    LATENCY_PROFILE,
    TRACE_DIR,
    cost_option,
    force_option,
    out_option,
    parameter_default,
    price_option,
    seed_option,
    split_by_option,
    split_fractions_option,
    split_seed_option,
)
from replay.artifacts import file_sha256
from replay.train_pik import train_pik
from replay.train_policy import Hyperparameters, train_policy
from replay.train_steer import train_steer

SPLIT_SEED = split_seed_option("Seed of the hash that assigns problems to splits (as in trace replay).")
SPLIT_FRACTIONS = split_fractions_option(
    "train,calibration,test fractions (as in trace replay); fitting uses train only."
)
SPLIT_BY = split_by_option()


def train_policy_command(
    trace_dir: Path = TRACE_DIR,
    out: Path = out_option(
        "Policy file to write; the training log goes next to it as NAME.log.parquet.", Path("policy.pt")
    ),
    force: bool = force_option("Replace the policy file and its log if they exist."),
    alpha: float = typer.Option(
        Hyperparameters.alpha,
        "--alpha",
        help="Allowed miscoverage: P(correct or large model alone wrong) >= 1 - alpha.",
    ),
    steps: int = typer.Option(Hyperparameters.steps, "--steps", help="Policy updates."),
    lr: float = typer.Option(Hyperparameters.lr, "--lr", help="Adam learning rate of the critics (success and cost)."),
    batch: int = typer.Option(
        Hyperparameters.batch, "--batch", help="Episodes (problem, world) rolled out per update."
    ),
    eta: float = typer.Option(Hyperparameters.eta, "--eta", help="Step size of the kappa update."),
    seed: int = seed_option(
        "Seed of initialisation, episode sampling and actions; same seed, same file bytes.", Hyperparameters.seed
    ),
    delta: float = typer.Option(
        Hyperparameters.delta, "--delta", help="Trust region: mean KL between successive policies at most this (nats)."
    ),
    kappa: float = typer.Option(
        Hyperparameters.kappa, "--kappa", help="Initial threshold: escalate iff pi(escalate | o) >= kappa."
    ),
    entropy_coef: float = typer.Option(
        Hyperparameters.entropy_coef,
        "--entropy-coef",
        help="Weight of the policy's entropy in the objective (keeps it from saturating).",
    ),
    features: str = typer.Option(
        None,
        "--features",
        help=(
            "Observation: comma-separated steps columns and/or difficulty (default: "
            f"{','.join(Hyperparameters.features)}; is_final is constant, so observed as 0, under --escalate after, "
            "where every decision follows a non-final step, and informs --escalate replace)."
        ),
    ),
    escalate: str = typer.Option(
        Hyperparameters.escalate,
        "--escalate",
        help=(
            "Decision process: after (the small step that triggers escalation is kept, the large model writes the "
            "steps after it) or replace (that step is discarded and the large model rewrites it); replay the "
            "policy with the same --param escalate."
        ),
    ),
    cost: str = cost_option(
        "Per-step cost the policy minimises, as trace replay --cost adds it up: flops (TFLOPs of generated "
        "tokens), flops+prefill, kaplan, api (US cents at --price prices), latency (seconds; --latency-profile), "
        "an installed cost model or FILE.py:Class, or tokens "
        "(large-model generated tokens).",
        Hyperparameters.cost,
    ),
    price: list[str] = price_option(
        "With --cost api (which counts US cents): a price per model role or scorer of the trace, once each, "
        "repeatable, as trace replay takes them: ROLE=MODEL (gpt-4.1-mini, gpt-4o-mini, ...), "
        "ROLE=input/cached/output in USD per 1M tokens, or ROLE=0 for a free (open) model; every role needs one, "
        "there is no default."
    ),
    latency_profile: Path = LATENCY_PROFILE,
    eta_decay: float = typer.Option(
        Hyperparameters.eta_decay,
        "--eta-decay",
        help=(
            "kappa step size at policy step k: eta / k^eta_decay (0: constant, the paper's setting; in (0.5, 1]: "
            "sum eta_k = inf and sum eta_k^2 < inf, the conditions of the paper's guarantee)."
        ),
    ),
    draft: str = typer.Option(
        parameter_default(train_policy, "draft"),
        "--draft",
        help="Role the policy starts on (default: the trace's smallest model, m0 or small).",
    ),
    target: str = typer.Option(
        parameter_default(train_policy, "target"),
        "--target",
        help=(
            "Largest role the policy may escalate to (default: the trace's largest). The models in play are "
            "--draft .. --target in size order; with three or more, the action is continue or escalate to any "
            "larger one."
        ),
    ),
    models: str = typer.Option(
        parameter_default(train_policy, "models"),
        "--models",
        help="Models in play as comma-separated roles, smallest first, any subset (e.g. m0,m2); instead of "
        "--draft/--target.",
    ),
    split_seed: int = SPLIT_SEED,
    split_fractions: str = SPLIT_FRACTIONS,
    split_by: str = SPLIT_BY,
) -> None:
    """Train the escalation policy of --router policy (CMDP, V-trace critics, CPO steps, calibrated kappa).

    Decisions (escalate=after): after each non-final small step t the policy reads that step's features and
    continues with the small model or escalates (the large model writes steps t+1, t+2, ... to the end). Critics:
    V-trace toward the thresholded policy S(a|o) = 1{pi(a|o) >= kappa} / #{a': pi(a'|o) >= kappa}, rho = min(2,
    S/pi). CPO step: cost in --cost units (scaled by the large model alone's mean cost) under the
    constraint P(correct or large alone wrong) >= 1 - alpha computed exactly under S on the train split. kappa:
    kappa - eta (1 - coverage - alpha) after each step, coverage of the deployed rule (escalate iff
    pi(escalate | o) >= kappa) on fresh train episodes. Only the train split is read.

    K models in play (e.g. m0, m1, m2): after each non-final step of the current model the action is continue or
    escalate to any larger model (one-way; a middle model decides again); the policy also sees which model it
    is on; deployed: the largest model whose pi >= kappa. Escalations the trace cannot play out (m0 -> m1 -> m2
    on a comb) are left out of training; replays report them as misses for trace gen --expand closure.

    Example: trace train policy runs/toy --alpha 0.02 --steps 1000 --seed 0 --out policy.pt
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from replay.costs import parse_price
    from replay.splits import parse_fractions

    chosen = (
        tuple(name.strip() for name in features.split(",") if name.strip()) if features else Hyperparameters.features
    )
    hp = Hyperparameters(
        alpha=alpha,
        steps=steps,
        lr=lr,
        batch=batch,
        eta=eta,
        seed=seed,
        delta=delta,
        kappa=kappa,
        entropy_coef=entropy_coef,
        features=chosen,
        escalate=escalate,
        cost=cost,
        prices=tuple(parse_price(p) for p in price),
        latency_profile=str(latency_profile) if latency_profile else None,
        eta_decay=eta_decay,
        split_seed=split_seed,
        split_fractions=parse_fractions(split_fractions),
        split_by=split_by or "",
    )
    columns = (
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[state]}"),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("train", total=steps, state="")

        def show(row):
            progress.update(
                task,
                completed=row["step"],
                state=f"kappa {row['kappa']:.3f} coverage {row['coverage']:.2f} case {row['case']}",
            )

        result = train_policy(trace_dir, out, hp, on_step=show, force=force, draft=draft, target=target, models=models)
    if not result.has_verifier:
        console.print(
            "no verifier scores in the trace: a trajectory is covered when correct or the large model alone is wrong"
        )
    for warning in result.warnings():  # also recorded in the policy file ("flags"); trace report marks its row
        console.print(f"[yellow]{escape(warning)}[/]")
    console.print(
        f"[green]wrote[/] {escape(str(result.policy_path))} and {escape(str(result.log_path))}: "
        f"kappa {result.kappa:.4f}; on the "
        f"{result.n_train_episodes:,} train episodes (escalate={result.escalate}) coverage "
        f"{result.train_coverage:.4f} (target >= {1 - alpha:g}), accuracy {result.train_accuracy:.4f}, cost "
        f"{result.train_cost:.4g} {result.cost_unit} per query ({result.train_cost_share:.4f} of the large model "
        f"alone); {result.seconds:.1f}s"
    )
    console.print(f"policy file SHA-256 {result.sha256}", highlight=False, soft_wrap=True)


def train_pik_command(
    trace_dir: Path = TRACE_DIR,
    model: str = typer.Option(
        "small", "--model", help="Model role(s) to probe, comma-separated (all but the largest of a cascade)."
    ),
    layer: str = typer.Option(
        parameter_default(train_pik, "layer"),
        "--layer",
        help="Layer of the stored prompt hidden state: auto (the paper's 24 when the model has more layers, else "
        "the last), or a number (-1 = last).",
    ),
    where: str = typer.Option(
        parameter_default(train_pik, "where"), "--where", help="Position of the stored hidden state."
    ),
    out: Path = out_option("Probe file for --router cascade --param probe=FILE.", Path("pik.joblib")),
    force: bool = force_option("Replace the probe file if it exists."),
    seed: int = seed_option(
        "Seed of the probes and of the 80/10/10 fit/validation/test division.", parameter_default(train_pik, "seed")
    ),
    split_seed: int = SPLIT_SEED,
    split_fractions: str = SPLIT_FRACTIONS,
    split_by: str = SPLIT_BY,
) -> None:
    """Fit the cascade's P(IK) probes (MLP on the prompt hidden state predicting the model's own correctness).

    Example: trace train pik runs/toy --model small --out pik.joblib
    """
    from rich.table import Table

    from replay.splits import parse_fractions

    models = [role.strip() for role in model.split(",") if role.strip()]
    reports, layers = train_pik(
        trace_dir,
        out,
        models,
        layer=layer,
        where=where,
        seed=seed,
        split_seed=split_seed,
        fractions=parse_fractions(split_fractions),
        split_by=split_by,
        force=force,
    )
    table = Table(title=f"P(IK) probes ({where}): fitted on train, L2 chosen on calibration, metrics on test")
    for name in ("Model", "Layer", "Train / cal. / test", "Correct (train)", "L2", "Accuracy", "F1", "AUROC"):
        table.add_column(name, justify="left" if name == "Model" else "right")

    def shown(value: float) -> str:
        return "-" if value != value else f"{value:.3f}"

    for r in reports:
        table.add_row(
            r.model,
            str(layers[r.model]),
            f"{r.n_fit:,} / {r.n_calibration:,} / {r.n_test:,}",
            f"{100 * r.positive_rate:.1f}%",
            "-" if r.constant else f"{r.l2:g}",
            shown(r.test_accuracy),
            shown(r.test_f1),
            shown(r.test_auroc),
        )
    console.print(table)
    for r in reports:
        if r.constant:
            console.print(
                f"[yellow]every train solution of model {r.model} is {'right' if r.positive_rate else 'wrong'}: its "
                f"P(IK) is that rate for every prompt[/]"
            )
        if not r.n_calibration:
            console.print(f"[yellow]no calibration rows for model {r.model}: L2 {r.l2:g}, the grid's first[/]")
    console.print(f"[green]wrote[/] {escape(str(out))}", highlight=False)
    console.print(f"probe file SHA-256 {file_sha256(out)}", highlight=False, soft_wrap=True)


def train_steer_command(
    trace_dir: Path = TRACE_DIR,
    out: Path = out_option(
        "Mixture file for --router steer --param gmms=FILE and trace report --steer-gmm.", Path("steer.json")
    ),
    force: bool = force_option("Replace the mixture file if it exists."),
    min_samples: int = typer.Option(
        parameter_default(train_steer, "min_samples"),
        "--min-samples",
        help="Step indices with fewer train confidences use the mixture of the largest fitted index below.",
    ),
    seed: int = seed_option("Seed of the mixtures' initialisation.", parameter_default(train_steer, "seed")),
    split_seed: int = SPLIT_SEED,
    split_fractions: str = SPLIT_FRACTIONS,
    split_by: str = SPLIT_BY,
) -> None:
    """Fit STEER's two-component Gaussian mixtures of the small model's step confidence, per step index.

    The router then uses, at step index d, the mixture of the largest fitted index <= d, and calls a small step
    with confidence c unconfident iff P(low | c) > tau and c is below the other component's mean (low = the
    component with the lower mean). On a trace of K models every model but the largest gets its own mixtures
    (STEER escalates along m0 -> m1 -> ..., judging each model's steps by its own).

    Example: trace train steer runs/toy --out steer.json
    """
    from rich.table import Table

    from replay.splits import parse_fractions

    if min_samples < 2:
        raise typer.BadParameter(f"--min-samples must be at least 2, got {min_samples}")
    rows = train_steer(
        trace_dir,
        out,
        min_samples=min_samples,
        seed=seed,
        split_seed=split_seed,
        fractions=parse_fractions(split_fractions),
        split_by=split_by,
        force=force,
    )
    table = Table(title="STEER mixtures of conf_max_logit_math (train split)")
    several = rows["model"].n_unique() > 1
    for name in ("Model",) * several + ("Step", "n", "Low mean", "Low sd", "Low weight", "High mean", "High sd"):
        table.add_column(name, justify="right")
    for row in rows.iter_rows(named=True):
        table.add_row(
            *(row["model"],) * several,
            str(row["depth"]),
            f"{row['n']:,}",
            f"{row['low_mean']:.4g}",
            f"{row['low_std']:.3g}",
            f"{row['low_weight']:.3f}",
            f"{row['high_mean']:.4g}",
            f"{row['high_std']:.3g}",
        )
    console.print(table)
    console.print(f"[green]wrote[/] {escape(str(out))}", highlight=False)
    console.print(f"mixture file SHA-256 {file_sha256(out)}", highlight=False, soft_wrap=True)
