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
  :math:`E[O_i] = NW_i` and :math:`O_i \in \{\lfloor NW_i\rfloor, \lceil NW_i\rceil\}`. On the
  CPU the pairs are formed left to right in one pass, as in Gerber et al.; the torch path forms
  them in parallel rounds (neighbours among the still-fractional particles), :math:`O(N)`
  vectorized work in :math:`O(\log N)` rounds.

All schemes share one signature, run on the device of the weights, and draw their uniforms and
form their cumulative sums in float64 (categorical sampling in float32 truncates small
probabilities). A particle with zero weight (``-inf`` log-weight) is never drawn.

Two implementations, one behaviour: log-weights on the CPU go to compiled numba kernels
(``mcsample/_resampling_numba.py``, one fused loop per scheme, 2-30x faster there), all others
(CUDA) to the torch code below; ``resampling.CPU_BACKEND = "torch"`` sends CPU weights there
too. Both draw their uniforms from ``generator``: a seeded generator reproduces the indices of
either path (across the two only for systematic and stratified sampling, which use the same
uniforms the same way, up to rounding at a stratum edge).

Torch implementation: no binary search. With the scaled cumulative weights
:math:`x_i = M C_i / C_N`, particle :math:`i`'s offspring end at
:math:`E_i = \#\{n: u_n < x_i\}`, in closed form for systematic
(:math:`\lceil x_i - U\rceil`) and stratified sampling, and by a bucket table over sorted
uniforms (exponential spacings) for multinomial and residual sampling; ancestor indices are the
cumulative sum of a marker array with ones at the :math:`E_i`. Everything is :math:`O(N + M)`
with sequential memory access; below 8192 draws a binary search over the small CDF is cheaper.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mcsample.diagnostics import _check
from mcsample.protocols import device_index

__all__ = ["resample", "SCHEMES"]

CPU_BACKEND = "numba"  # "numba" (torch if numba is missing) or "torch": who resamples on the CPU
_NUMBA_SCHEMES: dict | None = None


