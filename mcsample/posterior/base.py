r"""What the diffusion posterior samplers share: the time grid and its coefficient tables, the
DDIM reverse kernel, Tweedie's denoiser, the measurement helpers, and the run on the engine's
Feynman-Kac driver (:func:`mcsample.feynman_kac.run`).

A sampler is a :class:`PosteriorSampler` with ``init(generator)`` and a pure
``step(state, generator)`` over the core's :class:`~mcsample.feynman_kac.FKState`; per-particle
values a step reuses at the next one (scores, denoised predictions, twists) live in the state's
``cache`` and are resampled with the particles, and ``counters`` count the score evaluations
(``nfe``) and the backward passes through the score (``vjp``).
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from mcsample import distributed
from mcsample import feynman_kac as fk
from mcsample.checkpoint import fingerprint
from mcsample.diffusion import ddim_kernel, grid_coefficients, time_grid, tweedie_x0
from mcsample.protocols import check_generator
from mcsample.weighted import WeightedSamples

__all__ = ["PosteriorSampler", "PosteriorState", "laplacian"]

#: the samplers' state is the engine's Feynman-Kac state
PosteriorState = fk.FKState


def _gaussian_measurement(measurement) -> bool:
    return callable(getattr(measurement, "forward", None)) and getattr(measurement, "sigma_y", None) is not None


def _sqsum(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).pow(2).sum(-1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).reshape(a.shape[0], -1).sum(-1)


def _randn_like(x: Tensor, generator) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def laplacian(
    fn, x: Tensor, method: str = "exact", num_probes: int = 1, generator: torch.Generator | None = None
) -> Tensor:
    r"""Laplacian :math:`\Delta\phi(x) = \operatorname{tr}\nabla^2\phi` of a batched scalar field,
    shape ``(B,)``.

    ``method="exact"``: :math:`d` Hessian-diagonal backward passes. ``"hutchinson"``: the
    unbiased estimate :math:`\frac1P\sum_p\zeta_p^\top\nabla^2\phi\,\zeta_p` with Rademacher
    probes (Hutchinson 1990), one Hessian-vector product per probe.
    """
    if method not in ("exact", "hutchinson"):
        raise ValueError(f"laplacian method must be 'exact' or 'hutchinson', got {method!r}")
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(xr).sum(), xr, create_graph=True)
        out = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        if method == "exact":
            gf = g.reshape(x.shape[0], -1)
            for i in range(gf.shape[1]):
                (h,) = torch.autograd.grad(gf[:, i].sum(), xr, retain_graph=True)
                out = out + h.reshape(x.shape[0], -1)[:, i]
            return out.detach()
        for _ in range(num_probes):
            z = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
            (hz,) = torch.autograd.grad((g * z).sum(), xr, retain_graph=True)
            out = out + _dot(z, hz)
        return (out / num_probes).detach()


def _svd_pieces(measurement, y: Tensor, dtype, device):
    """``(U, S, V, ybar, uy, S64, y_perp_sq)`` in the working dtype, ``ybar = Uᵀy/S``."""
    U, S, V = measurement.svd()
    U, S, V = (t.to(dtype=torch.float64, device=device) for t in (U, S, V))
    yf = y.reshape(-1).to(dtype=torch.float64, device=device)
    uy = U.T @ yf
    y_perp_sq = float((yf @ yf - uy @ uy).clamp(min=0.0))
    return U.to(dtype), S.to(dtype), V.to(dtype), (uy / S).to(dtype), uy, S, y_perp_sq


class PosteriorSampler:
    """Model, measurement, observation and time grid shared by the samplers, and their run on
    the Feynman-Kac driver. Subclasses define ``init(generator)`` and ``step(state, generator)``."""

    name = "base"

    def __init__(
        self,
        model,
        measurement,
        y: Tensor,
        *,
        num_steps: int = 100,
        grid: str | Tensor = "uniform",
        t_max: float = 1.0,
        t_min: float = 1e-3,
        times: Tensor | None = None,
    ):
        r"""``grid``: the decreasing times from :math:`t_{\max}` to :math:`t_{\min}` (a tensor), or
        the kind of grid :func:`mcsample.diffusion.time_grid` builds with ``num_steps``,
        ``t_max`` and ``t_min`` (``"uniform"`` or ``"log_snr"``). ``times`` is an older name
        for a tensor ``grid``."""
        if times is not None:
            import warnings

            warnings.warn("times= is deprecated; pass the tensor as grid=", DeprecationWarning, stacklevel=3)
            grid = times
        if not callable(getattr(model, "score", None)) or getattr(model, "schedule", None) is None:
            raise TypeError(f"{type(model).__name__} is not a DiffusionModel: needs .schedule and .score(x, t)")
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a tensor, got {type(y).__name__}")
        if bool(torch.isnan(y).any()):
            raise ValueError("the observation y contains NaN")
        self.model = model
        self.schedule = model.schedule
        self.measurement = measurement
        self.y = y
        if isinstance(grid, str):
            grid = time_grid(self.schedule, num_steps, grid, t_max, t_min, dtype=torch.float64)
        self._set_times(torch.as_tensor(grid, dtype=torch.float64).detach().cpu())
        self.event_shape = None
        self.dtype, self.device, self.num_particles = torch.float32, None, None

    def _set_times(self, times: Tensor) -> None:
        self.times = times
        self.co = grid_coefficients(self.schedule, times)
        self.alpha, self.sigma = self.co["alpha"], self.co["sigma"]
        self.f, self.g2 = self.co["f"], self.co["g2"]

    # -- model evaluations ------------------------------------------------------------------
    def _t(self, x: Tensor, j: int) -> Tensor:
        return torch.full((x.shape[0],), float(self.times[j]), dtype=x.dtype, device=x.device)

    def score(self, x: Tensor, j: int) -> Tensor:
        """The prior's score at grid index ``j`` (count it with ``state.count(nfe=1)``)."""
        return self.model.score(x, self._t(x, j))

    def x0_from_score(self, x: Tensor, s: Tensor, j: int) -> Tensor:
        """Tweedie: :math:`\\hat x_0 = (x + \\sigma_t^2 s)/\\alpha_t`."""
        return tweedie_x0(x, s, self.alpha[j], self.sigma[j])

    def prior_std(self) -> float:
        r""":math:`\rho = \sqrt{\alpha_{t_0}^2 + \sigma_{t_0}^2}` (1 for VP): the start
        :math:`\mathcal N(0,\rho^2 I)` assumes data of unit scale, as every diffusion sampler does."""
        return math.sqrt(self.alpha[0] ** 2 + self.sigma[0] ** 2)

    def kernel(self, x: Tensor, s: Tensor, j: int, eta: float, x0: Tensor | None = None):
        r"""Mean and std of the DDIM-:math:`\eta` kernel from grid time ``j`` to ``j+1``
        (:func:`mcsample.diffusion.ddim_kernel`); also the coefficient :math:`\kappa` with which
        the mean moves per unit change of the score."""
        return ddim_kernel(x, s, self.alpha[j], self.sigma[j], self.alpha[j + 1], self.sigma[j + 1], eta, x0=x0)

    def start_log_weight(self, x: Tensor) -> Tensor:
        r"""Exact start: :math:`\log q_{t_0}(x) - \log\mathcal N(x; 0, \rho^2 I)` when the model
        offers a normalized ``log_prob(x, t)`` (the analytic mixtures do), so that the samplers,
        which draw their start from :math:`\mathcal N(0,\rho^2I)`, target the model's own
        :math:`q_{t_0}`; zero otherwise (the usual approximation, exact as
        :math:`\alpha_{t_0}\to0`). Float64 ``(N,)``."""
        n = x.shape[0]
        if not callable(getattr(self.model, "log_prob", None)):
            return torch.zeros(n, dtype=torch.float64, device=x.device)
        rho2 = self.prior_std() ** 2
        d = x[0].numel()
        log_ref = -0.5 * x.reshape(n, -1).to(torch.float64).pow(2).sum(-1) / rho2 - 0.5 * d * math.log(
            2 * math.pi * rho2
        )
        with torch.no_grad():
            lq = self.model.log_prob(x, self._t(x, 0))
        return lq.to(torch.float64) - log_ref

    def initial_noise(self, num: int, generator) -> Tensor:
        return self.prior_std() * torch.randn(
            (num, *self.event_shape), generator=generator, dtype=self.dtype, device=self.device
        )

    # -- the Feynman-Kac model contract ------------------------------------------------------
    @property
    def num_steps(self) -> int:
        """Steps of :meth:`step` in a full run: the grid intervals plus the final step to t = 0."""
        return self.times.numel()

    def done(self, state: PosteriorState) -> bool:
        return state.index >= self.num_steps

    def progress(self, state: PosteriorState) -> tuple[float, float, dict]:
        return state.index, self.num_steps, ({"ess": f"{state.ess_history[-1]:.0f}"} if state.ess_history else {})

    def describe_position(self, saved: dict) -> str:
        return f"step {int(saved['index'])} of {self.num_steps}"

    @property
    def description(self) -> str:
        return self.name

    def prepare(self, state: PosteriorState) -> None:
        """Deterministic per-run set-up that :meth:`init` does and a resumed run must redo."""
        self.event_shape = state.x.shape[1:]
        self.dtype, self.device = state.x.dtype, state.x.device

    def start(
        self, num_particles: int, *, generator=None, dtype=torch.float32, device=None, event_shape=None
    ) -> PosteriorState:
        """Set up a run of ``num_particles`` particles and return the initial state (then call
        :meth:`step` until :meth:`done`, or let :meth:`run` do it)."""
        self.num_particles = fk.check_num_particles(num_particles)
        self.event_shape = self._event_shape(event_shape)
        self.dtype, self.device = dtype, device
        return self.init(generator)

    def result(self, state: PosteriorState, seconds: float, **info) -> WeightedSamples:
        return fk.to_weighted_samples(state, method=self.name, seconds=seconds, grid=self.times, **info)

    @distributed.shardable
    def run(
        self,
        num_particles: int,
        *,
        generator=None,
        dtype=torch.float32,
        device=None,
        event_shape=None,
        progress: bool = False,
        checkpoint=None,
        checkpoint_every: int = 10,
        resume: bool = True,
        group=None,
    ) -> WeightedSamples:
        """Initialize ``num_particles`` particles and step to the end with the Feynman-Kac driver.
        With ``checkpoint`` the state is saved atomically every ``checkpoint_every`` steps and an
        existing checkpoint of the same run is resumed (:mod:`mcsample.checkpoint`): same result
        as one uninterrupted run; a checkpoint of another run is refused. ``group`` shards the
        particles over a ``torch.distributed`` process group (:mod:`mcsample.distributed`;
        ``None``: the default group when it is initialized with more than one process)."""
        num_particles = fk.check_num_particles(num_particles)
        check_generator(generator)
        start = time.perf_counter()
        self.event_shape = self._event_shape(event_shape)
        self.dtype, self.device, self.num_particles = dtype, device, distributed.local_size(num_particles)
        run = None
        if checkpoint is not None:
            run = fingerprint(
                self.kind,
                generator,
                num_particles=num_particles,
                dtype=dtype,
                device=None if device is None else torch.device(device).type,
                event_shape=list(self.event_shape),
                sampler=self,
                model=self.model,
                measurement=self.measurement,
            )
        generator = distributed.split_generator(generator, device)  # this rank's stream when sharded
        state = fk.run(
            self,
            num_particles,
            generator=generator,
            progress=progress,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            resume=resume,
            fingerprint=run,
            device=device,
        )
        return self.result(state, time.perf_counter() - start)

    @property
    def kind(self) -> str:
        """The checkpoint tag of this sampler's runs."""
        return f"posterior.{self.name}"

    def _event_shape(self, event_shape):
        if event_shape is not None:
            return torch.Size(event_shape)
        es = getattr(self.measurement, "event_shape", None)
        if es is None:
            raise ValueError("pass event_shape= (the measurement has no event_shape attribute)")
        return torch.Size(es)
