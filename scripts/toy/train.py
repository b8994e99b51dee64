"""Train a toy Qwen2 model on the toy arithmetic task and save it as a Hugging Face checkpoint.

    python -m scripts.toy.train --size small --steps 3000 --seed 0 --label-smoothing 0.05 --stop-after 2000
    python -m scripts.toy.train --size large --steps 3000 --seed 0 --stop-after 2000
    python -m scripts.toy.train --size medium --steps 3000 --seed 0 --label-smoothing 0.05 --stop-after N
    python -m scripts.toy.train --size large --init data/toy/models/toy-large --repair-share 0.5 --steps 500 \
        --lr 0.0005 --warmup 50 --repair-drafts 4000 --step-start-weight 20 --add-layers 1 --out DIR

Loss is on the solution tokens only. ``--init`` continues training a checkpoint instead of starting from
random weights; ``--repair-share`` makes that share of every batch repair examples: toy-small's own wrong
steps (sampled at T=0.7 on training-pool problems, each draft cut right after its first invalid step when
a step can still follow it, ``repair_prefix``) as the context, and the repair of that step then the
reference steps after it (``ToyProblem.repair_steps``) as the target. The rest of the batch is clean
reference solutions, as without it. ``--add-layers`` grows the ``--init`` model by layers that start as the
identity; ``--step-start-weight`` weighs the loss at every step's first character (where a model decides
between a repair and the next operation) above the rest. data/toy/CARD.md ("Repair") records what these
runs reached: none met the repair goal, and the shipped weights are not from them. Every prompt starts
with the same system message and ``Compute ``; that shared prefix is run once per batch and its key/value
cache broadcast to the batch, which gives the same gradients as running it per row at a fraction of the cost.
Results are reproducible for a fixed seed and thread count. The learning-rate schedule and the
optimizer step (``lr_at``, ``adamw``, ``optimizer_step``) are the toy recipe that train_prm.py shares.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import DynamicCache

from data.toy import MODELS_DIR
from data.toy.task import DEFAULT_LEVEL, LEVELS, STEP_DELIMITER, ToyProblem, _draw, _in_test_pool, generate
from data.toy.tokenizer import VOCAB_SIZE, build_tokenizer
from scripts.toy.evaluate import (
    continuation_prompt,
    evaluate,
    heldout_repair_prefixes,
    needless_repairs,
    repair_prefixes,
    repair_rate,
    sample_solutions,
)
from tracegen.prompts import prompt_token_ids

SIZES = {
    "small": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1),
    "medium": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=1),
    "large": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=2),
}
LEVEL_WEIGHTS = {1: 1, 2: 2, 3: 4, 4: 2}


def model_config(size: str, tokenizer) -> Qwen2Config:
    return qwen2_config(tokenizer, **SIZES[size])


def qwen2_config(tokenizer, **shape) -> Qwen2Config:
    """A toy Qwen2 config of the given shape (hidden_size, num_hidden_layers, ...): the toy vocabulary,
    one key/value head per attention head, tied embeddings, 512 positions, float32."""
    return Qwen2Config(
        vocab_size=VOCAB_SIZE,
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        **shape,
    )


def lr_at(step: int, *, lr: float, warmup: int, steps: int) -> float:
    """Learning rate at ``step``: linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to 5% of
    ``lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW as every toy model is trained: betas 0.9/0.98, weight decay 0.01."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float) -> None:
    """One update of ``model`` from ``loss`` at learning rate ``lr``, the gradient norm clipped to 1.0."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def training_problems(rng: random.Random):
    levels = [lvl for lvl, w in LEVEL_WEIGHTS.items() for _ in range(w)]
    while True:
        level = rng.choice(levels)
        start, ops = _draw(rng, LEVELS[level])
        problem = ToyProblem("train", level, start, ops)
        if not _in_test_pool(problem.question):
            yield problem


def encode(tokenizer, problem: ToyProblem) -> tuple[list[int], list[int]]:
    prompt = prompt_token_ids(tokenizer, problem.question)
    return prompt, solution_ids(tokenizer, problem.solution_steps())


def encode_repair(tokenizer, problem: ToyProblem, prefix: list[str]) -> tuple[list[int], list[int]]:
    """A repair example: the prompt with ``prefix`` (one wrong step, the last), and what should follow it."""
    prompt = continuation_prompt(tokenizer, problem.question, prefix)
    return prompt, solution_ids(tokenizer, problem.repair_steps(len(prefix) - 1))


def solution_ids(tokenizer, steps: list[str]) -> list[int]:
    return tokenizer(STEP_DELIMITER.join(steps), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def shared_prefix(tokenizer) -> list[int]:
    a, _ = encode(tokenizer, ToyProblem("", 3, 12, (("+", 3),)))
    b, _ = encode(tokenizer, ToyProblem("", 3, 98, (("-", 7),)))
    n = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return a[:n]


def make_batch(tokenizer, examples: list[tuple[list[int], list[int]]], prefix_len: int):
    """Rows of (prompt, target) pairs, the shared prefix cut off, padded; labels on the targets only."""
    rows, labels = [], []
    for prompt, target in examples:
        rest = prompt[prefix_len:]
        rows.append(rest + target)
        labels.append([-100] * len(rest) + target)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    lab = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, lab, mask


def repair_pool(drafter, tokenizer, n_drafts: int, seed: int) -> list[tuple[ToyProblem, list[str]]]:
    """toy-small's wrong steps to learn repairs from: one T=0.7 draft of each of ``n_drafts`` training-pool
    problems (levels by LEVEL_WEIGHTS, a stream of its own), cut by ``repair_prefixes``."""
    stream = training_problems(random.Random(f"repair-pool/{seed}"))
    problems = [next(stream) for _ in range(n_drafts)]
    drafts = sample_solutions(
        drafter, tokenizer, [p.question for p in problems], temperature=0.7, seed=seed, batch_size=250
    )
    return repair_prefixes(problems, [text for text, _ in drafts])


def step_start_weights(tokenizer, labels: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-token loss weights: ``weight`` on the first target character of every step (the first target token,
    and every one after a step delimiter), where the model decides between a repair and the next operation; 1 on
    the other target tokens, 0 off the targets."""
    delimiter = tokenizer(STEP_DELIMITER, add_special_tokens=False)["input_ids"]
    weights = (labels != -100).float()
    for row, target in enumerate(labels.tolist()):
        starts = [i for i, t in enumerate(target) if t != -100 and (i == 0 or target[i - 1] == -100)]
        starts += [i for i in range(len(delimiter), len(target)) if target[i - len(delimiter) : i] == delimiter]
        weights[row, [i for i in starts if target[i] != -100]] = weight
    return weights


