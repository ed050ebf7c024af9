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
  peptide without data statistics. Torsions come in two kinds (:func:`torsion_stiffness`):
  *free* ones (rotors: φ, ψ, ω, χ, methyls) are angles on :math:`[-\pi, \pi)` with a uniform
  base; *stiff* ones (improper torsions of branches, which fix chirality and the implied bond
  angles, and ring torsions) are centred and scaled by a rigid scan of the force field and a
  harmonic estimate of their width, :math:`u = \mathrm{wrap}(\varphi - \varphi_0)/\sigma`,
  with a normal base truncated to the circle. Without this, a free circular coordinate must
  learn a 0.1-rad peak for every branch and ring atom, and a flow trained on 48 dipeptides
  placed the implied angles of unseen ones tens of kT off.
* **Equivalent hydrogens.** The hydrogens of a methyl, ammonium or methylene group are
  identical particles, so the Boltzmann distribution over labelled atoms has mirror-labelled
  copies of each group; the flow models the copy of the peptide's own structure and training
  frames are relabelled to it (:func:`match_hydrogen_labels`). Label-blind observables
  (energies, φ/ψ, distances between distinct atoms) are unchanged. Turning a methyl or
  ammonium group by 120°, or a carboxylate or planar NH2 group by 180°, permutes identical atoms,
  so the density of such a rotor's torsion is made :math:`2\pi/k`-periodic by construction
  (:func:`rotor_symmetry`; ``TransferableConfig.symmetric_rotors``): short MD fills a rotor's
  wells unequally, and a flow that learned those populations gave the wells it under-filled
  importance weights several times the others'.
* **Coupling layers.** Layer :math:`\ell` transforms the cells of one class of a fixed
  partition (torsions / bonds and angles; even / odd placement positions) with rational
  quadratic splines (zuko; circular splines for torsions, Rezende et al. 2020) whose
  parameters come from a transformer encoder (Vaswani et al. 2017) over all tokens: the
  conditioning cells carry their values (torsions as cos, sin), the transformed ones only a
  flag. Attention masks the padding, so a peptide's density does not depend on
  the other peptides in its batch.

* **Free torsions only** (``TransferableConfig(cells="free")``, the shipped checkpoint). The flow
  models the dozen free torsions and nothing else; :meth:`TransferableFlow.proposal` draws the
  stiff coordinates given them from the force field's harmonic (Laplace) conditional,
  :class:`~mcsample.flows.harmonic.HarmonicCompletion` (:class:`CompletedFlow`). Bonds, angles,
  impropers and rings then cost the weights only their anharmonicity, where a learned flow
  over all :math:`3n-6` coordinates spread its error over every one of them: on held-out
  dipeptides the importance weights of the all-coordinate flow had ESS below 0.2 %.

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

