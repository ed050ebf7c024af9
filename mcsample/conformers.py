"""Moved to :mod:`mcsample.systems.conformers` (a chemistry application, not engine code).

This module forwards attribute access there lazily, so that ``import mcsample`` does not
import RDKit: ``from mcsample.conformers import sample_conformers`` keeps working.
"""

from __future__ import annotations

_TARGET = "mcsample.systems.conformers"


def __getattr__(name: str):
    if name.startswith("__") and name != "__all__":  # introspection (``__path__``...) stays here
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_TARGET), name)


def __dir__():
    import importlib

    return sorted(dir(importlib.import_module(_TARGET)))
