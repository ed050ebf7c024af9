r"""The diffusion maths every diffusion sampler, corrector and posterior sampler shares.

**Forward process.** A diffusion model noises data :math:`x_0` along :math:`t\in[0,1]`
(0 = data, 1 = noise) as

.. math:: q_t(x_t\mid x_0) = \mathcal N(\alpha_t x_0,\ \sigma_t^2 I),

equivalently the linear SDE :math:`dx = f(t)\,x\,dt + g(t)\,dW` with
:math:`f = d\log\alpha_t/dt` and :math:`g^2 = d\sigma_t^2/dt - 2f\sigma_t^2` (Song et al. 2021,
"Score-Based Generative Modeling through SDEs"). Variance preserving schedules have
:math:`\alpha_t^2+\sigma_t^2 = 1`, variance exploding ones :math:`\alpha_t = 1`.

**Log-SNR.** The signal-to-noise ratio is :math:`\mathrm{SNR}_t = \alpha_t^2/\sigma_t^2`, and
:math:`\log\mathrm{SNR}_t = \log(\alpha_t^2/\sigma_t^2)` decreases in :math:`t`. Samplers work with
half of it, :math:`\lambda_t = \log(\alpha_t/\sigma_t) = \tfrac12\log\mathrm{SNR}_t` (the convention
of DPM-Solver, Lu et al. 2022, and what a schedule's ``log_snr`` returns): the probability-flow
ODE is an exponential integrator in :math:`\lambda`, with step :math:`h = \lambda_{\rm next} -
\lambda_{\rm now}` and :math:`\sigma_{\rm next}/\sigma_{\rm now} = (\alpha_{\rm next}/
\alpha_{\rm now})\,e^{-h}`. :func:`time_grid` places steps uniformly in :math:`t` or in
:math:`\lambda`.

**Tweedie.** The score of the noised marginal :math:`s = \nabla\log q_t(x_t)` gives the posterior
mean of the data and of the noise (Efron 2011, "Tweedie's formula"):

.. math:: \hat x_0 = E[x_0\mid x_t] = (x_t + \sigma_t^2 s)/\alpha_t,\qquad
          \hat\varepsilon = E[\varepsilon\mid x_t] = -\sigma_t s .

**DDIM.** Given :math:`x_0`, the forward process bridges back in closed form:
:math:`q(x_s\mid x_t, x_0)` for :math:`s < t` is Gaussian. Song, Meng & Ermon (2021, "Denoising
Diffusion Implicit Models", eq. 12) keep the marginals :math:`q_s` with a family of kernels
indexed by :math:`\eta\ge 0`,

.. math:: x_s\sim\mathcal N\big(\alpha_s x_0 + \sqrt{\sigma_s^2 - c^2}\;\varepsilon,\ c^2I\big),\qquad
          c = \eta\,\sigma_s\sqrt{1 - \frac{\alpha_t^2\sigma_s^2}{\alpha_s^2\sigma_t^2}},\qquad
          \varepsilon = \frac{x_t - \alpha_t x_0}{\sigma_t},

and plug in :math:`\hat x_0, \hat\varepsilon`. :math:`\eta = 1` is the exact bridge
:math:`q(x_s\mid x_t, x_0)` (DDPM's ancestral step), :math:`\eta = 0` the deterministic DDIM step,
which is first-order DPM-Solver++ (:math:`x_s = \frac{\sigma_s}{\sigma_t}x_t +
\alpha_s(1-e^{-h})\hat x_0`).

Everything here works on python floats computed once per grid (:func:`grid_coefficients`), so a
step loop never reads back from the device; the schedule is duck-typed (``alpha``, ``sigma``,
``log_snr``, ``t_of_log_snr``, optionally ``f`` and ``g2``; see
:class:`mcsample.protocols.NoiseSchedule`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "GRID_KINDS",
    "time_grid",
    "grid_coefficients",
    "tweedie_x0",
    "ddim_scales",
    "ddim_kernel",
    "ddim_update",
]

GRID_KINDS = ("uniform", "log_snr")


# ---------------------------------------------------------------------------------------------
# grids


def time_grid(
    schedule,
    num_steps: int,
    kind: str = "uniform",
    t_max: float = 1.0,
    t_min: float = 1e-3,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Decreasing times :math:`t_0 = t_{\max} > t_1 > \dots > t_N = t_{\min}`, ``N = num_steps``.

    ``kind="uniform"`` spaces them uniformly in :math:`t`; ``kind="log_snr"`` uniformly in
    :math:`\lambda_t = \log(\alpha_t/\sigma_t)`, :math:`t_i = t(\lambda_{t_{\max}} +
    \tfrac iN(\lambda_{t_{\min}} - \lambda_{t_{\max}}))` through ``schedule.t_of_log_snr``
    (the grid DPM-Solver recommends, Lu et al. 2022). Returns ``num_steps + 1`` values, computed
    in float64 and then cast to ``dtype`` on ``device``; the ends are exactly ``t_max`` and
    ``t_min``. ``schedule`` is only used by ``"log_snr"``.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    t_max, t_min = float(t_max), float(t_min)
    if not 0.0 < t_min < t_max <= 1.0:
        raise ValueError(f"need 0 < t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    if kind == "uniform":
        return torch.linspace(t_max, t_min, num_steps + 1, dtype=torch.float64).to(dtype=dtype, device=device)
    if kind != "log_snr":
        raise ValueError(f"time_grid kind must be one of {GRID_KINDS}, got {kind!r}")
    ends = torch.tensor([t_max, t_min], dtype=torch.float64)
    lam = schedule.log_snr(ends).to(torch.float64)
    if not bool(torch.isfinite(lam).all()):
        raise ValueError(f"log-SNR is not finite at t_max={t_max} or t_min={t_min}: {lam.tolist()}")
    if not float(lam[0]) < float(lam[1]):
        raise ValueError(
            f"log-SNR must decrease in t, got lambda(t_max)={float(lam[0])} >= lambda(t_min)={float(lam[1])}"
        )
    lams = torch.linspace(float(lam[0]), float(lam[1]), num_steps + 1, dtype=torch.float64)
    grid = schedule.t_of_log_snr(lams).to(torch.float64)
    grid[0], grid[-1] = t_max, t_min  # remove round-off at the ends
    if not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError(
            f"the log-SNR grid with {num_steps} steps is not strictly decreasing in t "
            "(too many steps for float64, or t_of_log_snr is not the inverse of log_snr)"
        )
    return grid.to(dtype=dtype, device=device)


def _derivatives(schedule, g: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`f = d\log\alpha/dt` and :math:`g^2 = d\sigma^2/dt - 2f\sigma^2`, from the schedule's
    ``f``/``g2`` or, when it lacks them, by autograd through ``alpha``/``sigma``."""
    if callable(getattr(schedule, "f", None)) and callable(getattr(schedule, "g2", None)):
        return schedule.f(g).to(torch.float64), schedule.g2(g).to(torch.float64)
    t = g.clone().requires_grad_(True)
    with torch.enable_grad():
        log_a = torch.log(schedule.alpha(t))
        var = schedule.sigma(t) ** 2
        if not (log_a.requires_grad and var.requires_grad):
            raise TypeError(
                f"{type(schedule).__name__} has no f/g2 and its alpha/sigma are not differentiable by autograd"
            )
        (f,) = torch.autograd.grad(log_a.sum(), t, retain_graph=True)
        (dvar,) = torch.autograd.grad(var.sum(), t)
    return f.detach(), (dvar - 2.0 * f * var).detach()


