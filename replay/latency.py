"""Latency as a cost: seconds per query, the serial time of a router's walk on stated hardware.

A **latency profile** (``latency.json``, written by `trace profile DIR`, see tracegen.profile) gives, per model
role and per scorer with a model of its own, the wall time of one request at batch size 1 on stated hardware and
engine::

    seconds = overhead + prefill · (new prefill tokens) + decode · (generated tokens)

fitted by least squares on timed requests (the fit's residuals are recorded with it). A profile measured on one
machine applies to a trace grown on another: the trace says *what* a router does, the profile *how long it takes
there*. The profile names the model each entry was measured on; a trace whose role holds another model is refused,
naming the role.

What the ``latency`` cost model counts, per query (every walk adds these up as it adds any cost model's):

- every step the router used, kept or discarded (a rejected draft is time spent), as one request: the
  overhead, its new prefill tokens and its generated tokens. New prefill is the step's ``n_new_prefill_tokens``
  (the prefix this model had not processed on this path before: what a prefix-caching engine prefills), or, when
  the profile's engine has no prefix cache (the hf backend), the whole prompt ``n_prompt_tokens``.
- a model switch therefore pays the prefill of everything the new model has not seen: that is what
  ``n_new_prefill_tokens`` of the first step after a switch already holds (the steps the other model wrote since
  this model's last step on the path, or the whole prompt for a model's first step), so nothing is added twice.
- every scorer call as one request of the scorer's model (its own profile entry, else the profile of the role it
  runs on: SpecReason's judge on the large model, P(True) on the model that wrote the step): the overhead, its
  context (``n_tokens_processed`` less the tokens it generates) as prefill, and its generated tokens
  (trace.json ``scorers.NAME.generated_tokens``).
- a cascade's skipped model (P(IK) said no) pays its prompt's prefill request, as every cost model charges it.

Everything runs one after another: the sum is the **serial** time. No router here overlaps work (SpecReason's
public code can judge a draft while the next one is written; this model does not credit that overlap, so it is an
upper bound for such a deployment). It leaves out: batching and concurrent queries (the profile is batch size 1),
queueing, network time of API roles beyond what their stored timings hold, attention's growth with the cached
context (a decode token costs the same at every depth), prefix-cache evictions, engine warm-up, and the reuse of
a judge's context between its calls (each call prefills its whole context).

An API role (``served_by`` an endpoint) is profiled from the steps' stored ``gen_seconds`` (`trace gen --timings`);
a trace that stores none cannot be given a latency for it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from replay.costs import CostModel, Price
from tracestore.errors import TraceError
from tracestore.schema import Manifest

PROFILE_FILE = "latency.json"
PROFILE_FORMAT = "trace-latency-profile"
PROFILE_VERSION = 1
COEFFICIENTS = ("overhead_s", "prefill_s_per_token", "decode_s_per_token")


@dataclass(frozen=True)
class RequestTime:
    """One profile entry: the time of one request of a model as a linear function of its tokens."""

    model: str  # the model it was measured on (trace.json's name)
    overhead_s: float
    prefill_s_per_token: float
    decode_s_per_token: float

    def seconds(self, prefill_tokens: np.ndarray, decode_tokens: np.ndarray) -> np.ndarray:
        return self.overhead_s + self.prefill_s_per_token * prefill_tokens + self.decode_s_per_token * decode_tokens


@dataclass(frozen=True)
class LatencyProfile:
    """A read, checked profile: its entries by role or scorer name, and where and how it was measured."""

    path: str
    entries: dict[str, RequestTime]
    hardware: str
    engine: str
    prefix_caching: bool
    batch_size: int


def profile_path(root: str | os.PathLike, given: str | os.PathLike | None) -> str | None:
    """The profile a latency replay of the trace at ``root`` uses: ``given``, else ROOT/latency.json where it
    exists (None: no profile)."""
    if given:
        return str(given)
    default = Path(str(root)) / PROFILE_FILE
    return str(default) if default.is_file() else None


def read_profile(path: str | os.PathLike) -> LatencyProfile:
    """The profile at ``path``; TraceError (one line) for a missing file, another format, or a coefficient that is
    negative or not a finite number."""
    where = str(path)
    try:
        document = json.loads(Path(where).read_text())
    except FileNotFoundError:
        raise TraceError(f"latency profile {where} does not exist; measure one with `trace profile DIR`") from None
    except (OSError, ValueError) as error:
        raise TraceError(f"latency profile {where} cannot be read: {error}") from None
    if not isinstance(document, dict) or document.get("format") != PROFILE_FORMAT:
        raise TraceError(f'{where} is not a latency profile (no "format": "{PROFILE_FORMAT}")')
    entries = document.get("entries")
    if not isinstance(entries, dict) or not entries:
        raise TraceError(f"latency profile {where} has no entries")
    parsed = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise TraceError(f"latency profile {where}: entry {name} is not an object")
        for field in COEFFICIENTS:
            value = entry.get(field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise TraceError(
                    f"latency profile {where}: {name}.{field} is {value!r}; it must be a finite number >= 0"
                )
        parsed[name] = RequestTime(str(entry.get("model", "")), *(float(entry[field]) for field in COEFFICIENTS))
    engine = document.get("engine") or {}
    hardware = document.get("hardware") or {}
    return LatencyProfile(
        path=where,
        entries=parsed,
        hardware=str(hardware.get("summary", "unstated hardware")),
        engine=f"{engine.get('name', '?')} {engine.get('version', '')}".strip(),
        prefix_caching=bool(engine.get("prefix_caching", False)),
        batch_size=int(document.get("batch_size", 1)),
    )


def fit_request_time(prefill: np.ndarray, decode: np.ndarray, seconds: np.ndarray) -> dict:
    """Least-squares fit of seconds = overhead + a·prefill + b·decode over timed requests, coefficients kept >= 0
    (non-negative least squares: a time per token is never negative). Requests of the same (prefill, decode) are
    fitted by their median (one slow request on a busy machine does not tilt the line); the residuals stated are
    every request's."""
    from scipy.optimize import nnls

    prefill, decode, seconds = (np.asarray(a, dtype=np.float64) for a in (prefill, decode, seconds))
    points = pl.DataFrame({"prefill": prefill, "decode": decode, "seconds": seconds})
    medians = points.group_by("prefill", "decode").agg(pl.col("seconds").median()).sort("prefill", "decode")

    def design(frame: pl.DataFrame) -> np.ndarray:
        return np.column_stack([np.ones(frame.height), frame["prefill"].to_numpy(), frame["decode"].to_numpy()])

    coefficients, _ = nnls(design(medians), medians["seconds"].to_numpy())
    residuals = seconds - design(points) @ coefficients
    rms = float(np.sqrt(np.mean(residuals**2)))
    return {
        **dict(zip(COEFFICIENTS, (float(c) for c in coefficients))),
        "n_requests": int(len(seconds)),
        "residual_rms_s": rms,
        "residual_max_abs_s": float(np.max(np.abs(residuals))),
        "relative_rms": rms / float(np.mean(seconds)),
    }


