"""Train the toy process reward model (PRM): a Qwen2 body with a one-unit value head that scores
toy-small's draft steps, and save it where RSD finds it (alias ``toy-prm``).

    python -m scripts.toy.train_prm --seed 0 --threads 1

Data: toy-small solutions sampled at temperature 0.7 on training-pool problems (levels 2-4, mostly
the default level 3), regenerated from the seed on every run; plus the same model's greedy
solutions when ``--greedy-share`` > 0. Each solution is split into steps at ``"\\n\\n"`` and each
step labelled with the exact verifier (``verify_steps``; 1 = valid). Input: ``prm_input_ids``
(question, "\\n", every step followed by "\\n"). Loss: binary cross-entropy of the value-head logit at
each step-end token; with ``--aux-weight`` > 0 also at every character of a step, against "the step
so far is a prefix of the exact step that should follow" (zero once a character is wrong), which
tells the model where a step went wrong. The end-token target is always the exact step label.

``--corrupt-share`` adds reference paths with one corrupted step (a misread operand or start, a
wrong digit, a flipped operator, a misplaced box); the shipped PRM was trained without them (they did
not help, see data/toy/CARD.md). ``corruption_check`` logs, per corruption kind, how well the PRM
tells an exact reference step from the same step corrupted: whether it reads the numbers of a step.

Evaluation: AUROC of the step reward (sigmoid of the value at the step end) against exact step labels
on toy-small T=0.7 solutions of held-out problems (``generate(n, split="test", seed=0)``, default
level, sampling seed 1, as ``scripts/toy/evaluate.py`` does), overall and by step depth.
Results are reproducible for a fixed seed and thread count. The learning-rate schedule, optimizer and
update step are train.py's (``lr_at``, ``adamw``, ``optimizer_step``).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2Model

from data.toy import MODELS_DIR
from data.toy.task import (
    DEFAULT_LEVEL,
    STEP_DELIMITER,
    ToyProblem,
    generate,
    parse_question,
    step_result,
    step_text,
    verify_steps,
)
from data.toy.tokenizer import build_tokenizer
from scripts.toy.evaluate import sample_solutions
from scripts.toy.train import adamw, lr_at, optimizer_step, qwen2_config
from tracegen.value_head import (
    SEPARATOR_FIELD,
    ValueHeadModel,
    load_value_head_model,
    prm_input_ids,
    save_value_head_model,
)

LEVEL_WEIGHTS = {2: 1, 3: 3, 4: 1}  # training problems per level, relative
SAMPLE_BATCH = 250

SEPARATOR = "\n"  # after the question and each step (one toy character; RSD's code uses "\n\n")


# ----------------------------------------------------------------------------------------------- data


def expected_step(question: str, previous_steps: list[str]) -> str | None:
    """The exact step that should follow ``previous_steps`` (None when no step can be valid)."""
    start, ops = parse_question(question)
    k = len(previous_steps)
    if k >= len(ops):
        return None
    a = start if k == 0 else step_result(previous_steps[-1])
    op, b = ops[k]
    if a is None or not 0 <= (a + b if op == "+" else a - b) < 100:
        return None
    return step_text(a, op, b, is_last=k == len(ops) - 1)


def prefix_labels(question: str, steps: list[str]) -> list[list[int]]:
    """Per character of every step: is the step so far a prefix of the exact step that should follow?"""
    out = []
    for k, step in enumerate(steps):
        want = expected_step(question, steps[:k])
        labels, ok = [], want is not None
        for i in range(len(step)):
            ok = ok and i < len(want) and step[i] == want[i]
            labels.append(int(ok))
        out.append(labels)
    return out


def encode_example(tokenizer, question: str, text: str) -> dict:
    """PRM input of one sampled solution with its step labels (and per-token prefix labels)."""
    steps = text.split(STEP_DELIMITER)
    ids, ends = prm_input_ids(tokenizer, question, steps, SEPARATOR)
    labels = [int(v) for v in verify_steps(question, steps)]
    token_targets = [-1] * len(ids)  # -1: no per-token target (question, step ends)
    first = len(prm_input_ids(tokenizer, question, [], SEPARATOR)[0])
    for k, chars in enumerate(prefix_labels(question, steps)):
        if ends[k] - first == len(chars):  # one token per character, as the toy tokenizer writes them
            token_targets[first : ends[k]] = chars
        first = ends[k] + 1
    return {"ids": ids, "ends": ends, "labels": labels, "token_targets": token_targets}


def draft_solutions(
    drafter, tokenizer, problems, *, temperature: float, seed: int, batch_size: int = SAMPLE_BATCH
) -> list[str]:
    questions = [p.question for p in problems]
    return [
        text
        for text, _ in sample_solutions(
            drafter, tokenizer, questions, temperature=temperature, seed=seed, batch_size=batch_size
        )
    ]


CORRUPTIONS = ("operand", "start", "digit", "operator", "box")


def _in_range(a: int, op: str, b: int) -> bool:
    return 0 <= a <= 99 and 1 <= b <= 99 and 0 <= (a + b if op == "+" else a - b) <= 99


def _near(x: int, rng: random.Random) -> list[int]:
    """Numbers a careless copy of ``x`` might give: +-1, +-10, digits swapped, one digit replaced."""
    tens, units = divmod(x, 10)
    return [
        x + 1,
        x - 1,
        x + 10,
        x - 10,
        10 * units + tens,
        10 * tens + rng.randrange(10),
        10 * rng.randrange(10) + units,
    ]


def corrupted_path(problem: ToyProblem, rng: random.Random, kind: str) -> list[str]:
    """The reference steps up to a random step k, step k corrupted (``kind``), then steps that continue
    correctly from the corrupted step's result while they can. Labels come from ``verify_steps``."""
    steps, values, ops = problem.solution_steps(), problem.running_values(), problem.ops
    k = rng.randrange(len(ops))
    a, (op, b), last = values[k], ops[k], k == len(ops) - 1
    options = []
    if kind == "operand":
        options = [
            step_text(a, op, x, last) for x in _near(b, rng) + [o[1] for o in ops] if x != b and _in_range(a, op, x)
        ]
    elif kind == "start":
        options = [step_text(x, op, b, last) for x in _near(a, rng) if x != a and _in_range(x, op, b)]
    elif kind == "operator":
        flipped = "-" if op == "+" else "+"
        options = [step_text(a, flipped, b, last)] if _in_range(a, flipped, b) else []
    elif kind == "box":
        options = [step_text(a, op, b, not last)]
    if not options:  # "digit", or no other corruption fits: one digit after the header written wrong
        text = steps[k]
        head = text.index(": ") + 2
        at = rng.choice([i for i, ch in enumerate(text) if ch.isdigit() and i >= head])
        options = [text[:at] + rng.choice([d for d in "0123456789" if d != text[at]]) + text[at + 1 :]]
    path = steps[:k] + [rng.choice(options)]
    for j in range(k + 1, len(ops)):
        r = step_result(path[-1])
        if r is None or not _in_range(r, *ops[j]):
            break
        path.append(step_text(r, *ops[j], is_last=j == len(ops) - 1))
    return path


