"""Model names: aliases, local checkpoint folders and Hugging Face ids, and what the manifest records of them.

Nothing here downloads by itself: a Hugging Face id resolves to its local cache snapshot when
there is one, and is otherwise handed to the engine as it is (which then needs the hub).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from data.toy import MODEL_ALIASES as TOY_MODEL_ALIASES
from data.toy import TRAINING_SCRIPTS as TOY_TRAINING_SCRIPTS
from tracestore.errors import TraceError
from tracestore.schema import Manifest

MODEL_ALIASES: dict[str, str] = {
    "qwen2.5-math-1.5b": "Qwen/Qwen2.5-Math-1.5B-Instruct",
    "qwen2.5-math-7b": "Qwen/Qwen2.5-Math-7B-Instruct",
    "skywork-prm-1.5b": "Skywork/Skywork-o1-Open-PRM-Qwen-2.5-1.5B",
    **{alias: str(path) for alias, path in TOY_MODEL_ALIASES.items()},
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
FULL_HASH_LIMIT = 1 << 30  # weights up to 1 GiB are hashed in full; larger ones by their safetensors headers
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SAFETENSORS_ITEM_BYTES = 8
# Names (a component of a tensor's key) of the vocabulary and position embeddings and the projection onto the
# vocabulary across Hugging Face architectures: Qwen2/Llama embed_tokens and lm_head, GPT-2 wte and wpe, ...
EMBEDDING_TENSORS = frozenset(
    {
        "embed_tokens",
        "lm_head",
        "wte",
        "wpe",
        "embed_positions",
        "word_embeddings",
        "position_embeddings",
        "embed_in",
        "embed_out",
    }
)


@dataclass(frozen=True)
class ModelRef:
    role: str  # "small" or "large"
    name: str  # as the user wrote it
    path: str  # a local folder, or a Hugging Face id for the engine to fetch

    @property
    def is_local(self) -> bool:
        return Path(self.path).is_dir()


def resolve_model(name: str, role: str) -> ModelRef:
    """Map an alias, a local folder or a Hugging Face id to what the engine loads."""
    target = MODEL_ALIASES.get(name, name)
    if Path(target).is_dir():
        if not (Path(target) / "config.json").is_file():
            raise TraceError(f"model folder {target} has no config.json")
        return ModelRef(role, name, str(Path(target).resolve()))
    if name in TOY_MODEL_ALIASES:
        raise TraceError(
            f"the toy model {name} is not trained yet: {target} does not exist (see {TOY_TRAINING_SCRIPTS[name]})"
        )
    if _HF_ID.match(target):
        return ModelRef(role, name, _cached_snapshot(target) or target)
    raise TraceError(
        f"unknown model {name!r}: not a local folder, not a Hugging Face id, not an alias "
        f"(aliases: {', '.join(MODEL_ALIASES)})"
    )


def _cached_snapshot(repo_id: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached (or no huggingface_hub): the engine resolves the id itself
        return None


def fetch_model(model: ModelRef) -> ModelRef:
    """A model that is not in the local cache, fetched from the hub as the engine itself would."""
    if model.is_local:
        return model
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(model.path)
    except Exception as error:
        raise TraceError(
            f"model {model.name} ({model.path}) is not in the local Hugging Face cache and could not be "
            f"fetched from the hub ({type(error).__name__}); aliases: {', '.join(MODEL_ALIASES)}"
        ) from None
    return ModelRef(model.role, model.name, folder)


def model_manifest(model: ModelRef, tokenizer) -> dict:
    """What identifies a model's outputs: the cache-key entry for it in trace.json."""
    folder = Path(model.path)
    return {
        "role": model.role,
        "name": canonical_name(model),
        "revision": revision(folder),
        **parameter_counts(folder),
        **model_shape(folder),
        "tokenizer_hash": _hash_files(folder, TOKENIZER_FILES),
        "chat_template_hash": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest(),
    }


def trace_model(manifest: Manifest, role: str) -> ModelRef:
    """The checkpoint of one of a trace's model roles: where gen loaded it, else by its recorded name."""
    entry = manifest.model(role)
    path = manifest.model_path(role)
    if path and Path(path).is_dir():
        return ModelRef(role, entry["name"], path)
    return fetch_model(resolve_model(entry["name"], role))