__all__ = [
    "TransferableConfig",
    "TransferableFlow",
    "PackedFlow",
    "PeptideTokens",
    "tokenize",
    "pack",
    "PackedTarget",
    "torsion_stiffness",
    "match_hydrogen_labels",
    "rotor_symmetry",
    "CompletedFlow",
]

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
    free torsions and missing cells); ``valid`` ``(P, 3)`` which cells exist (the atom at
    position 1 has a bond only, at 2 a bond and an angle); ``position`` ``(P,)``; ``flat``
    ``(D,)`` the cell (``3p + c``) of each internal coordinate in the order
    ``[bonds, angles, torsions]``, ``D = 3n - 6``; ``circular`` ``(P, 3)`` the free torsions
    (uniform base on the circle); the other torsions are *stiff* (see :func:`torsion_stiffness`).
    ``period`` ``(P, 3)``: the order :math:`k` of the rotational symmetry of each free torsion
    (3 for methyl and ammonium rotors, 2 for carboxylates and planar NH2 groups, 1 otherwise;
    see :func:`rotor_symmetry`).
    """

    features: Tensor
    loc: Tensor
    scale: Tensor
    valid: Tensor
    position: Tensor
    flat: Tensor
    circular: Tensor
    period: Tensor | None = None

    def __post_init__(self):
        if self.period is None:
            self.period = torch.ones(self.loc.shape, dtype=self.loc.dtype)

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


#: a torsion is stiff when the rigid scan's Boltzmann distribution has a width below
#: ``_STIFF_WIDTH`` (rad) and less than ``_STIFF_MASS`` of its mass beyond ``_STIFF_SIGMAS`` widths
_STIFF_WIDTH, _STIFF_MASS, _STIFF_SIGMAS = 0.4, 1e-3, 6.0


def _scan_grid(dtype=torch.float64) -> tuple[Tensor, Tensor]:
    """Offsets over the circle, every 0.005 rad within 0.6 rad of the minimum and every 2°
    beyond, and the arc each one stands for."""
    fine = torch.linspace(-0.6, 0.6, 241, dtype=dtype)
    coarse = torch.linspace(-math.pi, math.pi, 181, dtype=dtype)[:-1]
    coarse = coarse[coarse.abs() > 0.6 + 1e-9]
    grid = torch.cat([fine, coarse]).sort().values
    edges = torch.cat([grid[:1] - (grid[1] - grid[0]) / 2, (grid[1:] + grid[:-1]) / 2, grid[-1:] + 0.0175])
    return grid, edges[1:] - edges[:-1]


def torsion_stiffness(peptide, zmatrix) -> tuple[Tensor, Tensor, Tensor]:
    r"""Which torsions of a Z-matrix the force field holds in one narrow well, with the well's
    centre and width: ``(phi0 (T,), sigma (T,), stiff (T,) bool)`` for the torsions of
    placement positions ``3 .. n-1``.

    At the peptide's structure :math:`x_0` (``peptide.positions``, minimized by the peptide
    constructors) each torsion :math:`\varphi_j` is scanned rigidly over the circle, the other
    internal coordinates fixed, and the scan's Boltzmann distribution
    :math:`p_j(\Delta) \propto e^{-U(\varphi_{0j}+\Delta)/kT}` gives the centre (its circular
    mean) and width :math:`\sigma_j` (its standard deviation), widened to the harmonic marginal
    width where that is larger (:func:`_harmonic_marginal_width`: ring torsions). Candidates are
    the improper torsions (a branch placed against its sibling: Cα/Cβ chirality, methyl and
    amine hydrogens, planar carbonyls, whose implied bond angles a free circular coordinate gets
    wrong) and the torsions about ring bonds (:func:`_torsion_candidates`); a candidate is
    *stiff* when :math:`\sigma_j < 0.4` rad and less than :math:`10^{-3}` of :math:`p_j` lies
    beyond :math:`6\sigma_j`. Rotors (φ, ψ, ω, χ, methyls) and puckering rings with two wells
    stay free. The scan decides only the standardization; the flow's density is exact either
    way.
    """
    from mcsample.systems.coordinates import InternalCoordinates

    kT = 0.0083144626181532 * float(peptide.temperature)
    pos = peptide.positions.detach().cpu().to(torch.float64)
    ic = InternalCoordinates(np.asarray(zmatrix))
    ts = ic.torsion_slice
    T = ts.stop - ts.start
    grid, arc = _scan_grid()
    with torch.no_grad():
        z0 = ic.to_internal(pos[None])[0]
        z = z0.repeat(T * len(grid), 1)
        rows = torch.arange(T).repeat_interleave(len(grid))
        z[torch.arange(len(z)), ts.start + rows] += grid.repeat(T)
        x, _ = ic.to_cartesian(z)
        energy = (peptide.forcefield.energy(x) / kT).reshape(T, len(grid))
    finite = torch.isfinite(energy).all(-1)
    energy = torch.where(torch.isfinite(energy), energy, torch.full_like(energy, math.inf))
    p = torch.exp(-(energy - energy.min(-1, keepdim=True).values)) * arc
    p = p / p.sum(-1, keepdim=True)
    mean = torch.atan2((p * torch.sin(grid)).sum(-1), (p * torch.cos(grid)).sum(-1))
    d = wrap_angle(grid[None] - mean[:, None])
    sigma = (p * d**2).sum(-1).sqrt()
    far = (p * (d.abs() > _STIFF_SIGMAS * sigma[:, None])).sum(-1)
    stiff = (sigma < _STIFF_WIDTH) & (far < _STIFF_MASS) & finite & _torsion_candidates(peptide.topology, zmatrix)
    marginal = _harmonic_marginal_width(peptide.forcefield, ic, z0, kT, stiff)
    if marginal is not None:
        sigma = torch.where(stiff, torch.maximum(sigma, marginal), sigma)
        stiff = stiff & (sigma < _STIFF_WIDTH)
    return wrap_angle(z0[ts] + mean), sigma, stiff


def _torsion_candidates(topology, zmatrix) -> Tensor:
    """Torsions that may be stiff: improper ones (the reference ``c`` bonded to ``a``: a branch
    placed against its sibling) and proper ones about a ring bond ``a-b``. A proper torsion about
    any other bond is a rotor (phi, psi, omega, chi, methyls) and stays free, whatever the rigid
    scan says: rotating a whole side of the molecule rigidly clashes, but the molecule turns
    these bonds by relaxing the rest."""
    from mcsample.systems.coordinates import bond_graph, ring_of_bond

    z = np.asarray(zmatrix)
    neighbours = bond_graph(topology)

    out = []
    for _, a, b, c in z[3:]:
        a, b, c = int(a), int(b), int(c)
        out.append(c in neighbours[a] or ring_of_bond(neighbours, a, b) is not None)
    return torch.tensor(out, dtype=torch.bool)


def _harmonic_marginal_width(forcefield, ic, z0: Tensor, kT: float, stiff: Tensor, h: float = 1e-3):
    r"""Marginal widths :math:`\sqrt{(H^{-1})_{jj}}` of the stiff torsions in the harmonic
    approximation over the stiff coordinates (bonds, angles, stiff torsions), :math:`H` the
    Hessian of :math:`U/kT` at :math:`z_0` by central differences of the gradient (one batched
    force evaluation of :math:`2D` configurations); ``None`` if :math:`H` is not positive
    definite. A ring torsion scanned alone is pinned by the ring (rigid width 0.02 rad); with
    the ring's bonds and angles relaxing with it its width is 0.1 rad."""
    from mcsample.systems.coordinates import central_difference_hessian

    ts = ic.torsion_slice
    keep = torch.ones(len(z0), dtype=torch.bool)
    keep[:6] = False
    keep[ts] = stiff
    idx = torch.nonzero(keep)[:, 0]

    def grad(z: Tensor) -> Tensor:
        z = z.detach().requires_grad_(True)
        x, _ = ic.to_cartesian(z)
        return torch.autograd.grad(forcefield.energy(x).sum() / kT, z)[0].detach()

    hess = central_difference_hessian(grad, z0[None], idx, h)[0]
    chol, info = torch.linalg.cholesky_ex(hess)
    if int(info) != 0 or not bool(torch.isfinite(hess).all()):
        return None
    cov = torch.cholesky_inverse(chol)
    width = torch.full((ts.stop - ts.start,), math.nan, dtype=torch.float64)
    torsion = idx >= ts.start
    width[idx[torsion] - ts.start] = cov.diagonal()[torsion].sqrt()
    return width


