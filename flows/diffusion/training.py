r"""Training a score network by denoising score matching, and saving it with its schedule.

Denoising score matching (Vincent 2011; Ho et al. 2020) in its ε-prediction form minimizes

.. math:: \mathcal L(\theta) = E_{t,\,x_0,\,\varepsilon}\,
          \big\|\hat\varepsilon_\theta(\alpha_t x_0 + \sigma_t\varepsilon,\ t) - \varepsilon\big\|^2,

whose minimizer is :math:`\hat\varepsilon = -\sigma_t\nabla\log q_t`, so the trained net is a
score model through :class:`~mcsample.flows.diffusion.parameterization.Denoiser`. Times are
drawn uniformly on :math:`[t_{\min}, t_{\max}]`, or (``importance=True``) from the loss-aware
sampler of Nichol & Dhariwal (2021, "Improved DDPM"): :math:`p(t)\propto\sqrt{E[L_t^2]}` over
bins, with weights :math:`1/(K p)` so the objective is unchanged and only its variance drops. An
exponential moving average of the weights (``ema_decay``) is what gets returned.

A checkpoint is one ``torch.save`` of a plain dict — network config, schedule config,
prediction type, data scaling, ``state_dict``, free metadata — so it loads with
``torch.load(..., weights_only=True)``; it is written to a temporary name and renamed.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .networks import network_from_config
from .parameterization import Denoiser, expand_like
from .schedules import schedule_from_config

__all__ = ["dsm_loss", "LossAwareTimeSampler", "TrainResult", "train_score_model", "save_checkpoint", "load_checkpoint"]

CHECKPOINT_FORMAT = "mcsample.diffusion/1"


def dsm_loss(model: Denoiser, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    r"""Per-sample ε-prediction loss
    :math:`\|\hat\varepsilon_\theta(\alpha_t x_0+\sigma_t\varepsilon, t)-\varepsilon\|^2`,
    averaged over the event dims, shape ``(B,)``; ``model`` is a :class:`Denoiser` (any
    parameterization, preconditioned or not)."""
    a = expand_like(model.schedule.alpha(t), x0)
    s = expand_like(model.schedule.sigma(t), x0)
    pred = model.eps(a * x0 + s * eps, t)
    return (pred - eps).pow(2).flatten(1).mean(-1)


class LossAwareTimeSampler:
    r"""Importance sampling of :math:`t` (Nichol & Dhariwal 2021): ``num_bins`` equal bins on
    :math:`[t_{\min},t_{\max}]`, :math:`p_k\propto\sqrt{\overline{L^2_k}}` with
    :math:`\overline{L^2_k}` an exponential moving average (rate ``rate``) of the squared
    per-sample loss in bin k (instead of their last-10 history), mixed with ``uniform_mix`` of
    the uniform; sample weights :math:`1/(K p_k)` keep the loss an unbiased estimate of the
    uniform-time objective. Uniform until every bin has been seen ``warmup`` times."""

    def __init__(
        self,
        t_min: float,
        t_max: float,
        num_bins: int = 20,
        rate: float = 0.05,
        uniform_mix: float = 0.05,
        warmup: int = 10,
    ):
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.num_bins, self.rate = int(num_bins), float(rate)
        self.uniform_mix, self.warmup = float(uniform_mix), int(warmup)
        self._sq = torch.zeros(self.num_bins, dtype=torch.float64)
        self._count = torch.zeros(self.num_bins, dtype=torch.float64)

    def probs(self) -> Tensor:
        """Current bin probabilities."""
        if bool((self._count < self.warmup).any()):
            return torch.full((self.num_bins,), 1.0 / self.num_bins, dtype=torch.float64)
        p = self._sq.sqrt()
        p = p / p.sum()
        return (1 - self.uniform_mix) * p + self.uniform_mix / self.num_bins

    def sample(self, n: int, generator=None, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
        """``(t, weight)`` for a batch of ``n``."""
        p = self.probs()
        k = torch.multinomial(p, n, replacement=True, generator=generator)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        width = (self.t_max - self.t_min) / self.num_bins
        t = self.t_min + (k + u) * width
        w = 1.0 / (self.num_bins * p[k])
        return t.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-sample losses at times ``t``."""
        width = (self.t_max - self.t_min) / self.num_bins
        k = ((t.detach().double().cpu() - self.t_min) / width).long().clamp(0, self.num_bins - 1)
        sq = losses.detach().double().cpu().pow(2)
        cnt = torch.zeros(self.num_bins, dtype=torch.float64).index_add_(0, k, torch.ones_like(sq))
        tot = torch.zeros(self.num_bins, dtype=torch.float64).index_add_(0, k, sq)
        seen = cnt > 0
        mean = tot[seen] / cnt[seen]
        first = self._count[seen] == 0
        self._sq[seen] = torch.where(first, mean, (1 - self.rate) * self._sq[seen] + self.rate * mean)
        self._count += cnt


