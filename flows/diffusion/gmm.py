r"""An exact diffusion model: a Gaussian mixture noised by a schedule.

If the data are :math:`x_0\sim\sum_k w_k\,\mathcal N(m_k, C_k)` and
:math:`x_t = \alpha_t x_0 + \sigma_t\varepsilon`, then every marginal is again a mixture,

.. math:: q_t(x) = \sum_k w_k\,\mathcal N\big(x;\ \alpha_t m_k,\ \Sigma_k(t)\big),\qquad
          \Sigma_k(t) = \alpha_t^2 C_k + \sigma_t^2 I,

so the score, the denoiser :math:`E[x_0\mid x_t]` (Tweedie) and the log-density are known in
closed form. Solvers, correctors and posterior samplers are tested and benchmarked against it.

Each :math:`C_k` is stored by its eigen-decomposition :math:`U_k\,\mathrm{diag}(c_k)\,U_k^\top`,
computed once, so :math:`\Sigma_k(t) = U_k\,\mathrm{diag}(\alpha_t^2 c_k+\sigma_t^2)\,U_k^\top`
costs nothing to invert at any :math:`t`. Isotropic covariances (``covs`` a scalar or shape
``(K,)``) skip the per-component ``(B, K, d)`` residuals entirely and cost
:math:`O(BKd)` flops with :math:`O(BK + Kd)` memory; diagonal ones (``(K, d)``) skip the
rotations; full ones (``(K, d, d)``) rotate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["GaussianMixtureDiffusion"]


class GaussianMixtureDiffusion:
    r"""Noised Gaussian mixture :math:`q_t = \sum_k w_k\mathcal N(\alpha_t m_k, \alpha_t^2C_k+\sigma_t^2I)`.

    Args:
        weights: ``(K,)`` mixture weights (normalized here; must be non-negative).
        means: ``(K, d)``.
        covs: a scalar or ``(K,)`` (isotropic :math:`c_k I`), ``(K, d)`` (diagonal) or
            ``(K, d, d)`` (full, symmetric positive definite).
        schedule: a :class:`~mcsample.protocols.NoiseSchedule`.

    Methods take ``x`` of shape ``(B, d)`` and ``t`` a scalar or a ``(B,)`` tensor, and
    compute in ``x``'s dtype and device. Implements the ``DiffusionModel`` protocol
    (``schedule``, ``score``) plus ``denoise``, ``eps``, ``log_prob`` and samplers.
    """

    def __init__(self, weights, means, covs, schedule):
        means = torch.as_tensor(means)
        if not means.is_floating_point():
            means = means.to(torch.get_default_dtype())
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(means.shape)}")
        K, d = means.shape
        weights = torch.as_tensor(weights, dtype=means.dtype, device=means.device)
        if weights.shape != (K,):
            raise ValueError(f"weights must have shape ({K},) to match means, got {tuple(weights.shape)}")
        if bool((weights < 0).any()) or not bool(weights.sum() > 0):
            raise ValueError("mixture weights must be non-negative with a positive sum")
        covs = torch.as_tensor(covs, dtype=means.dtype, device=means.device)
        if covs.ndim == 0:
            covs = covs.expand(K)
        self.schedule = schedule
        self.means = means
        self.weights = weights / weights.sum()
        self.log_weights = torch.log(self.weights)
        self.dim = d
        self.num_components = K
        if covs.shape == (K,):
            self.kind = "isotropic"
            self.eigvals = covs.unsqueeze(-1).expand(K, d).clone()
            self.eigvecs = None
        elif covs.shape == (K, d):
            self.kind = "diagonal"
            self.eigvals = covs.clone()
            self.eigvecs = None
        elif covs.shape == (K, d, d):
            self.kind = "full"
            sym = 0.5 * (covs + covs.transpose(-1, -2))
            evals, evecs = torch.linalg.eigh(sym.to(torch.float64))
            self.eigvals = evals.to(means.dtype)
            self.eigvecs = evecs.to(means.dtype)
        else:
            raise ValueError(
                f"covs must be a scalar, (K,), (K, d) or (K, d, d) with K={K}, d={d}; got {tuple(covs.shape)}"
            )
        if bool((self.eigvals < 0).any()):
            raise ValueError(
                "mixture covariances must be positive semi-definite "
                f"(smallest eigenvalue {float(self.eigvals.min()):.3g})"
            )
        self._cache: dict = {}

    # ------------------------------------------------------------------------------------
    # data distribution
    @property
    def data_variance(self) -> float:
        r"""Variance of the mixture (the data at t = 0) per coordinate, averaged over
        coordinates: :math:`\frac1d\operatorname{tr}\operatorname{Cov}(x_0)`."""
        w = self.weights.to(torch.float64)
        mu = self.means.to(torch.float64)
        within = (w[:, None] * self.eigvals.to(torch.float64)).sum(0).sum()
        centre = w @ mu
        between = (w * ((mu - centre) ** 2).sum(-1)).sum()
        return float((within + between) / self.dim)

    @property
    def covs(self) -> Tensor:
        """Component covariances as full ``(K, d, d)`` matrices."""
        if self.eigvecs is None:
            return torch.diag_embed(self.eigvals)
        return self.eigvecs @ torch.diag_embed(self.eigvals) @ self.eigvecs.transpose(-1, -2)

    @property
    def mean(self) -> Tensor:
        r"""Mean of the data distribution, :math:`\sum_k w_k m_k`."""
        return self.weights @ self.means

    @property
    def cov(self) -> Tensor:
        r"""Covariance of the data, :math:`\sum_k w_k (C_k + m_k m_k^\top) - \mu\mu^\top`."""
        mu = self.mean
        second = torch.einsum("k,kij->ij", self.weights, self.covs) + torch.einsum(
            "k,ki,kj->ij", self.weights, self.means, self.means
        )
        return second - torch.outer(mu, mu)

    def to(self, device=None, dtype=None) -> GaussianMixtureDiffusion:
        """Copy with parameters on ``device`` / in ``dtype``."""
        new = object.__new__(GaussianMixtureDiffusion)
        new.__dict__.update(self.__dict__)
        for name in ("means", "weights", "log_weights", "eigvals", "eigvecs"):
            v = getattr(self, name)
            if v is not None:
                setattr(new, name, v.to(device=device, dtype=dtype))
        new._cache = {}
        return new

    # ------------------------------------------------------------------------------------
    # internals
    def _params(self, x: Tensor):
        key = (x.device, x.dtype)
        p = self._cache.get(key)
        if p is None:
            conv = lambda v: None if v is None else v.to(device=x.device, dtype=x.dtype)  # noqa: E731
            p = (conv(self.means), conv(self.log_weights), conv(self.eigvals), conv(self.eigvecs))
            self._cache[key] = p
        return p

    def _coeffs(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        """α_t, σ_t as ``(B, 1)`` (or ``(1, 1)``) tensors in x's dtype/device."""
        if x.ndim != 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.ndim == 0:
            t = t.reshape(1)
        elif t.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or shape ({x.shape[0]},), got {tuple(t.shape)}")
        a = self.schedule.alpha(t).unsqueeze(-1)
        s = self.schedule.sigma(t).unsqueeze(-1)
        return a, s

    def _posterior(self, x: Tensor, t):
        r"""Responsibilities and per-component quantities at :math:`(x, t)`.

        Returns ``log_joint`` ``(B, K)`` (:math:`\log w_k + \log\mathcal N(x;\alpha m_k,\Sigma_k)`)
        and a function giving the two vectors that score and denoiser need.
        """
        means, log_w, evals, evecs = self._params(x)
        a, s = self._coeffs(x, t)  # (B|1, 1)
        d = self.dim
        a2, s2 = a * a, s * s
        if self.kind == "isotropic":
            c = evals[:, 0]  # (K,)
            var = a2 * c + s2  # (B|1, K)
            # ||x - a m_k||² = ||x||² - 2a x·m_k + a²||m_k||²
            sq = (x * x).sum(-1, keepdim=True) - 2.0 * a * (x @ means.T) + a2 * (means * means).sum(-1)
            log_det = d * torch.log(var)
            log_joint = log_w - 0.5 * (sq / var + log_det + d * math.log(2 * math.pi))
            return log_joint, ("iso", var, c, a, means)
        var = a2.unsqueeze(-1) * evals + s2.unsqueeze(-1)  # (B|1, K, d)
        resid = x.unsqueeze(1) - a.unsqueeze(-1) * means  # (B, K, d)
        if evecs is not None:
            resid = torch.einsum("kji,bkj->bki", evecs, resid)  # rotate into eigenbasis
        log_det = torch.log(var).sum(-1)
        log_joint = log_w - 0.5 * ((resid * resid / var).sum(-1) + log_det + d * math.log(2 * math.pi))
        return log_joint, ("gen", var, evals, a, resid)

    def _score_and_denoise(self, x: Tensor, t, want_score: bool, want_x0: bool):
        log_joint, aux = self._posterior(x, t)
        r = torch.softmax(log_joint, dim=-1)  # (B, K) responsibilities
        score = x0 = None
        if aux[0] == "iso":
            _, var, c, a, means = aux
            rv = r / var  # (B, K)
            # Σ_k r_k (a m_k - x)/v_k
            sc = a * (rv @ means) - x * rv.sum(-1, keepdim=True)
            if want_score:
                score = sc
            if want_x0:
                # E[x0|x,k] = m_k + a c_k (x - a m_k)/v_k = m_k - a c_k · (a m_k - x)/v_k
                rcv = r * c / var
                x0 = r @ means + a * (x * rcv.sum(-1, keepdim=True) - a * (rcv @ means))
            return score, x0
        _, var, evals, a, resid = aux
        means, _, _, evecs = self._params(x)
        w_res = resid / var  # Σ_k^{-1}(x - a m_k) in eigenbasis, (B, K, d)
        if want_score:
            z = r.unsqueeze(-1) * w_res
            if evecs is not None:
                z = torch.einsum("kij,bkj->bki", evecs, z)
            score = -z.sum(1)
        if want_x0:
            z = r.unsqueeze(-1) * (a.unsqueeze(-1) * evals * w_res)
            if evecs is not None:
                z = torch.einsum("kij,bkj->bki", evecs, z)
            x0 = r @ means + z.sum(1)
        return score, x0

    # ------------------------------------------------------------------------------------
    # DiffusionModel interface
    def log_prob(self, x: Tensor, t=0.0) -> Tensor:
        r"""Normalized :math:`\log q_t(x)`, shape ``(B,)``."""
        log_joint, _ = self._posterior(x, t)
        return torch.logsumexp(log_joint, dim=-1)

    def responsibilities(self, x: Tensor, t=0.0) -> Tensor:
        r"""Posterior component probabilities :math:`p(k\mid x_t)`, shape ``(B, K)``."""
        log_joint, _ = self._posterior(x, t)
        return torch.softmax(log_joint, dim=-1)

    def score(self, x: Tensor, t) -> Tensor:
        r""":math:`\nabla_x\log q_t(x) = \sum_k p(k\mid x)\,\Sigma_k(t)^{-1}(\alpha_t m_k - x)`."""
        return self._score_and_denoise(x, t, True, False)[0]

    def denoise(self, x: Tensor, t) -> Tensor:
        r""":math:`E[x_0\mid x_t] = \sum_k p(k\mid x)\,[m_k + \alpha_t C_k\Sigma_k^{-1}(x-\alpha_t m_k)]`
        (exact; equals Tweedie's :math:`(x+\sigma_t^2 s)/\alpha_t`)."""
        return self._score_and_denoise(x, t, False, True)[1]

    def eps(self, x: Tensor, t) -> Tensor:
        r"""Noise prediction :math:`\hat\varepsilon = -\sigma_t\,s(x, t)`."""
        _, s = self._coeffs(x, t)
        return -s * self.score(x, t)

    # ------------------------------------------------------------------------------------
    # sampling
    def sample_data(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        r"""``n`` draws of :math:`x_0` from the mixture (component drawn in float64)."""
        dev = self.means.device
        k = torch.multinomial(self.weights.to(torch.float64), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype, device=dev)
        z = z * torch.sqrt(self.eigvals[k])
        if self.eigvecs is not None:
            z = torch.einsum("nij,nj->ni", self.eigvecs[k], z)
        return self.means[k] + z

    def sample(self, n: int, t=0.0, generator: torch.Generator | None = None) -> Tensor:
        r"""``n`` draws of :math:`x_t = \alpha_t x_0 + \sigma_t\varepsilon` from :math:`q_t`."""
        x0 = self.sample_data(n, generator)
        t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
        a = self.schedule.alpha(t)
        s = self.schedule.sigma(t)
        if t.ndim == 1:
            a, s = a.unsqueeze(-1), s.unsqueeze(-1)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        return a * x0 + s * eps

    def at_time(self, t: float) -> GaussianMixtureDiffusion:
        r"""The mixture :math:`q_t` itself as a data distribution (means :math:`\alpha_t m_k`,
        covariances :math:`\alpha_t^2 C_k + \sigma_t^2 I`), with the same schedule."""
        tt = torch.as_tensor(float(t), dtype=torch.float64)
        a = float(self.schedule.alpha(tt))
        s2 = float(self.schedule.sigma(tt)) ** 2
        if self.kind == "isotropic":
            covs = a * a * self.eigvals[:, 0] + s2
        elif self.kind == "diagonal":
            covs = a * a * self.eigvals + s2
        else:
            covs = a * a * self.covs + s2 * torch.eye(self.dim, dtype=self.means.dtype, device=self.means.device)
        return GaussianMixtureDiffusion(self.weights, a * self.means, covs, self.schedule)

    def __repr__(self) -> str:
        return (
            f"GaussianMixtureDiffusion(K={self.num_components}, d={self.dim}, "
            f"covs={self.kind}, schedule={self.schedule!r})"
        )
