r"""A batched, differentiable torch copy of an OpenMM System's potential energy.

:class:`TorchForceField` reads every parameter out of an ``openmm.System`` and evaluates the
potential energy :math:`U(x)` (kJ/mol) of a whole batch ``x`` of shape ``(B, n_atoms, 3)``
(nm) at once, on CPU or GPU, in float32 or float64; forces :math:`-\nabla U` come from
autograd. In float64 it reproduces OpenMM's Reference platform to ~1e-9 relative precision.
``log_prob = -U/kT`` is the Boltzmann log-density the samplers use.

Terms (OpenMM's definitions, see the OpenMM user guide, "Standard Forces"):

* ``HarmonicBondForce``   :math:`\tfrac12 k (r-r_0)^2`
* ``HarmonicAngleForce``  :math:`\tfrac12 k (\theta-\theta_0)^2`
* ``PeriodicTorsionForce`` :math:`k\,(1+\cos(n\phi-\phi_0))`
* ``NonbondedForce`` :math:`\sum_{i<j}\ 4\epsilon_{ij}[(\sigma_{ij}/r)^{12}-(\sigma_{ij}/r)^6]
  + k_e q_iq_j/r` over all pairs but the excluded ones (Lorentz-Berthelot mixing), plus the
  exceptions (1-4 pairs, scaled) with their own parameters and no cutoff. With
  ``CutoffNonPeriodic`` the Coulomb term becomes the reaction field
  :math:`k_e q_iq_j(1/r + k_{rf} r^2 - c_{rf})`, :math:`k_{rf} = r_c^{-3}(\epsilon-1)/(2\epsilon+1)`,
  :math:`c_{rf} = r_c^{-1}\, 3\epsilon/(2\epsilon+1)`, and pairs beyond :math:`r_c` are dropped.
* Generalized Born, OBC model (Onufriev, Bashford & Case, Proteins 2004), either as
  ``GBSAOBCForce`` or as the ``CustomGBForce`` that amber14's ``implicit/obc1.xml`` and
  ``obc2.xml`` and AMBER prmtop files (``igb=2``/``igb=5``) create. Born radii
  :math:`B_i = 1/(1/\rho_i - \tanh(\alpha\psi_i-\beta\psi_i^2+\gamma\psi_i^3)/R_i)` with
  :math:`\psi_i = \rho_i I_i`, :math:`I_i` the HCT pair integral (Hawkins, Cramer & Truhlar
  1996), :math:`\rho_i = R_i - 0.009` nm; polar energy
  :math:`-\tfrac{k_e}{2}(1/\epsilon_{in}-1/\epsilon_{out})\sum_{i,j} q_iq_j/f_{ij}`,
  :math:`f_{ij}=\sqrt{r_{ij}^2 + B_iB_j e^{-r_{ij}^2/4B_iB_j}}` (Still et al. 1990), and the
  ACE surface term :math:`28.39\,(R_i+0.14)^2 (R_i/B_i)^6` (Schaefer, Bartels & Karplus 1998).
* ``CMMotionRemover`` contributes no energy. Any other force raises an error naming it.

Custom forces are never interpreted generically: a ``CustomGBForce`` is accepted only when its
per-particle parameters, computed values and energy terms are the OBC1/OBC2 expressions
OpenMM's ``openmm.app.internal.customgbforces`` generates (constants are read out of them).

Clashes: distances in the nonbonded and GB terms are floored at ``min_distance`` (1e-4 nm in
float64, 1e-2 nm in float32, where LJ walls already exceed 1e15 kJ/mol), so overlapping atoms
give huge finite energies and finite forces, never NaN; square roots and ``atan2`` are guarded
so autograd never sees a singular branch ("double where"). :func:`linlogcut` is the separate,
optional soft regularization used to train Boltzmann generators (Noé et al., Science 2019).

Memory: the GB term uses dense ``(B, n, n)`` pair matrices (fine for peptides of 20-150 atoms);
batches are evaluated in chunks of at most ``max_pairs_per_chunk`` pair entries.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "TorchForceField",
    "UnsupportedForceError",
    "linlogcut",
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


def linlogcut(energy: Tensor, high: float = 1e3, max: float = 1e9) -> Tensor:
    r"""Soft energy regularization of Boltzmann-generator training (Noé et al. 2019, bgflow).

    :math:`u \mapsto u` for :math:`u < h`, :math:`h + \log(1 + u - h)` above it, after capping
    at ``max``: unchanged in the physical range, logarithmic in clashes, so that gradients of
    clashing samples stay bounded. Not the exact energy: never use it for importance weights
    unless the target is defined with it. Double where keeps gradients finite for ``inf``.
    """
    e = torch.nan_to_num(energy, nan=max, posinf=max)
    e = torch.minimum(e, torch.full_like(e, max))
    above = e > high
    safe = torch.where(above, e, torch.full_like(e, high))
    return torch.where(above, high + torch.log1p(safe - high), e)


# --------------------------------------------------------------------------------------------
# bonded terms


class HarmonicBonds(nn.Module):
    r""":math:`U = \sum_b \tfrac12 k_b (r_b - r_{0,b})^2` (OpenMM ``HarmonicBondForce``)."""

    name = "HarmonicBondForce"

    def __init__(self, force):
        super().__init__()
        rows = [force.getBondParameters(i) for i in range(force.getNumBonds())]
        self.register_buffer("idx", torch.tensor([[r[0], r[1]] for r in rows], dtype=torch.long).reshape(-1, 2))
        self.register_buffer("r0", torch.tensor([r[2]._value for r in rows], dtype=torch.float64))
        self.register_buffer("k", torch.tensor([r[3]._value for r in rows], dtype=torch.float64))

    def forward(self, x: Tensor, geo: "_Geometry") -> Tensor:
        if self.idx.numel() == 0:
            return x.new_zeros(x.shape[0])
        d = x[:, self.idx[:, 1]] - x[:, self.idx[:, 0]]
        r = _safe_sqrt(d.square().sum(-1), 1e-24)
        return (0.5 * self.k.to(x) * (r - self.r0.to(x)).square()).sum(-1)


class HarmonicAngles(nn.Module):
    r""":math:`U = \sum_a \tfrac12 k_a (\theta_a - \theta_{0,a})^2` (``HarmonicAngleForce``)."""

    name = "HarmonicAngleForce"

    def __init__(self, force):
        super().__init__()
        rows = [force.getAngleParameters(i) for i in range(force.getNumAngles())]
        self.register_buffer("idx", torch.tensor([r[:3] for r in rows], dtype=torch.long).reshape(-1, 3))
        self.register_buffer("theta0", torch.tensor([r[3]._value for r in rows], dtype=torch.float64))
        self.register_buffer("k", torch.tensor([r[4]._value for r in rows], dtype=torch.float64))

    def forward(self, x: Tensor, geo: "_Geometry") -> Tensor:
        if self.idx.numel() == 0:
            return x.new_zeros(x.shape[0])
        u = x[:, self.idx[:, 0]] - x[:, self.idx[:, 1]]
        v = x[:, self.idx[:, 2]] - x[:, self.idx[:, 1]]
        cross = _safe_sqrt(torch.linalg.cross(u, v).square().sum(-1), 1e-36)
        theta = _safe_atan2(cross, (u * v).sum(-1))
        return (0.5 * self.k.to(x) * (theta - self.theta0.to(x)).square()).sum(-1)


class PeriodicTorsions(nn.Module):
    r""":math:`U = \sum_t k_t (1 + \cos(n_t\phi_t - \phi_{0,t}))` (``PeriodicTorsionForce``).

    :math:`\phi` is the IUPAC dihedral (trans = π) of atoms 1-2-3-4, as OpenMM computes it.
    """

    name = "PeriodicTorsionForce"

    def __init__(self, force):
        super().__init__()
        rows = [force.getTorsionParameters(i) for i in range(force.getNumTorsions())]
        self.register_buffer("idx", torch.tensor([r[:4] for r in rows], dtype=torch.long).reshape(-1, 4))
        self.register_buffer("n", torch.tensor([float(r[4]) for r in rows], dtype=torch.float64))
        self.register_buffer("phase", torch.tensor([r[5]._value for r in rows], dtype=torch.float64))
        self.register_buffer("k", torch.tensor([r[6]._value for r in rows], dtype=torch.float64))

    def forward(self, x: Tensor, geo: "_Geometry") -> Tensor:
        if self.idx.numel() == 0:
            return x.new_zeros(x.shape[0])
        phi = dihedral(x, self.idx)
        arg = self.n.to(x) * phi - self.phase.to(x)
        return (self.k.to(x) * (1.0 + torch.cos(arg))).sum(-1)


def dihedral(x: Tensor, idx: Tensor) -> Tensor:
    r"""IUPAC dihedral angles in :math:`(-\pi, \pi]` for quadruplets ``idx`` (T, 4): (B, T).

    :math:`\phi = \operatorname{atan2}(|b_2|\, b_1\cdot(b_2\times b_3),\ (b_1\times b_2)\cdot(b_2\times b_3))`
    with :math:`b_k = x_{k} - x_{k-1}` (Blondel & Karplus 1996); NaN-free at collinear atoms.
    """
    b1 = x[:, idx[:, 1]] - x[:, idx[:, 0]]
    b2 = x[:, idx[:, 2]] - x[:, idx[:, 1]]
    b3 = x[:, idx[:, 3]] - x[:, idx[:, 2]]
    n1 = torch.linalg.cross(b1, b2)
    n2 = torch.linalg.cross(b2, b3)
    b2n = _safe_sqrt(b2.square().sum(-1), 1e-36)
    y = b2n * (b1 * n2).sum(-1)
    xx = (n1 * n2).sum(-1)
    return _safe_atan2(y, xx)


# --------------------------------------------------------------------------------------------
# nonbonded


class _Geometry:
    """Per-batch pair geometry shared by the nonbonded and GB terms (dense when GB needs it)."""

    def __init__(self, x: Tensor, dense: bool, floor: float):
        self.x = x
        self.floor2 = floor * floor
        self.d2_dense = None
        if dense:
            diff = x[:, :, None, :] - x[:, None, :, :]
            self.d2_dense = diff.square().sum(-1)  # (B, n, n), exactly 0 on the diagonal

    def pair_d2(self, i: Tensor, j: Tensor) -> Tensor:
        if self.d2_dense is not None:
            n = self.x.shape[1]
            return self.d2_dense.reshape(self.x.shape[0], n * n)[:, i * n + j]
        return (self.x[:, j] - self.x[:, i]).square().sum(-1)


class Nonbonded(nn.Module):
    r"""OpenMM ``NonbondedForce`` with NoCutoff or CutoffNonPeriodic (reaction field).

    Regular pairs :math:`i<j` (all but the exceptions): LJ with Lorentz-Berthelot mixing
    :math:`\sigma_{ij}=(\sigma_i+\sigma_j)/2`, :math:`\epsilon_{ij}=\sqrt{\epsilon_i\epsilon_j}`
    and Coulomb :math:`k_e q_iq_j/r`, or within the cutoff the reaction field
    :math:`k_e q_iq_j(1/r + k_{rf}r^2 - c_{rf})` and (optionally) OpenMM's LJ switching function.
    Exceptions: :math:`k_e\,\mathrm{chargeProd}/r + 4\epsilon[(\sigma/r)^{12}-(\sigma/r)^6]`,
    never cut off and without reaction field.
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
        q = np.zeros(n)
        sig = np.zeros(n)
        eps = np.zeros(n)
        for i in range(n):
            c, s, e = force.getParticleParameters(i)
            q[i], sig[i], eps[i] = c._value, s._value, e._value
        excluded = set()
        ex_rows = []
        for k in range(force.getNumExceptions()):
            a, b, qq, s, e = force.getExceptionParameters(k)
            excluded.add((min(a, b), max(a, b)))
            if qq._value != 0.0 or e._value != 0.0:
                ex_rows.append((a, b, qq._value, s._value, e._value))
        ii, jj = np.triu_indices(n, 1)
        keep = np.array([(a, b) not in excluded for a, b in zip(ii, jj)], dtype=bool) \
            if excluded else np.ones(len(ii), dtype=bool)
        ii, jj = ii[keep], jj[keep]
        qq = q[ii] * q[jj]
        s_ij = 0.5 * (sig[ii] + sig[jj])
        e_ij = np.sqrt(eps[ii] * eps[jj])
        nz = (qq != 0.0) | (e_ij != 0.0)
        ii, jj, qq, s_ij, e_ij = ii[nz], jj[nz], qq[nz], s_ij[nz], e_ij[nz]
        self.register_buffer("i", torch.as_tensor(ii, dtype=torch.long))
        self.register_buffer("j", torch.as_tensor(jj, dtype=torch.long))
        self.register_buffer("qq", torch.as_tensor(ONE_4PI_EPS0 * qq, dtype=torch.float64))
        self.register_buffer("sig2", torch.as_tensor(s_ij**2, dtype=torch.float64))
        self.register_buffer("eps4", torch.as_tensor(4.0 * e_ij, dtype=torch.float64))
        ex = np.array(ex_rows, dtype=np.float64).reshape(-1, 5)
        self.register_buffer("ex_i", torch.as_tensor(ex[:, 0], dtype=torch.long))
        self.register_buffer("ex_j", torch.as_tensor(ex[:, 1], dtype=torch.long))
        self.register_buffer("ex_qq", torch.as_tensor(ONE_4PI_EPS0 * ex[:, 2]))
        self.register_buffer("ex_sig2", torch.as_tensor(ex[:, 3] ** 2))
        self.register_buffer("ex_eps4", torch.as_tensor(4.0 * ex[:, 4]))
        self.register_buffer("flat", self.i * n + self.j)          # into a flattened (n, n)
        self.register_buffer("ex_flat", self.ex_i * n + self.ex_j)
        self.cutoff = None if method == openmm.NonbondedForce.NoCutoff \
            else float(force.getCutoffDistance()._value)
        self.switch = None
        if self.cutoff is not None:
            erf = float(force.getReactionFieldDielectric())
            self.k_rf = (erf - 1.0) / (2.0 * erf + 1.0) / self.cutoff**3
            self.c_rf = 3.0 * erf / (2.0 * erf + 1.0) / self.cutoff
            if force.getUseSwitchingFunction():
                self.switch = float(force.getSwitchingDistance()._value)

    def forward(self, x: Tensor, geo: _Geometry) -> Tensor:
        out = x.new_zeros(x.shape[0])
        if self.i.numel():
            d2 = torch.clamp(geo.pair_d2(self.i, self.j), min=geo.floor2)
            inv2 = 1.0 / d2
            s6 = (self.sig2.to(x) * inv2) ** 3
            lj = self.eps4.to(x) * s6 * (s6 - 1.0)
            inv_r = torch.sqrt(inv2)
            qq = self.qq.to(x)
            if self.cutoff is None:
                e = lj + qq * inv_r
            else:
                coul = qq * (inv_r + self.k_rf * d2 - self.c_rf)
                if self.switch is not None:
                    r = d2 * inv_r
                    t = torch.clamp((r - self.switch) / (self.cutoff - self.switch), 0.0, 1.0)
                    lj = lj * (1.0 + t**3 * (-10.0 + t * (15.0 - 6.0 * t)))
                e = torch.where(d2 < self.cutoff**2, lj + coul, torch.zeros_like(d2))
            out = out + e.sum(-1)
        if self.ex_i.numel():
            d2 = torch.clamp(geo.pair_d2(self.ex_i, self.ex_j), min=geo.floor2)
            inv2 = 1.0 / d2
            s6 = (self.ex_sig2.to(x) * inv2) ** 3
            e = self.ex_eps4.to(x) * s6 * (s6 - 1.0) + self.ex_qq.to(x) * torch.sqrt(inv2)
            out = out + e.sum(-1)
        return out


    def energy_grad_d2(self, d2_flat: Tensor, floor2: float, need_grad: bool):
        """Energy (B,) and, if asked, ``dU/d(r_ij^2)`` scattered into a flat (B, n*n) matrix.

        The analytic twin of :meth:`forward` used by the fused path (same formulas).
        """
        B = d2_flat.shape[0]
        x = d2_flat
        energy = x.new_zeros(B)
        w_flat = x.new_zeros(d2_flat.shape) if need_grad else None
        for flat, qq_, sig2_, eps4_, regular in (
            (self.flat, self.qq, self.sig2, self.eps4, True),
            (self.ex_flat, self.ex_qq, self.ex_sig2, self.ex_eps4, False),
        ):
            if flat.numel() == 0:
                continue
            raw = d2_flat[:, flat]
            d2 = torch.clamp(raw, min=floor2)
            inv2 = 1.0 / d2
            s6 = (sig2_.to(x) * inv2) ** 3
            eps4 = eps4_.to(x)
            lj = eps4 * s6 * (s6 - 1.0)
            inv_r = torch.sqrt(inv2)
            qq = qq_.to(x)
            cut = regular and self.cutoff is not None
            if cut:
                coul = qq * (inv_r + self.k_rf * d2 - self.c_rf)
            else:
                coul = qq * inv_r
            if need_grad:
                dlj = -3.0 * eps4 * s6 * (2.0 * s6 - 1.0) * inv2
                dcoul = -0.5 * qq * inv_r * inv2
                if cut:
                    dcoul = dcoul + qq * self.k_rf
            if cut and self.switch is not None:
                r = d2 * inv_r
                width = self.cutoff - self.switch
                t = torch.clamp((r - self.switch) / width, 0.0, 1.0)
                sw = 1.0 + t**3 * (-10.0 + t * (15.0 - 6.0 * t))
                if need_grad:
                    dsw = -30.0 * t.square() * (1.0 - t).square() / width * 0.5 * inv_r
                    dlj = dlj * sw + lj * dsw
                lj = lj * sw
            e = lj + coul
            if need_grad:
                w = (dlj + dcoul) * (raw >= floor2)
            if cut:
                inside = d2 < self.cutoff**2
                e = torch.where(inside, e, torch.zeros_like(e))
                if need_grad:
                    w = torch.where(inside, w, torch.zeros_like(w))
            energy = energy + e.sum(-1)
            if need_grad:
                w_flat.index_add_(1, flat, w)
        return energy, w_flat


