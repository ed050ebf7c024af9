r"""Small trainable noise-prediction networks :math:`\hat\varepsilon_\theta(x_t, t)`.

* :class:`ScoreMLP` for vectors ``(B, d)``: residual SiLU MLP whose blocks are shifted by a
  learned projection of the time embedding.
* :class:`ScoreUNet` for images ``(B, C, H, W)`` with H, W divisible by 2 (8×8 or 16×16 digits):
  a two-resolution U-Net in the style of DDPM (Ho et al. 2020) — residual blocks with
  GroupNorm, SiLU and an additive time embedding, a stride-2 downsampling, a middle block,
  nearest-neighbour upsampling and skip connections — at about 0.3M parameters for the default
  channels (32, 64).

Time enters through the sinusoidal embedding of the Transformer (Vaswani et al. 2017) as used by
DDPM, applied to :math:`1000\,t`. Each network keeps ``config`` (its constructor arguments) so a
checkpoint can rebuild it (:func:`~mcsample.flows.diffusion.training.save_checkpoint`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["sinusoidal_embedding", "ScoreMLP", "ScoreUNet", "network_from_config"]


def sinusoidal_embedding(t: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    r"""``(B,)`` times to ``(B, dim)`` features :math:`[\sin(\omega_j s t), \cos(\omega_j s t)]`,
    :math:`\omega_j = 10000^{-j/(dim/2)}` (Vaswani et al. 2017; DDPM uses s = 1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    args = (scale * t).unsqueeze(-1) * freqs
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class _TimeMLP(nn.Module):
    def __init__(self, embed_dim: int, out_dim: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.net = nn.Sequential(nn.Linear(embed_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.net(sinusoidal_embedding(t, self.embed_dim))


class ScoreMLP(nn.Module):
    r"""Residual MLP :math:`\hat\varepsilon_\theta(x,t)` for ``(B, dim)`` inputs.

    ``h = W_in x``; each of ``depth`` blocks adds ``W_2 SiLU(W_1 SiLU(LayerNorm(h) + e(t)))`` to
    ``h``; the output layer starts at zero so the untrained net predicts ε = 0.
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, time_embed_dim: int = 64):
        super().__init__()
        self.config = {
            "class": "ScoreMLP",
            "kwargs": {"dim": dim, "hidden": hidden, "depth": depth, "time_embed_dim": time_embed_dim},
        }
        self.time = _TimeMLP(time_embed_dim, hidden)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(
                nn.ModuleDict(
                    {
                        "norm": nn.LayerNorm(hidden),
                        "temb": nn.Linear(hidden, hidden),
                        "fc1": nn.Linear(hidden, hidden),
                        "fc2": nn.Linear(hidden, hidden),
                    }
                )
            )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """ε-prediction for ``x`` ``(B, dim)`` at times ``t`` ``(B,)``."""
        temb = nn.functional.silu(self.time(t.to(x.dtype)))
        h = self.inp(x)
        for blk in self.blocks:
            u = blk["norm"](h) + blk["temb"](temb)
            u = blk["fc2"](nn.functional.silu(blk["fc1"](nn.functional.silu(u))))
            h = h + u
        return self.out(h)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return self.skip(x) + h


class ScoreUNet(nn.Module):
    r"""Two-resolution U-Net :math:`\hat\varepsilon_\theta(x,t)` for ``(B, C, H, W)`` images.

    Resolution H×W with ``channels[0]`` features, then H/2×W/2 with ``channels[1]``; one
    residual block per level on the way down, a middle block, two per level on the way up
    (taking the skip connections), GroupNorm with ``groups`` groups, a zero-initialized output
    convolution.
    """

    def __init__(
        self, in_channels: int = 1, channels: tuple[int, int] = (32, 64), time_embed_dim: int = 64, groups: int = 8
    ):
        super().__init__()
        c0, c1 = (int(c) for c in channels)
        self.config = {
            "class": "ScoreUNet",
            "kwargs": {
                "in_channels": in_channels,
                "channels": [c0, c1],
                "time_embed_dim": time_embed_dim,
                "groups": groups,
            },
        }
        temb = 4 * c0
        self.time = _TimeMLP(time_embed_dim, temb)
        self.inp = nn.Conv2d(in_channels, c0, 3, padding=1)
        self.down0 = _ResBlock(c0, c0, temb, groups)
        self.downsample = nn.Conv2d(c0, c0, 3, stride=2, padding=1)
        self.down1 = _ResBlock(c0, c1, temb, groups)
        self.mid = _ResBlock(c1, c1, temb, groups)
        self.up1 = _ResBlock(c1 + c1, c1, temb, groups)
        self.upsample = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c1, c0, 3, padding=1))
        self.up0a = _ResBlock(c0 + c0, c0, temb, groups)
        self.up0b = _ResBlock(c0 + c0, c0, temb, groups)
        self.out_norm = nn.GroupNorm(min(groups, c0), c0)
        self.out = nn.Conv2d(c0, in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """ε-prediction for ``x`` ``(B, C, H, W)`` at times ``t`` ``(B,)``."""
        if x.ndim != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"ScoreUNet needs (B, C, H, W) with even H, W; got {tuple(x.shape)}")
        temb = nn.functional.silu(self.time(t.to(x.dtype)))
        h0 = self.inp(x)
        h1 = self.down0(h0, temb)
        h2 = self.downsample(h1)
        h3 = self.down1(h2, temb)
        m = self.mid(h3, temb)
        u = self.up1(torch.cat([m, h3], 1), temb)
        u = self.upsample(u)
        u = self.up0a(torch.cat([u, h1], 1), temb)
        u = self.up0b(torch.cat([u, h0], 1), temb)
        return self.out(nn.functional.silu(self.out_norm(u)))


_NETWORKS = {"ScoreMLP": ScoreMLP, "ScoreUNet": ScoreUNet}


def network_from_config(config: dict) -> nn.Module:
    """Rebuild an (untrained) network from its ``config``."""
    try:
        cls = _NETWORKS[config["class"]]
    except KeyError as err:
        raise ValueError(f"unknown network config {config!r}; known: {sorted(_NETWORKS)}") from err
    return cls(**config.get("kwargs", {}))
