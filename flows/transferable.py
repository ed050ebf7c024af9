r"""A normalizing flow that transfers across peptide sequences: transformer-conditioned coupling
splines over each peptide's internal coordinates.

One set of weights proposes configurations of any short peptide with an exact density, so that
importance sampling and SMC correct it to that peptide's Boltzmann distribution without new
MD (the aim of Transferable Boltzmann Generators, Klein & Noé 2024, and of Prose, "Amortized
sampling with transferable normalizing flows", Tan et al. 2025). The design here keeps the
single-molecule Boltzmann generator (:mod:`mcsample.flows.boltzmann_generator`) and makes its
conditioner sequence-aware:

* **Coordinates.** Each peptide's :math:`3n-6` internal coordinates from its own Z-matrix
  (:func:`~mcsample.systems.coordinates.zmatrix_from_topology`): bond lengths and angles on the
  line, torsions on the circle; the rigid body is drawn exactly, so chirality, the
  centre of mass and the orientation are exact in the density (see the Boltzmann generator's
  docstring: :math:`\log q(x) = \log q_{\rm int}(z) - \log J_{\rm int}(z) - \log 8\pi^2`).
* **Tokens.** Every atom placed from earlier ones is a token carrying its bond, angle and
  torsion (three *cells*) and its chemistry: the element, PDB atom name, residue type and
  residue index of the atom and of its three reference atoms, its placement position and the
  chain length. Names enter through hashed embeddings, so any residue OpenMM can parametrize
  has a token. (Atoms rather than coordinates as tokens make attention 9 times cheaper.)
* **Physical standardization.** Bonds and angles are standardized by the force field's own
  harmonic terms, :math:`u = (r - r_0)/\sqrt{kT/k_r}` (HarmonicBondForce,
  HarmonicAngleForce of the peptide's OpenMM System), so the same spline range fits every
  peptide without data statistics. Torsions are angles on :math:`[-\pi, \pi)`.
* **Coupling layers.** Layer :math:`\ell` transforms the cells of one class of a fixed
  partition (torsions / bonds and angles; even / odd placement positions) with rational
  quadratic splines (zuko; circular splines for torsions, Rezende et al. 2020) whose
  parameters come from a transformer encoder (Vaswani et al. 2017) over all tokens: the
  conditioning cells carry their values (torsions as cos, sin), the transformed ones only a
  flag. Attention masks the padding, so a peptide's density does not depend on
  the other peptides in its batch.

:class:`TransferableFlow` holds the weights; :meth:`TransferableFlow.proposal` returns a
:class:`~mcsample.flows.boltzmann_generator.BoltzmannGenerator` (a ``Proposal`` over the
peptide's ``(B, n, 3)`` Cartesian coordinates in nm, its own atom order) for any peptide.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from mcsample._optional import require

require("zuko", extra="flows")

from zuko.transforms import CircularShiftTransform, MonotonicRQSTransform  # noqa: E402

from mcsample.flows.coupling import _num, wrap_angle  # noqa: E402

__all__ = ["TransferableConfig", "TransferableFlow", "PackedFlow", "PeptideTokens", "tokenize", "pack"]

_LOG_2PI = math.log(2 * math.pi)
_SHIFT = CircularShiftTransform(bound=math.pi)
#: hashed vocabulary sizes
_NAME_BUCKETS, _RESIDUE_BUCKETS, _ELEMENT_BUCKETS = 256, 64, 16
#: the four atom roles of a token: the placed atom and its references a, b, c
_ROLES = 4


def _bucket(text: str, buckets: int) -> int:
    """A stable hash of ``text`` into ``1..buckets-1`` (0 is padding)."""
    return 1 + zlib.crc32(text.encode()) % (buckets - 1)


@dataclass
class PeptideTokens:
    """The tokens of one peptide, one per placed atom (placement positions ``1 .. n-1``), each
    with up to three internal coordinates (bond, angle, torsion: the *cells* ``(P, 3)``).

    ``features`` ``(P, F)`` integers; ``loc``/``scale`` ``(P, 3)`` standardization (0/1 for
    torsions and missing cells); ``valid`` ``(P, 3)`` which cells exist (the atom at position 1
    has a bond only, at 2 a bond and an angle); ``position`` ``(P,)``; ``flat`` ``(D,)`` the
    cell (``3p + c``) of each internal coordinate in the order ``[bonds, angles, torsions]``,
    ``D = 3n - 6``."""

    features: Tensor
    loc: Tensor
    scale: Tensor
    valid: Tensor
    position: Tensor
    flat: Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.position.numel())

    @property
    def num_coordinates(self) -> int:
        return int(self.flat.numel())

    def to_cells(self, z: Tensor) -> Tensor:
        """Flat internal coordinates ``(B, D)`` to cells ``(B, P, 3)`` (missing cells 0)."""
        out = torch.zeros(z.shape[0], 3 * self.num_tokens, dtype=z.dtype, device=z.device)
        out[:, self.flat.to(z.device)] = z
        return out.reshape(z.shape[0], self.num_tokens, 3)

    def from_cells(self, cells: Tensor) -> Tensor:
        """Cells ``(B, P', 3)`` (``P' >= P``, padded) back to flat ``(B, D)``."""
        return cells[:, : self.num_tokens].reshape(cells.shape[0], -1)[:, self.flat.to(cells.device)]


def _harmonic_terms(system) -> tuple[dict, dict]:
    """``{(i, j): (r0 nm, k kJ/mol/nm²)}`` and ``{(i, j, k) sorted ends: (θ0, k kJ/mol/rad²)}``."""
    import openmm

    bonds, angles = {}, {}
    for force in system.getForces():
        if isinstance(force, openmm.HarmonicBondForce):
            for b in range(force.getNumBonds()):
                i, j, r0, k = force.getBondParameters(b)
                bonds[(min(i, j), max(i, j))] = (
                    r0.value_in_unit(openmm.unit.nanometer),
                    k.value_in_unit(openmm.unit.kilojoule_per_mole / openmm.unit.nanometer**2),
                )
        elif isinstance(force, openmm.HarmonicAngleForce):
            for a in range(force.getNumAngles()):
                i, j, k, t0, kt = force.getAngleParameters(a)
                angles[(min(i, k), j, max(i, k))] = (
                    t0.value_in_unit(openmm.unit.radian),
                    kt.value_in_unit(openmm.unit.kilojoule_per_mole / openmm.unit.radian**2),
                )
    return bonds, angles


def tokenize(peptide, zmatrix=None) -> PeptideTokens:
    r"""The tokens of ``peptide`` (a :class:`~mcsample.systems.peptides.Peptide`): one per atom
    placed from earlier ones, carrying its bond, angle and torsion (see :class:`PeptideTokens`).

    Features per token (integers; 0 is padding): the chain length and the placement position;
    for the placed atom and its reference atoms a, b, c: hashed element, hashed PDB atom name,
    hashed residue name, residue index + 1. Standardization: the bond :math:`(i,a)` by
    :math:`r_0` and :math:`\sqrt{kT/k_r}` of the force field's HarmonicBondForce, the angle
    :math:`(i,a,b)` by :math:`	heta_0` and :math:`\sqrt{kT/k_	heta}` of its HarmonicAngleForce
    (a term the force field lacks falls back to 0.12 ± 0.01 nm or 1.91 ± 0.1 rad).
    """
    from mcsample.systems.coordinates import zmatrix_from_topology

    top = peptide.topology
    z = np.asarray(zmatrix_from_topology(top) if zmatrix is None else zmatrix)
    n = z.shape[0]
    if n < 4:
        raise ValueError(f"a peptide needs at least 4 atoms, got {n}")
    atoms = list(top.atoms)
    n_res = top.n_residues
    kT = 0.0083144626181532 * float(peptide.temperature)
    bonds, angles = _harmonic_terms(peptide.system)

    def atom_features(index: int) -> list[int]:
        if index < 0:
            return [0, 0, 0, 0]
        atom = atoms[index]
        element = atom.element.symbol if atom.element is not None else "?"
        return [
            _bucket(element, _ELEMENT_BUCKETS),
            _bucket(atom.name, _NAME_BUCKETS),
            _bucket(atom.residue.name, _RESIDUE_BUCKETS),
            atom.residue.index + 1,
        ]

    P = n - 1
    feats, positions = [], []
    loc = torch.zeros(P, 3)
    scale = torch.ones(P, 3)
    valid = torch.zeros(P, 3, dtype=torch.bool)
    for p in range(1, n):
        row = [int(v) for v in z[p]]
        refs = [row[0]] + [row[k] if (k <= min(p, 3) and row[k] >= 0) else -1 for k in (1, 2, 3)]
        f = [min(n_res, 15), min(p, 255)]
        for r in refs:
            f += atom_features(r)
        feats.append(f)
        positions.append(p)
        t = p - 1
        valid[t, 0] = True
        r0, k = bonds.get((min(refs[0], refs[1]), max(refs[0], refs[1])), (0.12, kT / 0.01**2))
        loc[t, 0], scale[t, 0] = r0, math.sqrt(kT / k)
        if p >= 2:
            valid[t, 1] = True
            t0, k = angles.get((min(refs[0], refs[2]), refs[1], max(refs[0], refs[2])), (1.91, kT / 0.1**2))
            loc[t, 1], scale[t, 1] = t0, math.sqrt(kT / k)
        if p >= 3:
            valid[t, 2] = True
    flat = torch.cat([torch.arange(0, P) * 3, torch.arange(1, P) * 3 + 1, torch.arange(2, P) * 3 + 2])
    return PeptideTokens(
        torch.tensor(feats, dtype=torch.long), loc, scale, valid, torch.tensor(positions, dtype=torch.long), flat
    )


@dataclass
class TransferableConfig:
    """Architecture of a :class:`TransferableFlow` (stored in checkpoints)."""

    layers: int = 8
    width: int = 64
    heads: int = 4
    depth: int = 2
    bins: int = 8
    bound: float = 5.0
    slope: float = 1e-3


class _Embedding(nn.Module):
    """Token chemistry to a vector: the sum of embeddings of every integer feature."""

    def __init__(self, width: int):
        super().__init__()
        self.length = nn.Embedding(16, width)
        self.position = nn.Embedding(256, width)
        self.element = nn.ModuleList(nn.Embedding(_ELEMENT_BUCKETS, width) for _ in range(_ROLES))
        self.name = nn.ModuleList(nn.Embedding(_NAME_BUCKETS, width) for _ in range(_ROLES))
        self.residue = nn.ModuleList(nn.Embedding(_RESIDUE_BUCKETS, width) for _ in range(_ROLES))
        self.index = nn.ModuleList(nn.Embedding(16, width) for _ in range(_ROLES))

    def forward(self, f: Tensor) -> Tensor:
        h = self.length(f[..., 0]) + self.position(f[..., 1])
        for r in range(_ROLES):
            base = 2 + 4 * r
            h = (
                h
                + self.element[r](f[..., base])
                + self.name[r](f[..., base + 1])
                + self.residue[r](f[..., base + 2])
                + self.index[r](f[..., base + 3].clamp(max=15))
            )
        return h


class _Conditioner(nn.Module):
    """Transformer encoder from (chemistry, visible values) to spline parameters of every cell."""

    def __init__(self, cfg: TransferableConfig):
        super().__init__()
        w = cfg.width
        self.values = nn.Linear(7, w)  # bond, angle: (value, transformed); torsion: (cos, sin, transformed)
        layer = nn.TransformerEncoderLayer(w, cfg.heads, 2 * w, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.bins = cfg.bins
        self.out = nn.Linear(w, 3 * (3 * cfg.bins - 1))
        nn.init.zeros_(self.out.weight)  # identity at initialization
        nn.init.zeros_(self.out.bias)

    def forward(self, chem: Tensor, u: Tensor, valid: Tensor, transformed: Tensor) -> Tensor:
        vis = (valid & ~transformed).to(u.dtype)
        tr = transformed.to(u.dtype)
        v = torch.stack(
            [
                u[..., 0] * vis[..., 0],
                tr[..., 0],
                u[..., 1] * vis[..., 1],
                tr[..., 1],
                torch.cos(u[..., 2]) * vis[..., 2],
                torch.sin(u[..., 2]) * vis[..., 2],
                tr[..., 2],
            ],
            -1,
        )
        h = self.encoder(chem + self.values(v), src_key_padding_mask=~valid.any(-1))
        return self.out(h).unflatten(-1, (3, 3 * self.bins - 1))


def _partition(valid: Tensor, position: Tensor, layer: int) -> Tensor:
    """Cells that layer ``layer`` transforms: torsions, then bonds and angles, then the atoms at
    even placement positions, then odd ones (period 4: every cell is transformed every 4 layers)."""
    k = layer % 4
    cells = torch.zeros_like(valid)
    if k == 0:
        cells[..., 2] = True
    elif k == 1:
        cells[..., :2] = True
    else:
        cells = (position % 2 == k - 2)[..., None].expand_as(valid)
    return cells & valid


def _torsion_mask(valid: Tensor) -> Tensor:
    circ = torch.zeros_like(valid)
    circ[..., 2] = True
    return circ


class TransferableFlow(nn.Module):
    r"""One flow for many peptides (module docstring): exact :math:`\log q` of padded batches of
    internal coordinates, and :meth:`proposal` for a peptide's Cartesian coordinates.

    Batched calls take the cells ``(B, P, 3)`` of physical internal coordinates with the token
    batch of :meth:`batch`; one peptide is served by :meth:`bind` (its own ``(B, 3n - 6)``
    internal coordinates) and :meth:`proposal`.
    """

    def __init__(self, config: TransferableConfig | None = None):
        super().__init__()
        self.architecture = config or TransferableConfig()
        self.embed = _Embedding(self.architecture.width)
        #: sequences (or names) of the peptides the weights were trained on
        self.training_set: list = []
        self.conditioners = nn.ModuleList(_Conditioner(self.architecture) for _ in range(self.architecture.layers))

    # -- token batches ----------------------------------------------------------------------
    @staticmethod
    def batch(tokens: list[PeptideTokens]) -> dict:
        """Pad the tokens of several peptides to one batch (``valid`` False on padding)."""
        P = max(t.num_tokens for t in tokens)

        def pad(t: Tensor, value) -> Tensor:
            out = torch.full((P,) + tuple(t.shape[1:]), value, dtype=t.dtype)
            out[: t.shape[0]] = t
            return out

        return {
            "features": torch.stack([pad(t.features, 0) for t in tokens]),
            "loc": torch.stack([pad(t.loc, 0.0) for t in tokens]),
            "scale": torch.stack([pad(t.scale, 1.0) for t in tokens]),
            "valid": torch.stack([pad(t.valid, False) for t in tokens]),
            "position": torch.stack([pad(t.position, 0) for t in tokens]),
        }

    def _to(self, b: dict) -> dict:
        w = self.embed.length.weight
        return {k: v.to(device=w.device, dtype=w.dtype if v.is_floating_point() else v.dtype) for k, v in b.items()}

    def _layer(self, u: Tensor, b: dict, chem: Tensor, layer: int, inverse: bool) -> tuple[Tensor, Tensor]:
        valid = b["valid"]
        circular = _torsion_mask(valid)
        t = _partition(valid, b["position"], layer)
        p = self.conditioners[layer](chem, u, valid, t)
        K = self.architecture.bins
        w, h, d = p[..., :K], p[..., K : 2 * K], p[..., 2 * K :]
        # one spline on [-B, B] for every cell: torsions are shifted by π (the circular spline of
        # Rezende et al. 2020) and scaled by B/π in and π/B out, which leaves log h' unchanged
        cfg = self.architecture
        spline = MonotonicRQSTransform(w, h, d, bound=cfg.bound, slope=cfg.slope)
        c = cfg.bound / math.pi
        if not inverse:
            v = torch.where(circular, _SHIFT(u) * c, u)
            y, ladj = spline.call_and_ladj(v)
            y = torch.where(circular, y / c, y)
        else:
            v = spline.inv(torch.where(circular, u * c, u))
            _, ladj = spline.call_and_ladj(v)
            y = torch.where(circular, _SHIFT.inv(v / c), v)
        y = torch.where(t, y, u)
        return y, torch.where(t, ladj, torch.zeros_like(ladj)).flatten(1).sum(-1)

    def standardize(self, z: Tensor, b: dict) -> tuple[Tensor, Tensor]:
        r"""Physical cells ``z`` ``(B, P, 3)`` to standardized ``u`` and
        :math:`\log|\det\partial u/\partial z|` (missing cells are 0)."""
        valid = b["valid"]
        circular = _torsion_mask(valid)
        u = torch.where(circular, wrap_angle(z), (z - b["loc"]) / b["scale"])
        u = torch.where(valid, u, torch.zeros_like(u))
        real = (~circular) & valid
        return u, -(torch.log(b["scale"]) * real).flatten(1).sum(-1)

    def transform(self, z: Tensor, b: dict) -> tuple[Tensor, Tensor]:
        """Data cells ``z`` ``(B, P, 3)`` (physical units, padded) to latent ``u`` and the
        log-determinant."""
        b = self._to(b)
        u, ladj = self.standardize(z.to(b["loc"].dtype), b)
        chem = self.embed(b["features"])
        for layer in range(self.architecture.layers):
            u, l = self._layer(u, b, chem, layer, inverse=False)
            ladj = ladj + l
        return u, ladj

    def base_log_prob(self, u: Tensor, b: dict) -> Tensor:
        """Standard normal on the bonds and angles, uniform on the torsions, nothing on padding."""
        valid = b["valid"]
        circular = _torsion_mask(valid)
        real = ((~circular) & valid).flatten(1)
        circ = (circular & valid).flatten(1)
        uf = u.flatten(1)
        return (-0.5 * uf**2 * real).sum(-1) - 0.5 * _LOG_2PI * real.sum(-1) - _LOG_2PI * circ.sum(-1)

    def log_prob(self, z: Tensor, b: dict) -> Tensor:
        r"""Exact :math:`\log q(z)` of padded cells ``(B, P, 3)``, shape ``(B,)``."""
        b = self._to(b)
        u, ladj = self.transform(z, b)
        return self.base_log_prob(u, b) + ladj

    def invert(self, u: Tensor, b: dict) -> tuple[Tensor, Tensor]:
        """Latent ``u`` to physical cells ``z`` and the forward log-determinant at ``z``."""
        b = self._to(b)
        chem = self.embed(b["features"])
        ladj = torch.zeros(u.shape[0], dtype=u.dtype, device=u.device)
        for layer in reversed(range(self.architecture.layers)):
            u, l = self._layer(u, b, chem, layer, inverse=True)
            ladj = ladj + l
        valid = b["valid"]
        circular = _torsion_mask(valid)
        ladj = ladj - (torch.log(b["scale"]) * ((~circular) & valid)).flatten(1).sum(-1)
        z = torch.where(circular, wrap_angle(u), u * b["scale"] + b["loc"])
        return torch.where(valid, z, torch.zeros_like(z)), ladj

    def sample_base(self, b: dict, generator: torch.Generator | None = None) -> Tensor:
        b = self._to(b)
        loc = b["loc"]
        normal = torch.randn(loc.shape, generator=generator, device=loc.device, dtype=loc.dtype)
        unif = (torch.rand(loc.shape, generator=generator, device=loc.device, dtype=loc.dtype) * 2 - 1) * math.pi
        u = torch.where(_torsion_mask(b["valid"]), unif, normal)
        return torch.where(b["valid"], u, torch.zeros_like(u))

    # -- one peptide ------------------------------------------------------------------------
    def bind(self, peptide) -> BoundFlow:
        """This flow restricted to ``peptide``'s internal coordinates (the interface of
        :class:`~mcsample.flows.coupling.CouplingSplineFlow`)."""
        return BoundFlow(self, tokenize(peptide))

    def proposal(self, peptide):
        """A :class:`~mcsample.flows.boltzmann_generator.BoltzmannGenerator` for ``peptide``: a
        Proposal over its ``(B, n, 3)`` Cartesian coordinates (nm, its own atom order) with an
        exact ``log_prob``, so ``mc.importance_sample(peptide, proposal, n)`` and ``mc.smc``
        apply unchanged."""
        from mcsample.flows.boltzmann_generator import BoltzmannGenerator
        from mcsample.systems.coordinates import zmatrix_from_topology

        return BoltzmannGenerator(zmatrix_from_topology(peptide.topology), self.bind(peptide), peptide.identity())

    def config(self) -> dict:
        """Everything needed to rebuild the module (stored in checkpoints by
        :func:`mcsample.flows.training.save_flow`), with the training set's identity."""
        return {
            "kind": "TransferableFlow",
            "architecture": asdict(self.architecture),
            "training_set": list(self.training_set),
        }

    @classmethod
    def from_config(cls, config: dict) -> TransferableFlow:
        flow = cls(TransferableConfig(**config["architecture"]))
        flow.training_set = list(config.get("training_set", []))
        return flow

    def check_identity(self, peptide) -> None:
        """A transferable flow serves any peptide: nothing to refuse."""


