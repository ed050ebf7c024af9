r"""Coupling spline flows on a product of lines and circles, :math:`\mathbb{R}^a\times\mathbb{T}^b`.

Internal coordinates of a molecule mix real numbers (bond lengths, bond angles) with angles
on the circle (torsions). A coupling flow (Dinh et al., "Density estimation using Real NVP",
2017) transforms one subset :math:`T` of the coordinates with an invertible elementwise map
whose parameters are a function of the others :math:`C`,

.. math:: y_T = h(x_T;\ \phi(x_C)),\qquad y_C = x_C,\qquad
          \log\left|\det\frac{\partial y}{\partial x}\right| = \sum_{j\in T}\log h'(x_j),

so both directions and the log-determinant are exact and cost one network evaluation. The
elementwise maps are rational-quadratic splines (Durkan et al., "Neural spline flows", 2019),
taken from zuko: :class:`zuko.transforms.MonotonicRQSTransform` on :math:`[-B, B]` (identity
outside) for real coordinates, and for angles the circular spline of Rezende et al.,
"Normalizing flows on tori and spheres" (ICML 2020): a shift by :math:`\pi` composed with a
spline on :math:`[-\pi, \pi]` whose end slopes match, a diffeomorphism of the circle. The
conditioner :math:`\phi` sees angles through :math:`(\cos x, \sin x)`, so the flow is
continuous across :math:`\pm\pi`. This is the architecture of the Boltzmann generators of FAB
(Midgley et al., ICLR 2023) on alanine dipeptide, without its 12 × 2 layers.

The base distribution is a standard normal on the real coordinates and the uniform
distribution on each circle. Real coordinates are first standardized by a fixed affine map
(``loc``, ``scale``, usually estimated from data) so that :math:`B = 5` covers them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from mcsample._optional import require

require("zuko", extra="flows")

from zuko.transforms import CircularShiftTransform, MonotonicRQSTransform  # noqa: E402

__all__ = ["CouplingConfig", "CouplingSplineFlow"]

_LOG_2PI = math.log(2 * math.pi)


@dataclass
class CouplingConfig:
    """Architecture of a :class:`CouplingSplineFlow` (stored in checkpoints).

    ``circular``: one bool per coordinate (True for angles). ``layers``: coupling layers;
    layer ``2k`` and ``2k+1`` transform the two halves of the ``k``-th random permutation of
    the coordinates (drawn from ``seed``). ``hidden``, ``depth``: width and number of hidden
    layers of each conditioner MLP. ``bins``: spline bins. ``bound``: real splines act on
    ``[-bound, bound]`` (standardized units). ``slope``: minimum spline slope.
    """

    circular: list = field(default_factory=list)
    layers: int = 8
    hidden: int = 256
    depth: int = 2
    bins: int = 8
    bound: float = 5.0
    slope: float = 1e-3
    seed: int = 0

    @property
    def features(self) -> int:
        return len(self.circular)


class _Coupling(nn.Module):
    """One coupling layer: transform ``index_t`` given ``index_c``."""

    def __init__(self, circular: Tensor, index_t: Tensor, index_c: Tensor, cfg: CouplingConfig):
        super().__init__()
        self.register_buffer("index_t", index_t)
        self.register_buffer("index_c", index_c)
        self.register_buffer("circ_c", circular[index_c])
        self.register_buffer("circ_t", circular[index_t])
        self.bins = cfg.bins
        self.bound = float(cfg.bound)
        self.slope = float(cfg.slope)
        width_in = int(index_c.numel() + self.circ_c.sum())  # angles enter as (cos, sin)
        layers: list[nn.Module] = []
        w = width_in
        for _ in range(cfg.depth):
            layers += [nn.Linear(w, cfg.hidden), nn.SiLU()]
            w = cfg.hidden
        last = nn.Linear(w, index_t.numel() * (3 * cfg.bins - 1))
        nn.init.zeros_(last.weight)  # identity at initialization (uniform bins, unit slopes)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def _features(self, xc: Tensor) -> Tensor:
        circ = self.circ_c
        return torch.cat([torch.where(circ, torch.cos(xc), xc), torch.sin(xc[:, circ])], dim=-1)

    def _splines(self, xc: Tensor) -> tuple[MonotonicRQSTransform, MonotonicRQSTransform]:
        p = self.net(self._features(xc)).unflatten(-1, (self.index_t.numel(), 3 * self.bins - 1))
        K = self.bins
        w, h, d = p[..., :K], p[..., K : 2 * K], p[..., 2 * K :]
        ct = self.circ_t
        real = MonotonicRQSTransform(w[:, ~ct], h[:, ~ct], d[:, ~ct], bound=self.bound, slope=self.slope)
        circ = MonotonicRQSTransform(w[:, ct], h[:, ct], d[:, ct], bound=math.pi, slope=self.slope)
        return real, circ

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data side to latent side: ``(y, log|det ∂y/∂x|)``."""
        real, circ = self._splines(x[:, self.index_c])
        xt = x[:, self.index_t]
        ct = self.circ_t
        yr, lr = real.call_and_ladj(xt[:, ~ct])
        yc, lc = circ.call_and_ladj(_SHIFT(xt[:, ct]))
        yt = torch.empty_like(xt)
        yt[:, ~ct] = yr
        yt[:, ct] = yc
        y = x.index_copy(1, self.index_t, yt)
        return y, lr.sum(-1) + lc.sum(-1)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Latent side to data side: ``(x, log|det ∂y/∂x|)`` (the forward log-determinant at x)."""
        real, circ = self._splines(y[:, self.index_c])
        yt = y[:, self.index_t]
        ct = self.circ_t
        xr = real.inv(yt[:, ~ct])
        sc = circ.inv(yt[:, ct])
        _, lr = real.call_and_ladj(xr)
        _, lc = circ.call_and_ladj(sc)
        xt = torch.empty_like(yt)
        xt[:, ~ct] = xr
        xt[:, ct] = _SHIFT.inv(sc)
        x = y.index_copy(1, self.index_t, xt)
        return x, lr.sum(-1) + lc.sum(-1)


_SHIFT = CircularShiftTransform(bound=math.pi)


def wrap_angle(x: Tensor) -> Tensor:
    """Angles to :math:`[-\\pi, \\pi)`."""
    return torch.remainder(x + math.pi, 2 * math.pi) - math.pi


class CouplingSplineFlow(nn.Module):
    r"""A normalizing flow on :math:`\mathbb{R}^a\times\mathbb{T}^b` from coupling spline layers.

    :math:`\log q(x) = \log p_0(f(x)) + \log|\det \partial f/\partial x|` with :math:`f` the
    composition of a fixed standardization of the real coordinates and ``config.layers``
    coupling layers (module docstring); :math:`p_0` is standard normal on the real coordinates
    and uniform on the circles. Angles are read modulo :math:`2\pi`; samples lie in
    :math:`[-\pi, \pi)`.

    Args:
        config: :class:`CouplingConfig` (which coordinates are angles, sizes).
        loc, scale: per-coordinate standardization of the real coordinates (ignored for
            angles); default 0 and 1.

    References: Dinh et al. (2017); Durkan et al. (2019); Rezende et al. (2020).
    """

    def __init__(self, config: CouplingConfig, loc: Tensor | None = None, scale: Tensor | None = None):
        super().__init__()
        self.config = config
        D = config.features
        if D < 2:
            raise ValueError(f"a coupling flow needs at least 2 coordinates, got {D}")
        circular = torch.as_tensor(config.circular, dtype=torch.bool)
        self.register_buffer("circular", circular)
        loc = torch.zeros(D) if loc is None else torch.as_tensor(loc, dtype=torch.float32).clone()
        scale = torch.ones(D) if scale is None else torch.as_tensor(scale, dtype=torch.float32).clone()
        if loc.shape != (D,) or scale.shape != (D,):
            raise ValueError(f"loc and scale must have shape ({D},); got {tuple(loc.shape)}, {tuple(scale.shape)}")
        if not bool((scale[~circular] > 0).all()):
            raise ValueError("scale must be positive for every real coordinate")
        loc[circular] = 0.0
        scale[circular] = 1.0
        self.register_buffer("loc", loc)
        self.register_buffer("scale", scale)
        g = torch.Generator().manual_seed(int(config.seed))
        layers = []
        half = D // 2
        for k in range(config.layers):
            if k % 2 == 0:
                perm = torch.randperm(D, generator=g)
            t, c = (perm[:half], perm[half:]) if k % 2 == 0 else (perm[half:], perm[:half])
            layers.append(_Coupling(circular, t.sort().values, c.sort().values, config))
        self.layers = nn.ModuleList(layers)

    @property
    def event_shape(self) -> torch.Size:
        return torch.Size([self.config.features])

    def _dtype(self) -> torch.dtype:
        return self.loc.dtype

    def _standardize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.to(self._dtype())
        y = torch.where(self.circular, wrap_angle(x), (x - self.loc) / self.scale)
        return y, -torch.log(self.scale).sum().expand(x.shape[0])

    def _base_log_prob(self, u: Tensor) -> Tensor:
        circ = self.circular
        real = -0.5 * (u[:, ~circ] ** 2).sum(-1) - 0.5 * _LOG_2PI * int((~circ).sum())
        return real - _LOG_2PI * int(circ.sum())

    def transform(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data ``x`` ``(B, D)`` to latent ``u`` and :math:`\\log|\\det\\partial u/\\partial x|`."""
        if x.dim() != 2 or x.shape[1] != self.config.features:
            raise ValueError(f"expected x of shape (B, {self.config.features}); got {tuple(x.shape)}")
        u, ladj = self._standardize(x)
        for layer in self.layers:
            u, l = layer(u)
            ladj = ladj + l
        return u, ladj

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact :math:`\\log q(x)`, shape ``(B,)``."""
        u, ladj = self.transform(x)
        return self._base_log_prob(u) + ladj

    def sample_base(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws of the base distribution (normal on lines, uniform on circles)."""
        D = self.config.features
        dev = self.loc.device
        normal = torch.randn(n, D, generator=generator, device=dev, dtype=self._dtype())
        unif = (torch.rand(n, D, generator=generator, device=dev, dtype=self._dtype()) * 2 - 1) * math.pi
        return torch.where(self.circular, unif, normal)

    def invert(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Latent ``u`` to data ``x`` and the forward :math:`\\log|\\det\\partial u/\\partial x|` at ``x``."""
        ladj = -torch.log(self.scale).sum().expand(u.shape[0])
        for layer in reversed(self.layers):
            u, l = layer.inverse(u)
            ladj = ladj + l
        x = torch.where(self.circular, wrap_angle(u), u * self.scale + self.loc)
        return x, ladj

    def rsample_and_log_prob(self, shape=(1,), generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Reparameterized draws ``(B, D)`` and their exact log-densities (differentiable)."""
        n = _num(shape)
        u = self.sample_base(n, generator)
        x, ladj = self.invert(u)
        return x, self._base_log_prob(u) + ladj

    def sample_and_log_prob(self, shape=(1,), generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draws and exact log-densities, without gradients."""
        with torch.no_grad():
            return self.rsample_and_log_prob(shape, generator)

    def sample(self, shape=(1,), generator: torch.Generator | None = None) -> Tensor:
        """Draws ``(B, D)``."""
        return self.sample_and_log_prob(shape, generator)[0]

    def config_dict(self) -> dict:
        return asdict(self.config)


def _num(shape) -> int:
    if isinstance(shape, int):
        return int(shape)
    shape = tuple(shape)
    if len(shape) != 1:
        raise ValueError(f"sample_shape must be one batch dimension (n,), got {shape}")
    return int(shape[0])
