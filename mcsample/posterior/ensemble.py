r"""The approximation-free weighted ensemble of Chen, Ren, Min, Ying & Izzo (2025, "Solving
inverse problems via diffusion-based priors: an approximation-free ensemble sampling approach").

**The ensemble sampler's path.** With :math:`\tau` running from noise to data and
:math:`\hat p(x,\tau) = q_{t(\tau)}(x)` the prior's noised marginals, the particles follow the
path :math:`\hat q_y(x,\tau)\propto\hat p(x,\tau)\,e^{-\mu_y(x,\tau)}`, where :math:`\mu_y` is
the measurement potential at the noisy state. It must equal :math:`-\log p(y\mid x)` at the
data end, so that the path ends at the posterior :math:`q_{t_{\min}}(x)p(y\mid x)` (up to the
usual :math:`t_{\min}` smoothing, :math:`\sigma_{t_{\min}}\approx0.01` for the default VP
schedule). At noisy times, applying the likelihood to :math:`x_t` as is (``potential="fixed"``,
time-independent; the literal reading of ":math:`\mu_y = -\log p(y\mid x)` at the noisy state")
is natural for a variance-exploding diffusion, :math:`x_t = x_0 + \sigma_t\varepsilon`; for a
VP diffusion :math:`Ax_t` is a shrunk
:math:`\alpha_tAx_0`, the intermediate targets put their mass on the wrong modes, and the
weights collapse (see ``examples/inverse_problems/gmm_benchmark.py --methods ensemble-fixed``).
For a linear-Gaussian measurement the default is the exact noisy-state likelihood under a flat
prior on :math:`x_0`,

.. math:: \mu_y(x,t) = -\log\mathcal N\big(y;\ Ax/\alpha_t,\ \sigma_y^2I + (\sigma_t/\alpha_t)^2AA^\top\big),

weak at :math:`t = 1` and equal to :math:`-\log p(y\mid x)` at :math:`t = 0`; its gradient,
Laplacian (a constant) and time derivative are closed-form in the SVD basis
(:class:`_LinearPotential`). The start :math:`\mathcal N(0,\rho^2I)e^{-\mu_y(\cdot,t_{\max})}` is a
Gaussian, sampled exactly. Any reverse SDE :math:`dx = H\,d\tau + v\,dW` with
:math:`H = -f x + \frac12(g^2+v^2)s` keeps :math:`\hat p` (Fokker–Planck), and the product rule
gives, for the particles :math:`dx = (H - \lambda v^2\nabla\mu_y)\,d\tau + v\,dW`, the
Feynman–Kac weights

.. math:: d\log w = \Big[\tfrac12 v^2(\|\nabla\mu_y\|^2 - \Delta\mu_y) - \langle H, \nabla\mu_y\rangle
          - \partial_\tau\mu_y + (1-\lambda)v^2\big(\langle s,\nabla\mu_y\rangle - \|\nabla\mu_y\|^2
          + \Delta\mu_y\big)\Big]d\tau .

:math:`\lambda = 1` is the paper's choice (its SDE variant takes :math:`v = g`; with a
time-independent :math:`\mu_y` the :math:`\partial_\tau` term vanishes and this is the paper's
formula). :math:`\lambda = \frac12` (the likelihood force of a Langevin move for :math:`\hat q_y`)
needs no Laplacian — the weight becomes :math:`-\partial_\tau\mu_y - \langle -fx + \frac12 g^2 s,
\nabla\mu_y\rangle`, the rate of change of :math:`\mu_y` along the probability-flow velocity —
and has smaller weight variance when the likelihood is sharp; both are exact in continuous
time (the weights are integrated by Euler's rule, so the discretization error is first order).
For measurements without a closed form the Laplacian comes from autograd (:math:`d` backward
passes) in small dimension, else from Hutchinson's estimator
:math:`E[\zeta^\top\nabla^2\mu_y\,\zeta]` with Rademacher :math:`\zeta`. Particles resample
(multinomial, as in the paper) when ESS/N falls below ``resample_threshold``. For linear
measurements with an SVD the stiff likelihood force is integrated exactly (an
Ornstein–Uhlenbeck step in the SVD basis), so the step size is not limited by :math:`\sigma_y`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mcsample import feynman_kac as fk
from mcsample.posterior.base import (
    PosteriorSampler,
    PosteriorState,
    _dot,
    _gaussian_measurement,
    _randn_like,
    _sqsum,
    _svd_pieces,
    laplacian,
)
from mcsample.weighted import WeightedSamples

__all__ = ["EnsembleSampler", "ensemble_sampler"]


class _LinearPotential:
    r"""Closed-form :math:`\mu_y(x, t) = -\log\mathcal N(y;\ Ax/a_t,\ \sigma_y^2I + \gamma r_t^2AA^\top)`
    in the SVD basis (:math:`z = V^\top x`, :math:`\tilde u = U^\top y`,
    :math:`w_i = \sigma_y^2 + \gamma r_t^2S_i^2`, :math:`e_i = S_iz_i/a_t - \tilde u_i`):

    * ``"fixed"``: :math:`a_t = 1`, :math:`\gamma = 0` — the likelihood applied to the noisy state as is;
    * ``"rescaled"``: :math:`a_t = \alpha_t`, :math:`\gamma = 0` — the likelihood of
      :math:`x_t/\alpha_t = x_0 + (\sigma_t/\alpha_t)\varepsilon` (what the noisy state is for a
      variance-exploding diffusion);
    * ``"predictive"``: :math:`a_t = \alpha_t`, :math:`\gamma = 1`, :math:`r_t = \sigma_t/\alpha_t` —
      :math:`p(y\mid x_t)` exactly when the prior of :math:`x_0` is flat.

    All give :math:`\mu_y(x, 0) = -\log p(y\mid x)`. Gradient :math:`V(S e/(a w))`, Laplacian
    :math:`\sum S^2/(a^2w)`, and, with :math:`\dot a/a = f` and :math:`\dot{(r^2)} = g^2/\alpha^2`,
    :math:`\partial_t\mu = \sum_i[e_i\dot e_i/w_i - \tfrac12 e_i^2\dot w_i/w_i^2 + \tfrac12\dot w_i/w_i]`.
    """

    def __init__(self, sampler, mode: str, dtype, device):
        m = sampler.measurement
        U, S, V, ybar, uy, S64, y_perp_sq = _svd_pieces(m, sampler.y, dtype, device)
        self.V, self.S, self.u = V, S, uy.to(dtype)
        self.sig2 = m.sigma_y**2
        self.mode = mode
        self.gamma = 1.0 if mode == "predictive" else 0.0
        n_obs = sampler.y.numel()
        self.const = 0.5 * y_perp_sq / self.sig2 + 0.5 * (n_obs - S64.numel()) * math.log(2 * math.pi * self.sig2)
        self.sampler = sampler

    def _coef(self, j: int):
        smp = self.sampler
        if self.mode == "fixed":
            a, fdot, r2dot, r2 = 1.0, 0.0, 0.0, 0.0
        else:
            a = smp.alpha[j]
            fdot = smp.f[j]
            r2 = (smp.sigma[j] / a) ** 2
            r2dot = smp.g2[j] / a**2
        w = self.sig2 + self.gamma * r2 * self.S**2
        wdot = self.gamma * r2dot * self.S**2
        return a, fdot, w, wdot

    def evaluate(self, x: Tensor, j: int, need_lap: bool = True, generator=None):
        """``(grad, laplacian, d mu/dt)`` at grid index ``j``."""
        n = x.shape[0]
        a, fdot, w, wdot = self._coef(j)
        z = x.reshape(n, -1) @ self.V
        sz = self.S * z / a
        e = sz - self.u
        grad = ((self.S * e / (a * w)) @ self.V.T).reshape(x.shape)
        lap = (self.S**2 / (a * a * w)).sum().expand(n)
        edot = -sz * fdot
        dmu_dt = (e * edot / w - 0.5 * e * e * wdot / w**2 + 0.5 * wdot / w).sum(-1)
        return grad, lap, dmu_dt

    def ou(self, j: int, lam_v2: float):
        """Rates :math:`\\kappa_i` and centres of the stiff part :math:`-\\lambda v^2\\nabla\\mu` in the SVD basis."""
        a, _, w, _ = self._coef(j)
        return lam_v2 * self.S**2 / (a * a * w), a * self.u / self.S

    def initial(self, num: int, rho2: float, generator, dtype, device, event_shape):
        r"""Exact draws of :math:`\mathcal N(0,\rho^2I)e^{-\mu_y(\cdot, t_0)}` and :math:`\log Z_0`."""
        a, _, w, _ = self._coef(0)
        x = math.sqrt(rho2) * torch.randn((num, *event_shape), generator=generator, dtype=dtype, device=device)
        xf = x.reshape(num, -1)
        prec = 1.0 / rho2 + self.S**2 / (a * a * w)
        mean = (self.S * self.u / (a * w)) / prec
        z_old = xf @ self.V
        z = mean + torch.randn(z_old.shape, generator=generator, dtype=dtype, device=device) / prec.sqrt()
        x = (xf + (z - z_old) @ self.V.T).reshape(num, *event_shape)
        var = (w + rho2 * self.S**2 / a**2).to(torch.float64)
        u = self.u.to(torch.float64)
        log_z0 = float(-0.5 * (u * u / var + torch.log(2 * math.pi * var)).sum()) - self.const
        return x, log_z0


class _GenericPotential:
    r""":math:`\mu_y(x, t) = \tilde\mu_t(x/a_t)` for any measurement, by autograd.

    ``"fixed"``: :math:`a_t = 1`, :math:`\tilde\mu = -\log p(y\mid\cdot)`; ``"rescaled"``:
    :math:`a_t = \alpha_t`, same :math:`\tilde\mu`; ``"predictive"`` (Gaussian measurements):
    :math:`a_t = \alpha_t`, :math:`\tilde\mu_t(u) = -\log\mathcal N(y;\ \mathcal A(u),\ w_tI)`,
    :math:`w_t = \sigma_y^2 + (\sigma_t/\alpha_t)^2` (the flat-prior predictive of a measurement
    whose Jacobian has unit norm, e.g. a mask). With :math:`u = x/a_t`:
    :math:`\nabla\mu = \nabla\tilde\mu(u)/a`, :math:`\Delta\mu = \Delta\tilde\mu(u)/a^2`,
    :math:`\partial_t\mu = -f\langle\nabla\tilde\mu(u), u\rangle + \dot w\,\partial_w\tilde\mu`
    with :math:`\dot w = g^2/\alpha^2`.
    """

    def __init__(self, sampler, mode: str):
        self.sampler = sampler
        self.mode = mode
        m = sampler.measurement
        if mode == "predictive" and not _gaussian_measurement(m):
            raise ValueError("the 'predictive' potential needs a Gaussian measurement (.forward, .sigma_y)")

    def _w(self, j: int):
        smp = self.sampler
        r2 = (smp.sigma[j] / smp.alpha[j]) ** 2
        return smp.measurement.sigma_y**2 + r2, smp.g2[j] / smp.alpha[j] ** 2

    def mu_fn(self, j: int):
        """:math:`u\\mapsto\\tilde\\mu_{t_j}(u)`, batched."""
        smp = self.sampler
        m, y = smp.measurement, smp.y
        if self.mode != "predictive":
            return lambda u: -m.log_likelihood(u, y)
        w, _ = self._w(j)
        n_obs = y.numel()
        return lambda u: 0.5 * _sqsum(y - m.forward(u)) / w + 0.5 * n_obs * math.log(2 * math.pi * w)

    def scale(self, j: int) -> float:
        return 1.0 if self.mode == "fixed" else self.sampler.alpha[j]

    def value(self, x: Tensor, j: int) -> Tensor:
        with torch.no_grad():
            return self.mu_fn(j)(x / self.scale(j))

    def evaluate(self, x: Tensor, j: int, need_lap: bool = True, generator=None):
        smp = self.sampler
        a = self.scale(j)
        fn = self.mu_fn(j)
        u = x / a
        with torch.enable_grad():
            ur = u.detach().requires_grad_(True)
            mu = fn(ur)
            (g,) = torch.autograd.grad(mu.sum(), ur)
        mu, g = mu.detach(), g.detach()
        lap = None
        if need_lap:
            m = smp.measurement
            method = smp.laplacian
            if method == "auto" and callable(getattr(m, "potential_laplacian", None)):
                lap = m.potential_laplacian(u)  # 1/σ_y² scaling of tr(AᵀA)
                if self.mode == "predictive":
                    lap = lap * m.sigma_y**2 / self._w(j)[0]
            else:
                if method == "auto":
                    method = "exact" if u[0].numel() <= smp.exact_max_dim else "hutchinson"
                lap = laplacian(fn, u, method, smp.num_probes, generator)
            lap = lap / a**2
        if self.mode == "fixed":
            dmu_dt = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        else:
            dmu_dt = -smp.f[j] * _dot(g, u)
            if self.mode == "predictive":
                w, wdot = self._w(j)
                n_obs = smp.y.numel()
                rsq = 2 * w * (mu - 0.5 * n_obs * math.log(2 * math.pi * w))
                dmu_dt = dmu_dt + wdot * (-0.5 * rsq / w**2 + 0.5 * n_obs / w)
        return g / a, lap, dmu_dt


class EnsembleSampler(PosteriorSampler):
    r"""Weighted ensemble of Chen, Ren, Min, Ying & Izzo (2025); see the module docstring.

    The path is :math:`\hat q_y(x, t)\propto q_t(x)e^{-\mu_y(x,t)}` with
    :math:`\mu_y(x, 0) = -\log p(y\mid x)`, so it ends at the posterior. ``potential`` chooses
    :math:`\mu_y` at the noisy state (see :class:`_LinearPotential`): ``"fixed"`` (the
    likelihood of :math:`x_t` itself, time-independent), ``"rescaled"`` (the likelihood of
    :math:`x_t/\alpha_t`) or ``"predictive"`` (default for linear measurements with an SVD:
    :math:`\mathcal N(y; Ax_t/\alpha_t, \sigma_y^2I + (\sigma_t/\alpha_t)^2AA^\top)`; for a
    linear measurement without an SVD the isotropic version of :class:`_GenericPotential`). A
    time-dependent :math:`\mu_y` adds :math:`-\partial_\tau\mu_y = \partial_t\mu_y` to the weight
    rate. For a nonlinear measurement ``"auto"`` is ``"fixed"``: rescaling :math:`x_t/\alpha_t`
    through a nonlinear forward model blows up at high noise.

    Args:
        v_scale: :math:`v = \text{v\_scale}\cdot g(t)` (1: the paper's SDE variant).
        likelihood_drift: :math:`\lambda` in the drift :math:`H - \lambda v^2\nabla\mu_y`
            (default 0.5: Langevin force, no Laplacian needed, and accurate evidence; 1, the
            paper's, biases log Z upwards by the Euler step of the weight ODE: +2.4 to +8.7
            nats at 100 steps on the mixture benchmark, shrinking as 1/steps).
        laplacian: for measurements without a closed form: ``"auto"`` (``"exact"`` up to
            ``exact_max_dim`` dimensions, else ``"hutchinson"`` with ``num_probes`` probes),
            ``"exact"`` or ``"hutchinson"``.
        integrator: ``"auto"`` (``"exponential"`` for a linear measurement with an SVD, else
            ``"euler"``), ``"exponential"`` or ``"euler"`` (Euler–Maruyama).
        resample_threshold, scheme: resample (default multinomial, as in the paper) when
            ESS/N < threshold.
    The path ends at :math:`t_{\min}`; a last step maps the particles to Tweedie's denoised
    prediction :math:`\hat x_0 = (x + \sigma_t^2 s)/\alpha_t` (weights unchanged), as the other
    samplers do.
    """

    name = "ensemble"

    def __init__(
        self,
        model,
        measurement,
        y,
        *,
        potential: str = "auto",
        v_scale: float = 1.0,
        likelihood_drift: float = 0.5,
        laplacian: str = "auto",
        num_probes: int = 1,
        exact_max_dim: int = 64,
        integrator: str = "auto",
        resample_threshold: float = 0.5,
        scheme: str = "multinomial",
        **grid,
    ):
        super().__init__(model, measurement, y, **grid)
        self.v_scale = float(v_scale)
        self.lam = float(likelihood_drift)
        self.laplacian = laplacian
        self.num_probes = int(num_probes)
        self.exact_max_dim = int(exact_max_dim)
        fk.check_resampling(resample_threshold, scheme)
        if not v_scale > 0:
            raise ValueError(f"v_scale must be > 0, got {v_scale}")
        self.resample_threshold = float(resample_threshold)
        self.scheme = scheme
        self.has_svd = bool(getattr(measurement, "linear", False)) and callable(getattr(measurement, "svd", None))
        if potential == "auto":
            linear_gaussian = bool(getattr(measurement, "linear", False)) and _gaussian_measurement(measurement)
            potential = "predictive" if linear_gaussian else "fixed"
        if potential not in ("fixed", "rescaled", "predictive"):
            raise ValueError(f"potential must be 'auto', 'fixed', 'rescaled' or 'predictive', got {potential!r}")
        if potential == "predictive" and not _gaussian_measurement(measurement):
            raise ValueError("the 'predictive' potential needs a Gaussian measurement (.forward, .sigma_y)")
        self.potential = potential
        if integrator == "auto":
            integrator = "exponential" if self.has_svd else "euler"
        if integrator not in ("exponential", "euler"):
            raise ValueError(f"integrator must be 'auto', 'exponential' or 'euler', got {integrator!r}")
        if integrator == "exponential" and not self.has_svd:
            raise ValueError("the exponential integrator needs a linear measurement with .svd()")
        self.integrator = integrator
        self._pot = None

    def prepare(self, state: PosteriorState) -> None:
        super().prepare(state)
        self._make_potential(state.x.dtype, state.x.device)

    def _make_potential(self, dtype, device):
        self._pot = (
            _LinearPotential(self, self.potential, dtype, device)
            if self.has_svd
            else _GenericPotential(self, self.potential)
        )

    def init(self, generator) -> PosteriorState:
        num, dtype, device = self.num_particles, self.dtype, self.device
        rho2 = self.prior_std() ** 2
        self._make_potential(dtype, device)
        counters = {"nfe": 0, "vjp": 0}
        if self.has_svd:
            x, log_z0 = self._pot.initial(num, rho2, generator, dtype, device, self.event_shape)
            state = fk.start(x, self.start_log_weight(x), log_scale=log_z0, counters=counters)
        else:  # importance sampling from N(0, ρ²I) with weights e^{-μ}
            x = self.initial_noise(num, generator)
            state = fk.start(x, -self._pot.value(x, 0).to(torch.float64) + self.start_log_weight(x), counters=counters)
        fk.check_log_weights(state.log_w, "ensemble sampler start")
        return fk.record_ess(state)

    def step(self, state: PosteriorState, generator) -> PosteriorState:
        if self._pot is None:
            raise RuntimeError("call init() before step()")
        j = state.index
        x = state.x
        s = self.score(x, j)
        state = state.count(nfe=1)
        if j + 1 == self.times.numel():  # t_min -> 0: Tweedie's denoised prediction, weights unchanged
            return fk.record_ess(state.replace(x=self.x0_from_score(x, s, j), index=j + 1))
        h = float(self.times[j] - self.times[j + 1])
        n = x.shape[0]
        f, g2 = self.f[j], self.g2[j]
        v2 = self.v_scale**2 * g2
        H = -f * x + 0.5 * (g2 + v2) * s
        need_lap = self.lam != 0.5
        gmu, lap, dmu_dt = self._pot.evaluate(x, j, need_lap, generator)
        gsq = _sqsum(gmu)
        G = dmu_dt - _dot(H, gmu)  # -∂_τ μ = +∂_t μ
        if need_lap:
            G = G + 0.5 * v2 * (gsq - lap) + (1.0 - self.lam) * v2 * (_dot(s, gmu) - gsq + lap)
        else:
            G = G + 0.5 * v2 * _dot(s, gmu)
        state = fk.reweight(state, h * G.to(torch.float64), f"ensemble sampler step {j}")
        v = math.sqrt(v2)
        if self.integrator == "euler":
            x_new = x + h * (H - self.lam * v2 * gmu) + v * math.sqrt(h) * _randn_like(x, generator)
        else:  # Euler for H, exact Ornstein-Uhlenbeck step for the likelihood force and the noise
            V = self._pot.V
            k, centre = self._pot.ou(j, self.lam * v2)
            xf = (x + h * H).reshape(n, -1)
            z = xf @ V
            decay = torch.exp(-k * h)
            var = torch.where(k * h > 1e-8, -torch.expm1(-2 * k * h) / (2 * k).clamp(min=1e-30), torch.full_like(k, h))
            z_new = (
                centre
                + (z - centre) * decay
                + v * var.sqrt() * torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
            )
            noise = _randn_like(xf, generator)
            noise = noise - (noise @ V) @ V.T  # null-space part of the Brownian increment
            x_new = (xf + v * math.sqrt(h) * noise + (z_new - z) @ V.T).reshape(x.shape)
        state = state.replace(x=x_new.detach(), index=j + 1)
        if j + 2 == self.times.numel():  # at t_min: keep the final weights, no resampling
            return fk.record_ess(state)
        return fk.resample_if_needed(state, self.resample_threshold, self.scheme, generator)


def ensemble_sampler(
    model,
    measurement,
    y: Tensor,
    num_particles: int,
    *,
    num_steps: int = 100,
    potential: str = "auto",
    v_scale: float = 1.0,
    likelihood_drift: float = 0.5,
    laplacian: str = "auto",
    num_probes: int = 1,
    integrator: str = "auto",
    resample_threshold: float = 0.5,
    scheme: str = "multinomial",
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
    """Run :class:`EnsembleSampler` with ``num_particles`` particles; returns the denoised
    :math:`\\hat x_0` of the weighted particles at :math:`t_{\\min}`, and for linear measurements
    the log-evidence estimates :math:`\\log\\int q_{t_{\\min}}(x)p(y\\mid x)dx`."""
    return EnsembleSampler(
        model,
        measurement,
        y,
        potential=potential,
        v_scale=v_scale,
        likelihood_drift=likelihood_drift,
        laplacian=laplacian,
        num_probes=num_probes,
        integrator=integrator,
        resample_threshold=resample_threshold,
        scheme=scheme,
        num_steps=num_steps,
        **grid,
    ).run(
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
