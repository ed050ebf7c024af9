r"""Samplers for a diffusion model: the reverse SDE and the probability-flow ODE.

Walking a decreasing time grid :math:`t_0=t_{\max} > \dots > t_N=t_{\min}` (see
:func:`~mcsample.diffusion.time_grid`) from :math:`x_{t_0}\sim\mathcal N(0,
\sigma_{t_0}^2 I)`, each method turns one or two network evaluations into a step:

* **Euler–Maruyama** on the reverse SDE :math:`dx = [f x - g^2 s]\,dt + g\,d\bar W` or on the
  probability-flow ODE :math:`dx/dt = f x - \tfrac12 g^2 s` (Song et al. 2021).
* **DDIM** (Song, Meng & Ermon 2021) = first-order **DPM-Solver++**: with
  :math:`h=\lambda_t-\lambda_s`, :math:`x_t = \frac{\sigma_t}{\sigma_s}x_s +
  \alpha_t(1-e^{-h})\hat x_0(x_s)`. Its stochastic form with :math:`\eta` is
  :math:`x_t = \alpha_t\hat x_0 + \sqrt{\sigma_t^2-c^2}\,\hat\varepsilon + c z`,
  :math:`c = \eta\,\sigma_t\sqrt{1-e^{-2h}}` (η = 1 is ancestral sampling).
* **DPM-Solver++(2M)** (Lu et al. 2022, "DPM-Solver++", Alg. 2): the exponential integrator
  in λ with a linear extrapolation of the data prediction,
  :math:`x_t = \frac{\sigma_t}{\sigma_s}x_s + \alpha_t(1-e^{-h})(\hat x_s + \tfrac{1}{2r}
  (\hat x_s-\hat x_{s'}))`, :math:`r = h_{\rm prev}/h`; the last step is first order by
  default (``lower_order_final``).
* **DEIS** (Zhang & Chen 2022, ρAB-DEIS): with :math:`\rho=\sigma/\alpha` and
  :math:`y = x/\alpha`, the ODE is :math:`dy/d\rho = \hat\varepsilon`; a multistep
  Adams–Bashforth in ρ integrates the Lagrange polynomial through the last ``order`` ε's
  exactly (order 2: :math:`y' = y + \Delta\rho\,\varepsilon_t + \frac{\Delta\rho^2}{2}
  \frac{\varepsilon_t-\varepsilon_{t''}}{\rho_t-\rho_{t''}}`).

Each method is a small pure update (``*_update``) taking the current state and the model output;
:func:`sample` is the thin loop that evaluates the model, keeps the multistep history in a
:class:`SamplerState` and counts network evaluations (NFE). All scalar coefficients are
computed once from the grid before the loop (:func:`~mcsample.diffusion.grid_coefficients`), so
nothing synchronizes with the device inside it. The grid, the coefficient table and the DDIM
step are the engine's (:mod:`mcsample.diffusion`), shared with the correctors and the posterior
samplers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from mcsample.diffusion import ddim_update, grid_coefficients

from .parameterization import as_denoiser

__all__ = [
    "METHODS",
    "SamplerState",
    "SamplerResult",
    "prior_sample",
    "grid_coefficients",
    "em_update",
    "ddim_update",
    "dpmpp_2m_update",
    "deis_coefficients",
    "deis_update",
    "sample",
    "euler_maruyama",
    "ddim",
    "dpm_solver_pp_2m",
    "deis",
]

METHODS = ("em_sde", "em_ode", "ddim", "dpmpp_2m", "deis")


# ---------------------------------------------------------------------------------------------
# coefficients


def prior_sample(
    schedule,
    shape,
    t_max: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Tensor:
    r"""Draw :math:`x_{t_{\max}}\sim\mathcal N(0,\sigma_{t_{\max}}^2 I)`, the usual stand-in for
    :math:`q_{t_{\max}}` (its mean :math:`\alpha_{t_{\max}}E[x_0]` and the
    :math:`\alpha^2\mathrm{Cov}[x_0]` part of its covariance are neglected)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    sig = float(schedule.sigma(torch.tensor(float(t_max), dtype=torch.float64)))
    return sig * torch.randn(shape, generator=generator, dtype=dtype, device=device)


def _noise(x: Tensor, generator) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


# ---------------------------------------------------------------------------------------------
# pure updates


def em_update(
    x: Tensor, score: Tensor, dt: float, f: float, g2: float, *, ode: bool = False, noise: Tensor | None = None
) -> Tensor:
    r"""One Euler–Maruyama step backward by ``dt`` > 0: reverse SDE
    :math:`x - dt\,(f x - g^2 s) + \sqrt{g^2 dt}\,z`, or the probability-flow ODE
    :math:`x - dt\,(f x - \tfrac12 g^2 s)` when ``ode``."""
    if ode:
        return x - dt * (f * x - 0.5 * g2 * score)
    out = x - dt * (f * x - g2 * score)
    if noise is not None:
        out = out + math.sqrt(g2 * dt) * noise
    return out


