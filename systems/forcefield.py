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
"""

from __future__ import annotations

import math
import re
import threading

import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "TorchForceField",
    "UnsupportedForceError",
    "linlogcut",
    "dihedral",
    "ONE_4PI_EPS0",
]

#: Coulomb constant k_e = 1/(4 pi eps0) in kJ nm / (mol e^2), OpenMM's value (NonbondedForce,
#: GBSAOBCForce); amber's CustomGBForce expressions carry their own 138.935485.
ONE_4PI_EPS0 = 138.93545764438198


class UnsupportedForceError(ValueError):
    """An OpenMM force (or a setting of one) that :class:`TorchForceField` cannot reproduce."""


# --------------------------------------------------------------------------------------------
# guarded geometry


def _floor_for(dtype: torch.dtype) -> float:
    """Default minimum pair distance (nm) for clash safety: 1e-4 in float64, 1e-2 otherwise."""
    return 1e-4 if dtype == torch.float64 else 1e-2


def _safe_sqrt(v: Tensor, floor2: float) -> Tensor:
    """:math:`\\sqrt{\\max(v, f)}` with a finite gradient everywhere (zero below the floor)."""
    return torch.sqrt(torch.clamp(v, min=floor2))


def _safe_atan2(y: Tensor, x: Tensor) -> Tensor:
    """``atan2`` whose gradient is 0 instead of NaN at the singular point (0, 0) (double where)."""
    bad = (x.abs() + y.abs()) < 1e-30
    return torch.atan2(torch.where(bad, torch.zeros_like(y), y),
                       torch.where(bad, torch.ones_like(x), x))


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """``x[:, idx]`` for an index array of any shape, by ``index_select`` (cheap backward)."""
    return torch.index_select(x, 1, idx.reshape(-1)).view(x.shape[0], *idx.shape, x.shape[-1])


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


def dihedral(x: Tensor, idx: Tensor) -> Tensor:
    r"""IUPAC dihedral angles in :math:`(-\pi, \pi]` of quadruplets ``idx`` (T, 4): (B, T).

    :math:`\phi = \operatorname{atan2}(|b_2|\, b_1\cdot(b_2\times b_3),\ (b_1\times b_2)\cdot(b_2\times b_3))`
    with :math:`b_k = x_k - x_{k-1}` (Blondel & Karplus 1996); trans is :math:`\pi`, as in
    OpenMM and mdtraj; NaN-free gradients at collinear atoms.
    """
    p = _gather(x, idx)
    b1 = p[:, :, 1] - p[:, :, 0]
    b2 = p[:, :, 2] - p[:, :, 1]
    b3 = p[:, :, 3] - p[:, :, 2]
    n1 = torch.linalg.cross(b1, b2)
    n2 = torch.linalg.cross(b2, b3)
    b2n = _safe_sqrt(b2.square().sum(-1), 1e-36)
    return _safe_atan2(b2n * (b1 * n2).sum(-1), (n1 * n2).sum(-1))


# --------------------------------------------------------------------------------------------
# bonded terms (autograd)


class HarmonicBonds(nn.Module):
    r""":math:`U = \sum_b \tfrac12 k_b (r_b - r_{0,b})^2` (OpenMM ``HarmonicBondForce``)."""

    name = "HarmonicBondForce"

    def __init__(self, force):
        super().__init__()
        rows = [force.getBondParameters(i) for i in range(force.getNumBonds())]
        self.register_buffer("idx", torch.tensor([r[:2] for r in rows], dtype=torch.long).reshape(-1, 2))
        self.register_buffer("r0", torch.tensor([r[2]._value for r in rows], dtype=torch.float64))
        self.register_buffer("k", torch.tensor([r[3]._value for r in rows], dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        if self.idx.numel() == 0:
            return x.new_zeros(x.shape[0])
        p = _gather(x, self.idx)
        r = _safe_sqrt((p[:, :, 1] - p[:, :, 0]).square().sum(-1), 1e-24)
        return (0.5 * self.k.to(x) * (r - self.r0.to(x)).square()).sum(-1)


class HarmonicAngles(nn.Module):
    r""":math:`U = \sum_a \tfrac12 k_a (\theta_a - \theta_{0,a})^2` (``HarmonicAngleForce``).

    :math:`\theta = \operatorname{atan2}(|u\times v|, u\cdot v)`, accurate near 0 and π.
    """

    name = "HarmonicAngleForce"

    def __init__(self, force):
        super().__init__()
        rows = [force.getAngleParameters(i) for i in range(force.getNumAngles())]
        self.register_buffer("idx", torch.tensor([r[:3] for r in rows], dtype=torch.long).reshape(-1, 3))
        self.register_buffer("theta0", torch.tensor([r[3]._value for r in rows], dtype=torch.float64))
        self.register_buffer("k", torch.tensor([r[4]._value for r in rows], dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        if self.idx.numel() == 0:
            return x.new_zeros(x.shape[0])
        p = _gather(x, self.idx)
        u = p[:, :, 0] - p[:, :, 1]
        v = p[:, :, 2] - p[:, :, 1]
        cross = _safe_sqrt(torch.linalg.cross(u, v).square().sum(-1), 1e-36)
        theta = _safe_atan2(cross, (u * v).sum(-1))
        return (0.5 * self.k.to(x) * (theta - self.theta0.to(x)).square()).sum(-1)


class PeriodicTorsions(nn.Module):
    r""":math:`U = \sum_t k_t (1 + \cos(n_t\phi_t - \phi_{0,t}))` (``PeriodicTorsionForce``).

    :math:`\phi` is the IUPAC dihedral of atoms 1-2-3-4 (:func:`dihedral`), as in OpenMM.
    """

    name = "PeriodicTorsionForce"

    def __init__(self, force):
        super().__init__()
        rows = [force.getTorsionParameters(i) for i in range(force.getNumTorsions())]
        self.register_buffer("idx", torch.tensor([r[:4] for r in rows], dtype=torch.long).reshape(-1, 4))
        self.register_buffer("n", torch.tensor([float(r[4]) for r in rows], dtype=torch.float64))
        self.register_buffer("phase", torch.tensor([r[5]._value for r in rows], dtype=torch.float64))
        self.register_buffer("k", torch.tensor([r[6]._value for r in rows], dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        if self.idx.numel() == 0:
            return x.new_zeros(x.shape[0])
        arg = self.n.to(x) * dihedral(x, self.idx) - self.phase.to(x)
        return (self.k.to(x) * (1.0 + torch.cos(arg))).sum(-1)


# --------------------------------------------------------------------------------------------
# pair geometry


class _Pairs:
    """Dense pair geometry of a batch, shared by the nonbonded and GB terms.

    ``diff[b,i,j] = x_i - x_j``, ``d2 = |diff|^2`` (exactly 0 on the diagonal), ``r`` and
    ``inv_r`` from the distances floored at the clash floor (the diagonal set to 1 first, so
    nothing is singular), ``live`` marks entries above the floor (their gradient is not cut).
    """

    def __init__(self, x: Tensor, floor: float):
        n = x.shape[1]
        self.x = x
        self.n = n
        self.floor2 = floor * floor
        self.eye = torch.eye(n, dtype=torch.bool, device=x.device)
        self.diff = x[:, :, None, :] - x[:, None, :, :]
        self.d2 = self.diff.square().sum(-1)
        raw = self.d2.masked_fill(self.eye, 1.0)
        self.live = raw >= self.floor2
        d2c = torch.clamp(raw, min=self.floor2)
        self.d2c = d2c
        self.inv_r = torch.rsqrt(d2c)
        self.r = d2c * self.inv_r

    def flat(self, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], self.n * self.n)


# --------------------------------------------------------------------------------------------
# nonbonded


def _lj_coulomb(d2: Tensor, inv2: Tensor, inv_r: Tensor, sig2: Tensor, eps4: Tensor, qq: Tensor,
                k_rf: float | None, c_rf: float | None, switch: tuple[float, float] | None,
                need_grad: bool):
    """LJ + Coulomb (or reaction field) energies of pairs and, if asked, ``dE/d(r^2)``."""
    s6 = (sig2 * inv2) ** 3
    lj = eps4 * s6 * (s6 - 1.0)
    coul = qq * inv_r if k_rf is None else qq * (inv_r + k_rf * d2 - c_rf)
    dlj = dcoul = None
    if need_grad:
        dlj = -3.0 * eps4 * s6 * (2.0 * s6 - 1.0) * inv2
        dcoul = -0.5 * qq * inv_r * inv2
        if k_rf is not None:
            dcoul = dcoul + qq * k_rf
    if switch is not None:   # OpenMM's LJ switch S(t) = 1 - 10t^3 + 15t^4 - 6t^5
        r_sw, r_c = switch
        r = d2 * inv_r
        t = torch.clamp((r - r_sw) / (r_c - r_sw), 0.0, 1.0)
        sw = 1.0 + t**3 * (-10.0 + t * (15.0 - 6.0 * t))
        if need_grad:
            dsw = -30.0 * (t * (1.0 - t)).square() / (r_c - r_sw) * 0.5 * inv_r
            dlj = dlj * sw + lj * dsw
        lj = lj * sw
    return lj + coul, (dlj + dcoul if need_grad else None)


class Nonbonded(nn.Module):
    r"""OpenMM ``NonbondedForce`` with NoCutoff or CutoffNonPeriodic (reaction field).

    Regular pairs :math:`i<j` (all but the exceptions): LJ with Lorentz-Berthelot mixing
    :math:`\sigma_{ij}=(\sigma_i+\sigma_j)/2`, :math:`\epsilon_{ij}=\sqrt{\epsilon_i\epsilon_j}`
    and Coulomb :math:`k_e q_iq_j/r`; with a cutoff, within :math:`r_c` the reaction field
    :math:`k_e q_iq_j(1/r + k_{rf}r^2 - c_{rf})` and optionally OpenMM's LJ switching function.
    Exceptions: :math:`k_e\,\mathrm{chargeProd}/r + 4\epsilon[(\sigma/r)^{12}-(\sigma/r)^6]`,
    never cut off and without reaction field (as OpenMM computes them).
    """

    name = "NonbondedForce"

    def __init__(self, force):
        super().__init__()
        import openmm

        method = force.getNonbondedMethod()
        if method not in (openmm.NonbondedForce.NoCutoff, openmm.NonbondedForce.CutoffNonPeriodic):
            names = {0: "NoCutoff", 1: "CutoffNonPeriodic", 2: "CutoffPeriodic", 3: "Ewald",
                     4: "PME", 5: "LJPME"}
            raise UnsupportedForceError(
                f"NonbondedForce with nonbonded method {names.get(method, method)} is not "
                "supported: use NoCutoff or CutoffNonPeriodic (non-periodic peptides)"
            )
        if force.getNumParticleParameterOffsets() or force.getNumExceptionParameterOffsets():
            raise UnsupportedForceError(
                "NonbondedForce with parameter offsets (global-parameter-dependent charges or "
                "LJ) is not supported"
            )
        n = force.getNumParticles()
        q, sig, eps = np.zeros(n), np.zeros(n), np.zeros(n)
        for i in range(n):
            c, s, e = force.getParticleParameters(i)
            q[i], sig[i], eps[i] = c._value, s._value, e._value
        regular = ~np.eye(n, dtype=bool)
        ex_rows = []
        for k in range(force.getNumExceptions()):
            a, b, qq, s, e = force.getExceptionParameters(k)
            regular[a, b] = regular[b, a] = False
            if qq._value != 0.0 or e._value != 0.0:
                ex_rows.append((a, b, qq._value, s._value, e._value))
        # dense parameter matrices (zero on the diagonal and on excluded pairs) ...
        qq_m = np.where(regular, ONE_4PI_EPS0 * np.outer(q, q), 0.0)
        sig2_m = np.where(regular, (0.5 * (sig[:, None] + sig[None, :])) ** 2, 0.0)
        eps4_m = np.where(regular, 4.0 * np.sqrt(np.outer(eps, eps)), 0.0)
        self.register_buffer("qq_m", torch.as_tensor(qq_m))
        self.register_buffer("sig2_m", torch.as_tensor(sig2_m))
        self.register_buffer("eps4_m", torch.as_tensor(eps4_m))
        # ... and the same as a list of interacting pairs i<j for the reference path
        ii, jj = np.nonzero(np.triu(regular & ((qq_m != 0.0) | (eps4_m != 0.0)), 1))
        self.register_buffer("pairs", torch.as_tensor(np.stack([ii, jj], 1), dtype=torch.long).reshape(-1, 2))
        self.register_buffer("qq", torch.as_tensor(qq_m[ii, jj]))
        self.register_buffer("sig2", torch.as_tensor(sig2_m[ii, jj]))
        self.register_buffer("eps4", torch.as_tensor(eps4_m[ii, jj]))
        ex = np.array(ex_rows, dtype=np.float64).reshape(-1, 5)
        ex_pairs = torch.as_tensor(ex[:, :2], dtype=torch.long)
        self.register_buffer("ex_pairs", ex_pairs)
        self.register_buffer("ex_flat", ex_pairs[:, 0] * n + ex_pairs[:, 1])
        self.register_buffer("ex_qq", torch.as_tensor(ONE_4PI_EPS0 * ex[:, 2]))
        self.register_buffer("ex_sig2", torch.as_tensor(ex[:, 3] ** 2))
        self.register_buffer("ex_eps4", torch.as_tensor(4.0 * ex[:, 4]))
        self.cutoff = None
        self.k_rf = self.c_rf = None
        self.switch = None
        if method == openmm.NonbondedForce.CutoffNonPeriodic:
            self.cutoff = float(force.getCutoffDistance()._value)
            erf = float(force.getReactionFieldDielectric())
            self.k_rf = (erf - 1.0) / (2.0 * erf + 1.0) / self.cutoff**3
            self.c_rf = 3.0 * erf / (2.0 * erf + 1.0) / self.cutoff
            if force.getUseSwitchingFunction():
                self.switch = (float(force.getSwitchingDistance()._value), self.cutoff)

    def forward(self, x: Tensor, floor2: float) -> Tensor:
        """Reference path: pair lists, autograd."""
        out = x.new_zeros(x.shape[0])
        for pairs, qq, sig2, eps4, regular in ((self.pairs, self.qq, self.sig2, self.eps4, True),
                                               (self.ex_pairs, self.ex_qq, self.ex_sig2, self.ex_eps4, False)):
            if pairs.numel() == 0:
                continue
            p = _gather(x, pairs)
            d2 = torch.clamp((p[:, :, 1] - p[:, :, 0]).square().sum(-1), min=floor2)
            inv2 = 1.0 / d2
            cut = regular and self.cutoff is not None
            e, _ = _lj_coulomb(d2, inv2, torch.sqrt(inv2), sig2.to(x), eps4.to(x), qq.to(x),
                               self.k_rf if cut else None, self.c_rf if cut else None,
                               self.switch if cut else None, False)
            if cut:
                e = torch.where(d2 < self.cutoff**2, e, torch.zeros_like(e))
            out = out + e.sum(-1)
        return out

    def dense_energy_grad(self, g: _Pairs, need_grad: bool):
        """Fused path: energy (B,) and ``W = dU/d(d_ij)`` (B, n, n) on dense matrices.

        Each unordered pair appears twice in the dense sums, hence the factors 1/2.
        """
        x = g.x
        inv2 = g.inv_r.square()
        cut = self.cutoff is not None
        e, w = _lj_coulomb(g.d2c, inv2, g.inv_r, self.sig2_m.to(x), self.eps4_m.to(x),
                           self.qq_m.to(x), self.k_rf, self.c_rf, self.switch, need_grad)
        if cut:
            inside = g.d2c < self.cutoff**2
            e = torch.where(inside, e, torch.zeros_like(e))
        energy = 0.5 * e.sum((-1, -2))
        W = None
        if need_grad:
            keep = g.live & inside if cut else g.live
            W = torch.where(keep, 0.5 * w, torch.zeros_like(w))
        if self.ex_flat.numel():
            raw = g.flat(g.d2)[:, self.ex_flat]
            d2 = torch.clamp(raw, min=g.floor2)
            inv2 = 1.0 / d2
            e, w = _lj_coulomb(d2, inv2, torch.sqrt(inv2), self.ex_sig2.to(x), self.ex_eps4.to(x),
                               self.ex_qq.to(x), None, None, None, need_grad)
            energy = energy + e.sum(-1)
            if need_grad:
                w = torch.where(raw >= g.floor2, w, torch.zeros_like(w))
                W = g.flat(W).index_add(1, self.ex_flat, w).view_as(W)
        return energy, W


# --------------------------------------------------------------------------------------------
# generalized Born (OBC)


class OBCGeneralizedBorn(nn.Module):
    r"""OBC generalized Born with the ACE surface-area term, dense over all atom pairs.

    Born radii (Onufriev, Bashford & Case 2004): for :math:`r + s_j \ge \rho_i`,
    :math:`I_i = \sum_{j\ne i} \tfrac12\big[\tfrac1L - \tfrac1U + \tfrac14(r-\tfrac{s_j^2}{r})
    (\tfrac1{U^2}-\tfrac1{L^2}) + \tfrac{1}{2r}\log\tfrac LU\big]`, :math:`U = r+s_j`,
    :math:`L=\max(\rho_i, |r-s_j|)`, :math:`s_j` the scaled offset radius;
    :math:`B_i = 1/(1/\rho_i - \tanh(\alpha\psi-\beta\psi^2+\gamma\psi^3)/R_i)`,
    :math:`\psi=\rho_iI_i` (OBC1: 0.8, 0, 2.909125; OBC2: 1, 0.8, 4.85). ``GBSAOBCForce`` adds
    :math:`1/\rho_i - 1/L` when atom i lies inside j's descreening sphere (Tinker's correction);
    the CustomGBForce versions do not. Energy:
    :math:`\tfrac12\sum_{i,j} q_iq_j\,F(f_{ij})(1/f_{ij} - [i\ne j]/r_c) + \sum_i a\,(R_i+0.14)^2(R_i/B_i)^6`,
    :math:`F = -k_e(1/\epsilon_{in} - e^{-\kappa f}/\epsilon_{out})`; the diagonal
    :math:`f_{ii}=B_i` is the self energy. With a cutoff, pairs beyond it drop out of
    :math:`I_i` and of the pair sum.
    """

    def __init__(self, *, charge, offset_radius, scaled_radius, offset, alpha, beta, gamma,
                 ke, solute_dielectric, solvent_dielectric, ace, probe, cutoff, kappa,
                 inside_term, name):
        super().__init__()
        self.name = name
        self.register_buffer("q", torch.as_tensor(np.asarray(charge, dtype=np.float64)))
        self.register_buffer("rho", torch.as_tensor(np.asarray(offset_radius, dtype=np.float64)))
        self.register_buffer("sr", torch.as_tensor(np.asarray(scaled_radius, dtype=np.float64)))
        self.offset = float(offset)
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.ke = float(ke)
        eps_in, eps_out = float(solute_dielectric), float(solvent_dielectric)
        self.inv_eps_in = 1.0 / eps_in if eps_in else 0.0
        self.inv_eps_out = 1.0 / eps_out if eps_out else 0.0
        # F = -k_e (1/eps_in - 1/eps_out) without salt; GBSAOBCForce is off when a dielectric is 0
        self.prefactor = -self.ke * (self.inv_eps_in - self.inv_eps_out) if eps_in and eps_out else 0.0
        self.ace = None if ace is None else float(ace)
        self.probe = float(probe)
        self.cutoff = None if cutoff is None else float(cutoff)
        self.kappa = float(kappa)
        self.inside_term = bool(inside_term)

    def forward(self, x: Tensor, floor2: float) -> Tensor:
        """Reference path (autograd): the same formulas as :meth:`dense_energy_grad`."""
        return self.dense_energy_grad(_Pairs(x, math.sqrt(floor2)), need_grad=False)[0]

    def dense_energy_grad(self, g: _Pairs, need_grad: bool):
        """Energy (B,) and, if asked, ``W_ij = dU/d(d_ij)`` (B, n, n), analytic.

        Chain rule through the Born radii: :math:`dU/dI_i = (dU/dB_i)(dB_i/dI_i)` with
        :math:`dB/dI = B^2(1-\\tanh^2 P)\\,P'(\\psi)\\,\\rho/R`; :math:`dU/dB_i` collects the ACE
        term and :math:`\\partial(u e^{-d/4u})/\\partial u = e^{-d/4u}(1 + d/4u)`, :math:`u=B_iB_j`.
        """
        x = g.x
        eye, d2, r, inv_r = g.eye, g.d2, g.r, g.inv_r
        rho = self.rho.to(x)
        rho_i = rho[:, None]
        s_j = self.sr.to(x)[None, :]
        radius = rho + self.offset
        # descreening integral I_i
        U = r + s_j
        inv_u = 1.0 / U
        rms = r - s_j
        use_d = rms.abs() > rho_i
        L = torch.where(use_d, rms.abs(), rho_i)
        inv_l = 1.0 / L
        log_lu = torch.log(L * inv_u)
        a2, b2 = inv_l.square(), inv_u.square()
        t1 = r - s_j.square() * inv_r
        h = 0.5 * (inv_l - inv_u + 0.25 * t1 * (b2 - a2) + 0.5 * log_lu * inv_r)
        keep = (U >= rho_i) & ~eye
        if self.cutoff is not None:
            keep = keep & (d2 <= self.cutoff**2)
        if self.inside_term:
            ins = rho_i < s_j - r
            h = h + torch.where(ins, 1.0 / rho_i - inv_l, torch.zeros_like(h))
        integral = torch.where(keep, h, torch.zeros_like(h)).sum(-1)
        # Born radii
        psi = integral * rho
        th = torch.tanh(psi * (self.alpha + psi * (-self.beta + self.gamma * psi)))
        born = 1.0 / (1.0 / rho - th / radius)
        # polar energy on the dense matrix, self energy on the diagonal
        q = self.q.to(x)
        qq = q[:, None] * q[None, :]
        u = born[:, :, None] * born[:, None, :]
        ex = torch.exp(-0.25 * d2 / u)
        inv_f = torch.rsqrt(d2 + u * ex)
        if self.cutoff is not None:
            pair_in = eye | (d2 <= self.cutoff**2)
            core = inv_f - (~eye).to(x.dtype) * (1.0 / self.cutoff)
        else:
            core = inv_f
        if self.kappa > 0.0:
            ek = torch.exp(-self.kappa / inv_f)
            factor = -self.ke * (self.inv_eps_in - ek * self.inv_eps_out)
        else:
            factor = self.prefactor
        e = factor * core * qq
        if self.cutoff is not None:
            e = torch.where(pair_in, e, torch.zeros_like(e))
        energy = 0.5 * e.sum((-1, -2))
        ace = None
        if self.ace is not None:
            ace = self.ace * (radius + self.probe).square() * (radius / born) ** 6
            energy = energy + ace.sum(-1)
        if not need_grad:
            return energy, None
        # dE/d(f^2) per entry, with the 1/2 of the double sum
        dg_df = -factor * inv_f.square()
        if self.kappa > 0.0:
            dg_df = dg_df - self.ke * self.kappa * self.inv_eps_out * ek * core
        G = 0.25 * qq * dg_df * inv_f
        if self.cutoff is not None:
            G = torch.where(pair_in, G, torch.zeros_like(G))
        W = G * (1.0 - 0.25 * ex)                                     # direct, through d_ij
        dE_dB = 2.0 * torch.einsum("bij,bj->bi", G * ex * (1.0 + 0.25 * d2 / u), born)
        if ace is not None:
            dE_dB = dE_dB - 6.0 * ace / born
        dpoly = self.alpha + psi * (-2.0 * self.beta + 3.0 * self.gamma * psi)
        dE_dI = dE_dB * born.square() * (1.0 - th.square()) * dpoly * rho / radius
        # dh/dr (L depends on r where L = |r - s_j|)
        lp = torch.where(use_d, torch.sign(rms), torch.zeros_like(rms))
        dh = 0.5 * (-a2 * lp + b2 + 0.25 * (1.0 + s_j.square() * inv_r.square()) * (b2 - a2)
                    + 0.5 * t1 * (a2 * inv_l * lp - b2 * inv_u)
                    + 0.5 * (inv_l * lp - inv_u) * inv_r - 0.5 * log_lu * inv_r.square())
        if self.inside_term:
            dh = dh + torch.where(ins, a2 * lp, torch.zeros_like(dh))
        dh = torch.where(keep & g.live, dh, torch.zeros_like(dh))
        W = W + dE_dI[:, :, None] * dh * (0.5 * inv_r)                # through I_i, d(r)/d(d) = 1/2r
        return energy, W


def _split_expression(expr: str) -> tuple[str, dict[str, str]]:
    """``"main; a=1; b=c+d"`` -> ("main", {"a": "1", "b": "c+d"}), whitespace removed."""
    parts = [p for p in expr.replace(" ", "").replace("\n", "").split(";") if p]
    defs = {}
    for p in parts[1:]:
        name, _, value = p.partition("=")
        defs[name] = value
    return parts[0], defs


_NUM = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
_I_EXPR = ("select(step(r+sr2-or1),0.5*(1/L-1/U+0.25*(r-sr2^2/r)*(1/(U^2)-1/(L^2))"
           "+0.5*log(L/U)/r),0)")
_I_DEFS = {"U": "r+sr2", "L": "max(or1,D)", "D": "abs(r-sr2)"}
_B_RE = re.compile(r"1/\(1/or-tanh\((.+)\)/radius\)")
_POLYS = {  # tanh argument -> (alpha, beta, gamma), OBC1 (igb=2) and OBC2 (igb=5)
    "0.8*psi+2.909125*psi^3": (0.8, 0.0, 2.909125),
    "psi-0.8*psi^2+4.85*psi^3": (1.0, 0.8, 4.85),
}
_SELF_RE = re.compile(r"-0\.5\*" + _NUM + r"\*\(1/soluteDielectric-(1|exp\(-kappa\*B\))/solventDielectric\)\*charge\^2/B")
_ACE_RE = re.compile(_NUM + r"\*\(radius\+" + _NUM + r"\)\^2\*\(radius/B\)\^6")
_PAIR_RE = re.compile(r"-" + _NUM + r"\*\(1/soluteDielectric-(1|exp\(-kappa\*f\))/solventDielectric\)"
                      r"\*charge1\*charge2(/f|\*\(1/f-" + _NUM + r"\))")
_F_EXPR = "sqrt(r^2+B1*B2*exp(-r^2/(4*B1*B2)))"


def _obc_from_custom_gb(force) -> OBCGeneralizedBorn:
    """Recognise the OBC1/OBC2 CustomGBForce of openmm.app.internal.customgbforces."""
    import openmm

    def fail(why: str):
        raise UnsupportedForceError(
            f"CustomGBForce not recognised as OpenMM's OBC1/OBC2 (amber implicit/obc1.xml, "
            f"obc2.xml or prmtop igb=2/5): {why}. Only these generalized-Born models are "
            "supported; GBn/GBn2/HCT and arbitrary custom expressions are not."
        )

    names = [force.getPerParticleParameterName(i) for i in range(force.getNumPerParticleParameters())]
    if names != ["charge", "or", "sr"]:
        fail(f"per-particle parameters {names}, expected ['charge', 'or', 'sr']")
    if force.getNumTabulatedFunctions() > 0:
        fail("it uses tabulated functions")
    globals_ = {force.getGlobalParameterName(i): force.getGlobalParameterDefaultValue(i)
                for i in range(force.getNumGlobalParameters())}
    if force.getNumComputedValues() != 2:
        fail(f"{force.getNumComputedValues()} computed values, expected 2 (I and B)")
    name_i, expr_i, type_i = force.getComputedValueParameters(0)
    name_b, expr_b, type_b = force.getComputedValueParameters(1)
    main_i, defs_i = _split_expression(expr_i)
    if (name_i != "I" or type_i != openmm.CustomGBForce.ParticlePairNoExclusions
            or main_i != _I_EXPR or defs_i != _I_DEFS):
        fail(f"computed value {name_i!r} = {expr_i!r} is not the OBC descreening integral")
    main_b, defs_b = _split_expression(expr_b)
    m = _B_RE.fullmatch(main_b)
    if (name_b != "B" or type_b != openmm.CustomGBForce.SingleParticle or m is None
            or m.group(1) not in _POLYS or defs_b.get("psi") != "I*or"
            or defs_b.get("radius") != "or+offset"):
        fail(f"computed value {name_b!r} = {expr_b!r} is not an OBC Born radius")
    alpha, beta, gamma = _POLYS[m.group(1)]
    offset = float(defs_b.get("offset", globals_.get("offset", "nan")))

    def constant(defs, key):
        if key in defs:
            return float(defs[key])
        if key in globals_:
            return float(globals_[key])
        fail(f"no value for {key!r}")

    self_k = ace = probe = pair = None
    kappa = 0.0
    cutoff_expr = None
    eps_in = eps_out = None
    for t in range(force.getNumEnergyTerms()):
        expr, kind = force.getEnergyTermParameters(t)
        main, defs = _split_expression(expr)
        if kind == openmm.CustomGBForce.SingleParticle and (ms := _SELF_RE.fullmatch(main)):
            self_k = float(ms.group(1))
            eps_in, eps_out = constant(defs, "soluteDielectric"), constant(defs, "solventDielectric")
            if ms.group(2) != "1":
                kappa = constant(defs, "kappa")
        elif kind == openmm.CustomGBForce.SingleParticle and (ma := _ACE_RE.fullmatch(main)):
            if defs.get("radius") != "or+offset":
                fail(f"surface term {expr!r} with an unexpected radius")
            ace, probe = float(ma.group(1)), float(ma.group(2))
        elif kind == openmm.CustomGBForce.ParticlePairNoExclusions and (mp := _PAIR_RE.fullmatch(main)):
            if defs.get("f") != _F_EXPR:
                fail(f"pair term {expr!r} with an unexpected f")
            pair = float(mp.group(1))
            cutoff_expr = mp.group(4)
        else:
            fail(f"energy term {t} {expr!r} (type {kind}) is not one of the OBC terms")
    if self_k is None or pair is None:
        fail("the self-energy or the pair energy term is missing")
    if abs(self_k - pair) > 1e-9 * pair:
        fail("self and pair terms use different Coulomb constants")
    method = force.getNonbondedMethod()
    if method == openmm.CustomGBForce.NoCutoff:
        cutoff = None
        if cutoff_expr is not None:
            fail("a cutoff-shifted pair term with NoCutoff")
    elif method == openmm.CustomGBForce.CutoffNonPeriodic:
        cutoff = float(force.getCutoffDistance()._value)
        if cutoff_expr is None or abs(1.0 / float(cutoff_expr) - cutoff) > 1e-9 * cutoff:
            fail(f"the pair term's shift {cutoff_expr} does not match the cutoff {cutoff} nm")
    else:
        fail("periodic boundary conditions are not supported")
    n = force.getNumParticles()
    params = np.array([force.getParticleParameters(i) for i in range(n)], dtype=np.float64).reshape(n, 3)
    gb = OBCGeneralizedBorn(
        charge=params[:, 0], offset_radius=params[:, 1], scaled_radius=params[:, 2],
        offset=offset, alpha=alpha, beta=beta, gamma=gamma, ke=self_k,
        solute_dielectric=eps_in, solvent_dielectric=eps_out, ace=ace,
        probe=0.14 if probe is None else probe, cutoff=cutoff, kappa=kappa, inside_term=False,
        name="CustomGBForce",
    )
    gb.model = "OBC2" if beta else "OBC1"
    return gb


def _obc_from_gbsaobc(force) -> OBCGeneralizedBorn:
    """``GBSAOBCForce`` (OBC2, ACE surface term with its surface-area energy)."""
    import openmm

    method = force.getNonbondedMethod()
    if method == openmm.GBSAOBCForce.NoCutoff:
        cutoff = None
    elif method == openmm.GBSAOBCForce.CutoffNonPeriodic:
        cutoff = float(force.getCutoffDistance()._value)
    else:
        raise UnsupportedForceError("GBSAOBCForce with periodic boundary conditions is not supported")
    n = force.getNumParticles()
    rows = [force.getParticleParameters(i) for i in range(n)]
    q = np.array([r[0]._value for r in rows])
    radius = np.array([r[1]._value for r in rows])
    scale = np.array([r[2] for r in rows], dtype=np.float64)
    offset = 0.009
    eps_in, eps_out = float(force.getSoluteDielectric()), float(force.getSolventDielectric())
    sa = float(force.getSurfaceAreaEnergy()._value)
    gb = OBCGeneralizedBorn(
        charge=q, offset_radius=radius - offset, scaled_radius=(radius - offset) * scale,
        offset=offset, alpha=1.0, beta=0.8, gamma=4.85, ke=ONE_4PI_EPS0,
        solute_dielectric=eps_in, solvent_dielectric=eps_out,
        ace=4.0 * math.pi * sa if sa != 0.0 else None, probe=0.14, cutoff=cutoff, kappa=0.0,
        inside_term=True, name="GBSAOBCForce",
    )
    gb.model = "OBC2"
    return gb


# --------------------------------------------------------------------------------------------
# fused pair terms: energy and analytic gradient in one pass


class _FusedPairs(torch.autograd.Function):
    """Nonbonded + GB energy (B,) with the gradient computed alongside in the forward pass.

    :math:`\\nabla_{x_k}U = 2\\sum_j (W_{kj}+W_{jk})(x_k-x_j)` with :math:`W = \\partial U/\\partial d`.
    First-order only (``once_differentiable``).
    """

    @staticmethod
    def forward(ctx, x, nb, gb, floor):
        need = bool(ctx.needs_input_grad[0])
        g = _Pairs(x, floor)
        energy = x.new_zeros(x.shape[0])
        W = None
        for term in (nb, gb):
            if term is None:
                continue
            e, w = term.dense_energy_grad(g, need)
            energy = energy + e
            if need:
                W = w if W is None else W + w
        if need:
            grad = 2.0 * torch.einsum("bij,bijc->bic", W + W.transpose(1, 2), g.diff)
            ctx.save_for_backward(grad)
        return energy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_energy):
        (grad,) = ctx.saved_tensors
        return grad_energy[:, None, None] * grad, None, None, None


# --------------------------------------------------------------------------------------------
# CPU fast path: one compiled loop per configuration (numba), parallel over the batch


_NUMBA_KERNEL = None
_NUMBA_LOCK = threading.Lock()


def _numba_kernel():
    """Compile (once, cached on disk) the per-configuration energy + gradient loop.

    The same formulas as the torch modules, written as scalar loops over bonds, angles,
    torsions, atom pairs and the two GB passes, so that a configuration's energy and gradient
    cost no temporary arrays; ``prange`` spreads the batch over the CPU threads. Accumulates in
    float64 whatever the input dtype. Returns None when numba is not installed.
    """
    global _NUMBA_KERNEL
    if _NUMBA_KERNEL is not None:
        return _NUMBA_KERNEL or None
    try:
        import numba
    except ImportError:  # numba comes with openmmtools; without it the torch path is used
        _NUMBA_KERNEL = False
        return None
    njit, prange = numba.njit, numba.prange

    @njit(cache=True, inline="always")
    def hct(r, inv_r, rho, s, inside, need_grad):
        """Descreening of an atom of offset radius rho by a sphere s at distance r: (h, dh/dr)."""
        if r + s < rho:
            return 0.0, 0.0
        inv_u = 1.0 / (r + s)
        rms = r - s
        use_d = abs(rms) > rho
        big_l = abs(rms) if use_d else rho
        inv_l = 1.0 / big_l
        log_lu = math.log(big_l * inv_u)
        a2, b2 = inv_l * inv_l, inv_u * inv_u
        t1 = r - s * s * inv_r
        h = 0.5 * (inv_l - inv_u + 0.25 * t1 * (b2 - a2) + 0.5 * log_lu * inv_r)
        ins = inside and rho < s - r
        if ins:
            h += 1.0 / rho - inv_l
        d = 0.0
        if need_grad:
            lp = (1.0 if rms > 0.0 else (-1.0 if rms < 0.0 else 0.0)) if use_d else 0.0
            d = 0.5 * (-a2 * lp + b2 + 0.25 * (1.0 + s * s * inv_r * inv_r) * (b2 - a2)
                       + 0.5 * t1 * (a2 * inv_l * lp - b2 * inv_u)
                       + 0.5 * (inv_l * lp - inv_u) * inv_r - 0.5 * log_lu * inv_r * inv_r)
            if ins:
                d += a2 * lp
        return h, d

    @njit(cache=True, inline="always")
    def lj_coulomb(d2c, qq, sig2, e4, cut, k_rf, c_rf, has_sw, r_sw, r_c):
        """Pair energy and dE/d(r^2) of LJ + Coulomb (reaction field and switch if cut)."""
        inv2 = 1.0 / d2c
        inv_r = math.sqrt(inv2)
        s6 = (sig2 * inv2) ** 3
        lj = e4 * s6 * (s6 - 1.0)
        dlj = -3.0 * e4 * s6 * (2.0 * s6 - 1.0) * inv2
        coul = qq * inv_r
        dcoul = -0.5 * qq * inv_r * inv2
        if cut:
            coul += qq * (k_rf * d2c - c_rf)
            dcoul += qq * k_rf
            if has_sw:
                r = d2c * inv_r
                t = min(max((r - r_sw) / (r_c - r_sw), 0.0), 1.0)
                sw = 1.0 + t * t * t * (-10.0 + t * (15.0 - 6.0 * t))
                dsw = -30.0 * (t * (1.0 - t)) ** 2 / (r_c - r_sw) * 0.5 * inv_r
                dlj = dlj * sw + lj * dsw
                lj = lj * sw
        return lj + coul, dlj + dcoul

    @njit(cache=True)
    def one(x, g, need_grad, floor2, b_idx, b_par, a_idx, a_par, t_idx, t_par,
            qq_m, sig2_m, eps4_m, nbo, e_idx, e_par, gq, grho, gsr, gbo):
        n = x.shape[0]
        energy = 0.0
        if need_grad:
            for i in range(n):
                g[i, 0] = 0.0
                g[i, 1] = 0.0
                g[i, 2] = 0.0
        # ---- bonds: k/2 (r - r0)^2
        for k in range(b_idx.shape[0]):
            i, j = b_idx[k, 0], b_idx[k, 1]
            dx, dy, dz = x[j, 0] - x[i, 0], x[j, 1] - x[i, 1], x[j, 2] - x[i, 2]
            r2 = dx * dx + dy * dy + dz * dz
            r = math.sqrt(max(r2, 1e-24))
            dr = r - b_par[k, 0]
            energy += 0.5 * b_par[k, 1] * dr * dr
            if need_grad and r2 > 1e-24:
                c = b_par[k, 1] * dr / r
                g[j, 0] += c * dx
                g[j, 1] += c * dy
                g[j, 2] += c * dz
                g[i, 0] -= c * dx
                g[i, 1] -= c * dy
                g[i, 2] -= c * dz
        # ---- angles: k/2 (theta - theta0)^2, theta = atan2(|u x v|, u.v)
        for k in range(a_idx.shape[0]):
            i, j, l = a_idx[k, 0], a_idx[k, 1], a_idx[k, 2]
            ux, uy, uz = x[i, 0] - x[j, 0], x[i, 1] - x[j, 1], x[i, 2] - x[j, 2]
            vx, vy, vz = x[l, 0] - x[j, 0], x[l, 1] - x[j, 1], x[l, 2] - x[j, 2]
            cx, cy, cz = uy * vz - uz * vy, uz * vx - ux * vz, ux * vy - uy * vx
            c2 = cx * cx + cy * cy + cz * cz
            cn = math.sqrt(max(c2, 1e-36))
            dot = ux * vx + uy * vy + uz * vz
            theta = 0.0 if cn + abs(dot) < 1e-30 else math.atan2(cn, dot)
            dth = theta - a_par[k, 0]
            energy += 0.5 * a_par[k, 1] * dth * dth
            if need_grad and c2 > 1e-36:
                de = a_par[k, 1] * dth / cn
                uu = ux * ux + uy * uy + uz * uz
                vv = vx * vx + vy * vy + vz * vz
                gux, guy, guz = -de * (vx - dot / uu * ux), -de * (vy - dot / uu * uy), -de * (vz - dot / uu * uz)
                gvx, gvy, gvz = -de * (ux - dot / vv * vx), -de * (uy - dot / vv * vy), -de * (uz - dot / vv * vz)
                g[i, 0] += gux
                g[i, 1] += guy
                g[i, 2] += guz
                g[l, 0] += gvx
                g[l, 1] += gvy
                g[l, 2] += gvz
                g[j, 0] -= gux + gvx
                g[j, 1] -= guy + gvy
                g[j, 2] -= guz + gvz
        # ---- torsions: k (1 + cos(n phi - phase)), IUPAC phi
        for k in range(t_idx.shape[0]):
            i0, i1, i2, i3 = t_idx[k, 0], t_idx[k, 1], t_idx[k, 2], t_idx[k, 3]
            b1x, b1y, b1z = x[i1, 0] - x[i0, 0], x[i1, 1] - x[i0, 1], x[i1, 2] - x[i0, 2]
            b2x, b2y, b2z = x[i2, 0] - x[i1, 0], x[i2, 1] - x[i1, 1], x[i2, 2] - x[i1, 2]
            b3x, b3y, b3z = x[i3, 0] - x[i2, 0], x[i3, 1] - x[i2, 1], x[i3, 2] - x[i2, 2]
            n1x, n1y, n1z = b1y * b2z - b1z * b2y, b1z * b2x - b1x * b2z, b1x * b2y - b1y * b2x
            n2x, n2y, n2z = b2y * b3z - b2z * b3y, b2z * b3x - b2x * b3z, b2x * b3y - b2y * b3x
            b2sq = b2x * b2x + b2y * b2y + b2z * b2z
            b2n = math.sqrt(max(b2sq, 1e-36))
            yy = b2n * (b1x * n2x + b1y * n2y + b1z * n2z)
            xx = n1x * n2x + n1y * n2y + n1z * n2z
            phi = 0.0 if abs(yy) + abs(xx) < 1e-30 else math.atan2(yy, xx)
            ang = t_par[k, 0] * phi - t_par[k, 1]
            energy += t_par[k, 2] * (1.0 + math.cos(ang))
            if need_grad:
                n1sq = n1x * n1x + n1y * n1y + n1z * n1z
                n2sq = n2x * n2x + n2y * n2y + n2z * n2z
                if n1sq > 1e-36 and n2sq > 1e-36 and b2sq > 1e-36:
                    ddphi = -t_par[k, 2] * t_par[k, 0] * math.sin(ang)
                    c0 = -ddphi * b2n / n1sq
                    c3 = ddphi * b2n / n2sq
                    g0x, g0y, g0z = c0 * n1x, c0 * n1y, c0 * n1z
                    g3x, g3y, g3z = c3 * n2x, c3 * n2y, c3 * n2z
                    p = (b1x * b2x + b1y * b2y + b1z * b2z) / b2sq
                    q = (b3x * b2x + b3y * b2y + b3z * b2z) / b2sq
                    # inner atoms: translation invariance fixes the rest (Blondel & Karplus 1996)
                    g[i0, 0] += g0x
                    g[i0, 1] += g0y
                    g[i0, 2] += g0z
                    g[i3, 0] += g3x
                    g[i3, 1] += g3y
                    g[i3, 2] += g3z
                    g[i1, 0] += -(1.0 + p) * g0x + q * g3x
                    g[i1, 1] += -(1.0 + p) * g0y + q * g3y
                    g[i1, 2] += -(1.0 + p) * g0z + q * g3z
                    g[i2, 0] += p * g0x - (1.0 + q) * g3x
                    g[i2, 1] += p * g0y - (1.0 + q) * g3y
                    g[i2, 2] += p * g0z - (1.0 + q) * g3z
        # ---- exceptions (never cut off)
        for k in range(e_idx.shape[0]):
            a, b = e_idx[k, 0], e_idx[k, 1]
            dx, dy, dz = x[a, 0] - x[b, 0], x[a, 1] - x[b, 1], x[a, 2] - x[b, 2]
            d2 = dx * dx + dy * dy + dz * dz
            e, w = lj_coulomb(max(d2, floor2), e_par[k, 0], e_par[k, 1], e_par[k, 2],
                              False, 0.0, 0.0, False, 0.0, 0.0)
            energy += e
            if need_grad and d2 >= floor2:
                w *= 2.0
                g[a, 0] += w * dx
                g[a, 1] += w * dy
                g[a, 2] += w * dz
                g[b, 0] -= w * dx
                g[b, 1] -= w * dy
                g[b, 2] -= w * dz
        # ---- one loop over pairs i<j: regular nonbonded pairs and the GB descreening integrals
        has_nb = nbo[0] > 0.0
        has_cut, rc2, k_rf, c_rf = nbo[1] > 0.0, nbo[2], nbo[3], nbo[4]
        has_sw, r_sw, r_c = nbo[5] > 0.0, nbo[6], nbo[7]
        has_gb = gbo[0] > 0.0
        offset, alpha, beta, gamma = gbo[1], gbo[2], gbo[3], gbo[4]
        ke, iein, ieout, pref = gbo[5], gbo[6], gbo[7], gbo[8]
        has_ace, ace_c, probe = gbo[9] > 0.0, gbo[10], gbo[11]
        gcut, grc, kappa, inside = gbo[12] > 0.0, gbo[13], gbo[14], gbo[15] > 0.0
        grc2 = grc * grc
        m = n if has_gb else 0
        integral = np.zeros(m)
        dh = np.zeros((m, m))
        d2s = np.zeros((m, m))
        for i in range(n):
            for j in range(i + 1, n):
                dx, dy, dz = x[i, 0] - x[j, 0], x[i, 1] - x[j, 1], x[i, 2] - x[j, 2]
                d2 = dx * dx + dy * dy + dz * dz
                d2c = max(d2, floor2)
                if has_nb:
                    qq, e4 = qq_m[i, j], eps4_m[i, j]
                    if (qq != 0.0 or e4 != 0.0) and not (has_cut and d2c >= rc2):
                        e, w = lj_coulomb(d2c, qq, sig2_m[i, j], e4, has_cut, k_rf, c_rf,
                                          has_sw, r_sw, r_c)
                        energy += e
                        if need_grad and d2 >= floor2:
                            w *= 2.0
                            g[i, 0] += w * dx
                            g[i, 1] += w * dy
                            g[i, 2] += w * dz
                            g[j, 0] -= w * dx
                            g[j, 1] -= w * dy
                            g[j, 2] -= w * dz
                if has_gb:
                    d2s[i, j] = d2
                    d2s[j, i] = d2
                    if gcut and d2 > grc2:
                        continue
                    r = math.sqrt(d2c)
                    inv_r = 1.0 / r
                    live = need_grad and d2 >= floor2
                    h, d = hct(r, inv_r, grho[i], gsr[j], inside, live)
                    integral[i] += h
                    dh[i, j] = d * inv_r          # dh/dr / r: the factor of (x_i - x_j) later
                    h, d = hct(r, inv_r, grho[j], gsr[i], inside, live)
                    integral[j] += h
                    dh[j, i] = d * inv_r
        if has_gb:
            born = np.empty(n)
            dborn = np.empty(n)
            for i in range(n):
                rho = grho[i]
                radius = rho + offset
                psi = integral[i] * rho
                th = math.tanh(psi * (alpha + psi * (-beta + gamma * psi)))
                born[i] = 1.0 / (1.0 / rho - th / radius)
                dpoly = alpha + psi * (-2.0 * beta + 3.0 * gamma * psi)
                dborn[i] = born[i] * born[i] * (1.0 - th * th) * dpoly * rho / radius   # dB/dI
            dedb = np.zeros(n)
            shift = 1.0 / grc if gcut else 0.0
            for i in range(n):
                bi = born[i]
                # self energy: the diagonal, f = B_i
                fac = pref
                dfac = 0.0
                if kappa > 0.0:
                    ek = math.exp(-kappa * bi)
                    fac = -ke * (iein - ek * ieout)
                    dfac = -ke * kappa * ek * ieout
                qi2 = gq[i] * gq[i]
                energy += 0.5 * qi2 * fac / bi
                dedb[i] += 0.5 * qi2 * (dfac / bi - fac / (bi * bi))
                if has_ace:
                    radius = grho[i] + offset
                    ace = ace_c * (radius + probe) ** 2 * (radius / bi) ** 6
                    energy += ace
                    dedb[i] -= 6.0 * ace / bi
                for j in range(i + 1, n):
                    d2 = d2s[i, j]
                    if gcut and d2 > grc2:
                        continue
                    u = bi * born[j]
                    ex = math.exp(-0.25 * d2 / u)
                    inv_f = 1.0 / math.sqrt(d2 + u * ex)
                    core = inv_f - shift
                    fac = pref
                    dfac = 0.0
                    if kappa > 0.0:
                        ek = math.exp(-kappa / inv_f)
                        fac = -ke * (iein - ek * ieout)
                        dfac = -ke * kappa * ek * ieout
                    qq = gq[i] * gq[j]
                    energy += qq * fac * core
                    if need_grad:
                        de_df2 = qq * (-fac * inv_f * inv_f + dfac * core) * 0.5 * inv_f
                        de_du = de_df2 * ex * (1.0 + 0.25 * d2 / u)
                        dedb[i] += de_du * born[j]
                        dedb[j] += de_du * bi
                        d2s[i, j] = 2.0 * de_df2 * (1.0 - 0.25 * ex)   # reuse: now dE/dd2 * 2
            if need_grad:
                for i in range(n):
                    dedi_i = dedb[i] * dborn[i]
                    for j in range(i + 1, n):
                        dx, dy, dz = x[i, 0] - x[j, 0], x[i, 1] - x[j, 1], x[i, 2] - x[j, 2]
                        d2 = dx * dx + dy * dy + dz * dz
                        w = 0.0
                        if not (gcut and d2 > grc2):
                            w = d2s[i, j] + dedi_i * dh[i, j] + dedb[j] * dborn[j] * dh[j, i]
                        if w != 0.0:
                            g[i, 0] += w * dx
                            g[i, 1] += w * dy
                            g[i, 2] += w * dz
                            g[j, 0] -= w * dx
                            g[j, 1] -= w * dy
                            g[j, 2] -= w * dz
        return energy

    @njit(cache=True, parallel=True)
    def batch_parallel(x, out_e, out_g, need_grad, floor2, b_idx, b_par, a_idx, a_par, t_idx,
                       t_par, qq_m, sig2_m, eps4_m, nbo, e_idx, e_par, gq, grho, gsr, gbo):
        for k in prange(x.shape[0]):
            out_e[k] = one(x[k], out_g[k], need_grad, floor2, b_idx, b_par, a_idx, a_par,
                           t_idx, t_par, qq_m, sig2_m, eps4_m, nbo, e_idx, e_par, gq, grho, gsr, gbo)

    @njit(cache=True)
    def batch_serial(x, out_e, out_g, need_grad, floor2, b_idx, b_par, a_idx, a_par, t_idx,
                     t_par, qq_m, sig2_m, eps4_m, nbo, e_idx, e_par, gq, grho, gsr, gbo):
        for k in range(x.shape[0]):
            out_e[k] = one(x[k], out_g[k], need_grad, floor2, b_idx, b_par, a_idx, a_par,
                           t_idx, t_par, qq_m, sig2_m, eps4_m, nbo, e_idx, e_par, gq, grho, gsr, gbo)

    _NUMBA_KERNEL = (batch_serial, batch_parallel)
    return _NUMBA_KERNEL


class _NumbaParams:
    """The force field's parameters as float64/int64 numpy arrays for the compiled kernel."""

    def __init__(self, ff: "TorchForceField"):
        n = ff.n_atoms

        def arr(t, shape=None, dtype=np.float64):
            a = np.ascontiguousarray(t.detach().cpu().numpy(), dtype=dtype)
            return a.reshape(shape) if shape is not None else a

        z2, z3, z4 = np.zeros((0, 2), np.int64), np.zeros((0, 3), np.int64), np.zeros((0, 4), np.int64)
        self.b_idx, self.b_par = z2, np.zeros((0, 2))
        self.a_idx, self.a_par = z3, np.zeros((0, 2))
        self.t_idx, self.t_par = z4, np.zeros((0, 3))
        bonds = [t for t in ff.terms if isinstance(t, HarmonicBonds)]
        angles = [t for t in ff.terms if isinstance(t, HarmonicAngles)]
        tors = [t for t in ff.terms if isinstance(t, PeriodicTorsions)]
        if bonds:
            self.b_idx = np.concatenate([arr(t.idx, (-1, 2), np.int64) for t in bonds])
            self.b_par = np.concatenate([np.stack([arr(t.r0), arr(t.k)], 1) for t in bonds])
        if angles:
            self.a_idx = np.concatenate([arr(t.idx, (-1, 3), np.int64) for t in angles])
            self.a_par = np.concatenate([np.stack([arr(t.theta0), arr(t.k)], 1) for t in angles])
        if tors:
            self.t_idx = np.concatenate([arr(t.idx, (-1, 4), np.int64) for t in tors])
            self.t_par = np.concatenate([np.stack([arr(t.n), arr(t.phase), arr(t.k)], 1) for t in tors])
        nb, gb = ff._nb, ff._gb
        self.qq_m = self.sig2_m = self.eps4_m = np.zeros((n, n))
        self.nbo = np.zeros(8)
        self.e_idx, self.e_par = z2, np.zeros((0, 3))
        if nb is not None:
            self.qq_m, self.sig2_m, self.eps4_m = arr(nb.qq_m), arr(nb.sig2_m), arr(nb.eps4_m)
            cut = nb.cutoff is not None
            sw = nb.switch
            self.nbo = np.array([1.0, float(cut), nb.cutoff**2 if cut else 0.0,
                                 nb.k_rf or 0.0, nb.c_rf or 0.0, float(sw is not None),
                                 sw[0] if sw else 0.0, sw[1] if sw else 0.0])
            self.e_idx = arr(nb.ex_pairs, (-1, 2), np.int64)
            self.e_par = np.stack([arr(nb.ex_qq), arr(nb.ex_sig2), arr(nb.ex_eps4)], 1).reshape(-1, 3)
        self.gq = self.grho = self.gsr = np.ones(n)
        self.gbo = np.zeros(16)
        if gb is not None:
            self.gq, self.grho, self.gsr = arr(gb.q), arr(gb.rho), arr(gb.sr)
            self.gbo = np.array([1.0, gb.offset, gb.alpha, gb.beta, gb.gamma, gb.ke, gb.inv_eps_in,
                                 gb.inv_eps_out, gb.prefactor, float(gb.ace is not None),
                                 gb.ace or 0.0, gb.probe, float(gb.cutoff is not None),
                                 gb.cutoff or 0.0, gb.kappa, float(gb.inside_term)])

    def args(self):
        return (self.b_idx, self.b_par, self.a_idx, self.a_par, self.t_idx, self.t_par,
                self.qq_m, self.sig2_m, self.eps4_m, self.nbo, self.e_idx, self.e_par,
                self.gq, self.grho, self.gsr, self.gbo)


