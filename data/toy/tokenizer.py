"""The toy world's character-level tokenizer, with Qwen's chat special tokens and template.

It is a Qwen2 tokenizer (byte-level BPE) whose vocabulary holds single characters and no merges,
so every character is one token, and `AutoTokenizer` (which picks `Qwen2Tokenizer` for Qwen2
checkpoints) and vLLM load it unchanged. Space and newline carry their byte-level names.
"""

from __future__ import annotations

from transformers import Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHARACTERS = ["\n"] + [chr(c) for c in range(32, 127)]
VOCAB_SIZE = 128  # embedding rows; ids past the tokenizer's vocabulary are never produced by it

# Qwen2.5's ChatML layout, without its default system message (callers always pass one).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer() -> Qwen2Tokenizer:
    byte_name = bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({byte_name[ord(ch)]: len(SPECIAL_TOKENS) + i for i, ch in enumerate(CHARACTERS)})
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
