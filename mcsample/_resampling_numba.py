r"""CPU resampling compiled with numba: each scheme as one or two fused loops over the particles.

:func:`mcsample.resample` uses these kernels when the log-weights are on the CPU; the torch code
in ``mcsample/resampling.py`` (schemes, guarantees, references) runs everywhere else. Same
schemes, other data flow: torch's eager kernels make a pass over memory per operation where one
compiled loop makes one pass per scheme, and at :math:`N = 10^7` the work is memory-bound.

* Weights :math:`w_i = e^{\ell_i - \max\ell}` and their total :math:`C` come from numpy's
  vectorized ``exp`` and pairwise ``sum`` in float64 (a compiled scalar ``exp`` is 5x slower).
* Every scheme walks the particles once with the running sum :math:`s_i = \sum_{j\le i} w_j`,
  the scaled cumulative weight :math:`x_i = M s_i / C`, and the end :math:`E_i` of particle
  :math:`i`'s offspring; it writes :math:`i` into ``out[E_{i-1}:E_i]``. Systematic:
  :math:`E_i = \lceil x_i - U\rceil`; stratified: :math:`E_i = \lfloor x_i\rfloor +
  [U_{\lfloor x_i\rfloor} < x_i - \lfloor x_i\rfloor]`; multinomial and residual: :math:`E_i =
  \#\{n: y_n < x_i\}` for sorted uniforms :math:`y` made from exponential spacings in
  :math:`O(M)`, counted from :math:`E_{i-1}` by four branch-free comparisons (more than four
  draws in one particle's interval is rare, and then the walk goes on).
* ``out[E_{i-1}:E_i] = i`` writes four slots unconditionally and loops only past four: a slot
  that is not particle :math:`i`'s is overwritten by the particle it belongs to, which comes
  later. This saves a mispredicted branch per particle (2x at :math:`N = 10^7`).
* Fresh memory costs more than the arithmetic at :math:`N = 10^7` (page faults), so spent
  buffers are reused: the multinomial draws share one buffer with the sorted uniforms they are
  read from, the weights' buffer takes the shuffle's uniforms or SSP's draws, and SSP's counts
  overwrite its uniforms.
* Multinomial draws come out sorted and are then shuffled (Fisher–Yates); residual sampling
  draws the multinomial part on the residual weights :math:`\{N W_i\}`; SSP pairs the
  fractional parts sequentially, left to right, as Gerber, Chopin & Whiteley (2019) describe
  it and N. Chopin's ``particles`` does it, in :math:`O(N)`.

Every uniform comes from ``torch.rand(..., dtype=torch.float64, generator=generator)``, written
straight into a numpy buffer, so a seeded generator reproduces the draws: the torch path's
indices for systematic and stratified sampling (same uniforms, same formula), other indices
with the same distribution and guarantees for the other schemes. Zero-weight particles never move
:math:`s_i`, so they get no offspring; draws that rounding leaves past the last particle go to
the last particle of positive weight. The kernels compile on first use and are cached on disk
(``cache=True``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit
from torch import Tensor

from mcsample.diagnostics import _check

__all__ = ["SCHEMES"]

_LOG_TINY = -37.5  # log(2^-54): stands in for log(0) (torch.rand can return exactly 0)


# ----------------------------------------------------------------------------- kernels


@njit(cache=True, inline="always")
def _emit(out, start, end, i):
    """out[start:end] = i, writing four slots whatever end is (out has four spare slots).
    Unsigned indices spare numba's negative-index wraparound (25% of systematic's time)."""
    s = np.uint64(start)
    out[s] = i
    out[s + np.uint64(1)] = i
    out[s + np.uint64(2)] = i
    out[s + np.uint64(3)] = i
    for k in range(start + 4, end):
        out[k] = i


@njit(cache=True, inline="always")
def _count_below(y_bits, start, x_bits):
    """#{n >= start: y_n < x} for sorted y >= 0 padded with +inf, from the bit patterns: for
    non-negative doubles their order as int64 is their numeric order, and an integer compare
    is quicker on this loop's critical path (each particle starts where the last one ended)."""
    p = np.uint64(start)
    e = (
        start
        + (y_bits[p] < x_bits)
        + (y_bits[p + np.uint64(1)] < x_bits)
        + (y_bits[p + np.uint64(2)] < x_bits)
        + (y_bits[p + np.uint64(3)] < x_bits)
    )
    if e == start + 4:
        while y_bits[e] < x_bits:
            e += 1
    return e


@njit(cache=True)
def _systematic(w, total, num, u, out):
    scale = num / total
    s, prev, last = 0.0, 0, 0
    for i in range(w.size):
        s += w[i]
        e = min(math.ceil(s * scale - u), num)
        _emit(out, prev, e, i)
        last = i if w[i] > 0.0 else last
        prev = e
    out[prev:num] = last


