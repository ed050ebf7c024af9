r"""Internal coordinates: a Z-matrix from the topology and the exact Cartesian ↔ internal bijection.

A molecule of :math:`n` atoms has :math:`3n` Cartesian coordinates. A *Z-matrix* lists the
atoms in a placement order; every atom after the third is placed from three earlier atoms
``(a, b, c)`` by a bond length :math:`r = |x_i - x_a|`, a bond angle
:math:`\theta = \angle(x_i, x_a, x_b) \in (0, \pi)` and a torsion
:math:`\varphi = \mathrm{dihedral}(x_i, x_a, x_b, x_c) \in (-\pi, \pi]` (IUPAC sign, as
``mdtraj.compute_dihedrals``). Placing atom :math:`i` this way is spherical coordinates around
:math:`x_a` with the polar axis along :math:`x_b - x_a`, so its Jacobian is
:math:`r^2 \sin\theta`, and because each atom depends only on earlier ones the Jacobian of the
whole map is block-triangular:

.. math::  \log\left|\det \frac{\partial x}{\partial z}\right|
           = \log(r_1^2 \sin p) + \sum_{k\ge 2} \log(r_k^2 \sin\theta_k).

The placement itself is NeRF (Parsons et al., "Practical conversion from torsion space to
Cartesian space for in silico protein synthesis", J. Comput. Chem. 2005), run over
*generations*: all atoms whose three references are already placed are placed at once.

**The six rigid-body coordinates** (the Boltzmann-generator treatment of Noé et al., Science
2019, with the orientation written out explicitly so that the map is a bijection with an
exact Jacobian). Let ``i0, i1, i2`` be the first three atoms of the Z-matrix (``i1`` bonded to
``i0``; ``i2`` bonded to ``a2 ∈ {i0, i1}``, ``b2`` the other one):

* ``z[0:3]`` — the position :math:`t = x_{i0}` (nm),
* ``z[3]``, ``z[4]`` — polar angle :math:`p \in (0,\pi)` and azimuth :math:`q \in (-\pi,\pi]` of
  the unit vector :math:`u` from ``i0`` to ``i1``: :math:`x_{i1} = t + r_1 (\sin p\cos q,
  \sin p \sin q, \cos p)`,
* ``z[5]`` — the spin :math:`\gamma \in (-\pi,\pi]` of ``i2`` about that axis, the dihedral
  :math:`(x_{i2}, x_{a2}, x_{b2}, x_{b2} + e_z)` measured against the laboratory z axis.

``(p, q, γ)`` are Euler-like angles of the frame of the first three atoms; the uniform
(Haar) distribution of orientations has density :math:`\sin p / (8\pi^2)` in them. The map is
a bijection except on the null set where :math:`u \parallel e_z` or an angle is 0 or π.

**Layout of z**, shape ``(..., 3n)``: ``[t (3), p, q, γ, bonds (n-1), angles (n-2),
torsions (n-3)]``; bond ``k`` belongs to the atom at placement position ``k+1``, angle ``k``
to position ``k+2`` and torsion ``k`` to position ``k+3``. :class:`InternalCoordinates`
exposes the slices and a mask of the circular entries (q, γ and the torsions).

**Dropping the rigid-body coordinates.** A force field's energy is invariant under rigid
motions, so under :math:`\exp(-U/kT)\,dx` the six rigid coordinates are independent of the
rest: uniform translation times Haar rotation. The exact marginal density of the
:math:`3n-6` internal coordinates is therefore

.. math:: \log \pi(z_{\rm int}) = -U(x(z))/kT + 2\log r_1 + \sum_{k\ge2} \log(r_k^2\sin\theta_k)
          + \text{const},

whatever values the rigid coordinates are fixed at (the constant is minus the log of
:math:`8\pi^2` times the translational volume). :class:`InternalCoordinateTarget` with
``fix_rigid=True`` is this density.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch
from torch import Tensor

from mcsample._optional import require

require("mdtraj", extra="peptides")

__all__ = [
    "zmatrix_from_topology",
    "InternalCoordinates",
    "InternalCoordinateTarget",
    "bond_lengths",
    "bond_angles",
    "dihedral_angles",
    "nerf_place",
]

# Backbone atoms per residue, in chain order. ACE/NME are the caps of the dipeptides.
_BACKBONE_NAMES = {
    "ACE": ("CH3", "C"),
    "NME": ("N", "C", "CH3"),
    "NHE": ("N",),
    "NH2": ("N",),
}
_STANDARD_BACKBONE = ("N", "CA", "C")


# --------------------------------------------------------------------------------------------
# geometry primitives (batched over any leading dims)


def bond_lengths(xi: Tensor, xa: Tensor) -> Tensor:
    """Distances :math:`|x_i - x_a|` over the last dimension."""
    return torch.linalg.vector_norm(xi - xa, dim=-1)


def bond_angles(xi: Tensor, xa: Tensor, xb: Tensor) -> Tensor:
    r"""Angles :math:`\angle(x_i, x_a, x_b) \in [0, \pi]` at :math:`x_a`, by atan2 (accurate near 0 and π)."""
    u = xi - xa
    v = xb - xa
    return torch.atan2(torch.linalg.vector_norm(torch.cross(u, v, dim=-1), dim=-1), (u * v).sum(-1))


def dihedral_angles(x0: Tensor, x1: Tensor, x2: Tensor, x3: Tensor) -> Tensor:
    r"""IUPAC dihedral of :math:`(x_0, x_1, x_2, x_3)` in :math:`(-\pi, \pi]`.

    :math:`\varphi = \mathrm{atan2}(|b_2|\, b_1\cdot(b_2\times b_3),\ (b_1\times b_2)\cdot(b_2\times b_3))`
    with :math:`b_k = x_k - x_{k-1}` (Blondel & Karplus, J. Comput. Chem. 1996); the same
    convention as ``mdtraj.compute_dihedrals``.
    """
    b1 = x1 - x0
    b2 = x2 - x1
    b3 = x3 - x2
    n1 = torch.cross(b1, b2, dim=-1)
    n2 = torch.cross(b2, b3, dim=-1)
    y = torch.linalg.vector_norm(b2, dim=-1) * (b1 * n2).sum(-1)
    x = (n1 * n2).sum(-1)
    return _wrap_pi(torch.atan2(y, x))


def _wrap_pi(angle: Tensor) -> Tensor:
    """Map angles to (-π, π]."""
    wrapped = torch.remainder(angle + math.pi, 2 * math.pi) - math.pi
    return torch.where(wrapped <= -math.pi, wrapped + 2 * math.pi, wrapped)


def _unit(v: Tensor) -> Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)


def nerf_place(xa: Tensor, xb: Tensor, xc: Tensor, r: Tensor, theta: Tensor, phi: Tensor) -> Tensor:
    r"""Place atoms from references by NeRF (Parsons et al. 2005).

    Returns :math:`x` with :math:`|x - x_a| = r`, :math:`\angle(x, x_a, x_b) = \theta` and
    :math:`\mathrm{dihedral}(x, x_a, x_b, x_c) = \varphi`. Shapes: positions ``(..., 3)``,
    internal coordinates ``(...)``.
    """
    bc = _unit(xa - xb)
    n = _unit(torch.cross(xb - xc, bc, dim=-1))
    m = torch.cross(n, bc, dim=-1)
    sin_t = torch.sin(theta)
    d0 = -r * torch.cos(theta)
    d1 = r * sin_t * torch.cos(phi)
    d2 = r * sin_t * torch.sin(phi)
    return xa + d0[..., None] * bc + d1[..., None] * m + d2[..., None] * n


# --------------------------------------------------------------------------------------------
# Z-matrix from a topology


def _as_mdtraj_topology(topology):
    import mdtraj as md

    if isinstance(topology, md.Topology):
        return topology
    try:
        import openmm.app as app

        if isinstance(topology, app.Topology):
            return md.Topology.from_openmm(topology)
    except ImportError:  # pragma: no cover - openmm is a dependency
        pass
    raise TypeError(f"expected an mdtraj or OpenMM Topology, got {type(topology).__name__}")


def _backbone_chain(top, neighbours: list[set[int]]) -> list[int]:
    """Backbone heavy atoms in chain order, kept only while each is bonded to the previous one."""
    chain: list[int] = []
    for residue in top.residues:
        names = _BACKBONE_NAMES.get(residue.name, _STANDARD_BACKBONE)
        by_name = {atom.name: atom.index for atom in residue.atoms}
        for name in names:
            if name not in by_name:
                continue
            idx = by_name[name]
            if chain and idx not in neighbours[chain[-1]]:
                return chain  # a chain break: the rest is placed breadth-first
            chain.append(idx)
    return chain


def bond_graph(topology) -> list[set[int]]:
    """Each atom's bonded neighbours (mdtraj or OpenMM topology), by atom index."""
    top = _as_mdtraj_topology(topology)
    neighbours: list[set[int]] = [set() for _ in range(top.n_atoms)]
    for bond in top.bonds:
        i, j = bond[0].index, bond[1].index
        neighbours[i].add(j)
        neighbours[j].add(i)
    return neighbours


