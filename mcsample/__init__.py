"""mcsample: Monte Carlo sampling for science on PyTorch.

The engine (this package) speaks of tensors, log-densities, particles and weights:
importance sampling, sequential Monte Carlo, resampling and ESS diagnostics. Targets live in
``mcsample.systems`` and proposal generators in ``mcsample.flows``.
"""

from __future__ import annotations

from mcsample import correctors, kernels
from mcsample.diagnostics import conditional_ess, ess, log_evidence, psis
from mcsample.importance import importance_sample
from mcsample.resampling import resample
from mcsample.smc import SMCResult, smc
from mcsample.tempering import AdaptiveSchedule, FixedSchedule
from mcsample.weighted import Estimate, WeightedSamples

__version__ = "0.1.0"

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

# Conveniences that reach into systems/ and flows/ (RDKit, OpenMM): resolved lazily so that the
# engine imports without them.
_LAZY = {
    "sample_conformers": ("mcsample.conformers", "sample_conformers"),
    "sample_peptide": ("mcsample.peptide_sampling", "sample_peptide"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mcsample' has no attribute {name!r}")