# --------------------------------------------------------------------------------------------
# generalized Born (OBC)


class OBCGeneralizedBorn(nn.Module):
    r"""OBC generalized Born with the ACE surface-area term, dense over all atom pairs.

    Born radii (Onufriev, Bashford & Case 2004):
    :math:`I_i = \sum_{j\ne i} \tfrac12\big[\tfrac1L - \tfrac1U + \tfrac14(r-\tfrac{s_j^2}{r})
    (\tfrac1{U^2}-\tfrac1{L^2}) + \tfrac{1}{2r}\log\tfrac LU\big]` for :math:`r + s_j \ge \rho_i`,
    :math:`U = r+s_j`, :math:`L=\max(\rho_i, |r-s_j|)`, :math:`s_j` the scaled offset radius;
    :math:`B_i = 1/(1/\rho_i - \tanh(\alpha\psi-\beta\psi^2+\gamma\psi^3)/R_i)`, :math:`\psi=\rho_iI_i`.
    ``GBSAOBCForce`` also adds :math:`2(1/\rho_i - 1/L)` when atom i lies inside the
    descreening sphere of j (Tinker's correction), the CustomGBForce versions do not.
    Energy: :math:`\tfrac12 p\sum_{i,j} q_iq_j (1/f_{ij} - [i\ne j]/r_c) + \sum_i
    a\,(R_i+0.14)^2(R_i/B_i)^6`, :math:`p = -k_e(1/\epsilon_{in}-1/\epsilon_{out})`; the diagonal
    :math:`f_{ii}=B_i` is the self energy. With a cutoff, pairs beyond it drop out of
    :math:`I_i` and of the pair sum.
    """

    name = "GB"

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
        # p = -k_e (1/eps_in - 1/eps_out); GBSAOBCForce switches GB off when a dielectric is 0
        self.prefactor = -self.ke * (self.inv_eps_in - self.inv_eps_out) if eps_in and eps_out else 0.0
        self.ace = None if ace is None else float(ace)
        self.probe = float(probe)
        self.cutoff = None if cutoff is None else float(cutoff)
        self.kappa = float(kappa)
        self.inside_term = bool(inside_term)

    def born_radii(self, geo: _Geometry) -> Tensor:
        """Born radii :math:`B_i` (nm), shape (B, n)."""
        x = geo.x
        n = x.shape[1]
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        d2 = geo.d2_dense
        r = _safe_sqrt(torch.where(eye, torch.ones_like(d2), d2), geo.floor2)
        rho_i = self.rho.to(x)[:, None]               # (n, 1): the atom being descreened
        s_j = self.sr.to(x)[None, :]                  # (1, n): the descreening atom
        U = r + s_j
        L = torch.maximum(rho_i.expand_as(r), (r - s_j).abs())
        inv_l, inv_u = 1.0 / L, 1.0 / U
        inv_r = 1.0 / r
        term = 0.5 * (inv_l - inv_u + 0.25 * (r - s_j.square() * inv_r) * (inv_u.square() - inv_l.square())
                      + 0.5 * torch.log(L * inv_u) * inv_r)
        if self.inside_term:
            term = term + torch.where(rho_i < s_j - r, 1.0 / rho_i - inv_l, torch.zeros_like(r))
        keep = (U >= rho_i) & ~eye
        if self.cutoff is not None:
            keep = keep & (d2 <= self.cutoff**2)
        integral = torch.where(keep, term, torch.zeros_like(term)).sum(-1)    # I_i, (B, n)
        rho = self.rho.to(x)
        psi = integral * rho
        poly = psi * (self.alpha + psi * (-self.beta + self.gamma * psi))
        radius = rho + self.offset
        return 1.0 / (1.0 / rho - torch.tanh(poly) / radius)

    def forward(self, x: Tensor, geo: _Geometry) -> Tensor:
        born = self.born_radii(geo)                                       # (B, n)
        q = self.q.to(x)
        d2 = geo.d2_dense
        bb = born[:, :, None] * born[:, None, :]
        f = torch.sqrt(d2 + bb * torch.exp(-0.25 * d2 / bb))             # f_ii = B_i
        if self.kappa > 0.0:   # Debye screening: -k_e (1/eps_in - exp(-kappa f)/eps_out)
            factor = -self.ke * (self.inv_eps_in - torch.exp(-self.kappa * f) * self.inv_eps_out)
        else:
            factor = self.prefactor
        inv_f = 1.0 / f
        if self.cutoff is None:
            g = factor * inv_f
        else:
            n = x.shape[1]
            eye = torch.eye(n, dtype=torch.bool, device=x.device)
            g = factor * (inv_f - torch.where(eye, torch.zeros_like(d2), torch.full_like(d2, 1.0 / self.cutoff)))
            g = torch.where(eye | (d2 <= self.cutoff**2), g, torch.zeros_like(g))
        e = 0.5 * torch.einsum("bij,i,j->b", g, q, q)
        if self.ace is not None:
            radius = self.rho.to(x) + self.offset
            e = e + (self.ace * (radius + self.probe).square() * (radius / born) ** 6).sum(-1)
        return e


    def energy_grad_d2(self, x: Tensor, d2: Tensor, floor2: float, need_grad: bool):
        """Energy (B,) and ``W_ij = dU/d(r_ij^2)`` (B, n, n), analytic (same formulas as forward).

        Chain rule through the Born radii: :math:`dU/dI_i = (dU/dB_i)(dB_i/dI_i)`,
        :math:`dB/dI = B^2(1-\tanh^2 P)P'(\psi)\rho/R`; :math:`dU/dB_i` collects the ACE term
        and :math:`\partial(u e^{-r^2/4u})/\partial u = e^{-r^2/4u}(1 + r^2/4u)`, :math:`u=B_iB_j`.
        """
        n = x.shape[1]
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        raw = torch.where(eye, torch.ones_like(d2), d2)
        r = torch.sqrt(torch.clamp(raw, min=floor2))
        inv_r = 1.0 / r
        rho_i = self.rho.to(x)[:, None]
        s_j = self.sr.to(x)[None, :]
        U = r + s_j
        inv_u = 1.0 / U
        rms = r - s_j
        use_d = rms.abs() > rho_i
        L = torch.where(use_d, rms.abs(), rho_i)
        inv_l = 1.0 / L
        log_lu = torch.log(L * inv_u)
        a2 = inv_l.square()
        b2 = inv_u.square()
        t1 = r - s_j.square() * inv_r
        h = 0.5 * (inv_l - inv_u + 0.25 * t1 * (b2 - a2) + 0.5 * log_lu * inv_r)
        keep = (U >= rho_i) & ~eye
        if self.cutoff is not None:
            keep = keep & (d2 <= self.cutoff**2)
        if self.inside_term:
            ins = rho_i < s_j - r
            h = h + torch.where(ins, 1.0 / rho_i - inv_l, torch.zeros_like(h))
        integral = torch.where(keep, h, torch.zeros_like(h)).sum(-1)
        rho = self.rho.to(x)
        radius = rho + self.offset
        psi = integral * rho
        poly = psi * (self.alpha + psi * (-self.beta + self.gamma * psi))
        th = torch.tanh(poly)
        born = 1.0 / (1.0 / rho - th / radius)
        # polar energy, dense with the self term on the diagonal
        q = self.q.to(x)
        qq = q[:, None] * q[None, :]
        u = born[:, :, None] * born[:, None, :]
        ex = torch.exp(-0.25 * d2 / u)
        f = torch.sqrt(d2 + u * ex)
        inv_f = 1.0 / f
        if self.cutoff is not None:
            sh = torch.where(eye, torch.zeros_like(d2), torch.full_like(d2, 1.0 / self.cutoff))
            pair_in = eye | (d2 <= self.cutoff**2)
            core = inv_f - sh
        else:
            core = inv_f
        if self.kappa > 0.0:
            ek = torch.exp(-self.kappa * f)
            factor = -self.ke * (self.inv_eps_in - ek * self.inv_eps_out)
        else:
            factor = self.prefactor
        g = factor * core
        if self.cutoff is not None:
            g = torch.where(pair_in, g, torch.zeros_like(g))
        energy = 0.5 * (g * qq).sum((-1, -2))
        ace = None
        if self.ace is not None:
            ace = self.ace * (radius + self.probe).square() * (radius / born) ** 6
            energy = energy + ace.sum(-1)
        if not need_grad:
            return energy, None
        # dg/d(f^2)
        dg_df = -factor * inv_f.square()
        if self.kappa > 0.0:
            dg_df = dg_df + (-self.ke * self.kappa * ek * self.inv_eps_out) * core
        G = 0.5 * qq * dg_df * 0.5 * inv_f
        if self.cutoff is not None:
            G = torch.where(pair_in, G, torch.zeros_like(G))
        w = G * (1.0 - 0.25 * ex)                                          # direct, symmetric
        dE_dB = 2.0 * torch.einsum("bij,bj->bi", G * ex * (1.0 + 0.25 * d2 / u), born)
        if ace is not None:
            dE_dB = dE_dB - 6.0 * ace / born
        dpoly = self.alpha + psi * (-2.0 * self.beta + 3.0 * self.gamma * psi)
        dE_dI = dE_dB * born.square() * (1.0 - th.square()) * dpoly * rho / radius
        # dh/dr
        lp = torch.where(use_d, torch.sign(rms), torch.zeros_like(rms))
        dh = 0.5 * (-a2 * lp + b2 + 0.25 * (1.0 + s_j.square() * inv_r.square()) * (b2 - a2)
                    + 0.5 * t1 * (a2 * inv_l * lp - b2 * inv_u)
                    + 0.5 * (inv_l * lp - inv_u) * inv_r - 0.5 * log_lu * inv_r.square())
        if self.inside_term:
            dh = dh + torch.where(ins, a2 * lp, torch.zeros_like(dh))
        dh = torch.where(keep & (raw >= floor2), dh, torch.zeros_like(dh))
        w = w + dE_dI[:, :, None] * dh * 0.5 * inv_r
        return energy, w


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
    """Nonbonded + GB energy with the gradient computed alongside in the forward pass.

    Every pair term is a function of the squared distances :math:`d_{ij}=|x_i-x_j|^2`; with
    :math:`W_{ij}=\partial U/\partial d_{ij}` the gradient is
    :math:`\nabla_{x_k}U = 2\sum_j (W_{kj}+W_{jk})(x_k-x_j)`, one batched matrix product.
    First-order only (``once_differentiable``); the autograd path serves higher orders.
    """

    @staticmethod
    def forward(ctx, x, nb, gb, floor2):
        need = bool(ctx.needs_input_grad[0])
        B, n, _ = x.shape
        diff = x[:, :, None, :] - x[:, None, :, :]
        d2 = diff.square().sum(-1)
        energy = x.new_zeros(B)
        W = None
        if nb is not None:
            e, w = nb.energy_grad_d2(d2.reshape(B, n * n), floor2, need)
            energy = energy + e
            if need:
                W = w.view(B, n, n)
        if gb is not None:
            e, w = gb.energy_grad_d2(x, d2, floor2, need)
            energy = energy + e
            if need:
                W = w if W is None else W + w
        if need:
            S = W + W.transpose(1, 2)
            grad = 2.0 * torch.einsum("bij,bijc->bic", S, diff)
            ctx.save_for_backward(grad)
        return energy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_energy):
        (grad,) = ctx.saved_tensors
        return grad_energy[:, None, None] * grad, None, None, None


