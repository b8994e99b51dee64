"""Stand-ins for Qwen2.5-Math-1.5B/7B-Instruct and Skywork's PRM where their weights are not at hand.

- ``REFERENCE_CONFIGS``: the published configurations of the checkpoints the aliases name; ``reference_shape``
  gives the memory plan's view of them (parameters counted on the meta device), so a study can be planned before
  any weights are downloaded (scripts/study_plan.py).
- ``write_stand_in``: a Qwen2 checkpoint of such a configuration with random weights and Qwen2.5's real tokenizer
  (tracegen.qwen_tokenizer: the cached checkpoint's own where it is cached), optionally ``shrink``-ed (narrower
  layers; the vocabulary and, unless told, the depth stay the real ones) to run on a CPU, and optionally
  ``scripted``: its embedding and output layers are set so that it writes short solutions in the real vocabulary
  (``SCRIPT``: a step "We have x = y" ending in the merged ".\\n\\n" token, or a final "So \\boxed{2}." or
  "... \\boxed{3}." and <|im_end|>), while its decoder layers stay random. Random weights alone almost never
  write a delimiter, an answer or EOS, so a study over them would have no final answers to grade, no correct
  solution to fit a P(IK) probe on; a scripted stand-in is right about half the time on problems whose answer
  is 2 or 3 (the study script's CPU test picks such GSM8K and MATH500 problems).
- ``write_prm_stand_in``: a random value-head PRM of Skywork's layout (tracegen.value_head).
- ``place_in_hf_cache``: a checkpoint folder as a Hugging Face cache snapshot of a repo id, so that the aliases
  (``qwen2.5-math-1.5b``, ...) resolve to it (the cache under ``HF_HOME``; use a scratch one).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from tracegen.memory_plan import ModelShape
from tracegen.models import MODEL_ALIASES

QWEN_MATH_1_5B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    bos_token_id=151643,
    eos_token_id=151645,
    torch_dtype="bfloat16",
)
REFERENCE_CONFIGS = {
    "qwen2.5-math-1.5b": QWEN_MATH_1_5B,
    "qwen2.5-math-7b": dict(
        QWEN_MATH_1_5B,
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    "skywork-prm-1.5b": QWEN_MATH_1_5B,  # a value head on Qwen2.5-Math-1.5B-Instruct
}
SHRUNK = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
GENERATION_EOS = [151645, 151643]  # <|im_end|>, <|endoftext|>: Qwen2.5-Math-Instruct's generation_config
# What a scripted stand-in writes: token -> {next token: probability}; "\n" ends the prompt's assistant header.
NEXT_STEP = {"We": 0.5, "So": 0.5}
SCRIPT = {
    "\n": NEXT_STEP,
    ".\n\n": NEXT_STEP,
    "We": {" have": 1.0},
    " have": {" x": 1.0},
    " x": {" =": 1.0},
    " =": {" y": 1.0},
    " y": {".\n\n": 1.0},
    "So": {" \\": 1.0},
    " \\": {"boxed": 1.0},
    "boxed": {"{": 1.0},
    "{": {"2": 0.5, "3": 0.5},
    "2": {"}": 1.0},
    "3": {"}": 1.0},
    "}": {".": 1.0},
    ".": {"<|im_end|>": 1.0},
}
SCRIPT_LOGIT = 30.0  # logit of a scripted next token (every other token's stays near 0)
STATE_NORM = 8.0  # a scripted token's embedding: this times a unit vector of its own (the random layers add ~1)


def reference_shape(alias: str) -> ModelShape:
    """The memory plan's view of the model ``alias`` names, from its published configuration."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = REFERENCE_CONFIGS[alias]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**config))
    n_params = sum(parameter.numel() for parameter in model.parameters())
    return ModelShape.of_config(MODEL_ALIASES[alias], config, n_params)


def _config(alias: str, shrink: dict | None):
    from transformers import Qwen2Config

    config = Qwen2Config(**{**REFERENCE_CONFIGS[alias], **(shrink or {})}, pad_token_id=151643)
    config.architectures = ["Qwen2ForCausalLM"]
    return config


def write_stand_in(
    alias: str, folder: Path, *, shrink: dict | None = None, scripted: bool = False, seed: int = 0
) -> Path:
    """A checkpoint folder of ``alias``'s configuration (``shrink`` overriding parts of it) with random weights,
    bfloat16 on disk, and Qwen2.5's tokenizer; ``scripted``: writing ``SCRIPT``'s solutions (with untied output
    weights: a scripted output layer needs its own)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from tracegen.qwen_tokenizer import save_qwen_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = _config(alias, {**(shrink or {}), **({"tie_word_embeddings": False} if scripted else {})})
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialised where it is fast
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tokenizer_source = save_qwen_tokenizer(folder)
    if scripted:
        _script(model, folder)
    model.to(torch.bfloat16).save_pretrained(folder)
    GenerationConfig(bos_token_id=151643, eos_token_id=GENERATION_EOS, pad_token_id=151643).save_pretrained(folder)
    (folder / "stand_in.json").write_text(
        json.dumps(
            {
                "stands_in_for": MODEL_ALIASES[alias],
                "shrink": shrink or {},
                "scripted": scripted,
                "seed": seed,
                "tokenizer": tokenizer_source,
            },
            indent=2,
        )
        + "\n"
    )
    return folder


def _script(model, folder: Path) -> None:
    """Set the embedding rows of SCRIPT's tokens to orthogonal vectors and the output rows so that each one's
    scripted successors get SCRIPT_LOGIT + log(probability) after the final norm."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = {}
    for text in {*SCRIPT, *(after for nexts in SCRIPT.values() for after in nexts)}:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"scripted token {text!r} is {len(encoded)} tokens in this vocabulary")
        ids[text] = encoded[0]
    width = model.config.hidden_size
    if len(SCRIPT) > width:
        raise ValueError(f"{len(SCRIPT)} scripted states need a hidden size of at least that, not {width}")
    embedding, output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    with torch.no_grad():
        for state, (text, nexts) in enumerate(SCRIPT.items()):
            embedding[ids[text]] = 0.0
            embedding[ids[text], state] = STATE_NORM
            for after, probability in nexts.items():
                # the final RMS norm turns STATE_NORM x unit vector into sqrt(width) x unit vector
                output[ids[after], state] = (SCRIPT_LOGIT + math.log(probability)) / math.sqrt(width)


def write_prm_stand_in(folder: Path, *, shrink: dict | None = None, seed: int = 0) -> Path:
    """A process reward model of Skywork's layout: a random Qwen2 body of the 1.5B configuration (``shrink``-ed)
    and a random value head, with Qwen2.5's tokenizer."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from tracegen.qwen_tokenizer import save_qwen_tokenizer
    from tracegen.value_head import ValueHeadModel, save_value_head_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_qwen_tokenizer(folder)
    torch.manual_seed(seed)
    model = ValueHeadModel(AutoModel.from_config(_config("skywork-prm-1.5b", shrink), dtype=torch.float32))
    save_value_head_model(model, AutoTokenizer.from_pretrained(folder), folder)
    return folder


def place_in_hf_cache(folder: Path, alias: str, hf_home: Path) -> Path:
    """Copy a checkpoint folder into the Hugging Face cache at ``hf_home`` as the snapshot of the repo ``alias``
    names, so that `trace` resolves the alias to it offline."""
    repo = Path(hf_home) / "hub" / f"models--{MODEL_ALIASES[alias].replace('/', '--')}"
    revision = "0" * 40  # a stand-in, not any published commit
    shutil.copytree(folder, repo / "snapshots" / revision, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return repo / "snapshots" / revision