def ring_of_bond(neighbours: list[set[int]], a: int, b: int) -> list[int] | None:
    """The smallest ring through the bond ``a-b`` (its atoms, from ``b`` back to ``a``), or
    ``None`` when the bond is in no ring: a breadth-first search from ``a`` to ``b`` that does
    not use the bond itself. ``neighbours`` as from :func:`bond_graph`."""
    prev, frontier = {a: None}, [a]
    while frontier and b not in prev:
        nxt = []
        for u in frontier:
            for v in neighbours[u]:
                if (u, v) != (a, b) and v not in prev:
                    prev[v] = u
                    nxt.append(v)
        frontier = nxt
    if b not in prev:
        return None
    ring, u = [], b
    while u is not None:
        ring.append(u)
        u = prev[u]
    return ring


def central_difference_hessian(grad, z: Tensor, idx: Tensor, h: float) -> Tensor:
    r"""Symmetrized Hessian ``(B, d, d)`` of a function over the entries ``idx`` of ``z``
    ``(B, D)``, by central differences of its gradient: :math:`H_{ij} \approx
    [\partial_j f(z + h e_i) - \partial_j f(z - h e_i)] / 2h`, from one call of
    ``grad`` (``(M, D) -> (M, D)``) on the :math:`2dB` shifted points."""
    B, D = z.shape
    d = len(idx)
    shift = torch.zeros(2 * d, D, dtype=z.dtype, device=z.device)
    k = torch.arange(d, device=z.device)
    shift[2 * k, idx] = h
    shift[2 * k + 1, idx] = -h
    g = grad((z[:, None, :] + shift).reshape(-1, D)).reshape(B, 2 * d, D)[:, :, idx]
    H = (g[:, 0::2] - g[:, 1::2]) / (2 * h)
    return 0.5 * (H + H.transpose(1, 2))


