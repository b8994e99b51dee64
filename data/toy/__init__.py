"""The toy world: a seeded arithmetic task, a character tokenizer, three tiny trained Qwen2 models (toy-small,
toy-medium, toy-large) and a tiny process reward model (toy-prm) that scores the small model's steps."""

from pathlib import Path

TOY_DIR = Path(__file__).resolve().parent
MODELS_DIR = TOY_DIR / "models"
MODEL_ALIASES = {
    "toy-small": MODELS_DIR / "toy-small",
    "toy-medium": MODELS_DIR / "toy-medium",
    "toy-large": MODELS_DIR / "toy-large",
    "toy-prm": MODELS_DIR / "toy-prm",
}
LANGUAGE_MODELS = ("toy-small", "toy-medium", "toy-large")
# Trained by these tools (run from the repo root as `python -m scripts.toy.train ...`); data/ never imports them.
TRAINING_SCRIPTS = {
    "toy-small": "scripts/toy/train.py",
    "toy-medium": "scripts/toy/train.py",
    "toy-large": "scripts/toy/train.py",
    "toy-prm": "scripts/toy/train_prm.py",
}