class _NumbaEnergy(torch.autograd.Function):
    """U(x) from the compiled CPU kernel; the gradient comes from the same call (first order)."""

    @staticmethod
    def forward(ctx, x, kernel, params, floor):
        need = bool(ctx.needs_input_grad[0])
        xn = np.ascontiguousarray(x.detach().numpy(), dtype=np.float64)
        out_e = np.empty(xn.shape[0])
        out_g = np.empty_like(xn) if need else np.empty((xn.shape[0], 0, 3))
        import numba

        threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        serial, parallel = kernel
        if threads == 1 or xn.shape[0] < 8 * threads:     # no thread-pool launch for small work
            serial(xn, out_e, out_g, need, floor * floor, *params.args())
        else:
            with _NUMBA_LOCK:   # numba's default threading layer is not re-entrant
                numba.set_num_threads(threads)
                parallel(xn, out_e, out_g, need, floor * floor, *params.args())
        if need:
            ctx.save_for_backward(torch.from_numpy(out_g).to(x.dtype))
        return torch.from_numpy(out_e).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_energy):
        (grad,) = ctx.saved_tensors
        return grad_energy[:, None, None] * grad, None, None, None


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

    def __init__(self, terms: list[nn.Module], n_atoms: int, min_distance: float | None = None,
                 max_pairs_per_chunk: int | None = None, engine: str = "auto"):
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
    def from_openmm(cls, system, temperature: float | None = None, **kwargs) -> "TorchForceField":
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
                    force, (openmm.NonbondedForce, openmm.CustomGBForce, openmm.GBSAOBCForce)):
                raise UnsupportedForceError(
                    f"{type(force).__name__} uses periodic boundary conditions, not supported"
                )
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
        self._numba_params = None        # parameters may change with .to(); rebuilt lazily
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"n_atoms={self.n_atoms}, engine={self.engine!r}"