def zmatrix_from_topology(topology) -> np.ndarray:
    """Build a Z-matrix from a molecular topology (mdtraj or OpenMM).

    Returns an integer array of shape ``(n_atoms, 4)``: row ``k`` is ``[atom, a, b, c]`` for the
    atom at placement position ``k`` (``-1`` where the first three atoms have no reference).

    Order: the heavy-atom backbone (ACE CH3–C, then N–CA–C per residue, then NME N–C) first,
    then the other heavy atoms breadth-first from it (carbonyl O, side chains), then the
    hydrogens. References: ``a`` is the earliest placed bonded neighbour of the atom, ``b`` the
    earliest placed bonded neighbour of ``a``; ``c`` is an already placed sibling (another
    neighbour of ``a``), which makes the torsion an improper one that is nearly fixed (methyl
    hydrogens at ±120°, Cβ chirality, planar carbonyls), otherwise the earliest placed neighbour
    of ``b`` (a proper torsion: φ, ψ, ω, χ). This is the convention of the bgflow alanine
    dipeptide Z-matrix used by Boltzmann generators and FAB (Midgley et al. 2023).
    Molecules without a recognised backbone start from the heavy atom with most heavy
    neighbours. Raises ``ValueError`` for fewer than 3 atoms or a disconnected bond graph.
    """
    top = _as_mdtraj_topology(topology)
    n = top.n_atoms
    if n < 3:
        raise ValueError(f"a Z-matrix needs at least 3 atoms, the topology has {n}")
    neighbours = bond_graph(top)
    is_h = np.array([atom.element is not None and atom.element.symbol == "H" for atom in top.atoms], dtype=bool)
    # connectivity check
    seen = {0}
    queue = deque([0])
    while queue:
        for j in neighbours[queue.popleft()]:
            if j not in seen:
                seen.add(j)
                queue.append(j)
    if len(seen) != n:
        missing = [f"{a.residue.name}{a.residue.resSeq}:{a.name}" for a in top.atoms if a.index not in seen]
        raise ValueError(
            f"the bond graph is not connected: {len(missing)} atoms cannot be reached from atom 0 "
            f"(first: {missing[:5]}); a Z-matrix needs one molecule with all bonds in the topology"
        )

    order = _backbone_chain(top, neighbours)
    if len(order) < 3:
        heavy = [i for i in range(n) if not is_h[i]] or list(range(n))
        start = max(heavy, key=lambda i: (sum(1 for j in neighbours[i] if not is_h[j]), -i))
        order = [start]
    placed = set(order)
    # heavy atoms breadth-first from what is placed, then hydrogens
    for want_h in (False, True):
        k = 0
        while k < len(order):
            for j in sorted(neighbours[order[k]]):
                if j not in placed and bool(is_h[j]) == want_h:
                    order.append(j)
                    placed.add(j)
            k += 1
    # anything left (hydrogen bonded only to hydrogens, or nothing at all) is placed in BFS order
    k = 0
    while len(order) < n and k < len(order):
        for j in sorted(neighbours[order[k]]):
            if j not in placed:
                order.append(j)
                placed.add(j)
        k += 1
    if len(order) != n:  # pragma: no cover - impossible after the connectivity check
        raise ValueError("internal error: not every atom was placed")

    position = {atom: k for k, atom in enumerate(order)}
    rows = np.full((n, 4), -1, dtype=np.int64)
    for k, i in enumerate(order):
        rows[k, 0] = i
        if k == 0:
            continue
        earlier = [j for j in neighbours[i] if position[j] < k]
        if not earlier:
            raise ValueError(f"atom {i} at placement position {k} has no placed bonded neighbour")
        a = min(earlier, key=position.__getitem__)
        rows[k, 1] = a
        if k == 1:
            continue
        if k == 2:
            rows[k, 2] = order[1] if a == order[0] else order[0]
            continue
        cand_b = [j for j in neighbours[a] if position[j] < k and j != i]
        if not cand_b:  # pragma: no cover - a's own parent is always placed
            raise ValueError(f"atom {i}: its reference {a} has no other placed neighbour")
        b = min(cand_b, key=position.__getitem__)
        siblings = [j for j in neighbours[a] if position[j] < k and j not in (i, b)]
        if siblings:
            c = min(siblings, key=position.__getitem__)
        else:
            cand_c = [j for j in neighbours[b] if position[j] < k and j not in (i, a)]
            if cand_c:
                c = min(cand_c, key=position.__getitem__)
            else:  # b is a leaf so far: take the earliest placed atom that is neither a nor b
                c = next(j for j in order[:k] if j not in (a, b))
        rows[k, 2], rows[k, 3] = b, c
    return rows


