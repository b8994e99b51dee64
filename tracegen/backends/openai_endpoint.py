"""The openai backend: a model role served by an OpenAI-compatible endpoint (a closed API or a self-hosted server).

Two request modes, recorded in trace.json:

- ``completions``: ``/v1/completions`` with the exact token-id prefix as the prompt (self-hosted vLLM or
  SGLang servers), so a step continues the same ids as on a local engine. The server's extension
  ``return_tokens_as_token_ids`` gives every token (and top-k alternative) as its id.
- ``chat``: ``/v1/chat/completions`` for chat models. The question and the steps so far go into the
  messages by one of two recorded layouts: ``final`` (the steps are the assistant's unfinished turn, continued
  through the server's ``continue_final_message`` extension: vLLM, SGLang) or ``instruction`` (closed APIs:
  the steps so far are quoted in the user turn with a request to write the next step only).

Every response is written atomically to the trace's ``_api/ROLE`` folder as it arrives, under a digest of the
request body (model, prompt or messages, sampling settings, seed). A request whose response is stored is never
sent again: a run killed mid-round and started again sends only the missing ones, and a finished trace sends
nothing. The API key is read from the environment variable the user names and never written anywhere.

Endpoints give top-k log-probabilities, not raw logits: steps from this backend have no max logits (the
raw-logit columns are null) and carry the endpoint's billed usage instead of an engine's cache counts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import random
from collections.abc import Callable
from pathlib import Path

from replay.costs import Price
from tracegen.backends.base import GeneratedStep, StepRequest, StepSampling, check_batch
from tracegen.backends.endpoint_spec import ApiSpec, ClientOptions, Spend, chat_messages, spec_price
from tracestore.atomic import write_atomic
from tracestore.errors import TraceError
from tracestore.schema import API_RESPONSES_DIR, UNKNOWN_TOKEN_ID

TOKEN_ID_PREFIX = "token_id:"  # how vLLM and SGLang write a token with return_tokens_as_token_ids
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
DEFAULT_CONTEXT = 128_000  # assumed for endpoints that do not report their context length


class BudgetSpent(TraceError):
    """The run's --budget-usd was reached; what was bought is stored."""


def request_key(body: dict) -> str:
    """The digest a response is stored under: the same request body always maps to the same file."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


class ResponseJournal:
    """One JSON file per response under ``TRACE/_api/ROLE/``, written atomically on arrival."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))["response"]
        except (ValueError, KeyError, TypeError):
            raise TraceError(f"{path} is not a stored API response; delete it to send that request again") from None

    def put(self, key: str, body: dict, response: dict, attempts: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"request": body, "response": response, "attempts": attempts}
        write_atomic(self.path(key), (json.dumps(record, sort_keys=True) + "\n").encode())