def loss_on_batch(model, prefix: torch.Tensor, ids, labels, mask, label_smoothing=0.0, weights=None) -> torch.Tensor:
    """Cross-entropy on the labelled tokens; a weighted mean with per-token ``weights`` (the labels' shape)."""
    batch = ids.shape[0]
    cache = DynamicCache()
    model(input_ids=prefix, past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(batch)
    full_mask = torch.cat([torch.ones(batch, prefix.shape[1], dtype=mask.dtype), mask], dim=1)
    logits = model(input_ids=ids, attention_mask=full_mask, past_key_values=cache, use_cache=False).logits
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        label_smoothing=label_smoothing,
        reduction="none",
    )
    if weights is None:
        weights = (labels != -100).float()
    w = weights[:, 1:].reshape(-1)
    return (losses * w).sum() / w.sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), required=True)
    parser.add_argument("--steps", type=int, default=4000, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        help="bounds the confident logits, so a step's mean max-logit dips where the model is unsure",
    )
    parser.add_argument(
        "--stop-after", type=int, default=None, help="end after this many steps (the schedule still spans --steps)"
    )
    parser.add_argument("--init", type=Path, default=None, help="continue training this checkpoint (of --size's shape)")
    parser.add_argument(
        "--repair-share",
        type=float,
        default=0.0,
        help="share of every batch that is repair examples (as many rows again hold their problems' clean solutions)",
    )
    parser.add_argument(
        "--add-layers", type=int, default=0, help="append this many layers to --init's model, starting as the identity"
    )
    parser.add_argument(
        "--repair-drafts", type=int, default=20000, help="toy-small drafts (training pool) to take repair examples from"
    )
    parser.add_argument(
        "--step-start-weight",
        type=float,
        default=1.0,
        help="loss weight of every step's first character (repair or go on), against 1 for the other characters",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-n", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None, help="default: data/toy/models/toy-SIZE")
    parser.add_argument(
        "--keep-snapshots",
        action="store_true",
        help="also keep every evaluated checkpoint under OUT/step-N, to choose a --stop-after afterwards",
    )
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    tokenizer = build_tokenizer()
    if args.init is None:
        model = Qwen2ForCausalLM(model_config(args.size, tokenizer))
    else:
        model = initial_weights(args.init, args.size, args.add_layers, tokenizer)
        args.init_sha256 = sha256(args.init / "model.safetensors")  # before a run into the same folder replaces it
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.size}: {n_params:,} parameters", flush=True)
    n_repair = round(args.batch * args.repair_share)
    if 2 * n_repair > args.batch:
        raise SystemExit("--repair-share is at most 0.5: each repair example comes with its problem's clean solution")
    pool, heldout = [], []
    if n_repair:
        drafter = Qwen2ForCausalLM.from_pretrained(MODELS_DIR / "toy-small")
        pool = repair_pool(drafter, tokenizer, args.repair_drafts, args.seed)
        heldout = heldout_repair_prefixes(drafter, tokenizer, n=args.eval_n)
        print(f"repair examples: {len(pool)} from {args.repair_drafts} toy-small drafts", flush=True)
    repair_rng = random.Random(f"repair/{args.seed}")

    prefix_ids = shared_prefix(tokenizer)
    prefix = torch.tensor([prefix_ids])
    optimizer = adamw(model, args.lr)

    stream = training_problems(rng)
    started = time.time()
    log = []
    last_step = min(args.steps, args.stop_after or args.steps)
    for step in range(last_step):
        examples = [encode(tokenizer, next(stream)) for _ in range(args.batch - 2 * n_repair)]
        for problem, wrong_prefix in (repair_rng.choice(pool) for _ in range(n_repair)):
            examples += [encode_repair(tokenizer, problem, wrong_prefix), encode(tokenizer, problem)]
        ids, labels, mask = make_batch(tokenizer, examples, len(prefix_ids))
        model.train()
        weights = step_start_weights(tokenizer, labels, args.step_start_weight) if args.step_start_weight != 1 else None
        loss = loss_on_batch(model, prefix, ids, labels, mask, args.label_smoothing, weights)
        optimizer_step(model, optimizer, loss, lr_at(step, lr=args.lr, warmup=args.warmup, steps=args.steps))
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - started:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == last_step:
            result = evaluate(model, tokenizer, n=args.eval_n, level=DEFAULT_LEVEL, seed=1)
            if heldout:
                result["repair"] = repair_rate(model, tokenizer, heldout)
                result["needless_repairs"] = needless_repairs(model, tokenizer, generate(args.eval_n, split="test"))
            log.append({"step": step + 1, "seconds": round(time.time() - started), **result})
            print(json.dumps(log[-1]), flush=True)
            save(model, tokenizer, args, n_params, log, time.time() - started)
            if args.keep_snapshots:
                save(model, tokenizer, args, n_params, log, time.time() - started, snapshot=step + 1)