# --------------------------------------------------------------------------------------------


class TorchForceField(nn.Module):
    r"""Potential energy :math:`U(x)` (kJ/mol) of an OpenMM System, batched in torch.

    ``energy(x)`` for ``x`` of shape ``(B, n_atoms, 3)`` in nm returns ``(B,)``; ``forces(x)``
    returns :math:`-\nabla U` (kJ/mol/nm) by autograd; ``energy_components(x)`` gives each
    force's share. ``log_prob = -U/kT``. Parameters are float64 buffers cast to the input's
    dtype and device; ``.to(device)`` moves them once.
    """

    def __init__(self, terms: list[nn.Module], n_atoms: int, min_distance: float | None = None,
                 max_pairs_per_chunk: int = 1 << 22, analytic: bool = True):
        super().__init__()
        self.terms = nn.ModuleList(terms)
        self.n_atoms = int(n_atoms)
        self.min_distance = min_distance
        self.max_pairs_per_chunk = int(max_pairs_per_chunk)
        self.dense = any(isinstance(t, OBCGeneralizedBorn) for t in terms)
        self.analytic = bool(analytic)
        nbs = [t for t in terms if isinstance(t, Nonbonded)]
        gbs = [t for t in terms if isinstance(t, OBCGeneralizedBorn)]
        self._nb = nbs[0] if len(nbs) == 1 else None
        self._gb = gbs[0] if len(gbs) == 1 else None
        # the fused path covers one NonbondedForce and at most one GB force
        self._fusable = len(nbs) <= 1 and len(gbs) <= 1 and (nbs or gbs)

    @classmethod
    def from_openmm(cls, system, temperature: float | None = None, **kwargs) -> "TorchForceField":
        """Read every force of ``system``; raise :class:`UnsupportedForceError` naming others.

        ``temperature`` is accepted for symmetry with the peptide constructors and unused: the
        energy does not depend on it.
        """
        import openmm

        n = system.getNumParticles()
        for i in range(n):
            if system.isVirtualSite(i):
                raise UnsupportedForceError(f"virtual sites are not supported (particle {i})")
        terms: list[nn.Module] = []
        for force in system.getForces():
            if force.usesPeriodicBoundaryConditions():
                raise UnsupportedForceError(
                    f"{type(force).__name__} uses periodic boundary conditions, not supported"
                )
            if isinstance(force, openmm.CMMotionRemover):
                continue
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
                    "PeriodicTorsionForce, NonbondedForce, GBSAOBCForce, the OBC CustomGBForce "
                    "and CMMotionRemover"
                )
        return cls(terms, n, **kwargs)

    # ------------------------------------------------------------------------------------
    def _check(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (B, {self.n_atoms}, 3) in nm")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        return x

    def _chunk(self) -> int:
        per = self.n_atoms * self.n_atoms if self.dense else max(1, self.n_atoms * self.n_atoms // 2)
        return max(1, self.max_pairs_per_chunk // per)

    def _energy_terms(self, x: Tensor, fused: bool | None = None) -> list[Tensor]:
        floor = self.min_distance if self.min_distance is not None else _floor_for(x.dtype)
        fused = self.analytic and self._fusable if fused is None else fused
        if fused:
            geo = _Geometry(x, False, floor)
            out = [t(x, geo) for t in self.terms if not isinstance(t, (Nonbonded, OBCGeneralizedBorn))]
            out.append(_FusedPairs.apply(x, self._nb, self._gb, floor * floor))
            return out
        geo = _Geometry(x, self.dense, floor)
        return [t(x, geo) for t in self.terms]

    def energy(self, x: Tensor) -> Tensor:
        """:math:`U(x)` in kJ/mol, shape ``(B,)``; differentiable (``log_prob = -U/kT``)."""
        x = self._check(x)
        c = self._chunk()
        if x.shape[0] <= c:
            return torch.stack(self._energy_terms(x)).sum(0)
        return torch.cat([torch.stack(self._energy_terms(xc)).sum(0) for xc in x.split(c)])

    forward = energy

    def energy_components(self, x: Tensor) -> dict[str, Tensor]:
        """Each force's energy (kJ/mol), keyed by its OpenMM class name, shape ``(B,)`` each."""
        x = self._check(x)
        return {t.name: e for t, e in zip(self.terms, self._energy_terms(x, fused=False))}

    def energy_and_forces(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """:math:`U(x)` and :math:`F = -\\nabla_x U` (detached), chunked to bound memory."""
        x = self._check(x)
        es, fs = [], []
        for xc in x.detach().split(self._chunk()):
            with torch.enable_grad():
                xc = xc.requires_grad_(True)
                e = torch.stack(self._energy_terms(xc)).sum(0)
                (g,) = torch.autograd.grad(e.sum(), xc)
            es.append(e.detach())
            fs.append(-g)
        return torch.cat(es), torch.cat(fs)

    def forces(self, x: Tensor) -> Tensor:
        """:math:`F = -\\nabla_x U(x)` in kJ/mol/nm, same shape as ``x`` (autograd)."""
        return self.energy_and_forces(x)[1]

    def extra_repr(self) -> str:
        return f"n_atoms={self.n_atoms}"