class OpenAIBackend:
    """A ``Backend`` whose steps come from an OpenAI-compatible endpoint through the official async SDK."""

    name = "openai"

    def __init__(
        self,
        spec: ApiSpec,
        *,
        journal_dir: Path,
        model_name: str,
        client: ClientOptions | None = None,
        vocab_size: int | None = None,
        tokenizer=None,
        report: Callable | None = None,
    ):
        self.spec = spec
        self.tokenizer = tokenizer  # the trace's: a chat step's text becomes the ids other models continue
        self.model = spec.model or model_name
        self.client_options = client or ClientOptions()
        self.journal = ResponseJournal(journal_dir)
        self.vocab_size = vocab_size
        self.report = report or (lambda **_: None)
        self.spend = Spend()
        self.price = spec_price(spec)
        if self.client_options.budget_usd is not None and self.price is None:
            raise TraceError(
                f"--budget-usd needs the price of the {spec.role} role ({self.model} is not in the price table): "
                f"add price=IN/CACHED/OUT (USD per 1M tokens) to its --api"
            )
        self._context: int | None = spec.context
        self.max_total_tokens = (self._context or DEFAULT_CONTEXT) - 1
        self.max_logprobs = 20  # OpenAI's top_logprobs maximum

    # -- the Backend interface

    def engine_info(self) -> dict:
        return {**self.spec.manifest_entry(), "served_model": self.model, "logprobs": "endpoint top-k (no raw logits)"}

    def close(self) -> None:
        pass

    def connect(self) -> None:
        """Ask the endpoint for its models once: a wrong key, URL or model name is one clear error now,
        and vLLM's ``max_model_len`` sets the context (one token kept back, as the local vLLM engine does)."""
        models = asyncio.run(self._list_models())
        served = {entry.get("id"): entry for entry in models}
        if served and self.model not in served:
            raise TraceError(
                f"the endpoint {self.spec.url} serves no model {self.model!r} (it serves: "
                f"{', '.join(sorted(str(name) for name in served))}); set model= in --api {self.spec.role}"
            )
        length = (served.get(self.model) or {}).get("max_model_len")
        if self._context is None and isinstance(length, int):
            self._context = length
            self.max_total_tokens = length - 1

    def generate_steps(self, requests: list[StepRequest], sampling: StepSampling) -> list[GeneratedStep]:
        check_batch(
            requests,
            sampling,
            max_total_tokens=self.max_total_tokens,
            vocab_size=self.vocab_size or 1 << 62,
            max_topk=self.max_logprobs,
        )
        bodies = [self._body(request, sampling) for request in requests]
        return [self._step(response, sampling) for response in self._responses(bodies, mode=self.spec.mode)]

    def _responses(self, bodies: list[dict], *, mode: str) -> list[dict]:
        """The response to each request body: stored ones from the journal, the others sent (and stored)."""
        keys = [request_key(body) for body in bodies]
        responses: dict[str, dict] = {}
        for key in set(keys):
            stored = self.journal.get(key)
            if stored is not None:
                responses[key] = stored
        self.spend.stored += sum(key in responses for key in keys)
        todo = {key: body for key, body in zip(keys, bodies) if key not in responses}
        if todo:
            self.report(stage="api-start", role=self.spec.role, total=len(todo), stored=len(keys) - len(todo))
            responses.update(asyncio.run(self._send_all(todo, mode)))
        missing = [key for key in keys if key not in responses]
        if missing:
            raise BudgetSpent(
                f"--budget-usd {self.client_options.budget_usd:g} reached: this run spent "
                f"${self.client_options.run_spend.usd:.4f} on {self.client_options.run_spend.requests} API requests; "
                f"every response is stored in the trace, {len(missing)} requests for the {self.spec.role} model were "
                "not sent. Rerun with a larger --budget-usd to continue (stored responses are not sent again)."
            )
        return [responses[key] for key in keys]

    def chat_next_token(self, prompts: list[str], topk: int) -> list[tuple[list[tuple[str, float]], dict]]:
        """For each prompt (one user message), the ``topk`` likeliest first tokens of the greedy reply as (text,
        log-probability), best first, and the billed usage; answered from the journal where stored (for scorers)."""
        bodies = [
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 1,
                "temperature": 0,
                "seed": 0,
                "logprobs": True,
                "top_logprobs": topk,
            }
            for prompt in prompts
        ]
        responses = self._responses(bodies, mode="chat")
        results = []
        for response in responses:
            content = response["choices"][0]["logprobs"]["content"]
            top = [(entry["token"], float(entry["logprob"])) for entry in content[0]["top_logprobs"]] if content else []
            results.append((sorted(top, key=lambda item: -item[1]), usage_of(response)))
        return results

    def continuation_logprobs(self, prompts, continuations):
        raise TraceError(f"the {self.spec.role} model is served by an API: it cannot score given tokens")

    def next_token_logprobs(self, prompts, topk):
        raise TraceError(f"the {self.spec.role} model is served by an API: it cannot score given tokens")

    # -- requests

    def _body(self, request: StepRequest, sampling: StepSampling) -> dict:
        body: dict = {
            "model": self.model,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": request.seed,
            "stop": [sampling.delimiter],
        }
        room = self.max_total_tokens - len(request.prompt_ids)
        max_tokens = min(sampling.max_step_tokens, room)
        if self.spec.mode == "completions":
            body.update(
                prompt=list(request.prompt_ids),
                max_tokens=max_tokens,
                logprobs=sampling.topk,
                return_tokens_as_token_ids=True,
            )
            return body
        if request.question is None:
            raise TraceError("chat mode needs the question and step texts of every request")
        body.update(
            messages=chat_messages(self.spec.layout, request.question, request.steps, sampling.delimiter),
            max_tokens=sampling.max_step_tokens,
            logprobs=True,
            top_logprobs=sampling.topk,
        )
        if self.spec.layout == "final":
            body.update(continue_final_message=True, add_generation_prompt=False, return_tokens_as_token_ids=True)
        return body

    async def _list_models(self) -> list[dict]:
        client = self._client()
        try:
            page = await self._call(lambda: client.models.list(), key="models")
            return [model.model_dump() for model in page.data]
        finally:
            await client.close()

    def _client(self):
        import openai

        api_key = "none"
        if self.spec.key_env is not None:
            api_key = os.environ.get(self.spec.key_env, "")
            if not api_key:
                raise TraceError(
                    f"the {self.spec.role} role's API key variable {self.spec.key_env} is not set in the environment"
                )
        return openai.AsyncOpenAI(
            base_url=self.spec.url, api_key=api_key, max_retries=0, timeout=self.client_options.timeout
        )

    async def _send_all(self, todo: dict[str, dict], mode: str) -> dict[str, dict]:
        client = self._client()
        gate = asyncio.Semaphore(self.client_options.concurrency)
        results: dict[str, dict] = {}
        budget = self.client_options.budget_usd

        async def one(key: str, body: dict) -> None:
            async with gate:
                if budget is not None and self.client_options.run_spend.usd >= budget:
                    return
                response, attempts = await self._send(client, key, body, mode)
                self.journal.put(key, body, response, attempts)
                results[key] = response
                self._account(response, attempts)

        try:
            await asyncio.gather(*(one(key, body) for key, body in todo.items()))
        finally:
            await client.close()
        return results

    async def _send(self, client, key: str, body: dict, mode: str) -> tuple[dict, int]:
        standard, extra = _split_body(body, mode)
        create = client.completions.create if mode == "completions" else client.chat.completions.create

        async def call():
            response = await create(**standard, extra_body=extra or None)
            data = response.model_dump(mode="json")
            _check_response(data, mode)
            return data

        return await self._call(call, key=key, with_attempts=True)

    async def _call(self, call: Callable, *, key: str, with_attempts: bool = False):
        """``call()`` with retries: exponential backoff with jitter on 429, 5xx, timeouts, cut-off and malformed
        responses, honouring Retry-After. A wrong key, unknown model or unreachable endpoint is one TraceError."""
        import openai

        jitter = random.Random(key)
        attempt = 0
        while True:
            retry_after = None
            try:
                result = await call()
                return (result, attempt + 1) if with_attempts else result
            except openai.AuthenticationError:
                raise TraceError(self._where() + " rejected the API key (401)" + self._key_hint()) from None
            except openai.PermissionDeniedError:
                raise TraceError(self._where() + " refused access (403)" + self._key_hint()) from None
            except openai.NotFoundError:
                raise TraceError(
                    self._where() + f" answered 404: no model {self.model!r} there, or the URL is not an "
                    "OpenAI-compatible base URL (it usually ends in /v1)"
                ) from None
            except openai.APIStatusError as error:
                if error.status_code not in RETRY_STATUS:
                    raise TraceError(
                        self._where() + f" refused a request ({error.status_code}): {_message(error)}"
                    ) from None
                reason = f"HTTP {error.status_code}"
                retry_after = _retry_after(error.response.headers)
            except openai.APITimeoutError:
                reason = f"no answer within {self.client_options.timeout:g} s"
            except openai.APIConnectionError as error:
                reason = f"connection failed ({_cause(error)})"
            except (ValueError, openai.APIResponseValidationError, MalformedResponse) as error:
                reason = f"malformed response ({str(error).splitlines()[0][:120]})"
            if attempt >= self.client_options.max_retries:
                raise TraceError(
                    self._where() + f" failed {attempt + 1} times, last: {reason}; "
                    "every response received so far is stored, rerun the same command to continue"
                ) from None
            backoff = min(self.client_options.max_backoff, self.client_options.backoff * 2**attempt)
            delay = retry_after if retry_after is not None else backoff * (0.5 + jitter.random() / 2)
            self.spend.retries += 1
            attempt += 1
            await asyncio.sleep(min(delay, self.client_options.max_backoff))

    def _where(self) -> str:
        return f"the {self.spec.role} model's endpoint {self.spec.url}"

    def _key_hint(self) -> str:
        if self.spec.key_env is None:
            return "; name the variable holding the key with key-env=VAR in --api"
        return f"; check the key in ${self.spec.key_env}"

    def _account(self, response: dict, attempts: int) -> None:
        usage = usage_of(response)
        cost = usd(self.price, usage) if self.price is not None else 0.0
        for spend in (self.spend, self.client_options.run_spend):
            spend.requests += 1
            spend.prompt_tokens += usage["prompt_tokens"]
            spend.cached_tokens += usage["cached_tokens"]
            spend.completion_tokens += usage["completion_tokens"]
            spend.usd += cost
        self.report(stage="api-response", role=self.spec.role, spend=self.spend)

    # -- responses

    def _step(self, response: dict, sampling: StepSampling) -> GeneratedStep:
        choice = response["choices"][0]
        usage = usage_of(response)
        if self.spec.mode == "completions":
            logprobs = choice["logprobs"]
            tokens = logprobs["tokens"]
            sampled = logprobs["token_logprobs"]
            alternatives = [sorted(top.items(), key=lambda item: -item[1]) for top in logprobs["top_logprobs"]]
            text = choice["text"]
        else:
            content = choice["logprobs"]["content"]
            tokens = [entry["token"] for entry in content]
            sampled = [entry["logprob"] for entry in content]
            alternatives = [[(top["token"], top["logprob"]) for top in entry["top_logprobs"]] for entry in content]
            alternatives = [sorted(top, key=lambda item: -item[1]) for top in alternatives]
            text = choice["message"]["content"] or ""
        if not tokens:
            raise TraceError(f"the {self.spec.role} model's endpoint returned a step without tokens")
        ids = [_token_id(token) for token in tokens]
        texts = None if all(i != UNKNOWN_TOKEN_ID for i in ids) else [_token_text(token) for token in tokens]
        top = [alt[: sampling.topk] for alt in alternatives]
        text, finish = _finish(choice, text, sampling.delimiter)
        return GeneratedStep(
            token_ids=ids,
            text=text,
            finish_reason=finish,
            logprobs=[float(value) for value in sampled],
            max_logits=None,
            topk_ids=[[_token_id(token) for token, _ in alt] for alt in top],
            topk_logprobs=[[float(value) for _, value in alt] for alt in top],
            n_cached_tokens=usage["cached_tokens"],
            gen_seconds=0.0,
            token_texts=texts,
            usage=usage,
            continuation_ids=None if self.spec.mode == "completions" else self._continuation(text, finish, sampling),
        )

    def _continuation(self, text: str, finish: str, sampling: StepSampling) -> list[int]:
        if self.tokenizer is None:
            raise TraceError(f"chat mode for the {self.spec.role} role needs the trace's tokenizer")
        return continuation_ids(self.tokenizer, text, finish, sampling.delimiter)


