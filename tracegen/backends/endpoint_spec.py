"""What `--api` says about a model role served by an OpenAI-compatible endpoint: its spec (URL, served model,
request mode, key variable, chat layout, price, context), the client's options, what a run bought, and how a
chat-mode request lays out the question and the steps so far. The backend that sends the requests is
``tracegen.backends.openai_endpoint``.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field

from replay.costs import KNOWN_PRICES, Price
from tracestore.errors import TraceError

MODES = ("completions", "chat")
CHAT_LAYOUTS = ("final", "instruction")
CHAT_INSTRUCTION = (
    "Continue the solution with exactly one more step: write only the next step, as one paragraph, and stop. "
    "If it is the last step, put the final answer within \\boxed{}."
)


@dataclass(frozen=True)
class ApiSpec:
    """How one model role is served: ``ROLE:url=URL,model=NAME,mode=completions|chat,key-env=VAR,...``."""

    role: str
    url: str
    model: str | None = None  # the served model name (default: the role's model name)
    mode: str = "completions"
    key_env: str | None = None  # environment variable holding the API key (none: a local server without one)
    layout: str = "instruction"  # chat mode: "final" (continue_final_message) or "instruction"
    price: str | None = None  # a KNOWN_PRICES model name or input/cached/output USD per 1M tokens
    context: int | None = None  # the endpoint's context length, where /models does not say

    def manifest_entry(self) -> dict:
        """What can change a step (the cache key): mode, served model and request layout; never URL or key."""
        entry = {"name": "openai", "mode": self.mode, "served_model": self.model}
        if self.mode == "chat":
            entry["chat_layout"] = self.layout
            entry["chat_template"] = chat_template_description(self.layout)
        return entry


@dataclass
class Spend:
    """What this run bought from one endpoint so far."""

    requests: int = 0
    stored: int = 0  # requests answered from the journal (not sent)
    retries: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0


@dataclass(frozen=True)
class ClientOptions:
    """How the client behaves towards every endpoint of a run."""

    concurrency: int = 8  # requests in flight per role
    timeout: float = 120.0  # seconds per request attempt
    max_retries: int = 6  # retries of one request on 429, 5xx, timeouts, cut-off or malformed responses
    backoff: float = 0.5  # seconds before the first retry; doubled each retry, with jitter
    max_backoff: float = 60.0
    budget_usd: float | None = None  # stop sending once this run spent this many dollars
    run_spend: Spend = field(default_factory=Spend, compare=False)  # what the run bought, all roles together


def client_options(concurrency: int, timeout: float, max_retries: int, budget_usd: float | None) -> ClientOptions:
    """ClientOptions from the command line, each checked (TraceError naming the option)."""
    checks = [
        (concurrency >= 1, f"--concurrency must be at least 1, got {concurrency}"),
        (timeout > 0, f"--request-timeout must be above 0 seconds, got {timeout}"),
        (max_retries >= 0, f"--max-retries must be at least 0, got {max_retries}"),
        (budget_usd is None or budget_usd > 0, f"--budget-usd must be above 0, got {budget_usd}"),
    ]
    for ok, message in checks:
        if not ok:
            raise TraceError(message)
    return ClientOptions(concurrency=concurrency, timeout=timeout, max_retries=max_retries, budget_usd=budget_usd)


_SPEC_KEYS = {"url", "model", "mode", "key-env", "layout", "price", "context"}


def parse_api_spec(text: str) -> ApiSpec:
    """``ROLE:url=URL[,model=NAME][,mode=completions|chat][,key-env=VAR][,layout=final|instruction]
    [,price=gpt-4.1-mini|IN/CACHED/OUT][,context=N]`` -> ApiSpec (TraceError naming what is wrong)."""
    role, sep, rest = text.partition(":")
    if not sep or not role or not rest:
        raise TraceError(f"--api must look like ROLE:url=URL,model=NAME,mode=chat,key-env=VAR; got {text!r}")
    values: dict[str, str] = {}
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        if not eq or key not in _SPEC_KEYS:
            raise TraceError(f"--api {role}: unknown setting {item!r} (settings: {', '.join(sorted(_SPEC_KEYS))})")
        values[key] = value
    if "url" not in values:
        raise TraceError(f"--api {role}: needs url=BASE_URL (e.g. http://127.0.0.1:8000/v1)")
    spec = ApiSpec(
        role=role,
        url=_checked_url(role, values["url"]).rstrip("/"),
        model=values.get("model"),
        mode=values.get("mode", "completions"),
        key_env=values.get("key-env"),
        layout=values.get("layout", "instruction"),
        price=values.get("price"),
        context=int(values["context"]) if values.get("context", "").isdigit() else None,
    )
    if spec.mode not in MODES:
        raise TraceError(f"--api {role}: mode must be one of {', '.join(MODES)}, not {spec.mode!r}")
    if spec.layout not in CHAT_LAYOUTS:
        raise TraceError(f"--api {role}: layout must be one of {', '.join(CHAT_LAYOUTS)}, not {spec.layout!r}")
    if "context" in values and spec.context is None:
        raise TraceError(f"--api {role}: context must be a whole number of tokens, not {values['context']!r}")
    return spec


def _checked_url(role: str, url: str) -> str:
    """``url`` if it is an http(s) address with a host and no user info: a key in a URL would be stored in
    trace.json and shown in messages and in the writer's lock, and any other scheme can only fail, slowly."""
    parts = urllib.parse.urlsplit(url)
    if "@" in parts.netloc:
        host = parts.netloc.rpartition("@")[2]
        shown = urllib.parse.urlunsplit(parts._replace(netloc=f"***@{host}"))
        raise TraceError(
            f"--api {role}: the url carries a user name or key ({shown}); give the key with key-env=VAR instead "
            "(read from $VAR, never stored)"
        )
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise TraceError(f"--api {role}: url must be an http:// or https:// address with a host, got {url!r}")
    return url


def spec_price(spec: ApiSpec) -> Price | None:
    """The role's price per 1M tokens: given as price=, else the list price of its served model, else None."""
    from replay.costs import parse_price

    if spec.price is not None:
        return parse_price(f"{spec.role}={spec.price}")[1]
    return KNOWN_PRICES.get(spec.model or "")


def chat_template_description(layout: str) -> dict:
    """The recorded chat layout (what the seeds call adapting the prompt format to a chat API)."""
    from tracegen.prompts import SYSTEM_PROMPT

    if layout == "final":
        return {
            "system": SYSTEM_PROMPT,
            "user": "{question}",
            "assistant": "{steps joined by the delimiter, plus the delimiter if any}",
            "continue_final_message": True,
        }
    return {
        "system": SYSTEM_PROMPT,
        "user": "{question}\n\n" + CHAT_INSTRUCTION + "\n\nSolution so far:\n\n{steps joined by the delimiter}",
        "first_step_user": "{question}\n\n" + CHAT_INSTRUCTION,
    }


def chat_messages(layout: str, question: str, steps: tuple[str, ...], delimiter: str) -> list[dict]:
    from tracegen.prompts import SYSTEM_PROMPT

    system = {"role": "system", "content": SYSTEM_PROMPT}
    if layout == "final":
        so_far = delimiter.join(steps) + delimiter if steps else ""
        return [system, {"role": "user", "content": question}, {"role": "assistant", "content": so_far}]
    user = f"{question}\n\n{CHAT_INSTRUCTION}"
    if steps:
        user += "\n\nSolution so far:\n\n" + delimiter.join(steps)
    return [system, {"role": "user", "content": user}]
