r"""Boltzmann generators: a normalizing flow over a peptide's internal coordinates, as a proposal
over its Cartesian coordinates.

A Boltzmann generator (Noé et al., Science 2019) draws independent configurations :math:`x`
with an exact density :math:`q(x)`, so that importance sampling or SMC corrects them to the
Boltzmann density :math:`\pi(x)\propto e^{-U(x)/kT}`. Here the flow is a
:class:`~mcsample.flows.coupling.CouplingSplineFlow` over the :math:`3n-6` internal coordinates
:math:`z` of :class:`~mcsample.systems.coordinates.InternalCoordinates` (bonds and angles as
real numbers, torsions on the circle; FAB, Midgley et al. 2023), and the six rigid-body
coordinates are drawn exactly: the centroid uniform in a 1 nm cube around the origin, the
orientation uniform (Haar). The Cartesian density is then

.. math:: \log q(x) = \log q_{\rm int}(z(x)) - \log J_{\rm int}(z) - \log(8\pi^2\cdot 1\,{\rm nm}^3),
          \qquad J_{\rm int} = r_1^2\prod_{k\ge 2} r_k^2\sin\theta_k,

(the :math:`\sin p` of the orientation cancels against the Haar density
:math:`\sin p/8\pi^2`). Its formula does not depend on where the molecule sits or how it is
turned, like the energy, so the importance weight :math:`-U/kT - \log q` is the weight of the
internal coordinates alone, and the log-evidence is that of the configurational integral per
nm³ of translation and per :math:`8\pi^2` of orientation.

**Chirality.** The flow reproduces the chirality of the training data: a mirror image (a
D-amino acid, the other face of a peptide bond) differs in improper torsions that the trained
flow gives negligible density, so it is never proposed. A force field gives both enantiomers
the same energy, so the Boltzmann density it corrects to is that of the L-peptide only (the
enantiomer's half of the configurational integral, log 2, is left out of the evidence), which
is the physically meaningful one.

**Domain.** The internal-coordinate map is a bijection for bonds > 0 and angles in (0, π);
the flow's Gaussian tails put mass outside it only tens of standard deviations away.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import torch
from torch import Tensor, nn

from mcsample.flows.coupling import CouplingConfig, CouplingSplineFlow, _num, wrap_angle

__all__ = ["BoltzmannGenerator"]

#: log of the rigid-body volume: 8π² of orientations times 1 nm³ of translation
LOG_RIGID_VOLUME = math.log(8 * math.pi**2)


class BoltzmannGenerator(nn.Module):
    r"""A normalizing flow over a peptide's internal coordinates, a Proposal over ``(B, n, 3)`` nm.

    ``log_prob(x)`` and ``sample_and_log_prob(n)`` are exact (module docstring for the formula
    and the rigid-body convention), so ``mc.importance_sample(peptide, flow, n)`` and
    ``mc.smc(peptide, flow, n)`` correct it to the peptide's Boltzmann density. Samples are
    float64 Cartesian coordinates in the peptide's atom order. It does not propose mirror
    images (module docstring, "Chirality").

    Args:
        zmatrix: ``(n, 4)`` Z-matrix (:func:`~mcsample.systems.coordinates.zmatrix_from_topology`).
        flow: a :class:`~mcsample.flows.coupling.CouplingSplineFlow` over the ``3n - 6``
            internal coordinates ``[bonds, angles, torsions]``.
        identity: the target's :meth:`~mcsample.systems.peptides.Peptide.identity`, checked
            when the flow is loaded for a peptide.
    """

    def __init__(self, zmatrix, flow: CouplingSplineFlow, identity: dict | None = None):
        super().__init__()
        from mcsample.systems.coordinates import InternalCoordinates

        self.ic = InternalCoordinates(np.asarray(zmatrix))
        if flow.config.features != self.ic.dim - 6:
            raise ValueError(
                f"the flow has {flow.config.features} coordinates; "
                f"{self.ic.n_atoms} atoms have {self.ic.dim - 6} internal coordinates"
            )
        self.flow = flow
        self.identity = dict(identity or {})
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)

    # -------------------------------------------------------------------------- construction
    @classmethod
    def from_data(
        cls,
        peptide,
        x: Tensor,
        *,
        layers: int = 8,
        hidden: int = 256,
        depth: int = 2,
        bins: int = 8,
        bound: float = 5.0,
        seed: int = 0,
    ) -> BoltzmannGenerator:
        """A flow for ``peptide`` whose standardization of bonds and angles comes from frames ``x``.

        ``x``: ``(F, n, 3)`` nm (MD frames). The flow starts as the identity on standardized
        coordinates (Gaussian bonds and angles with the data's means and deviations, uniform
        torsions); train it with :mod:`mcsample.flows.training`.
        """
        from mcsample.systems.coordinates import InternalCoordinates, zmatrix_from_topology

        zmatrix = zmatrix_from_topology(peptide.topology)
        ic = InternalCoordinates(zmatrix)
        x = torch.as_tensor(x, dtype=torch.float64)
        _check_positions(x, ic.n_atoms)
        z = ic.to_internal(x)[:, 6:]
        circular = ic.circular_mask[6:]
        loc = z.mean(0)
        scale = z.std(0).clamp_min(1e-4)
        cfg = CouplingConfig(
            circular=circular.tolist(), layers=layers, hidden=hidden, depth=depth, bins=bins, bound=bound, seed=seed
        )
        flow = CouplingSplineFlow(cfg, loc.float(), scale.float())
        return cls(zmatrix, flow, peptide.identity())

    # -------------------------------------------------------------------------- protocol
    @property
    def event_shape(self) -> torch.Size:
        return torch.Size([self.ic.n_atoms, 3])

    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    def internal(self, x: Tensor) -> Tensor:
        """The ``3n - 6`` internal coordinates of ``x`` ``(B, n, 3)`` (float64)."""
        x = torch.as_tensor(x)
        _check_positions(x, self.ic.n_atoms)
        return self.ic.to_internal(x.to(torch.float64))[:, 6:]

    def _log_jacobian(self, z_full: Tensor) -> Tensor:
        return self.ic.log_det_jacobian(z_full, include_rigid=False)

    def log_prob(self, x: Tensor) -> Tensor:
        r"""Exact :math:`\log q(x)` (float64, shape ``(B,)``) for ``x`` ``(B, n, 3)`` in nm."""
        x = torch.as_tensor(x)
        _check_positions(x, self.ic.n_atoms)
        z = self.ic.to_internal(x.to(torch.float64))
        lq = self.flow.log_prob(z[:, 6:])
        return lq.to(torch.float64) - self._log_jacobian(z) - LOG_RIGID_VOLUME

    def rsample_and_log_prob(self, shape=(1,), generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draws ``(B, n, 3)`` (float64, nm) and exact log-densities, differentiable in the flow."""
        n = _num(shape)
        zi, lq = self.flow.rsample_and_log_prob((n,), generator)
        x, log_jac = self.place(zi, generator)
        return x, lq.to(torch.float64) - log_jac - LOG_RIGID_VOLUME

    def place(self, z: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        r"""Cartesian ``(B, n, 3)`` float64 from internal coordinates ``z`` ``(B, 3n - 6)``, with a
        random rigid-body placement (centroid uniform in the 1 nm cube, Haar orientation), and
        :math:`\log J_{\rm int}(z)`."""
        n = z.shape[0]
        full = torch.cat([self._rigid(n, generator), z.to(torch.float64)], dim=-1)
        x, _ = self.ic.to_cartesian(full)
        centre = torch.rand(n, 1, 3, generator=generator, device=x.device, dtype=torch.float64) - 0.5
        return x - x.mean(1, keepdim=True) + centre, self._log_jacobian(full)

    def sample_and_log_prob(self, shape=(1,), generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draws and exact log-densities (no gradients); the fast path of importance sampling."""
        with torch.no_grad():
            return self.rsample_and_log_prob(shape, generator)

    def sample(self, shape=(1,), generator: torch.Generator | None = None) -> Tensor:
        """Draws ``(B, n, 3)`` float64, nm."""
        return self.sample_and_log_prob(shape, generator)[0]

    def _rigid(self, n: int, generator) -> Tensor:
        """Position 0 (the centroid is set afterwards) and a Haar-uniform orientation (p, q, γ)."""
        u = torch.rand(n, 3, generator=generator, device=self.device, dtype=torch.float64)
        polar = torch.acos((1 - 2 * u[:, 0]).clamp(-1, 1))
        azimuth = wrap_angle((2 * u[:, 1] - 1) * math.pi)
        spin = wrap_angle((2 * u[:, 2] - 1) * math.pi)
        return torch.cat(
            [torch.zeros(n, 3, dtype=torch.float64, device=self.device), torch.stack([polar, azimuth, spin], dim=-1)],
            dim=-1,
        )

    # -------------------------------------------------------------------------- identity
    def check_identity(self, peptide) -> None:
        """Raise ``ValueError`` naming every difference between ``peptide`` and the training system."""
        check_identity(self.identity, peptide.identity(), "this flow")

    def config(self) -> dict:
        """Everything needed to rebuild the module (stored in checkpoints)."""
        return {
            "kind": "BoltzmannGenerator",
            "zmatrix": self.ic.zmatrix.tolist(),
            "flow": asdict(self.flow.config),
            "identity": dict(self.identity),
        }

    @classmethod
    def from_config(cls, config: dict) -> BoltzmannGenerator:
        flow = CouplingSplineFlow(CouplingConfig(**config["flow"]))
        return cls(np.asarray(config["zmatrix"]), flow, config.get("identity"))

    def proposal(self, peptide) -> BoltzmannGenerator:
        """This flow as the proposal for ``peptide`` after checking that it was trained for it."""
        self.check_identity(peptide)
        return self


def check_identity(expected: dict, found: dict, what: str) -> None:
    """Compare two :meth:`Peptide.identity` records; raise ``ValueError`` naming the differences."""
    if not expected:
        return
    diff = [
        f"{k}: trained for {expected.get(k)!r}, got {found.get(k)!r}"
        for k in ("name", "sequence", "temperature_K", "n_atoms", "topology_sha256", "system_sha256")
        if k in expected and expected.get(k) != found.get(k)
    ]
    if diff:
        raise ValueError(f"{what} was trained for another system ({expected.get('name')}); " + "; ".join(diff))


def _check_positions(x: Tensor, n_atoms: int) -> None:
    if x.dim() != 3 or tuple(x.shape[1:]) != (n_atoms, 3):
        raise ValueError(f"expected positions of shape (B, {n_atoms}, 3) in nm; got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise ValueError(f"{bad} of {x.shape[0]} configurations have NaN or infinite coordinates")