class PackedFlow(nn.Module):
    """The flow over rows ``[peptide id, cells (P·3)]`` of a packed multi-peptide data set (see
    :func:`pack`), so that the generic trainers of :mod:`mcsample.flows.training` (which call
    ``model.log_prob(batch)``) train it over many peptides at once."""

    def __init__(self, flow: TransferableFlow, tokens: list[PeptideTokens]):
        super().__init__()
        self.flow = flow
        self.tokens = tokens
        self._table = TransferableFlow.batch(tokens)

    def log_prob(self, rows: Tensor) -> Tensor:
        ids = rows[:, 0].round().long().cpu()
        b = {k: v[ids] for k, v in self._table.items()}
        P = b["valid"].shape[1]
        return self.flow.log_prob(rows[:, 1 : 1 + 3 * P].reshape(rows.shape[0], P, 3), b)


def pack(tokens: list[PeptideTokens], internal: list[Tensor]) -> Tensor:
    """Rows ``[peptide id, cells (padded with 0)]`` from per-peptide internal coordinates
    ``internal[i]`` ``(F_i, 3 n_i - 6)`` (in their common dtype); ids are positions in the list."""
    P = max(t.num_tokens for t in tokens)
    rows = []
    for i, (t, z) in enumerate(zip(tokens, internal)):
        r = torch.zeros(z.shape[0], 1 + 3 * P, dtype=internal[0].dtype)
        r[:, 0] = i
        r[:, 1 : 1 + 3 * t.num_tokens] = t.to_cells(z).flatten(1)
        rows.append(r)
    return torch.cat(rows)