def training_data(
    drafter,
    tokenizer,
    *,
    n_problems: int,
    seed: int,
    temperature: float,
    greedy_share: float,
    corrupt_share: float = 0.0,
    offset: int = 0,
) -> list[dict]:
    """toy-small drafts on ``n_problems`` training-pool problems (levels by LEVEL_WEIGHTS), labelled;
    plus, for a ``corrupt_share`` of them, a reference path with one corrupted step (``corrupted_path``).

    ``offset`` skips that many problems of every level's seeded stream (a disjoint validation set)."""
    total = sum(LEVEL_WEIGHTS.values())
    rng = random.Random(f"corrupt/{seed}/{offset}")
    examples = []
    for level, weight in LEVEL_WEIGHTS.items():
        n = round(n_problems * weight / total)
        problems = generate(offset + n, split="train", level=level, seed=seed)[offset:]
        n_greedy = round(n * greedy_share)
        texts = draft_solutions(drafter, tokenizer, problems[n_greedy:], temperature=temperature, seed=seed + level)
        if n_greedy:
            texts = draft_solutions(drafter, tokenizer, problems[:n_greedy], temperature=0.0, seed=seed) + texts
        examples += [encode_example(tokenizer, p.question, t) for p, t in zip(problems, texts)]
        for p in problems[: round(n * corrupt_share)]:
            path = corrupted_path(p, rng, CORRUPTIONS[len(examples) % len(CORRUPTIONS)])
            examples.append(encode_example(tokenizer, p.question, STEP_DELIMITER.join(path)))
    return examples


