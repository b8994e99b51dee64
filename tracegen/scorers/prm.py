"""``prm``: a process reward model scores every step the small model wrote (RSD's signal).

Input as RSD's code feeds it (Skywork's prepare_input; ``tracegen.value_head.prm_input_ids``): BOS + raw
question + "\\n", then each step of the path followed by the step token; value = sigmoid of the value head
at the scored step's step token. The step separator is RSD's "\\n\\n" unless the checkpoint's training.json
records the one it was trained with (the toy PRM: "\\n", the layout it was trained on, kept rather than
retrained); trace.json records it and where it came from. Default model:
Skywork-o1-Open-PRM-Qwen-2.5-1.5B (``skywork-prm-1.5b``); toy traces use ``toy-prm`` shipped in
data/toy (``world_models``). It runs on transformers with either ``--backend`` (vLLM has no
value-head architecture for it). A call reads the step and its separator (the PRM keeps its cache over
the accepted prefix, as RSD runs it) and generates nothing.
"""

from __future__ import annotations

from functools import cached_property

import polars as pl

from tracegen.models import ModelRef, model_entry, named_model
from tracegen.scorers.base import SCORERS, Item, Score, Scorer
from tracestore.errors import TraceError

PRM_INPUT = (
    "BOS + question + \"\\n\", then each step + the step token (the step separator's last token), as Skywork's "
    "prepare_input; value = sigmoid(value head) at the scored step's step token"
)


@SCORERS.register
class ProcessRewardModel(Scorer):
    name = "prm"
    signal = "prm"
    generated_tokens = 0  # a value head reads the step; nothing is generated
    default_batch = 64
    default_model = "skywork-prm-1.5b"
    world_models = {"toy": "toy-prm"}

    @cached_property
    def checkpoint(self) -> ModelRef:
        return named_model(self.model or self.default_model, self.signal)

    def check(self) -> None:
        from tracegen.value_head import value_head_tensors

        value_head_tensors(self.checkpoint.path)

    def wants(self) -> pl.Expr:
        return pl.col("model") != self.manifest.roles[-1]  # the drafts: every model's steps but the largest's

    def describe(self) -> dict:
        from tracegen.value_head import RSD_SEPARATOR

        return {
            **model_entry(self.checkpoint),
            "model": self.signal,
            "input": PRM_INPUT,
            "step_separator": self.separator,
            "step_separator_from": "RSD's code" if self.separator == RSD_SEPARATOR else "the PRM's training.json",
            "engine": "transformers",
        }

    @cached_property
    def separator(self) -> str:
        from tracegen.value_head import trained_separator

        return trained_separator(self.checkpoint.path)

    def _load(self) -> None:
        import torch
        from transformers import AutoTokenizer

        from tracegen.value_head import load_value_head_model

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.network = load_value_head_model(self.checkpoint.path, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.checkpoint.path)
        self.pad_id = self.tokenizer.pad_token_id or 0

    def score(self, items: list[Item]) -> list[Score]:
        import torch

        from tracegen.value_head import prm_input_ids

        encoded = [prm_input_ids(self.tokenizer, item.question, item.step_texts, self.separator) for item in items]
        width = max(len(ids) for ids, _ in encoded)
        limit = self.network.body.config.max_position_embeddings
        if width > limit:
            raise TraceError(f"a PRM input of {width} tokens exceeds the PRM's {limit}-token context")
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (ids, _) in enumerate(encoded):  # right padding: causal attention never reads the pads
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        with torch.inference_mode():
            logits = self.network(input_ids.to(self.device), mask.to(self.device)).float().cpu()
        scores = []
        for row, (_, ends) in enumerate(encoded):
            start = ends[-2] + 1 if len(ends) > 1 else 0
            scores.append(
                Score(value=float(torch.sigmoid(logits[row, ends[-1]])), n_tokens_processed=ends[-1] + 1 - start)
            )
        return scores

    def close(self) -> None:
        self.network = None
        self._started = False
