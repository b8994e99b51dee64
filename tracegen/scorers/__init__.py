"""Scorers: every module in this package defines one, registered in ``SCORERS`` by its ``name``.

Modules import heavy libraries (scikit-learn, torch) inside the functions that use them, so that
listing the registry (the names in `trace --help`) stays fast.
"""

from tracegen.scorers.base import SCORERS, Item, Score, Scorer, make_scorer, preset_choices, world_variants

__all__ = ["SCORERS", "Item", "Score", "Scorer", "make_scorer", "preset_choices", "world_variants"]
