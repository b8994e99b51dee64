"""The toy world: a seeded arithmetic task, a character tokenizer and two tiny trained Qwen2 models."""

from pathlib import Path

TOY_DIR = Path(__file__).resolve().parent
MODELS_DIR = TOY_DIR / "models"
MODEL_ALIASES = {"toy-small": MODELS_DIR / "toy-small", "toy-large": MODELS_DIR / "toy-large"}
