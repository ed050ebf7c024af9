r"""Posterior sampling for inverse problems with a diffusion prior.

Given a diffusion model of the prior :math:`p(x)` (a ``DiffusionModel``: ``.schedule`` and
``.score(x, t)``, :math:`q_t(x_t\mid x_0) = \mathcal N(\alpha_tx_0, \sigma_t^2I)`, :math:`t = 0`
data, :math:`t = 1` noise) and a measurement :math:`y = \mathcal A(x) + \text{noise}`, we want
samples of :math:`p(x\mid y)\propto p(x)\,p(y\mid x)`. Four samplers, all returning
:class:`~mcsample.WeightedSamples` with the ESS after every step (``ess_history``), the number
of score evaluations (``info["nfe"]``) and of backward passes through the score
(``info["vjp"]``):

1. :func:`dps` — Diffusion Posterior Sampling (Chung et al. 2023, ICLR): the reverse chain
   nudged by :math:`-\zeta\nabla_{x_t}\|y - \mathcal A(\hat x_0(x_t))\|`. Approximate; equal
   weights. The common baseline.
2. :func:`tds` — Twisted Diffusion Sampler (Wu, Trippe, Naesseth, Blei & Cunningham 2023,
   "Practical and asymptotically exact conditional sampling in diffusion models"). SMC over the
   reverse chain :math:`p_\theta(x_{0:K})` with twisting functions
   :math:`\tilde p_k(y\mid x_k) = \mathcal N(y; A\hat x_0(x_k), (\sigma_y^2 + r_k^2)I)`, proposals
   whose mean uses the twisted score :math:`s + \nabla\log\tilde p_k`, incremental weights
   :math:`\frac{p_\theta(x_{k-1}\mid x_k)\,\tilde p_{k-1}(y\mid x_{k-1})}{\tilde q(x_{k-1}\mid x_k)\,
   \tilde p_k(y\mid x_k)}` and an exact last weight :math:`p(y\mid x_0)/\tilde p_1(y\mid x_1)`,
   so the weighted particles target :math:`p_\theta(x_0)\,p(y\mid x_0)` exactly as
   :math:`N\to\infty`, whatever the number of steps.
3. :func:`mcgdiff` — Monte Carlo guided diffusion (Cardoso, Janati, Le Corff & Moulines 2023,
   ICLR 2024) for linear-Gaussian measurements, in the SVD basis
   :math:`A = U\mathrm{diag}(S)V^\top`: with :math:`\bar y = U^\top y/S` and
   :math:`\bar\sigma_i = \sigma_y/S_i`, the noisy observation of coordinate :math:`i` of
   :math:`V^\top x_0` is a noiseless observation :math:`\alpha_{\tau_i}\bar y_i` of that
   coordinate of :math:`x_{\tau_i}`, where :math:`\sigma_{\tau_i}/\alpha_{\tau_i} = \bar\sigma_i`.
   SMC with Gaussian potentials that pin the coordinate by :math:`\tau_i`, proposals that are the
   exact product of the Gaussian backward kernel and the next potential (fully adapted), and
   the prior kernel afterwards. Exact as :math:`N\to\infty` when the reverse kernels are those
   of the forward process (exact score, fine grid); see :class:`MCGdiff`.
4. :func:`ensemble_sampler` — the approximation-free weighted ensemble of Chen, Ren, Min, Ying &
   Izzo (2025, "Solving inverse problems via diffusion-based priors: an approximation-free
   ensemble sampling approach"); see below.

The ensemble sampler's path, its Feynman-Kac weights and the choice of the likelihood drift
are derived in :mod:`mcsample.posterior.ensemble`.

**Measurement protocol (duck-typed).** ``forward(x)`` :math:`(B,*\text{event})\to(B,*\text{obs})`,
``adjoint(y)``, ``sigma_y`` (Gaussian noise level), ``log_likelihood(x, y) -> (B,)``; optional
``linear = True`` (then :math:`\nabla\mu_y` is ``adjoint(forward(x) - y)/σ²`` or
``potential_grad``), ``potential_laplacian(x)``, and ``svd() -> (U, S, V)`` with
:math:`A = U\mathrm{diag}(S)V^\top` on flattened vectors (required by :func:`mcgdiff`; used by the
ensemble sampler). :mod:`mcsample.systems.inverse_problems` provides such operators.

**Reverse kernel.** TDS, MCGdiff and DPS move between grid times :math:`t > s` with the DDIM
kernel of Song et al. (2021) with parameter :math:`\eta` (:math:`\eta = 1` is DDPM's ancestral
step): :math:`x_s\sim\mathcal N(\alpha_s\hat x_0 + \sqrt{\sigma_s^2 - c^2}\,\hat\varepsilon,\ c^2I)`,
:math:`c = \eta\,\sigma_s\sqrt{1 - \frac{\alpha_t^2\sigma_s^2}{\alpha_s^2\sigma_t^2}}`
(:math:`c^2` is the variance of :math:`q(x_s\mid x_t, x_0)`),
with :math:`\hat x_0 = (x_t + \sigma_t^2 s)/\alpha_t` and :math:`\hat\varepsilon = -\sigma_t s`.
Their last step goes to :math:`t = 0` deterministically, :math:`x_0 = \hat x_0(x_{t_{\min}})`.

Each sampler is a Feynman-Kac model (:mod:`mcsample.feynman_kac`): the core's state, a pure
``step`` on a small configuration object, the core's reweight/resample sequence and its driver
(progress bar, checkpoints with a run fingerprint, resume). One sampler per module:
:mod:`~mcsample.posterior.dps`, :mod:`~mcsample.posterior.tds`,
:mod:`~mcsample.posterior.mcgdiff`, :mod:`~mcsample.posterior.ensemble`; the shared grid,
kernel and driver are in :mod:`~mcsample.posterior.base`.
"""

from __future__ import annotations

from mcsample.posterior.base import PosteriorSampler, PosteriorState, laplacian
from mcsample.posterior.dps import DPS, dps
from mcsample.posterior.ensemble import EnsembleSampler, ensemble_sampler
from mcsample.posterior.mcgdiff import MCGdiff, mcgdiff
from mcsample.posterior.tds import TDS, tds

__all__ = [
    "PosteriorSampler",
    "PosteriorState",
    "DPS",
    "TDS",
    "MCGdiff",
    "EnsembleSampler",
    "dps",
    "tds",
    "mcgdiff",
    "ensemble_sampler",
    "laplacian",
]