def corruption_check(model, tokenizer, pad_id: int, n: int = 300) -> dict:
    """AUROC of exact reference steps against the same steps corrupted, per corruption kind, on held-out
    problems of the default level: does the PRM read the step, or only guess from the problem?"""
    rng = random.Random("corruption-check")
    out = {}
    for kind in CORRUPTIONS:
        exact, corrupted = [], []
        for p in generate(n, split="test", seed=5):
            path = corrupted_path(p, rng, kind)
            k = verify_steps(p.question, path).index(False)
            corrupted.append(encode_example(tokenizer, p.question, STEP_DELIMITER.join(path[: k + 1])))
            exact.append(encode_example(tokenizer, p.question, STEP_DELIMITER.join(p.solution_steps()[: k + 1])))
        last = np.cumsum([len(e["labels"]) for e in exact]) - 1  # the same steps are cut in both
        good, bad = (step_scores(model, exact, pad_id)[last], step_scores(model, corrupted, pad_id)[last])
        out[kind] = auroc([1] * len(good) + [0] * len(bad), np.concatenate([good, bad]))
    return out


def heldout_data(drafter, tokenizer, n: int) -> tuple[list[dict], list[str]]:
    """toy-small T=0.7 drafts of ``n`` held-out problems of the default level (sampling seed 1)."""
    problems = generate(n, split="test", seed=0)
    texts = draft_solutions(drafter, tokenizer, problems, temperature=0.7, seed=1, batch_size=100)  # as evaluate.py
    return [encode_example(tokenizer, p.question, t) for p, t in zip(problems, texts)], texts


