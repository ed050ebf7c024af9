r"""Inverse problems: measurement models, a Pyro-model target and the Gaussian-mixture benchmark.

An inverse problem observes :math:`y = \mathcal A(x) + \sigma_y\,\xi`, :math:`\xi\sim\mathcal N(0,I)`,
and asks for the posterior :math:`p(x\mid y)\propto p(x)\,p(y\mid x)`. This module holds the
*measurement* side; the prior (a diffusion model) and the samplers live elsewhere
(:mod:`mcsample.posterior`).

**Linear operators.** Every operator here is linear, :math:`\mathcal A(x) = Ax`, acts on a
batch ``(B, *event_shape) -> (B, *obs_shape)`` without forming :math:`A`, and offers

* ``forward(x)`` :math:`= Ax` and ``adjoint(y)`` :math:`= A^\top y`
  (:math:`\langle Ax, y\rangle = \langle x, A^\top y\rangle`, tested);
* ``svd()`` :math:`\to (U, S, V)` with :math:`A = U\,\mathrm{diag}(S)\,V^\top` on flattened
  vectors (thin: only the :math:`r` non-zero singular values, :math:`U^\top U = V^\top V = I_r`).
  Closed form for masks and average pooling; dense (computed once, :math:`O(n^3)`) for a random
  matrix and for a blur on a small image;
* the Gaussian likelihood :math:`\log p(y\mid x) = -\frac{\|y-Ax\|^2}{2\sigma_y^2}
  - \frac m2\log(2\pi\sigma_y^2)`, its potential :math:`\mu_y(x) = -\log p(y\mid x)`, the
  gradient :math:`\nabla\mu_y = A^\top(Ax-y)/\sigma_y^2` and the (constant) Laplacian
  :math:`\Delta\mu_y = \|A\|_F^2/\sigma_y^2`, which the posterior samplers use.

Operators: :class:`DenseOperator` (a matrix), :class:`Mask` (inpainting: keep some pixels),
:class:`Blur` (2-D convolution with zero padding; its adjoint is the transposed convolution),
:class:`Downsample` (super-resolution: :math:`f\times f` average pooling; its adjoint spreads
each low-resolution value over its block, divided by :math:`f^2`).

**Pyro models.** :class:`PyroTarget` turns a Pyro model with observed sites into a
:class:`~mcsample.protocols.Target` over one flat vector of its latent sites (optionally
unconstrained), through ``pyro.poutine.condition`` and ``trace``.

**Benchmark.** :func:`gmm_benchmark_problem` draws one problem of the Gaussian-mixture benchmark
of Cardoso, Janati, Le Corff & Moulines (2023, "Monte Carlo guided diffusion for Bayesian
linear inverse problems"), whose posterior is a Gaussian mixture known in closed form
(:class:`GaussianMixturePosterior`): exact samples to compare samplers against.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "LinearGaussianMeasurement",
    "DenseOperator",
    "Mask",
    "Blur",
    "Downsample",
    "gaussian_blur_kernel",
    "PyroTarget",
    "GaussianMixturePosterior",
    "GMMInverseProblem",
    "gmm_benchmark_means",
    "gmm_benchmark_problem",
    "linear_gaussian_posterior",
    "mixture_posterior",
]


# ---------------------------------------------------------------------------------------------
# linear measurement operators


class LinearGaussianMeasurement(ABC):
    r"""Base class: a linear operator :math:`A` with Gaussian noise :math:`\sigma_y`.

    Subclasses implement ``forward`` and ``adjoint`` on batches and may override ``svd``.
    ``event_shape`` is the shape of one signal :math:`x`, ``obs_shape`` that of one
    measurement :math:`y`. ``linear = True`` tells the samplers that :math:`\nabla\mu_y` and
    :math:`\Delta\mu_y` have the closed forms below.
    """

    linear = True

    def __init__(self, event_shape, obs_shape, sigma_y: float):
        if not sigma_y > 0:
            raise ValueError(f"sigma_y must be positive (Gaussian noise), got {sigma_y}")
        self.event_shape = torch.Size(event_shape)
        self.obs_shape = torch.Size(obs_shape)
        self.sigma_y = float(sigma_y)
        self._svd = None

    @property
    def dim(self) -> int:
        """Dimension :math:`n` of a flattened signal."""
        return int(math.prod(self.event_shape))

    @property
    def obs_dim(self) -> int:
        """Dimension :math:`m` of a flattened measurement."""
        return int(math.prod(self.obs_shape))

    def _check_x(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != tuple(self.event_shape):
            raise ValueError(
                f"{type(self).__name__} expects signals of shape (B, {', '.join(map(str, self.event_shape))}), "
                f"got {tuple(x.shape)}"
            )
        return x

    def _check_y(self, y: Tensor) -> Tensor:
        if tuple(y.shape[-len(self.obs_shape) :]) != tuple(self.obs_shape):
            raise ValueError(
                f"{type(self).__name__} expects measurements of shape (..., {', '.join(map(str, self.obs_shape))}), "
                f"got {tuple(y.shape)}"
            )
        return y

    @abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """:math:`A x` for a batch ``(B, *event_shape)`` -> ``(B, *obs_shape)``."""

    @abstractmethod
    def adjoint(self, y: Tensor) -> Tensor:
        """:math:`A^\top y` for a batch ``(B, *obs_shape)`` -> ``(B, *event_shape)``."""

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    # -- noise model ---------------------------------------------------------------------------
    def simulate(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        r"""A measurement :math:`y = Ax + \sigma_y\xi` of each signal in the batch."""
        clean = self.forward(x)
        return clean + self.sigma_y * torch.randn(
            clean.shape, generator=generator, dtype=clean.dtype, device=clean.device
        )

    def log_likelihood(self, x: Tensor, y: Tensor) -> Tensor:
        r""":math:`\log p(y\mid x) = -\|y-Ax\|^2/(2\sigma_y^2) - \frac m2\log(2\pi\sigma_y^2)`, shape ``(B,)``."""
        r = (self._check_y(y) - self.forward(x)).reshape(x.shape[0], -1)
        return -0.5 * (r * r).sum(-1) / self.sigma_y**2 - 0.5 * self.obs_dim * math.log(2 * math.pi * self.sigma_y**2)

    def potential_grad(self, x: Tensor, y: Tensor) -> Tensor:
        r""":math:`\nabla_x\mu_y = A^\top(Ax - y)/\sigma_y^2` with :math:`\mu_y = -\log p(y\mid x)`."""
        return self.adjoint(self.forward(x) - self._check_y(y)) / self.sigma_y**2

    def potential_laplacian(self, x: Tensor) -> Tensor:
        r""":math:`\Delta\mu_y = \operatorname{tr}(A^\top A)/\sigma_y^2 = \sum_i S_i^2/\sigma_y^2`
        (the same for every particle), shape ``(B,)``."""
        _, S, _ = self.svd()
        val = (S.to(torch.float64) ** 2).sum() / self.sigma_y**2
        return torch.full((x.shape[0],), float(val), dtype=x.dtype, device=x.device)

    # -- dense forms -----------------------------------------------------------------------------
    def matrix(self, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
        """The dense ``(m, n)`` matrix of the operator on flattened vectors (by applying it to I)."""
        eye = torch.eye(self.dim, dtype=dtype, device=device).reshape(self.dim, *self.event_shape)
        return self.forward(eye).reshape(self.dim, self.obs_dim).T.contiguous()

    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        r"""Thin SVD :math:`A = U\mathrm{diag}(S)V^\top` (float64; ``U`` ``(m, r)``, ``S`` ``(r,)``
        descending, ``V`` ``(n, r)``), keeping singular values above :math:`10^{-10}S_{\max}`.
        Dense by default (:math:`O(mn\min(m,n))`, computed once)."""
        if self._svd is None:
            U, S, Vh = torch.linalg.svd(self.matrix(), full_matrices=False)
            keep = S > 1e-10 * S.max()
            self._svd = (U[:, keep].contiguous(), S[keep].contiguous(), Vh[keep].T.contiguous())
        return self._svd

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(event_shape={tuple(self.event_shape)}, "
            f"obs_shape={tuple(self.obs_shape)}, sigma_y={self.sigma_y:.4g})"
        )


class DenseOperator(LinearGaussianMeasurement):
    r"""A dense matrix :math:`A` of shape ``(m, n)`` acting on vectors ``(B, n) -> (B, m)``."""

    def __init__(self, A: Tensor, sigma_y: float):
        A = torch.as_tensor(A)
        if A.ndim != 2:
            raise ValueError(f"A must be a matrix of shape (m, n), got {tuple(A.shape)}")
        super().__init__((A.shape[1],), (A.shape[0],), sigma_y)
        self.A = A

    def _A(self, x: Tensor) -> Tensor:
        return self.A.to(dtype=x.dtype, device=x.device)

    def forward(self, x: Tensor) -> Tensor:
        r""":math:`Ax` for each row of ``x``."""
        return self._check_x(x) @ self._A(x).T

    def adjoint(self, y: Tensor) -> Tensor:
        r""":math:`A^\top y` for each row of ``y``."""
        return self._check_y(y) @ self._A(y)

    def matrix(self, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
        """The matrix itself."""
        return self.A.to(dtype=dtype, device=device)


class Mask(LinearGaussianMeasurement):
    r"""Inpainting: observe the entries where ``mask`` is true, :math:`y = x[\text{mask}] + \sigma_y\xi`.

    ``forward`` returns the kept entries as a flat vector ``(B, m)``; ``adjoint`` puts them back
    in place with zeros elsewhere. The SVD is :math:`U = I_m`, :math:`S = 1`,
    :math:`V = [e_{i_1},\dots,e_{i_m}]`.
    """

    def __init__(self, mask: Tensor, sigma_y: float):
        mask = torch.as_tensor(mask, dtype=torch.bool)
        super().__init__(mask.shape, (int(mask.sum()),), sigma_y)
        if self.obs_dim == 0:
            raise ValueError("the mask keeps no entry: nothing is observed")
        self.mask = mask
        self.index = torch.nonzero(mask.flatten()).flatten()

    def forward(self, x: Tensor) -> Tensor:
        """The observed entries, ``(B, m)``."""
        self._check_x(x)
        return x.reshape(x.shape[0], -1)[:, self.index.to(x.device)]

    def adjoint(self, y: Tensor) -> Tensor:
        """Scatter ``y`` back into the observed positions, zeros elsewhere."""
        self._check_y(y)
        out = torch.zeros(y.shape[0], self.dim, dtype=y.dtype, device=y.device)
        out[:, self.index.to(y.device)] = y
        return out.reshape(y.shape[0], *self.event_shape)

    def svd(self):
        """Closed form: the identity on the observed coordinates."""
        if self._svd is None:
            m = self.obs_dim
            V = torch.zeros(self.dim, m, dtype=torch.float64)
            V[self.index, torch.arange(m)] = 1.0
            self._svd = (torch.eye(m, dtype=torch.float64), torch.ones(m, dtype=torch.float64), V)
        return self._svd


def gaussian_blur_kernel(size: int = 5, width: float = 1.0) -> Tensor:
    r"""A normalized 2-D Gaussian kernel :math:`k_{ij}\propto e^{-(i^2+j^2)/(2w^2)}`, ``(size, size)``."""
    if size % 2 != 1:
        raise ValueError(f"blur kernel size must be odd, got {size}")
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * width**2))
    return k / k.sum()


class Blur(LinearGaussianMeasurement):
    r"""Deblurring: :math:`y = k * x + \sigma_y\xi`, a 2-D convolution with zero padding.

    Signals are images ``(B, C, H, W)`` (or ``(B, H, W)``), blurred channel by channel with an
    odd-sized kernel ``k`` (``(kh, kw)``), output the same size. The adjoint of a zero-padded
    cross-correlation is the transposed convolution with the same kernel and padding. The SVD
    is dense (fine for the small images this project uses).
    """

    def __init__(self, kernel: Tensor, image_shape, sigma_y: float):
        kernel = torch.as_tensor(kernel, dtype=torch.float64)
        if kernel.ndim != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
            raise ValueError(f"blur kernel must be 2-D with odd sizes, got {tuple(kernel.shape)}")
        image_shape = torch.Size(image_shape)
        if len(image_shape) not in (2, 3):
            raise ValueError(f"image_shape must be (H, W) or (C, H, W), got {tuple(image_shape)}")
        super().__init__(image_shape, image_shape, sigma_y)
        self.kernel = kernel
        self.padding = (kernel.shape[0] // 2, kernel.shape[1] // 2)

    def _prep(self, x: Tensor) -> tuple[Tensor, Tensor]:
        k = self.kernel.to(dtype=x.dtype, device=x.device)[None, None]
        return x.reshape(-1, 1, *x.shape[-2:]), k  # channels folded into the batch

    def forward(self, x: Tensor) -> Tensor:
        """Blurred images, same shape as ``x``."""
        self._check_x(x)
        xx, k = self._prep(x)
        return torch.nn.functional.conv2d(xx, k, padding=self.padding).reshape(x.shape)

    def adjoint(self, y: Tensor) -> Tensor:
        """Transposed convolution with the same kernel (correlation with the flipped kernel)."""
        self._check_y(y)
        yy, k = self._prep(y)
        return torch.nn.functional.conv_transpose2d(yy, k, padding=self.padding).reshape(y.shape)


class Downsample(LinearGaussianMeasurement):
    r"""Super-resolution: :math:`f\times f` average pooling, :math:`y_{IJ} = f^{-2}\sum_{(i,j)\in
    \text{block }IJ} x_{ij} + \sigma_y\xi`.

    The adjoint copies each value over its block and divides by :math:`f^2`. The rows of
    :math:`A` are orthogonal with norm :math:`1/f`, so :math:`U = I`, :math:`S = 1/f`,
    :math:`V = f A^\top`.
    """

    def __init__(self, factor: int, image_shape, sigma_y: float):
        image_shape = torch.Size(image_shape)
        if len(image_shape) not in (2, 3):
            raise ValueError(f"image_shape must be (H, W) or (C, H, W), got {tuple(image_shape)}")
        H, W = image_shape[-2:]
        if factor < 1 or H % factor or W % factor:
            raise ValueError(f"image size {H}x{W} is not divisible by the factor {factor}")
        obs = (*image_shape[:-2], H // factor, W // factor)
        super().__init__(image_shape, obs, sigma_y)
        self.factor = int(factor)

    def forward(self, x: Tensor) -> Tensor:
        """Block averages, ``(B, [C,] H/f, W/f)``."""
        self._check_x(x)
        xx = x.reshape(-1, 1, *x.shape[-2:])
        out = torch.nn.functional.avg_pool2d(xx, self.factor)
        return out.reshape(x.shape[0], *self.obs_shape)

    def adjoint(self, y: Tensor) -> Tensor:
        """Each low-resolution value spread over its block, divided by :math:`f^2`."""
        self._check_y(y)
        f = self.factor
        yy = y.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1) / (f * f)
        return yy.reshape(y.shape[0], *self.event_shape)

    def svd(self):
        """Closed form: :math:`U = I`, :math:`S = 1/f`, :math:`V = fA^\\top`."""
        if self._svd is None:
            m = self.obs_dim
            eye = torch.eye(m, dtype=torch.float64).reshape(m, *self.obs_shape)
            V = (self.adjoint(eye).reshape(m, self.dim) * self.factor).T.contiguous()
            self._svd = (torch.eye(m, dtype=torch.float64), torch.full((m,), 1.0 / self.factor, dtype=torch.float64), V)
        return self._svd


# ---------------------------------------------------------------------------------------------
# Pyro models as targets


class PyroTarget:
    r"""The posterior of a Pyro model given observations, as a :class:`~mcsample.protocols.Target`.

    ``PyroTarget(model, *args, observations={"y": data}, **kwargs)`` conditions ``model(*args,
    **kwargs)`` on the observed sites (``pyro.poutine.condition``), traces it once to find the
    latent sample sites (names, shapes, supports), and exposes
    :math:`\log\tilde\pi(z) = \log p(\text{latents}(z), \text{observations})`, the log joint,
    over a flat vector ``z`` of shape ``(B, D)`` — the latent sites flattened and concatenated in
    trace order.

    With ``unconstrained=True`` (default) each latent with a constrained support is mapped
    through ``biject_to(support)`` and the log-Jacobian is added, so that ``z`` ranges over
    :math:`\mathbb R^D` (what gradient-based samplers need); ``constrain(z)`` returns the site
    values. With ``vectorized=True`` (default) the batch is evaluated in one trace inside an
    outer ``pyro.plate`` of size ``B`` placed left of the model's own plates — the model must
    then declare its batch dimensions with ``pyro.plate`` and broadcast correctly (index event
    dimensions from the right, e.g. ``w[..., 0]``), as Pyro's vectorized ELBOs require;
    ``vectorized=False`` loops over the batch in Python instead (any model, slower).
    """

    def __init__(self, model, *args, observations: dict, unconstrained: bool = True, vectorized: bool = True, **kwargs):
        from mcsample._optional import require

        require("pyro", extra="pyro", by="PyroTarget")
        import pyro
        import pyro.poutine as poutine
        from pyro.distributions.transforms import biject_to
        from pyro.poutine.util import site_is_subsample

        self._pyro = pyro
        self._poutine = poutine
        self.model = model
        self.args = args
        self.kwargs = kwargs
        self.observations = dict(observations)
        self.unconstrained = unconstrained
        self.vectorized = vectorized
        conditioned = poutine.condition(model, data=self.observations)
        with torch.no_grad():
            tr = poutine.trace(conditioned).get_trace(*args, **kwargs)
        missing = set(self.observations) - {
            n for n, s in tr.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)
        }
        if missing:
            raise ValueError(f"observations name sites the model does not sample: {sorted(missing)}")
        self.sites = []  # (name, constrained shape, unconstrained shape, transform)
        nesting = 0
        self.event_dims = {}
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            self.event_dims[name] = site["fn"].event_dim
            nesting = max(nesting, max([-f.dim for f in site["cond_indep_stack"] if f.vectorized], default=0))
            if site["is_observed"]:
                continue
            shape = site["value"].shape
            transform = biject_to(site["fn"].support) if unconstrained else None
            ushape = transform.inverse_shape(shape) if transform is not None else shape
            self.sites.append((name, shape, ushape, transform))
        if not self.sites:
            raise ValueError("the conditioned model has no latent sample sites")
        self.max_plate_nesting = nesting
        self.sizes = [int(math.prod(s[2])) for s in self.sites]
        self.event_shape = torch.Size([sum(self.sizes)])
        self._conditioned = conditioned

    @property
    def site_names(self) -> list[str]:
        """Names of the latent sites, in the order they appear in the flat vector."""
        return [s[0] for s in self.sites]

    def _split(self, z: Tensor) -> tuple[dict, Tensor]:
        """Site values (constrained, with a leading batch dim) and the summed log-Jacobian."""
        if z.ndim != 2 or z.shape[1] != self.event_shape[0]:
            raise ValueError(
                f"PyroTarget expects z of shape (B, {self.event_shape[0]}) for sites "
                f"{self.site_names}, got {tuple(z.shape)}"
            )
        values, log_jac = {}, torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        for (name, _shape, ushape, transform), piece in zip(self.sites, torch.split(z, self.sizes, dim=1)):
            u = piece.reshape(z.shape[0], *ushape)
            if transform is None:
                values[name] = u
                continue
            v = transform(u)
            ladj = transform.log_abs_det_jacobian(u, v)
            values[name] = v
            log_jac = log_jac + ladj.reshape(z.shape[0], -1).sum(-1)
        return values, log_jac

    def constrain(self, z: Tensor) -> dict:
        """Latent site values for each row of ``z``: ``{name: (B, *site_shape)}``."""
        return self._split(z)[0]

    def unconstrain(self, values: dict) -> Tensor:
        """Inverse of :meth:`constrain`: flat unconstrained vectors from site values ``(B, *shape)``."""
        parts = []
        for name, _shape, _ushape, transform in self.sites:
            v = values[name]
            u = v if transform is None else transform.inv(v)
            parts.append(u.reshape(u.shape[0], -1))
        return torch.cat(parts, dim=1)

    def _log_joint_vectorized(self, values: dict, B: int) -> Tensor:
        n = self.max_plate_nesting
        fixed = {}
        for name, shape, _, _ in self.sites:
            site_batch = len(shape) - self.event_dims[name]
            fixed[name] = values[name].reshape(B, *([1] * (n - site_batch)), *shape)
        poutine = self._poutine

        def wrapped():
            with self._pyro.plate("_mcsample_particles", B, dim=-(n + 1)):
                return self._conditioned(*self.args, **self.kwargs)

        tr = poutine.trace(poutine.condition(wrapped, data=fixed)).get_trace()
        tr.compute_log_prob()
        ref = next(iter(values.values()))
        total = torch.zeros(B, dtype=ref.dtype, device=ref.device)
        for site in tr.nodes.values():
            if site["type"] != "sample" or "log_prob" not in site:
                continue
            lp = site["log_prob"]
            if lp.ndim == n + 1 and lp.shape[0] == B:
                total = total + lp.reshape(B, -1).sum(-1)
            else:  # does not depend on the particles (e.g. a fixed likelihood term)
                total = total + lp.sum()
        return total

    def _log_joint_loop(self, values: dict, B: int) -> Tensor:
        out = []
        for b in range(B):
            data = {name: values[name][b] for name in self.site_names}
            tr = self._poutine.trace(self._poutine.condition(self._conditioned, data=data)).get_trace(
                *self.args, **self.kwargs
            )
            out.append(tr.log_prob_sum())
        return torch.stack(out)

    def log_prob(self, z: Tensor) -> Tensor:
        r""":math:`\log p(\text{latents}, \text{observations})` (+ log-Jacobian when unconstrained),
        shape ``(B,)``."""
        values, log_jac = self._split(z)
        B = z.shape[0]
        lj = self._log_joint_vectorized(values, B) if self.vectorized else self._log_joint_loop(values, B)
        return lj + log_jac

    def __repr__(self) -> str:
        return f"PyroTarget(sites={self.site_names}, dim={self.event_shape[0]}, unconstrained={self.unconstrained})"


# ---------------------------------------------------------------------------------------------
# Gaussian-mixture benchmark with an exact posterior


def linear_gaussian_posterior(A: Tensor, sigma_y: float, y: Tensor, mean: Tensor, cov: Tensor):
    r"""Posterior of :math:`x\sim\mathcal N(m, C)`, :math:`y = Ax + \sigma_y\xi`: returns the mean
    :math:`m + CA^\top(ACA^\top+\sigma_y^2I)^{-1}(y - Am)`, the covariance
    :math:`C - CA^\top(ACA^\top + \sigma_y^2 I)^{-1}AC` and :math:`\log p(y) = \log\mathcal N(y;
    Am, ACA^\top + \sigma_y^2I)` (all float64)."""
    A, y, mean, cov = (t.to(torch.float64) for t in (A, y, mean, cov))
    S = A @ cov @ A.T + sigma_y**2 * torch.eye(A.shape[0], dtype=torch.float64)
    K = torch.linalg.solve(S, A @ cov).T  # C Aᵀ S⁻¹
    r = y - A @ mean
    post_mean = mean + K @ r
    post_cov = cov - K @ A @ cov
    post_cov = 0.5 * (post_cov + post_cov.T)
    log_py = torch.distributions.MultivariateNormal(A @ mean, S).log_prob(y)
    return post_mean, post_cov, log_py


@dataclass
class GaussianMixturePosterior:
    r"""A Gaussian mixture :math:`\sum_k \pi_k\mathcal N(\mu_k, \Sigma)` with one shared covariance
    (float64): the exact posterior of the benchmark. ``sample`` draws components in float64."""

    weights: Tensor  # (K,)
    means: Tensor  # (K, d)
    cov: Tensor  # (d, d)

    def __post_init__(self):
        self._chol = torch.linalg.cholesky(self.cov)

    @property
    def mean(self) -> Tensor:
        r""":math:`\sum_k\pi_k\mu_k`."""
        return self.weights @ self.means

    @property
    def covariance(self) -> Tensor:
        r""":math:`\Sigma + \sum_k\pi_k\mu_k\mu_k^\top - \bar\mu\bar\mu^\top`."""
        m = self.mean
        return self.cov + torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means) - torch.outer(m, m)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact draws, ``(n, d)`` float64."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[k] + z @ self._chol.T

    def log_prob(self, x: Tensor) -> Tensor:
        """Normalized log-density, ``(B,)``."""
        comp = torch.distributions.MultivariateNormal(self.means, scale_tril=self._chol)
        lp = comp.log_prob(x.to(torch.float64)[:, None, :])
        return torch.logsumexp(lp + torch.log(self.weights), dim=-1)


def mixture_posterior(
    weights: Tensor, means: Tensor, cov: Tensor, A: Tensor, sigma_y: float, y: Tensor
) -> tuple[GaussianMixturePosterior, Tensor]:
    r"""Exact posterior of a Gaussian mixture prior :math:`\sum_k w_k\mathcal N(m_k, C)` (one shared
    covariance) under :math:`y = Ax + \sigma_y\xi`: the mixture with
    :math:`\Sigma = C - CA^\top(ACA^\top+\sigma_y^2I)^{-1}AC` (Woodbury form of
    :math:`(C^{-1} + A^\top A/\sigma_y^2)^{-1}`), :math:`\mu_k = m_k + CA^\top(ACA^\top +
    \sigma_y^2I)^{-1}(y - Am_k)` and weights :math:`\propto w_k\mathcal N(y; Am_k, ACA^\top +
    \sigma_y^2 I)`; also returns :math:`\log p(y)`. Float64."""
    f64 = torch.float64
    weights, means, cov, A, y = (torch.as_tensor(t).to(f64) for t in (weights, means, cov, A, y))
    weights = weights / weights.sum()
    Sy = A @ cov @ A.T + sigma_y**2 * torch.eye(A.shape[0], dtype=f64)
    K = torch.linalg.solve(Sy, A @ cov).T  # C Aᵀ Sy⁻¹, (d, m)
    post_cov = cov - K @ A @ cov
    post_cov = 0.5 * (post_cov + post_cov.T)
    post_means = means + (y[None, :] - means @ A.T) @ K.T
    log_ev = torch.distributions.MultivariateNormal(means @ A.T, Sy).log_prob(y) + torch.log(weights)
    return GaussianMixturePosterior(torch.softmax(log_ev, 0), post_means, post_cov), torch.logsumexp(log_ev, 0)


def gmm_benchmark_means(dim: int) -> Tensor:
    r"""The 25 means of Cardoso et al. (2023): :math:`(-8i, -8j)` tiled to dimension ``dim``
    (even), :math:`i, j\in\{-2,\dots,2\}`, float64 ``(25, dim)``."""
    if dim % 2:
        raise ValueError(f"the benchmark tiles 2-D means; dim must be even, got {dim}")
    grid = torch.tensor([[-8.0 * i, -8.0 * j] for i in range(-2, 3) for j in range(-2, 3)], dtype=torch.float64)
    return grid.repeat(1, dim // 2)


@dataclass
class GMMInverseProblem:
    r"""One benchmark problem: prior :math:`\sum_k w_k\mathcal N(m_k, I)`, operator, :math:`y`,
    the hidden :math:`x^*` and the exact posterior."""

    weights: Tensor
    means: Tensor
    operator: DenseOperator
    y: Tensor
    x_true: Tensor
    posterior: GaussianMixturePosterior
    log_evidence: Tensor  # log p(y)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def obs_dim(self) -> int:
        return self.operator.obs_dim


def gmm_benchmark_problem(dim: int, obs_dim: int, generator: torch.Generator | None = None) -> GMMInverseProblem:
    r"""Draw one problem of the Gaussian-mixture benchmark of Cardoso et al. (2023, sec. 4).

    * Prior: 25 unit-covariance components, means from :func:`gmm_benchmark_means`, weights
      :math:`\propto\varepsilon_k^2`, :math:`\varepsilon_k\sim\mathcal N(0,1)`.
    * Operator: :math:`A\sim\mathcal N(0,1)^{d_y\times d}`, then its singular values are replaced
      by sorted (descending) :math:`\mathcal U(0,1)` draws, :math:`A = U\mathrm{diag}(s)V^\top`.
    * Noise: :math:`\sigma_y = u\cdot s_{\max}`, :math:`u\sim\mathcal U(0,1)`.
    * :math:`y = Ax^* + \sigma_y\xi` with :math:`x^*` drawn from the prior.
    * Exact posterior: with :math:`\Sigma = (I + A^\top A/\sigma_y^2)^{-1}`,
      :math:`\mu_k = \Sigma(A^\top y/\sigma_y^2 + m_k)`, weights
      :math:`\propto w_k\,\mathcal N(y; Am_k, \sigma_y^2I + AA^\top)`.

    Everything is float64 and drawn from ``generator``.
    """
    g = generator
    f64 = torch.float64
    means = gmm_benchmark_means(dim)
    weights = torch.randn(25, generator=g, dtype=f64) ** 2
    weights = weights / weights.sum()
    A0 = torch.randn(obs_dim, dim, generator=g, dtype=f64)
    U, _, Vh = torch.linalg.svd(A0, full_matrices=False)
    s = torch.sort(torch.rand(obs_dim, generator=g, dtype=f64), descending=True).values
    A = U @ torch.diag(s) @ Vh
    sigma_y = float(torch.rand((), generator=g, dtype=f64) * s.max())
    k = torch.multinomial(weights, 1, generator=g)
    x_true = means[k[0]] + torch.randn(dim, generator=g, dtype=f64)
    y = A @ x_true + sigma_y * torch.randn(obs_dim, generator=g, dtype=f64)
    op = DenseOperator(A, sigma_y)
    post, log_evidence = mixture_posterior(weights, means, torch.eye(dim, dtype=f64), A, sigma_y, y)
    return GMMInverseProblem(weights, means, op, y, x_true, post, log_evidence)
