"""A small OpenAI-compatible HTTP server on 127.0.0.1 for the openai backend's tests (standard library only).

It plays a model of the toy task: asked to continue a toy prompt (token ids on ``/v1/completions``, messages on
``/v1/chat/completions``), it writes the reference solution's next step, a wrong one where the request's seed
says so, with deterministic log-probabilities and usage. It can inject faults (429 with Retry-After, 500, an
answer slower than the client's timeout, malformed JSON, a body cut off mid-way) on the first attempts of a
request, and logs every request by the digest of its body with its outcome: ``ok`` only for a complete,
well-formed answer (what an API bills).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from data.toy.task import apply, parse_question, step_is_valid, step_text
from tracegen.backends.openai_endpoint import request_key

FAULTS = ("429", "500", "slow", "malformed", "cutoff")
_QUESTION = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.S)
# The verifier's request in each preset (tracegen.prompts.VERIFIER_PRESETS): question, earlier steps, latest step
_VERDICTS = (
    re.compile(r"Question:\n(.*?)\n\nPrevious steps:\n(.*?)\n\nLast step:\n(.*?)\n\nVerdict:", re.S),  # cmdp
    re.compile(r"Question: (.*?)\n\nEarlier steps:\n(.*?)\n\nLatest step:\n(.*?)\n\nIs the latest step", re.S),
)


@dataclass
class ServerState:
    tokenizer: object
    models: tuple = ("toy-small", "toy-large")
    api_key: str | None = None
    faults: dict = field(default_factory=dict)  # fault name -> how many first attempts of a request it hits
    fault_every: int = 1  # a request gets faults when its digest % fault_every == 0
    slow_seconds: float = 2.0
    delay: float = 0.0  # seconds every answer takes
    retry_after: str = "1"
    log: list = field(default_factory=list)  # (digest, outcome, time)
    attempts: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def outcomes(self, outcome: str = "ok") -> Counter:
        with self.lock:
            return Counter(digest for digest, seen, _ in self.log if seen == outcome)


def next_step(question: str, steps_done: int, seed: int) -> tuple[str, bool]:
    """The toy model's next step (text, is_last): the reference step, with a wrong result when seed % 4 == 0."""
    value, operations = parse_question(question)
    for op, operand in operations[:steps_done]:
        value = apply(value, op, operand)
    index = min(steps_done, len(operations) - 1)
    op, operand = operations[index]
    last = index == len(operations) - 1
    text = step_text(value, op, operand, last)
    if seed % 4 == 0:
        text = text[:-1] + str((int(text[-1]) + 1) % 10) if not last else text.replace("}", "1}")
    return text, last