def api_roles(manifest: Manifest) -> list[str]:
    """The roles an endpoint serves (their latency can come only from stored timings)."""
    return [role for role, info in manifest.models.items() if info.get("served_by")]


class LatencyCost(CostModel):
    """Seconds per query from a latency profile (see the module docstring for what it counts and leaves out)."""

    name = "latency"
    unit = "seconds"
    convention = "serial seconds per query"  # the instance's names its profile
    a_over_c_unit = "accuracy % per second"
    a_over_c_scale = 100.0
    uses_profile = True

    def __init__(self, manifest: Manifest, prices: Mapping[str, Price] | None = None, profile=None):
        if profile is None:
            raise TraceError(
                "cost model latency needs a latency profile: TRACE_DIR/latency.json (written by `trace profile "
                "TRACE_DIR`) or --latency-profile FILE"
            )
        self.profile = profile if isinstance(profile, LatencyProfile) else read_profile(profile)
        self.manifest = manifest
        self.scorers = manifest.scorers
        for role, info in manifest.models.items():
            entry = self.profile.entries.get(role)
            if entry is not None and entry.model and info.get("name") and entry.model != info["name"]:
                raise TraceError(
                    f"latency profile {self.profile.path} was measured for {role} = {entry.model}, but this trace's "
                    f"{role} is {info['name']}"
                )
        self.convention = (
            f"serial seconds per query (every step used, kept or discarded, and every scorer call, one request "
            f"each: overhead + new prefill + decode), profile {Path(self.profile.path).name}: {self.profile.engine} "
            f"on {self.profile.hardware}, batch size {self.profile.batch_size}"
        )

    def unpriced(self, roles: list[str], router: str) -> str:
        """The error for a walk that used roles the profile lacks."""
        role = roles[0]
        if role in api_roles(self.manifest):
            return (
                f"latency profile {self.profile.path} has no entry for {role} (served by an API), which router "
                f"{router} uses; fit one from the trace's stored gen_seconds with `trace profile` (a trace grown "
                f"without --timings stores none, and then its latency cannot be known)"
            )
        return (
            f"latency profile {self.profile.path} has no entry for {role} ({self.manifest.models[role].get('name')}), "
            f"which router {router} uses; measure it with `trace profile`"
        )

    def step_costs(self, steps: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(decode, request) seconds of each step row: the generated tokens' time, and the request's overhead plus
        its prefill. NaN for the rows of a role the profile lacks (an error once a walk uses one)."""
        prefill_column = "n_new_prefill_tokens" if self.profile.prefix_caching else "n_prompt_tokens"
        decode, request = np.full(steps.height, np.nan), np.full(steps.height, np.nan)
        roles = steps["model"].to_numpy()
        for role in set(roles.tolist()) & set(self.profile.entries):
            rows = roles == role
            entry = self.profile.entries[role]
            generated = steps["n_gen_tokens"].to_numpy()[rows].astype(np.float64)
            prefilled = steps[prefill_column].to_numpy()[rows].astype(np.float64)
            decode[rows] = entry.decode_s_per_token * generated
            request[rows] = entry.overhead_s + entry.prefill_s_per_token * prefilled
        return decode, request

    def scorer_costs(self, scorer: str, n_tokens_processed: np.ndarray, step_roles: np.ndarray) -> np.ndarray:
        """Seconds of each call: one request of the scorer's own profile entry, else of the role it runs on."""
        info = self.scorers.get(scorer, {})
        generated = info.get("generated_tokens")
        if not isinstance(generated, int) or generated < 0:
            raise TraceError(
                f"trace.json scorers.{scorer} has no generated_tokens (tokens a call writes), which the latency cost "
                f"model needs; score the trace again with this version of trace score"
            )
        n = len(n_tokens_processed)
        if scorer in self.profile.entries:
            keys = np.full(n, scorer, dtype=object)
        elif info.get("model") == "self":
            keys = np.asarray(step_roles, dtype=object)
        else:
            keys = np.full(n, info.get("model"), dtype=object)
        lacking = sorted({str(key) for key in keys.tolist()} - set(self.profile.entries))
        if lacking:
            raise TraceError(
                f"latency profile {self.profile.path} has no entry for scorer {scorer} (it runs on {lacking[0]}); "
                f"measure it with `trace profile`"
            )
        context = n_tokens_processed.astype(np.float64) - generated
        seconds = np.empty(n)
        for key in set(keys.tolist()):
            rows = keys == key
            seconds[rows] = self.profile.entries[key].seconds(context[rows], np.full(rows.sum(), float(generated)))
        return seconds
