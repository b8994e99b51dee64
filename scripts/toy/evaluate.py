"""Measure a toy model on held-out problems: answer accuracy, and how well the mean raw
max-logit of a step separates valid from invalid steps (AUROC)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from data.toy.task import STEP_DELIMITER, extract_boxed, generate, grade, verify_steps
from tracegen.prompts import prompt_token_ids


@torch.no_grad()
def sample_solutions(model, tokenizer, questions, *, temperature=0.0, seed=0, max_new_tokens=200, batch_size=100):
    """Generate one solution per question; returns (text, per-token raw max logits) pairs."""
    model.eval()
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    out = []
    for i in range(0, len(questions), batch_size):
        prompts = [prompt_token_ids(tokenizer, q) for q in questions[i : i + batch_size]]
        width = max(map(len, prompts))
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
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