def dpmpp_2m_update(
    x: Tensor, x0: Tensor, x0_prev: Tensor, a_t: float, s_s: float, s_t: float, h: float, h_prev: float
) -> Tensor:
    r"""DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): :math:`r=h_{\rm prev}/h`,
    :math:`D = \hat x_s + \frac{1}{2r}(\hat x_s-\hat x_{s'})`,
    :math:`x_t = \frac{\sigma_t}{\sigma_s}x_s - \alpha_t(e^{-h}-1)D`."""
    r = h_prev / h
    d = x0 + (0.5 / r) * (x0 - x0_prev)
    return (s_t / s_s) * x - a_t * math.expm1(-h) * d


def deis_coefficients(rho_nodes: list[float], rho_from: float, rho_to: float) -> list[float]:
    r"""Exact integrals :math:`\int_{\rho_{\rm from}}^{\rho_{\rm to}}\ell_j(\rho)\,d\rho` of the
    Lagrange basis through ``rho_nodes`` (newest first): the DEIS Adams–Bashforth weights."""
    coeffs = []
    for j, rj in enumerate(rho_nodes):
        poly = np.polynomial.Polynomial([1.0])
        for m, rm in enumerate(rho_nodes):
            if m != j:
                poly = poly * np.polynomial.Polynomial([-rm, 1.0]) / (rj - rm)
        integ = poly.integ()
        coeffs.append(float(integ(rho_to) - integ(rho_from)))
    return coeffs


def deis_update(x: Tensor, eps_hist: list[Tensor], coeffs: list[float], a_s: float, a_t: float) -> Tensor:
    r"""ρAB-DEIS step: :math:`x_t = \alpha_t\big(x_s/\alpha_s + \sum_j c_j\,\hat\varepsilon_j\big)`
    with ``coeffs`` from :func:`deis_coefficients` and ``eps_hist`` newest first."""
    y = x / a_s
    for c, e in zip(coeffs, eps_hist):
        y = y + c * e
    return a_t * y


# ---------------------------------------------------------------------------------------------
# state and loop


@dataclass
class SamplerState:
    """Where a sampler is: current ``x`` at grid index ``step``, the multistep ``history``
    (model outputs, newest first), network evaluations so far and the optional trajectory."""

    x: Tensor
    step: int = 0
    nfe: int = 0
    history: list[Tensor] = field(default_factory=list)
    trajectory: list[Tensor] | None = None


@dataclass
class SamplerResult:
    """Output of :func:`sample`: ``samples`` at ``grid[-1]``, the number of network evaluations,
    the grid, and the trajectory ``(len(grid), *x.shape)`` when requested."""

    samples: Tensor
    nfe: int
    grid: Tensor
    trajectory: Tensor | None = None