def _atom_kinds(peptide) -> tuple[list, list[tuple], list]:
    """``(atoms, kind, neighbours)``: each atom's ``(element, nonbonded parameters)``, which tells
    identical particles apart from the rest, and the bond graph."""
    import openmm

    from mcsample.systems.coordinates import bond_graph

    atoms = list(peptide.topology.atoms)
    nb = next(f for f in peptide.system.getForces() if isinstance(f, openmm.NonbondedForce))
    kind = [
        (a.element.symbol if a.element is not None else "?",)
        + tuple(round(v._value, 8) for v in nb.getParticleParameters(i))
        for i, a in enumerate(atoms)
    ]
    return atoms, kind, bond_graph(peptide.topology)


def _equivalent_hydrogen_groups(peptide) -> list[tuple[int, int, list[int]]]:
    """``(heavy atom, its first heavy neighbour, [hydrogens])`` for every tetrahedral heavy atom
    carrying two or three hydrogens with identical nonbonded parameters (methyl, ammonium,
    methylene groups). Planar NH2 groups (amide, guanidinium) are left out: their two copies are
    one half-turn of the rotor apart, which :func:`rotor_symmetry` covers, and the sign of their
    triple product only records on which side of the plane a frame's nitrogen happens to be."""
    atoms, kind, neighbours = _atom_kinds(peptide)
    groups = []
    for a in range(len(atoms)):
        if kind[a][0] == "H" or len(neighbours[a]) != 4:
            continue
        hs = sorted(j for j in neighbours[a] if kind[j][0] == "H")
        heavy = sorted(j for j in neighbours[a] if kind[j][0] != "H")
        if len(hs) in (2, 3) and heavy and len({kind[h] for h in hs}) == 1:
            groups.append((a, heavy[0], hs))
    return groups


