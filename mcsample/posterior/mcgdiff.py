r"""Monte Carlo guided diffusion (Cardoso, Janati, Le Corff & Moulines 2023, ICLR 2024) for
linear-Gaussian measurements :math:`y = Ax + \sigma_y\xi`, in the SVD basis
:math:`A = U\mathrm{diag}(S)V^\top`: with :math:`\bar y = U^\top y/S` and
:math:`\bar\sigma_i = \sigma_y/S_i`, the noisy observation of coordinate :math:`i` of
:math:`V^\top x_0` is a noiseless observation :math:`\alpha_{\tau_i}\bar y_i` of that coordinate
of :math:`x_{\tau_i}`, where :math:`\sigma_{\tau_i}/\alpha_{\tau_i} = \bar\sigma_i`. SMC with
Gaussian potentials that pin the coordinate by :math:`\tau_i`, proposals that are the exact
product of the Gaussian backward kernel and the next potential (fully adapted), and the prior
kernel afterwards. Exact as :math:`N\to\infty` when the reverse kernels are those of the
forward process (exact score, fine grid).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mcsample import feynman_kac as fk
from mcsample.posterior.base import PosteriorSampler, PosteriorState, _randn_like, _svd_pieces
from mcsample.weighted import WeightedSamples

__all__ = ["MCGdiff", "mcgdiff"]


class MCGdiff(PosteriorSampler):
    r"""Monte Carlo guided diffusion (Cardoso et al. 2023) for :math:`y = Ax + \sigma_y\xi`.

    In the SVD basis, :math:`\bar y_i = (U^\top y)_i/S_i = (V^\top x_0)_i + \bar\sigma_i\xi_i`,
    :math:`\bar\sigma_i = \sigma_y/S_i`. At the time :math:`\tau_i` with
    :math:`\sigma_{\tau_i}/\alpha_{\tau_i} = \bar\sigma_i` (inserted into the grid, found with
    ``schedule.t_of_log_snr``), :math:`\alpha_{\tau_i}\bar y_i` has the law of the noised
    coordinate :math:`(V^\top x_{\tau_i})_i`, so
    :math:`p(x_0\mid y)\propto\int p(x_0\mid x_{\tau})\,q_\tau(x_\tau)\prod_i
    \delta\big((V^\top x_{\tau_i})_i - \alpha_{\tau_i}\bar y_i\big)`: the noisy problem at
    time 0 is a noiseless one at :math:`\tau_i`. The SMC targets
    :math:`p_\theta(x_{t_j:t_K})\prod_i g_{j,i}(x_{t_j})` with potentials
    :math:`g_{j,i}(x) = \mathcal N\big(\alpha_{t_j}\bar y_i;\ (V^\top x)_i,\ \sigma_{t_j|\tau_i}^2 +
    \alpha_{t_j|\tau_i}^2(\kappa + e_i)\big)` while :math:`t_j\ge\tau_i` (the paper's, with
    :math:`\alpha_{t|\tau} = \alpha_t/\alpha_\tau`, :math:`\sigma^2_{t|\tau} = \sigma_t^2 -
    \alpha_{t|\tau}^2\sigma_\tau^2`); the potential at :math:`\tau_i` itself stays in the target
    (it *is* the likelihood, up to :math:`\kappa`), and afterwards the coordinate follows the
    prior kernel. Proposals are the exact product of the Gaussian kernel and the next
    potential, the weights its normalizer over the current potential (fully adapted:
    resampling happens before moving). A coordinate so noisy that :math:`\tau_i` would lie
    beyond :math:`t_{\max}` is attached at :math:`t_{\max}` with the extra variance
    :math:`e_i = \alpha_{t_{\max}}^2\bar\sigma_i^2 - \sigma_{t_{\max}}^2` (else :math:`e_i = 0`).

    Asymptotically exact as :math:`N\to\infty` when the reverse kernels are those of the
    forward process (exact score, fine grid) and :math:`\kappa\to0`; ``kappa`` (default
    :math:`10^{-4}`, the authors' code) keeps the pinned potential from being a point mass.
    The log-evidence of the result estimates :math:`\log p(y)`. Needs ``measurement.svd()``.
    """

    name = "MCGdiff"

    def __init__(
        self,
        model,
        measurement,
        y,
        *,
        eta: float = 1.0,
        kappa: float = 1e-4,
        resample_threshold: float = 1.0,
        scheme: str = "systematic",
        **grid,
    ):
        super().__init__(model, measurement, y, **grid)
        if not callable(getattr(measurement, "svd", None)) or getattr(measurement, "sigma_y", None) is None:
            raise TypeError("MCGdiff needs a linear Gaussian measurement with .svd() and .sigma_y")
        if eta <= 0 or kappa <= 0:
            raise ValueError("MCGdiff needs eta > 0 and kappa > 0")
        fk.check_resampling(resample_threshold, scheme)
        self.eta = float(eta)
        self.kappa = float(kappa)
        self.resample_threshold = float(resample_threshold)
        self.scheme = scheme
        # observation times tau_i, inserted into the grid
        _, S, _ = measurement.svd()
        sig_bar = measurement.sigma_y / S.to(torch.float64)
        t_max = float(self.times[0])
        lam_max = float(self.schedule.log_snr(torch.tensor(t_max, dtype=torch.float64)))
        lam = -torch.log(sig_bar)
        tau = torch.where(
            lam <= lam_max, torch.full_like(lam, t_max), self.schedule.t_of_log_snr(lam).to(torch.float64)
        )
        times = torch.cat([self.times, tau]).unique(sorted=True).flip(0)
        keep = torch.ones_like(times, dtype=torch.bool)
        keep[1:] = (times[:-1] - times[1:]) > 1e-12  # merge near-duplicates
        self._set_times(times[keep])
        self.tau_index = torch.searchsorted(-self.times, -tau - 1e-12)  # grid index of each tau_i
        self.tau_index = self.tau_index.clamp(max=self.times.numel() - 1)
        a0, s0 = self.alpha[0], self.sigma[0]
        self.extra = torch.where(lam <= lam_max, (a0 * sig_bar) ** 2 - s0**2, torch.zeros_like(sig_bar)).clamp(min=0)
        self._pieces = None

    def prepare(self, state: PosteriorState) -> None:
        super().prepare(state)
        self._setup(state.x.dtype, state.x.device)

    def _setup(self, dtype, device):
        U, S, V, ybar, uy, S64, y_perp_sq = _svd_pieces(self.measurement, self.y, dtype, device)
        self._pieces = {"V": V, "ybar": ybar, "tau": self.tau_index.to(device), "S64": S64, "y_perp_sq": y_perp_sq}
        return self._pieces

    def potential(self, j: int, dtype=torch.float64, device=None):
        r"""Mean factor :math:`\alpha_{t_j}`, variances of the potentials at grid index ``j`` and
        the mask of coordinates with :math:`t_j\ge\tau_i`."""
        tau = self.tau_index
        a_tau = torch.tensor(self.alpha, dtype=torch.float64)[tau]
        s_tau = torch.tensor(self.sigma, dtype=torch.float64)[tau]
        a_rel = self.alpha[j] / a_tau
        var = (self.sigma[j] ** 2 - a_rel**2 * s_tau**2).clamp(min=0.0) + a_rel**2 * (self.kappa + self.extra)
        return self.alpha[j], var.to(dtype=dtype, device=device), (j <= tau).to(device)

    def _log_g_twist(self, z: Tensor, j: int) -> Tensor:
        """Sum of the potentials at ``j`` that are twists (coordinates with :math:`t_j > \\tau_i`)."""
        p = self._pieces
        a, var, _ = self.potential(j, z.dtype, z.device)
        twist = (j < p["tau"]).to(z.dtype)
        lg = -0.5 * ((z - a * p["ybar"]) ** 2 / var + torch.log(2 * math.pi * var))
        return (lg * twist).sum(-1).to(torch.float64)

    def init(self, generator) -> PosteriorState:
        num, dtype, device = self.num_particles, self.dtype, self.device
        p = self._setup(dtype, device)
        V, ybar = p["V"], p["ybar"]
        rho2 = self.prior_std() ** 2
        a, var, active = self.potential(0, dtype, device)  # every coordinate is active at t_max
        x = self.initial_noise(num, generator).reshape(num, -1)
        # N(0, ρ²) × N(a ȳ; z, v) -> Gaussian; weight = N(a ȳ; 0, ρ² + v)
        prec = 1.0 / rho2 + 1.0 / var
        m = (a * ybar / var) / prec
        z = m + torch.randn((num, ybar.numel()), generator=generator, dtype=dtype, device=device) / prec.sqrt()
        x = x + (z - x @ V) @ V.T
        var64 = var.to(torch.float64)
        ybar64 = ybar.to(torch.float64)
        log_norm = -0.5 * ((a * ybar64) ** 2 / (rho2 + var64) + torch.log(2 * math.pi * (rho2 + var64))).sum()
        # from the pseudo-observations α_τ ȳ back to y: log p(y) = log p(α_τ ȳ) + Σ log(α_τ/S) + log p(y_⊥)
        a_tau = torch.tensor(self.alpha, dtype=torch.float64)[self.tau_index]
        m_dim = self.y.numel()
        r = ybar.numel()
        sig2 = self.measurement.sigma_y**2
        log_jac = (
            torch.log(a_tau).sum()
            - torch.log(p["S64"].cpu()).sum()
            - 0.5 * p["y_perp_sq"] / sig2
            - 0.5 * (m_dim - r) * math.log(2 * math.pi * sig2)
        )
        x = x.reshape(num, *self.event_shape)
        state = fk.start(
            x,
            self.start_log_weight(x),
            log_scale=float(log_norm) + float(log_jac),
            cache={"log_g": self._log_g_twist(z, 0)},
            counters={"nfe": 0, "vjp": 0},
        )
        return fk.record_ess(state)

    def step(self, state: PosteriorState, generator) -> PosteriorState:
        j = state.index
        p = self._pieces
        V, ybar = p["V"], p["ybar"]
        n = state.x.shape[0]
        s = self.score(state.x, j)
        state = state.count(nfe=1)
        if j + 1 < self.times.numel():
            mean, sd, _ = self.kernel(state.x, s, j, self.eta)
            mflat = mean.reshape(n, -1)
            zm = mflat @ V
            a, var, active = self.potential(j + 1, mflat.dtype, mflat.device)
            act = active.to(mflat.dtype)
            tot = sd**2 + var
            log_pred = (-0.5 * ((a * ybar - zm) ** 2 / tot + torch.log(2 * math.pi * tot)) * act).sum(-1)
            state = fk.reweight(state, log_pred.to(torch.float64) - state.cache["log_g"], f"MCGdiff step {j}")
            state = state.replace(cache={"mflat": mflat, "zm": zm})
            # fully adapted: resample on the predictive weights, then move
            state = fk.resample_if_needed(state, self.resample_threshold, self.scheme, generator)
            mflat, zm = state.cache["mflat"], state.cache["zm"]
            x_new = mflat + sd * _randn_like(mflat, generator)
            prec = 1.0 / sd**2 + 1.0 / var
            zc = (zm / sd**2 + a * ybar / var) / prec
            z_act = zc + _randn_like(zm, generator) / prec.sqrt()
            z_free = x_new @ V
            z_new = torch.where(active, z_act, z_free)
            x_new = x_new + (z_new - z_free) @ V.T
            state = state.replace(x=x_new.reshape(state.x.shape), cache={"log_g": self._log_g_twist(z_new, j + 1)})
        else:  # t_min -> 0 deterministically; every potential left is a pinned likelihood
            # (the remaining log g is zero unless tau_i = t_min was skipped)
            state = fk.reweight(state, -state.cache["log_g"], "MCGdiff last step")
            state = fk.record_ess(state.replace(x=self.x0_from_score(state.x, s, j), cache={}))
        return state.replace(index=j + 1)


def mcgdiff(
    model,
    measurement,
    y: Tensor,
    num_particles: int,
    *,
    num_steps: int = 100,
    eta: float = 1.0,
    kappa: float = 1e-4,
    resample_threshold: float = 1.0,
    scheme: str = "systematic",
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
    """Run :class:`MCGdiff` (resampling every step by default, as in the paper's code); the
    log-evidence of the result estimates :math:`\\log p(y)`."""
    return MCGdiff(
        model,
        measurement,
        y,
        eta=eta,
        kappa=kappa,
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
