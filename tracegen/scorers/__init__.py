"""Scorer registry: every module in this package defines one scorer, registered by its ``name``."""

import importlib
import pkgutil

from tracegen.scorers.base import SCORERS, Item, Score, Scorer, make_scorer

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["SCORERS", "Item", "Score", "Scorer", "make_scorer"]
