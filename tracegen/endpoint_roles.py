"""What `trace gen` needs to know about model roles served by an OpenAI-compatible endpoint (``--api``).

A role in ``completions`` mode continues exact token ids, so it is also a local model folder (its tokenizer
and identity go into trace.json; the server runs the same checkpoint). A role in ``chat`` mode is known
only by its served name: it reads and writes text, and the trace's tokenizer (that of a local role) turns
its steps into the ids other models continue.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from tracegen.backends.endpoint_spec import ApiSpec, ClientOptions
from tracegen.backends.openai_endpoint import continuation_ids, open_api_backend
from tracestore.errors import TraceError


def api_specs(specs: Sequence[ApiSpec], roles: Sequence[str]) -> dict[str, ApiSpec]:
    """``--api`` specs by role; a role given twice or not in the trace is an error."""
    by_role: dict[str, ApiSpec] = {}
    for spec in specs:
        if spec.role not in roles:
            raise TraceError(f"--api {spec.role}: not a model role of this run ({', '.join(roles)})")
        if spec.role in by_role:
            raise TraceError(f"--api {spec.role} is given twice")
        by_role[spec.role] = spec
    if by_role and all(by_role.get(role) and by_role[role].mode == "chat" for role in roles):
        raise TraceError("at least one model role must be a local model (or an --api role in completions mode)")
    return by_role


def is_text_only(spec: ApiSpec | None) -> bool:
    """A chat-mode role: no local checkpoint, text in and out."""
    return spec is not None and spec.mode == "chat"


def text_only_model_entry(role: str, spec: ApiSpec, name: str) -> dict:
    """The trace.json models entry of a chat-mode role: its served name (no size: FLOPs cost models refuse it)."""
    return {"role": role, "name": spec.model or name, "served_by": "openai", "mode": "chat"}


def open_backend(spec: ApiSpec, out: Path, name: str, client: ClientOptions | None, tokenizer, report) -> object:
    return open_api_backend(
        spec,
        out,
        model_name=name,
        client=client,
        tokenizer=tokenizer,
        report=report,
    )


def continuations(specs: dict[str, ApiSpec], tokenizers: dict, delimiter: str) -> dict[str, Callable]:
    """Per chat-mode role, how a stored step (text, finish_reason) becomes the ids its children continue."""
    return {
        role: (lambda text, finish, tokenizer=tokenizers[role]: continuation_ids(tokenizer, text, finish, delimiter))
        for role, spec in specs.items()
        if is_text_only(spec)
    }


def endpoints_entry(specs: dict[str, ApiSpec]) -> dict:
    """Where each API role was served from (recorded, not part of the cache key; the key is never recorded)."""
    return {role: {"url": spec.url, "key_env": spec.key_env} for role, spec in specs.items()}