@njit(cache=True)
def _stratified(w, total, num, u, out):
    # u has num + 1 entries, u[num] = 1: stratum num does not exist
    scale = num / total
    s, prev, last = 0.0, 0, 0
    for i in range(w.size):
        s += w[i]
        x = s * scale
        k = min(int(x), num)
        e = min(k + (u[k] < x - k), num)
        _emit(out, prev, e, i)
        last = i if w[i] > 0.0 else last
        prev = e
    out[prev:num] = last


@njit(cache=True)
def _spacings(y, num):
    """y[:num + 1] holds log-uniforms; turn them into the cumulative sums of num + 1
    exponentials (y_0 < ... < y_num, the first num are sorted uniforms times y_num) and pad
    with four +inf."""
    s = 0.0
    for n in range(num + 1):
        s -= max(y[n], _LOG_TINY)
        y[n] = s
    y[num + 1 :] = np.inf


@njit(cache=True)
def _multinomial_sorted(w, total, y, num, out):
    scale = y[num] / total  # compare y_n < s_i * y_num / C
    y_bits = y.view(np.int64)
    x = np.empty(1)
    x_bits = x.view(np.int64)
    s, prev, last = 0.0, 0, 0
    for i in range(w.size):
        s += w[i]
        x[0] = s * scale
        e = min(_count_below(y_bits, prev, x_bits[0]), num)
        _emit(out, prev, e, i)
        last = i if w[i] > 0.0 else last
        prev = e
    out[prev:num] = last


@njit(cache=True)
def _shuffle(a, u):
    """Fisher–Yates with the uniforms u (len(a) of them, u[0] unused)."""
    for j in range(a.size - 1, 0, -1):
        k = min(int(u[j] * (j + 1)), j)
        a[j], a[k] = a[k], a[j]


@njit(cache=True, inline="always")
def _floor_frac(wi, scale):
    sc = wi * scale
    f = math.floor(sc + 1e-9)  # N W_i that should be an integer can come out as k - 1e-15
    return int(f), max(sc - f, 0.0)


@njit(cache=True)
def _residual_totals(w, total, num):
    """(num - sum of floor(N W_i), sum of the residuals {N W_i})."""
    scale = num / total
    floors, rest = 0, 0.0
    for i in range(w.size):
        f, r = _floor_frac(w[i], scale)
        floors += f
        rest += r
    return num - floors, rest


@njit(cache=True)
def _residual(w, total, num, y, rest, r_total, out):
    # y: `rest` sorted uniforms as in _multinomial_sorted. r_total == 0 < rest would need
    # sum(N W_i) off by a whole draw in rounding; then the rest go to the last positive weight.
    scale = num / total
    rscale = y[rest] / r_total if r_total > 0.0 else 0.0
    y_bits = y.view(np.int64)
    x = np.empty(1)
    x_bits = x.view(np.int64)
    s, prev, pos, last = 0.0, 0, 0, 0
    for i in range(w.size):
        f, r = _floor_frac(w[i], scale)
        s += r
        x[0] = s * rscale
        e = min(_count_below(y_bits, prev, x_bits[0]), rest)
        end = min(pos + f + e - prev, num)
        _emit(out, pos, end, i)
        last = i if w[i] > 0.0 else last
        prev, pos = e, end
    out[pos:num] = last


@njit(cache=True)
def _ssp_counts(w, total, num, u, counts):
    """counts = floor(N W_i) plus the sequential SSP pairing of the fractional parts; the last
    survivor's fraction is 0 or 1 up to rounding, so that sum(counts) == num."""
    scale = num / total
    f, fa = _floor_frac(w[0], scale)
    counts[0] = f
    a = 0  # the particle still carrying a fraction fa
    for b in range(1, w.size):
        f, fb = _floor_frac(w[b], scale)
        ub = u[b]
        counts[b] = f  # u and counts may share memory: u[b] is read first
        s = fa + fb
        hi = s >= 1.0
        # s < 1: (a, b) -> (s, 0) w.p. fa/s, else (0, s).
        # s >= 1: (a, b) -> (1, s-1) w.p. (1-fb)/(2-s), else (s-1, 1).
        c = ub * (2.0 - s if hi else s) < (1.0 - fb if hi else fa)
        counts[a if c else b] += 1 if hi else 0
        a = a if c != hi else b
        fa = s - 1.0 if hi else s
    counts[a] += int(fa > 0.5 and w[a] > 0.0)


@njit(cache=True)
def _expand(counts, num, out):
    pos = 0
    for i in range(counts.size):
        end = min(pos + counts[i], num)
        _emit(out, pos, end, i)
        pos = end


# ----------------------------------------------------------------------------- drivers