class _Handler(BaseHTTPRequestHandler):
    state: ServerState

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, payload, headers: dict | None = None, *, cut: bool = False) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(data[: len(data) // 2] if cut else data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout) or was killed
            self.close_connection = True
        if cut:
            self.close_connection = True

    def _authorised(self) -> bool:
        key = self.state.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
        return False

    def do_GET(self) -> None:
        if not self._authorised():
            return
        if self.path.rstrip("/") == "/v1/models":
            models = [{"id": name, "object": "model", "owned_by": "toy"} for name in self.state.models]
            self._send(200, {"object": "list", "data": models})
        else:
            self._send(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        if not self._authorised():
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        chat = self.path.endswith("/chat/completions")
        if not chat and not self.path.endswith("/completions"):
            self._send(404, {"error": {"message": "not found"}})
            return
        if body.get("model") not in self.state.models:
            self._send(404, {"error": {"message": f"The model {body.get('model')} does not exist"}})
            return
        state = self.state
        digest = request_key(body)  # the key the client stores the answer under
        with state.lock:
            attempt = state.attempts[digest]
            state.attempts[digest] += 1
        fault = None
        if int(digest, 16) % state.fault_every == 0:
            scheduled = [name for name in FAULTS for _ in range(state.faults.get(name, 0))]
            fault = scheduled[attempt] if attempt < len(scheduled) else None
        with state.lock:
            state.log.append((digest, fault or "ok", time.monotonic()))
        if fault == "429":
            self._send(429, {"error": {"message": "Rate limit reached"}}, {"Retry-After": state.retry_after})
            return
        if fault == "500":
            self._send(500, {"error": {"message": "The server had an error"}})
            return
        if fault == "slow":
            time.sleep(state.slow_seconds)
        time.sleep(state.delay)
        answer = self._chat(body) if chat else self._completion(body)
        if fault == "malformed":
            self._send(200, b'{"id": "cmpl-1", "choices": [{"text": ')
        elif fault == "cutoff":
            self._send(200, answer, cut=True)
        else:
            self._send(200, answer)

    def _step(self, question: str, steps_done: int, seed: int, max_tokens: int) -> tuple[str, list[int], str]:
        text, last = next_step(question, steps_done, seed)
        tokenizer = self.state.tokenizer
        ids = tokenizer.encode(text + ("" if last else "\n\n"), add_special_tokens=False)
        if last:
            ids.append(tokenizer.eos_token_id)
        finish = "stop"
        if len(ids) > max_tokens:
            ids, finish, text = ids[:max_tokens], "length", tokenizer.decode(ids[:max_tokens])
        return text, ids, finish

    def _verdict(self, body: dict, question: str, earlier: str, step: str) -> dict:
        answer, top = _verdict_answer(question, earlier, step, body["top_logprobs"])
        content = [{"token": answer, "logprob": -0.05, "bytes": list(answer.encode()), "top_logprobs": top}]
        return {
            "id": "chatcmpl-verdict",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer},
                    "finish_reason": "length",
                    "logprobs": {"content": content},
                }
            ],
            "usage": _usage(len(body["messages"][-1]["content"]), 1),
        }

    def _completion(self, body: dict) -> dict:
        tokenizer = self.state.tokenizer
        prompt = tokenizer.decode(body["prompt"])
        question = _QUESTION.search(prompt).group(1)
        steps_done = prompt.rsplit("<|im_start|>assistant\n", 1)[1].count("\n\n")
        text, ids, finish = self._step(question, steps_done, body["seed"], body["max_tokens"])
        k = body["logprobs"]
        logprobs = [-0.05 * (1 + (i + body["seed"]) % 3) for i in range(len(ids))]
        top = [
            {f"token_id:{(token + j) % 100}": (value if j == 0 else value - 1.0 - j) for j in range(k)}
            for token, value in zip(ids, logprobs)
        ]
        return {
            "id": "cmpl-toy",
            "object": "text_completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "finish_reason": finish,
                    "stop_reason": "\n\n" if finish == "stop" and ids[-1] != tokenizer.eos_token_id else None,
                    "logprobs": {
                        "tokens": [f"token_id:{token}" for token in ids],
                        "token_logprobs": logprobs,
                        "top_logprobs": top,
                        "text_offset": list(range(len(ids))),
                    },
                }
            ],
            "usage": _usage(len(body["prompt"]), len(ids)),
        }

    def _chat(self, body: dict) -> dict:
        messages = body["messages"]
        verdict = next(filter(None, (pattern.search(messages[-1]["content"]) for pattern in _VERDICTS)), None)
        if verdict:
            return self._verdict(body, *verdict.groups())
        question = messages[1]["content"].split("\n\n", 1)[0]
        so_far = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
        if "Solution so far:\n\n" in messages[1]["content"]:
            so_far = messages[1]["content"].split("Solution so far:\n\n", 1)[1] + "\n\n"
        steps_done = so_far.count("\n\n")
        text, ids, finish = self._step(question, steps_done, body["seed"], body["max_tokens"])
        tokenizer = self.state.tokenizer
        shown = [tokenizer.decode([token]) for token in ids if token != tokenizer.eos_token_id]
        k = body["top_logprobs"]
        content = [
            {
                "token": token,
                "logprob": -0.1,
                "bytes": list(token.encode()),
                "top_logprobs": [{"token": token, "logprob": -0.1}]
                + [{"token": f"alt{j}", "logprob": -2.0 - j} for j in range(k - 1)],
            }
            for token in shown
        ]
        prompt_tokens = sum(len(m["content"]) for m in messages)
        return {
            "id": "chatcmpl-toy",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text.removesuffix("\n\n")},
                    "finish_reason": finish,
                    "logprobs": {"content": content},
                }
            ],
            "usage": _usage(prompt_tokens, len(content)),
        }


def _verdict_answer(question: str, earlier: str, step: str, k: int) -> tuple[str, list[dict]]:
    """The toy checker: the exact verifier's verdict, "correct" or "incorrect", with top-k log-probabilities."""
    valid = step_is_valid(question, [] if earlier in ("(none)", "") else earlier.split("\n\n"), step)
    first, second = ("correct", "incorrect") if valid else ("incorrect", "correct")
    top = [{"token": first, "logprob": -0.05}, {"token": second, "logprob": -3.0}]
    top += [{"token": f" other{j}", "logprob": -6.0 - j} for j in range(k - 2)]
    return first, top


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": prompt_tokens // 32 * 32},
    }


class ApiServer:
    """The server in a background thread: ``with ApiServer(state) as server: server.url``."""

    def __init__(self, state: ServerState):
        self.state = state
        handler = type("Handler", (_Handler,), {"state": state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