def initial_weights(path: Path, size: str, add_layers: int, tokenizer) -> Qwen2ForCausalLM:
    """The checkpoint at ``path`` (of ``size``'s width), with ``add_layers`` more layers on top that start as the
    identity: their attention output and MLP down projections are zero, so each adds nothing to the residual
    stream until training moves them, and the model computes what the checkpoint computes."""
    model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32)
    width = {key: value for key, value in SIZES[size].items() if key != "num_hidden_layers"}
    if {key: getattr(model.config, key) for key in width} != width:
        raise SystemExit(f"--init {path} is not a toy-{size} checkpoint (width {width})")
    if add_layers:
        layers = model.config.num_hidden_layers + add_layers
        grown = Qwen2ForCausalLM(qwen2_config(tokenizer, **{**SIZES[size], "num_hidden_layers": layers}))
        missing, _ = grown.load_state_dict(model.state_dict(), strict=False)
        assert all(".layers." in key for key in missing), missing
        with torch.no_grad():
            for layer in grown.model.layers[model.config.num_hidden_layers :]:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
        model = grown
    return model


def save(model, tokenizer, args, n_params: int, log: list[dict], seconds: float, snapshot: int | None = None) -> None:
    """Write the checkpoint as it stands, so a long run can be stopped at any evaluation; with ``snapshot``,
    into OUT/step-N. training.json records the library versions and the SHA-256 of the weights, since where
    the learning jumps land moves with small numerical differences between environments."""
    out = args.out or MODELS_DIR / f"toy-{args.size}"
    if snapshot is not None:
        out = out / f"step-{snapshot}"
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    command = (
        f"python -m scripts.toy.train --size {args.size} --steps {args.steps} --batch {args.batch} "
        f"--lr {args.lr} --seed {args.seed} --threads {args.threads}"
        + (f" --label-smoothing {args.label_smoothing}" if args.label_smoothing else "")
        + (f" --stop-after {snapshot or args.stop_after}" if (snapshot or args.stop_after) is not None else "")
        + (f" --warmup {args.warmup}" if args.warmup != 100 else "")
        + (f" --init {args.init}" if args.init is not None else "")
        + (f" --add-layers {args.add_layers}" if args.add_layers else "")
        + (f" --repair-share {args.repair_share} --repair-drafts {args.repair_drafts}" if args.repair_share else "")
        + (f" --step-start-weight {args.step_start_weight}" if args.step_start_weight != 1 else "")
    )
    record = {
        "size": args.size,
        "n_params": n_params,
        "command": command,
        "wall_seconds": round(seconds),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "sha256": sha256(out / "model.safetensors"),
        **({"init_sha256": args.init_sha256} if args.init is not None else {}),
        "log": log,
    }
    (out / "training.json").write_text(json.dumps(record, indent=1))
    print(f"saved {out} at step {log[-1]['step']}", flush=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    main()
