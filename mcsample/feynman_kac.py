r"""Feynman-Kac models: one particle state, one step contract, one driver.

Every particle algorithm of the engine — annealed SMC (:mod:`mcsample.smc`), the Feynman-Kac
correctors (:mod:`mcsample.correctors`) and the diffusion posterior samplers
(:mod:`mcsample.posterior`) — is a *Feynman-Kac model* (Del Moral 2004; Chopin &
Papaspiliopoulos 2020, ch. 5): Markov kernels :math:`M_k` and log-potentials :math:`\log G_k`
define the path of distributions

.. math:: \mathbb Q_k(dx_{0:k}) \propto M_0(dx_0)\,\prod_{j\le k} G_j(x_{j-1}, x_j)\,M_j(x_{j-1}, dx_j),

and the particle approximation is the same for all of them: *reweight*
(:math:`\log w_i \mathrel{+}= \log G_k`), *resample* when the effective sample size falls below
a threshold — folding :math:`\log\frac1N\sum_i w_i` into the evidence, resetting the weights
and recording who descends from whom — and *move* (:math:`x_i\sim M_{k+1}(x_i,\cdot)`). The
product of the folded averages, :math:`\hat Z = \prod_k \frac1N\sum_i w_i^{(k)}`, is an
unbiased estimate of the normalizer of the last distribution (Del Moral 2004, Thm 7.4.2),
with or without resampling at a given step.

This module holds the pieces that are the same for every model, in the style of particles'
``FeynmanKac`` and BlackJAX's ``(init, step)``:

* :class:`FKState` — particles ``x``, float64 log-weights since the last resampling, the folded
  log-evidence ``log_scale``, the :class:`~mcsample.weighted.Genealogy` (time-0 ancestors and
  what the error bars need), per-particle ``cache`` tensors that travel with the particles
  (cached log-densities, scores, gradients), counters (network evaluations), histories.
  Frozen: a step returns a new state and never mutates its input.
* :func:`reweight` and :func:`resample_if_needed` — the reweight/resample/fold/reset sequence,
  written once.
* :func:`run` — the one driver: progress bar, checkpoints with a run fingerprint
  (:mod:`mcsample.checkpoint`), resume ("resumed at step k of n"), identical results to an
  uninterrupted run.

With a ``torch.distributed`` process group the population is sharded over processes
(:mod:`mcsample.distributed`): each rank's state holds its share of the particles, and the
ESS, the evidence increments and the resampling here are those of the whole population.

A model is any object with ``name``, ``init(generator) -> FKState``,
``step(state, generator) -> FKState`` (pure), ``done(state) -> bool`` and
``progress(state) -> (position, total, postfix)``; optionally ``prepare(state)`` (deterministic
set-up that a resumed run must redo) and ``check(state)`` (refuse a checkpoint's state).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from mcsample import distributed
from mcsample.checkpoint import default_generator, load_state, save_state
from mcsample.diagnostics import ess as _ess
from mcsample.resampling import SCHEMES, resample
from mcsample.weighted import Genealogy, WeightedSamples

__all__ = [
    "FKState",
    "FeynmanKacModel",
    "start",
    "reweight",
    "record_ess",
    "resample_if_needed",
    "take",
    "run",
    "to_weighted_samples",
    "check_resampling",
]


@dataclass(frozen=True)
class FKState:
    r"""The state of a particle algorithm after ``index`` steps.

    ``x`` ``(N, *event)``; ``log_w`` float64 ``(N,)`` since the last resampling; ``log_scale``
    the float64 log-evidence folded in at resampling events, so that
    :math:`\log\hat Z = c + \log\frac1N\sum_i w_i` (:attr:`log_evidence`); ``genealogy``;
    ``cache`` per-particle tensors (leading dimension N) resampled with ``x``; ``counters``
    plain numbers (e.g. ``nfe``); ``ess_history`` the ESS recorded at each step and
    ``resampled_at`` the step indices at which the particles were resampled.
    """

    x: Tensor
    log_w: Tensor
    log_scale: Tensor
    genealogy: Genealogy
    index: int = 0
    cache: dict = field(default_factory=dict)
    counters: dict = field(default_factory=dict)
    ess_history: tuple = ()
    resampled_at: tuple = ()

    @property
    def num_particles(self) -> int:
        return self.log_w.numel()

    @property
    def log_evidence(self) -> Tensor:
        """:math:`\\log\\hat Z = c + \\log\\frac1N\\sum_i w_i`."""
        return self.log_scale + torch.logsumexp(self.log_w, 0) - math.log(self.log_w.numel())

    @property
    def ancestors(self) -> Tensor:
        """Time-0 ancestor of each particle."""
        return self.genealogy.eves

    @property
    def generations(self) -> int:
        """1 + the number of resampling events."""
        return self.genealogy.generations

    def replace(self, **changes) -> FKState:
        """A copy with ``changes`` (the dataclass stays frozen)."""
        return dataclasses.replace(self, **changes)

    def count(self, **increments: int) -> FKState:
        """A copy with ``counters[k] += v``."""
        counters = dict(self.counters)
        for k, v in increments.items():
            counters[k] = counters.get(k, 0) + v
        return self.replace(counters=counters)

    # -- checkpoints: plain tensors, numbers, lists and dicts (torch.load(weights_only=True)) --
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["genealogy"] = self.genealogy.to_dict()
        d["ess_history"] = [float(e) for e in self.ess_history]
        d["resampled_at"] = list(self.resampled_at)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FKState:
        d = dict(d)
        d["genealogy"] = Genealogy.from_dict(d["genealogy"])
        d["ess_history"] = tuple(d.get("ess_history", ()))
        d["resampled_at"] = tuple(d.get("resampled_at", ()))
        return cls(**d)


class FeynmanKacModel(Protocol):
    """What :func:`run` drives (see the module docstring)."""

    name: str

    def init(self, generator: torch.Generator | None) -> FKState: ...

    def step(self, state: FKState, generator: torch.Generator | None) -> FKState: ...

    def done(self, state: FKState) -> bool: ...

    def progress(self, state: FKState) -> tuple[float, float, dict]: ...


def start(
    x: Tensor, log_w: Tensor | None = None, log_scale: float | Tensor = 0.0, *, state_class: type = FKState, **fields
) -> FKState:
    """A state at step 0: particles ``x``, log-weights ``log_w`` (default 0), folded
    log-evidence ``log_scale``, each particle its own ancestor."""
    n = x.shape[0]
    if n < 1:
        raise ValueError("need at least one particle")
    if log_w is None:
        log_w = torch.zeros(n, dtype=torch.float64, device=x.device)
    log_w = log_w.to(torch.float64)
    if log_w.shape != (n,):
        raise ValueError(f"log-weights of shape {tuple(log_w.shape)} for {n} particles")
    log_scale = torch.as_tensor(log_scale, dtype=torch.float64, device=x.device).clone()
    genealogy = distributed.start_genealogy(n, x.device) or Genealogy.start(n, device=x.device)
    return state_class(x=x, log_w=log_w, log_scale=log_scale, genealogy=genealogy, **fields)


def check_log_weights(log_w: Tensor, where: str) -> None:
    """Raise a ``ValueError`` naming ``where`` when a log-weight is NaN or every one is -inf
    (over the whole population, on every rank, when it is sharded)."""
    if distributed.sharded() is not None:
        return distributed.check_log_weights(log_w, where)
    nan = torch.isnan(log_w)
    if bool(nan.any()):
        raise ValueError(
            f"{where}: the log-weight is NaN for {int(nan.sum())} of {log_w.numel()} particles "
            f"(first at indices {torch.nonzero(nan).flatten()[:5].tolist()}); the "
            "target, score or potential returned NaN"
        )
    if bool((log_w == -math.inf).all()):
        raise ValueError(
            f"{where}: all {log_w.numel()} particles have zero weight (the target is zero "
            "wherever the particles are; check the initial distribution's support)"
        )


def reweight(state: FKState, log_incr: Tensor, where: str = "reweight") -> FKState:
    r""":math:`\log w_i \mathrel{+}= \log G(x_i)`, in float64, refusing NaN."""
    log_w = state.log_w + log_incr.to(torch.float64).reshape(state.log_w.shape)
    check_log_weights(log_w, where)
    return state.replace(log_w=log_w)


def record_ess(state: FKState) -> FKState:
    """Append the current ESS to ``ess_history`` (a step that does not resample)."""
    return state.replace(ess_history=state.ess_history + (float(distributed.ess(state.log_w)),))


def take(state: FKState, idx: Tensor, scheme: str | None = None) -> FKState:
    r"""Keep particles ``idx`` (ancestor indices from resampling): fold
    :math:`\log\frac1N\sum_i w_i` into ``log_scale``, reset the weights to 0, carry ``x`` and the
    ``cache`` along and update the genealogy."""
    n = state.log_w.numel()
    idx = idx.to(state.log_w.device)
    log_scale = state.log_scale + torch.logsumexp(state.log_w, 0) - math.log(n)
    genealogy = state.genealogy.resampled(state.log_w, idx, scheme=scheme)
    xi = idx.to(state.x.device)
    cache = {k: _take(v, xi, n) for k, v in state.cache.items()}
    return state.replace(
        x=state.x[xi],
        log_w=torch.zeros(idx.numel(), dtype=torch.float64, device=state.log_w.device),
        log_scale=log_scale,
        genealogy=genealogy,
        cache=cache,
    )


def _take(v, idx: Tensor, n: int):
    if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n:
        return v[idx.to(v.device)]
    if v is None or isinstance(v, (int, float, str, bool)) or (isinstance(v, Tensor) and v.ndim == 0):
        return v
    raise TypeError(
        f"cache entries must be per-particle tensors with leading dimension {n}, got "
        f"{type(v).__name__} of shape {getattr(v, 'shape', None)}"
    )


def resample_if_needed(
    state: FKState,
    threshold: float,
    scheme: str = "systematic",
    generator: torch.Generator | None = None,
    *,
    force: bool = False,
    record: bool = True,
    group=None,
) -> FKState:
    r"""Resample when ESS < ``threshold``·N (or ``force``), recording the ESS in
    ``ess_history`` (unless ``record=False``): the one reweight-resample-fold-reset sequence of
    every particle algorithm.

    ``threshold`` 1 resamples at every step, 0 never (unless ``force``). In a sharded run
    (``group``, or the run in progress; :mod:`mcsample.distributed`) the ESS is the whole
    population's and the resampling is the exact global one, followed by the balanced exchange
    of the particles."""
    with distributed.use(group) as shard:
        if shard is not None and not shard.islands:
            stats = distributed._weight_stats(shard, state.log_w, f"step {state.index}")
            e = distributed._ess_of(stats)
            if record:
                state = state.replace(ess_history=state.ess_history + (e,))
            if force or e < threshold * stats.num:
                state = distributed.resample_state(state, scheme, generator, stats).replace(
                    resampled_at=state.resampled_at + (state.index,)
                )
            return state
    check_log_weights(state.log_w, f"step {state.index}")
    n = state.log_w.numel()
    e = float(_ess(state.log_w))
    if record:
        state = state.replace(ess_history=state.ess_history + (e,))
    if force or e < threshold * n:
        idx = resample(state.log_w, n, scheme, generator)
        state = take(state, idx, scheme).replace(resampled_at=state.resampled_at + (state.index,))
    return state


def check_resampling(threshold: float, scheme: str) -> None:
    """Up-front checks of the resampling arguments shared by every algorithm."""
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"resample_threshold must be in [0, 1], got {threshold}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown resampling scheme {scheme!r}; choose one of {sorted(SCHEMES)}")
    distributed.check_scheme(scheme)


def check_num_particles(num_particles) -> int:
    if isinstance(num_particles, bool) or int(num_particles) != num_particles or int(num_particles) < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    return int(num_particles)


def to_weighted_samples(
    state: FKState, x: Tensor | None = None, log_w: Tensor | None = None, **info
) -> WeightedSamples:
    """The final :class:`~mcsample.WeightedSamples` of a run (``x``/``log_w`` override the
    state's, e.g. after a final potential), with ``info`` (counters, resampling steps, ...); in a
    sharded run a :class:`~mcsample.distributed.ShardedSamples` (collective)."""
    return distributed.finish(
        WeightedSamples(
            (state.x if x is None else x).detach(),
            state.log_w if log_w is None else log_w,
            log_scale=state.log_scale,
            genealogy=state.genealogy,
            ess_history=torch.tensor(state.ess_history, dtype=torch.float64),
            info={**state.counters, "resampled_at": list(state.resampled_at), **info},
        )
    )


def run(
    model,
    num_particles: int,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    resume: bool = True,
    fingerprint: dict | None = None,
    device=None,
    state_class: type = FKState,
    callback: Callable[[Any], None] | None = None,
    max_steps: int | None = None,
    group=None,
) -> FKState:
    """Initialize ``model`` and step it until ``model.done(state)``: the one driver.

    With ``checkpoint`` the state is written atomically every ``checkpoint_every`` steps and at
    the end, tagged with ``model.kind`` (default ``model.name``) and the run's ``fingerprint``
    (:func:`mcsample.checkpoint.fingerprint`); with ``resume`` an existing checkpoint of the
    same run is continued (a checkpoint of another run raises, naming the difference) and the
    result equals an uninterrupted run's. ``callback(state)`` is called after every step;
    ``max_steps`` bounds runs of unknown length (adaptive schedules).

    ``group``: run sharded over a process group (:mod:`mcsample.distributed`); ``None`` joins
    the sharded run in progress, or shards over the default group when
    ``torch.distributed`` is initialized with more than one process; ``False`` runs on this
    process alone. ``num_particles`` is then the whole population, each rank draws its share
    from its own stream (:func:`~mcsample.distributed.split_generator`), and checkpoints are
    written per rank with a manifest.
    """
    fresh = group is not None or not distributed.entered()
    with distributed.use(group) as shard:
        if fresh and shard is not None:
            generator = distributed.split_generator(generator, device)
        return _drive(
            model,
            num_particles,
            generator,
            progress,
            checkpoint,
            checkpoint_every,
            resume,
            fingerprint,
            device,
            state_class,
            callback,
            max_steps,
            shard,
        )


def _drive(
    model,
    num_particles,
    generator,
    progress,
    checkpoint,
    checkpoint_every,
    resume,
    fingerprint,
    device,
    state_class,
    callback,
    max_steps,
    shard,
) -> FKState:
    kind = getattr(model, "kind", model.name)
    load, save = (load_state, save_state) if shard is None else (distributed.load_state, distributed.save_state)
    saved, generator = load(
        checkpoint if resume else None,
        kind,
        generator,
        device,
        run=fingerprint,
        progress_of=lambda st: _where(model, st),
    )
    if saved is not None:
        state = state_class.from_dict(saved)
        if state.num_particles != distributed.local_size(num_particles):
            raise ValueError(
                f"checkpoint {os.fspath(checkpoint)} holds {state.num_particles} particles, "
                f"not num_particles={num_particles}"
            )
        if hasattr(model, "check"):
            model.check(state)
        if hasattr(model, "prepare"):
            model.prepare(state)
    else:
        if generator is None and checkpoint is not None:
            generator = default_generator(device)
        state = model.init(generator)
    position, total, _ = model.progress(state)
    bar = None
    if progress and (shard is None or shard.rank == 0):
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=position, desc=getattr(model, "description", kind))
    while not model.done(state):
        if max_steps is not None and state.index >= max_steps:
            raise RuntimeError(
                f"{kind} reached max_steps={max_steps} at {_where(model, state.to_dict())} "
                "without finishing (a stalling adaptive schedule?)"
            )
        state = model.step(state, generator)
        if callback is not None:
            callback(state)
        if bar is not None:
            new, _, postfix = model.progress(state)
            bar.update(new - bar.n)
            if postfix:
                bar.set_postfix(postfix)
        if checkpoint is not None and (state.index % checkpoint_every == 0 or model.done(state)):
            save(checkpoint, state.to_dict(), generator, kind, fingerprint)
    if bar is not None:
        bar.close()
    return state


def _where(model, saved: dict) -> str:
    describe = getattr(model, "describe_position", None)
    return describe(saved) if describe is not None else f"step {int(saved['index'])}"
