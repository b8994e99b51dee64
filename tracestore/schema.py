"""The trace format, which both phases stand on: table names and Arrow schemas, model roles and the
characters they add to node paths, finish reasons, the schema version, and the manifest (trace.json).

`tracegen` writes what this module describes; `replay` and `analysis` read it, the manifest through the
typed accessors of `Manifest` rather than by string keys. A new model role or manifest field that readers
need is added here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from tracestore.errors import TraceError

# Version 2 is a trace of K > 2 models (roles m0..m{K-1}); a small/large trace is still written as
# version 1, so readers from before K-model traces keep reading every two-model trace and refuse a
# K-model one by its version instead of failing on its roles.
SCHEMA_VERSION: int = 2
READ_SCHEMA_VERSIONS: tuple[int, ...] = (1, 2)
MANIFEST_FILE = "trace.json"
TABLES = ("problems", "steps", "tokens", "hidden", "scores", "grades")

# Manifest fields that change what a step or score would contain. Reopening a trace
# with a manifest that differs in one of these is refused (see TraceWriter).
CACHE_KEY_FIELDS: tuple[str, ...] = (
    "schema_version",
    "models",
    "dataset",
    "prompt_template",
    "sampling",
    "delimiter",
    "grader",
    "engine",
    "seeds",
)

FINISH_REASONS = ("delimiter", "eos", "length")
SMALL, LARGE = "small", "large"
TWO_MODEL_ROLES = (SMALL, LARGE)  # the roles of a small/large trace, smallest first
ROLE_CHARS = {SMALL: "s", LARGE: "L"}  # roles m0..m9 of K-model traces use their index digit
MAX_MODELS = 10  # one path character per role: s/L, or the digits of m0..m9


def model_roles(n_models: int) -> tuple[str, ...]:
    """The roles of a trace of ``n_models`` models, smallest first: small/large for two, else m0..m{K-1}."""
    if n_models == 2:
        return TWO_MODEL_ROLES
    if not 2 <= n_models <= MAX_MODELS:
        raise TraceError(f"a trace holds 2 to {MAX_MODELS} models, not {n_models}")
    return tuple(f"m{index}" for index in range(n_models))


def schema_version_for(roles) -> int:
    """The schema version a trace with these model roles is written as (see SCHEMA_VERSION)."""
    return 1 if tuple(roles) == TWO_MODEL_ROLES else SCHEMA_VERSION


def role_of_char(char: str) -> str:
    """The role whose steps add ``char`` to a path (the inverse of ``model_char``)."""
    for role, role_char in ROLE_CHARS.items():
        if char == role_char:
            return role
    if len(char) == 1 and char.isdigit():
        return f"m{char}"
    raise TraceError(f"{char!r} is not a model's path character (s, L or a digit)")


def _field(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


SCHEMAS: dict[str, pa.Schema] = {
    "problems": pa.schema(
        [
            _field("problem_id", pa.string()),
            _field("dataset", pa.string()),
            _field("split", pa.string()),
            _field("question", pa.string()),
            _field("reference", pa.string()),
            _field("meta", pa.string(), nullable=True),  # JSON object as a string
        ]
    ),
    "steps": pa.schema(
        [
            _field("step_id", pa.string()),
            _field("problem_id", pa.string()),
            _field("world", pa.int32()),
            _field("parent_path", pa.string()),
            _field("path", pa.string()),
            _field("depth", pa.int32()),
            _field("model", pa.string()),
            _field("text", pa.string()),
            _field("n_prompt_tokens", pa.int32()),
            _field("n_new_prefill_tokens", pa.int32()),
            _field("n_cached_tokens", pa.int32()),
            _field("n_gen_tokens", pa.int32()),
            _field("finish_reason", pa.string()),
            _field("is_final", pa.bool_()),
            _field("answer", pa.string(), nullable=True),
            _field("correct", pa.bool_(), nullable=True),
            _field("conf_max_logit_mean", pa.float32(), nullable=True),  # null for API-served steps (no logits)
            _field("conf_max_logit_math", pa.float32(), nullable=True),
            _field("conf_top1_prob_min_math", pa.float32(), nullable=True),
            _field("logprob_mean", pa.float32()),
            _field("logprob_min", pa.float32()),
            _field("first_token_logprob", pa.float32()),
            _field("gen_seconds", pa.float32(), nullable=True),
        ]
    ),
    "tokens": pa.schema(
        [
            _field("step_id", pa.string()),
            _field("token_ids", pa.list_(pa.int32())),
            _field("logprobs", pa.list_(pa.float32())),
            _field("max_logits", pa.list_(pa.float32()), nullable=True),  # null for API-served steps
            _field("topk_ids", pa.list_(pa.list_(pa.int32()))),
            _field("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
            _field("is_math", pa.list_(pa.bool_())),
        ]
    ),
    # DESIGN.md says fixed_size_list<float16>; models of different widths share this
    # column, so it is a variable list (every row of one model has the same length).
    "hidden": pa.schema(
        [
            _field("problem_id", pa.string()),
            _field("model", pa.string()),
            _field("layer", pa.int16()),  # -1 = last layer
            _field("where", pa.string()),  # "prompt_last"
            _field("vector", pa.list_(pa.float16())),
        ]
    ),
    "scores": pa.schema(
        [
            _field("step_id", pa.string()),
            _field("scorer", pa.string()),
            _field("value", pa.float32()),
            _field("detail", pa.list_(pa.float32()), nullable=True),
            _field("n_tokens_processed", pa.int32()),
        ]
    ),
    # Named grade sets written by `trace regrade`: each final step's answer graded again, offline. The steps
    # table's own answer/correct are the default grade set (DEFAULT_GRADES), graded by trace.json's grader.
    "grades": pa.schema(
        [
            _field("step_id", pa.string()),
            _field("grade_set", pa.string()),
            _field("answer", pa.string(), nullable=True),
            _field("correct", pa.bool_()),
        ]
    ),
}

DEFAULT_GRADES = "default"  # the grade set stored in the steps table itself

TOKEN_ARRAY_COLUMNS = ("token_ids", "logprobs", "max_logits", "topk_ids", "topk_logprobs", "is_math")
# Columns that identify a row: appending a row whose key is already stored is a no-op.
ROW_KEYS: dict[str, tuple[str, ...]] = {
    "problems": ("problem_id",),
    "steps": ("step_id",),
    "tokens": ("step_id",),
    "hidden": ("problem_id", "model", "layer", "where"),
    "scores": ("step_id", "scorer"),
    "grades": ("step_id", "grade_set"),
}
# Row groups of a few MB so that readers can stream (token rows are ~100x wider than step rows).
ROW_GROUP_ROWS = {
    "problems": 65_536,
    "steps": 65_536,
    "tokens": 2_048,
    "hidden": 4_096,
    "scores": 65_536,
    "grades": 65_536,
}


def model_char(role: str) -> str:
    """The character a step by `role` adds to a node path: small -> "s", large -> "L", m3 -> "3"."""
    if role in ROLE_CHARS:
        return ROLE_CHARS[role]
    match = re.fullmatch(r"m(\d)", role)
    if match is None:
        raise TraceError(f"unknown model role {role!r}: expected small, large or m0..m9")
    return match.group(1)


def make_step_id(problem_id: str, world: int, path: str) -> str:
    return f"{problem_id}/{world}/{path}"


# A part is named by its writer, the writer's sequence number and a digest of the bytes of the
# append it belongs to (a steps part and its tokens part share one name): two writers can only
# give one name to identical bytes, so a part is never replaced by different rows. Parts written
# before digests were added have no digest; they read the same.
PART_NAME = re.compile(r"part-(?P<writer>[A-Za-z0-9_]+)-(?P<seq>\d+)(?:-(?P<digest>[0-9a-f]+))?\.parquet")
PART_DIGEST_CHARS = 16

# Every writer records the parts it committed, so that a part lost later is named rather than read
# as missing rows (traces written before records exist have none and are read as they are).
PARTS_DIR = "_parts"

# Responses of API-served roles, one JSON file each, stored on arrival so that no request is paid for twice
# (tracegen.backends.openai_endpoint).
API_RESPONSES_DIR = "_api"
UNKNOWN_TOKEN_ID = -1  # tokens.token_ids of a token that an API named by its text only (closed chat models)

# The writer lock (tracestore.lock): LOCK_FILE is flocked by every writer; each writer also holds a file
# named by its writer id that says who it is.
LOCK_FILE = ".lock"

# Where `trace validate --repair` moves files of the table folders that no reader can read and no writer
# recorded (a plugin's stray write, a nested trace), by table: moved aside, never deleted.
QUARANTINE_DIR = "_quarantine"


def part_name(writer_id: str, seq: int, digest: str) -> str:
    return f"part-{writer_id}-{seq:05d}-{digest[:PART_DIGEST_CHARS]}.parquet"


def parts_record_file(writer_id: str) -> str:
    """Path, relative to the trace root, of the record of the parts ``writer_id`` committed."""
    return f"{PARTS_DIR}/{writer_id}.json"


def writer_lock_file(writer_id: str) -> str:
    return f"{LOCK_FILE}-{writer_id}"


def is_own_entry(name: str) -> bool:
    """Whether an entry of a trace root (a name, no slash) is the trace's own: a table folder or file, or
    bookkeeping."""
    return name in TABLES or name in {f"{table}.parquet" for table in TABLES} or is_trace_metadata(name)


def is_trace_metadata(relative: str) -> bool:
    """Whether a path relative to a trace root is the trace's own bookkeeping (manifest, parts records,
    locks, writers' temp files) rather than a table part or a file someone else put there."""
    first = relative.split("/", 1)[0]
    return first in (MANIFEST_FILE, PARTS_DIR, API_RESPONSES_DIR) or first.startswith((LOCK_FILE, f".{MANIFEST_FILE}"))


