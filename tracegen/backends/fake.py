"""The fake backends (``--backend fake``, ``fake-stream``): an instant, seeded stand-in for a model of the toy world,
for testing what drives the engines (resume, shards, reruns, continuous growth, closure, scorers) without one.

Like lm-eval's ``DummyLM`` it runs no model: it reads the checkpoint folder's config and tokenizer only. It
writes the toy task's steps (``data.toy.task``): at each step the reference step for the running value, or, with
a seeded probability, the same step with a slipped result (a units or tens column off by one), so solutions keep
the toy world's shape (steps separated by "\\n\\n", the last one boxing an answer that is graded) and a smaller
model is wrong more often (``STEP_VALIDITY``). A question that is not a toy question gets one final step boxing a
seeded number.

Its "logits" are a function of the prefix alone, as a model's are: seeded noise (hashed from the model's name and
the prefix ids) plus, where the text so far follows the reference solution, a margin on the reference's next
token. The margin is the step's confidence c in [0, 1), hashed from the question and the steps before it; a step
is wrong with probability ``2 * (1 - validity) * (1 - c)`` (on average ``1 - validity``), so low confidence
signals a wrong step, as routers expect. Log-probabilities, max logits and top-k are exact for these logits, so
a scoring pass (``continuation_logprobs``, the stream's ``score``) gives what generation recorded.

A step is a function of (request seed, prompt ids), never of its batch: temperature 0 writes the reference step;
above 0 the seed draws which steps slip. top_p is not modelled. ``fake`` grows round by round (as the hf
backend); ``fake-stream`` writes the same steps and adds ``open_stream`` (continuous growth, as on vLLM), whose
engine loop finishes requests in their running batch after as many ticks as they have tokens, the requests
finishing at the same tick in a seeded shuffled order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import random
import threading
import time
from pathlib import Path

import numpy as np

from data.toy import task
from tracegen.backends.base import Draft, GeneratedStep, StepRequest, StepSampling, batch_shares, check_batch
from tracestore.errors import TraceError

# How often a step is right, per toy model: about what data/toy/measured.json measures of the trained models at
# temperature 0.7. Any other checkpoint folder gets DEFAULT_STEP_VALIDITY unless step_validity is given.
STEP_VALIDITY = {"toy-small": 0.72, "toy-medium": 0.9, "toy-large": 0.99}
DEFAULT_STEP_VALIDITY = 0.8
MARGIN_LOW, MARGIN_HIGH = 2.0, 8.0  # logit margin of the reference token at step confidence 0 and 1
SLIPS = (-10, -1, 1, 10)  # how a wrong step's result differs from the right one
STEP_BREAK = task.STEP_DELIMITER  # what the fake model writes between steps (the sampling delimiter only cuts)
_CHAT_USER, _CHAT_ASSISTANT, _CHAT_END = "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>"
MAX_TOPK = 20  # alternatives a position can record, as the vLLM backend's default max_logprobs
VERSION = 1  # of the rules above: raise it when a change makes the fake write other steps (trace.json records it)
TICK_SECONDS = 0.0005  # one engine step of the stream's loop: long enough for the caller to add children meanwhile


class FakeBackend:
    """Seeded toy-world steps with exact scores of seeded logits, no model (for tests); round by round."""

    name = "fake"

    def __init__(self, model_path: str, *, step_validity: float | None = None, max_model_len: int | None = None):
        from transformers import AutoTokenizer

        folder = Path(model_path)
        if not (folder / "config.json").is_file():
            raise TraceError(f"the fake backend reads a local checkpoint folder's config and tokenizer: {model_path}")
        config = json.loads((folder / "config.json").read_text())
        config = config.get("text_config", config)
        self.model_name = folder.name
        self.step_validity = (
            STEP_VALIDITY.get(folder.name, DEFAULT_STEP_VALIDITY) if step_validity is None else step_validity
        )
        if not 0.5 <= self.step_validity <= 1:
            raise TraceError(f"step_validity must be between 0.5 and 1, got {self.step_validity}")
        self.vocab_size = config["vocab_size"]
        self.max_total_tokens = (max_model_len or config["max_position_embeddings"]) - 1
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.eos_id = self.tokenizer.eos_token_id
        self._texts = [self.tokenizer.decode([i], skip_special_tokens=True) for i in range(len(self.tokenizer))]
        self._seed_hash = hashlib.sha256(f"trace-fake\0{self.model_name}\0".encode())
        self._encoded: dict[str, tuple[int, ...]] = {}

    def engine_info(self) -> dict:
        return {
            "name": self.name,
            "version": VERSION,
            "model": self.model_name,
            "step_validity": self.step_validity,
            "logprobs": "exact log-softmax of seeded stand-in logits (no model runs)",
            "prefix_caching": False,
            "max_total_tokens": self.max_total_tokens,
        }

    def close(self) -> None:
        """Nothing runs, so nothing to release."""

    def generate_steps(self, requests: list[StepRequest], sampling: StepSampling) -> list[GeneratedStep]:
        self._check(requests, sampling)
        started = time.perf_counter()
        steps = [self._generate(request, sampling) for request in requests]
        shares = batch_shares(time.perf_counter() - started, [len(step.token_ids) for step in steps])
        for step, share in zip(steps, shares):
            step.gen_seconds = share
        return steps

    def continuation_logprobs(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        return [
            [values[1][0] for values in self._score(prompt, continuation, topk=1)]
            for prompt, continuation in zip(prompts, continuations)
        ]

    def next_token_logprobs(self, prompts: list[list[int]], topk: int) -> list[dict[int, float]]:
        result = []
        for prompt in prompts:
            logprobs = _log_softmax(_Prefix(self, prompt).logits())
            top = _top(logprobs, topk)
            result.append({int(i): float(logprobs[i]) for i in top})
        return result

    def _check(self, requests: list[StepRequest], sampling: StepSampling) -> None:
        check_batch(
            requests, sampling, max_total_tokens=self.max_total_tokens, vocab_size=self.vocab_size, max_topk=MAX_TOPK
        )

    def _generate(self, request: StepRequest, sampling: StepSampling) -> GeneratedStep:
        prefix = _Prefix(self, request.prompt_ids)
        salt = request.seed if sampling.temperature > 0 else "greedy"
        draws = random.Random(_ids_hash(f"{salt}\0", request.prompt_ids))
        budget = min(sampling.max_step_tokens, self.max_total_tokens - len(request.prompt_ids))
        token_ids: list[int] = []
        text = ""
        scores = _Scores()
        planned: list[int] = []
        while True:
            if not planned:
                planned = prefix.intended(draws, sampled=sampling.temperature > 0)
            token = planned.pop(0)
            scores.append(prefix.logits(), token, sampling.topk)
            token_ids.append(token)
            prefix.append(token)
            if token == self.eos_id:
                reason = "eos"
                break
            text += self.token_text(token)
            cut = text.find(sampling.delimiter)
            if cut >= 0:
                reason, text = "delimiter", text[:cut]
                break
            if len(token_ids) >= budget:
                reason = "length"
                break
        return GeneratedStep(
            token_ids=token_ids,
            text=text,
            finish_reason=reason,
            logprobs=scores.logprobs,
            max_logits=scores.max_logits,
            topk_ids=scores.topk_ids,
            topk_logprobs=scores.topk_logprobs,
            n_cached_tokens=0,
            gen_seconds=0.0,
        )

    def _score(self, prompt: list[int], step: list[int], topk: int) -> list:
        """Per step token: ([the token, top-k ids], [its log-prob, top-k log-probs]), as a scoring pass gives."""
        prefix, scores = _Prefix(self, prompt), _Scores()
        for token in step:
            scores.append(prefix.logits(), token, topk)
            prefix.append(token)
        return [
            ([token, *ids], [logprob, *values])
            for token, ids, logprob, values in zip(step, scores.topk_ids, scores.logprobs, scores.topk_logprobs)
        ]

    def token_text(self, token: int) -> str:
        """What ``token`` decodes to alone (nothing for special tokens and ids past the tokenizer's vocabulary)."""
        return self._texts[token] if token < len(self._texts) else ""

    def _encode(self, text: str) -> tuple[int, ...]:
        if text not in self._encoded:
            self._encoded[text] = tuple(self.tokenizer.encode(text, add_special_tokens=False))
        return self._encoded[text]


class StreamingFakeBackend(FakeBackend):
    """The fake backend with vLLM's streaming interface: trace gen grows on it continuously, out of order."""

    name = "fake-stream"

    def __init__(
        self,
        model_path: str,
        *,
        step_validity: float | None = None,
        max_model_len: int | None = None,
        order_seed: int = 0,
    ):
        super().__init__(model_path, step_validity=step_validity, max_model_len=max_model_len)
        self.order_seed = order_seed  # seeds the order in which requests finishing together are delivered

    def open_stream(self, sampling: StepSampling, role: str, events: queue.Queue) -> FakeStream:
        self._check([], sampling)
        return FakeStream(self, sampling, role, events, random.Random(f"{self.order_seed}\0{role}"))


class FakeStream:
    """``StepStream``'s contract: ``generate`` and ``score`` return at once; an engine loop of its own delivers the
    results on ``events`` as ``("generated", role, key, (Draft, seconds))`` and ``("scored", role, key,
    position_scores)``, a failure as ``("failed", role, None, exception)``."""

    def __init__(self, backend: FakeBackend, sampling: StepSampling, role: str, events: queue.Queue, order):
        self._backend, self._sampling, self._role, self._events, self._order = backend, sampling, role, events, order
        self._inbox: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"trace-fake-{role}", daemon=True)
        self._thread.start()

    def generate(self, items: list[tuple[object, StepRequest]]) -> None:
        self._backend._check([request for _, request in items], self._sampling)
        self._inbox.put([("generate", key, request) for key, request in items])

    def score(self, items: list[tuple[object, list[int], list[int]]]) -> None:
        self._inbox.put([("score", key, (prompt, step)) for key, prompt, step in items])

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join()

    def _run(self) -> None:
        running: list[list] = []  # [ticks left, event] of the requests in the running batch
        try:
            while True:
                batches = [self._inbox.get()] if not running else []
                with contextlib.suppress(queue.Empty):
                    while True:
                        batches.append(self._inbox.get_nowait())
                for items in batches:
                    if items is None:
                        return
                    running += [self._work(*item) for item in items]
                time.sleep(TICK_SECONDS)
                for entry in running:
                    entry[0] -= 1
                finished = [entry[1] for entry in running if entry[0] <= 0]
                running = [entry for entry in running if entry[0] > 0]
                self._order.shuffle(finished)
                for event in finished:
                    self._events.put(event)
        except BaseException as error:  # handed to the thread waiting on the results
            self._events.put(("failed", self._role, None, error))

    def _work(self, kind: str, key, payload) -> list:
        """[ticks the request takes, the event it ends with]: one tick per generated token, one for a scoring pass."""
        started = time.perf_counter()
        if kind == "score":
            prompt, step = payload
            return [1, ("scored", self._role, key, self._backend._score(prompt, step, self._sampling.topk))]
        step = self._backend._generate(payload, self._sampling)
        draft = Draft(step.token_ids, step.text, step.finish_reason, step.max_logits, step.n_cached_tokens)
        return [len(step.token_ids), ("generated", self._role, key, (draft, time.perf_counter() - started))]