@dataclass
class TrainResult:
    """The trained model (EMA weights, eval mode) and the per-step training loss."""

    model: Denoiser
    losses: list[float] = field(default_factory=list)


def train_score_model(
    net: nn.Module,
    schedule,
    data: Tensor,
    *,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 2e-3,
    t_min: float = 1e-3,
    t_max: float = 1.0,
    importance: bool = False,
    ema_decay: float = 0.999,
    data_shift: float = 0.0,
    data_scale: float = 1.0,
    precondition: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> TrainResult:
    r"""Fit ``net`` (an ε-predictor) to ``data`` ``(N, *event)`` by denoising score matching.

    Adam with a cosine learning-rate decay to 10 % of ``lr`` over ``steps``; data are mapped to
    the model's units as ``(data - data_shift) / data_scale``. With ``precondition`` the
    :class:`Denoiser` uses EDM-style preconditioning with the data's mean per-coordinate
    variance (see :class:`Denoiser`). Returns a :class:`TrainResult` whose ``model`` is a
    :class:`Denoiser` holding an EMA copy of the net.
    """
    device = next(net.parameters()).device
    dtype = next(net.parameters()).dtype
    x_all = ((data - data_shift) / data_scale).to(device=device, dtype=dtype)
    n = x_all.shape[0]
    data_var = float(x_all.flatten(1).var(0).mean()) if precondition else None
    train_model = Denoiser(net, schedule, "eps", data_var=data_var)
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )
    sampler = LossAwareTimeSampler(t_min, t_max) if importance else None
    losses = []
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="score matching")
    net.train()
    for _ in it:
        idx = torch.randint(0, n, (batch_size,), generator=generator).to(device)
        x0 = x_all[idx]
        if sampler is None:
            t = t_min + (t_max - t_min) * torch.rand(batch_size, generator=generator, dtype=torch.float64)
            t, w = t.to(device=device, dtype=dtype), None
        else:
            t, w = sampler.sample(batch_size, generator, device, dtype)
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
        per = dsm_loss(train_model, x0, t, eps)
        loss = per.mean() if w is None else (w * per).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1.0 - ema_decay)
            for be, bn in zip(ema.buffers(), net.buffers()):
                be.copy_(bn)
        if sampler is not None:
            sampler.update(t, per)
        losses.append(float(loss.detach()))
    net.eval()
    model = Denoiser(ema, schedule, "eps", data_shift=data_shift, data_scale=data_scale, data_var=data_var)
    return TrainResult(model=model, losses=losses)


def save_checkpoint(path: str | os.PathLike, model: Denoiser, metadata: dict | None = None) -> None:
    """Save a :class:`Denoiser` (network config + weights, schedule, prediction, data scaling,
    ``metadata`` of plain python values) atomically: written to a temporary file next to
    ``path``, then renamed over it."""
    net = model.net
    if not hasattr(net, "config"):
        raise TypeError(
            f"{type(net).__name__} has no .config; only networks from "
            "mcsample.flows.diffusion.networks can be checkpointed"
        )
    payload = {
        "format": CHECKPOINT_FORMAT,
        "network": net.config,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "schedule": model.schedule.config(),
        "prediction": model.prediction,
        "data_shift": model.data_shift,
        "data_scale": model.data_scale,
        "data_var": model.data_var,
        "metadata": dict(metadata or {}),
    }
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> Denoiser:
    """Load a checkpoint written by :func:`save_checkpoint` (with ``weights_only=True``) and
    return the :class:`Denoiser` in eval mode; its ``metadata`` is attached as an attribute."""
    payload = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not an mcsample diffusion checkpoint (format "
            f"{payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r})"
        )
    net = network_from_config(payload["network"])
    net.load_state_dict(payload["state_dict"])
    net.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()
    model = Denoiser(
        net,
        schedule_from_config(payload["schedule"]),
        payload["prediction"],
        data_shift=payload["data_shift"],
        data_scale=payload["data_scale"],
        data_var=payload.get("data_var"),
    )
    model.metadata = payload["metadata"]
    return model