def _check_zmatrix(zmatrix: np.ndarray) -> np.ndarray:
    z = np.asarray(zmatrix, dtype=np.int64)
    if z.ndim != 2 or z.shape[1] != 4 or z.shape[0] < 3:
        raise ValueError(f"a Z-matrix has shape (n_atoms >= 3, 4); got {z.shape}")
    n = z.shape[0]
    if sorted(z[:, 0].tolist()) != list(range(n)):
        raise ValueError("the first column of the Z-matrix must be a permutation of the atoms")
    position = np.empty(n, dtype=np.int64)
    position[z[:, 0]] = np.arange(n)
    for k in range(1, n):
        need = min(k, 3)
        refs = z[k, 1 : 1 + need]
        if np.any(refs < 0) or np.any(refs >= n):
            raise ValueError(f"Z-matrix row {k} (atom {z[k, 0]}) needs {need} references, got {refs}")
        if np.any(position[refs] >= k) or len(set(refs.tolist())) != need:
            raise ValueError(
                f"Z-matrix row {k} (atom {z[k, 0]}): references {refs.tolist()} must be distinct atoms placed earlier"
            )
    if z[2, 1] not in (z[0, 0], z[1, 0]) or z[2, 2] not in (z[0, 0], z[1, 0]) or z[1, 1] != z[0, 0]:
        raise ValueError("the first three Z-matrix rows must reference only the first two atoms")
    return z


