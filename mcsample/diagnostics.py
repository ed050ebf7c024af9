r"""How good are my weights? Effective sample sizes, evidence and Pareto k-hat.

Given unnormalized log-weights :math:`\ell_i = \log w_i` of :math:`N` particles,

* the **effective sample size** (Kish) is :math:`\mathrm{ESS} = (\sum_i w_i)^2 / \sum_i w_i^2`,
  between 1 (one particle carries all the weight) and :math:`N` (equal weights). It is computed
  in log space, :math:`2\,\mathrm{lse}(\ell) - \mathrm{lse}(2\ell)`, so no weight is ever
  exponentiated unnormalized;
* the **conditional ESS** of Zhou, Johansen & Aston (2016) measures how much an incremental
  reweighting :math:`w_i \to w_i\,u_i` degrades a weighted sample that is *already* weighted:
  :math:`\mathrm{CESS} = N\,(\sum_i W_i u_i)^2 / \sum_i W_i u_i^2` with normalized
  :math:`W_i`. Adaptive tempering must use it, not the ESS of :math:`u` alone: when the previous
  step did not resample the two differ (a bug other SMC codes shipped);
* the **log-evidence** estimate is :math:`\log \frac1N \sum_i w_i`;
* **PSIS** (Vehtari, Simpson, Gelman, Yao & Gabry, JMLR 2024) fits a generalized Pareto
  distribution to the largest weights. Its shape :math:`\hat k` tells whether the weights have
  finite variance: :math:`\hat k < 0.5` the importance sampling estimate is reliable and
  converges at the usual rate; :math:`0.5 \le \hat k < 0.7` finite mean but infinite variance,
  usable after smoothing with care (convergence slows); :math:`\hat k \ge 0.7` the estimate is
  unreliable and the proposal should be improved.

All functions take a 1-D tensor of log-weights (any float dtype, any device) and compute in
float64. ``-inf`` is a zero weight; NaN raises, and so do all weights at ``-inf``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ess", "conditional_ess", "log_evidence", "psis", "normalized_log_weights"]


def _check(log_w: Tensor, name: str = "log_w") -> Tensor:
    if not isinstance(log_w, Tensor):
        log_w = torch.as_tensor(log_w)
    if log_w.dim() != 1:
        raise ValueError(f"{name} must be 1-D of shape (N,), got shape {tuple(log_w.shape)}")
    if log_w.numel() == 0:
        raise ValueError(f"{name} is empty: need at least one particle")
    log_w = log_w.to(torch.float64)
    nan = torch.isnan(log_w)
    if bool(nan.any()):
        where = torch.nonzero(nan).flatten()[:5].tolist()
        raise ValueError(
            f"{name} has NaN for {int(nan.sum())} of {log_w.numel()} particles "
            f"(first at indices {where}); NaN is a bug upstream, -inf means zero weight"
        )
    if bool((log_w == math.inf).any()):
        raise ValueError(f"{name} has +inf entries: an infinite weight is not a weight")
    if bool((log_w == -math.inf).all()):
        raise ValueError(
            f"all {log_w.numel()} log-weights are -inf: every particle has zero weight "
            "(the target is zero wherever the proposal put mass)"
        )
    return log_w


def normalized_log_weights(log_w: Tensor) -> Tensor:
    """Log of the self-normalized weights :math:`\\log W_i = \\ell_i - \\mathrm{lse}(\\ell)`, float64."""
    log_w = _check(log_w)
    return log_w - torch.logsumexp(log_w, 0)


def ess(log_w: Tensor) -> Tensor:
    r"""Kish effective sample size :math:`(\sum w)^2/\sum w^2` from unnormalized log-weights.

    Returns a float64 scalar tensor in :math:`[1, N]`.
    """
    log_w = _check(log_w)
    return torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))


def conditional_ess(log_w: Tensor, log_incr: Tensor) -> Tensor:
    r"""Conditional ESS of Zhou, Johansen & Aston (2016, JCGS), eq. (3.16).

    :math:`\mathrm{CESS} = N (\sum_i W_i u_i)^2 / \sum_i W_i u_i^2`, where :math:`W` are the
    current normalized weights (from ``log_w``) and :math:`u_i = \exp(\text{log\_incr}_i)` the
    incremental weights. Lies in :math:`[0, N]`; equals :math:`N` when :math:`u` is constant on
    the support of :math:`W`.
    """
    log_W = normalized_log_weights(log_w)
    log_incr = torch.as_tensor(log_incr, device=log_W.device).to(torch.float64)
    if log_incr.shape != log_W.shape:
        raise ValueError(f"log_incr has shape {tuple(log_incr.shape)}; expected {tuple(log_W.shape)} like log_w")
    if bool(torch.isnan(log_incr).any()):
        raise ValueError(f"log_incr has NaN for {int(torch.isnan(log_incr).sum())} particles")
    a = torch.logsumexp(log_W + log_incr, 0)
    b = torch.logsumexp(log_W + 2 * log_incr, 0)
    if not bool(torch.isfinite(a)):
        return torch.zeros((), dtype=torch.float64, device=log_W.device)
    return torch.exp(math.log(log_W.numel()) + 2 * a - b)


def log_evidence(log_w: Tensor) -> Tensor:
    r"""Importance-sampling estimate of :math:`\log Z`: :math:`\log \frac1N\sum_i w_i` (float64)."""
    log_w = _check(log_w)
    return torch.logsumexp(log_w, 0) - math.log(log_w.numel())


# ----------------------------------------------------------------------------------------------
# Pareto-smoothed importance sampling


def _gpd_fit(x: Tensor) -> tuple[Tensor, Tensor]:
    r"""Generalized-Pareto fit to sorted positive exceedances ``x`` (ascending).

    The empirical-Bayes estimator of Zhang & Stephens (2009) as used by PSIS: a grid of
    :math:`m = 30 + \lfloor\sqrt n\rfloor` values of :math:`b = -\xi/\sigma`, profile likelihood
    weights, posterior mean of :math:`b`, then :math:`\hat k = \mathrm{mean}\,\log(1 - b x)`,
    and the weakly informative prior of Vehtari et al. (2024) that shrinks :math:`\hat k` towards
    0.5 with 10 pseudo-observations. Returns :math:`(\hat k, \hat\sigma)`.
    """
    n = x.numel()
    m = 30 + int(math.sqrt(n))
    j = torch.arange(1, m + 1, dtype=x.dtype, device=x.device)
    quartile = x[int(n / 4 + 0.5) - 1]
    b = 1.0 / x[-1] + (1.0 - torch.sqrt(m / (j - 0.5))) / (3.0 * quartile)
    k = torch.log1p(-b[:, None] * x[None, :]).mean(dim=1)
    profile = n * (torch.log(-b / k) - k - 1.0)
    weights = torch.softmax(profile, 0)
    b_post = (b * weights).sum()
    k_post = torch.log1p(-b_post * x).mean()
    sigma = -k_post / b_post
    k_post = (n * k_post + 10 * 0.5) / (n + 10)
    return k_post, sigma


def psis(log_w: Tensor) -> tuple[Tensor, Tensor]:
    r"""Pareto-smoothed importance sampling (Vehtari et al., JMLR 2024).

    The :math:`M = \lceil\min(S/5, 3\sqrt S)\rceil` largest weights are replaced by the expected
    order statistics :math:`F^{-1}((z - \frac12)/M)` of a generalized Pareto distribution fitted
    to them (exceedances over the :math:`(M+1)`-th largest weight), truncated at the largest raw
    weight. Returns ``(smoothed_log_w, khat)``: smoothed log-weights (float64, shifted so that
    the largest raw weight is 0) and the Pareto shape :math:`\hat k` (float64 scalar; ``inf``
    when fewer than 5 tail draws make a fit impossible; ``-inf`` when the largest weights are
    all equal, e.g. after resampling: bounded weights have no tail, the limit
    :math:`k \to -\infty` of the generalized Pareto family).

    Reading :math:`\hat k`: below 0.5 the weights have finite variance and the estimate is
    reliable; 0.5-0.7 finite mean, infinite variance, slower convergence; above 0.7 the
    importance-sampling estimate is unreliable (Vehtari et al. 2024, sec. 3).
    """
    log_w = _check(log_w)
    S = log_w.numel()
    lw = log_w - log_w.max()
    M = int(math.ceil(min(S / 5.0, 3.0 * math.sqrt(S))))
    inf = torch.tensor(math.inf, dtype=torch.float64, device=lw.device)
    if M < 5 or M + 1 > S:
        return lw, inf
    sorted_lw, order = torch.sort(lw)
    cutoff = torch.clamp(sorted_lw[-M - 1], min=math.log(torch.finfo(torch.float64).tiny))
    tail_idx = order[-M:]
    tail = sorted_lw[-M:]
    if bool(sorted_lw[-1] <= cutoff):  # the M+1 largest weights are equal: no tail at all
        return lw, -inf
    tail = tail[tail > cutoff]
    tail_idx = tail_idx[-tail.numel() :] if tail.numel() > 0 else tail_idx[:0]
    if tail.numel() < 5:
        return lw, inf
    exp_cut = torch.exp(cutoff)
    x = torch.exp(tail) - exp_cut
    khat, sigma = _gpd_fit(x)
    if not bool(torch.isfinite(khat)):
        return lw, inf
    n = tail.numel()
    p = (torch.arange(n, dtype=torch.float64, device=lw.device) + 0.5) / n
    # GPD quantile: sigma/k ((1-p)^-k - 1); the k -> 0 limit is -sigma log(1-p)
    if abs(float(khat)) < 1e-12:
        q = -sigma * torch.log1p(-p)
    else:
        q = sigma * torch.expm1(-khat * torch.log1p(-p)) / khat
    smoothed = torch.log(q + exp_cut).clamp(max=0.0)
    out = lw.clone()
    out[tail_idx] = smoothed
    return out, khat