class _Prefix:
    """What the fake model reads of a prefix: its ids' hash (the logits' noise) and, in a toy solution, the steps
    written so far and the step being written."""

    def __init__(self, backend: FakeBackend, prompt_ids):
        self._backend = backend
        self._hash = backend._seed_hash.copy()
        self._hash.update(np.asarray(prompt_ids, dtype="<i8").tobytes())
        question, solution = _read_chat(backend.tokenizer.decode(list(prompt_ids), skip_special_tokens=False))
        try:
            self.start, self.ops = task.parse_question(question) if question is not None else (None, None)
        except ValueError:
            self.start, self.ops = None, None
        self.question = question
        *self.steps, self.partial = solution.split(STEP_BREAK)
        self.partial_ids: list[int] = list(backend._encode(self.partial)) if self.partial else []
        self._reference: tuple[int, ...] | None = None  # the reference step's ids, while the same step is written
        self._confidence: float | None = None  # and its confidence

    def append(self, token: int) -> None:
        self._hash.update(np.asarray([token], dtype="<i8").tobytes())
        self.partial += self._backend.token_text(token)
        self.partial_ids.append(token)
        if STEP_BREAK in self.partial:
            done, self.partial = self.partial.split(STEP_BREAK, 1)
            self.steps.append(done)
            self._reference = self._confidence = None
            self.partial_ids = list(self._backend._encode(self.partial)) if self.partial else []

    def logits(self) -> np.ndarray:
        """Seeded noise, plus the step's confidence margin on the reference's next token where the text follows it."""
        seed = int.from_bytes(self._hash.copy().digest()[:8], "little")
        logits = np.random.default_rng(seed).standard_normal(self._backend.vocab_size)
        if self.ops is not None:
            if self._reference is None:
                self._reference = self._step_ids(self._reference_text())
            reference, n = self._reference, len(self.partial_ids)
            if n < len(reference) and list(reference[:n]) == self.partial_ids:
                logits[reference[n]] += MARGIN_LOW + (MARGIN_HIGH - MARGIN_LOW) * self.confidence()
        return logits

    def confidence(self) -> float:
        """The confidence in [0, 1) of the step being written: a hash of the question and the steps before it."""
        if self._confidence is None:
            text = f"{self._backend.model_name}\0{self.question}\0{STEP_BREAK.join(self.steps)}"
            self._confidence = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") / 2**64
        return self._confidence

    def intended(self, draws: random.Random, *, sampled: bool) -> list[int]:
        """The tokens the fake writes next: the rest of the step being written (the reference step, or a slipped
        one with probability 2 (1 - validity) (1 - confidence) when sampling), or a step break where the text has
        left every step the model would write."""
        if self.ops is None:
            text = f"so \\boxed{{{draws.randrange(100)}}}"
        else:
            text = self._reference_text()
            slip = 2 * (1 - self._backend.step_validity) * (1 - self.confidence())
            if sampled and draws.random() < slip:
                head, result = text.rsplit("so ", 1)
                right = int(result.removeprefix("\\boxed{").removesuffix("}"))
                wrong = str(right + draws.choice(SLIPS))
                text = f"{head}so " + (f"\\boxed{{{wrong}}}" if result.startswith("\\boxed") else wrong)
        planned = self._step_ids(text)
        n = len(self.partial_ids)
        if list(planned[:n]) != self.partial_ids or n >= len(planned):
            return list(self._backend._encode(STEP_BREAK))
        return list(planned[n:])

    def _reference_text(self) -> str:
        """The right next step given the steps so far: it continues from the last step's result (right or not); past
        the question's last operation, a final step boxing the running value."""
        values = [self.start]
        for op, b in self.ops:
            values.append(task.apply(values[-1], op, b))
        k = len(self.steps)
        last = task.step_result(self.steps[-1]) if self.steps else self.start
        value = values[min(k, len(self.ops))] if last is None else last
        if k >= len(self.ops):
            return f"so \\boxed{{{value}}}"
        op, b = self.ops[k]
        return task.step_text(value, op, b, is_last=k == len(self.ops) - 1)

    def _step_ids(self, text: str) -> tuple[int, ...]:
        """A step as tokens: a final one (boxing an answer) ends with EOS, any other with the step break."""
        if "\\boxed{" in text:
            return (*self._backend._encode(text), self._backend.eos_id)
        return self._backend._encode(text + STEP_BREAK)


