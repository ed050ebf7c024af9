r"""Importance sampling, streamed in batches.

Draw :math:`x_i \sim q`, weight :math:`w_i = \tilde\pi(x_i)/q(x_i)`; then
:math:`\frac1N\sum w_i \to Z` and :math:`\sum_i W_i f(x_i) \to E_\pi[f]` (self-normalized
importance sampling; Owen 2013, ch. 9). The proposal is drawn and evaluated ``batch_size``
samples at a time, so its memory stays bounded; only samples and float64 log-weights are kept.
With ``keep_samples=False`` only the log-weights and running weighted sums of the requested
statistics are kept, so :math:`10^8` samples need the memory of one batch (plus 8 bytes per
log-weight).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from mcsample import distributed
from mcsample.checkpoint import default_generator
from mcsample.protocols import check_event_shape, check_generator, check_log_prob, draw, renamed
from mcsample.weighted import RunningMoments, WeightedSamples

__all__ = ["importance_sample"]


@distributed.shardable
def importance_sample(
    target,
    proposal,
    num_particles: int | None = None,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    *,
    keep_samples: bool = True,
    statistics: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    progress: bool = False,
    num_samples: int | None = None,
    group=None,
) -> WeightedSamples:
    r"""Self-normalized importance sampling of ``target`` with ``proposal``.

    Args:
        target: unnormalized log-density, ``log_prob(x) -> (B,)``.
        proposal: sampler with normalized ``log_prob`` (any :class:`~mcsample.protocols.Proposal`).
        num_particles: total number of draws :math:`N`.
        batch_size: draws per batch (default: all at once, capped at :math:`2^{16}`).
        generator: source of randomness; a fixed seed reproduces the result.
        keep_samples: keep the samples (default) or only log-weights and ``statistics``.
        statistics: ``{name: f}`` streamed as weighted running sums, available afterwards
            through ``result.expectation(name)``.
        progress: show a tqdm bar.
        num_samples: deprecated name of ``num_particles``.
        group: draw the ``num_particles`` over the ranks of a ``torch.distributed`` process
            group, each rank its share from its own stream (:mod:`mcsample.distributed`;
            ``None``: the default group when it is initialized with more than one process,
            ``False``: this process alone); the result is a
            :class:`~mcsample.distributed.ShardedSamples`.

    Returns:
        :class:`~mcsample.weighted.WeightedSamples` with :math:`\log w = \log\tilde\pi - \log q`.
    """
    num_particles = renamed("importance_sample", "num_particles", num_particles, "num_samples", num_samples)
    if num_particles is None:
        raise TypeError("importance_sample() missing the required argument 'num_particles'")
    num_samples = int(num_particles)
    if num_samples < 1:
        raise ValueError(f"num_particles must be positive, got {num_samples}")
    batch_size = min(num_samples, 1 << 16) if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    check_generator(generator)
    num_samples = distributed.local_size(num_samples)  # this rank's share when sharded
    if generator is None and distributed.active() is not None:
        generator = default_generator(draw(proposal, 1, None)[0].device)
    generator = distributed.split_generator(generator)
    statistics = dict(statistics or {})
    moments = {name: RunningMoments() for name in statistics}
    shapes: dict[str, torch.Size] = {}
    samples = None
    log_ws = torch.empty(0)
    bar = tqdm(
        total=num_samples, disable=not (progress and distributed.is_main()), desc="importance sampling", unit="x"
    )
    done = 0
    with torch.no_grad():
        while done < num_samples:
            b = min(batch_size, num_samples - done)
            x, log_q = draw(proposal, b, generator)
            if done == 0:
                check_event_shape(target, x)
            log_p = check_log_prob(target.log_prob(x), b, "target")
            if done == 0:  # allocate the outputs once: no list of batches to concatenate
                log_ws = torch.empty(num_samples, dtype=torch.float64, device=log_p.device)
                if keep_samples:
                    samples = torch.empty((num_samples,) + x.shape[1:], dtype=x.dtype, device=x.device)
            log_w = log_ws[done : done + b]
            torch.sub(log_p.to(torch.float64), log_q.to(torch.float64), out=log_w)
            if keep_samples:
                samples[done : done + b] = x
            for name, fn in statistics.items():
                values = fn(x)
                shapes[name] = values.shape[1:]
                moments[name].update(log_w, values)
            done += b
            bar.update(b)
    bar.close()
    return distributed.finish(
        WeightedSamples(
            samples,
            log_ws,
            statistics={name: (moments[name], shapes[name]) for name in statistics},
        )
    )
