"""Process reward models: a Qwen2 body with a one-unit value head, and the input RSD feeds them.

Checkpoint layout (Skywork-o1-Open-PRM and the toy PRM alike): a Qwen2 ``config.json``, the body's
weights under ``model.*`` and the head as ``v_head.summary.weight`` ([1, hidden]) and
``v_head.summary.bias`` ([1]) in the safetensors files, and the tokenizer files.

Input, as RSD's code lays it out (Skywork's ``prepare_input``): BOS (when the tokenizer has one) + the raw
question + "\\n", tokenised as one text, then every step's tokens each followed by the step token (the last
token of the step separator: RSD's "\\n\\n", one token in Qwen's vocabulary). The reward of a step is the
sigmoid of the value head at its step token; the PRM sees every earlier step of the path. The separator is a
recorded setting of the checkpoint: a PRM trained with another one (the toy PRM: "\\n") names it in its
training.json, and is fed the layout it was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tracestore.errors import TraceError

RSD_SEPARATOR = "\n\n"  # the step token RSD's code puts after each step before the PRM reads it
QUESTION_END = "\n"  # what Skywork's prepare_input puts after the question
SEPARATOR_FIELD = "step_separator"  # training.json field of a PRM trained with another separator
HEAD_PREFIX = "v_head.summary."


def trained_separator(folder: str | Path) -> str:
    """The step separator a PRM checkpoint was trained with: its training.json says, else RSD's."""
    record = Path(folder) / "training.json"
    if record.is_file():
        return json.loads(record.read_text()).get(SEPARATOR_FIELD, RSD_SEPARATOR)
    return RSD_SEPARATOR


def prm_input_ids(tokenizer, question: str, steps: list[str], separator: str) -> tuple[list[int], list[int]]:
    """(token ids, index of each step's step token) of a question and the steps of one path, as Skywork's
    prepare_input builds them: BOS + question + "\\n", then each step + the step token (the last token of
    ``separator``)."""
    step_token = tokenizer.encode(separator, add_special_tokens=False)[-1]
    ids = tokenizer.encode((tokenizer.bos_token or "") + question + QUESTION_END, add_special_tokens=False)
    ends = []
    for step in steps:
        ids += [*tokenizer.encode(step, add_special_tokens=False), step_token]
        ends.append(len(ids) - 1)
    return ids, ends


class ValueHeadModel(nn.Module):
    """A transformer body and a linear value head; ``forward`` returns one logit per position."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        hidden = body.config.get_text_config().hidden_size
        self.summary = nn.Linear(hidden, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        states = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.summary(states).squeeze(-1)

    def state_dict_for_checkpoint(self) -> dict[str, torch.Tensor]:
        tensors = {f"model.{name}": value for name, value in self.body.state_dict().items()}
        tensors.update({f"{HEAD_PREFIX}{name}": value for name, value in self.summary.state_dict().items()})
        return {name: value.detach().contiguous() for name, value in tensors.items()}


def value_head_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The value head's weight and bias in a checkpoint folder; TraceError when it has none."""
    from safetensors import safe_open

    path = Path(path)
    head = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            for key in weights.keys():
                if HEAD_PREFIX in key:
                    head[key.split(HEAD_PREFIX, 1)[1]] = weights.get_tensor(key)
    if set(head) != {"weight", "bias"}:
        found = ", ".join(sorted(head)) or "none"
        raise TraceError(
            f"{path} is not a process reward model: it has no value head ({HEAD_PREFIX}weight and bias; found {found})"
        )
    return head


def load_value_head_model(path: str | Path, device: str | torch.device = "cpu") -> ValueHeadModel:
    """Load a PRM checkpoint folder; TraceError when it has no value head."""
    from transformers import AutoModel
    from transformers.utils import logging

    head = value_head_tensors(path)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the body's load report lists the head's keys as unexpected
    try:
        body = AutoModel.from_pretrained(str(path), dtype=torch.float32)
    finally:
        logging.set_verbosity(verbosity)
    model = ValueHeadModel(body)
    model.summary.load_state_dict({name: value.float() for name, value in head.items()})
    return model.to(device).eval()


def save_value_head_model(model: ValueHeadModel, tokenizer, path: str | Path, metadata: dict | None = None) -> None:
    """Write a checkpoint folder that ``load_value_head_model`` (and transformers' AutoModel) reads."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.body.config
    config.architectures = ["Qwen2ForProcessRewardModel"]
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    save_file(model.state_dict_for_checkpoint(), str(path / "model.safetensors"), metadata={"format": "pt"})
    if metadata is not None:
        (path / "training.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
