r"""A batched, differentiable torch copy of an OpenMM System's potential energy.

:class:`TorchForceField` reads every parameter out of an ``openmm.System`` and evaluates the
potential energy :math:`U(x)` (kJ/mol) of a whole batch ``x`` of shape ``(B, n_atoms, 3)``
(nm) at once, on CPU or GPU, in float32 or float64, with forces :math:`-\nabla U`. In float64
it reproduces OpenMM's Reference platform to ~1e-12 relative precision. ``log_prob = -U/kT``
is the Boltzmann log-density the samplers use.

Terms (OpenMM's definitions; OpenMM user guide, "Standard Forces"):

* ``HarmonicBondForce``    :math:`\tfrac12 k (r-r_0)^2`
* ``HarmonicAngleForce``   :math:`\tfrac12 k (\theta-\theta_0)^2`
* ``PeriodicTorsionForce`` :math:`k\,(1+\cos(n\phi-\phi_0))`
* ``NonbondedForce`` :math:`\sum_{i<j} 4\epsilon_{ij}[(\sigma_{ij}/r)^{12}-(\sigma_{ij}/r)^6]
  + k_e q_iq_j/r` over all pairs but the excluded ones (Lorentz-Berthelot mixing), plus the
  exceptions (scaled 1-4 pairs) with their own parameters, never cut off. With
  ``CutoffNonPeriodic`` the Coulomb term of regular pairs within :math:`r_c` becomes the
  reaction field :math:`k_e q_iq_j(1/r + k_{rf} r^2 - c_{rf})`,
  :math:`k_{rf} = r_c^{-3}(\epsilon_{rf}-1)/(2\epsilon_{rf}+1)`,
  :math:`c_{rf} = r_c^{-1}\,3\epsilon_{rf}/(2\epsilon_{rf}+1)` (amber's implicit-solvent files
  set :math:`\epsilon_{rf}=1`, i.e. a shifted Coulomb), and pairs beyond :math:`r_c` drop out.
* Generalized Born, OBC model (Onufriev, Bashford & Case, Proteins 2004), as ``GBSAOBCForce``
  or as the ``CustomGBForce`` that amber14's ``implicit/obc1.xml`` and ``obc2.xml`` and AMBER
  prmtop files (``igb=2``/``igb=5``) create. Born radii
  :math:`B_i = 1/(1/\rho_i - \tanh(\alpha\psi_i-\beta\psi_i^2+\gamma\psi_i^3)/R_i)`,
  :math:`\psi_i = \rho_i I_i` with :math:`I_i` the pairwise descreening integral (Hawkins,
  Cramer & Truhlar 1996), :math:`\rho_i = R_i - 0.009` nm; polar energy
  :math:`-\tfrac{k_e}{2}(1/\epsilon_{in}-1/\epsilon_{out})\sum_{i,j} q_iq_j/f_{ij}`,
  :math:`f_{ij}=\sqrt{r_{ij}^2 + B_iB_j e^{-r_{ij}^2/4B_iB_j}}` (Still et al. 1990; the
  diagonal is the self energy), and the ACE surface term :math:`28.39\,(R_i+0.14)^2(R_i/B_i)^6`
  (Schaefer, Bartels & Karplus 1998).
* ``CMMotionRemover`` contributes no energy. Any other force raises an error naming it.

Custom forces are never interpreted generically: a ``CustomGBForce`` is accepted only when its
per-particle parameters, computed values and energy terms are the OBC1/OBC2 expressions that
``openmm.app.internal.customgbforces`` generates; its constants are read out of them.

Three engines evaluate the same formulas (``TorchForceField(..., engine=...)``):

* ``"fused"`` (torch, any device; the default on GPUs) computes every pair term (nonbonded,
  exceptions, GB) together with its analytic gradient on dense ``(B, n, n)`` matrices in one
  pass (``_FusedPairs``): all pair terms depend on :math:`d_{ij} = |x_i-x_j|^2`, so with
  :math:`W_{ij} = \partial U/\partial d_{ij}` the gradient is the batched product
  :math:`\nabla_{x_k} U = 2\sum_j (W_{kj}+W_{jk})(x_k - x_j)`; bonded terms by autograd;
* ``"numba"`` (CPU; the default there when numba is installed, which openmmtools requires) is
  one compiled loop per configuration, parallel over the batch, with analytic gradients of
  every term (torsions after Blondel & Karplus 1996): no temporaries, several times faster
  than eager torch; it is compiled once (~20 s) and cached on disk;
* ``"autograd"`` (torch) evaluates the straightforward per-term modules by autograd all the
  way: the slowest, and the only one that is twice differentiable.

Clashes: distances in the nonbonded and GB terms are floored at ``min_distance`` (1e-4 nm in
float64, 1e-2 nm otherwise; LJ walls there are 1e12 kJ/mol or more), so overlapping atoms give
huge finite energies and finite forces, never NaN; square roots and ``atan2`` are guarded so
that autograd never meets a singular branch ("double where"). :func:`linlogcut` is the
separate, optional soft regularization of Boltzmann-generator training (Noé et al. 2019).

Memory: dense pair matrices, fine for peptides (20-200 atoms); batches are evaluated in chunks
of at most ``max_pairs_per_chunk`` pair entries.

Layout: this module holds :class:`TorchForceField` (reading a System, choosing the engine,
chunking), :class:`UnsupportedForceError` and :func:`linlogcut`; the per-force torch terms are
in ``_ff_terms``, the recognition of OpenMM's GB forces in ``_ff_openmm_gb``, the fused pair
engine in ``_ff_fused`` and the numba engine in ``_ff_numba``. Every public name is importable
from here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mcsample._optional import require

from ._ff_fused import _FusedPairs
from ._ff_numba import _numba_kernel, _NumbaEnergy, _NumbaParams
from ._ff_openmm_gb import _obc_from_custom_gb, _obc_from_gbsaobc
from ._ff_terms import (
    ONE_4PI_EPS0,
    HarmonicAngles,
    HarmonicBonds,
    Nonbonded,
    OBCGeneralizedBorn,
    PeriodicTorsions,
    UnsupportedForceError,
    dihedral,
)

require("openmm", extra="peptides")

__all__ = [
    "TorchForceField",
    "UnsupportedForceError",
    "linlogcut",
    "dihedral",
    "ONE_4PI_EPS0",
]


def _floor_for(dtype: torch.dtype) -> float:
    """Default minimum pair distance (nm) for clash safety: 1e-4 in float64, 1e-2 otherwise."""
    return 1e-4 if dtype == torch.float64 else 1e-2


def linlogcut(energy: Tensor, high: float = 1e3, max: float = 1e9) -> Tensor:
    r"""Soft energy regularization of Boltzmann-generator training (Noé et al. 2019, bgflow).

    :math:`u \mapsto u` below ``high``, :math:`h + \log(1 + u - h)` above it, after capping at
    ``max`` (NaN and +inf become ``max``): unchanged in the physical range, logarithmic in
    clashes, so that gradients of clashing samples stay bounded. It is *not* the exact energy:
    importance weights need the exact one. Double where keeps the gradients finite.
    """
    e = torch.nan_to_num(energy, nan=max, posinf=max)
    e = torch.minimum(e, torch.full_like(e, max))
    above = e > high
    safe = torch.where(above, e, torch.full_like(e, high))
    return torch.where(above, high + torch.log1p(safe - high), e)


# --------------------------------------------------------------------------------------------


class TorchForceField(nn.Module):
    r"""Potential energy :math:`U(x)` (kJ/mol) of an OpenMM System, batched in torch.

    ``energy(x)`` for ``x`` of shape ``(B, n_atoms, 3)`` in nm returns ``(B,)``
    (``log_prob = -U/kT``); ``forces(x)`` returns :math:`-\nabla U` (kJ/mol/nm);
    ``energy_components(x)`` gives each force's share. Parameters are float64 buffers cast to
    the input's dtype and device; ``.to(device)`` moves them once.

    ``engine`` picks how the same formulas are evaluated:

    * ``"auto"`` (default): ``"numba"`` for CPU tensors when numba is installed (it comes with
      openmmtools), ``"fused"`` otherwise (GPU);
    * ``"numba"``: a compiled loop per configuration, parallel over the batch (CPU only);
      energies and gradients accumulate in float64 whatever the input dtype;
    * ``"fused"``: torch, pair terms with analytic gradients on dense matrices (any device);
    * ``"autograd"``: torch, every term by autograd: slowest, twice differentiable.

    The first three are first-order differentiable (what samplers and flow training need).
    ``min_distance`` (nm) overrides the clash floor; ``max_pairs_per_chunk`` bounds the
    batch chunks of the torch engines (default: 2^18 pair entries on CPU, 2^24 on GPU).
    """

    ENGINES = ("auto", "numba", "fused", "autograd")

    def __init__(
        self,
        terms: list[nn.Module],
        n_atoms: int,
        min_distance: float | None = None,
        max_pairs_per_chunk: int | None = None,
        engine: str = "auto",
    ):
        super().__init__()
        if engine not in self.ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {self.ENGINES}")
        self.terms = nn.ModuleList(terms)
        self.n_atoms = int(n_atoms)
        self.min_distance = min_distance
        self.max_pairs_per_chunk = max_pairs_per_chunk
        self.engine = engine
        self._numba_params = None
        nbs = [t for t in terms if isinstance(t, Nonbonded)]
        gbs = [t for t in terms if isinstance(t, OBCGeneralizedBorn)]
        if len(nbs) > 1 or len(gbs) > 1:
            raise UnsupportedForceError("more than one NonbondedForce or GB force in the System")
        self._nb = nbs[0] if nbs else None
        self._gb = gbs[0] if gbs else None

    @classmethod
    def from_openmm(cls, system, temperature: float | None = None, **kwargs) -> TorchForceField:
        """Read every force of ``system``; raise :class:`UnsupportedForceError` naming others.

        ``temperature`` is accepted for symmetry with the peptide constructors and unused (the
        energy does not depend on it).
        """
        import openmm

        n = system.getNumParticles()
        for i in range(n):
            if system.isVirtualSite(i):
                raise UnsupportedForceError(f"virtual sites are not supported (particle {i})")
        terms: list[nn.Module] = []
        for force in system.getForces():
            if isinstance(force, openmm.CMMotionRemover):
                continue
            if force.usesPeriodicBoundaryConditions() and not isinstance(
                force, (openmm.NonbondedForce, openmm.CustomGBForce, openmm.GBSAOBCForce)
            ):
                raise UnsupportedForceError(f"{type(force).__name__} uses periodic boundary conditions, not supported")
            if isinstance(force, openmm.HarmonicBondForce):
                terms.append(HarmonicBonds(force))
            elif isinstance(force, openmm.HarmonicAngleForce):
                terms.append(HarmonicAngles(force))
            elif isinstance(force, openmm.PeriodicTorsionForce):
                terms.append(PeriodicTorsions(force))
            elif isinstance(force, openmm.NonbondedForce):
                terms.append(Nonbonded(force))
            elif isinstance(force, openmm.CustomGBForce):
                terms.append(_obc_from_custom_gb(force))
            elif isinstance(force, openmm.GBSAOBCForce):
                terms.append(_obc_from_gbsaobc(force))
            else:
                raise UnsupportedForceError(
                    f"force {type(force).__name__} ({force.getName()!r}) is not supported by "
                    "TorchForceField: supported are HarmonicBondForce, HarmonicAngleForce, "
                    "PeriodicTorsionForce, NonbondedForce, GBSAOBCForce, the OBC1/OBC2 "
                    "CustomGBForce and CMMotionRemover"
                )
        return cls(terms, n, **kwargs)

    # ------------------------------------------------------------------------------------
    def _check(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (B, {self.n_atoms}, 3) in nm")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        return x

    def _chunk(self, x: Tensor) -> int:
        if self._engine_for(x) == "numba":
            return max(1, 1 << 16)
        budget = self.max_pairs_per_chunk or (1 << 18 if x.device.type == "cpu" else 1 << 24)
        return max(1, budget // (self.n_atoms * self.n_atoms))

    def _engine_for(self, x: Tensor) -> str:
        if self.engine == "auto":
            if x.device.type == "cpu" and _numba_kernel() is not None:
                return "numba"
            return "fused"
        if self.engine == "numba":
            if x.device.type != "cpu":
                raise ValueError("engine='numba' runs on the CPU; use 'fused' for GPU tensors")
            if _numba_kernel() is None:
                raise ImportError("engine='numba' needs numba (pip install numba)")
        return self.engine

    def _floor(self, x: Tensor) -> float:
        return self.min_distance if self.min_distance is not None else _floor_for(x.dtype)

    def _terms(self, x: Tensor, fused: bool) -> list[tuple[str, Tensor]]:
        floor = self._floor(x)
        out = []
        for t in self.terms:
            if isinstance(t, (Nonbonded, OBCGeneralizedBorn)):
                if not fused:
                    out.append((t.name, t(x, floor * floor)))
            else:
                out.append((t.name, t(x)))
        if fused and (self._nb is not None or self._gb is not None):
            out.append(("pairs", _FusedPairs.apply(x, self._nb, self._gb, floor)))
        return out

    def _energy(self, x: Tensor) -> Tensor:
        engine = self._engine_for(x)
        if engine == "numba":
            if self._numba_params is None:
                self._numba_params = _NumbaParams(self)
            return _NumbaEnergy.apply(x, _numba_kernel(), self._numba_params, self._floor(x))
        terms = [e for _, e in self._terms(x, engine == "fused")]
        return torch.stack(terms).sum(0) if terms else (0.0 * x).sum((-1, -2))

    def energy(self, x: Tensor) -> Tensor:
        """:math:`U(x)` in kJ/mol, shape ``(B,)``; differentiable (``log_prob = -U/kT``)."""
        x = self._check(x)
        c = self._chunk(x)
        if x.shape[0] <= c:
            return self._energy(x)
        return torch.cat([self._energy(xc) for xc in x.split(c)])

    forward = energy

    def energy_components(self, x: Tensor) -> dict[str, Tensor]:
        """Each force's energy (kJ/mol), keyed by its OpenMM class name, shape ``(B,)`` each."""
        x = self._check(x)
        return dict(self._terms(x, fused=False))

    def energy_and_forces(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """:math:`U(x)` and :math:`F = -\\nabla_x U` (both detached), chunked to bound memory."""
        x = self._check(x)
        es, fs = [], []
        for xc in x.detach().split(self._chunk(x)):
            with torch.enable_grad():
                xc = xc.requires_grad_(True)
                e = self._energy(xc)
                (g,) = torch.autograd.grad(e.sum(), xc)
            es.append(e.detach())
            fs.append(-g)
        return torch.cat(es), torch.cat(fs)

    def forces(self, x: Tensor) -> Tensor:
        """:math:`F = -\\nabla_x U(x)` in kJ/mol/nm, same shape as ``x``."""
        return self.energy_and_forces(x)[1]

    def _apply(self, fn, *args, **kwargs):
        self._numba_params = None  # parameters may change with .to(); rebuilt lazily
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"n_atoms={self.n_atoms}, engine={self.engine!r}"