class MalformedResponse(ValueError):
    pass


def _check_response(data: dict, mode: str) -> None:
    """A 200 whose body lacks what a step needs is treated like a failed attempt (and retried)."""
    try:
        choice = data["choices"][0]
        usage = data["usage"]
        int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        logprobs = choice["logprobs"]
        if mode == "completions":
            ok = len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"])
        else:
            ok = isinstance(logprobs["content"], list) and "content" in choice["message"]
    except (KeyError, IndexError, TypeError, ValueError):
        ok = False
    if not ok:
        raise MalformedResponse("a response without choices, logprobs or usage")


_STANDARD = {
    "completions": {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "logprobs"},
    "chat": {"model", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "logprobs", "top_logprobs"},
}


def _split_body(body: dict, mode: str) -> tuple[dict, dict]:
    """The SDK's own arguments, and the server extensions it sends as extra body fields."""
    standard = {key: value for key, value in body.items() if key in _STANDARD[mode]}
    return standard, {key: value for key, value in body.items() if key not in _STANDARD[mode]}


def continuation_ids(tokenizer, text: str, finish_reason: str, delimiter: str) -> list[int]:
    """The ids a chat-mode step adds to its node's prompt: its text (and the delimiter that ended it) in the
    trace's tokenizer, since a chat endpoint's own tokens are not the trace's."""
    suffix = delimiter if finish_reason == "delimiter" else ""
    return list(tokenizer.encode(text + suffix, add_special_tokens=False))


