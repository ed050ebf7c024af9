r"""Plain vectorized numpy resampling: the baseline a user would write in ten lines.

Each function takes unnormalized log-weights ``lw`` (float64, shape ``(N,)``), the number of
draws ``M`` and a ``numpy.random.Generator``, and returns ``M`` ancestor indices, doing the same
work as :func:`mcsample.resample`: normalize :math:`W_i = e^{\ell_i - \max\ell}/\sum_j
e^{\ell_j-\max\ell}`, form the cumulative sum :math:`C`, and invert it with
:func:`numpy.searchsorted` at the scheme's uniforms (Douc, Cappé & Moulines 2005):

* multinomial: :math:`u_n` i.i.d. uniform (indices in random order);
* stratified: :math:`u_n = (n + U_n)/M`;
* systematic: :math:`u_n = (n + U)/M`, one shared :math:`U`;
* residual: :math:`\lfloor M W_i\rfloor` copies, then multinomial on the residuals.

SSP has no vectorized numpy form (it is a sequential pairing); only mcsample and ``particles``
time it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SCHEMES", "normalize"]


def normalize(lw: np.ndarray) -> np.ndarray:
    """Self-normalized weights :math:`W = \\mathrm{softmax}(\\ell)`, float64."""
    w = np.exp(lw - lw.max())
    w /= w.sum()
    return w


def _invert_cdf(W: np.ndarray, u: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(W)
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, u, side="right"), W.shape[0] - 1)


def multinomial(lw: np.ndarray, M: int, rng: np.random.Generator) -> np.ndarray:
    """Multinomial resampling: :math:`A_n = C^{-1}(u_n)`, :math:`u_n` i.i.d. uniform."""
    return _invert_cdf(normalize(lw), rng.random(M))


def stratified(lw: np.ndarray, M: int, rng: np.random.Generator) -> np.ndarray:
    """Stratified resampling: one uniform per stratum, :math:`u_n = (n + U_n)/M`."""
    return _invert_cdf(normalize(lw), (np.arange(M) + rng.random(M)) / M)


def systematic(lw: np.ndarray, M: int, rng: np.random.Generator) -> np.ndarray:
    """Systematic resampling: :math:`u_n = (n + U)/M` with a single uniform :math:`U`."""
    return _invert_cdf(normalize(lw), (np.arange(M) + rng.random()) / M)


def residual(lw: np.ndarray, M: int, rng: np.random.Generator) -> np.ndarray:
    """Residual resampling: :math:`\\lfloor MW_i\\rfloor` copies plus a multinomial remainder."""
    MW = M * normalize(lw)
    floor = np.floor(MW)
    counts = floor.astype(np.int64)
    rest = M - int(counts.sum())
    if rest > 0:
        extra = _invert_cdf(MW - floor, rng.random(rest))
        counts += np.bincount(extra, minlength=lw.shape[0])
    return np.repeat(np.arange(lw.shape[0]), counts)


SCHEMES = {
    "systematic": systematic,
    "stratified": stratified,
    "multinomial": multinomial,
    "residual": residual,
}
