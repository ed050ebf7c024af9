r"""The stiff internal coordinates of a peptide drawn from their harmonic (Laplace) conditional.

A peptide's Boltzmann distribution over internal coordinates :math:`z = (s, h)` splits into a
few *free* torsions :math:`s` (backbone φ, ψ, ω, side-chain χ, methyl and ammonium rotors),
whose marginal is multimodal and has to be learned, and many *stiff* coordinates :math:`h`
(bond lengths, bond angles, the improper and ring torsions of :func:`torsion_stiffness
<mcsample.flows.transferable.torsion_stiffness>`), held near a minimum by stiff springs. Given
:math:`s`, the conditional :math:`\pi(h\mid s)\propto e^{-U(s,h)/kT}J(s,h)` is close to a
Gaussian, and the force field says which (the Laplace approximation):

.. math::

    q(h\mid s) = \mathcal N\big(h;\ \mu(s),\ \Sigma\big),\qquad
    \Sigma = \big[-\nabla_h^2\log\pi(z_0)\big]^{-1},

with :math:`\Sigma` the inverse Hessian of the log-density over the stiff coordinates at the
peptide's minimized structure :math:`z_0` (central differences of the force field's gradient,
eigenvalues floored at :math:`1/0.25^2`; or, with ``hessian="local"``, at each draw's own
:math:`(s, \mu(s))`), and :math:`\mu(s)` the stiff coordinates of
:math:`z_0` relaxed at the given free torsions by a few damped Newton steps with that fixed
Hessian, :math:`h \leftarrow h + a\,\Sigma\nabla_h\log\pi(s, h)`, the step size the first of
:math:`a = 1, 0.3, 0.1` that raises the density, else 0 (a deterministic function of :math:`s`, so
:math:`q(h\mid s)` is an exact density whatever the relaxation reaches). Stiff torsions are
wrapped; the mass the Gaussian puts more than π from its mean (below :math:`10^{-30}` with the
floored Hessian) is neglected.

A flow over the free torsions times this conditional is a proposal over the whole peptide with
an exact density whose weights :math:`\pi(s,h)/q(s)q(h\mid s)` vary only through the flow's
error on a dozen torsions and the anharmonicity of the stiff ones — the split of hard and soft
degrees of freedom that the Boltzmann generators of Noé et al. (Science 2019) make with PCA
whitening, with the whitening taken from the force field instead of data, so that it holds for
a peptide never simulated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mcsample.flows.coupling import wrap_angle

__all__ = ["HarmonicCompletion"]

#: step sizes tried in turn by each damped Newton step (none raising the density: no step)
_STEPS = (1.0, 0.3, 0.1)


class HarmonicCompletion(nn.Module):
    r"""The Laplace conditional :math:`q(h\mid s)=\mathcal N(h;\mu(s),\Sigma)` of a peptide's
    stiff internal coordinates given its free torsions (module docstring).

    Args:
        peptide: a :class:`~mcsample.systems.peptides.Peptide` (its minimized ``positions``
            are the expansion point).
        zmatrix: the ``(n, 4)`` Z-matrix of the internal coordinates.
        free: bool ``(3n - 6,)``, the free torsions among ``[bonds, angles, torsions]``; every
            other coordinate is completed.
        hessian: ``"reference"`` — one :math:`\Sigma` from the minimized structure — or
            ``"local"`` — :math:`\Sigma(s)` from the Hessian at :math:`(s, \mu(s))` of every
            draw (:math:`2d` more gradient evaluations per draw for :math:`d` stiff coordinates;
            closer to the Boltzmann conditional where side chains press on the backbone).
        newton_steps: damped Newton steps of the relaxation :math:`\mu(s)`.
        max_step: largest change of one coordinate per step (nm or rad).
    """

    #: smallest eigenvalue of a precision matrix (a standard deviation of at most 0.25 nm or rad)
    min_precision = 1.0 / 0.25**2

    def __init__(
        self,
        peptide,
        zmatrix,
        free: Tensor,
        hessian: str = "reference",
        newton_steps: int = 4,
        max_step: float = 0.2,
    ):
        super().__init__()
        from mcsample.systems.coordinates import InternalCoordinateTarget

        self.target = InternalCoordinateTarget(peptide, zmatrix=zmatrix, fix_rigid=True)
        self.ic = self.target.transform  # a submodule, so that .to(device) moves it
        free = torch.as_tensor(free, dtype=torch.bool)
        if free.shape != (self.target.dim,):
            raise ValueError(f"free must be a bool mask of shape ({self.target.dim},); got {tuple(free.shape)}")
        if hessian not in ("reference", "local"):
            raise ValueError(f"hessian must be 'reference' or 'local', got {hessian!r}")
        if newton_steps < 0:
            raise ValueError(f"newton_steps must be >= 0, got {newton_steps}")
        self.hessian, self.newton_steps, self.max_step = hessian, int(newton_steps), float(max_step)
        stiff = torch.nonzero(~free)[:, 0]
        self.register_buffer("stiff", stiff)
        self.register_buffer("periodic", self.target.circular_mask[stiff])
        z0 = self.target.reference_z[6:].to(torch.float64)
        self.register_buffer("z0", z0)
        evals, evecs = self._precision(z0[None])
        self.register_buffer("evals", evals[0])
        self.register_buffer("evecs", evecs[0])
        #: :math:`\Sigma` at the minimized structure, the preconditioner of the relaxation
        self.register_buffer("cov", (self.evecs / self.evals) @ self.evecs.T)

    @property
    def dim(self) -> int:
        """The number of completed (stiff) coordinates."""
        return int(self.stiff.numel())

    def _precision(self, z: Tensor, h: float = 1e-4, rows: int = 8192) -> tuple[Tensor, Tensor]:
        r"""Eigenvalues ``(B, d)`` (floored) and eigenvectors ``(B, d, d)`` of
        :math:`-\nabla_h^2\log\pi(z)`, by central differences of the gradient, symmetrized."""
        from mcsample.protocols import log_prob_and_grad

        B, d = z.shape[0], self.dim
        shift = torch.zeros(2 * d, z.shape[1], dtype=z.dtype, device=z.device)
        k = torch.arange(d, device=z.device)
        shift[2 * k, self.stiff] = h
        shift[2 * k + 1, self.stiff] = -h
        probes = (z[:, None, :] + shift).reshape(-1, z.shape[1])
        g = torch.cat([log_prob_and_grad(self.target, c)[1] for c in probes.split(rows)])
        g = g.reshape(B, 2 * d, -1)[:, :, self.stiff]
        H = -(g[:, 0::2] - g[:, 1::2]) / (2 * h)
        H = torch.nan_to_num(0.5 * (H + H.transpose(1, 2)), nan=0.0, posinf=0.0, neginf=0.0)
        evals, evecs = torch.linalg.eigh(H)
        return evals.clamp(min=self.min_precision), evecs

    def mean(self, z: Tensor) -> Tensor:
        r""":math:`\mu(s)` ``(B, d)`` for the free torsions in ``z`` ``(B, 3n - 6)`` (its stiff
        entries are ignored); no gradient flows through it."""
        from mcsample.protocols import log_prob_and_grad

        cur = z.detach().to(self.z0.dtype).clone()
        cur[:, self.stiff] = self.z0[self.stiff]
        for _ in range(self.newton_steps):
            lp, g = log_prob_and_grad(self.target, cur)
            lp = torch.where(torch.isfinite(lp), lp, torch.full_like(lp, -math.inf))
            step = torch.nan_to_num(g[:, self.stiff] @ self.cov, nan=0.0, posinf=0.0, neginf=0.0)
            step = step.clamp(-self.max_step, self.max_step)
            # backtracking: the first of the step sizes that raises the density, else no step
            todo = torch.arange(cur.shape[0], device=cur.device)
            out = cur.clone()
            with torch.no_grad():
                for a in _STEPS:
                    cand = cur[todo].clone()
                    cand[:, self.stiff] = cand[:, self.stiff] + a * step[todo]
                    better = self.target.log_prob(cand) > lp[todo]  # False for NaN
                    out[todo[better]] = cand[better]
                    todo = todo[~better]
                    if todo.numel() == 0:
                        break
            cur = out
        return cur[:, self.stiff]

    def gaussian(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r""":math:`\mu(s)` ``(B, d)`` and the precision's eigenvalues ``(B, d)`` and eigenvectors
        ``(B, d, d)`` for the free torsions of ``z`` (no gradient)."""
        mu = self.mean(z)
        if self.hessian == "reference":
            B = mu.shape[0]
            return mu, self.evals.expand(B, -1), self.evecs.expand(B, -1, -1)
        at = z.detach().to(mu.dtype).clone()
        at[:, self.stiff] = mu
        evals, evecs = self._precision(at)
        return mu, evals, evecs

    def _log_norm(self, evals: Tensor) -> Tensor:
        return -0.5 * self.dim * math.log(2 * math.pi) + 0.5 * torch.log(evals).sum(-1)

    def log_prob(self, z: Tensor) -> Tensor:
        r""":math:`\log q(h\mid s)` ``(B,)`` of the stiff entries of ``z`` given its free ones
        (differentiable in ``h``; :math:`\mu` and :math:`\Sigma` are held fixed)."""
        mu, evals, evecs = self.gaussian(z)
        d = z[:, self.stiff].to(mu.dtype) - mu
        d = torch.where(self.periodic, wrap_angle(d), d)
        white = torch.sqrt(evals) * (d[:, None, :] @ evecs)[:, 0]
        return self._log_norm(evals) - 0.5 * (white**2).sum(-1)

    def complete(self, z: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        r"""``z`` ``(B, 3n - 6)`` (float64) with its stiff entries drawn from
        :math:`q(h\mid s)`, and :math:`\log q(h\mid s)`."""
        mu, evals, evecs = self.gaussian(z)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        h = mu + (evecs @ (eps / torch.sqrt(evals))[..., None])[..., 0]
        h = torch.where(self.periodic, wrap_angle(h), h)
        out = z.to(mu.dtype).clone()
        out[:, self.stiff] = h
        return out, self._log_norm(evals) - 0.5 * (eps**2).sum(-1)
