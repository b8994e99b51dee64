"""Which signals a trace's API-served roles lack: endpoints give top-k log-probabilities, never raw logits or
hidden states, so a router that reads one of those from such a role refuses, naming the role and the signal."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tracestore.errors import TraceError

RAW_LOGIT_SIGNALS = ("conf_max_logit_math", "conf_max_logit_mean")
S_API = "conf_top1_prob_min_math"


def api_served(manifest: Mapping, role: str) -> dict | None:
    """The engine entry of ``role`` if an OpenAI-compatible endpoint served it, else None."""
    engine = manifest.get("engine") or {}
    entry = engine if "name" in engine else engine.get(role)
    return entry if isinstance(entry, dict) and entry.get("name") == "openai" else None


def require_signals(manifest: Mapping, role: str, signals: Iterable[str], router: str, instead: str) -> None:
    """TraceError if ``role`` is API-served and one of ``signals`` needs raw logits or hidden states."""
    entry = api_served(manifest, role)
    if entry is None:
        return
    for signal in signals:
        if signal in RAW_LOGIT_SIGNALS or signal == "hidden":
            what = "hidden states" if signal == "hidden" else f"{signal} (raw logits)"
            raise TraceError(
                f"router {router} needs {what} of the {role} model's steps, but the {role} role is served by an API "
                f"({entry.get('mode', '?')} mode), which gives top-k log-probabilities only; {instead}"
            )
