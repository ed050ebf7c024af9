r"""Diffusion Posterior Sampling (Chung, Kim, McCann, Klasky & Ye 2023, ICLR): the reverse chain
nudged by :math:`-\zeta\nabla_{x_t}\|y - \mathcal A(\hat x_0(x_t))\|`. Approximate, with equal
weights and no evidence; the common baseline."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mcsample import feynman_kac as fk
from mcsample.posterior.base import PosteriorSampler, PosteriorState, _randn_like
from mcsample.weighted import WeightedSamples

__all__ = ["DPS", "dps"]


class DPS(PosteriorSampler):
    r"""Diffusion Posterior Sampling (Chung et al. 2023, Algorithm 1).

    Each step draws the DDIM-:math:`\eta` (default ancestral) move and subtracts
    :math:`\zeta\nabla_{x_t}\|y - \mathcal A(\hat x_0(x_t))\|` (the norm, not its square, as in
    the authors' code). Approximate: weights are all equal.
    """

    name = "DPS"

    def __init__(self, model, measurement, y, *, zeta: float = 1.0, eta: float = 1.0, **grid):
        super().__init__(model, measurement, y, **grid)
        if not zeta >= 0:
            raise ValueError(f"zeta (the guidance step size) must be >= 0, got {zeta}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.zeta = float(zeta)
        self.eta = float(eta)

    def result(self, state: PosteriorState, seconds: float, **info) -> WeightedSamples:
        """Equal weights and no evidence: DPS is not an importance sampler, so ``log_evidence``
        and its stderr are NaN, with the reason in ``info["log_evidence"]``."""
        out = super().result(state, seconds, **info)
        out.log_scale = torch.full_like(out.log_scale, math.nan)
        out.info["log_evidence"] = (
            "not estimated: DPS moves independent chains by an approximate "
            "likelihood gradient and has no importance weights; use TDS or "
            "MCGdiff for the evidence"
        )
        return out

    def init(self, generator) -> PosteriorState:
        x = self.initial_noise(self.num_particles, generator)
        return fk.record_ess(fk.start(x, counters={"nfe": 0, "vjp": 0}))

    def step(self, state: PosteriorState, generator) -> PosteriorState:
        j = state.index
        with torch.enable_grad():
            xr = state.x.detach().requires_grad_(True)
            s = self.score(xr, j)
            x0 = self.x0_from_score(xr, s, j)
            res = (self.y - self.measurement.forward(x0)).reshape(xr.shape[0], -1)
            norm = torch.linalg.vector_norm(res, dim=-1)  # its gradient is 0 (not NaN) at 0
            (grad,) = torch.autograd.grad(norm.sum(), xr)
        s, x0 = s.detach(), x0.detach()
        if j + 1 < self.times.numel():
            mean, c, _ = self.kernel(state.x, s, j, self.eta, x0=x0)
            x_new = mean + c * _randn_like(mean, generator) - self.zeta * grad
        else:
            x_new = x0  # last step: t_min -> 0
        state = state.count(nfe=1, vjp=1).replace(x=x_new.detach(), index=j + 1)
        return fk.record_ess(state)


def dps(
    model,
    measurement,
    y: Tensor,
    num_particles: int,
    *,
    num_steps: int = 100,
    zeta: float = 1.0,
    eta: float = 1.0,
    generator=None,
    dtype=torch.float32,
    device=None,
    event_shape=None,
    progress: bool = False,
    checkpoint=None,
    checkpoint_every: int = 10,
    resume: bool = True,
    **grid,
) -> WeightedSamples:
    """Run :class:`DPS` on ``num_particles`` independent chains (equal weights; evidence NaN)."""
    return DPS(model, measurement, y, zeta=zeta, eta=eta, num_steps=num_steps, **grid).run(
        num_particles,
        generator=generator,
        dtype=dtype,
        device=device,
        event_shape=event_shape,
        progress=progress,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        resume=resume,
    )
