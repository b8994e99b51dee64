"""Train a toy Qwen2 model on the toy arithmetic task and save it as a Hugging Face checkpoint.

    python -m scripts.toy.train --size small --steps 3000 --seed 0 --label-smoothing 0.05 --stop-after 2000
    python -m scripts.toy.train --size large --steps 3000 --seed 0 --stop-after 2000
    python -m scripts.toy.train --size medium --steps 3000 --seed 0 --label-smoothing 0.05 --stop-after N

Loss is on the solution tokens only. Every prompt starts with the same system message and
``Compute ``; that shared prefix is run once per batch and its key/value cache broadcast to
the batch, which gives the same gradients as running it per row at a fraction of the cost.
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
from data.toy.task import DEFAULT_LEVEL, LEVELS, ToyProblem, _draw, _in_test_pool
from data.toy.tokenizer import VOCAB_SIZE, build_tokenizer
from scripts.toy.evaluate import evaluate
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
    target = tokenizer(problem.solution(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt, target


def shared_prefix(tokenizer) -> list[int]:
    a, _ = encode(tokenizer, ToyProblem("", 3, 12, (("+", 3),)))
    b, _ = encode(tokenizer, ToyProblem("", 3, 98, (("-", 7),)))
    n = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return a[:n]


def make_batch(tokenizer, problems, prefix_len: int):
    rows, labels = [], []
    for p in problems:
        prompt, target = encode(tokenizer, p)
        rest = prompt[prefix_len:]
        rows.append(rest + target)
        labels.append([-100] * len(rest) + target)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    lab = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, lab, mask


def loss_on_batch(model, prefix: torch.Tensor, ids, labels, mask, label_smoothing: float = 0.0) -> torch.Tensor:
    batch = ids.shape[0]
    cache = DynamicCache()
    model(input_ids=prefix, past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(batch)
    full_mask = torch.cat([torch.ones(batch, prefix.shape[1], dtype=mask.dtype), mask], dim=1)
    logits = model(input_ids=ids, attention_mask=full_mask, past_key_values=cache, use_cache=False).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        label_smoothing=label_smoothing,
    )


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
    model = Qwen2ForCausalLM(model_config(args.size, tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.size}: {n_params:,} parameters", flush=True)

    prefix_ids = shared_prefix(tokenizer)
    prefix = torch.tensor([prefix_ids])
    optimizer = adamw(model, args.lr)

    stream = training_problems(rng)
    started = time.time()
    log = []
    last_step = min(args.steps, args.stop_after or args.steps)
    for step in range(last_step):
        ids, labels, mask = make_batch(tokenizer, [next(stream) for _ in range(args.batch)], len(prefix_ids))
        model.train()
        loss = loss_on_batch(model, prefix, ids, labels, mask, args.label_smoothing)
        optimizer_step(model, optimizer, loss, lr_at(step, lr=args.lr, warmup=args.warmup, steps=args.steps))
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - started:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == last_step:
            result = evaluate(model, tokenizer, n=args.eval_n, level=DEFAULT_LEVEL, seed=1)
            log.append({"step": step + 1, "seconds": round(time.time() - started), **result})
            print(json.dumps(log[-1]), flush=True)
            save(model, tokenizer, args, n_params, log, time.time() - started)
            if args.keep_snapshots:
                save(model, tokenizer, args, n_params, log, time.time() - started, snapshot=step + 1)


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
    )
    record = {
        "size": args.size,
        "n_params": n_params,
        "command": command,
        "wall_seconds": round(seconds),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "sha256": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(),
        "log": log,
    }
    (out / "training.json").write_text(json.dumps(record, indent=1))
    print(f"saved {out} at step {log[-1]['step']}", flush=True)


if __name__ == "__main__":
    main()