def grid_coefficients(schedule, grid: Tensor) -> dict[str, list[float]]:
    r"""Python floats on the grid, computed once in float64 on the CPU so that step loops never
    synchronize with the device.

    Keys (each a list of ``len(grid)`` floats): ``t``; ``alpha`` :math:`\alpha_t`; ``sigma``
    :math:`\sigma_t`; ``log_alpha`` :math:`\log\alpha_t`; ``log_snr``
    :math:`\lambda_t = \log(\alpha_t/\sigma_t)`; ``rho`` :math:`\sigma_t/\alpha_t`; ``f``
    :math:`d\log\alpha_t/dt`; ``g2`` :math:`g^2(t) = d\sigma_t^2/dt - 2f\sigma_t^2` (Song et al.
    2021). The grid must be 1-D, strictly decreasing (noise to data), with at least 2 times.
    """
    g = torch.as_tensor(grid).detach().to(device="cpu", dtype=torch.float64)
    if g.ndim != 1 or g.numel() < 2:
        raise ValueError(f"grid must be 1-D with at least 2 times, got shape {tuple(g.shape)}")
    if not bool((g[1:] < g[:-1]).all()):
        raise ValueError("grid must be strictly decreasing (from noise t_max down to data t_min)")
    a = schedule.alpha(g).to(torch.float64)
    s = schedule.sigma(g).to(torch.float64)
    lam = schedule.log_snr(g) if callable(getattr(schedule, "log_snr", None)) else torch.log(a / s)
    f, g2 = _derivatives(schedule, g)
    return {
        "t": g.tolist(),
        "alpha": a.tolist(),
        "sigma": s.tolist(),
        "log_alpha": torch.log(a).tolist(),
        "log_snr": lam.to(torch.float64).tolist(),
        "rho": (s / a).tolist(),
        "f": f.tolist(),
        "g2": g2.tolist(),
    }