def rotor_symmetry(peptide, zmatrix) -> Tensor:
    r"""The order :math:`k` of the exact rotational symmetry of every torsion of ``zmatrix``
    ``(n, 4)`` (row ``p >= 3`` places atom ``i`` about the bond ``a``-``b``), shape ``(n - 3,)``.

    Turning a group by :math:`2\pi/k` about its bond permutes identical atoms when ``a`` carries,
    besides ``b``, exactly :math:`k \in \{2, 3\}` atoms of one element with identical nonbonded
    parameters: three terminal ones on a tetrahedral centre (methyl, ammonium), or two on a
    planar one, either terminal (carboxylate, guanidinium and amide NH2) or heading branches that
    map onto each other atom by atom (the ring flip of phenylalanine and tyrosine). The
    Boltzmann distribution of labelled atoms is invariant under the permutation, which turns
    the torsion by :math:`2\pi/k` (up to the spread of the other members' offsets from it, a
    few degrees), while MD of a few picoseconds leaves the :math:`k` wells of a rotor unequally
    filled; a flow whose density of the torsion is :math:`2\pi/k`-periodic has the symmetry by
    construction instead of learning it from such data. Only free torsions use it (the
    siblings' torsions, placed from the group's first atom, are stiff).
    """
    atoms, kind, neighbours = _atom_kinds(peptide)

    def mirror(a: int, u: int, v: int) -> bool:
        """The branches of ``a`` at ``u`` and ``v`` map onto each other atom by atom (a ring
        flip: phenyl, tyrosyl), pairing neighbours of equal kind layer by layer."""
        pairs, seen = [(u, v)], {a, u, v}
        while pairs:
            nxt = []
            for x, y in pairs:
                nx = sorted((kind[w], len(neighbours[w]), w) for w in neighbours[x] if w not in seen)
                ny = sorted((kind[w], len(neighbours[w]), w) for w in neighbours[y] if w not in seen)
                if [t[:2] for t in nx] != [t[:2] for t in ny]:
                    return False
                if x != y and len({t[:2] for t in nx}) != len(nx):
                    return False  # two neighbours of one kind: the pairing is ambiguous
                nxt += [(p[2], q[2]) for p, q in zip(nx, ny)]
            seen |= {w for pair in nxt for w in pair}
            pairs = nxt
        return True

    z = np.asarray(zmatrix)
    out = torch.ones(max(len(z) - 3, 0))
    for p in range(3, len(z)):
        i, a, b = (int(v) for v in z[p, :3])
        group = sorted(set(neighbours[a]) - {b})
        if i not in group or len(group) not in (2, 3) or len(neighbours[a]) != len(group) + 1:
            continue
        if len({kind[j] for j in group}) != 1:
            continue
        if all(len(neighbours[j]) == 1 for j in group) or (len(group) == 2 and mirror(a, *group)):
            out[p - 3] = len(group)
    return out


def _handedness(x: Tensor, a: int, b: int, hs: list[int]) -> Tensor:
    """Sign of the triple product of the first hydrogens of a group (with the heavy neighbour
    ``b`` as the third vector when there are two), per frame."""
    v1, v2 = x[:, hs[0]] - x[:, a], x[:, hs[1]] - x[:, a]
    v3 = (x[:, hs[2]] if len(hs) == 3 else x[:, b]) - x[:, a]
    return torch.sign((torch.cross(v1, v2, dim=-1) * v3).sum(-1))


def match_hydrogen_labels(peptide, x: Tensor) -> Tensor:
    r"""Relabel equivalent hydrogens of configurations ``x`` ``(B, n, 3)`` to the handedness of
    ``peptide.positions``.

    The hydrogens of a methyl, ammonium or methylene group are identical particles: exchanging
    two of them leaves the energy unchanged, so the Boltzmann distribution of labelled atoms has
    two mirror-labelled copies of every such group, related by a label swap and separated by an
    umbrella inversion that MD crosses only at high temperature. The transferable flow models
    the copy of the peptide's own structure (its stiff improper torsions are centred there), so
    training frames are brought to it by swapping the last two hydrogens of each group whose
    triple product has the other sign. Energies, and every observable that does not tell
    identical atoms apart, are unchanged; the evidence of the copy modelled is the full one
    minus :math:`\log 2` per group.
    """
    x = torch.as_tensor(x)
    ref = peptide.positions.to(x.dtype)[None]
    out = x.clone()
    for a, b, hs in _equivalent_hydrogen_groups(peptide):
        flip = _handedness(x, a, b, hs) != _handedness(ref, a, b, hs)
        i, j = hs[-2], hs[-1]
        out[flip, i], out[flip, j] = x[flip, j], x[flip, i]
    return out


