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

The algorithm is a small explicit state, :class:`SMCState`, and a pure :func:`step`;
:func:`smc` is a thin loop that can checkpoint the state atomically every ``k`` steps and
resume from it with the same result as an uninterrupted run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mcsample.checkpoint import default_generator, fingerprint, load_state, probe_identity, save_state
from mcsample.diagnostics import ess as _ess
from mcsample.kernels import MALA, Kernel, Point, evaluator
from mcsample.protocols import check_event_shape, check_generator, draw
from mcsample.resampling import SCHEMES, resample
from mcsample.tempering import as_schedule, log_increment
from mcsample.weighted import ParticleState, WeightedSamples

__all__ = ["SMCState", "SMCResult", "init", "step", "move", "smc"]


@dataclass
class SMCState(ParticleState):
    """Everything an SMC run needs to continue: particles, weights, beta, genealogy, histories."""

    x: Tensor
    parts: Tensor  # (N, 2) float64: log q0, log target
    grads: Tensor | None
    log_w: Tensor  # float64, since the last resampling
    log_scale: Tensor  # float64 scalar: log-evidence folded in at resampling events
    beta: float
    ancestors: Tensor  # time-0 ancestor of each particle
    generations: int
    step_size: Tensor
    iteration: int = 0
    betas: list = field(default_factory=lambda: [0.0])
    ess_history: list = field(default_factory=list)
    acceptance_history: list = field(default_factory=list)
    resampled: list = field(default_factory=list)

    @property
    def point(self) -> Point:
        return Point(self.x, self.parts, self.grads)


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
    """Per-coordinate weighted standard deviation of the particles (kernel preconditioner)."""
    W = torch.softmax(log_w, 0).to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
    mean = (W * x).sum(0)
    var = (W * (x - mean) ** 2).sum(0)
    floor = 1e-6 * var.mean().clamp(min=1e-30)
    return torch.sqrt(torch.clamp(var, min=float(floor)))


def init(target, initial, num_particles: int, kernel: Kernel, generator=None) -> SMCState:
    """Draw ``num_particles`` from ``initial`` at :math:`\\beta = 0`, equally weighted."""
    x, _ = draw(initial, num_particles, generator)
    check_event_shape(target, x, "initial distribution")
    point = evaluator(target, initial)(x, kernel.needs_grad)
    n = x.shape[0]
    dim = int(math.prod(x.shape[1:]))
    return SMCState(
        x=point.x,
        parts=point.parts,
        grads=point.grads,
        log_w=torch.zeros(n, dtype=torch.float64, device=x.device),
        log_scale=torch.zeros((), dtype=torch.float64, device=x.device),
        beta=0.0,
        ancestors=torch.arange(n, device=x.device),
        generations=1,
        step_size=torch.tensor(kernel.initial_step_size(dim), dtype=torch.float64, device=x.device),
    )


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
    n = state.log_w.numel()
    ell = state.parts[:, 1] - state.parts[:, 0]
    new_beta = schedule.next_beta(state.beta, state.log_w, ell)
    log_w = state.log_w + log_increment(new_beta - state.beta, ell)
    if bool((log_w == -math.inf).all()):
        raise ValueError(
            f"all {n} particles have zero weight at beta = {new_beta:.4g}: the target is zero "
            "wherever the particles are (check the initial distribution's support)"
        )
    ess = _ess(log_w)
    point, log_scale = state.point, state.log_scale
    ancestors, generations = state.ancestors, state.generations
    did_resample = bool(ess < resample_threshold * n)
    if did_resample:
        idx = resample(log_w, n, scheme, generator)
        log_scale = log_scale + torch.logsumexp(log_w, 0) - math.log(n)
        point, ancestors = point.take(idx), ancestors[idx]
        log_w = torch.zeros_like(log_w)
        generations += 1
    evaluate = evaluator(target, initial)
    scale = _weighted_scale(point.x, log_w)
    h, rates = state.step_size, []
    for _ in range(kernel.num_steps):
        point, prob = kernel.step(point, evaluate, new_beta, h, scale, generator)
        rate = prob.mean()
        rates.append(rate)
        h = kernel.adapt(h, rate)
    acc = float(torch.stack(rates).mean()) if rates else float("nan")
    return SMCState(
        x=point.x, parts=point.parts, grads=point.grads, log_w=log_w, log_scale=log_scale,
        beta=new_beta, ancestors=ancestors, generations=generations, step_size=h,
        iteration=state.iteration + 1,
        betas=state.betas + [new_beta],
        ess_history=state.ess_history + [float(ess)],
        acceptance_history=state.acceptance_history + [acc],
        resampled=state.resampled + [did_resample],
    )


