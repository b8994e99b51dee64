"""The prompt every model sees (the seeds' Qwen math chat template), and the scorers' prompts as named presets:
the judge's (SpecReason's code, ``specreason``), the verifier's (the CMDP seed's Appendix A, ``cmdp``) and the
first-token P(T)'s (the cascade seed's Table 7, ``cascade``), each with this project's earlier wording as
``trace``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

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


# Scorer prompts (trace score): named presets, each recorded in full in trace.json with the scores it made (a
# trace scored with one preset refuses another). The first preset of each is the default: the method's own words.


@dataclass(frozen=True)
class JudgePreset:
    """SpecReason's verdict request: the steps so far as the assistant's turn (joined by the step delimiter,
    followed by one more when ``trailing_delimiter``), ``request`` as the user's next turn, the assistant's reply
    prefilled with ``prefill``; the next token is the score, read over the ``top_k`` likeliest tokens."""

    source: str
    request: str
    prefill: str
    trailing_delimiter: bool
    top_k: int


@dataclass(frozen=True)
class VerifierPreset:
    """The per-step verifier's one user message: ``template`` with {question}, {prefix} (the earlier steps joined
    by the step delimiter, ``no_prefix`` when there are none) and {answer} (the step judged)."""

    source: str
    template: str
    no_prefix: str
    top_k: int


@dataclass(frozen=True)
class FirstTokenPreset:
    """The cascade's first-token P(T): ``system`` (none when empty) and ``user`` (with {question}); P(T) = the
    probability that the reply's first token is the first token of ``first_word``."""

    source: str
    system: str
    user: str
    first_word: str
    top_k: int


def preset_record(name: str, preset) -> dict:
    """What trace.json records of a preset: its name first, then every text and setting it asks with."""
    return {"name": name, **asdict(preset)}


JUDGE_PREFILL = "I think the quality score is: "
JUDGE_PRESETS = {
    "specreason": JudgePreset(
        source=(
            'SpecReason\'s public code (get_score): its request verbatim, steps joined by "\\n\\n" and followed by '
            "\"\\n\\n\", top_logprobs=10; without its <think> tags, which mark a reasoning model's (QwQ's) thinking"
        ),
        request=(
            "Evaluate the last reasoning step solely based on factual correctness and logical validity. Ignore style, "
            "phrasing, or overall usefulness\u2014only judge whether the step is objectively correct and logically "
            "follows from prior steps. Assign a score from 0 to 9."
        ),
        prefill=JUDGE_PREFILL,
        trailing_delimiter=True,
        top_k=10,
    ),
    "trace": JudgePreset(
        source="this project's earlier wording, in SpecReason's layout",
        request=(
            "Evaluate the last step of your reasoning above for mathematical and logical correctness, given the "
            "question and the steps before it. Rate it with a single digit from 0 (certainly wrong) to 9 (certainly "
            "correct)."
        ),
        prefill=JUDGE_PREFILL,
        trailing_delimiter=False,
        top_k=20,
    ),
}
VERIFIER_PRESETS = {
    "cmdp": VerifierPreset(
        source="the CMDP seed's Appendix A, 'Prompt template for GPT stepwise verification', verbatim",
        template=(
            "Task: Determine whether the final step is correct for the given problem.\n\nInstructions:\n"
            "\u2013 Reply with exactly one verdict: correct or incorrect.\n"
            "\u2013 Do not explain, justify, or provide any reasoning.\n\n"
            "Question:\n{question}\n\nPrevious steps:\n{prefix}\n\nLast step:\n{answer}\n\n"
            "Verdict:\ncorrect | incorrect"
        ),
        no_prefix="",
        top_k=20,
    ),
    "trace": VerifierPreset(
        source="this project's earlier wording",
        template=(
            "Question: {question}\n\nEarlier steps:\n{prefix}\n\nLatest step:\n{answer}\n\n"
            "Is the latest step correct? Reply with exactly one verdict: correct or incorrect."
        ),
        no_prefix="(none)",
        top_k=20,
    ),
}
FIRST_TOKEN_PRESETS = {
    "cascade": FirstTokenPreset(
        source=(
            "the cascade seed's Table 7, 'Prompt used for open-ended questions', verbatim; the reply's first token "
            'is read where its template shows the assistant\'s "Answer:"'
        ),
        system=(
            "The following are questions about entity relationship. Please determine the correct answer in the "
            'format "Answer: <answer>".'
        ),
        user="Question: {question}",
        first_word="Answer",
        top_k=20,
    ),
    "trace": FirstTokenPreset(
        source="this project's earlier wording",
        system="",
        user='{question}\n\nReply in the format "Answer: <your answer>".',
        first_word="Answer",
        top_k=20,
    ),
}
P_TRUE_PROMPT = (  # Kadavath et al. 2022, "Language Models (Mostly) Know What They Know"
    "Question: {question}\nProposed Answer: {answer}\nIs the proposed answer:\n (A) True\n (B) False\n"
    "The proposed answer is:"
)


def judge_prompt_ids(tokenizer, question: str, steps: list[str], preset: JudgePreset) -> list[int]:
    """Token ids of SpecReason's judge prompt for the last of ``steps``, ending inside the prefilled reply."""
    reasoning = STEP_DELIMITER.join(steps) + (STEP_DELIMITER if preset.trailing_delimiter else "")
    messages = [
        *chat_messages(question),
        {"role": "assistant", "content": reasoning},
        {"role": "user", "content": preset.request},
    ]
    return _chat_ids(tokenizer, messages) + tokenizer.encode(preset.prefill, add_special_tokens=False)


def verifier_prompt(question: str, steps: list[str], preset: VerifierPreset) -> str:
    """The verifier's message asking about the last of ``steps``."""
    prefix = STEP_DELIMITER.join(steps[:-1]) if len(steps) > 1 else preset.no_prefix
    return preset.template.format(question=question, prefix=prefix, answer=steps[-1])


def first_token_prompt_ids(tokenizer, question: str, preset: FirstTokenPreset) -> list[int]:
    """Token ids of the first-token P(T) prompt, ending with the assistant header."""
    system = [{"role": "system", "content": preset.system}] if preset.system else []
    return _chat_ids(tokenizer, [*system, {"role": "user", "content": preset.user.format(question=question)}])


def user_prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a one-turn chat (the user's ``text``) ending with the assistant header."""
    return _chat_ids(tokenizer, [{"role": "user", "content": text}])
