r"""Tempering schedules: how fast :math:`\beta` goes from 0 to 1.

Along the geometric path :math:`\pi_\beta \propto q_0^{1-\beta}\tilde\pi^{\beta}`, moving from
:math:`\beta` to :math:`\beta+\delta` multiplies each particle's weight by
:math:`u_i = \exp(\delta\,\ell_i)`, :math:`\ell_i = \log\tilde\pi(x_i) - \log q_0(x_i)`.

* :class:`FixedSchedule` walks a given increasing list of :math:`\beta`.
* :class:`AdaptiveSchedule` picks the largest :math:`\delta \le 1-\beta` whose conditional ESS
  (Zhou, Johansen & Aston 2016) keeps a fraction ``cess`` of the particles,
  :math:`\mathrm{CESS}(W, e^{\delta\ell}) = \text{cess}\cdot N`, by bisection (as particles'
  ``AdaptiveTempering`` and BlackJAX's ``adaptive_tempered``). It jumps straight to
  :math:`\beta=1` when the full step already keeps enough particles. The same :math:`+\delta\ell`
  enters the solver and the reweighting (BlackJAX once solved with :math:`-\delta\ell` and
  stalled on asymmetric targets), and the CESS uses the current weights :math:`W`, not only
  the increments (the ESS that matters is that of :math:`W\cdot u`). In a sharded run the
  CESS is the whole population's (:func:`mcsample.distributed.conditional_ess`), so every rank
  picks the same :math:`\beta`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mcsample import distributed

__all__ = ["FixedSchedule", "AdaptiveSchedule", "as_schedule", "log_increment"]


def log_increment(delta: float, ell: Tensor) -> Tensor:
    """:math:`\\delta\\,\\ell` with :math:`\\delta\\cdot(-\\infty) = -\\infty` for :math:`\\delta>0`
    and 0 for :math:`\\delta = 0`."""
    if delta == 0.0:
        return torch.zeros_like(ell)
    return delta * ell


@dataclass(frozen=True)
class FixedSchedule:
    """A fixed increasing sequence of inverse temperatures ending at 1."""

    betas: tuple[float, ...]

    def __post_init__(self):
        b = [float(v) for v in self.betas]
        if not b or b[-1] != 1.0:
            raise ValueError(f"a fixed schedule must end at beta = 1, got {b[-3:]}")
        if any(not (0.0 <= v <= 1.0) for v in b) or any(c <= a for a, c in zip(b, b[1:])):
            raise ValueError("betas must be strictly increasing in [0, 1]")
        object.__setattr__(self, "betas", tuple(v for v in b if v > 0.0))

    def next_beta(self, beta: float, log_w: Tensor, ell: Tensor) -> float:
        for b in self.betas:
            if b > beta:
                return b
        return 1.0


@dataclass(frozen=True)
class AdaptiveSchedule:
    """Next :math:`\\beta` by bisection on the conditional ESS; see the module docstring.

    ``cess``: target fraction of N; ``tol``: bisection tolerance on :math:`\\delta`;
    ``min_delta``: smallest step (guards against stalling when some particles have
    :math:`\\ell = -\\infty`).
    """

    cess: float = 0.5
    tol: float = 1e-6
    min_delta: float = 1e-8

    def __post_init__(self):
        if not 0.0 < self.cess < 1.0:
            raise ValueError(f"cess must be a fraction in (0, 1), got {self.cess}")

    def next_beta(self, beta: float, log_w: Tensor, ell: Tensor) -> float:
        n = distributed.count(log_w.numel())
        goal = self.cess * n

        def f(delta: float) -> float:
            return float(distributed.conditional_ess(log_w, log_increment(delta, ell))) - goal

        hi = 1.0 - beta
        if f(hi) >= 0.0:
            return 1.0
        lo = 0.0
        while hi - lo > self.tol:
            mid = 0.5 * (lo + hi)
            if f(mid) >= 0.0:
                lo = mid
            else:
                hi = mid
        return min(1.0, beta + max(lo, self.min_delta))


def as_schedule(schedule) -> FixedSchedule | AdaptiveSchedule:
    """``"adaptive"``, a schedule object, or a sequence of betas."""
    if isinstance(schedule, (FixedSchedule, AdaptiveSchedule)):
        return schedule
    if isinstance(schedule, str):
        if schedule == "adaptive":
            return AdaptiveSchedule()
        raise ValueError(f"unknown schedule {schedule!r}: use 'adaptive' or a list of betas")
    if isinstance(schedule, (Sequence, Tensor)) or hasattr(schedule, "__iter__"):
        return FixedSchedule(tuple(float(b) for b in schedule))
    raise TypeError(f"schedule must be 'adaptive', a schedule object or betas, got {schedule!r}")
