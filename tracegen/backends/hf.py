"""The transformers backend: batched sampling with a KV cache, exact log-probabilities, on CPU or CUDA.

Each request samples with its own ``torch.Generator`` (one uniform draw per generated token,
inverse-CDF over the top-p nucleus), so its step does not depend on which requests share its
batch. Everything runs in float32; log-probabilities are the log-softmax of the raw logits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from tracegen.backends.base import GeneratedStep, StepRequest, StepSampling, batch_shares, check_batch


@dataclass
class TokenScores:
    """What the model assigns to given tokens: the per-position fields of a GeneratedStep."""

    logprobs: list[float] = field(default_factory=list)
    max_logits: list[float] = field(default_factory=list)
    topk_ids: list[list[int]] = field(default_factory=list)
    topk_logprobs: list[list[float]] = field(default_factory=list)

    def append(self, token_scores: tuple[float, float, list[int], list[float]]) -> None:
        logprob, max_logit, topk_ids, topk_logprobs = token_scores
        self.logprobs.append(logprob)
        self.max_logits.append(max_logit)
        self.topk_ids.append(topk_ids)
        self.topk_logprobs.append(topk_logprobs)


class HFBackend:
    name = "hf"

    def __init__(
        self,
        model_path: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        max_model_len: int | None = None,
        max_batch_size: int = 64,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        weights_dtype = "auto" if dtype == "auto" else getattr(torch, dtype or "float32")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=weights_dtype).to(self.device).eval()
        config = self.model.config.get_text_config()
        # One position short of the model's context, as in the vLLM backend (whose scoring pass needs it).
        self.max_total_tokens = (max_model_len or config.max_position_embeddings) - 1
        self.max_batch_size = max_batch_size
        self.vocab_size = config.vocab_size
        generation_eos = self.model.generation_config.eos_token_id
        extra_eos = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
        self.eos_ids = {self.tokenizer.eos_token_id, *extra_eos} - {None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

    def engine_info(self) -> dict:
        return {
            "name": self.name,
            "version": transformers.__version__,
            "torch": torch.__version__,
            "device": self.device.type,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "logprobs": "exact: log-softmax of the raw logits",
            "sampler": "inverse CDF over the top-p nucleus, one uniform per token from a per-request torch.Generator",
            "prefix_caching": False,
            "max_total_tokens": self.max_total_tokens,
        }

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def generate_steps(self, requests: list[StepRequest], sampling: StepSampling) -> list[GeneratedStep]:
        check_batch(
            requests,
            sampling,
            max_total_tokens=self.max_total_tokens,
            vocab_size=self.vocab_size,
            max_topk=self.vocab_size,
        )
        steps: list[GeneratedStep] = []
        for start in range(0, len(requests), self.max_batch_size):
            steps += self._generate_batch(requests[start : start + self.max_batch_size], sampling)
        return steps

    @torch.inference_mode()
    def teacher_force(self, prompt_ids: list[int], continuation_ids: list[int], topk: int) -> TokenScores:
        """The scores of ``continuation_ids`` after ``prompt_ids``, from one full forward pass (no cache)."""
        ids = torch.tensor([list(prompt_ids) + list(continuation_ids)], device=self.device)
        logits = self.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
        scores = TokenScores()
        for token_scores in _score_rows(logits, ids[0, len(prompt_ids) :], topk):
            scores.append(token_scores)
        return scores

    def continuation_logprobs(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        return [
            self.teacher_force(prompt, continuation, topk=1).logprobs
            for prompt, continuation in zip(prompts, continuations)
        ]

    @torch.inference_mode()
    def next_token_logprobs(self, prompts: list[list[int]], topk: int) -> list[dict[int, float]]:
        result = []
        for prompt in prompts:
            logits = self.model(input_ids=torch.tensor([list(prompt)], device=self.device), logits_to_keep=1).logits
            top = logits[0, -1].float().log_softmax(-1).topk(min(topk, logits.shape[-1]))
            result.append(dict(zip(top.indices.tolist(), top.values.tolist())))
        return result

    @torch.inference_mode()
    def _generate_batch(self, requests: list[StepRequest], sampling: StepSampling) -> list[GeneratedStep]:
        started = time.perf_counter()
        generators = [torch.Generator().manual_seed(request.seed) for request in requests]
        prompt_lens = [len(request.prompt_ids) for request in requests]
        budgets = [min(sampling.max_step_tokens, self.max_total_tokens - n) for n in prompt_lens]
        width = max(prompt_lens)
        input_ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, request in enumerate(requests):  # left padding: every row's last token is in the last column
            input_ids[row, width - prompt_lens[row] :] = torch.tensor(request.prompt_ids)
            attention_mask[row, width - prompt_lens[row] :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
        )
        cache, logits = output.past_key_values, output.logits[:, -1].float()

        token_ids: list[list[int]] = [[] for _ in requests]
        scores = [TokenScores() for _ in requests]
        texts = [""] * len(requests)
        finish_reasons = [""] * len(requests)
        active = list(range(len(requests)))  # request index of each cache row
        while True:
            sampled = _sample(logits, [generators[i] for i in active], sampling)
            row_scores = _score_rows(logits, sampled, sampling.topk)
            still_running = []
            for row, (i, token, token_scores) in enumerate(zip(active, sampled.tolist(), row_scores)):
                token_ids[i].append(token)
                scores[i].append(token_scores)
                reason, texts[i] = self._finish(token_ids[i], budgets[i], sampling.delimiter)
                if reason:
                    finish_reasons[i] = reason
                else:
                    still_running.append(row)
            if not still_running:
                break
            keep = torch.tensor(still_running, device=self.device)
            cache.batch_select_indices(keep)
            active = [active[row] for row in still_running]
            attention_mask = torch.cat([attention_mask[keep], attention_mask.new_ones((len(active), 1))], dim=1)
            next_ids = torch.tensor([[token_ids[i][-1]] for i in active], device=self.device)
            position_ids = torch.tensor([[prompt_lens[i] + len(token_ids[i]) - 1] for i in active], device=self.device)
            logits = (
                self.model(
                    input_ids=next_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=True,
                )
                .logits[:, -1]
                .float()
            )

        shares = batch_shares(time.perf_counter() - started, [len(ids) for ids in token_ids])
        return [
            GeneratedStep(
                token_ids=ids,
                text=text,
                finish_reason=reason,
                logprobs=s.logprobs,
                max_logits=s.max_logits,
                topk_ids=s.topk_ids,
                topk_logprobs=s.topk_logprobs,
                n_cached_tokens=0,
                gen_seconds=share,
            )
            for ids, text, reason, s, share in zip(token_ids, texts, finish_reasons, scores, shares)
        ]

    def _finish(self, ids: list[int], budget: int, delimiter: str) -> tuple[str, str]:
        """(finish reason or "", text so far), checked in vLLM's order: EOS, delimiter, length."""
        if ids[-1] in self.eos_ids:
            return "eos", self.tokenizer.decode(ids[:-1], skip_special_tokens=True)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = text.find(delimiter)
        if cut >= 0:
            return "delimiter", text[:cut]
        return ("length" if len(ids) >= budget else ""), text


def _score_rows(logits: torch.Tensor, tokens: torch.Tensor, topk: int):
    """Per row of float32 ``logits``: (log-prob of its token, max logit, top-k ids, top-k log-probs)."""
    logprobs = logits.log_softmax(-1)
    top = logprobs.topk(topk, dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0]
    return zip(chosen.tolist(), logits.max(-1).values.tolist(), top.indices.tolist(), top.values.tolist())


def _sample(logits: torch.Tensor, generators: list[torch.Generator], sampling: StepSampling) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else inverse CDF of one uniform per row over the nucleus."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = (logits / sampling.temperature).softmax(-1)
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True, stable=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    nucleus = torch.where(mass_before < sampling.top_p, sorted_probs, torch.zeros_like(sorted_probs))
    cumulative = nucleus.cumsum(-1)
    uniforms = torch.stack([torch.rand((), generator=g) for g in generators]).to(logits.device)
    positions = torch.searchsorted(cumulative, (uniforms * cumulative[:, -1])[:, None], right=True)
    # u * total can round up to total; stay on the last token with nonzero probability
    positions = torch.minimum(positions, (nucleus > 0).sum(-1, keepdim=True) - 1)
    return sorted_ids.gather(-1, positions)[:, 0]