@dataclass
class _BoundConfig:
    features: int


class BoundFlow(nn.Module):
    """A :class:`TransferableFlow` on one peptide's tokens, with the single-molecule flow's
    interface over its flat ``(B, 3n - 6)`` internal coordinates (``transform``, ``log_prob``,
    ``invert``, ``rsample_and_log_prob``, ...)."""

    def __init__(self, flow: TransferableFlow, tokens: PeptideTokens):
        super().__init__()
        self.flow = flow
        self.tokens = tokens
        self.config = _BoundConfig(tokens.num_coordinates)
        self._b = TransferableFlow.batch([tokens])

    @property
    def event_shape(self) -> torch.Size:
        return torch.Size([self.tokens.num_coordinates])

    def _batch(self, n: int) -> dict:
        return {k: v.expand((n,) + tuple(v.shape[1:])) for k, v in self.flow._to(self._b).items()}

    def _check(self, z: Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.tokens.num_coordinates:
            raise ValueError(
                f"expected internal coordinates of shape (B, {self.tokens.num_coordinates}); got {tuple(z.shape)}"
            )

    def transform(self, z: Tensor) -> tuple[Tensor, Tensor]:
        self._check(z)
        u, ladj = self.flow.transform(self.tokens.to_cells(z), self._batch(z.shape[0]))
        return self.tokens.from_cells(u), ladj

    def log_prob(self, z: Tensor) -> Tensor:
        self._check(z)
        return self.flow.log_prob(self.tokens.to_cells(z), self._batch(z.shape[0]))

    def invert(self, u: Tensor) -> tuple[Tensor, Tensor]:
        z, ladj = self.flow.invert(self.tokens.to_cells(u), self._batch(u.shape[0]))
        return self.tokens.from_cells(z), ladj

    def sample_base(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.tokens.from_cells(self.flow.sample_base(self._batch(n), generator))

    def rsample_and_log_prob(self, shape=(1,), generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        n = _num(shape)
        b = self._batch(n)
        u = self.flow.sample_base(b, generator)
        z, ladj = self.flow.invert(u, b)
        return self.tokens.from_cells(z), self.flow.base_log_prob(u, b) + ladj

    def sample_and_log_prob(self, shape=(1,), generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return self.rsample_and_log_prob(shape, generator)

    def sample(self, shape=(1,), generator: torch.Generator | None = None) -> Tensor:
        return self.sample_and_log_prob(shape, generator)[0]