# ---------------------------------------------------------------- manifest


class Manifest(Mapping):
    """trace.json, read: the raw JSON object (a read-only mapping, for comparison and display) plus typed
    accessors for every field the code reads. A field that is malformed is a TraceError naming it.

    ``models`` is a list of objects with a ``role`` (smallest model first; a dict keyed by role is read
    too), ``model_paths`` maps a role to the folder gen loaded it from, ``scorers`` maps a scorer name to
    its description (``model``: a role, "self", "exact" or "judge"/"prm"/...; ``n_params`` if its own).
    """

    def __init__(self, data: Mapping[str, Any]):
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Manifest({self._data!r})"

    def to_dict(self) -> dict:
        """A deep copy of the JSON object."""
        return json_normal(self._data)

    @property
    def models(self) -> dict[str, dict]:
        """Each model's entry (name, revision, n_params, ...) keyed by role, smallest first."""
        models = self._data.get("models")
        if isinstance(models, dict) and all(isinstance(info, dict) for info in models.values()):
            return {role: {"role": role, **info} for role, info in models.items()}
        if isinstance(models, list) and all(isinstance(model, dict) and "role" in model for model in models):
            return {model["role"]: model for model in models}
        raise TraceError(f"{MANIFEST_FILE}: 'models' must be a list of objects with a 'role', not {models!r}")

    @property
    def roles(self) -> list[str]:
        """Model roles, smallest model first."""
        return list(self.models)

    def model(self, role: str) -> dict:
        """The entry of the model in ``role``; TraceError if the trace has none."""
        models = self.models
        if role not in models:
            raise TraceError(f"the trace has no {role} model (its models: {', '.join(models)})")
        return models[role]

    def model_path(self, role: str) -> str | None:
        """The folder gen loaded the ``role`` model from, if recorded."""
        return (self._data.get("model_paths") or {}).get(role)

    @property
    def n_params(self) -> dict[str, float]:
        """Parameter counts of the models that record one, by role."""
        return {role: float(model["n_params"]) for role, model in self.models.items() if model.get("n_params")}

    @property
    def scorers(self) -> dict[str, dict]:
        """Each scorer's description, by scorer name."""
        return {name: info for name, info in (self._data.get("scorers") or {}).items() if isinstance(info, dict)}

    @property
    def dataset(self) -> dict:
        dataset = self._data.get("dataset")
        return dataset if isinstance(dataset, dict) else {}

    @property
    def dataset_name(self) -> str | None:
        return self.dataset.get("name")

    @property
    def worlds(self) -> int | None:
        """Worlds per problem that gen grew (None if not recorded)."""
        worlds = self._data.get("worlds")
        return worlds if isinstance(worlds, int) else None

    @property
    def n_problems(self) -> int | None:
        return self._data.get("n_problems")

    @property
    def hidden_layers(self) -> list[int]:
        """Layers whose prompt hidden states the trace stores."""
        return list((self._data.get("hidden") or {}).get("layers", []))

    @property
    def hidden_layers_by_model(self) -> dict[str, list[int]]:
        """Layers whose prompt hidden states the trace stores, by model role (a trace from before per-model layers
        lists one set for every model)."""
        hidden = self._data.get("hidden") or {}
        if isinstance(hidden.get("by_model"), dict):
            return {role: list(layers) for role, layers in hidden["by_model"].items()}
        return {role: list(hidden.get("layers", [])) for role in self.roles} if hidden else {}

    @property
    def grade_sets(self) -> dict[str, dict]:
        """Each named grade set of `trace regrade` (grader name and version, when made), by name."""
        sets = self._data.get("grade_sets") or {}
        return {name: info for name, info in sets.items() if isinstance(info, dict)}

    @property
    def audits(self) -> list[dict]:
        """The summaries of every `trace audit` of this trace, oldest first (an append-only history)."""
        return [entry for entry in self._data.get("audits") or [] if isinstance(entry, dict)]

    @property
    def expansions(self) -> list[dict]:
        """Every expansion gen ran on this trace (strategy, max_steps, routers of a closure)."""
        return list(self._data.get("expansions", []))


