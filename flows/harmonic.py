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
floored Hessian) is neglected. A ring that is not planar (proline's) has a second minimum, its
mirror pucker: the conditional is then a mixture of one such Gaussian per pucker, each relaxed
from its own start and weighted at every :math:`s` by its Laplace mass
:math:`\pi(s,\mu_k(s))\det(2\pi\Sigma_k)^{1/2}`.

A flow over the free torsions times this conditional is a proposal over the whole peptide with
an exact density whose weights :math:`\pi(s,h)/q(s)q(h\mid s)` vary only through the flow's
error on a dozen torsions and the anharmonicity of the stiff ones — the split of hard and soft
degrees of freedom that the Boltzmann generators of Noé et al. (Science 2019) make with PCA
whitening, with the whitening taken from the force field instead of data, so that it holds for
a peptide never simulated.
"""

from __future__ import annotations

import math

import numpy as np
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
        ring_flips: add a mixture component for every other pucker of the peptide's rings
            (:meth:`_ring_flips`; the proline ring has two), each weighted at every :math:`s`
            by its Laplace mass :math:`\pi(s,\mu_k(s))\,\det(2\pi\Sigma_k)^{1/2}`.
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
        ring_flips: bool = True,
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
        starts = [z0]
        if ring_flips:
            starts += self._ring_flips(peptide.topology, zmatrix)
        starts = torch.stack(starts)
        evals, evecs = self._precision(starts)
        self.register_buffer("starts", starts)
        self.register_buffer("start_evals", evals)
        self.register_buffer("start_evecs", evecs)
        #: :math:`\Sigma_k` of each component, also the preconditioner of its relaxation
        self.register_buffer("covs", (evecs / evals[:, None, :]) @ evecs.transpose(1, 2))

    @property
    def evals(self) -> Tensor:
        """Eigenvalues of the precision at the minimized structure (component 0)."""
        return self.start_evals[0]

    @property
    def cov(self) -> Tensor:
        """:math:`\\Sigma` at the minimized structure (component 0)."""
        return self.covs[0]

    def _ring_flips(self, topology, zmatrix) -> list[Tensor]:
        r"""Starts for the other puckers of the peptide's rings: the minimized structure with the
        stiff endocyclic torsions of one ring (all four atoms in it) negated — the mirror pucker —
        for every ring that is not planar (such a torsion above 0.3 rad), and for every
        combination of such rings."""
        import itertools

        from mcsample.systems.coordinates import bond_graph, ring_of_bond

        z = np.asarray(zmatrix)
        n = z.shape[0]
        neighbours = bond_graph(topology)
        rings = {
            frozenset(r) for a in range(len(neighbours)) for b in neighbours[a] if (r := ring_of_bond(neighbours, a, b))
        }
        stiff = set(self.stiff.tolist())
        flips = []
        for ring in sorted(rings, key=sorted):
            # the torsion of Z-matrix row p (p >= 3) is coordinate (n - 1) + (n - 2) + (p - 3)
            idx = [2 * n - 6 + p for p in range(3, n) if set(z[p].tolist()) <= ring and 2 * n - 6 + p in stiff]
            if idx and float(self.z0[idx].abs().max()) > 0.3:
                flips.append(idx)
        starts = []
        for r in range(1, len(flips) + 1):
            for combo in itertools.combinations(flips, r):
                idx = torch.tensor(sorted(i for c in combo for i in c))
                start = self.z0.clone()
                start[idx] = -start[idx]
                starts.append(start)
        return starts

    @property
    def dim(self) -> int:
        """The number of completed (stiff) coordinates."""
        return int(self.stiff.numel())

    def _precision(self, z: Tensor, h: float = 1e-4, rows: int = 8192) -> tuple[Tensor, Tensor]:
        r"""Eigenvalues ``(B, d)`` (floored) and eigenvectors ``(B, d, d)`` of
        :math:`-\nabla_h^2\log\pi(z)`, by central differences of the gradient, symmetrized."""
        from mcsample.protocols import log_prob_and_grad
        from mcsample.systems.coordinates import central_difference_hessian

        def grad(c: Tensor) -> Tensor:
            return torch.cat([-log_prob_and_grad(self.target, part)[1] for part in c.split(rows)])

        H = torch.nan_to_num(central_difference_hessian(grad, z, self.stiff, h), nan=0.0, posinf=0.0, neginf=0.0)
        evals, evecs = torch.linalg.eigh(H)
        return evals.clamp(min=self.min_precision), evecs

    def mean(self, z: Tensor, component: int = 0) -> Tensor:
        r""":math:`\mu(s)` ``(B, d)`` for the free torsions in ``z`` ``(B, 3n - 6)`` (its stiff
        entries are ignored), relaxed from the mixture component's start; no gradient flows
        through it."""
        return self._relaxed(z, component)[0][:, self.stiff]

    def _relaxed(self, z: Tensor, component: int) -> tuple[Tensor, Tensor]:
        """``z`` with its stiff entries relaxed from the component's start, and its log-density
        (``-inf`` where not finite)."""
        cur = z.detach().to(self.z0.dtype).clone()
        cur[:, self.stiff] = self.starts[component, self.stiff]
        return self._relax(cur, self.covs[component], self.newton_steps)

    def _relax(self, cur: Tensor, cov: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """``steps`` damped Newton steps of the stiff entries of ``cur``, preconditioned by ``cov``,
        and the log-density of the result."""
        from mcsample.protocols import log_prob_and_grad

        if steps == 0:
            with torch.no_grad():
                lp = self.target.log_prob(cur)
            return cur, torch.where(torch.isfinite(lp), lp, torch.full_like(lp, -math.inf))
        for _ in range(steps):
            lp, g = log_prob_and_grad(self.target, cur)
            lp = torch.where(torch.isfinite(lp), lp, torch.full_like(lp, -math.inf))
            step = torch.nan_to_num(g[:, self.stiff] @ cov, nan=0.0, posinf=0.0, neginf=0.0)
            step = step.clamp(-self.max_step, self.max_step)
            # backtracking: the first of the step sizes that raises the density, else no step
            todo = torch.arange(cur.shape[0], device=cur.device)
            out, out_lp = cur.clone(), lp.clone()
            with torch.no_grad():
                for a in _STEPS:
                    cand = cur[todo].clone()
                    cand[:, self.stiff] = cand[:, self.stiff] + a * step[todo]
                    lc = self.target.log_prob(cand)
                    better = lc > lp[todo]  # False for NaN
                    out[todo[better]] = cand[better]
                    out_lp[todo[better]] = lc[better]
                    todo = todo[~better]
                    if todo.numel() == 0:
                        break
            cur, lp = out, out_lp
        return cur, lp

    def gaussian(self, z: Tensor, component: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        r""":math:`\mu(s)` ``(B, d)``, the precision's eigenvalues ``(B, d)`` and eigenvectors
        ``(B, d, d)`` of one mixture component for the free torsions of ``z``, and its log
        Laplace mass :math:`\log\pi(s,\mu(s)) + \tfrac12\log\det 2\pi\Sigma` ``(B,)`` (no
        gradient)."""
        at, lp = self._relaxed(z, component)
        mu = at[:, self.stiff]
        if self.hessian == "reference":
            B = mu.shape[0]
            evals, evecs = self.start_evals[component].expand(B, -1), self.start_evecs[component].expand(B, -1, -1)
        else:
            evals, evecs = self._precision(at)
        return mu, evals, evecs, lp - self._log_scale(evals)

    @property
    def components(self) -> int:
        """The number of mixture components (ring puckers)."""
        return int(self.starts.shape[0])

    def _log_normal(self, h: Tensor, mu: Tensor, evals: Tensor, evecs: Tensor) -> Tensor:
        d = h - mu
        d = torch.where(self.periodic, wrap_angle(d), d)
        white = torch.sqrt(evals) * (d[:, None, :] @ evecs)[:, 0]
        return self._log_scale(evals) - 0.5 * (white**2).sum(-1)

    def _log_scale(self, evals: Tensor) -> Tensor:
        """:math:`-\\tfrac d2\\log 2\\pi - \\tfrac12\\log\\det\\Sigma` from the precision's eigenvalues."""
        return -0.5 * self.dim * math.log(2 * math.pi) + 0.5 * torch.log(evals).sum(-1)

    def _mixture(self, h: Tensor, parts: list) -> Tensor:
        if len(parts) == 1:
            return self._log_normal(h, *parts[0][:3])
        log_mix = self._log_mix(parts)
        terms = [log_mix[k] + self._log_normal(h, *parts[k][:3]) for k in range(len(parts))]
        return torch.logsumexp(torch.stack(terms), 0)

    @staticmethod
    def _log_mix(parts: list) -> Tensor:
        """Mixture weights ``(K, B)`` from the components' Laplace masses (equal where none is
        finite)."""
        mass = torch.stack([p[3] for p in parts])
        mass = torch.where(torch.isfinite(mass), mass, torch.full_like(mass, -1e30))
        return torch.log_softmax(mass, 0)

    def log_prob(self, z: Tensor) -> Tensor:
        r""":math:`\log q(h\mid s)` ``(B,)`` of the stiff entries of ``z`` given its free ones
        (differentiable in ``h``; :math:`\mu` and :math:`\Sigma` are held fixed)."""
        parts = [self.gaussian(z, k) for k in range(self.components)]
        return self._mixture(z[:, self.stiff].to(parts[0][0].dtype), parts)

    def complete(self, z: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        r"""``z`` ``(B, 3n - 6)`` (float64) with its stiff entries drawn from
        :math:`q(h\mid s)`, and :math:`\log q(h\mid s)`."""
        parts = [self.gaussian(z, k) for k in range(self.components)]
        mu0 = parts[0][0]
        B = mu0.shape[0]
        pick = torch.zeros(B, dtype=torch.long, device=mu0.device)
        if self.components > 1:
            u = torch.rand(B, generator=generator, dtype=mu0.dtype, device=mu0.device)
            cdf = torch.cumsum(self._log_mix(parts).exp(), 0)  # (K, B)
            pick = (u[None] > cdf[:-1]).sum(0)
        eps = torch.randn(mu0.shape, generator=generator, dtype=mu0.dtype, device=mu0.device)
        h = torch.zeros_like(mu0)
        for k, (mu, evals, evecs, _) in enumerate(parts):
            hk = mu + (evecs @ (eps / torch.sqrt(evals))[..., None])[..., 0]
            h = torch.where((pick == k)[:, None], hk, h)
        h = torch.where(self.periodic, wrap_angle(h), h)
        out = z.to(mu0.dtype).clone()
        out[:, self.stiff] = h
        if self.components == 1:  # the draw's own noise gives its density exactly
            return out, self._log_scale(parts[0][1]) - 0.5 * (eps**2).sum(-1)
        return out, self._mixture(h, parts)