def move(state: SMCState, target, initial, kernel: Kernel, num_moves: int,
         generator: torch.Generator | None = None) -> SMCState:
    """``num_moves`` extra MCMC moves at the current beta (e.g. rejuvenation at beta = 1).

    The weights do not change: each move leaves :math:`\\pi_\\beta` invariant.
    """
    evaluate = evaluator(target, initial)
    scale = _weighted_scale(state.x, state.log_w)
    point, h, rates = state.point, state.step_size, []
    for _ in range(num_moves):
        point, prob = kernel.step(point, evaluate, state.beta, h, scale, generator)
        rates.append(prob.mean())
        h = kernel.adapt(h, rates[-1])
    new = SMCState(**{**state.to_dict(), "x": point.x, "parts": point.parts, "grads": point.grads,
                      "step_size": h})
    return new


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
            with ``resume=True`` an existing checkpoint is continued.
        final_moves: extra MCMC moves of every particle at beta = 1 after the last step
            (rejuvenation; the weights are unchanged).
        callback: called as ``callback(state)`` after every step, e.g. to record the
            per-particle log-weights ``state.log_w`` and positions ``state.x`` at each step.

    Returns:
        :class:`SMCResult`: ``particles`` (:class:`~mcsample.weighted.WeightedSamples` with
        genealogy), ``log_evidence`` and its single-run ``log_evidence_stderr``, ``betas``,
        ``ess_history`` (after each reweighting), ``acceptance_history``, ``resampled``.
    """
    kernel = MALA() if kernel is None else kernel
    schedule = as_schedule(schedule)
    if not 0.0 <= resample_threshold <= 1.0:
        raise ValueError(f"resample_threshold must be in [0, 1], got {resample_threshold}")
    check_generator(generator)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown resampling scheme {scheme!r}; choose one of {sorted(SCHEMES)}")
    if int(num_particles) < 1:
        raise ValueError(f"num_particles must be at least 1, got {num_particles}")
    state = None
    run = None
    if checkpoint is not None:
        run = fingerprint("smc", generator, num_particles=int(num_particles), kernel=kernel,
                          schedule=schedule, resample_threshold=resample_threshold, scheme=scheme,
                          final_moves=final_moves,
                          identity=probe_identity(target, initial))
    saved, generator = load_state(checkpoint if resume else None, "smc", generator, run=run,
                                  progress_of=lambda st: f"step {st['iteration']} (beta = {float(st['beta']):.4g} of 1)")
    if saved is not None:
        state = SMCState.from_dict(saved)
        if state.log_w.numel() != num_particles:
            raise ValueError(
                f"checkpoint {checkpoint} holds {state.log_w.numel()} particles, "
                f"not num_particles={num_particles}"
            )
    if state is None:
        if generator is None:
            generator = default_generator(torch.as_tensor(draw(initial, 1, None)[0]).device)
        state = init(target, initial, num_particles, kernel, generator)
    bar = tqdm(total=1.0, disable=not progress, desc="SMC beta",
               bar_format="{l_bar}{bar}| beta={n:.4f} [{elapsed}{postfix}]")
    bar.update(state.beta)
    while state.beta < 1.0:
        if state.iteration >= max_steps:
            raise RuntimeError(
                f"SMC reached max_steps={max_steps} at beta={state.beta:.4g}; the adaptive "
                "schedule is stalling (targets with zero density where the initial has mass?)"
            )
        prev = state.beta
        state = step(state, target, initial, kernel, schedule,
                     resample_threshold=resample_threshold, scheme=scheme, generator=generator)
        if callback is not None:
            callback(state)
        bar.update(state.beta - prev)
        bar.set_postfix(ess=f"{state.ess_history[-1]:.0f}", acc=f"{state.acceptance_history[-1]:.2f}")
        if checkpoint is not None and (state.iteration % checkpoint_every == 0 or state.beta >= 1.0):
            save_state(checkpoint, state.to_dict(), generator, "smc", run)
    bar.close()
    if final_moves > 0:
        state = move(state, target, initial, kernel, final_moves, generator)
    particles = WeightedSamples(
        state.x, state.log_w, log_scale=state.log_scale, ancestors=state.ancestors,
        generations=state.generations,
        ess_history=torch.tensor(state.ess_history, dtype=torch.float64),
    )
    return SMCResult(
        particles=particles,
        betas=torch.tensor(state.betas, dtype=torch.float64),
        ess_history=torch.tensor(state.ess_history, dtype=torch.float64),
        acceptance_history=torch.tensor(state.acceptance_history, dtype=torch.float64),
        resampled=torch.tensor(state.resampled, dtype=torch.bool),
        state=state,
    )