# --------------------------------------------------------------------------------------------
# the bijection


class InternalCoordinates(torch.nn.Module):
    r"""Batched bijection Cartesian ``(B, n, 3)`` ↔ internal ``(B, 3n)`` with exact log|det J|.

    See the module docstring for the layout of ``z`` and the rigid-body convention.
    :meth:`to_cartesian` returns :math:`\log|\det \partial x/\partial z|`;
    :meth:`to_internal` returns ``z`` (its log-Jacobian is minus that of the inverse).
    Works in float32 and float64 on any device (``.to(device)`` moves the index buffers);
    differentiable by autograd in both directions.

    Args:
        zmatrix: ``(n, 4)`` integer array from :func:`zmatrix_from_topology` (or hand-made).
    """

    def __init__(self, zmatrix):
        super().__init__()
        z = _check_zmatrix(zmatrix)
        n = z.shape[0]
        self.n_atoms = n
        self.zmatrix = z
        self.register_buffer("_order", torch.as_tensor(z[:, 0]), persistent=False)
        self.register_buffer("_ref", torch.as_tensor(z[:, 1:]), persistent=False)
        # generation of each placement position (rigid block = 0)
        position = np.empty(n, dtype=np.int64)
        position[z[:, 0]] = np.arange(n)
        gen = np.zeros(n, dtype=np.int64)
        for k in range(3, n):
            gen[k] = 1 + max(gen[position[r]] for r in z[k, 1:])
        self.n_generations = int(gen.max()) if n > 3 else 0
        self._generations = []
        for g in range(1, self.n_generations + 1):
            ks = np.nonzero(gen == g)[0]
            name = f"_gen{g}"
            self.register_buffer(name, torch.as_tensor(ks), persistent=False)
            self._generations.append(name)

    # layout -------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Number of coordinates, ``3 * n_atoms``."""
        return 3 * self.n_atoms

    @property
    def rigid_slice(self) -> slice:
        """``z[..., 0:6]``: position of the first atom, then polar, azimuth, spin."""
        return slice(0, 6)

    @property
    def bond_slice(self) -> slice:
        """The ``n-1`` bond lengths (nm)."""
        return slice(6, 6 + self.n_atoms - 1)

    @property
    def angle_slice(self) -> slice:
        """The ``n-2`` bond angles in (0, π)."""
        return slice(6 + self.n_atoms - 1, 6 + 2 * self.n_atoms - 3)

    @property
    def torsion_slice(self) -> slice:
        """The ``n-3`` torsions in (-π, π]."""
        return slice(6 + 2 * self.n_atoms - 3, 3 * self.n_atoms)

    @property
    def circular_mask(self) -> Tensor:
        """Bool ``(3n,)``: True for the periodic coordinates (azimuth, spin, torsions)."""
        mask = torch.zeros(self.dim, dtype=torch.bool)
        mask[4] = mask[5] = True
        mask[self.torsion_slice] = True
        return mask

    def torsion_atoms(self) -> np.ndarray:
        """``(n-3, 4)`` atom indices ``(i, a, b, c)`` of each torsion, in z order."""
        return self.zmatrix[3:].copy()

    def torsion_index(self, quad) -> int:
        """Position in the torsion block of the torsion over atoms ``quad`` (either direction).

        E.g. ``ic.torsion_index(md.compute_phi(traj)[0][0])`` finds φ; the z column is
        ``ic.torsion_slice.start + index``. Raises ``KeyError`` if it is not a Z-matrix torsion.
        """
        q = [int(v) for v in quad]
        for k, row in enumerate(self.zmatrix[3:].tolist()):
            if row == q or row == q[::-1]:
                return k
        raise KeyError(f"atoms {q} are not a torsion of this Z-matrix")

    # Cartesian -> internal ------------------------------------------------------------------
    def to_internal(self, x: Tensor) -> Tensor:
        """Internal coordinates ``(B, 3n)`` of Cartesian ``x`` of shape ``(B, n, 3)`` (nm)."""
        if x.dim() != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"expected positions of shape (B, {self.n_atoms}, 3); got {tuple(x.shape)}")
        order, ref = self._order, self._ref
        xi = x[:, order]  # (B, n, 3) in placement order
        xa = x[:, ref[1:, 0]]
        bonds = bond_lengths(xi[:, 1:], xa)
        angles = bond_angles(xi[:, 2:], xa[:, 1:], x[:, ref[2:, 1]])
        torsions = dihedral_angles(xi[:, 3:], xa[:, 2:], x[:, ref[3:, 1]], x[:, ref[3:, 2]])
        t = xi[:, 0]
        u = xi[:, 1] - t
        polar = torch.atan2(torch.linalg.vector_norm(u[:, :2], dim=-1), u[:, 2])
        azimuth = _wrap_pi(torch.atan2(u[:, 1], u[:, 0]))
        # python ints, not 0-d tensors: indexing with a tensor scalar would sync with the device
        xb2 = x[:, int(self.zmatrix[2, 2])]
        spin = dihedral_angles(xi[:, 2], x[:, int(self.zmatrix[2, 1])], xb2, xb2 + self._ez(x))
        return torch.cat([t, polar[:, None], azimuth[:, None], spin[:, None], bonds, angles, torsions], dim=-1)

    @staticmethod
    def _ez(x: Tensor) -> Tensor:
        return torch.tensor([0.0, 0.0, 1.0], dtype=x.dtype, device=x.device)

    # internal -> Cartesian ------------------------------------------------------------------
    def log_det_jacobian(self, z: Tensor, include_rigid: bool = True) -> Tensor:
        r""":math:`\log|\det\partial x/\partial z| = \log(r_1^2\sin p) + \sum_{k\ge2}\log(r_k^2 \sin\theta_k)`.

        With ``include_rigid=False`` the :math:`\log\sin p` of the orientation is left out (the
        density of the internal coordinates alone; see the module docstring).
        """
        bonds = z[:, self.bond_slice]
        angles = z[:, self.angle_slice]
        out = 2 * torch.log(bonds.abs()).sum(-1) + torch.log(torch.sin(angles).abs()).sum(-1)
        if include_rigid:
            out = out + torch.log(torch.sin(z[:, 3]).abs())
        return out

    def in_domain(self, z: Tensor) -> Tensor:
        """Bool ``(B,)``: bonds > 0, angles and polar angle in (0, π) (where the map is a bijection)."""
        bonds = z[:, self.bond_slice]
        angles = torch.cat([z[:, 3:4], z[:, self.angle_slice]], dim=-1)
        return (bonds > 0).all(-1) & (angles > 0).all(-1) & (angles < math.pi).all(-1)

    def to_cartesian(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Cartesian ``(B, n, 3)`` from internal ``z`` ``(B, 3n)``, and ``log|det ∂x/∂z|`` ``(B,)``.

        Torsions, azimuth and spin may lie outside (-π, π]: the map is 2π-periodic in them.
        """
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"expected internal coordinates of shape (B, {self.dim}); got {tuple(z.shape)}")
        n = self.n_atoms
        order, ref = self._order, self._ref
        B = z.shape[0]
        bonds = z[:, self.bond_slice]
        angles = z[:, self.angle_slice]
        torsions = z[:, self.torsion_slice]
        t = z[:, 0:3]
        polar, azimuth, spin = z[:, 3], z[:, 4], z[:, 5]
        sp = torch.sin(polar)
        u = torch.stack([sp * torch.cos(azimuth), sp * torch.sin(azimuth), torch.cos(polar)], dim=-1)
        x1 = t + bonds[:, 0:1] * u
        first = torch.stack([t, x1], dim=1)  # positions of order[0], order[1]
        # third atom: parent a2 is order[0] or order[1]
        a_is_first = bool(self.zmatrix[2, 1] == self.zmatrix[0, 0])
        xa = first[:, 0] if a_is_first else first[:, 1]
        xb = first[:, 1] if a_is_first else first[:, 0]
        x2 = nerf_place(xa, xb, xb + self._ez(z), bonds[:, 1], angles[:, 0], spin)
        x = z.new_zeros(B, n, 3)
        x = x.index_copy(1, order[:3], torch.stack([t, x1, x2], dim=1))
        for name in self._generations:
            ks = getattr(self, name)
            atoms = order[ks]
            r = ref[ks]
            xr = x[:, r.T.reshape(-1)].unflatten(1, (3, -1))  # one gather for all three references
            new = nerf_place(xr[:, 0], xr[:, 1], xr[:, 2], bonds[:, ks - 1], angles[:, ks - 2], torsions[:, ks - 3])
            x = x.index_copy(1, atoms, new)
        return x, self.log_det_jacobian(z)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Same as :meth:`to_cartesian`."""
        return self.to_cartesian(z)

    @classmethod
    def from_topology(cls, topology) -> InternalCoordinates:
        """Build with :func:`zmatrix_from_topology`."""
        return cls(zmatrix_from_topology(topology))


# --------------------------------------------------------------------------------------------
# the Boltzmann density over internal coordinates


class InternalCoordinateTarget:
    r"""The Boltzmann density of a peptide over internal coordinates, Jacobian included.

    .. math:: \log\pi(z) = -U(x(z))/kT + \log|\det \partial x/\partial z|

    so that a proposal (flow) over ``z`` gives exact importance weights for the Cartesian
    Boltzmann distribution (Noé et al., "Boltzmann generators", Science 2019). Outside the
    domain of the bijection (a bond ≤ 0, an angle outside (0, π)) the density is ``-inf``; it
    is 2π-periodic in the torsions (and azimuth/spin), so MCMC may step across ±π.

    With ``fix_rigid=True`` the six rigid-body coordinates are held at those of ``reference``
    (default: the peptide's minimized positions) and ``z`` holds only the ``3n - 6`` internal
    coordinates ``[bonds, angles, torsions]``; ``log_prob`` is then their exact marginal
    density :math:`-U/kT + 2\log r_1 + \sum_{k\ge 2}\log(r_k^2\sin\theta_k)` up to a constant
    (rigid motions leave U unchanged; module docstring).

    Args:
        peptide: anything with ``topology``, ``positions`` ``(n, 3)`` and ``log_prob(x)`` for
            ``x`` of shape ``(B, n, 3)`` in nm (a :class:`~mcsample.systems.peptides.Peptide`).
        zmatrix: optional ``(n, 4)`` Z-matrix (default :func:`zmatrix_from_topology`).
        fix_rigid: drop the six rigid-body coordinates (see above).
        reference: positions ``(n, 3)`` whose rigid-body coordinates are used when fixed.
    """

    def __init__(self, peptide, zmatrix=None, fix_rigid: bool = False, reference=None):
        self.peptide = peptide
        if zmatrix is None:
            zmatrix = zmatrix_from_topology(peptide.topology)
        self.transform = InternalCoordinates(zmatrix)
        self.fix_rigid = bool(fix_rigid)
        ref = peptide.positions if reference is None else reference
        ref = torch.as_tensor(np.asarray(ref) if not isinstance(ref, Tensor) else ref, dtype=torch.float64)
        if ref.shape != (self.transform.n_atoms, 3):
            raise ValueError(
                f"reference positions must have shape ({self.transform.n_atoms}, 3); got {tuple(ref.shape)}"
            )
        self.reference_z = self.transform.to_internal(ref[None])[0]
        d = self.transform.dim - (6 if self.fix_rigid else 0)
        self.event_shape = torch.Size([d])

    @property
    def dim(self) -> int:
        """Length of ``z``: ``3n`` or ``3n - 6`` with ``fix_rigid``."""
        return self.event_shape[0]

    @property
    def kT(self):
        """:math:`k_B T` of the peptide in kJ/mol."""
        return self.peptide.kT

    @property
    def circular_mask(self) -> Tensor:
        """Bool ``(dim,)``: the periodic entries of ``z``."""
        mask = self.transform.circular_mask
        return mask[6:] if self.fix_rigid else mask

    def _full(self, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"expected z of shape (B, {self.dim}); got {tuple(z.shape)}")
        if not self.fix_rigid:
            return z
        rigid = self.reference_z[:6].to(dtype=z.dtype, device=z.device).expand(z.shape[0], 6)
        return torch.cat([rigid, z], dim=-1)

    def to_cartesian(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Cartesian positions ``(B, n, 3)`` and the log-Jacobian used by :meth:`log_prob`."""
        full = self._full(z)
        x, _ = self.transform.to_cartesian(full)
        return x, self.transform.log_det_jacobian(full, include_rigid=not self.fix_rigid)

    def to_internal(self, x: Tensor) -> Tensor:
        """``z`` of Cartesian ``x`` ``(B, n, 3)`` (rigid part dropped when ``fix_rigid``)."""
        z = self.transform.to_internal(x)
        return z[:, 6:] if self.fix_rigid else z

    def in_domain(self, z: Tensor) -> Tensor:
        """Bool ``(B,)``: ``z`` lies where the bijection holds."""
        return self.transform.in_domain(self._full(z))

    def log_prob(self, z: Tensor) -> Tensor:
        r""":math:`-U(x(z))/kT + \log|\det J(z)|` (``-inf`` outside the domain), shape ``(B,)``."""
        x, logdet = self.to_cartesian(z)
        lp = self.peptide.log_prob(x)
        lp = lp.to(logdet.dtype) + logdet
        return torch.where(self.in_domain(z), lp, torch.full_like(lp, -math.inf))

    def energy(self, z: Tensor) -> Tensor:
        """Potential energy U(x(z)) in kJ/mol (``log_prob`` without the Jacobian is ``-U/kT``)."""
        x, _ = self.to_cartesian(z)
        return self.peptide.energy(x)