def usage_of(response: dict) -> dict:
    """Billed tokens of one response: prompt, cached prompt (``prompt_tokens_details.cached_tokens``), completion."""
    usage = response.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return {
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "cached_tokens": int(details.get("cached_tokens") or 0),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
    }


def usd(price: Price, usage: dict) -> float:
    uncached = usage["prompt_tokens"] - usage["cached_tokens"]
    return (
        price.input * uncached + price.cached_input * usage["cached_tokens"] + price.output * usage["completion_tokens"]
    ) / 1e6


def _token_id(token: str) -> int:
    if token.startswith(TOKEN_ID_PREFIX):
        return int(token[len(TOKEN_ID_PREFIX) :])
    return UNKNOWN_TOKEN_ID


def _token_text(token: str) -> str:
    return "" if token.startswith(TOKEN_ID_PREFIX) else token


def _finish(choice: dict, text: str, delimiter: str) -> tuple[str, str]:
    """(step text without the delimiter, finish reason) of one choice.

    vLLM and SGLang say which stop ended a step (``stop_reason``: the stop string, or None / a token id for EOS);
    closed APIs only say "stop", which is read as the delimiter (a step that ended the solution without it is
    still final by its \\boxed answer).
    """
    if choice.get("finish_reason") == "length":
        return text, "length"
    if "stop_reason" in choice:
        return text, "delimiter" if isinstance(choice["stop_reason"], str) else "eos"
    return text.removesuffix(delimiter), "delimiter"


def _retry_after(headers) -> float | None:
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    return None


def _message(error) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        message = body.get("message") or (body.get("error") or {}).get("message")
        if message:
            return str(message).splitlines()[0][:300]
    return str(error).splitlines()[0][:300]


def _cause(error: BaseException) -> str:
    cause = error.__cause__ or error.__context__
    return type(cause).__name__ if cause is not None else "no connection"


def open_api_backend(
    spec: ApiSpec,
    trace_root: Path,
    *,
    model_name: str,
    client: ClientOptions | None = None,
    vocab_size: int | None = None,
    tokenizer=None,
    report: Callable | None = None,
) -> OpenAIBackend:
    """The backend of one API-served role, its responses stored under ``trace_root/_api/ROLE``, checked against
    the endpoint (reachable, key accepted, model served) before any step is asked for."""
    backend = OpenAIBackend(
        spec,
        journal_dir=Path(trace_root) / API_RESPONSES_DIR / spec.role,
        model_name=model_name,
        client=client,
        vocab_size=vocab_size,
        tokenizer=tokenizer,
        report=report,
    )
    backend.connect()
    return backend