def _time(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def sampler_step(
    state: SamplerState,
    model,
    co: dict,
    method: str,
    *,
    eta: float = 0.0,
    order: int = 2,
    lower_order_final: bool = False,
    generator: torch.Generator | None = None,
) -> SamplerState:
    """Advance ``state`` by one grid interval with ``method`` (see :data:`METHODS`); ``co`` is
    :func:`~mcsample.diffusion.grid_coefficients` of the grid."""
    i = state.step
    n_steps = len(co["t"]) - 1
    x = state.x
    t_s, t_t = co["t"][i], co["t"][i + 1]
    a_s, s_s, a_t, s_t = co["alpha"][i], co["sigma"][i], co["alpha"][i + 1], co["sigma"][i + 1]
    last = i == n_steps - 1
    history = state.history
    if method in ("em_sde", "em_ode"):
        ode = method == "em_ode"
        s = model.score(x, _time(x, t_s))
        noise = None if ode else _noise(x, generator)
        x_new = em_update(x, s, t_s - t_t, co["f"][i], co["g2"][i], ode=ode, noise=noise)
    elif method in ("ddim", "dpmpp_2m"):
        x0 = model.denoise(x, _time(x, t_s))
        use_first = method == "ddim" or not history or (last and lower_order_final)
        if use_first:
            e = eta if method == "ddim" else 0.0
            noise = _noise(x, generator) if e > 0.0 else None
            x_new = ddim_update(x, x0, a_s, s_s, a_t, s_t, eta=e, noise=noise)
        else:
            h = co["log_snr"][i + 1] - co["log_snr"][i]
            h_prev = co["log_snr"][i] - co["log_snr"][i - 1]
            x_new = dpmpp_2m_update(x, x0, history[0], a_t, s_s, s_t, h, h_prev)
        history = [x0]
    elif method == "deis":
        eps = model.eps(x, _time(x, t_s))
        history = [eps] + history[: order - 1]
        k = 1 if (last and lower_order_final) else len(history)
        nodes = [co["rho"][i - j] for j in range(k)]
        coeffs = deis_coefficients(nodes, co["rho"][i], co["rho"][i + 1])
        x_new = deis_update(x, history[:k], coeffs, a_s, a_t)
    else:
        raise ValueError(f"unknown sampler method {method!r}; choose one of {METHODS}")
    traj = state.trajectory
    if traj is not None:
        traj = traj + [x_new]
    return SamplerState(x=x_new, step=i + 1, nfe=state.nfe + 1, history=history, trajectory=traj)


def sample(
    model,
    x_init: Tensor,
    grid: Tensor,
    method: str = "dpmpp_2m",
    *,
    eta: float = 0.0,
    order: int = 2,
    lower_order_final: bool | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
) -> SamplerResult:
    r"""Integrate from ``x_init`` at ``grid[0]`` to ``grid[-1]`` with one of :data:`METHODS`.

    Args:
        model: a ``DiffusionModel`` (``.schedule``, ``.score``); ``denoise``/``eps`` come from
            Tweedie's formula when the model lacks them.
        x_init: ``(B, *event)`` start, e.g. :func:`prior_sample`.
        grid: decreasing times, e.g. :func:`~mcsample.diffusion.time_grid`.
        method: ``"em_sde"``, ``"em_ode"``, ``"ddim"`` (``eta`` > 0 adds noise),
            ``"dpmpp_2m"`` or ``"deis"`` (``order`` 1–3 multistep in ρ).
        lower_order_final: take the last step with first order (DPM-Solver's
            ``lower_order_final``, Lu et al. 2022). Default: on for ``"dpmpp_2m"``, whose
            extrapolation :math:`\tfrac{1}{2r}(\hat x_s-\hat x_{s'})` with
            :math:`r = h_{\rm prev}/h` blows up when the last step is longer in λ than the one
            before (about 4 times on a uniform grid ending at ``t_min = 1e-3``, which made 20
            steps less accurate than 10); off for ``"deis"``, whose ρ-polynomial stays accurate
            there (a first-order last step doubles its error).
        generator: for the noise of the stochastic methods.

    One network evaluation per step: ``result.nfe == len(grid) - 1``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampler method {method!r}; choose one of {METHODS}")
    if not 1 <= order <= 3:
        raise ValueError(f"DEIS order must be 1, 2 or 3, got {order}")
    model = as_denoiser(model)
    co = grid_coefficients(model.schedule, grid)
    n_steps = len(co["t"]) - 1
    if lower_order_final is None:
        lower_order_final = method == "dpmpp_2m"
    state = SamplerState(x=x_init, trajectory=[x_init] if return_trajectory else None)
    steps = range(n_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"diffusion {method}")
    for _ in steps:
        state = sampler_step(
            state, model, co, method, eta=eta, order=order, lower_order_final=lower_order_final, generator=generator
        )
    traj = torch.stack(state.trajectory) if state.trajectory is not None else None
    return SamplerResult(samples=state.x, nfe=state.nfe, grid=torch.as_tensor(grid), trajectory=traj)


def euler_maruyama(model, x_init: Tensor, grid: Tensor, *, ode: bool = False, **kw) -> SamplerResult:
    """Euler–Maruyama on the reverse SDE (or the probability-flow ODE when ``ode``); see :func:`sample`."""
    return sample(model, x_init, grid, "em_ode" if ode else "em_sde", **kw)


def ddim(model, x_init: Tensor, grid: Tensor, *, eta: float = 0.0, **kw) -> SamplerResult:
    """DDIM = first-order DPM-Solver++ (``eta`` > 0: stochastic); see :func:`sample`."""
    return sample(model, x_init, grid, "ddim", eta=eta, **kw)


def dpm_solver_pp_2m(model, x_init: Tensor, grid: Tensor, **kw) -> SamplerResult:
    """DPM-Solver++(2M) in data-prediction form (Lu et al. 2022); see :func:`sample`."""
    return sample(model, x_init, grid, "dpmpp_2m", **kw)


def deis(model, x_init: Tensor, grid: Tensor, *, order: int = 2, **kw) -> SamplerResult:
    """ρAB-DEIS multistep of the given order (Zhang & Chen 2022); see :func:`sample`."""
    return sample(model, x_init, grid, "deis", order=order, **kw)