class _Scores:
    """Per position: the chosen token's log-prob, the max logit, the top-k ids and log-probs."""

    def __init__(self):
        self.logprobs: list[float] = []
        self.max_logits: list[float] = []
        self.topk_ids: list[list[int]] = []
        self.topk_logprobs: list[list[float]] = []

    def append(self, logits: np.ndarray, token: int, topk: int) -> None:
        logprobs = _log_softmax(logits)
        top = _top(logprobs, topk)
        self.logprobs.append(float(logprobs[token]))
        self.max_logits.append(float(logits.max()))
        self.topk_ids.append([int(i) for i in top])
        self.topk_logprobs.append([float(logprobs[i]) for i in top])


def _ids_hash(salt: str, ids) -> bytes:
    return hashlib.sha256(salt.encode() + np.asarray(ids, dtype="<i8").tobytes()).digest()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def _top(logprobs: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-logprobs, kind="stable")[:k]


def _read_chat(text: str) -> tuple[str | None, str]:
    """(the last user turn, the assistant's text after the last assistant header) of a ChatML prompt; (None, "")
    where the prompt is not one."""
    user = text.rfind(_CHAT_USER)
    assistant = text.rfind(_CHAT_ASSISTANT)
    if user < 0 or assistant < user:
        return None, ""
    question = text[user + len(_CHAT_USER) :].split(_CHAT_END, 1)[0]
    return question, text[assistant + len(_CHAT_ASSISTANT) :]