def _log_w_checked(log_w: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(log_w, Tensor):
        log_w = torch.as_tensor(log_w)
    if log_w.dim() != 1 or log_w.numel() == 0:
        _check(log_w)
    log_w = log_w.to(torch.float64)
    m = log_w.max()
    if not bool(torch.isfinite(m)):
        _check(log_w)  # raises with the detailed message (NaN, +inf or all -inf)
    return log_w, m


def _scaled_cdf(log_w: Tensor, num: int) -> Tensor:
    """x_i = num * C_i / C_N, nondecreasing; every particle from the last positive weight on
    has x_i == num exactly (C_i / C_N == 1 in floating point), so none after it is drawn."""
    log_w, m = _log_w_checked(log_w)
    cdf = torch.cumsum(torch.exp(log_w - m), 0)
    return cdf.div_(cdf[-1].clone()).mul_(num)  # in place: one buffer


def _below(num: int, like: Tensor) -> Tensor:
    """The largest double below num."""
    return torch.nextafter(like.new_tensor(float(num)), like.new_tensor(0.0))


def _ends_to_indices(ends: Tensor, num: int) -> Tensor:
    """Given nondecreasing end positions E_i in [0, num] (E_{N-1} = num), A_n = #{i: E_i <= n}."""
    marker = torch.zeros(num + 1, dtype=torch.long, device=ends.device)
    marker.scatter_add_(0, ends, torch.ones((), dtype=torch.long, device=ends.device).expand_as(ends))
    return torch.cumsum(marker[:num], 0)


def _counts_to_indices(counts: Tensor, num: int) -> Tensor:
    return _ends_to_indices(torch.cumsum(counts, 0).clamp_(max=num), num)


def _uniform(shape, generator, device) -> Tensor:
    return torch.rand(shape, dtype=torch.float64, generator=generator, device=device)


def systematic(log_w: Tensor, num: int, generator=None) -> Tensor:
    # u_n = (n + U)/M < c_i  <=>  n < x_i - U  <=>  n <= ceil(x_i - U) - 1  -> E_i = ceil(x_i - U)
    x = _scaled_cdf(log_w, num)
    U = _uniform((), generator, x.device)
    ends = torch.ceil(x.sub_(U)).clamp_(min=0, max=num).to(torch.long)
    return _ends_to_indices(ends, num)


def stratified(log_w: Tensor, num: int, generator=None) -> Tensor:
    # u_n = (n + U_n)/M < c_i: every n < k = floor(x_i) counts, n = k iff U_k < x_i - k.
    x = _scaled_cdf(log_w, num)
    U = _uniform(num + 1, generator, x.device)
    U[num] = 1.0  # k == num: no stratum left
    k = torch.floor(x).clamp_(max=num)
    ki = k.to(torch.long)
    ends = ki + (U[ki] < x - k)
    return _ends_to_indices(ends, num)


def _sorted_uniform_ends(x: Tensor, y: Tensor) -> Tensor:
    """E_i = #{n: y_n < x_i} for nondecreasing x (N,) and sorted y (M,) in [0, M], O(N + M).

    A bucket table over y (bucket b = [b, b+1) holds Poisson(1) of the sorted uniforms,
    whatever the weights) gives #{n: y_n < floor(x_i)}; then each particle steps over the few
    y in its own bucket: two full vectorized steps, then only the particles still moving.
    """
    num = y.numel() - 1  # y[num] == inf
    y_ext, y = y, y[:num]
    one = torch.ones((), dtype=torch.long, device=y.device)
    by = y.to(torch.long).clamp_(max=num - 1).add_(1)
    start = torch.zeros(num + 1, dtype=torch.long, device=y.device)
    start.scatter_add_(0, by, one.expand_as(by))
    start = start.cumsum_(0)  # start[b] = #{n: y_n < b}
    k = x.to(torch.long).clamp_(max=num)
    p = start.index_select(0, k)
    for _ in range(2):
        p.add_(torch.lt(y_ext.index_select(0, p), x).to(torch.long))
    active = torch.nonzero(y_ext.index_select(0, p) < x).flatten()
    while active.numel():
        pa = p.index_select(0, active) + 1
        p.index_copy_(0, active, pa)
        move = y_ext.index_select(0, pa) < x.index_select(0, active)
        active = active[move]
    return p


def _sorted_uniforms(num: int, generator, device) -> Tensor:
    """num sorted uniforms on [0, num] (scaled by num) in O(num), exponential spacings;
    returned with one more entry, +inf, that stops the walks in _sorted_uniform_ends."""
    e = _uniform(num + 1, generator, device)
    s = torch.log1p(e.neg_()).neg_().cumsum_(0)
    s.mul_(num / s[num]).clamp_(max=_below(num, s))
    s[num] = math.inf
    return s


SMALL = 8192  # below this many draws, binary search over a cache-resident cdf is cheaper


def multinomial(log_w: Tensor, num: int, generator=None) -> Tensor:
    x = _scaled_cdf(log_w, num)
    if num < SMALL:
        u = _uniform(num, generator, x.device).mul_(num).clamp_(max=_below(num, x))
        return torch.searchsorted(x, u, right=True).clamp_(max=x.numel() - 1)
    ends = _sorted_uniform_ends(x, _sorted_uniforms(num, generator, x.device))
    idx = _ends_to_indices(ends, num)
    # i.i.d. draws come in random order: undo the sorting of the uniforms
    idx = idx.index_select(0, torch.randperm(num, generator=generator, device=x.device))
    return idx


def _floor(scaled: Tensor) -> Tensor:
    # N*W_i that should be an integer can come out as k - 1e-15 after normalization
    return torch.floor(scaled + 1e-9)


def residual(log_w: Tensor, num: int, generator=None) -> Tensor:
    log_w, m = _log_w_checked(log_w)
    w = torch.exp(log_w - m)
    scaled = w.mul_(num / w.sum())
    floor = _floor(scaled)
    counts = floor.to(torch.long)
    rest = num - int(counts.sum())
    if rest > 0:
        r = torch.cumsum(scaled.sub_(floor).clamp_(min=0.0), 0)
        x = r.div_(r[-1].clone()).mul_(rest)
        if rest < SMALL:
            u = _uniform(rest, generator, x.device).mul_(rest).clamp_(max=_below(rest, x))
            counts += torch.bincount(
                torch.searchsorted(x, u, right=True).clamp_(max=x.numel() - 1), minlength=x.numel()
            )
        else:
            ends = _sorted_uniform_ends(x, _sorted_uniforms(rest, generator, x.device))
            counts += torch.diff(ends, prepend=ends.new_zeros(1))
    return _counts_to_indices(counts, num)


def ssp(log_w: Tensor, num: int, generator=None) -> Tensor:
    log_w, m = _log_w_checked(log_w)
    w = torch.exp(log_w - m)
    scaled = w.mul_(num / w.sum())
    floor = _floor(scaled)
    counts = floor.to(torch.long)
    frac = (scaled - floor).clamp_(min=0.0)
    eps = 1e-12
    idx = torch.nonzero((frac > eps) & (frac < 1 - eps)).flatten()
    val = frac.index_select(0, idx)
    # pair neighbours; each pair leaves one integer (0 or 1) and one survivor carrying the rest
    # (a survivor that lands on 0 or 1 up to rounding just keeps pairing, harmlessly)
    while idx.numel() > 1:
        mm = idx.numel() // 2 * 2
        pv, pi = val[:mm].view(-1, 2), idx[:mm].view(-1, 2)
        a, b = pv[:, 0], pv[:, 1]
        s = a + b
        low = s < 1.0
        # s < 1: survivor gets s, the other 0; a survives w.p. a/s.
        # s >= 1: survivor gets s - 1, the other 1; a gets the 1 w.p. (1-b)/(2-s), so b survives.
        u = _uniform(s.shape, generator, val.device)
        a_survives = torch.where(low, u * s < a, u * (2.0 - s) >= (1.0 - b))
        sel = a_survives.to(torch.long)
        counts.index_add_(0, pi.gather(1, sel[:, None]).squeeze(1), (~low).to(torch.long))
        surv_idx = pi.gather(1, (1 - sel)[:, None]).squeeze(1)
        surv_val = s.sub_((~low).to(s.dtype))
        idx = torch.cat([surv_idx, idx[mm:]])
        val = torch.cat([surv_val, val[mm:]])
    if idx.numel():
        counts.index_add_(0, idx, (val > 0.5).to(torch.long))
    diff = num - int(counts.sum())
    if diff != 0:
        deficit = torch.where(w > 0, scaled - counts, -torch.inf if diff > 0 else torch.inf)
        order = torch.argsort(deficit, descending=diff > 0)
        step = 1 if diff > 0 else -1
        for k in order[: abs(diff)].tolist():
            counts[k] += step
    return _counts_to_indices(counts, num)


SCHEMES: dict = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
    "ssp": ssp,
}


def _numba_schemes() -> dict:
    """The compiled CPU schemes, imported on first use; empty when numba cannot be imported."""
    global _NUMBA_SCHEMES
    if _NUMBA_SCHEMES is None:
        try:
            from mcsample._resampling_numba import SCHEMES as schemes
        except ImportError:
            schemes = {}
        _NUMBA_SCHEMES = schemes
    return _NUMBA_SCHEMES


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and device_index(a) == device_index(b)


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
    if not isinstance(log_w, Tensor):
        log_w = torch.as_tensor(log_w)
    num = log_w.numel() if num is None else int(num)
    if num < 1:
        raise ValueError(f"num must be a positive number of draws, got {num}")
    if generator is not None and not _same_device(generator.device, log_w.device):
        raise ValueError(f"generator is on {generator.device} but the log-weights are on {log_w.device}")
    if log_w.dim() != 1 or log_w.numel() == 0:
        _check(log_w)  # raises: shape or emptiness
    if log_w.device.type == "cpu" and CPU_BACKEND == "numba":
        fn = _numba_schemes().get(scheme)  # a scheme without a compiled kernel uses torch
        if fn is not None:
            return fn(log_w, num, generator)
    return SCHEMES[scheme](log_w, num, generator)
