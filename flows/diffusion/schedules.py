r"""Noise schedules: how a diffusion model noises its data.

A schedule fixes the forward process :math:`x_t = \alpha_t x_0 + \sigma_t\varepsilon`,
:math:`t\in[0,1]` (0 = data, 1 = noise), equivalently the linear SDE

.. math::  dx = f(t)\,x\,dt + g(t)\,dW, \qquad f = \frac{d\log\alpha_t}{dt},\qquad
           g^2 = \frac{d\sigma_t^2}{dt} - 2 f \sigma_t^2 .

Everything a solver needs is a function of :math:`t` through :math:`\alpha_t`,
:math:`\sigma_t` and the log signal-to-noise ratio :math:`\lambda_t = \log(\alpha_t/\sigma_t)`,
which decreases in :math:`t`; its inverse :math:`t(\lambda)` lets a sampler place its steps
uniformly in :math:`\lambda` (Lu et al. 2022, DPM-Solver).

* :class:`VPSchedule` — variance preserving, :math:`\alpha_t^2+\sigma_t^2=1` (Song et al. 2021,
  "Score-Based Generative Modeling through SDEs"): ``kind="linear"`` has
  :math:`\beta(t)=\beta_{\min}+t(\beta_{\max}-\beta_{\min})`, :math:`\log\alpha_t =
  -\tfrac12\int_0^t\beta`; ``kind="cosine"`` is Nichol & Dhariwal's (2021)
  :math:`\alpha_t = \cos(\phi(t))/\cos(\phi(0))`, :math:`\phi = \frac{\pi}{2}\frac{Tt+s}{1+s}`,
  truncated at :math:`T=0.9946` as in DPM-Solver so that :math:`\lambda_1` is finite.
  For VP, :math:`g^2 = -2f = \beta(t)`.
* :class:`VESchedule` — variance exploding, :math:`\alpha_t=1`,
  :math:`\sigma_t=\sigma_{\min}(\sigma_{\max}/\sigma_{\min})^t`, :math:`f=0`,
  :math:`g^2 = 2\sigma_t^2\log(\sigma_{\max}/\sigma_{\min})`.

All methods take tensors (python floats are promoted) and keep their dtype and device.
:func:`time_grid` (from :mod:`mcsample.diffusion`) builds the decreasing grid of times a
sampler walks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mcsample.diffusion import time_grid

__all__ = ["VPSchedule", "VESchedule", "time_grid", "schedule_from_config"]


def _as_tensor(t) -> Tensor:
    if isinstance(t, Tensor):
        return t if t.is_floating_point() else t.to(torch.get_default_dtype())
    return torch.as_tensor(t, dtype=torch.get_default_dtype())


class _Schedule:
    """Shared methods for subclasses that define ``log_alpha`` and ``log_sigma``: α, σ, the
    log-SNR, and a config for checkpoints."""

    def alpha(self, t) -> Tensor:
        r""":math:`\alpha_t`, the scale of the data in :math:`x_t`."""
        return torch.exp(self.log_alpha(_as_tensor(t)))

    def sigma(self, t) -> Tensor:
        r""":math:`\sigma_t`, the standard deviation of the added noise."""
        return torch.exp(self.log_sigma(_as_tensor(t)))

    def log_snr(self, t) -> Tensor:
        r""":math:`\lambda_t = \log\alpha_t - \log\sigma_t` (half the log signal-to-noise ratio)."""
        t = _as_tensor(t)
        return self.log_alpha(t) - self.log_sigma(t)

    def config(self) -> dict:
        """Plain-python description, enough to rebuild the schedule (see :func:`schedule_from_config`)."""
        return {"class": type(self).__name__, "kwargs": dict(self._kwargs)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._kwargs.items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return isinstance(other, _Schedule) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(repr(self))


class VPSchedule(_Schedule):
    r"""Variance-preserving schedule, :math:`\alpha_t^2 + \sigma_t^2 = 1`.

    ``kind="linear"`` (Song et al. 2021): :math:`\beta(t) = \beta_{\min} +
    t(\beta_{\max}-\beta_{\min})`, :math:`\log\alpha_t = -\tfrac12(\beta_{\min}t +
    \tfrac12(\beta_{\max}-\beta_{\min})t^2)`, :math:`f=-\beta/2`, :math:`g^2=\beta`.
    ``kind="cosine"`` (Nichol & Dhariwal 2021): :math:`\alpha_t=\cos\phi_t/\cos\phi_0`,
    :math:`\phi_t = \frac{\pi}{2}\frac{T t + s}{1+s}`, with offset ``cosine_s`` and end
    ``cosine_t_end`` :math:`=T` (DPM-Solver's truncation, :math:`\lambda_1\approx-4.8`);
    ``beta_min``/``beta_max`` are unused for it.

    **Default β range.** ``beta_max = 20`` (DDPM; Song et al. 2021). The samplers start from
    :math:`\mathcal N(0, I)` in place of :math:`q_1`; by convexity of the KL divergence,
    :math:`\mathrm{KL}(q_1\,\|\,\mathcal N(0,I))\le\tfrac12\alpha_1^2E\|x_0\|^2 +
    \tfrac14 d\,\alpha_1^4`, with :math:`\alpha_1 = e^{-(\beta_{\min}+\beta_{\max})/4} =
    6.6\times10^{-3}`: exact to :math:`10^{-5}` nats per coordinate for data of unit scale, and
    :math:`2.8\times10^{-3}` per coordinate for the 25-mode Gaussian-mixture benchmark (means at
    :math:`\pm16`, :math:`E[x_{0,i}^2]\approx129`; 0.2 nats in 80 dimensions), which the posterior
    samplers remove with an exact start weight when the model has ``log_prob(x, t)``.
    ``beta_max = 40`` (:math:`\alpha_1 = 4.4\times10^{-5}`) makes the start exact for data of RMS
    scale up to 20 without that weight, at a price: a grid of fixed length spends more steps in
    near-pure noise (DPM-Solver++(2M), 20 uniform steps, unit-scale Gaussian data: endpoint
    error 0.072 instead of 0.046), and the Euler–Maruyama discretization bias of the Feynman-Kac
    correctors grows (product of two 2-D mixtures, 200 uniform steps, 256 particles, 30 seeds:
    log-evidence bias +0.28 nats at 20, +1.8 at 40). Configs (and checkpoints) store
    ``beta_max`` explicitly and rebuild identically whatever the default.
    """

    def __init__(
        self,
        kind: str = "linear",
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        *,
        cosine_s: float = 0.008,
        cosine_t_end: float = 0.9946,
    ):
        if kind not in ("linear", "cosine"):
            raise ValueError(f"VPSchedule kind must be 'linear' or 'cosine', got {kind!r}")
        if kind == "linear" and not (0.0 <= beta_min < beta_max):
            raise ValueError(f"need 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        if kind == "cosine" and not (0.0 < cosine_t_end < 1.0 and cosine_s > 0):
            raise ValueError("cosine schedule needs cosine_s > 0 and 0 < cosine_t_end < 1")
        self.kind = kind
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self.cosine_s = float(cosine_s)
        self.cosine_t_end = float(cosine_t_end)
        self._kwargs = {
            "kind": kind,
            "beta_min": self.beta_min,
            "beta_max": self.beta_max,
            "cosine_s": self.cosine_s,
            "cosine_t_end": self.cosine_t_end,
        }
        self._phi_scale = 0.5 * math.pi / (1.0 + self.cosine_s)
        self._log_cos_phi0 = math.log(math.cos(self.cosine_s * self._phi_scale))

    # -- linear: β(t) and its integral ----------------------------------------------------
    def beta(self, t) -> Tensor:
        r""":math:`\beta(t) = g^2(t) = -2 f(t)`, the instantaneous noise rate."""
        return self.g2(t)

    def _phi(self, t: Tensor) -> Tensor:
        return (self.cosine_t_end * t + self.cosine_s) * self._phi_scale

    def log_alpha(self, t) -> Tensor:
        r""":math:`\log\alpha_t`."""
        t = _as_tensor(t)
        if self.kind == "linear":
            return -0.5 * t * (self.beta_min + 0.5 * (self.beta_max - self.beta_min) * t)
        # clamp: at t = 0 round-off could make log α slightly positive and σ NaN
        return (torch.log(torch.cos(self._phi(t))) - self._log_cos_phi0).clamp(max=0.0)

    def log_sigma(self, t) -> Tensor:
        r""":math:`\log\sigma_t = \tfrac12\log(1-\alpha_t^2)`, via ``expm1`` for small t."""
        la = self.log_alpha(t)
        return 0.5 * torch.log(-torch.expm1(2.0 * la))

    def f(self, t) -> Tensor:
        r"""Drift coefficient :math:`f(t) = d\log\alpha_t/dt`."""
        t = _as_tensor(t)
        if self.kind == "linear":
            return -0.5 * (self.beta_min + (self.beta_max - self.beta_min) * t)
        return -torch.tan(self._phi(t)) * (self._phi_scale * self.cosine_t_end)

    def g2(self, t) -> Tensor:
        r"""Squared diffusion :math:`g^2 = d\sigma^2/dt - 2f\sigma^2 = -2f` for VP."""
        return -2.0 * self.f(t)

    def t_of_log_snr(self, lam) -> Tensor:
        r"""Inverse of :math:`\lambda_t`: :math:`\log\alpha = -\tfrac12\operatorname{softplus}(-2\lambda)`,
        then the closed-form inverse of :math:`\log\alpha_t` (a quadratic for ``linear``, an
        arccos for ``cosine``)."""
        lam = _as_tensor(lam)
        c = torch.nn.functional.softplus(-2.0 * lam)  # = -2 log α
        if self.kind == "linear":
            d = self.beta_max - self.beta_min
            # β_min t + d t²/2 = c  ->  stable root 2c / (β_min + sqrt(β_min² + 2 d c))
            return 2.0 * c / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * d * c))
        log_cos = -0.5 * c + self._log_cos_phi0
        phi = torch.acos(torch.exp(log_cos).clamp(max=1.0))
        return (phi / self._phi_scale - self.cosine_s) / self.cosine_t_end


class VESchedule(_Schedule):
    r"""Variance-exploding schedule (Song et al. 2021): :math:`\alpha_t = 1`,
    :math:`\sigma_t = \sigma_{\min}(\sigma_{\max}/\sigma_{\min})^t`, :math:`f = 0`,
    :math:`g^2 = d\sigma_t^2/dt = 2\sigma_t^2\log(\sigma_{\max}/\sigma_{\min})`,
    :math:`\lambda_t = -\log\sigma_t`.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not (0.0 < sigma_min < sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self._kwargs = {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def log_alpha(self, t) -> Tensor:
        r""":math:`\log\alpha_t = 0`."""
        return torch.zeros_like(_as_tensor(t))

    def log_sigma(self, t) -> Tensor:
        r""":math:`\log\sigma_t = \log\sigma_{\min} + t\log(\sigma_{\max}/\sigma_{\min})`."""
        return math.log(self.sigma_min) + _as_tensor(t) * self._log_ratio

    def f(self, t) -> Tensor:
        """Drift coefficient, zero for VE."""
        return torch.zeros_like(_as_tensor(t))

    def g2(self, t) -> Tensor:
        r""":math:`g^2 = 2\sigma_t^2\log(\sigma_{\max}/\sigma_{\min})`."""
        return 2.0 * self._log_ratio * torch.exp(2.0 * self.log_sigma(t))

    def t_of_log_snr(self, lam) -> Tensor:
        r"""Inverse of :math:`\lambda_t = -\log\sigma_t`."""
        return (-_as_tensor(lam) - math.log(self.sigma_min)) / self._log_ratio


_SCHEDULES = {"VPSchedule": VPSchedule, "VESchedule": VESchedule}


def schedule_from_config(config: dict):
    """Rebuild a schedule from :meth:`config` output (as stored in checkpoints)."""
    try:
        cls = _SCHEDULES[config["class"]]
    except KeyError as err:
        raise ValueError(f"unknown schedule config {config!r}; known: {sorted(_SCHEDULES)}") from err
    return cls(**config.get("kwargs", {}))
