"""Measure a toy model on held-out problems: answer accuracy, how well the mean raw max-logit of a
step separates valid from invalid steps (AUROC), and how often the model repairs a wrong step of
toy-small's that it is handed (``repair_rate``) or needlessly repairs a right one (``needless_repairs``)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from data.toy.task import (
    DEFAULT_LEVEL,
    REPAIR_PREFIX,
    STEP_DELIMITER,
    ToyProblem,
    extract_boxed,
    generate,
    grade,
    is_repair,
    verify_steps,
)
from tracegen.prompts import prompt_token_ids


def sample_solutions(model, tokenizer, questions, *, temperature=0.0, seed=0, max_new_tokens=200, batch_size=100):
    """Generate one solution per question; returns (text, per-token raw max logits) pairs."""
    prompts = [prompt_token_ids(tokenizer, q) for q in questions]
    return sample(
        model,
        tokenizer,
        prompts,
        temperature=temperature,
        seed=seed,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )


@torch.no_grad()
def sample(model, tokenizer, prompts, *, temperature=0.0, seed=0, max_new_tokens=200, batch_size=100):
    """Continue each prompt (token ids) until EOS; returns (text, per-token raw max logits) pairs."""
    model.eval()
    torch.manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        width = max(map(len, batch))
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        sampling = (
            dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            if temperature > 0
            else dict(do_sample=False)
        )
        result = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
            output_logits=True,
            return_dict_in_generate=True,
            **sampling,
        )
        new = result.sequences[:, width:]
        max_logits = torch.stack(result.logits, dim=1).max(dim=-1).values
        for row, row_max in zip(new.tolist(), max_logits.tolist()):
            n = next((k + 1 for k, t in enumerate(row) if t == tokenizer.eos_token_id), len(row))
            text = tokenizer.decode([t for t in row[:n] if t != tokenizer.eos_token_id])
            out.append((text, row_max[:n]))
    return out


def continuation_prompt(tokenizer, question: str, steps: list[str]) -> list[int]:
    """The prompt of the step after ``steps``, as trace gen builds it: the chat prompt, then every step
    followed by the delimiter (one token per character)."""
    text = "".join(step + STEP_DELIMITER for step in steps)
    return prompt_token_ids(tokenizer, question) + tokenizer(text, add_special_tokens=False)["input_ids"]


def repair_prefix(problem: ToyProblem, text: str) -> list[str] | None:
    """The steps of ``text`` (a solution of ``problem``) up to and including its first invalid step: a prefix
    whose only wrong step is its last. None when every step is valid, or when that step ended the solution
    (the text's last step, or one with a box), so that no step can follow it."""
    steps = text.split(STEP_DELIMITER)
    valid = verify_steps(problem.question, steps)
    if all(valid):
        return None
    k = valid.index(False)
    return None if k == len(steps) - 1 or "\\boxed{" in steps[k] else steps[: k + 1]


def repair_prefixes(problems: list[ToyProblem], drafts: list[str]) -> list[tuple[ToyProblem, list[str]]]:
    """(problem, prefix) for every draft with a ``repair_prefix``."""
    cut = [(p, repair_prefix(p, text)) for p, text in zip(problems, drafts)]
    return [(p, prefix) for p, prefix in cut if prefix is not None]


def heldout_repair_prefixes(drafter, tokenizer, *, n=500, level=DEFAULT_LEVEL) -> list[tuple[ToyProblem, list[str]]]:
    """Repair prefixes of ``drafter``'s (toy-small's) T=0.7 drafts of ``n`` held-out problems: the drafts
    ``evaluate(drafter, tokenizer, n=n, level=level, temperature=0.7, seed=1)`` grades."""
    problems = generate(n, split="test", level=level, seed=0)
    drafts = sample_solutions(drafter, tokenizer, [p.question for p in problems], temperature=0.7, seed=1)
    return repair_prefixes(problems, [text for text, _ in drafts])


def repair_rate(model, tokenizer, prefixes, *, temperature=0.0, seed=2) -> dict:
    """Of ``prefixes`` (one wrong step, the last; from ``repair_prefixes``), the share whose completion by
    ``model`` reaches the right answer, and the share whose next step is a repair."""
    prompts = [continuation_prompt(tokenizer, p.question, prefix) for p, prefix in prefixes]
    completions = [text for text, _ in sample(model, tokenizer, prompts, temperature=temperature, seed=seed)]
    correct = [grade(extract_boxed(text), str(p.answer)) for (p, _), text in zip(prefixes, completions)]
    repaired = [is_repair(text.split(STEP_DELIMITER)[0]) for text in completions]
    return {
        "repair_rate": float(np.mean(correct)),
        "next_step_is_repair": float(np.mean(repaired)),
        "n_prefixes": len(prefixes),
        "temperature": temperature,
    }


def needless_repairs(model, tokenizer, problems: list[ToyProblem]) -> dict:
    """After every proper prefix of each reference solution (all steps right), how often the model's greedy
    next step is a repair."""
    prefixes = [p.solution_steps()[:k] for p in problems for k in range(1, len(p.ops))]
    questions = [p.question for p in problems for _ in range(1, len(p.ops))]
    prompts = [continuation_prompt(tokenizer, q, prefix) for q, prefix in zip(questions, prefixes)]
    starts = sample(model, tokenizer, prompts, max_new_tokens=len(REPAIR_PREFIX))
    return {"share": float(np.mean([is_repair(text) for text, _ in starts])), "n_prefixes": len(prompts)}


def step_spans(text: str, max_logits: list[float]) -> list[list[float]]:
    """Max logits per step, each step owning its characters plus its delimiter (char tokenizer)."""
    spans, start = [], 0
    for step in text.split(STEP_DELIMITER):
        end = start + len(step) + len(STEP_DELIMITER)
        if max_logits[start:end]:
            spans.append(max_logits[start:end])
        start = end
    return spans


def _auroc(labels, scores) -> float:
    return float(roc_auc_score(labels, scores)) if 0 < sum(labels) < len(labels) else float("nan")


def evaluate(model, tokenizer, *, n=500, level=None, seed=1, temperature=0.0) -> dict:
    kwargs = {} if level is None else {"level": level}
    problems = generate(n, split="test", seed=0, **kwargs)
    solutions = sample_solutions(model, tokenizer, [p.question for p in problems], temperature=temperature, seed=seed)
    correct, labels, means, mins, depths = [], [], [], [], []
    for problem, (text, max_logits) in zip(problems, solutions):
        steps = text.split(STEP_DELIMITER)
        correct.append(grade(extract_boxed(steps[-1]), str(problem.answer)))
        for depth, (valid, span) in enumerate(zip(verify_steps(problem.question, steps), step_spans(text, max_logits))):
            labels.append(valid)
            means.append(float(np.mean(span)))
            mins.append(float(np.min(span)))
            depths.append(depth)
    depths = np.array(depths)
    by_depth = {
        int(d): _auroc([label for label, k in zip(labels, depths) if k == d], np.array(means)[depths == d])
        for d in np.unique(depths)
    }
    return {
        "accuracy": float(np.mean(correct)),
        "step_validity": float(np.mean(labels)),
        "step_auroc": _auroc(labels, means),
        "step_auroc_by_depth": by_depth,
        "step_auroc_min_logit": _auroc(labels, mins),
        "n": n,
        "temperature": temperature,
    }
