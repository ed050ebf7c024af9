"""Optional dependencies: one clear ImportError naming the extra that provides them.

The engine needs only torch, numpy, scipy and tqdm. Chemistry, flows and plots come with extras
of the ``mcsample-torch`` distribution; a module that needs one calls :func:`require` at its
top, before its own (often lazy) imports::

    from mcsample._optional import require

    require("openmm", "mdtraj", extra="peptides")

:func:`require` only *locates* the packages (``importlib.util.find_spec``), it does not import
them, so a module keeps importing fast when they are installed and its heavy imports stay lazy.
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["DISTRIBUTION", "missing", "require"]

#: the name on PyPI (the import name is ``mcsample``)
DISTRIBUTION = "mcsample-torch"

_PRETTY = {
    "openmm": "OpenMM",
    "openmmtools": "openmmtools",
    "mdtraj": "MDTraj",
    "rdkit": "RDKit",
    "zuko": "zuko",
    "numba": "numba",
    "ot": "POT",
    "matplotlib": "matplotlib",
    "pyro": "Pyro",
}


def missing(*modules: str) -> list[str]:
    """The top-level import names among ``modules`` that cannot be imported here."""
    out = []
    for name in modules:
        if name in sys.modules:
            if sys.modules[name] is None:  # the standard way to block an import
                out.append(name)
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            out.append(name)
    return out


def require(*modules: str, extra: str, by: str | None = None) -> None:
    """Raise ``ImportError`` unless every top-level package in ``modules`` is installed.

    The message names the caller (``by``, default the calling module) and the extra, e.g.
    ``mcsample.systems.peptides needs OpenMM: pip install 'mcsample-torch[peptides]'``.
    """
    absent = missing(*modules)
    if not absent:
        return
    if by is None:
        by = sys._getframe(1).f_globals.get("__name__", "this module")
    names = [_PRETTY.get(m, m) for m in absent]
    what = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    err = ImportError(f"{by} needs {what}: pip install '{DISTRIBUTION}[{extra}]'", name=absent[0])
    raise err
