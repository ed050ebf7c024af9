"""mcsample: Monte Carlo sampling for science on PyTorch.

The engine (this package) speaks of tensors, log-densities, particles and weights:
importance sampling, sequential Monte Carlo, resampling and ESS diagnostics. Targets live in
``mcsample.systems`` and proposal generators in ``mcsample.flows``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from mcsample._version import __version__ as __version__

if TYPE_CHECKING:  # for type checkers and editors; at run time the names resolve lazily (below)
    from mcsample import correctors, kernels
    from mcsample.diagnostics import conditional_ess, ess, log_evidence, psis
    from mcsample.importance import importance_sample
    from mcsample.resampling import resample
    from mcsample.smc import SMCResult, smc
    from mcsample.tempering import AdaptiveSchedule, FixedSchedule
    from mcsample.weighted import Estimate, WeightedSamples

__all__ = [
    "AdaptiveSchedule",
    "Estimate",
    "FixedSchedule",
    "SMCResult",
    "WeightedSamples",
    "conditional_ess",
    "correctors",
    "ess",
    "importance_sample",
    "kernels",
    "log_evidence",
    "psis",
    "resample",
    "smc",
    "sample_conformers",
    "sample_peptide",
]

# Every public name resolves on first use (PEP 562): ``import mcsample`` and ``mcsample --help``
# do not import torch, and the conveniences that reach into systems/ and flows/ (RDKit, OpenMM)
# leave the engine importable without them. ``(module, None)`` names a submodule.
_LAZY = {
    "AdaptiveSchedule": ("mcsample.tempering", "AdaptiveSchedule"),
    "Estimate": ("mcsample.weighted", "Estimate"),
    "FixedSchedule": ("mcsample.tempering", "FixedSchedule"),
    "SMCResult": ("mcsample.smc", "SMCResult"),
    "WeightedSamples": ("mcsample.weighted", "WeightedSamples"),
    "conditional_ess": ("mcsample.diagnostics", "conditional_ess"),
    "correctors": ("mcsample.correctors", None),
    "ess": ("mcsample.diagnostics", "ess"),
    "importance_sample": ("mcsample.importance", "importance_sample"),
    "kernels": ("mcsample.kernels", None),
    "log_evidence": ("mcsample.diagnostics", "log_evidence"),
    "psis": ("mcsample.diagnostics", "psis"),
    "resample": ("mcsample.resampling", "resample"),
    "sample_conformers": ("mcsample.systems.conformers", "sample_conformers"),
    "sample_peptide": ("mcsample.peptide_sampling", "sample_peptide"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = importlib.import_module(module)
        if attr is not None:
            value = getattr(value, attr)
        globals()[name] = value
        return value
    if not name.startswith("_"):  # any other submodule, e.g. ``mc.posterior``
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'mcsample' has no attribute {name!r}")


def __dir__():
    loaded = {
        k
        for k, v in globals().items()
        if not k.startswith("_") and getattr(v, "__name__", "").startswith(f"{__name__}.")
    }
    return sorted(set(__all__) | {k for k in globals() if k.startswith("__")} | loaded)


class _Package(types.ModuleType):
    """The package's module type. ``mcsample.smc`` is the function :func:`mcsample.smc.smc` (the
    name ``__all__`` exports), also after the submodule of the same name has been imported: the
    import system binds a package attribute to each submodule it loads, and this property
    ignores that binding."""

    @property
    def smc(self):
        return importlib.import_module("mcsample.smc").smc

    @smc.setter
    def smc(self, value):
        pass


sys.modules[__name__].__class__ = _Package