def named_model(name: str, role: str) -> ModelRef:
    """A model given by alias, folder or Hugging Face id, fetched if need be."""
    return fetch_model(resolve_model(name, role))


def model_entry(model: ModelRef) -> dict:
    """Manifest fields of a scorer's own model: its name, revision and size (for cost models)."""
    folder = Path(model.path)
    return {
        "name": canonical_name(model),
        "revision": revision(folder),
        **parameter_counts(folder),
        **model_shape(folder),
    }


def model_shape(folder: Path) -> dict:
    """n_layer and d_model (the residual stream's width) from config.json, for the Kaplan cost model; the
    fields a config does not name are left out (that cost model then says which is missing)."""
    config = json.loads((folder / "config.json").read_text())
    config = config.get("text_config", config)  # multimodal configs nest the language model's
    shape = {}
    for field, names in (
        ("n_layer", ("num_hidden_layers", "n_layer", "num_layers")),
        ("d_model", ("hidden_size", "n_embd", "d_model")),
    ):
        value = next((config[name] for name in names if isinstance(config.get(name), int)), None)
        if value is not None:
            shape[field] = value
    return shape


def canonical_name(model: ModelRef) -> str:
    """The same name however the model was given: the Hugging Face id of a hub model (alias, id or
    cache snapshot folder alike), else the checkpoint folder's name (``toy-small``)."""
    target = MODEL_ALIASES.get(model.name, model.name)
    if _HF_ID.match(target) and not Path(target).exists():
        return target
    folder = Path(model.path)
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.removeprefix("models--").replace("--", "/")
    return folder.name


def revision(folder: Path) -> str:
    """The Hugging Face commit of a cache snapshot, else a content hash of config and weights."""
    if folder.parent.name == "snapshots":
        return folder.name
    weights = _weight_files(folder)
    total = sum(f.stat().st_size for f in weights)
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in weights:
        digest.update(path.name.encode())
        if total <= FULL_HASH_LIMIT:
            digest.update(path.read_bytes())
        else:
            digest.update(str(path.stat().st_size).encode() + _safetensors_header_bytes(path))
    kind = "sha256" if total <= FULL_HASH_LIMIT else "headers-sha256"
    return f"{kind}:{digest.hexdigest()}"


def parameter_counts(folder: Path) -> dict[str, int]:
    """``n_params``: the stored parameters, summed over the safetensors headers (tied weights counted once), what
    the seeds' 2N per token counts; ``n_params_non_embedding``: the same without the vocabulary and position
    embeddings and the output projection onto the vocabulary, Kaplan et al.'s N (the kaplan cost model's)."""
    files = [f for f in _weight_files(folder) if f.suffix == ".safetensors"]
    if not files:
        raise TraceError(f"{folder}: no .safetensors weights, so the parameter count is unknown")
    total = embedding = 0
    for path in files:
        header = json.loads(_safetensors_header_bytes(path))
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            size = math.prod(entry["shape"])
            total += size
            embedding += size if EMBEDDING_TENSORS & set(key.split(".")) else 0
    if total <= 0:
        raise TraceError(f"{folder}: the safetensors files hold no parameters")
    return {"n_params": total, "n_params_non_embedding": total - embedding}


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise TraceError(f"model folder {folder} holds no weights (*.safetensors or *.bin)")
    return files


def _safetensors_header_bytes(path: Path) -> bytes:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(_SAFETENSORS_ITEM_BYTES))
        return handle.read(length)


def _hash_files(folder: Path, names: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    present = [name for name in names if (folder / name).is_file()]
    if not present:
        raise TraceError(f"model folder {folder} has no tokenizer files ({', '.join(names)})")
    for name in present:
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return digest.hexdigest()


def load_tokenizer(model: ModelRef):
    try:
        return _tokenizer(str(model.path))
    except (OSError, ValueError) as error:
        raise TraceError(f"cannot load the tokenizer of model {model.name} from {model.path}: {error}") from None


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str):
    """One load per folder and process: a run that scores between its closure rounds asks for it each round, and
    a large vocabulary (Qwen2.5's 151,665 tokens) takes seconds to load. Callers only read it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