def collate(examples: list[dict], pad_id: int):
    width = max(len(e["ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    token_targets = torch.full((len(examples), width), -1.0)
    rows, cols, labels = [], [], []
    for r, e in enumerate(examples):
        ids[r, : len(e["ids"])] = torch.tensor(e["ids"])
        mask[r, : len(e["ids"])] = 1
        token_targets[r, : len(e["ids"])] = torch.tensor(e["token_targets"], dtype=torch.float)
        rows += [r] * len(e["ends"])
        cols += e["ends"]
        labels += e["labels"]
    return (ids, mask, token_targets, torch.tensor(rows), torch.tensor(cols), torch.tensor(labels, dtype=torch.float))


# ---------------------------------------------------------------------------------------------- model


def prm_config(tokenizer, hidden: int, layers: int, heads: int, intermediate: int) -> Qwen2Config:
    return qwen2_config(
        tokenizer,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
    )


def build_model(tokenizer, args, drafter) -> ValueHeadModel:
    if args.init == "toy-small":
        body = Qwen2Model(copy.deepcopy(drafter.config))
        body.load_state_dict(drafter.model.state_dict())
    else:
        body = Qwen2Model(prm_config(tokenizer, args.hidden, args.layers, args.heads, args.intermediate))
    model = ValueHeadModel(body)
    with torch.no_grad():
        model.summary.weight.zero_()
        model.summary.bias.fill_(1.0)  # most draft steps are valid
    return model


@torch.no_grad()
def step_scores(model: ValueHeadModel, examples: list[dict], pad_id: int, batch: int = 100) -> np.ndarray:
    """sigmoid(value) at every step end, in example order."""
    model.eval()
    out = []
    for i in range(0, len(examples), batch):
        ids, mask, _, rows, cols, _ = collate(examples[i : i + batch], pad_id)
        out.append(torch.sigmoid(model(ids, attention_mask=mask)[rows, cols]))
    return torch.cat(out).numpy()


def auroc(labels, scores) -> float | None:
    """None when the labels are all of one class (JSON null, not NaN)."""
    labels = np.asarray(labels)
    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else None


def measure(model, examples: list[dict], pad_id: int) -> dict:
    scores = step_scores(model, examples, pad_id)
    labels = np.array([label for e in examples for label in e["labels"]])
    depths = np.array([k for e in examples for k in range(len(e["labels"]))])
    return {
        "auroc": auroc(labels, scores),
        "auroc_by_depth": {int(d): auroc(labels[depths == d], scores[depths == d]) for d in np.unique(depths)},
        "steps_by_depth": {int(d): int((depths == d).sum()) for d in np.unique(depths)},
        "valid_step_share": float(labels.mean()),
        "valid_share_by_depth": {int(d): float(labels[depths == d].mean()) for d in np.unique(depths)},
        "n_steps": len(labels),
        "n_solutions": len(examples),
    }


def loss_on_batch(model, batch, aux_weight: float) -> torch.Tensor:
    ids, mask, token_targets, rows, cols, labels = batch
    logits = model(ids, attention_mask=mask)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[rows, cols], labels)
    if aux_weight > 0:
        has = token_targets >= 0
        aux = torch.nn.functional.binary_cross_entropy_with_logits(logits[has], token_targets[has])
        loss = loss + aux_weight * aux
    return loss


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafter", type=Path, default=MODELS_DIR / "toy-small")
    parser.add_argument("--n-problems", type=int, default=16000, help="training problems (one draft each)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--greedy-share", type=float, default=0.0, help="share of training drafts taken greedily")
    parser.add_argument(
        "--corrupt-share",
        type=float,
        default=0.0,
        help="add a reference path with one corrupted step for this share of training problems",
    )
    parser.add_argument(
        "--init",
        choices=["toy-small", "scratch"],
        default="toy-small",
        help="toy-small: start the body from toy-small's body weights and shape (--hidden, --layers, "
        "--heads, --intermediate apply to scratch only)",
    )
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4000, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=32, help="solutions per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--aux-weight", type=float, default=1.0, help="weight of the per-character prefix loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--val-n", type=int, default=500, help="training-pool problems held out for the running log")
    parser.add_argument("--eval-n", type=int, default=500, help="held-out (test) problems for the final AUROC")
    parser.add_argument("--out", type=Path, default=MODELS_DIR / "toy-prm")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    started = time.time()
    tokenizer = build_tokenizer()
    pad_id = tokenizer.pad_token_id
    drafter = AutoModelForCausalLM.from_pretrained(str(args.drafter), dtype=torch.float32)

    train = training_data(
        drafter,
        tokenizer,
        n_problems=args.n_problems,
        seed=args.seed,
        temperature=args.temperature,
        greedy_share=args.greedy_share,
        corrupt_share=args.corrupt_share,
    )
    val = training_data(
        drafter,
        tokenizer,
        n_problems=args.val_n,
        seed=args.seed,
        temperature=args.temperature,
        greedy_share=0.0,
        offset=args.n_problems,
    )
    train_steps = [label for e in train for label in e["labels"]]
    data_seconds = time.time() - started
    print(
        f"data: {len(train)} drafts, {len(train_steps)} steps, {np.mean(train_steps):.1%} valid; "
        f"validation {len(val)} drafts; {data_seconds:.0f}s",
        flush=True,
    )

    torch.manual_seed(args.seed)
    model = build_model(tokenizer, args, drafter)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"PRM: {n_params:,} parameters (init {args.init})", flush=True)
    optimizer = adamw(model, args.lr)

    order: list[int] = []
    log = [
        {
            "step": 0,
            "seconds": round(time.time() - started),
            "val": measure(model, val, pad_id),
            "corruption_auroc": corruption_check(model, tokenizer, pad_id),
        }
    ]
    print(json.dumps(log[-1]), flush=True)
    for step in range(args.steps):
        if len(order) < args.batch:
            order = list(range(len(train)))
            rng.shuffle(order)
        picked, order = order[: args.batch], order[args.batch :]
        model.train()
        loss = loss_on_batch(model, collate([train[i] for i in picked], pad_id), args.aux_weight)
        optimizer_step(model, optimizer, loss, lr_at(step, lr=args.lr, warmup=args.warmup, steps=args.steps))
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - started:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            log.append(
                {
                    "step": step + 1,
                    "seconds": round(time.time() - started),
                    "val": measure(model, val, pad_id),
                    "corruption_auroc": corruption_check(model, tokenizer, pad_id),
                }
            )
            print(json.dumps(log[-1]), flush=True)

    train_seconds = time.time() - started
    heldout, _ = heldout_data(drafter, tokenizer, args.eval_n)
    result = measure(model, heldout, pad_id)
    corruption = corruption_check(model, tokenizer, pad_id)
    wall = time.time() - started
    print("held-out:", json.dumps(result), "corruptions:", json.dumps(corruption), flush=True)
    metadata = {
        "command": command_line(args),
        SEPARATOR_FIELD: SEPARATOR,
        "args": {
            name: repo_relative(value) if isinstance(value, Path) else value for name, value in vars(args).items()
        },
        "seed": args.seed,
        "threads": args.threads,
        "n_params": n_params,
        "init": args.init,
        "config": {
            "hidden": model.body.config.hidden_size,
            "layers": model.body.config.num_hidden_layers,
            "heads": model.body.config.num_attention_heads,
            "intermediate": model.body.config.intermediate_size,
        },
        "training_data": {
            "drafter": "toy-small",
            "temperature": args.temperature,
            "greedy_share": args.greedy_share,
            "corrupt_share": args.corrupt_share,
            "n_solutions": len(train),
            "n_problems": args.n_problems,
            "level_weights": LEVEL_WEIGHTS,
            "n_steps": len(train_steps),
            "valid_step_share": float(np.mean(train_steps)),
        },
        "data_seconds": round(data_seconds),
        "train_seconds": round(train_seconds),
        "wall_seconds": round(wall),
        "log": log,
        "heldout": {
            "n_problems": args.eval_n,
            "level": DEFAULT_LEVEL,
            "split": "test",
            "problem_seed": 0,
            "sample_seed": 1,
            "temperature": 0.7,
            **result,
        },
        "heldout_auroc": result["auroc"],
        "corruption_auroc": corruption,
    }
    save_value_head_model(model, tokenizer, args.out, metadata=metadata)
    reloaded = load_value_head_model(args.out)
    check = measure(reloaded, heldout[:100], pad_id)["auroc"]  # the drafts tests/test_toy_prm.py samples
    print(
        f"saved {args.out}; reloaded AUROC on the first 100 held-out drafts {check:.3f}; wall {wall:.0f}s", flush=True
    )


def repo_relative(path: Path) -> str:
    root = MODELS_DIR.parents[2]
    path = path.resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def command_line(args) -> str:
    """The command as it was typed (``args`` in training.json holds every resolved setting)."""
    return "python -m scripts.toy.train_prm " + " ".join(sys.argv[1:])


if __name__ == "__main__":
    main()