def tokenize(peptide, zmatrix=None, free_only: bool = False, symmetric_rotors: bool = False) -> PeptideTokens:
    r"""The tokens of ``peptide`` (a :class:`~mcsample.systems.peptides.Peptide`): one per atom
    placed from earlier ones, carrying its bond, angle and torsion (see :class:`PeptideTokens`).

    Features per token (integers; 0 is padding): the chain length and the placement position;
    for the placed atom and its reference atoms a, b, c: hashed element, hashed PDB atom name,
    hashed residue name, residue index + 1. Standardization: the bond :math:`(i,a)` by
    :math:`r_0` and :math:`\sqrt{kT/k_r}` of the force field's HarmonicBondForce, the angle
    :math:`(i,a,b)` by :math:`\theta_0` and :math:`\sqrt{kT/k_\theta}` of its HarmonicAngleForce
    (a term the force field lacks falls back to 0.12 ± 0.01 nm or 1.91 ± 0.1 rad); a stiff
    torsion (:func:`torsion_stiffness`) by its minimum :math:`\varphi_0` and width,
    :math:`u = \mathrm{wrap}(\varphi - \varphi_0)/\sigma`; the other torsions stay on the circle.
    With ``free_only`` the free torsions are the only valid cells (the flow of a
    ``TransferableConfig(cells="free")``, whose proposal completes the rest with
    :class:`~mcsample.flows.harmonic.HarmonicCompletion`). With ``symmetric_rotors`` each free
    torsion carries the order of its rotational symmetry (:func:`rotor_symmetry`) in ``period``.
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
    circular = torch.zeros(P, 3, dtype=torch.bool)
    phi0, sigma, stiff = torsion_stiffness(peptide, z)
    period = torch.ones(P, 3)
    symmetry = rotor_symmetry(peptide, z) if symmetric_rotors else torch.ones(n - 3)
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
            if bool(stiff[p - 3]):
                loc[t, 2], scale[t, 2] = float(phi0[p - 3]), float(sigma[p - 3])
            else:
                circular[t, 2] = True
                period[t, 2] = symmetry[p - 3]
    if free_only:
        valid = circular.clone()
    flat = torch.cat([torch.arange(0, P) * 3, torch.arange(1, P) * 3 + 1, torch.arange(2, P) * 3 + 2])
    return PeptideTokens(
        torch.tensor(feats, dtype=torch.long),
        loc,
        scale,
        valid,
        torch.tensor(positions, dtype=torch.long),
        flat,
        circular,
        period,
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
    #: ``"all"``: the flow models every internal coordinate; ``"free"``: only the free torsions,
    #: and :meth:`TransferableFlow.proposal` draws the stiff coordinates from their harmonic
    #: conditional (:class:`~mcsample.flows.harmonic.HarmonicCompletion`)
    cells: str = "all"
    #: model each free torsion's density as :math:`2\pi/k`-periodic, ``k`` its rotational
    #: symmetry (:func:`rotor_symmetry`): :math:`q(\theta) = p(k\theta)`, draws spread evenly
    #: over the ``k`` wells
    symmetric_rotors: bool = True

    def __post_init__(self):
        if self.cells not in ("all", "free"):
            raise ValueError(f"cells must be 'all' or 'free', got {self.cells!r}")


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
        # bond, angle: (value, transformed); torsion: (cos, sin, standardized if stiff, stiff, transformed)
        self.values = nn.Linear(9, w)
        layer = nn.TransformerEncoderLayer(w, cfg.heads, 2 * w, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.bins = cfg.bins
        self.out = nn.Linear(w, 3 * (3 * cfg.bins - 1))
        nn.init.zeros_(self.out.weight)  # identity at initialization
        nn.init.zeros_(self.out.bias)

    def forward(
        self, chem: Tensor, u: Tensor, valid: Tensor, circular: Tensor, transformed: Tensor, present: Tensor
    ) -> Tensor:
        vis = (valid & ~transformed).to(u.dtype)
        tr = transformed.to(u.dtype)
        free = circular[..., 2].to(u.dtype)
        stiff = valid[..., 2].to(u.dtype) - free
        v = torch.stack(
            [
                u[..., 0] * vis[..., 0],
                tr[..., 0],
                u[..., 1] * vis[..., 1],
                tr[..., 1],
                torch.cos(u[..., 2]) * vis[..., 2] * free,
                torch.sin(u[..., 2]) * vis[..., 2] * free,
                u[..., 2].clamp(-5, 5) * vis[..., 2] * stiff,
                stiff,
                tr[..., 2],
            ],
            -1,
        )
        h = self.encoder(chem + self.values(v), src_key_padding_mask=~present)
        return self.out(h).unflatten(-1, (3, 3 * self.bins - 1))


def _partition(valid: Tensor, position: Tensor, layer: int, free_only: bool = False) -> Tensor:
    """Cells that layer ``layer`` transforms: torsions, then bonds and angles, then the atoms at
    even placement positions, then odd ones (period 4: every cell is transformed every 4 layers).
    With ``free_only`` (torsions only) the layers split the tokens by bit ``(layer // 2) % 3`` of
    the placement position, the two halves in turn."""
    if free_only:
        bit = (layer // 2) % 3
        return ((position >> bit) % 2 == layer % 2)[..., None].expand_as(valid) & valid
    k = layer % 4
    cells = torch.zeros_like(valid)
    if k == 0:
        cells[..., 2] = True
    elif k == 1:
        cells[..., :2] = True
    else:
        cells = (position % 2 == k - 2)[..., None].expand_as(valid)
    return cells & valid


def _kinds(b: dict) -> tuple[Tensor, Tensor]:
    """``(circular, real)`` cell masks: free torsions, and the standardized cells (bonds,
    angles, stiff torsions), padding in neither."""
    circular = b["circular"] & b["valid"]
    return circular, b["valid"] & ~circular


def _stiff_mask(b: dict) -> Tensor:
    r"""Stiff torsions: standardized, and wrapped onto :math:`(-\pi/\sigma, \pi/\sigma]`."""
    torsion = torch.zeros_like(b["valid"])
    torsion[..., 2] = True
    return torsion & b["valid"] & ~b["circular"]


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
            "circular": torch.stack([pad(t.circular, False) for t in tokens]),
            "period": torch.stack([pad(t.period, 1.0) for t in tokens]),
        }

    def _to(self, b: dict) -> dict:
        w = self.embed.length.weight
        return {k: v.to(device=w.device, dtype=w.dtype if v.is_floating_point() else v.dtype) for k, v in b.items()}

    def _layer(self, u: Tensor, b: dict, chem: Tensor, layer: int, inverse: bool) -> tuple[Tensor, Tensor]:
        valid = b["valid"]
        circular, _ = _kinds(b)
        t = _partition(valid, b["position"], layer, self.architecture.cells == "free")
        p = self.conditioners[layer](chem, u, valid, circular, t, b["position"] > 0)
        K = self.architecture.bins
        w, h, d = p[..., :K], p[..., K : 2 * K], p[..., 2 * K :]
        # one spline on [-B, B] for every cell: free torsions are shifted by π (the circular spline
        # of Rezende et al. 2020) and scaled by B/π in and π/B out, which leaves log h' unchanged;
        # a stiff torsion's domain (-π/σ, π/σ] contains [-B, B] (σ < π/B), so it maps onto itself
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
        circular, real = _kinds(b)
        d = z - b["loc"]
        d = torch.where(_stiff_mask(b), wrap_angle(d), d)
        u = torch.where(circular, wrap_angle(z * b["period"]), d / b["scale"])
        u = torch.where(valid, u, torch.zeros_like(u))
        return u, (torch.log(b["period"]) * circular - torch.log(b["scale"]) * real).flatten(1).sum(-1)

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
        r"""Standard normal on the bonds and angles, the normal truncated to
        :math:`(-\pi/\sigma, \pi/\sigma]` on stiff torsions, uniform on free torsions (and on
        the ``k`` wells of a symmetric rotor, :meth:`spread_rotors`), nothing on padding."""
        circular, real = _kinds(b)
        stiff = _stiff_mask(b)
        a = math.pi / b["scale"]
        log_mass = torch.log(torch.special.ndtr(a) - torch.special.ndtr(-a))
        real, circ = real.flatten(1).to(u.dtype), circular.flatten(1).to(u.dtype)
        uf = u.flatten(1)
        return (
            (-0.5 * uf**2 * real).sum(-1)
            - 0.5 * _LOG_2PI * real.sum(-1)
            - _LOG_2PI * circ.sum(-1)
            - (torch.log(b["period"]).flatten(1) * circ).sum(-1)
            - (log_mass * stiff).flatten(1).sum(-1)
        )

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
        circular, real = _kinds(b)
        ladj = ladj + (torch.log(b["period"]) * circular - torch.log(b["scale"]) * real).flatten(1).sum(-1)
        z = u * b["scale"] + b["loc"]
        z = torch.where(_stiff_mask(b), wrap_angle(z), z)
        z = torch.where(circular, wrap_angle(u) / b["period"], z)  # the principal well of a rotor
        return torch.where(valid, z, torch.zeros_like(z)), ladj

    def spread_rotors(self, z: Tensor, b: dict, generator: torch.Generator | None = None) -> Tensor:
        r"""Turn each symmetric rotor of cells ``z`` (from :meth:`invert`) into one of its ``k``
        wells at random, :math:`\theta \to \theta + 2\pi m/k`, :math:`m \sim U\{0..k-1\}`: the
        draws of the density :math:`q(\theta) = p(k\theta)` (:func:`rotor_symmetry`)."""
        b = self._to(b)
        period = b["period"]
        if not bool((period > 1).any()):
            return z
        m = torch.floor(torch.rand(z.shape, generator=generator, device=z.device, dtype=z.dtype) * period)
        return torch.where(period > 1, wrap_angle(z + 2 * math.pi * m / period), z)

    def sample_base(self, b: dict, generator: torch.Generator | None = None) -> Tensor:
        b = self._to(b)
        loc = b["loc"]
        normal = torch.randn(loc.shape, generator=generator, device=loc.device, dtype=loc.dtype)
        # the truncated normal of stiff torsions by rejection (its bound is beyond 6 sigma)
        outside = _stiff_mask(b) & (normal.abs() > math.pi / b["scale"])
        while bool(outside.any()):
            redraw = torch.randn(loc.shape, generator=generator, device=loc.device, dtype=loc.dtype)
            normal = torch.where(outside, redraw, normal)
            outside = outside & (normal.abs() > math.pi / b["scale"])
        unif = (torch.rand(loc.shape, generator=generator, device=loc.device, dtype=loc.dtype) * 2 - 1) * math.pi
        u = torch.where(_kinds(b)[0], unif, normal)
        return torch.where(b["valid"], u, torch.zeros_like(u))

    # -- one peptide ------------------------------------------------------------------------
    def tokenize(self, peptide, zmatrix=None) -> PeptideTokens:
        """:func:`tokenize` with the cells this flow models."""
        cfg = self.architecture
        return tokenize(peptide, zmatrix, free_only=cfg.cells == "free", symmetric_rotors=cfg.symmetric_rotors)

    def bind(self, peptide, tokens: PeptideTokens | None = None, hessian: str = "reference") -> BoundFlow:
        """This flow restricted to ``peptide``'s internal coordinates (the interface of
        :class:`~mcsample.flows.coupling.CouplingSplineFlow`); with ``cells="free"`` the stiff
        coordinates are completed by :class:`~mcsample.flows.harmonic.HarmonicCompletion`."""
        from mcsample.systems.coordinates import zmatrix_from_topology

        zmatrix = zmatrix_from_topology(peptide.topology)
        tokens = self.tokenize(peptide, zmatrix) if tokens is None else tokens
        bound = BoundFlow(self, tokens)
        if self.architecture.cells == "all":
            return bound
        from mcsample.flows.harmonic import HarmonicCompletion

        free = tokens.from_cells((tokens.circular & tokens.valid)[None].to(torch.float64))[0].bool()
        return CompletedFlow(bound, HarmonicCompletion(peptide, zmatrix, free, hessian=hessian))

    def proposal(self, peptide, tokens: PeptideTokens | None = None, hessian: str = "reference"):
        """A :class:`~mcsample.flows.boltzmann_generator.BoltzmannGenerator` for ``peptide``: a
        Proposal over its ``(B, n, 3)`` Cartesian coordinates (nm, its own atom order) with an
        exact ``log_prob``, so ``mc.importance_sample(peptide, proposal, n)`` and ``mc.smc``
        apply unchanged. ``tokens`` (from :meth:`tokenize`) saves the torsion scan when known;
        ``hessian`` chooses the completion's covariance (:class:`~mcsample.flows.harmonic.HarmonicCompletion`)."""
        from mcsample.flows.boltzmann_generator import BoltzmannGenerator
        from mcsample.systems.coordinates import zmatrix_from_topology

        return BoltzmannGenerator(
            zmatrix_from_topology(peptide.topology), self.bind(peptide, tokens, hessian), peptide.identity()
        )

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
        # checkpoints from before rotor symmetry existed were trained without it
        flow = cls(TransferableConfig(**{"symmetric_rotors": False, **config["architecture"]}))
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

    #: peptides drawn per call of :meth:`rsample_and_log_prob` (fewer, larger energy batches)
    peptides_per_draw: int = 8

    def log_prob(self, rows: Tensor) -> Tensor:
        ids = rows[:, 0].round().long().cpu()
        b = {k: v[ids] for k, v in self._table.items()}
        P = b["valid"].shape[1]
        return self.flow.log_prob(rows[:, 1 : 1 + 3 * P].reshape(rows.shape[0], P, 3), b)

    def rsample_and_log_prob(self, shape=(1,), generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Reparameterized rows ``[peptide id, cells]`` and their log-densities: ``n`` draws
        spread evenly over :attr:`peptides_per_draw` peptides chosen at random (the proposal of
        reverse-KL training over many peptides, with :class:`PackedTarget`)."""
        n = _num(shape)
        k = min(self.peptides_per_draw, len(self.tokens), n)
        chosen = torch.randperm(len(self.tokens), generator=generator)[:k]
        ids = chosen[torch.arange(n) % k]
        b = self.flow._to({key: v[ids] for key, v in self._table.items()})
        u = self.flow.sample_base(b, generator)
        z, ladj = self.flow.invert(u, b)
        z = self.flow.spread_rotors(z, b, generator)
        rows = torch.cat([ids[:, None].to(device=z.device, dtype=z.dtype), z.flatten(1)], 1)
        return rows, self.flow.base_log_prob(u, b) + ladj

    def sample_and_log_prob(self, shape=(1,), generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return self.rsample_and_log_prob(shape, generator)


class PackedTarget:
    r"""The Boltzmann densities of several peptides over packed rows ``[peptide id, cells]`` (see
    :func:`pack`): row ``j`` of peptide ``i`` gets the density of its internal coordinates with
    the rigid body fixed,

    .. math:: \log\pi_i(z) = -U_i(x(z))/kT + \log|\det \partial x/\partial z| ,

    :math:`-\infty` outside the coordinates' domain. ``regularized`` soft-caps the energy
    (:meth:`~mcsample.systems.peptides.Peptide.regularized_log_prob`) for training losses: the
    target of reverse-KL training of a :class:`PackedFlow` over many peptides (Boltzmann
    generators' energy training, Noé et al. 2019, over a set of sequences). One energy call per
    peptide in the batch."""

    def __init__(self, peptides: list, tokens: list[PeptideTokens], regularized: bool = True):
        from mcsample.systems.coordinates import InternalCoordinateTarget, zmatrix_from_topology

        if len(peptides) != len(tokens):
            raise ValueError(f"{len(peptides)} peptides for {len(tokens)} token sets")
        self.peptides, self.tokens, self.regularized = list(peptides), list(tokens), bool(regularized)
        self.targets = [
            InternalCoordinateTarget(p, zmatrix_from_topology(p.topology), fix_rigid=True) for p in self.peptides
        ]

    def __call__(self, rows: Tensor) -> Tensor:
        ids = rows[:, 0].round().long()
        out = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
        for i in torch.unique(ids).tolist():
            sel = torch.nonzero(ids == i)[:, 0]
            t = self.tokens[i]
            z = t.from_cells(rows[sel, 1 : 1 + 3 * t.num_tokens].reshape(-1, t.num_tokens, 3)).to(torch.float64)
            target = self.targets[i]
            x, logdet = target.to_cartesian(z)
            pep = self.peptides[i]
            lp = (pep.regularized_log_prob(x) if self.regularized else pep.log_prob(x)).to(torch.float64) + logdet
            lp = torch.where(target.in_domain(z), lp, torch.full_like(lp, -math.inf))
            out = out.index_put((sel,), lp)
        return out


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
        z = self.flow.spread_rotors(z, b, generator)
        return self.tokens.from_cells(z), self.flow.base_log_prob(u, b) + ladj

    def sample_and_log_prob(self, shape=(1,), generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return self.rsample_and_log_prob(shape, generator)

    def sample(self, shape=(1,), generator: torch.Generator | None = None) -> Tensor:
        return self.sample_and_log_prob(shape, generator)[0]


class CompletedFlow(nn.Module):
    r"""A flow over a peptide's free torsions (a :class:`BoundFlow` of a ``cells="free"``
    :class:`TransferableFlow`) times the harmonic conditional of the stiff coordinates,
    :math:`q(z) = q_\theta(s)\,\mathcal N(h;\mu(s),\Sigma)` (:mod:`mcsample.flows.harmonic`),
    with the interface of :class:`BoundFlow` over the flat ``(B, 3n - 6)`` coordinates. The
    gradient of :meth:`log_prob` treats :math:`\mu(s)` as fixed (a deterministic drift for MALA,
    whose Metropolis test uses the exact density)."""

    def __init__(self, bound: BoundFlow, completion):
        super().__init__()
        self.bound = bound
        self.completion = completion
        self.config = bound.config

    @property
    def tokens(self) -> PeptideTokens:
        return self.bound.tokens

    @property
    def event_shape(self) -> torch.Size:
        return self.bound.event_shape

    def log_prob(self, z: Tensor) -> Tensor:
        return self.bound.log_prob(z).to(torch.float64) + self.completion.log_prob(z)

    def rsample_and_log_prob(self, shape=(1,), generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        s, lq = self.bound.rsample_and_log_prob(shape, generator)
        z, lh = self.completion.complete(s, generator)  # the free torsions keep their graph
        return z, lq.to(torch.float64) + lh

    def sample_and_log_prob(self, shape=(1,), generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return self.rsample_and_log_prob(shape, generator)

    def sample(self, shape=(1,), generator: torch.Generator | None = None) -> Tensor:
        return self.sample_and_log_prob(shape, generator)[0]
