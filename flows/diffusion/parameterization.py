r"""One place for the conversions between what a diffusion network can predict.

With :math:`x_t = \alpha_t x_0 + \sigma_t\varepsilon` a network may output the noise
:math:`\hat\varepsilon`, the clean data :math:`\hat x_0` (a denoiser), the score
:math:`s=\nabla\log q_t`, or the velocity :math:`v = \alpha_t\varepsilon - \sigma_t x_0`
(Salimans & Ho 2022). At the optimum all are the same object, related by Tweedie's formula

.. math:: s = -\hat\varepsilon/\sigma_t,\qquad
          \hat x_0 = (x + \sigma_t^2 s)/\alpha_t = (x - \sigma_t\hat\varepsilon)/\alpha_t,\qquad
          \hat\varepsilon = (x - \alpha_t\hat x_0)/\sigma_t .

:class:`Denoiser` wraps a network ``net(x, t)`` predicting any of them, together with its
schedule, into a ``DiffusionModel`` offering ``score``, ``denoise`` and ``eps``. Every function
broadcasts a per-sample :math:`\alpha_t, \sigma_t` of shape ``(B,)`` (or a scalar) against
``x`` of shape ``(B, *event)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "PREDICTIONS",
    "expand_like",
    "eps_to_score",
    "score_to_eps",
    "x0_to_score",
    "score_to_x0",
    "eps_to_x0",
    "x0_to_eps",
    "v_to_eps",
    "v_to_x0",
    "to_eps",
    "Denoiser",
    "as_denoiser",
]

PREDICTIONS = ("eps", "x0", "score", "v")


def expand_like(c, x: Tensor) -> Tensor:
    """Reshape a scalar or ``(B,)`` coefficient to broadcast against ``x`` of shape ``(B, *event)``."""
    c = torch.as_tensor(c, dtype=x.dtype, device=x.device)
    if c.ndim == 0:
        return c
    if c.ndim == 1 and c.shape[0] == x.shape[0]:
        return c.reshape(c.shape[0], *([1] * (x.ndim - 1)))
    if c.ndim == 1 and c.shape[0] == 1:
        return c.reshape(*([1] * x.ndim))
    raise ValueError(
        f"coefficient of shape {tuple(c.shape)} does not broadcast against x of shape "
        f"{tuple(x.shape)}; expected a scalar or ({x.shape[0]},)"
    )


def eps_to_score(eps: Tensor, sigma) -> Tensor:
    r""":math:`s = -\varepsilon/\sigma_t`."""
    return -eps / expand_like(sigma, eps)


def score_to_eps(score: Tensor, sigma) -> Tensor:
    r""":math:`\varepsilon = -\sigma_t s`."""
    return -expand_like(sigma, score) * score


def x0_to_score(x0: Tensor, x: Tensor, alpha, sigma) -> Tensor:
    r""":math:`s = (\alpha_t\hat x_0 - x)/\sigma_t^2`."""
    a, s = expand_like(alpha, x), expand_like(sigma, x)
    return (a * x0 - x) / (s * s)


def score_to_x0(score: Tensor, x: Tensor, alpha, sigma) -> Tensor:
    r"""Tweedie: :math:`\hat x_0 = (x + \sigma_t^2 s)/\alpha_t`."""
    a, s = expand_like(alpha, x), expand_like(sigma, x)
    return (x + s * s * score) / a


def eps_to_x0(eps: Tensor, x: Tensor, alpha, sigma) -> Tensor:
    r""":math:`\hat x_0 = (x - \sigma_t\hat\varepsilon)/\alpha_t`."""
    return (x - expand_like(sigma, x) * eps) / expand_like(alpha, x)


def x0_to_eps(x0: Tensor, x: Tensor, alpha, sigma) -> Tensor:
    r""":math:`\hat\varepsilon = (x - \alpha_t\hat x_0)/\sigma_t`."""
    return (x - expand_like(alpha, x) * x0) / expand_like(sigma, x)


def v_to_eps(v: Tensor, x: Tensor, alpha, sigma) -> Tensor:
    r"""From :math:`v=\alpha\varepsilon-\sigma x_0`: :math:`\varepsilon = (\alpha v + \sigma x)/(\alpha^2+\sigma^2)`."""
    a, s = expand_like(alpha, x), expand_like(sigma, x)
    return (a * v + s * x) / (a * a + s * s)


def v_to_x0(v: Tensor, x: Tensor, alpha, sigma) -> Tensor:
    r"""From :math:`v=\alpha\varepsilon-\sigma x_0`: :math:`x_0 = (\alpha x - \sigma v)/(\alpha^2+\sigma^2)`."""
    a, s = expand_like(alpha, x), expand_like(sigma, x)
    return (a * x - s * v) / (a * a + s * s)


def to_eps(out: Tensor, prediction: str, x: Tensor, alpha, sigma) -> Tensor:
    """Convert a network output of kind ``prediction`` (one of :data:`PREDICTIONS`) to ε."""
    if prediction == "eps":
        return out
    if prediction == "x0":
        return x0_to_eps(out, x, alpha, sigma)
    if prediction == "score":
        return score_to_eps(out, sigma)
    if prediction == "v":
        return v_to_eps(out, x, alpha, sigma)
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def _time_tensor(t, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t


class Denoiser:
    r"""A network plus its schedule as a ``DiffusionModel``: ``score``, ``denoise``, ``eps``.

    Args:
        net: callable ``net(x, t) -> Tensor`` with ``x`` ``(B, *event)``, ``t`` ``(B,)``,
            returning a tensor shaped like ``x``. A ``torch.nn.Module`` is kept in eval mode
            by :meth:`eval`; gradients are not disabled, so the wrapper composes with autograd
            (posterior samplers differentiate through :meth:`denoise`).
        schedule: the :class:`~mcsample.protocols.NoiseSchedule` the net was trained with.
        prediction: what ``net`` outputs: ``"eps"``, ``"x0"``, ``"score"`` or ``"v"``.
        data_shift, data_scale: the net models :math:`(x_0-\text{shift})/\text{scale}`;
            :meth:`score` etc. are in those normalized units, and :meth:`to_data` /
            :meth:`from_data` map between them (kept in the checkpoint).
        data_var: if given (``prediction="eps"`` only), precondition as in EDM (Karras et al.
            2022): with :math:`v` the per-coordinate data variance and
            :math:`\tau^2=\alpha_t^2v+\sigma_t^2`,
            :math:`\hat\varepsilon = \frac{\sigma_t}{\tau^2}x + \frac{\alpha_t\sqrt v}{\tau}
            F_\theta(x/\tau, t)`. The first term is the exact ε of Gaussian data, so the net
            learns a unit-scale residual and its errors reach :math:`\hat x_0` multiplied by
            :math:`\sigma_t\sqrt v/\tau` instead of :math:`\sigma_t/\alpha_t` (≈150 at
            t = 1 for the linear VP schedule).
    """

    def __init__(
        self,
        net,
        schedule,
        prediction: str = "eps",
        *,
        data_shift: float = 0.0,
        data_scale: float = 1.0,
        data_var: float | None = None,
    ):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if data_var is not None and (prediction != "eps" or not data_var > 0):
            raise ValueError("data_var preconditioning needs prediction='eps' and data_var > 0")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.data_shift = float(data_shift)
        self.data_scale = float(data_scale)
        self.data_var = None if data_var is None else float(data_var)

    def _coeffs(self, x: Tensor, t):
        t = _time_tensor(t, x)
        return t, self.schedule.alpha(t), self.schedule.sigma(t)

    def _raw(self, x: Tensor, t: Tensor, a: Tensor, s: Tensor) -> Tensor:
        """Network output in the ``prediction`` parameterization (preconditioned if asked)."""
        if self.data_var is None:
            return self.net(x, t)
        v = self.data_var
        a_, s_ = expand_like(a, x), expand_like(s, x)
        tau2 = a_ * a_ * v + s_ * s_
        tau = torch.sqrt(tau2)
        return (s_ / tau2) * x + (a_ * math.sqrt(v) / tau) * self.net(x / tau, t)

    def eps(self, x: Tensor, t) -> Tensor:
        r"""Noise prediction :math:`\hat\varepsilon(x, t)`."""
        t, a, s = self._coeffs(x, t)
        return to_eps(self._raw(x, t, a, s), self.prediction, x, a, s)

    def score(self, x: Tensor, t) -> Tensor:
        r"""Score :math:`s(x,t) = -\hat\varepsilon/\sigma_t` (direct when the net predicts it)."""
        t, a, s = self._coeffs(x, t)
        out = self._raw(x, t, a, s)
        if self.prediction == "score":
            return out
        return eps_to_score(to_eps(out, self.prediction, x, a, s), s)

    def denoise(self, x: Tensor, t) -> Tensor:
        r"""Data prediction :math:`\hat x_0(x,t) = E[x_0\mid x_t]` (Tweedie)."""
        t, a, s = self._coeffs(x, t)
        out = self._raw(x, t, a, s)
        if self.prediction == "x0":
            return out
        if self.prediction == "v":
            return v_to_x0(out, x, a, s)
        return eps_to_x0(to_eps(out, self.prediction, x, a, s), x, a, s)

    def to_data(self, x: Tensor) -> Tensor:
        """Map samples from the model's normalized units back to data units."""
        return x * self.data_scale + self.data_shift

    def from_data(self, x: Tensor) -> Tensor:
        """Map data to the model's normalized units."""
        return (x - self.data_shift) / self.data_scale

    def eval(self) -> Denoiser:
        """Put a ``torch.nn.Module`` net in eval mode; returns self."""
        if isinstance(self.net, torch.nn.Module):
            self.net.eval()
        return self

    def __repr__(self) -> str:
        return f"Denoiser({type(self.net).__name__}, {self.schedule!r}, prediction={self.prediction!r})"


class _ScoreOnly:
    """Adapter giving ``denoise``/``eps`` to a model that only has ``score`` (Tweedie)."""

    def __init__(self, model):
        self.model = model
        self.schedule = model.schedule

    def score(self, x: Tensor, t) -> Tensor:
        return self.model.score(x, t)

    def eps(self, x: Tensor, t) -> Tensor:
        t = _time_tensor(t, x)
        return score_to_eps(self.model.score(x, t), self.schedule.sigma(t))

    def denoise(self, x: Tensor, t) -> Tensor:
        t = _time_tensor(t, x)
        return score_to_x0(self.model.score(x, t), x, self.schedule.alpha(t), self.schedule.sigma(t))


def as_denoiser(model):
    """Return ``model`` if it already has ``score``, ``denoise`` and ``eps``; otherwise wrap a
    score-only ``DiffusionModel`` so that ``denoise``/``eps`` come from Tweedie's formula."""
    if all(callable(getattr(model, m, None)) for m in ("score", "denoise", "eps")):
        return model
    if not callable(getattr(model, "score", None)) or getattr(model, "schedule", None) is None:
        raise TypeError(f"{type(model).__name__} is not a DiffusionModel: needs .schedule and .score(x, t)")
    return _ScoreOnly(model)