def read_manifest(root: Path) -> Manifest:
    """The manifest of the trace at `root`, checked for a known schema_version."""
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise TraceError(f"{root} is not a trace: it has no {MANIFEST_FILE}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TraceError(f"{path} is not valid JSON ({error})") from None
    return checked_manifest(manifest, str(path))


def checked_manifest(manifest: Any, where: str) -> Manifest:
    """``manifest`` (read from ``where``) as a Manifest, if it is an object of a schema version this reads."""
    if not isinstance(manifest, dict):
        raise TraceError(f"{where} must hold a JSON object, not {type(manifest).__name__}")
    version = manifest.get("schema_version")
    if version not in READ_SCHEMA_VERSIONS:
        readable = " and ".join(map(str, READ_SCHEMA_VERSIONS))
        raise TraceError(
            f"{where} has schema_version {version!r}; this version of trace reads schema_version {readable}"
        )
    return Manifest(manifest)


def manifest_json(manifest: Mapping[str, Any]) -> str:
    """The text of trace.json for ``manifest`` (sorted keys, so the same fields give the same bytes)."""
    return json.dumps(dict(manifest), indent=2, sort_keys=True) + "\n"


def json_normal(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value))


def first_difference(stored: Any, new: Any, where: str = "") -> str | None:
    """Dotted name of the first field where two manifest values differ, e.g. `sampling.temperature`,
    `models.large.revision` (list items of dicts with a role are named by role); None if they are equal.
    A ``name`` both sides have is compared before its siblings: another model or engine is named as
    such, not by the first of its properties that differs."""
    if isinstance(stored, dict) and isinstance(new, dict):
        named = "name" in stored and "name" in new
        for key in sorted(set(stored) | set(new), key=lambda key: (not (named and key == "name"), key)):
            name = f"{where}.{key}" if where else key
            if key not in stored or key not in new:
                return name
            found = first_difference(stored[key], new[key], name)
            if found:
                return found
        return None
    if isinstance(stored, list) and isinstance(new, list):
        if len(stored) != len(new):
            return where
        for index, (a, b) in enumerate(zip(stored, new)):
            label = _role(a) or index
            found = first_difference(a, b, f"{where}.{label}")
            if found:
                return found
        return None
    same_kind = isinstance(stored, bool) == isinstance(new, bool)  # True == 1 in Python, not in a manifest
    return None if stored == new and same_kind else where


def lookup_field(value: Any, dotted: str) -> Any:
    """The value `first_difference` named, for the error message (None where absent)."""
    for part in dotted.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list):
            matches = [item for index, item in enumerate(value) if part in (str(index), _role(item))]
            value = matches[0] if matches else None
        else:
            return None
    return value


def _role(item: Any) -> str | None:
    return item.get("role") if isinstance(item, dict) else None
