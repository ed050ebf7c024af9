r"""MCMC move kernels for a population of particles on a tempered path.

SMC moves every particle with a Markov kernel that leaves the current intermediate density
invariant,

.. math::  \log\pi_\beta(x) = (1-\beta)\log q_0(x) + \beta\log\tilde\pi(x),

the geometric path from the initial distribution :math:`q_0` to the target. A particle is a
:class:`Point`: its position and the two log-densities (and, for gradient kernels, their
gradients), so that changing :math:`\beta` never requires re-evaluating the target.

Three Metropolis-Hastings kernels, each vectorized over particles and preconditioned by a
diagonal ``scale`` (SMC passes the particles' weighted standard deviation, as in Chopin's
``particles`` and Buchholz, Chopin & Jacob 2021):

* :class:`RandomWalk`: :math:`x' = x + h\,S\xi` (Metropolis et al. 1953);
* :class:`MALA`: :math:`x' = x + \tfrac{h^2}{2}S^2\nabla\log\pi_\beta(x) + hS\xi`
  (Roberts & Tweedie 1996);
* :class:`HMC`: ``num_leapfrog`` leapfrog steps of size :math:`h` with mass matrix
  :math:`S^{-2}` (Duane et al. 1987; Neal 2011).

:class:`Independence` follows any of them with a Metropolized independence move from the
path's own initial distribution (Tierney 1994): the local kernel explores a basin, the
independence move jumps between basins wherever a good proposal (a trained flow) puts mass.

Between moves the step size :math:`h` is adapted from the population's mean acceptance rate
:math:`\bar a` by :math:`h \leftarrow h\,e^{2(\bar a - a^*)}`, aiming at :math:`a^*` = 0.3
(random walk), 0.57 (MALA) or 0.65 (HMC). A kernel is a small frozen description; ``step`` and
``adapt`` are pure functions of their inputs.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mcsample.protocols import check_log_prob, log_prob_and_grad

__all__ = [
    "Point",
    "Kernel",
    "RandomWalk",
    "MALA",
    "HMC",
    "Independence",
    "independence_move",
    "tempered",
    "evaluator",
    "run_chain",
]


@dataclass
class Point:
    """Particles with cached log-densities.

    ``x``: ``(N, *event)``; ``parts``: ``(N, 2)`` float64, columns
    :math:`\\log q_0(x)` and :math:`\\log\\tilde\\pi(x)`; ``grads``: ``(N, 2, *event)`` or ``None``.
    """

    x: Tensor
    parts: Tensor
    grads: Tensor | None = None

    def take(self, idx: Tensor) -> Point:
        return Point(self.x[idx], self.parts[idx], None if self.grads is None else self.grads[idx])

    def where(self, mask: Tensor, other: Point) -> Point:
        """Elementwise ``other if mask else self`` over particles."""

        def pick(a, b):
            if a is None or b is None:
                return None
            m = mask.reshape(mask.shape + (1,) * (a.dim() - 1))
            return torch.where(m, b, a)

        return Point(pick(self.x, other.x), pick(self.parts, other.parts), pick(self.grads, other.grads))


Evaluate = Callable[[Tensor, bool], Point]


def _coefficients(beta: float, like: Tensor) -> Tensor:
    return torch.tensor([1.0 - beta, beta], dtype=torch.float64, device=like.device)


def tempered(parts: Tensor, beta: float) -> Tensor:
    """:math:`(1-\\beta)\\log q_0 + \\beta\\log\\tilde\\pi`, with :math:`0\\cdot(-\\infty) = 0`."""
    c = _coefficients(beta, parts)
    terms = torch.where(c == 0, torch.zeros_like(parts), c * parts)
    return terms.sum(-1)


def tempered_grad(grads: Tensor, beta: float) -> Tensor:
    """Gradient of :func:`tempered`."""
    return (1.0 - beta) * grads[:, 0] + beta * grads[:, 1]


def evaluator(target, initial=None) -> Evaluate:
    """``evaluate(x, need_grad) -> Point`` for the path from ``initial`` to ``target``.

    With ``initial=None`` the first column is zero (plain MCMC on the target with beta = 1).
    NaN from either density raises (see :func:`~mcsample.protocols.check_log_prob`).
    """

    def one(dist, x, need_grad, who):
        if dist is None:
            zero = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
            return zero, (torch.zeros_like(x) if need_grad else None)
        if need_grad:
            lp, g = log_prob_and_grad(dist, x)
        else:
            with torch.no_grad():
                lp, g = dist.log_prob(x), None
        lp = check_log_prob(lp, x.shape[0], who).to(torch.float64)
        if g is not None:
            # outside the support (log-density -inf) the gradient means nothing: zero it
            out = (lp == -math.inf).reshape((-1,) + (1,) * (g.dim() - 1))
            g = torch.where(out, torch.zeros_like(g), g)
        if g is not None and bool(torch.isnan(g).any()):
            bad = torch.isnan(g.reshape(g.shape[0], -1)).any(1)
            raise ValueError(
                f"{who} gradient is NaN for {int(bad.sum())} of {x.shape[0]} particles "
                f"(first at indices {torch.nonzero(bad).flatten()[:5].tolist()})"
            )
        return lp, g

    def evaluate(x: Tensor, need_grad: bool) -> Point:
        lq, gq = one(initial, x, need_grad, "initial")
        lp, gp = one(target, x, need_grad, "target")
        grads = torch.stack([gq, gp], 1) if need_grad else None
        return Point(x, torch.stack([lq, lp], 1), grads)

    return evaluate


def _mh_accept(log_alpha: Tensor, generator) -> tuple[Tensor, Tensor]:
    """Metropolis-Hastings decision; NaN (``-inf - -inf``) rejects. Returns (accept, prob)."""
    log_alpha = torch.nan_to_num(log_alpha, nan=-math.inf).clamp(max=0.0)
    u = torch.rand(log_alpha.shape, dtype=torch.float64, generator=generator, device=log_alpha.device)
    return torch.log(u) < log_alpha, torch.exp(log_alpha)


def _bcast(scale: Tensor | None, x: Tensor) -> Tensor:
    if scale is None:
        return torch.ones(x.shape[1:], dtype=x.dtype, device=x.device)
    return scale.to(x.dtype)


def _sq(v: Tensor) -> Tensor:
    return (v.to(torch.float64) ** 2).reshape(v.shape[0], -1).sum(1)


@dataclass(frozen=True)
class Kernel(ABC):
    """Common parameters: ``num_steps`` moves per SMC step, initial ``step_size`` (``None``:
    a dimension-based default), ``target_acceptance`` for adaptation, ``adapt`` on/off."""

    num_steps: int = 5
    step_size: float | None = None
    target_acceptance: float = 0.5
    adaptive: bool = True
    needs_grad = False

    def __post_init__(self):
        if self.step_size is not None and not (isinstance(self.step_size, (int, float)) and self.step_size > 0):
            raise ValueError(f"{type(self).__name__}: step_size must be a number > 0 (or None), got {self.step_size!r}")
        if isinstance(self.num_steps, bool) or int(self.num_steps) != self.num_steps or self.num_steps < 0:
            raise ValueError(f"{type(self).__name__}: num_steps must be an integer >= 0, got {self.num_steps!r}")
        if not 0.0 < self.target_acceptance < 1.0:
            raise ValueError(
                f"{type(self).__name__}: target_acceptance must be in (0, 1), got {self.target_acceptance!r}"
            )

    def initial_step_size(self, dim: int) -> float:
        return self.step_size if self.step_size is not None else 2.38 / math.sqrt(dim)

    def adapt(self, step_size: Tensor, acceptance: Tensor) -> Tensor:
        """:math:`h \\leftarrow h\\,\\exp(2(\\bar a - a^*))`, clamped to :math:`[10^{-8}, 10^3]`."""
        if not self.adaptive:
            return step_size
        return (step_size * torch.exp(2.0 * (acceptance - self.target_acceptance))).clamp(1e-8, 1e3)

    @abstractmethod
    def step(
        self,
        point: Point,
        evaluate: Evaluate,
        beta: float,
        step_size: Tensor,
        scale: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Point, Tensor]:
        """One move of every particle, leaving :math:`\\pi_\\beta` invariant.

        Returns the new points and each particle's acceptance probability.
        """


@dataclass(frozen=True)
class RandomWalk(Kernel):
    """Gaussian random-walk Metropolis, :math:`x' = x + hS\\xi` (Metropolis et al. 1953)."""

    num_steps: int = 10
    target_acceptance: float = 0.3

    def step(self, point, evaluate, beta, step_size, scale=None, generator=None):
        x = point.x
        xi = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        prop = evaluate(x + step_size.to(x.dtype) * _bcast(scale, x) * xi, False)
        accept, prob = _mh_accept(tempered(prop.parts, beta) - tempered(point.parts, beta), generator)
        return point.where(accept, prop), prob


@dataclass(frozen=True)
class MALA(Kernel):
    r"""Metropolis-adjusted Langevin (Roberts & Tweedie 1996), preconditioned by :math:`S^2`.

    :math:`x' = x + \frac{h^2}{2}S^2\nabla\log\pi_\beta(x) + hS\xi`, accepted with the
    Metropolis-Hastings ratio including both proposal densities.
    """

    num_steps: int = 5
    target_acceptance: float = 0.57
    needs_grad = True

    def initial_step_size(self, dim: int) -> float:
        return self.step_size if self.step_size is not None else 1.0 / dim ** (1 / 6)

    def step(self, point, evaluate, beta, step_size, scale=None, generator=None):
        x = point.x
        h = step_size.to(x.dtype)
        S = _bcast(scale, x)
        g = tempered_grad(point.grads, beta).to(x.dtype)
        xi = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        y = x + 0.5 * h**2 * S**2 * g + h * S * xi
        prop = evaluate(y, True)
        gy = tempered_grad(prop.grads, beta).to(x.dtype)
        fwd = _sq(xi)
        bwd = _sq((x - y - 0.5 * h**2 * S**2 * gy) / (h * S))
        log_alpha = tempered(prop.parts, beta) - tempered(point.parts, beta) - 0.5 * (bwd - fwd)
        accept, prob = _mh_accept(log_alpha, generator)
        return point.where(accept, prop), prob


@dataclass(frozen=True)
class HMC(Kernel):
    r"""Hamiltonian Monte Carlo with ``num_leapfrog`` leapfrog steps (Duane et al. 1987).

    Momentum :math:`p\sim\mathcal N(0, S^{-2})`, kinetic energy :math:`\frac12\sum S^2p^2`;
    the step is accepted with probability :math:`\min(1, e^{-\Delta H})`.
    """

    num_steps: int = 2
    num_leapfrog: int = 5
    target_acceptance: float = 0.65
    needs_grad = True

    def initial_step_size(self, dim: int) -> float:
        return self.step_size if self.step_size is not None else 1.0 / dim ** (1 / 4)

    def step(self, point, evaluate, beta, step_size, scale=None, generator=None):
        x = point.x
        h = step_size.to(x.dtype)
        S = _bcast(scale, x)
        p = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator) / S
        kinetic0 = 0.5 * _sq(S * p)
        cur = point
        p = p + 0.5 * h * tempered_grad(cur.grads, beta).to(x.dtype)
        for k in range(self.num_leapfrog):
            cur = evaluate(cur.x + h * S**2 * p, True)
            g = tempered_grad(cur.grads, beta).to(x.dtype)
            # guard: a particle that left the support gets a zero gradient and is rejected below
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
            p = p + (h if k < self.num_leapfrog - 1 else 0.5 * h) * g
        kinetic1 = 0.5 * _sq(S * p)
        log_alpha = tempered(cur.parts, beta) - tempered(point.parts, beta) - kinetic1 + kinetic0
        accept, prob = _mh_accept(log_alpha, generator)
        return point.where(accept, cur), prob


def independence_move(
    point: Point, evaluate: Evaluate, beta: float, proposal, need_grad: bool, generator: torch.Generator | None = None
) -> tuple[Point, Tensor]:
    r"""Metropolized independence move :math:`y\sim q_0`, accepted with probability
    :math:`\min\bigl(1, e^{\beta[(\log\tilde\pi-\log q_0)(y) - (\log\tilde\pi-\log q_0)(x)]}\bigr)`.

    Leaves :math:`\pi_\beta\propto q_0^{1-\beta}\tilde\pi^\beta` invariant when ``proposal`` is
    the path's initial distribution :math:`q_0` (Tierney 1994). Returns the points and the
    acceptance probabilities.
    """
    from mcsample.protocols import draw

    y, _ = draw(proposal, point.x.shape[0], generator)
    prop = evaluate(y.to(point.x.dtype), need_grad)
    log_w_y = prop.parts[:, 1] - prop.parts[:, 0]
    log_w_x = point.parts[:, 1] - point.parts[:, 0]
    accept, prob = _mh_accept(beta * (log_w_y - log_w_x), generator)
    return point.where(accept, prop), prob


@dataclass(frozen=True)
class Independence(Kernel):
    r"""A local kernel followed by a Metropolized independence move from ``proposal``.

    Each of ``num_steps`` moves of the local kernel is followed by :func:`independence_move`,
    which draws a fresh point from ``proposal`` (it must be the SMC path's initial distribution)
    and accepts it with probability :math:`\min(1, (w(y)/w(x))^\beta)`, :math:`w=\tilde\pi/q_0`.
    The step size adapts to the local kernel's acceptance. With a trained flow as
    :math:`q_0` this is the independence-sampler rejuvenation of Boltzmann-generator SMC
    (Tierney 1994; Midgley et al. 2023 use the flow the same way in FAB's AIS).
    """

    local: Kernel = None  # type: ignore[assignment]
    proposal: object = None

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.local, Kernel):
            raise TypeError(f"Independence needs a local Kernel, got {type(self.local).__name__}")
        if self.proposal is None:
            raise ValueError("Independence needs the proposal (the SMC path's initial distribution)")

    @property
    def needs_grad(self) -> bool:  # type: ignore[override]
        return self.local.needs_grad

    def initial_step_size(self, dim: int) -> float:
        return self.local.initial_step_size(dim)

    def adapt(self, step_size: Tensor, acceptance: Tensor) -> Tensor:
        return self.local.adapt(step_size, acceptance)

    def step(self, point, evaluate, beta, step_size, scale=None, generator=None):
        point, prob = self.local.step(point, evaluate, beta, step_size, scale, generator)
        point, _ = independence_move(point, evaluate, beta, self.proposal, self.needs_grad, generator)
        return point, prob


def run_chain(
    kernel: Kernel,
    target,
    x: Tensor,
    num_iters: int,
    step_size: float | None = None,
    scale: Tensor | None = None,
    adapt: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``num_iters`` moves of ``kernel`` on ``target`` for a batch of chains started at ``x``.

    Returns the final positions and the mean acceptance probability per iteration. With
    ``adapt=False`` (default) the step size is fixed and each chain is an exact MCMC chain.
    """
    evaluate = evaluator(target)
    dim = int(math.prod(x.shape[1:]))
    h = torch.tensor(
        step_size if step_size is not None else kernel.initial_step_size(dim),
        dtype=torch.float64,
        device=x.device,
    )
    point = evaluate(x, kernel.needs_grad)
    rates = []
    for _ in range(num_iters):
        point, prob = kernel.step(point, evaluate, 1.0, h, scale, generator)
        rates.append(prob.mean())
        if adapt:
            h = kernel.adapt(h, rates[-1])
    return point.x, torch.stack(rates)
