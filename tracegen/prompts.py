"""The prompt every model sees: the seeds' Qwen math chat template."""

from __future__ import annotations

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
STEP_DELIMITER = "\n\n"


def chat_messages(question: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": question},
    ]


def prompt_token_ids(tokenizer, question: str) -> list[int]:
    """Token ids of the chat prompt, ending with the assistant header (no re-tokenisation later)."""
    return _chat_ids(tokenizer, chat_messages(question))


def _chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


# Scorer prompts (trace score), recorded in trace.json with each scorer.
JUDGE_PROMPT = (  # SpecReason's verdict: the large model rates the latest step 0-9
    "Question: {question}\n\nEarlier steps:\n{earlier}\n\nLatest step:\n{step}\n\n"
    "Evaluate the latest step for mathematical and logical correctness given the question and the earlier "
    "steps. Rate it with a single digit from 0 (certainly wrong) to 9 (certainly correct). Reply with the digit only."
)
P_TRUE_PROMPT = (  # Kadavath et al. 2022, "Language Models (Mostly) Know What They Know"
    "Question: {question}\nProposed Answer: {answer}\nIs the proposed answer:\n (A) True\n (B) False\n"
    "The proposed answer is:"
)
VERIFIER_PROMPT = (
    "Question: {question}\n\nEarlier steps:\n{earlier}\n\nLatest step:\n{step}\n\n"
    "Is the latest step correct? Reply with exactly one verdict: correct or incorrect."
)


def user_prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a one-turn chat (the user's ``text``) ending with the assistant header."""
    return _chat_ids(tokenizer, [{"role": "user", "content": text}])


def earlier_steps_text(steps: list[str]) -> str:
    return STEP_DELIMITER.join(steps) if steps else "(none)"
