"""Scorer registry: every module in this package defines one scorer, registered by its ``name``.

Modules import heavy libraries (scikit-learn, torch) inside the functions that use them, so that
listing the registry (the names in `trace --help`) stays fast.
"""

import importlib
import pkgutil

from tracegen.scorers.base import SCORERS, WORLD_SCORERS, Item, Score, Scorer, make_scorer

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["SCORERS", "WORLD_SCORERS", "Item", "Score", "Scorer", "make_scorer"]
