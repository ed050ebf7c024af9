r"""The torch energy terms of :class:`~mcsample.systems.forcefield.TorchForceField`.

Each OpenMM force becomes an ``nn.Module`` holding its parameters as float64 buffers and
returning the energy (kJ/mol) of a batch ``x`` (B, n_atoms, 3) in nm, shape (B,):

* bonded terms, by autograd: :class:`HarmonicBonds` :math:`\tfrac12 k(r-r_0)^2`,
  :class:`HarmonicAngles` :math:`\tfrac12 k(\theta-\theta_0)^2`, :class:`PeriodicTorsions`
  :math:`k(1+\cos(n\phi-\phi_0))` with the IUPAC :func:`dihedral`;
* pair terms, :class:`Nonbonded` (LJ + Coulomb or reaction field, plus the exceptions) and
  :class:`OBCGeneralizedBorn` (Onufriev, Bashford & Case 2004), which besides ``forward`` give
  ``dense_energy_grad(pairs, need_grad)``: the energy and :math:`W_{ij}=\partial U/\partial d_{ij}`,
  :math:`d_{ij}=|x_i-x_j|^2`, on the dense pair geometry :class:`_Pairs` that the fused engine
  (``_ff_fused``) shares between them.

Square roots and ``atan2`` are guarded ("double where") so that autograd never meets a
singular branch; pair distances are floored at the clash floor passed in.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

#: Coulomb constant k_e = 1/(4 pi eps0) in kJ nm / (mol e^2), OpenMM's value (NonbondedForce,
#: GBSAOBCForce); amber's CustomGBForce expressions carry their own 138.935485.
ONE_4PI_EPS0 = 138.93545764438198


class UnsupportedForceError(ValueError):
    """An OpenMM force (or a setting of one) that ``TorchForceField`` cannot reproduce.

    Public as :class:`mcsample.systems.forcefield.UnsupportedForceError`; defined here, where the
    term constructors that raise it live.
    """


# --------------------------------------------------------------------------------------------
# guarded geometry


def _safe_sqrt(v: Tensor, floor2: float) -> Tensor:
    """:math:`\\sqrt{\\max(v, f)}` with a finite gradient everywhere (zero below the floor)."""
    return torch.sqrt(torch.clamp(v, min=floor2))


def _safe_atan2(y: Tensor, x: Tensor) -> Tensor:
    """``atan2`` whose gradient is 0 instead of NaN at the singular point (0, 0) (double where)."""
    bad = (x.abs() + y.abs()) < 1e-30
    return torch.atan2(torch.where(bad, torch.zeros_like(y), y), torch.where(bad, torch.ones_like(x), x))


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """``x[:, idx]`` for an index array of any shape, by ``index_select`` (cheap backward)."""
    return torch.index_select(x, 1, idx.reshape(-1)).view(x.shape[0], *idx.shape, x.shape[-1])


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


def _lj_coulomb(
    d2: Tensor,
    inv2: Tensor,
    inv_r: Tensor,
    sig2: Tensor,
    eps4: Tensor,
    qq: Tensor,
    k_rf: float | None,
    c_rf: float | None,
    switch: tuple[float, float] | None,
    need_grad: bool,
):
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
    if switch is not None:  # OpenMM's LJ switch S(t) = 1 - 10t^3 + 15t^4 - 6t^5
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
            names = {0: "NoCutoff", 1: "CutoffNonPeriodic", 2: "CutoffPeriodic", 3: "Ewald", 4: "PME", 5: "LJPME"}
            raise UnsupportedForceError(
                f"NonbondedForce with nonbonded method {names.get(method, method)} is not "
                "supported: use NoCutoff or CutoffNonPeriodic (non-periodic peptides)"
            )
        if force.getNumParticleParameterOffsets() or force.getNumExceptionParameterOffsets():
            raise UnsupportedForceError(
                "NonbondedForce with parameter offsets (global-parameter-dependent charges or LJ) is not supported"
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
        for pairs, qq, sig2, eps4, regular in (
            (self.pairs, self.qq, self.sig2, self.eps4, True),
            (self.ex_pairs, self.ex_qq, self.ex_sig2, self.ex_eps4, False),
        ):
            if pairs.numel() == 0:
                continue
            p = _gather(x, pairs)
            d2 = torch.clamp((p[:, :, 1] - p[:, :, 0]).square().sum(-1), min=floor2)
            inv2 = 1.0 / d2
            cut = regular and self.cutoff is not None
            e, _ = _lj_coulomb(
                d2,
                inv2,
                torch.sqrt(inv2),
                sig2.to(x),
                eps4.to(x),
                qq.to(x),
                self.k_rf if cut else None,
                self.c_rf if cut else None,
                self.switch if cut else None,
                False,
            )
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
        e, w = _lj_coulomb(
            g.d2c,
            inv2,
            g.inv_r,
            self.sig2_m.to(x),
            self.eps4_m.to(x),
            self.qq_m.to(x),
            self.k_rf,
            self.c_rf,
            self.switch,
            need_grad,
        )
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
            e, w = _lj_coulomb(
                d2,
                inv2,
                torch.sqrt(inv2),
                self.ex_sig2.to(x),
                self.ex_eps4.to(x),
                self.ex_qq.to(x),
                None,
                None,
                None,
                need_grad,
            )
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

    def __init__(
        self,
        *,
        charge,
        offset_radius,
        scaled_radius,
        offset,
        alpha,
        beta,
        gamma,
        ke,
        solute_dielectric,
        solvent_dielectric,
        ace,
        probe,
        cutoff,
        kappa,
        inside_term,
        name,
    ):
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
        W = G * (1.0 - 0.25 * ex)  # direct, through d_ij
        dE_dB = 2.0 * torch.einsum("bij,bj->bi", G * ex * (1.0 + 0.25 * d2 / u), born)
        if ace is not None:
            dE_dB = dE_dB - 6.0 * ace / born
        dpoly = self.alpha + psi * (-2.0 * self.beta + 3.0 * self.gamma * psi)
        dE_dI = dE_dB * born.square() * (1.0 - th.square()) * dpoly * rho / radius
        # dh/dr (L depends on r where L = |r - s_j|)
        lp = torch.where(use_d, torch.sign(rms), torch.zeros_like(rms))
        dh = 0.5 * (
            -a2 * lp
            + b2
            + 0.25 * (1.0 + s_j.square() * inv_r.square()) * (b2 - a2)
            + 0.5 * t1 * (a2 * inv_l * lp - b2 * inv_u)
            + 0.5 * (inv_l * lp - inv_u) * inv_r
            - 0.5 * log_lu * inv_r.square()
        )
        if self.inside_term:
            dh = dh + torch.where(ins, a2 * lp, torch.zeros_like(dh))
        dh = torch.where(keep & g.live, dh, torch.zeros_like(dh))
        W = W + dE_dI[:, :, None] * dh * (0.5 * inv_r)  # through I_i, d(r)/d(d) = 1/2r
        return energy, W