def _weights(log_w: Tensor, size: int = 0) -> tuple[np.ndarray, float, np.ndarray]:
    """w = exp(log_w - max) in float64, its sum, and the buffer of w (size entries at least, for
    reuse once w is spent); raises like the torch path on NaN, +inf or all -inf."""
    if log_w.dtype not in (torch.float32, torch.float64):
        log_w = log_w.to(torch.float64)
    lw = log_w.detach().contiguous().numpy()
    m = lw.max()
    if not math.isfinite(m):
        _check(log_w)  # raises with the detailed message
    buf = np.empty(max(lw.size, size))
    w = np.subtract(lw, m, out=buf[: lw.size], dtype=np.float64)  # float32 input: exact in float64
    np.exp(w, out=w)
    return w, float(w.sum()), buf


def _rand(buf: np.ndarray, generator) -> np.ndarray:
    """Fill a float64 numpy buffer with uniforms from the torch generator."""
    if buf.size:
        torch.rand(buf.size, dtype=torch.float64, generator=generator, out=torch.from_numpy(buf))
    return buf


def _uniforms(n: int, generator, pad: int = 0) -> np.ndarray:
    """n float64 uniforms from the torch generator in a numpy buffer with pad spare slots."""
    buf = np.empty(n + pad)
    _rand(buf[:n], generator)
    return buf


def _sorted_uniforms(n: int, generator, y: np.ndarray | None = None) -> np.ndarray:
    """Cumulative sums of n + 1 exponentials (y[:n] / y[n] are n sorted uniforms), padded
    with four +inf, in y (n + 5 entries) or a new buffer."""
    y = np.empty(n + 5) if y is None else y
    _rand(y[: n + 1], generator)
    np.log(y[: n + 1], out=y[: n + 1])
    _spacings(y, n)
    return y


def _out(num: int) -> np.ndarray:
    return np.empty(num + 4, dtype=np.int64)


def systematic(log_w: Tensor, num: int, generator=None) -> Tensor:
    w, total, _ = _weights(log_w)
    u = torch.rand((), dtype=torch.float64, generator=generator).item()
    out = _out(num)
    _systematic(w, total, num, u, out)
    return torch.from_numpy(out[:num])


def stratified(log_w: Tensor, num: int, generator=None) -> Tensor:
    w, total, _ = _weights(log_w)
    u = _uniforms(num, generator, pad=1)
    u[num] = 1.0
    out = _out(num)
    _stratified(w, total, num, u, out)
    return torch.from_numpy(out[:num])


def multinomial(log_w: Tensor, num: int, generator=None) -> Tensor:
    w, total, _ = _weights(log_w)
    # One buffer for the sorted uniforms and the draws (fresh memory is costly at N = 1e7):
    # y_n sits four slots after out[n], so the merge's writes to out[E_{i-1}:E_{i-1} + 4] never
    # reach a y_n it has still to read (n >= E_{i-1}).
    buf = np.empty(num + 9)
    y = _sorted_uniforms(num, generator, buf[4:])
    out = buf.view(np.int64)
    _multinomial_sorted(w, total, y, num, out)
    u = w[:num] if w.size >= num else np.empty(num)  # w is spent: its buffer takes the uniforms
    _shuffle(out[:num], _rand(u, generator))  # i.i.d. draws come in random order
    return torch.from_numpy(out[:num])


def residual(log_w: Tensor, num: int, generator=None) -> Tensor:
    w, total, _ = _weights(log_w)
    rest, r_total = _residual_totals(w, total, num)
    rest = max(rest, 0)
    out = _out(num)
    _residual(w, total, num, _sorted_uniforms(rest, generator), rest, r_total, out)
    return torch.from_numpy(out[:num])


def _fix_total(counts: np.ndarray, w: np.ndarray, total: float, num: int) -> None:
    """If rounding left sum(counts) != num, move the difference to the particles whose counts
    are furthest from N W_i (never to a zero-weight one)."""
    diff = num - int(counts.sum())
    if diff:
        deficit = np.where(w > 0, w * (num / total) - counts, -np.inf if diff > 0 else np.inf)
        order = np.argsort(-deficit if diff > 0 else deficit, kind="stable")[: abs(diff)]
        counts[order] += 1 if diff > 0 else -1


def ssp(log_w: Tensor, num: int, generator=None) -> Tensor:
    w, total, buf = _weights(log_w, size=num + 4)
    # pair b reads u[b] before counts[b] overwrites it (same buffer; u[0] is not used)
    u = _uniforms(w.size, generator)
    counts = u.view(np.int64)
    _ssp_counts(w, total, num, u, counts)
    _fix_total(counts, w, total, num)
    out = buf.view(np.int64)  # w is spent: its buffer takes the draws
    _expand(counts, num, out)
    return torch.from_numpy(out[:num].copy() if 2 * num < w.size else out[:num])


SCHEMES: dict = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
    "ssp": ssp,
}
