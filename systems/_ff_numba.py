r"""The ``"numba"`` engine: one compiled CPU loop per configuration, parallel over the batch.

:func:`_numba_kernel` compiles (once, cached on disk) scalar loops over bonds, angles,
torsions (gradient after Blondel & Karplus 1996), exceptions, atom pairs and the two GB
passes, with the same formulas as the torch terms of ``_ff_terms`` and their analytic
gradients, accumulating in float64; no temporary arrays, ``prange`` over the batch.
:class:`_NumbaParams` flattens a force field's parameters into the kernel's arrays and
:class:`_NumbaEnergy` is the autograd function whose backward returns the gradient the same
kernel call computed (first order only).
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from ._ff_terms import HarmonicAngles, HarmonicBonds, PeriodicTorsions

if TYPE_CHECKING:
    from .forcefield import TorchForceField


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
            d = 0.5 * (
                -a2 * lp
                + b2
                + 0.25 * (1.0 + s * s * inv_r * inv_r) * (b2 - a2)
                + 0.5 * t1 * (a2 * inv_l * lp - b2 * inv_u)
                + 0.5 * (inv_l * lp - inv_u) * inv_r
                - 0.5 * log_lu * inv_r * inv_r
            )
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
    def one(
        x,
        g,
        need_grad,
        floor2,
        b_idx,
        b_par,
        a_idx,
        a_par,
        t_idx,
        t_par,
        qq_m,
        sig2_m,
        eps4_m,
        nbo,
        e_idx,
        e_par,
        gq,
        grho,
        gsr,
        gbo,
    ):
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
            e, w = lj_coulomb(max(d2, floor2), e_par[k, 0], e_par[k, 1], e_par[k, 2], False, 0.0, 0.0, False, 0.0, 0.0)
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
                        e, w = lj_coulomb(d2c, qq, sig2_m[i, j], e4, has_cut, k_rf, c_rf, has_sw, r_sw, r_c)
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
                    dh[i, j] = d * inv_r  # dh/dr / r: the factor of (x_i - x_j) later
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
                dborn[i] = born[i] * born[i] * (1.0 - th * th) * dpoly * rho / radius  # dB/dI
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
                        d2s[i, j] = 2.0 * de_df2 * (1.0 - 0.25 * ex)  # reuse: now dE/dd2 * 2
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
    def batch_parallel(
        x,
        out_e,
        out_g,
        need_grad,
        floor2,
        b_idx,
        b_par,
        a_idx,
        a_par,
        t_idx,
        t_par,
        qq_m,
        sig2_m,
        eps4_m,
        nbo,
        e_idx,
        e_par,
        gq,
        grho,
        gsr,
        gbo,
    ):
        for k in prange(x.shape[0]):
            out_e[k] = one(
                x[k],
                out_g[k],
                need_grad,
                floor2,
                b_idx,
                b_par,
                a_idx,
                a_par,
                t_idx,
                t_par,
                qq_m,
                sig2_m,
                eps4_m,
                nbo,
                e_idx,
                e_par,
                gq,
                grho,
                gsr,
                gbo,
            )

    @njit(cache=True)
    def batch_serial(
        x,
        out_e,
        out_g,
        need_grad,
        floor2,
        b_idx,
        b_par,
        a_idx,
        a_par,
        t_idx,
        t_par,
        qq_m,
        sig2_m,
        eps4_m,
        nbo,
        e_idx,
        e_par,
        gq,
        grho,
        gsr,
        gbo,
    ):
        for k in range(x.shape[0]):
            out_e[k] = one(
                x[k],
                out_g[k],
                need_grad,
                floor2,
                b_idx,
                b_par,
                a_idx,
                a_par,
                t_idx,
                t_par,
                qq_m,
                sig2_m,
                eps4_m,
                nbo,
                e_idx,
                e_par,
                gq,
                grho,
                gsr,
                gbo,
            )

    _NUMBA_KERNEL = (batch_serial, batch_parallel)
    return _NUMBA_KERNEL


class _NumbaParams:
    """The force field's parameters as float64/int64 numpy arrays for the compiled kernel."""

    def __init__(self, ff: TorchForceField):
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
            self.nbo = np.array(
                [
                    1.0,
                    float(cut),
                    nb.cutoff**2 if cut else 0.0,
                    nb.k_rf or 0.0,
                    nb.c_rf or 0.0,
                    float(sw is not None),
                    sw[0] if sw else 0.0,
                    sw[1] if sw else 0.0,
                ]
            )
            self.e_idx = arr(nb.ex_pairs, (-1, 2), np.int64)
            self.e_par = np.stack([arr(nb.ex_qq), arr(nb.ex_sig2), arr(nb.ex_eps4)], 1).reshape(-1, 3)
        self.gq = self.grho = self.gsr = np.ones(n)
        self.gbo = np.zeros(16)
        if gb is not None:
            self.gq, self.grho, self.gsr = arr(gb.q), arr(gb.rho), arr(gb.sr)
            self.gbo = np.array(
                [
                    1.0,
                    gb.offset,
                    gb.alpha,
                    gb.beta,
                    gb.gamma,
                    gb.ke,
                    gb.inv_eps_in,
                    gb.inv_eps_out,
                    gb.prefactor,
                    float(gb.ace is not None),
                    gb.ace or 0.0,
                    gb.probe,
                    float(gb.cutoff is not None),
                    gb.cutoff or 0.0,
                    gb.kappa,
                    float(gb.inside_term),
                ]
            )

    def args(self):
        return (
            self.b_idx,
            self.b_par,
            self.a_idx,
            self.a_par,
            self.t_idx,
            self.t_par,
            self.qq_m,
            self.sig2_m,
            self.eps4_m,
            self.nbo,
            self.e_idx,
            self.e_par,
            self.gq,
            self.grho,
            self.gsr,
            self.gbo,
        )


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
        if threads == 1 or xn.shape[0] < 8 * threads:  # no thread-pool launch for small work
            serial(xn, out_e, out_g, need, floor * floor, *params.args())
        else:
            with _NUMBA_LOCK:  # numba's default threading layer is not re-entrant
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
