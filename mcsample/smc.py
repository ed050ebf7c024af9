r"""Annealed sequential Monte Carlo (Del Moral, Doucet & Jasra 2006).

Particles start from an initial distribution :math:`q_0` and travel the geometric path
:math:`\pi_\beta \propto q_0^{1-\beta}\tilde\pi^{\beta}` to the target. Each step

1. picks the next :math:`\beta` (:mod:`mcsample.tempering`),
2. reweights, :math:`\log w_i \mathrel{+}= (\beta' - \beta)\,\ell_i` with
   :math:`\ell = \log\tilde\pi - \log q_0`,
3. resamples (:func:`mcsample.resample`) when the ESS falls below ``resample_threshold``·N,
   folding :math:`\log\frac1N\sum w` into the evidence and resetting the log-weights to 0,
4. moves every particle with an MCMC kernel leaving :math:`\pi_{\beta'}` invariant
   (:mod:`mcsample.kernels`), adapting its step size from the population.

The evidence estimate :math:`\log\hat Z = c + \log\frac1N\sum_i w_i` (``c`` accumulated at
resampling events) is unbiased in :math:`\hat Z` with or without resampling at a step. Its
standard error from a single run is the genealogy estimator of Lee & Whiteley (2018), using
each particle's time-0 ancestor (see :mod:`mcsample.weighted`).

The algorithm is a Feynman-Kac model (:mod:`mcsample.feynman_kac`): a small explicit state,
:class:`SMCState`, and a pure :func:`step`; reweighting, resampling and the genealogy are the
core's, and :func:`smc` runs the model with the core's driver (progress bar, checkpoints with a
run fingerprint, resume with the same result as an uninterrupted run).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from mcsample import distributed
from mcsample import feynman_kac as fk
from mcsample.checkpoint import default_generator, fingerprint, probe_identity
from mcsample.kernels import MALA, Kernel, Point, evaluator
from mcsample.protocols import check_event_shape, check_generator, draw
from mcsample.tempering import as_schedule, log_increment
from mcsample.weighted import WeightedSamples

__all__ = ["SMCState", "SMCResult", "AnnealedSMC", "init", "step", "move", "smc"]


@dataclass(frozen=True)
class SMCState(fk.FKState):
    """The core's :class:`~mcsample.feynman_kac.FKState` plus the annealing: ``beta``, the
    kernel's adapted ``step_size``, and per-step ``betas`` and ``acceptance_history``. The cached
    log-densities (``parts``, ``(N, 2)`` float64: log q0, log target) and their gradients travel
    with the particles in ``cache``."""

    beta: float = 0.0
    step_size: Tensor | None = None
    betas: tuple = (0.0,)
    acceptance_history: tuple = ()

    @property
    def parts(self) -> Tensor:
        return self.cache["parts"]

    @property
    def grads(self) -> Tensor | None:
        return self.cache.get("grads")

    @property
    def point(self) -> Point:
        return Point(self.x, self.parts, self.grads)

    @property
    def iteration(self) -> int:
        """Steps taken (the core's ``index``)."""
        return self.index

    @property
    def resampled(self) -> list[bool]:
        """Whether each step resampled."""
        at = set(self.resampled_at)
        return [k in at for k in range(self.index)]

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["betas"] = [float(b) for b in self.betas]
        d["acceptance_history"] = [float(a) for a in self.acceptance_history]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SMCState:
        d = dict(d)
        d["betas"] = tuple(d.get("betas", (0.0,)))
        d["acceptance_history"] = tuple(d.get("acceptance_history", ()))
        return super().from_dict(d)

    def with_point(self, point: Point, **changes) -> SMCState:
        cache = {"parts": point.parts}
        if point.grads is not None:
            cache["grads"] = point.grads
        return self.replace(x=point.x, cache=cache, **changes)


@dataclass
class SMCResult:
    """Final weighted particles plus the run's diagnostics."""

    particles: WeightedSamples
    betas: Tensor
    ess_history: Tensor
    acceptance_history: Tensor
    resampled: Tensor
    state: SMCState

    @property
    def log_evidence(self) -> Tensor:
        return self.particles.log_evidence

    @property
    def log_evidence_stderr(self) -> Tensor:
        return self.particles.log_evidence_stderr

    def __repr__(self) -> str:
        return (
            f"SMCResult(steps={len(self.betas) - 1}, log_evidence={float(self.log_evidence):.4f}"
            f" ± {float(self.log_evidence_stderr):.2g}, final ess={float(self.particles.ess):.1f},"
            f" resamplings={int(self.resampled.sum())})"
        )


def _weighted_scale(x: Tensor, log_w: Tensor) -> Tensor:
    """Per-coordinate weighted standard deviation of the particles (kernel preconditioner), over
    the whole population when it is sharded."""
    _, var = distributed.weighted_moments(x, log_w)
    floor = 1e-6 * var.mean().clamp(min=1e-30)
    return torch.sqrt(torch.clamp(var, min=float(floor)))


def init(target, initial, num_particles: int, kernel: Kernel, generator=None) -> SMCState:
    r"""Draw ``num_particles`` from ``initial`` at :math:`\beta = 0`, equally weighted."""
    x, _ = draw(initial, num_particles, generator)
    check_event_shape(target, x, "initial distribution")
    point = evaluator(target, initial)(x, kernel.needs_grad)
    dim = int(math.prod(x.shape[1:]))
    state = fk.start(
        point.x,
        state_class=SMCState,
        step_size=torch.tensor(kernel.initial_step_size(dim), dtype=torch.float64, device=x.device),
    )
    return state.with_point(point)


def _move(state: SMCState, evaluate, kernel: Kernel, beta: float, num_moves: int, generator):
    scale = _weighted_scale(state.x, state.log_w)
    point, h, rates = state.point, state.step_size, []
    for _ in range(num_moves):
        point, prob = kernel.step(point, evaluate, beta, h, scale, generator)
        rates.append(distributed.mean(prob))  # the whole population's acceptance rate
        h = kernel.adapt(h, rates[-1])
    acc = float(torch.stack(rates).mean()) if rates else float("nan")
    return point, h, acc


def step(
    state: SMCState,
    target,
    initial,
    kernel: Kernel,
    schedule,
    *,
    resample_threshold: float = 0.5,
    scheme: str = "systematic",
    generator: torch.Generator | None = None,
) -> SMCState:
    """One SMC step: next beta, reweight, resample if the ESS is low, move. Returns a new state."""
    schedule = as_schedule(schedule)
    ell = state.parts[:, 1] - state.parts[:, 0]
    new_beta = schedule.next_beta(state.beta, state.log_w, ell)
    state = fk.reweight(state, log_increment(new_beta - state.beta, ell), f"SMC at beta = {new_beta:.4g}")
    state = fk.resample_if_needed(state, resample_threshold, scheme, generator)
    point, h, acc = _move(state, evaluator(target, initial), kernel, new_beta, kernel.num_steps, generator)
    return state.with_point(
        point,
        beta=new_beta,
        step_size=h,
        index=state.index + 1,
        betas=state.betas + (new_beta,),
        acceptance_history=state.acceptance_history + (acc,),
    )


def move(
    state: SMCState, target, initial, kernel: Kernel, num_moves: int, generator: torch.Generator | None = None
) -> SMCState:
    """``num_moves`` extra MCMC moves at the current beta (e.g. rejuvenation at beta = 1).

    The weights do not change: each move leaves :math:`\\pi_\beta` invariant.
    """
    point, h, _ = _move(state, evaluator(target, initial), kernel, state.beta, num_moves, generator)
    return state.with_point(point, step_size=h)


class AnnealedSMC:
    """Annealed SMC as a Feynman-Kac model for :func:`mcsample.feynman_kac.run`."""

    name = "smc"
    description = "SMC beta"

    def __init__(
        self, target, initial, num_particles: int, kernel: Kernel, schedule, resample_threshold: float, scheme: str
    ):
        self.target, self.initial, self.num_particles = target, initial, num_particles
        self.kernel, self.schedule = kernel, as_schedule(schedule)
        self.resample_threshold, self.scheme = resample_threshold, scheme

    def init(self, generator) -> SMCState:
        return init(self.target, self.initial, self.num_particles, self.kernel, generator)

    def step(self, state: SMCState, generator) -> SMCState:
        return step(
            state,
            self.target,
            self.initial,
            self.kernel,
            self.schedule,
            resample_threshold=self.resample_threshold,
            scheme=self.scheme,
            generator=generator,
        )

    def done(self, state: SMCState) -> bool:
        return state.beta >= 1.0

    def progress(self, state: SMCState) -> tuple[float, float, dict]:
        post = {}
        if state.ess_history:
            post = {"ess": f"{state.ess_history[-1]:.0f}", "acc": f"{state.acceptance_history[-1]:.2f}"}
        return state.beta, 1.0, post

    def describe_position(self, saved: dict) -> str:
        return f"step {int(saved['index'])} (beta = {float(saved['beta']):.4g} of 1)"


@distributed.shardable
def smc(
    target,
    initial,
    num_particles: int,
    kernel: Kernel | None = None,
    schedule="adaptive",
    resample_threshold: float = 0.5,
    scheme: str = "systematic",
    generator: torch.Generator | None = None,
    *,
    max_steps: int = 10_000,
    progress: bool = False,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool = True,
    callback=None,
    final_moves: int = 0,
    group=None,
) -> SMCResult:
    r"""Annealed SMC from ``initial`` (any proposal) to ``target`` (unnormalized).

    Args:
        target: ``log_prob(x) -> (N,)`` (and ``score`` optionally).
        initial: distribution with ``sample`` and normalized ``log_prob``.
        num_particles: N.
        kernel: :class:`~mcsample.kernels.RandomWalk`, ``MALA`` (default) or ``HMC``.
        schedule: ``"adaptive"`` (conditional ESS 0.5), an
            :class:`~mcsample.tempering.AdaptiveSchedule`, or an increasing list of betas
            ending at 1.
        resample_threshold: resample when ESS < threshold·N (1 = every step, 0 = never).
        scheme: resampling scheme for :func:`mcsample.resample`.
        generator: randomness; one is created (seeded from the global RNG) if ``None``, so that
            checkpoints can resume exactly.
        max_steps: raise if beta has not reached 1 after this many steps.
        progress: tqdm bar over beta.
        checkpoint: path of a checkpoint written atomically every ``checkpoint_every`` steps;
            with ``resume=True`` an existing checkpoint of the same run is continued, and one of
            another run (target, initial, seed, particle count, settings) is refused.
        final_moves: extra MCMC moves of every particle at beta = 1 after the last step
            (rejuvenation; the weights are unchanged).
        callback: called as ``callback(state)`` after every step, e.g. to record the
            per-particle log-weights ``state.log_w`` and positions ``state.x`` at each step.
        group: shard the population over a ``torch.distributed`` process group
            (:mod:`mcsample.distributed`): ``None`` (default) shards over the default group when
            it is initialized with more than one process, ``False`` runs on this process alone,
            :func:`mcsample.distributed.islands` runs independent islands. ``num_particles`` is
            the whole population; ``particles`` holds this rank's share, with the whole
            population's evidence and ESS.

    Returns:
        :class:`SMCResult`: ``particles`` (:class:`~mcsample.weighted.WeightedSamples` with
        genealogy), ``log_evidence`` and its single-run ``log_evidence_stderr``, ``betas``,
        ``ess_history`` (after each reweighting), ``acceptance_history``, ``resampled``.
    """
    kernel = MALA() if kernel is None else kernel
    schedule = as_schedule(schedule)
    fk.check_resampling(resample_threshold, scheme)
    check_generator(generator)
    num_particles = fk.check_num_particles(num_particles)
    run = None
    if checkpoint is not None:
        run = fingerprint(
            "smc",
            generator,
            num_particles=num_particles,
            kernel=kernel,
            schedule=schedule,
            resample_threshold=resample_threshold,
            scheme=scheme,
            final_moves=final_moves,
            identity=probe_identity(target, initial),
        )
    if generator is None:
        generator = default_generator(torch.as_tensor(draw(initial, 1, None)[0]).device)
    generator = distributed.split_generator(generator)  # this rank's stream when sharded
    model = AnnealedSMC(
        target, initial, distributed.local_size(num_particles), kernel, schedule, resample_threshold, scheme
    )
    state = fk.run(
        model,
        num_particles,
        generator=generator,
        progress=progress,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        resume=resume,
        fingerprint=run,
        state_class=SMCState,
        callback=callback,
        max_steps=max_steps,
    )
    if final_moves > 0:
        state = move(state, target, initial, kernel, final_moves, generator)
    particles = fk.to_weighted_samples(state)
    return SMCResult(
        particles=particles,
        betas=torch.tensor(state.betas, dtype=torch.float64),
        ess_history=torch.tensor(state.ess_history, dtype=torch.float64),
        acceptance_history=torch.tensor(state.acceptance_history, dtype=torch.float64),
        resampled=torch.tensor(state.resampled, dtype=torch.bool),
        state=state,
    )
