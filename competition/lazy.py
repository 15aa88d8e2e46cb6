"""A package face that imports its submodules on first use (PEP 562).

    __getattr__, __all__ = lazy_exports(__name__, {"Name": "submodule", ...})

so that ``python -m package.module`` runs its module once, and importing the package stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """Returns ``(__getattr__, __all__)`` for ``package``: each name of ``exports`` (name -> submodule)
    is imported from its submodule when first asked for."""
    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(f".{exports[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__, sorted(exports)
