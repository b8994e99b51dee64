"""Router registry: every module in this package defines one router, registered by its ``name``.

Modules import heavy libraries (scikit-learn, torch) inside the functions that use them, so that
listing the registry (the names in `trace --help`) stays fast.
"""

import importlib
import pkgutil

from replay.routers.base import ROUTERS, Router, make_router

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ROUTERS", "Router", "make_router"]
