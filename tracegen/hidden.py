"""Prompt hidden states (for P(IK) probes): one transformers forward per problem and model.

Layers index transformers' ``hidden_states`` tuple: 0 is the embedding output, ``i`` the output
of decoder block ``i``, and ``-1`` (= the number of blocks) the last block's output after the
final norm, as Qwen2 and Llama implementations return it. Only that last entry is normed; the
manifest records this. Vectors are the hidden state at the prompt's last token, as float16.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tracestore.errors import TraceError

WHERE = "prompt_last"
BATCH_SIZE = 16


def parse_layers(text: str) -> tuple[int, ...]:
    """``"-1,12"`` -> ``(-1, 12)``; an empty string means no hidden states."""
    if not text.strip():
        return ()
    try:
        layers = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise TraceError(f"--hidden-layers must be comma-separated integers such as -1,12, got {text!r}") from None
    if len(set(layers)) != len(layers):
        raise TraceError(f"--hidden-layers repeats a layer: {text!r}")
    return layers


@dataclass
class HiddenPlan:
    """The prompt hidden-state layers gen stores for each model with a checkpoint, why, and what routers will
    miss."""

    layers: dict[str, tuple[int, ...]]
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def plan_hidden(
    explicit: Sequence[int], routers: Sequence, roles: Sequence[str], n_blocks: dict[str, int]
) -> HiddenPlan:
    """``--hidden-layers`` for every model in ``n_blocks`` (those with a checkpoint), plus what each router
    configuration of ``routers`` (RouterSpecs) reads (``Router.hidden_layers``: the cascade's P(IK) probes read
    the paper's layer 24, or the last of a shallower model). TraceError for a layer a model does not have."""
    layers = {role: list(explicit) for role in n_blocks}
    reasons = [f"every model: layer(s) {', '.join(map(str, explicit))} (--hidden-layers)"] if explicit else []
    warnings = []
    for spec in routers:
        router = spec.router()
        for role, wanted in router.hidden_layers(list(roles), n_blocks).items():
            if role not in n_blocks:
                warnings.append(
                    f"router {spec.name} reads the prompt hidden states of model {role}, which an API endpoint serves "
                    "(no hidden states): replay it without them (cascade: pik=false)"
                )
                continue
            for layer, why in wanted.items():
                if layer not in layers[role]:
                    layers[role].append(layer)
                    reasons.append(f"{role}: layer {layer}, {why} (router {spec.name} in --routers)")
        if getattr(router, "where", WHERE) != WHERE:
            warnings.append(f"router {spec.name} reads hidden states at where={router.where}; gen stores {WHERE} only")
    for role, role_layers in layers.items():
        for layer in role_layers:
            if not -1 <= layer <= n_blocks[role]:
                raise TraceError(
                    f"hidden layer {layer} is out of range for the {role} model: it has {n_blocks[role]} blocks "
                    f"(use 0..{n_blocks[role]}, or -1 for the last)"
                )
    return HiddenPlan({role: tuple(values) for role, values in layers.items()}, reasons, warnings)


def manifest_entry(layers: dict[str, Sequence[int]], n_blocks: dict[str, int]) -> dict:
    """trace.json ``hidden``: the layers stored (``layers``: of any model; ``by_model``: each model's)."""
    union = list(dict.fromkeys(layer for role_layers in layers.values() for layer in role_layers))
    return {
        "where": WHERE,
        "layers": union,
        "by_model": {role: list(role_layers) for role, role_layers in layers.items()},
        "indexing": "transformers hidden_states: 0 = embeddings, i = after block i, -1 = last block",
        "normed": {
            role: {str(layer): _is_normed(layer, n_blocks.get(role)) for layer in role_layers}
            for role, role_layers in layers.items()
        },
        "dtype": "float16",
    }


def _is_normed(layer: int, n_blocks: int | None) -> bool:
    return layer in (-1, n_blocks)


def prompt_hidden_rows(
    model_path: str,
    role: str,
    prompts: dict[str, list[int]],
    layers: Sequence[int],
    on_batch: Callable[[int], None] | None = None,
) -> list[dict]:
    """Hidden-table rows for every (problem, layer): the state at each prompt's last token."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto").to(device).eval()
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    rows = []
    problem_ids = sorted(prompts)
    with torch.inference_mode():
        for start in range(0, len(problem_ids), BATCH_SIZE):
            batch = problem_ids[start : start + BATCH_SIZE]
            lengths = [len(prompts[pid]) for pid in batch]
            width = max(lengths)
            ids = torch.tensor([prompts[pid] + [pad_id] * (width - len(prompts[pid])) for pid in batch], device=device)
            mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths], device=device)
            states = model(
                input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1
            ).hidden_states
            last = torch.tensor(lengths, device=device) - 1
            for layer in layers:
                vectors = states[layer][torch.arange(len(batch), device=device), last].to(torch.float16).cpu()
                for pid, vector in zip(batch, vectors.numpy()):
                    rows.append({"problem_id": pid, "model": role, "layer": layer, "where": WHERE, "vector": vector})
            del states
            if on_batch:
                on_batch(len(batch))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # before the vLLM engines measure free GPU memory
    return rows
