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
# SpecReason's verdict, laid out as its public code lays it out: the question as the user's turn, the steps so
# far as the assistant's reasoning, then a request to rate the last step from 0 to 9 (this wording is ours),
# and the assistant's reply prefilled with JUDGE_PREFILL; the next token is the score.
JUDGE_REQUEST = (
    "Evaluate the last step of your reasoning above for mathematical and logical correctness, given the question "
    "and the steps before it. Rate it with a single digit from 0 (certainly wrong) to 9 (certainly correct)."
)
JUDGE_PREFILL = "I think the quality score is: "
P_TRUE_PROMPT = (  # Kadavath et al. 2022, "Language Models (Mostly) Know What They Know"
    "Question: {question}\nProposed Answer: {answer}\nIs the proposed answer:\n (A) True\n (B) False\n"
    "The proposed answer is:"
)
FIRST_TOKEN_PROMPT = (  # the cascade seed's P(T) for generation tasks: is the first token of the reply "Answer"?
    '{question}\n\nReply in the format "Answer: <your answer>".'
)
FIRST_TOKEN = "Answer"
VERIFIER_PROMPT = (
    "Question: {question}\n\nEarlier steps:\n{earlier}\n\nLatest step:\n{step}\n\n"
    "Is the latest step correct? Reply with exactly one verdict: correct or incorrect."
)


def judge_prompt_ids(tokenizer, question: str, steps: list[str]) -> list[int]:
    """Token ids of SpecReason's judge prompt for the last of ``steps``, ending inside the prefilled reply."""
    messages = [
        *chat_messages(question),
        {"role": "assistant", "content": STEP_DELIMITER.join(steps)},
        {"role": "user", "content": JUDGE_REQUEST},
    ]
    return _chat_ids(tokenizer, messages) + tokenizer.encode(JUDGE_PREFILL, add_special_tokens=False)


def user_prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a one-turn chat (the user's ``text``) ending with the assistant header."""
    return _chat_ids(tokenizer, [{"role": "user", "content": text}])


def earlier_steps_text(steps: list[str]) -> str:
    return STEP_DELIMITER.join(steps) if steps else "(none)"
