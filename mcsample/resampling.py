r"""Resampling: turn weighted particles into equally weighted ones.

A resampling scheme draws :math:`N` ancestor indices :math:`A_1..A_N` such that each particle's
offspring count :math:`O_i = \#\{n: A_n = i\}` has mean :math:`N W_i` (unbiasedness). Schemes
differ in the variance of :math:`O_i` (Douc, Cappé & Moulines 2005; Gerber, Chopin & Whiteley
2019; Chopin & Papaspiliopoulos 2020, ch. 9):

* ``multinomial``: :math:`A_n` i.i.d. from :math:`W`; the noisiest.
* ``stratified``: one uniform in each stratum :math:`[(n-1)/N, n/N)`, inverted through the
  cumulative weights.
* ``systematic``: one shared uniform, :math:`u_n = (n-1+U)/N`; counts are
  :math:`\lfloor N W_i\rfloor` or :math:`\lceil N W_i\rceil`. The usual default.
* ``residual``: keep :math:`\lfloor N W_i\rfloor` copies deterministically, draw the
  :math:`R = N - \sum_i\lfloor N W_i\rfloor` others multinomially from the residual weights.
* ``ssp`` (Srinivasan sampling process, Gerber et al. 2019): starting from
  :math:`\lfloor NW_i\rfloor`, pairs of particles with fractional parts
  :math:`(a, b)` are resolved so that one of them becomes an integer, keeping
  :math:`E[O_i] = NW_i` and :math:`O_i \in \{\lfloor NW_i\rfloor, \lceil NW_i\rceil\}`. Pairs are
  formed in parallel rounds (neighbours among the still-fractional particles), so the whole
  scheme is :math:`O(N)` vectorized work in :math:`O(\log N)` rounds.

All schemes share one signature, run on the device of the weights, and draw their uniforms and
form their cumulative sums in float64 (categorical sampling in float32 truncates small
probabilities). A particle with zero weight (``-inf`` log-weight) is never drawn.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from mcsample.diagnostics import normalized_log_weights

__all__ = ["resample", "SCHEMES"]

_ONE_MINUS = 1.0 - 2.0**-53


def _uniform(shape, generator, device) -> Tensor:
    return torch.rand(shape, dtype=torch.float64, generator=generator, device=device)


def _invert_cdf(W: Tensor, u: Tensor) -> Tensor:
    """Indices :math:`i` with :math:`C_{i-1} \\le u < C_i` for sorted or unsorted ``u`` in [0,1)."""
    cdf = torch.cumsum(W, 0)
    cdf = cdf / cdf[-1]  # cdf[-1] == 1 exactly, so every u < 1 finds an index
    return torch.searchsorted(cdf, u.clamp(max=_ONE_MINUS), right=True)


def _multinomial(W: Tensor, num: int, generator) -> Tensor:
    return _invert_cdf(W, _uniform(num, generator, W.device))


def _stratified(W: Tensor, num: int, generator) -> Tensor:
    n = torch.arange(num, dtype=torch.float64, device=W.device)
    return _invert_cdf(W, (n + _uniform(num, generator, W.device)) / num)


def _systematic(W: Tensor, num: int, generator) -> Tensor:
    n = torch.arange(num, dtype=torch.float64, device=W.device)
    return _invert_cdf(W, (n + _uniform((), generator, W.device)) / num)


def _counts_to_indices(counts: Tensor) -> Tensor:
    return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)


def _floor(scaled: Tensor) -> Tensor:
    # N*W_i that should be an integer can come out as k - 1e-15 after normalization
    return torch.floor(scaled + 1e-9)


def _residual(W: Tensor, num: int, generator) -> Tensor:
    scaled = num * W
    floor = _floor(scaled)
    rest = num - int(floor.sum())
    counts = floor.to(torch.long)
    if rest > 0:
        residual = (scaled - floor).clamp(min=0.0)
        extra = _invert_cdf(residual, _uniform(rest, generator, W.device))
        counts = counts + torch.bincount(extra, minlength=W.numel())
    return _counts_to_indices(counts)


def _ssp(W: Tensor, num: int, generator) -> Tensor:
    scaled = num * W
    floor = _floor(scaled)
    frac = (scaled - floor).clamp(min=0.0)
    eps = 1e-12
    while True:
        active = torch.nonzero((frac > eps) & (frac < 1 - eps)).flatten()
        m = active.numel() // 2 * 2
        if m == 0:
            break
        i, j = active[0:m:2], active[1:m:2]
        a, b = frac[i], frac[j]
        s = a + b
        u = _uniform(i.numel(), generator, W.device)
        low = s < 1.0
        # s < 1: one of them takes all, a with prob a/s.   s >= 1: one becomes 1, a with prob (1-b)/(2-s)
        pick_a = torch.where(low, u * s < a, u * (2.0 - s) < (1.0 - b))
        new_a = torch.where(low, torch.where(pick_a, s, 0.0), torch.where(pick_a, 1.0, s - 1.0))
        new_b = torch.where(low, torch.where(pick_a, 0.0, s), torch.where(pick_a, s - 1.0, 1.0))
        frac[i], frac[j] = new_a, new_b
    counts = (floor + torch.round(frac)).to(torch.long)
    # float rounding can leave the total off by one; fix it on the particle nearest the boundary
    diff = num - int(counts.sum())
    if diff != 0:
        deficit = torch.where(W > 0, scaled - counts, -torch.inf if diff > 0 else torch.inf)
        order = torch.argsort(deficit, descending=diff > 0)
        step = 1 if diff > 0 else -1
        for k in order[: abs(diff)].tolist():
            counts[k] += step
    return _counts_to_indices(counts)


SCHEMES: dict[str, Callable[[Tensor, int, torch.Generator | None], Tensor]] = {
    "multinomial": _multinomial,
    "stratified": _stratified,
    "systematic": _systematic,
    "residual": _residual,
    "ssp": _ssp,
}


def resample(
    log_w: Tensor,
    num: int | None = None,
    scheme: str = "systematic",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Draw ``num`` (default :math:`N`) ancestor indices from unnormalized log-weights.

    :math:`E[\#\{n: A_n = i\}] = \text{num}\cdot W_i` for every scheme; see the module docstring.
    Returns a ``LongTensor`` of shape ``(num,)`` on the device of ``log_w``: sorted for every
    scheme but ``multinomial``, whose indices come in random order.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown resampling scheme {scheme!r}; choose one of {sorted(SCHEMES)}")
    W = torch.exp(normalized_log_weights(log_w))
    num = W.numel() if num is None else int(num)
    if num < 1:
        raise ValueError(f"num must be a positive number of draws, got {num}")
    if generator is not None and generator.device != W.device:
        raise ValueError(
            f"generator is on {generator.device} but the log-weights are on {W.device}"
        )
    return SCHEMES[scheme](W, num, generator)