# ---------------------------------------------------------------------------------------------
# Tweedie and the DDIM-eta kernel


def tweedie_x0(x: Tensor, score: Tensor, alpha: float, sigma: float) -> Tensor:
    r"""Tweedie's posterior mean of the data, :math:`\hat x_0 = (x_t + \sigma_t^2 s)/\alpha_t`."""
    return (x + sigma**2 * score) / alpha


def ddim_scales(
    alpha_from: float, sigma_from: float, alpha_to: float, sigma_to: float, eta: float
) -> tuple[float, float]:
    r"""The DDIM-:math:`\eta` kernel's noise scales from the noisier time ``from`` (:math:`t`) to
    ``to`` (:math:`s < t`), Song, Meng & Ermon (2021, eq. 16):

    .. math:: c = \eta\,\sigma_s\sqrt{1 - \frac{\alpha_t^2\sigma_s^2}{\alpha_s^2\sigma_t^2}},\qquad
              r = \sqrt{\sigma_s^2 - c^2};

    returns ``(r, c)``: :math:`r` multiplies :math:`\hat\varepsilon` in the mean, :math:`c` is the
    standard deviation (:math:`c^2` is the variance of :math:`q(x_s\mid x_t,x_0)` at η = 1).
    """
    if not eta >= 0.0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    c = eta * sigma_to * math.sqrt(max(0.0, 1.0 - (alpha_from * sigma_to) ** 2 / (alpha_to * sigma_from) ** 2))
    r = math.sqrt(max(0.0, sigma_to**2 - c**2))
    return r, c


def ddim_kernel(
    x: Tensor,
    score: Tensor,
    alpha_from: float,
    sigma_from: float,
    alpha_to: float,
    sigma_to: float,
    eta: float,
    x0: Tensor | None = None,
) -> tuple[Tensor, float, float]:
    r"""Mean, standard deviation and score sensitivity of the DDIM-:math:`\eta` kernel
    (Song, Meng & Ermon 2021) from :math:`t` (``from``) to :math:`s < t` (``to``) given the score
    :math:`s_\theta` at :math:`x_t`:

    .. math:: \text{mean} = \alpha_s\hat x_0 + r\hat\varepsilon,\quad
              \hat x_0 = (x_t + \sigma_t^2 s_\theta)/\alpha_t,\quad \hat\varepsilon = -\sigma_t s_\theta,
              \qquad \kappa = \frac{\partial\,\text{mean}}{\partial s_\theta}
              = \frac{\alpha_s\sigma_t^2}{\alpha_t} - r\sigma_t,

    with :math:`(r, c)` from :func:`ddim_scales`. ``x0``, when given, replaces Tweedie's
    :math:`\hat x_0` (e.g. one already computed with autograd attached). Returns
    ``(mean, c, kappa)``; a draw is ``mean + c * z``.
    """
    r, c = ddim_scales(alpha_from, sigma_from, alpha_to, sigma_to, eta)
    if x0 is None:
        x0 = tweedie_x0(x, score, alpha_from, sigma_from)
    eps = -sigma_from * score
    mean = alpha_to * x0 + r * eps
    kappa = alpha_to * sigma_from**2 / alpha_from - r * sigma_from
    return mean, c, kappa


def ddim_update(
    x: Tensor,
    x0: Tensor,
    alpha_from: float,
    sigma_from: float,
    alpha_to: float,
    sigma_to: float,
    *,
    eta: float = 0.0,
    noise: Tensor | None = None,
) -> Tensor:
    r"""One DDIM-:math:`\eta` step given a data prediction :math:`\hat x_0` (Song, Meng & Ermon
    2021): with :math:`\hat\varepsilon = (x_t - \alpha_t\hat x_0)/\sigma_t` and :math:`(r, c)` from
    :func:`ddim_scales`,

    .. math:: x_s = \alpha_s\hat x_0 + r\hat\varepsilon + c z ;

    for :math:`\eta = 0` this is first-order DPM-Solver++,
    :math:`x_s = \frac{\sigma_s}{\sigma_t}x_t + \alpha_s(1-e^{-h})\hat x_0`. ``noise`` is
    :math:`z\sim\mathcal N(0, I)`; without it the step returns the kernel's mean.
    """
    r, c = ddim_scales(alpha_from, sigma_from, alpha_to, sigma_to, eta)
    keep = r / sigma_from
    out = keep * x + (alpha_to - alpha_from * keep) * x0
    if noise is not None and c > 0.0:
        out = out + c * noise
    return out
