r"""Molecular conformations in torsion space: a Boltzmann target over rotatable torsions.

A drug-like molecule's flexible degrees of freedom at room temperature are, to a good
approximation, its torsions about rotatable single bonds; bond lengths and angles are stiff.
:class:`TorsionTarget` freezes everything but those torsions at an MMFF-minimized ETKDG
conformer and defines the density over the torsion vector :math:`\theta\in(-\pi,\pi]^T`

.. math::  \log p(\theta) = -\,U_\mathrm{MMFF}\big(x(\theta)\big) / k_B T + \text{const},

the torsion-space model of VonMisesNet (Swanson, Williams & Jonas, ICML 2023), which also
builds conformers from one ETKDG conformer with its torsions set. (The Jacobian of the map
from torsions to Cartesians is omitted, as there: the density is the Boltzmann density of the
rigid-rotor model, not a marginal of the fully flexible molecule.)

Choices, each deliberate:

* **Which torsions.** RDKit's *strict* rotatable-bond definition (the SMARTS of
  ``Lipinski.cpp`` behind ``rdMolDescriptors.CalcNumRotatableBonds``, strict being the
  default): acyclic single bonds between two non-terminal heavy atoms, excluding bonds next to
  triple bonds, amide/ester/thioamide C(=X)-N/O/S bonds (planar, partial double-bond character),
  and rotors of CF3, CCl3, CBr3 and t-butyl. The pattern is matched on the heavy-atom graph, so
  ``len(target.torsions) == CalcNumRotatableBonds(mol)``. **Ring bonds** are never torsions:
  ring conformations (chair, envelope, axial/equatorial substituents) stay as in the reference
  conformer. **Terminal rotors whose rotation moves only hydrogens** (methyl, OH, NH2, SH) are
  excluded by default, their hydrogens frozen at the MMFF minimum: they add symmetric or nearly
  free dimensions that matter little for heavy-atom geometry and would double the dimension
  of many targets. ``hydrogen_rotors=True`` adds them (dihedral to the lowest-index hydrogen).
* **Dihedral atoms.** For a torsion bond j-k, i is the lowest-index heavy neighbour of j
  (other than k) and l that of k; the bond is oriented so that the k side is the smaller one,
  which is the side that moves (as in RDKit's ``SetDihedralRad``).
* **x(θ).** Rotating about a bridge bond moves the four atoms of any *other* torsion rigidly,
  so the torsions are independent coordinates: :meth:`TorsionTarget.positions` sets them one
  after another by Rodrigues rotations of each moving side by :math:`\theta_t - \theta^0_t`,
  vectorized over the batch in torch (differentiable). It reproduces
  ``rdMolTransforms.SetDihedralRad`` coordinates to round-off (see the tests).
* **Energy.** Two backends agree to 1e-8 kcal/mol (tests: 1e-4): ``"rdkit"`` calls RDKit's
  C++ MMFF (``ForceField.CalcEnergy`` on a flat coordinate list, one conformer at a time, the
  force field built once), with gradients from ``CalcGrad`` through a custom autograd function;
  ``"torch"`` evaluates only the MMFF terms that change with torsions — torsion terms about
  rotatable bonds, buffered 14-7 van der Waals and buffered Coulomb (1-4 scaled by 0.75)
  between atoms in different rigid fragments — batched in torch, plus the constant rest taken
  once from RDKit at the reference conformer; it runs on any device, gradients by autograd.
  Profiled on a 2-core CPU (44 atoms, 742 varying pairs, batch 1024): RDKit ~23 us per
  conformer, the torch terms ~55 us (the pair gather dominates), x(theta) ~6 us. So
  ``backend="auto"`` (default) uses RDKit for CPU tensors and torch for GPU tensors.
  MALA and HMC work on either backend.
* **Units.** MMFF energies are kcal/mol; they are converted to kJ/mol once, in
  :meth:`TorsionTarget.energy` (factor :data:`KCAL_TO_KJ` = 4.184), and
  ``log_prob = -U / (k_B T)`` with :data:`K_B` in kJ/(mol K). Positions are in ångström, as
  RDKit keeps them (this module's one exception to the project's nm).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mcsample._optional import require

require("rdkit", extra="molecules")

__all__ = [
    "KCAL_TO_KJ",
    "K_B",
    "MoleculeError",
    "STRICT_ROTATABLE_SMARTS",
    "check_molecule",
    "rotatable_torsions",
    "reference_conformer",
    "dihedral",
    "rigid_fragments",
    "TorsionGeometry",
    "MMFFTorsionEnergy",
    "TorsionTarget",
]

KCAL_TO_KJ = 4.184
"""kcal/mol -> kJ/mol (thermochemical calorie)."""
K_B = 0.00831446261815324
"""Boltzmann constant in kJ/(mol K) (CODATA 2018, = R / 1000)."""

STRICT_ROTATABLE_SMARTS = (
    "[!$(*#*)&!D1&!$(C(F)(F)F)&!$(C(Cl)(Cl)Cl)&!$(C(Br)(Br)Br)&!$(C([CH3])([CH3])[CH3])"
    "&!$([CD3](=[N,O,S])-!@[#7,O,S!D1])&!$([#7,O,S!D1]-!@[CD3]=[N,O,S])"
    "&!$([CD3](=[N+])-!@[#7!D1])&!$([#7!D1]-!@[CD3]=[N+])]-,:;!@"
    "[!$(*#*)&!D1&!$(C(F)(F)F)&!$(C(Cl)(Cl)Cl)&!$(C(Br)(Br)Br)&!$(C([CH3])([CH3])[CH3])]"
)
"""RDKit's strict rotatable-bond SMARTS (Code/GraphMol/Descriptors/Lipinski.cpp)."""

_HYDROGEN_ROTOR_SMARTS = "[!#1;!D1;!$(*#*)]-!@[!#1;D1;!$(*#*);!H0]"


class MoleculeError(ValueError):
    """A molecule this module cannot model (salt, missing hydrogens, unsupported MMFF type)."""


def _chem():
    from rdkit import Chem

    return Chem


def check_molecule(mol, forcefield: str = "MMFF94") -> None:
    """Raise :class:`MoleculeError` naming the problem if ``mol`` cannot be modelled.

    Checks, in order: a single covalent fragment (salts and mixtures are rejected, with the
    fragments named); explicit hydrogens on every atom (``Chem.AddHs``); MMFF atom types for
    every atom (``MMFFHasAllMoleculeParams``; the atoms without one are named).
    """
    Chem = _chem()
    if mol is None:
        raise MoleculeError("molecule is None (RDKit failed to parse it)")
    if mol.GetNumAtoms() == 0:
        raise MoleculeError("molecule has no atoms")
    frags = Chem.GetMolFrags(mol, asMols=True, sanitizeFrags=False)
    if len(frags) > 1:
        names = ", ".join(Chem.MolToSmiles(Chem.RemoveHs(f, sanitize=False)) for f in frags)
        raise MoleculeError(
            f"molecule has {len(frags)} fragments ({names}): salts and mixtures are not "
            "supported; keep the parent, e.g. rdMolStandardize.LargestFragmentChooser()"
        )
    implicit = [a.GetIdx() for a in mol.GetAtoms() if a.GetNumImplicitHs() > 0]
    if implicit:
        n = sum(mol.GetAtomWithIdx(i).GetNumImplicitHs() for i in implicit)
        raise MoleculeError(
            f"molecule is missing {n} hydrogens (implicit on atoms {implicit[:8]}): torsion "
            "energies need explicit hydrogens; use Chem.AddHs(mol, addCoords=True) first"
        )
    if forcefield not in ("MMFF94", "MMFF94s"):
        raise MoleculeError(f"forcefield must be 'MMFF94' or 'MMFF94s', got {forcefield!r}")
    from rdkit.Chem import rdForceFieldHelpers as FH

    if not FH.MMFFHasAllMoleculeParams(mol):
        bad = _untyped_atoms(mol)
        if bad:
            where = ", ".join(f"{s}{i}" for i, s in bad[:8])
            raise MoleculeError(
                f"MMFF94 has no atom type for {len(bad)} atom(s) ({where}); MMFF covers H, C, N, "
                "O, F, Si, P, S, Cl, Br, I and common ions, not e.g. B, Se or metals"
            )
        raise MoleculeError(
            "MMFF94 could not assign atom types or parameters to this molecule (every element is "
            "covered, so an unusual valence, charge or hypervalent state is the likely cause)"
        )


def _untyped_atoms(mol) -> list[tuple[int, str]]:
    """Atoms MMFF cannot type: by element, since RDKit gives no properties object at all."""
    typed = {1, 6, 7, 8, 9, 14, 15, 16, 17, 35, 53, 3, 11, 12, 19, 20, 26, 29, 30}
    bad = [(a.GetIdx(), a.GetSymbol()) for a in mol.GetAtoms() if a.GetAtomicNum() not in typed]
    return bad


def _heavy_neighbours(atom, exclude: int) -> list[int]:
    return sorted(n.GetIdx() for n in atom.GetNeighbors() if n.GetAtomicNum() > 1 and n.GetIdx() != exclude)


def _side(mol, j: int, k: int) -> list[int]:
    """Atoms reachable from k without crossing bond j-k (k included)."""
    seen, stack = {k}, [k]
    while stack:
        a = stack.pop()
        for n in mol.GetAtomWithIdx(a).GetNeighbors():
            b = n.GetIdx()
            if b == j and a == k:
                continue
            if b not in seen:
                seen.add(b)
                stack.append(b)
    if j in seen:
        raise MoleculeError(f"bond {j}-{k} is in a ring and cannot be a torsion")
    return sorted(seen)


def rotatable_torsions(mol, hydrogen_rotors: bool = False) -> list[tuple[int, int, int, int]]:
    """The torsions ``(i, j, k, l)`` of ``mol`` (with explicit hydrogens), in bond order.

    RDKit's strict rotatable bonds on the heavy-atom graph (see the module docstring); with
    ``hydrogen_rotors`` also the terminal X-H_n rotors. Each bond is oriented so that the k
    side (the side that moves) is the smaller; i and l are the lowest-index heavy neighbours
    of j and k (a hydrogen for the l of a hydrogen rotor).
    """
    Chem = _chem()
    heavy_of = {}
    for a in mol.GetAtoms():
        a.SetIntProp("_mcs_idx", a.GetIdx())
    heavy = Chem.RemoveHs(mol, sanitize=False)
    heavy.UpdatePropertyCache(strict=False)
    Chem.FastFindRings(heavy)
    for a in heavy.GetAtoms():
        heavy_of[a.GetIdx()] = a.GetIntProp("_mcs_idx")
    for a in mol.GetAtoms():
        a.ClearProp("_mcs_idx")
    pairs = set()
    for b, c in heavy.GetSubstructMatches(Chem.MolFromSmarts(STRICT_ROTATABLE_SMARTS)):
        pairs.add(tuple(sorted((heavy_of[b], heavy_of[c]))))
    if hydrogen_rotors:
        # terminal heavy atom carrying hydrogens, matched on the heavy graph (D1 = one heavy neighbour)
        for b, c in heavy.GetSubstructMatches(Chem.MolFromSmarts(_HYDROGEN_ROTOR_SMARTS)):
            pairs.add(tuple(sorted((heavy_of[b], heavy_of[c]))))
    bond_order = {tuple(sorted((bd.GetBeginAtomIdx(), bd.GetEndAtomIdx()))): bd.GetIdx() for bd in mol.GetBonds()}
    torsions = []
    for j, k in sorted(pairs, key=lambda p: bond_order[p]):
        if len(_side(mol, j, k)) > len(_side(mol, k, j)):
            j, k = k, j
        aj, ak = mol.GetAtomWithIdx(j), mol.GetAtomWithIdx(k)
        hi, hl = _heavy_neighbours(aj, k), _heavy_neighbours(ak, j)
        if not hi:
            j, k, hi, hl = k, j, hl, hi
            aj, ak = ak, aj
        if not hl:  # hydrogen rotor: the dihedral is to the lowest-index hydrogen
            hl = sorted(n.GetIdx() for n in ak.GetNeighbors() if n.GetIdx() != j)
        torsions.append((hi[0], j, k, hl[0]))
    return torsions


def reference_conformer(
    mol, forcefield: str = "MMFF94", seed: int = 0, use_existing: bool = False, max_iters: int = 2000
) -> np.ndarray:
    """An MMFF-minimized ETKDGv3 conformer, ``(N, 3)`` in ångström.

    With ``use_existing`` the molecule's own 3D conformer is minimized instead of a new ETKDG
    embedding (seeded by ``seed``). The molecule itself is not modified.
    """
    Chem = _chem()
    from rdkit.Chem import rdDistGeom
    from rdkit.Chem import rdForceFieldHelpers as FH

    work = Chem.Mol(mol)
    if use_existing and work.GetNumConformers() > 0 and work.GetConformer().Is3D():
        cid = work.GetConformer().GetId()
    else:
        work.RemoveAllConformers()
        params = rdDistGeom.ETKDGv3()
        params.randomSeed = int(seed)
        cid = rdDistGeom.EmbedMolecule(work, params)
        if cid < 0:
            params.useRandomCoords = True
            cid = rdDistGeom.EmbedMolecule(work, params)
        if cid < 0:
            raise MoleculeError(f"ETKDG could not embed {Chem.MolToSmiles(Chem.RemoveHs(mol))}")
    FH.MMFFOptimizeMolecule(work, mmffVariant=forcefield, maxIters=max_iters, confId=cid)
    return np.asarray(work.GetConformer(cid).GetPositions(), dtype=np.float64)


def dihedral(p0: Tensor, p1: Tensor, p2: Tensor, p3: Tensor) -> Tensor:
    r"""Dihedral angle of four points ``(..., 3)`` in :math:`(-\pi, \pi]`, RDKit's sign convention.

    :math:`\phi = \operatorname{atan2}(|b_2|\,b_1\cdot(b_2\times b_3),\ (b_1\times b_2)\cdot(b_2\times b_3))`
    with :math:`b_1 = p_1-p_0` etc. (Blondel & Karplus 1996).
    """
    b1, b2, b3 = p1 - p0, p2 - p1, p3 - p2
    n1, n2 = torch.linalg.cross(b1, b2), torch.linalg.cross(b2, b3)
    y = torch.linalg.vector_norm(b2, dim=-1) * (b1 * n2).sum(-1)
    x = (n1 * n2).sum(-1)
    return torch.atan2(y, x)


def rigid_fragments(mol, torsions) -> np.ndarray:
    """Label each atom with its rigid fragment: the connected components left after cutting
    every torsion bond j-k. ``(N,)`` int64, labels 0..F-1 in order of first atom."""
    n = mol.GetNumAtoms()
    cut = {tuple(sorted((j, k))) for _, j, k, _ in torsions}
    adj = [[] for _ in range(n)]
    for bd in mol.GetBonds():
        a, b = bd.GetBeginAtomIdx(), bd.GetEndAtomIdx()
        if tuple(sorted((a, b))) not in cut:
            adj[a].append(b)
            adj[b].append(a)
    frag = np.full(n, -1, dtype=np.int64)
    label = 0
    for s in range(n):
        if frag[s] >= 0:
            continue
        stack, frag[s] = [s], label
        while stack:
            a = stack.pop()
            for b in adj[a]:
                if frag[b] < 0:
                    frag[b] = label
                    stack.append(b)
        label += 1
    return frag


def _rodrigues(axis: Tensor, angle: Tensor) -> Tensor:
    """Rotation matrices ``(B, 3, 3)`` by ``angle`` about unit ``axis`` ``(B, 3)``:
    :math:`R = I + \\sin\\alpha\\,K + (1-\\cos\\alpha)K^2`, K the cross-product matrix."""
    z = torch.zeros_like(angle)
    ax, ay, az = axis.unbind(-1)
    K = torch.stack([z, -az, ay, az, z, -ax, -ay, ax, z], -1).reshape(-1, 3, 3)
    eye = torch.eye(3, dtype=axis.dtype, device=axis.device)
    s, c = torch.sin(angle)[:, None, None], torch.cos(angle)[:, None, None]
    return eye + s * K + (1 - c) * (K @ K)


class TorsionGeometry:
    r"""The map :math:`\theta \mapsto x(\theta)` for fixed bond lengths, angles and rings.

    ``reference``: ``(N, 3)`` ångström; ``torsions``: list of ``(i, j, k, l)``; ``fragments``:
    the rigid-fragment label of each atom (:func:`rigid_fragments`); ``moving``: for each
    torsion the fragments on its k side. Every fragment f carries a rigid transform
    :math:`(R_f, t_f)`, the identity at the reference. Torsion t rotates its moving fragments
    about the current axis :math:`j\to k` by :math:`\theta_t - \theta^0_t` (Rodrigues), i.e.
    :math:`R_f \leftarrow QR_f`, :math:`t_f \leftarrow Q(t_f - x_k) + x_k`; at the end
    :math:`x_a = R_{f(a)}x^0_a + t_{f(a)}`. The work per torsion is O(fragments), not O(atoms).
    Rotations about other bridge bonds move a torsion's four atoms rigidly, so the order does
    not matter and each dihedral ends exactly at :math:`\theta_t` (what RDKit's
    ``SetDihedralRad`` applied torsion by torsion also gives).
    """

    def __init__(self, reference: np.ndarray, torsions, fragments: np.ndarray, moving):
        self.reference = torch.as_tensor(np.asarray(reference), dtype=torch.float64)
        self.torsions = [tuple(int(a) for a in t) for t in torsions]
        self.fragments = torch.as_tensor(np.asarray(fragments), dtype=torch.long)
        self.num_fragments = int(self.fragments.max()) + 1 if len(self.fragments) else 0
        self.moving = [torch.as_tensor(sorted(m), dtype=torch.long) for m in moving]
        self.index = torch.tensor(self.torsions, dtype=torch.long).reshape(-1, 4)
        r, idx = self.reference, self.index
        self.theta0 = dihedral(r[idx[:, 0]], r[idx[:, 1]], r[idx[:, 2]], r[idx[:, 3]])

    def _on(self, device) -> None:
        if self.reference.device != device:
            self.reference = self.reference.to(device)
            self.theta0 = self.theta0.to(device)
            self.index = self.index.to(device)
            self.fragments = self.fragments.to(device)
            self.moving = [m.to(device) for m in self.moving]

    def transforms(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Per-fragment rotations ``(B, F, 3, 3)`` and translations ``(B, F, 3)``."""
        self._on(theta.device)
        ref, frag = self.reference, self.fragments
        B, F = theta.shape[0], self.num_fragments
        R = torch.eye(3, dtype=torch.float64, device=theta.device).expand(B, F, 3, 3)
        tr = torch.zeros(B, F, 3, dtype=torch.float64, device=theta.device)
        delta = theta.to(torch.float64) - self.theta0
        for t, (_, j, k, _) in enumerate(self.torsions):
            fj, fk = int(frag[j]), int(frag[k])
            pj = R[:, fj] @ ref[j] + tr[:, fj]
            pk = R[:, fk] @ ref[k] + tr[:, fk]
            axis = pk - pj
            Q = _rodrigues(axis / torch.linalg.vector_norm(axis, dim=-1, keepdim=True), delta[:, t])
            m = self.moving[t]
            R = R.index_copy(1, m, Q[:, None] @ R[:, m])
            tr = tr.index_copy(1, m, ((tr[:, m] - pk[:, None]) @ Q.transpose(-1, -2)) + pk[:, None])
        return R, tr

    def positions(self, theta: Tensor) -> Tensor:
        """``(B, T)`` torsions (radians, any real values) -> ``(B, N, 3)`` float64 positions (Å)."""
        R, tr = self.transforms(theta)
        frag = self.fragments
        return (R[:, frag] @ self.reference[:, :, None])[..., 0] + tr[:, frag]

    def angles(self, positions: Tensor) -> Tensor:
        """Measured torsions ``(B, T)`` of positions ``(B, N, 3)``."""
        idx = self.index.to(positions.device)
        p = positions.to(torch.float64)
        return dihedral(p[:, idx[:, 0]], p[:, idx[:, 1]], p[:, idx[:, 2]], p[:, idx[:, 3]])


@dataclass
class _Terms:
    """Index and parameter tensors of the torsion-dependent MMFF terms."""

    tors_idx: Tensor  # (M, 4)
    tors_v: Tensor  # (M, 3) V1, V2, V3 kcal/mol
    pair_idx: Tensor  # (P, 2)
    vdw_r: Tensor  # (P,) R*_ij Å
    vdw_eps: Tensor  # (P,) kcal/mol
    qq: Tensor  # (P,) 332.0716 q_i q_j / D, times 0.75 for 1-4 pairs
    dist_dep: bool  # distance-dependent dielectric (1/R^2)


class MMFFTorsionEnergy:
    r"""MMFF94 energy of :math:`x(\theta)` in torch: the terms that vary with torsions.

    Halgren (1996), J. Comput. Chem. 17, 490, as implemented in RDKit (parameters read from
    ``MMFFMolProperties``):

    * torsion :math:`\tfrac12[V_1(1+\cos\phi) + V_2(1-\cos2\phi) + V_3(1+\cos3\phi)]` for every
      dihedral about a rotatable bond;
    * buffered 14-7 vdW :math:`\varepsilon\big(\tfrac{1.07R^*}{R+0.07R^*}\big)^7
      \big(\tfrac{1.12R^{*7}}{R^7+0.12R^{*7}}-2\big)`;
    * buffered Coulomb :math:`332.0716\,q_iq_j/(D(R+0.05)^n)`, 1-4 pairs scaled by 0.75,

    the pair terms over atoms in different rigid fragments at least three bonds apart. The rest
    (bonds, angles, stretch-bend, out-of-plane, pairs within a fragment) is constant and added
    once, from RDKit at the reference conformer. Returns kcal/mol.
    """

    def __init__(self, mol, props, torsions, reference: np.ndarray):
        Chem = _chem()
        from rdkit.Chem import rdForceFieldHelpers as FH

        n = mol.GetNumAtoms()
        Chem.GetSymmSSSR(mol)
        tors, vs = [], []
        for _, j, k, _ in torsions:
            for a in mol.GetAtomWithIdx(j).GetNeighbors():
                if a.GetIdx() == k:
                    continue
                for d in mol.GetAtomWithIdx(k).GetNeighbors():
                    if d.GetIdx() == j or d.GetIdx() == a.GetIdx():
                        continue
                    p = props.GetMMFFTorsionParams(mol, a.GetIdx(), j, k, d.GetIdx())
                    if p is None:
                        continue
                    tors.append((a.GetIdx(), j, k, d.GetIdx()))
                    vs.append(p[1:4] if len(p) == 4 else p)
        frag = rigid_fragments(mol, torsions)
        topo = Chem.GetDistanceMatrix(mol)
        dielectric = props.GetMMFFDielectricConstant()
        # RDKit's MMFF dielectric models: 1 = constant, 2 = distance-dependent (MMFF/Params.h)
        dist_dep = int(props.GetMMFFDielectricModel()) == 2
        q = [props.GetMMFFPartialCharge(i) for i in range(n)]
        pairs, rs, eps, qq = [], [], [], []
        for a in range(n):
            for b in range(a + 1, n):
                if frag[a] == frag[b] or topo[a, b] < 3:
                    continue
                _, _, r_star, e = props.GetMMFFVdWParams(a, b)
                pairs.append((a, b))
                rs.append(r_star)
                eps.append(e)
                scale = 0.75 if topo[a, b] == 3 else 1.0
                qq.append(332.0716 * q[a] * q[b] / dielectric * scale)
        f64 = torch.float64
        self.terms = _Terms(
            tors_idx=torch.tensor(tors, dtype=torch.long).reshape(-1, 4),
            tors_v=torch.tensor(vs, dtype=f64).reshape(-1, 3),
            pair_idx=torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
            vdw_r=torch.tensor(rs, dtype=f64),
            vdw_eps=torch.tensor(eps, dtype=f64),
            qq=torch.tensor(qq, dtype=f64),
            dist_dep=dist_dep,
        )
        ff = FH.MMFFGetMoleculeForceField(mol, props)
        ref = torch.as_tensor(np.asarray(reference), dtype=f64)
        total = ff.CalcEnergy(np.asarray(reference, dtype=np.float64).ravel().tolist())
        self.constant = float(total - self.varying(ref[None])[0])

    def _to(self, device):
        t = self.terms
        if t.tors_idx.device != device:
            self.terms = _Terms(
                *(
                    v.to(device) if isinstance(v, Tensor) else v
                    for v in (t.tors_idx, t.tors_v, t.pair_idx, t.vdw_r, t.vdw_eps, t.qq, t.dist_dep)
                )
            )
        return self.terms

    def varying(self, x: Tensor) -> Tensor:
        """The torsion-dependent terms (kcal/mol) of positions ``(B, N, 3)`` Å."""
        t = self._to(x.device)
        ti = t.tors_idx
        phi = dihedral(x[:, ti[:, 0]], x[:, ti[:, 1]], x[:, ti[:, 2]], x[:, ti[:, 3]])
        v = t.tors_v
        e_tors = 0.5 * (
            v[:, 0] * (1 + torch.cos(phi)) + v[:, 1] * (1 - torch.cos(2 * phi)) + v[:, 2] * (1 + torch.cos(3 * phi))
        ).sum(-1)
        pi = t.pair_idx
        d = x.index_select(1, pi[:, 0]) - x.index_select(1, pi[:, 1])
        r = (d * d).sum(-1).sqrt()
        rs = t.vdw_r
        u = 1.07 * rs / (r + 0.07 * rs)
        u2 = u * u
        r2 = r * r
        rs2 = rs * rs
        r7, rs7 = r2 * r2 * r2 * r, rs2 * rs2 * rs2 * rs
        e_vdw = (t.vdw_eps * (u2 * u2 * u2 * u) * (1.12 * rs7 / (r7 + 0.12 * rs7) - 2)).sum(-1)
        denom = (r + 0.05) ** 2 if t.dist_dep else (r + 0.05)
        e_ele = (t.qq / denom).sum(-1)
        return e_tors + e_vdw + e_ele

    def __call__(self, x: Tensor) -> Tensor:
        """Total MMFF energy (kcal/mol) of positions ``(B, N, 3)`` Å."""
        return self.varying(x) + self.constant


class _RDKitEnergy(torch.autograd.Function):
    """MMFF energy (kcal/mol) of ``(B, N, 3)`` positions via RDKit's C++ force field, with
    the Cartesian gradient from ``CalcGrad`` for the backward pass."""

    @staticmethod
    def forward(ctx, x, ff, need_grad):
        flat = x.detach().to("cpu", torch.float64).reshape(x.shape[0], -1).numpy()
        e = np.empty(x.shape[0])
        g = np.empty_like(flat) if need_grad else None
        for b in range(flat.shape[0]):
            pos = flat[b].tolist()
            e[b] = ff.CalcEnergy(pos)
            if need_grad:
                g[b] = ff.CalcGrad(pos)
        if need_grad:
            ctx.save_for_backward(torch.as_tensor(g, device=x.device).reshape(x.shape))
        return torch.as_tensor(e, device=x.device)

    @staticmethod
    def backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        return grad_out[:, None, None] * g, None, None


class TorsionTarget:
    r"""Boltzmann density over a molecule's rotatable torsions,
    :math:`\log p(\theta) = -U_\mathrm{MMFF}(x(\theta))/k_BT`.

    Args:
        mol: RDKit molecule with explicit hydrogens, one fragment, MMFF-typable.
        forcefield: ``"MMFF94"`` (default) or ``"MMFF94s"``.
        temperature: kelvin (300 K default).
        hydrogen_rotors: also sample terminal X-H rotors (methyl, OH, NH2, SH); default off,
            their hydrogens then stay at the reference conformer (see the module docstring).
        backend: ``"auto"`` (default: RDKit on CPU, torch on GPU), ``"rdkit"`` (RDKit's C++
            ``CalcEnergy`` per conformer) or ``"torch"`` (batched MMFF of the
            torsion-dependent terms).
        seed: ETKDG seed of the reference conformer.
        use_existing_conformer: minimize the molecule's own 3D conformer instead of embedding.

    A :class:`~mcsample.protocols.Target` over ``(B, T)`` torsion vectors in radians
    (periodic: any real values are accepted); ``event_shape == (T,)``.
    """

    def __init__(
        self,
        mol,
        forcefield: str = "MMFF94",
        temperature: float = 300.0,
        *,
        hydrogen_rotors: bool = False,
        backend: str = "auto",
        seed: int = 0,
        use_existing_conformer: bool = False,
    ):
        Chem = _chem()
        from rdkit.Chem import rdForceFieldHelpers as FH

        check_molecule(mol, forcefield)
        if backend not in ("auto", "torch", "rdkit"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'rdkit', got {backend!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.mol = Chem.Mol(mol)
        self.forcefield = forcefield
        self.temperature = float(temperature)
        self.kT = K_B * self.temperature
        self.backend = backend
        self.torsions = rotatable_torsions(self.mol, hydrogen_rotors)
        self.event_shape = torch.Size([len(self.torsions)])
        ref = reference_conformer(self.mol, forcefield, seed, use_existing_conformer)
        self.mol.RemoveAllConformers()
        conf = Chem.Conformer(self.mol.GetNumAtoms())
        for a, p in enumerate(ref):
            conf.SetAtomPosition(a, p.tolist())
        conf.Set3D(True)
        self.mol.AddConformer(conf, assignId=True)
        frag = rigid_fragments(self.mol, self.torsions)
        moving = [sorted({int(frag[a]) for a in _side(self.mol, j, k)}) for _, j, k, _ in self.torsions]
        self.geometry = TorsionGeometry(ref, self.torsions, frag, moving)
        self._props = FH.MMFFGetMoleculeProperties(self.mol, mmffVariant=forcefield)
        self._props.SetMMFFVerbosity(0)
        self._ff = FH.MMFFGetMoleculeForceField(self.mol, self._props)
        self._torch = MMFFTorsionEnergy(self.mol, self._props, self.torsions, ref) if backend != "rdkit" else None

    # -- constructors -------------------------------------------------------------------
    @classmethod
    def from_smiles(cls, smiles: str, **kwargs) -> TorsionTarget:
        """Parse ``smiles``, add hydrogens and build the target (kwargs as the constructor)."""
        Chem = _chem()
        mol = Chem.MolFromSmiles(smiles)
        if mol is None:
            raise MoleculeError(f"RDKit could not parse SMILES {smiles!r}")
        return cls(Chem.AddHs(mol), **kwargs)

    @classmethod
    def from_sdf(cls, path: str | Path, index: int = 0, add_hydrogens: bool = False, **kwargs) -> TorsionTarget:
        """Read molecule ``index`` of an SDF file. Hydrogens missing from the file raise
        :class:`MoleculeError` unless ``add_hydrogens=True`` (then added with coordinates)."""
        Chem = _chem()
        supplier = Chem.SDMolSupplier(str(path), removeHs=False)
        if index >= len(supplier):
            raise MoleculeError(f"{path} holds {len(supplier)} molecules; index {index} is out of range")
        mol = supplier[index]
        if mol is None:
            raise MoleculeError(f"RDKit could not read molecule {index} of {path}")
        if add_hydrogens:
            mol = Chem.AddHs(mol, addCoords=mol.GetNumConformers() > 0)
        return cls(mol, **kwargs)

    # -- geometry -----------------------------------------------------------------------
    @property
    def num_torsions(self) -> int:
        return len(self.torsions)

    @property
    def reference_positions(self) -> Tensor:
        """The fixed-geometry reference conformer, ``(N, 3)`` Å."""
        return self.geometry.reference

    @property
    def reference_torsions(self) -> Tensor:
        """Torsions of the reference conformer, ``(T,)`` radians."""
        return self.geometry.theta0

    def positions(self, theta: Tensor) -> Tensor:
        """Conformer coordinates ``(B, N, 3)`` (Å, float64) with torsions ``theta`` ``(B, T)``."""
        return self.geometry.positions(self._check(theta))

    def torsion_angles(self, positions: Tensor) -> Tensor:
        """Measure this target's torsions on any conformers ``(B, N, 3)`` -> ``(B, T)``."""
        return self.geometry.angles(positions)

    # -- energies -----------------------------------------------------------------------
    def energy(self, theta: Tensor) -> Tensor:
        """MMFF potential energy :math:`U(x(\\theta))` in **kJ/mol**, ``(B,)`` float64.

        This is the one place where MMFF's kcal/mol is converted (times :data:`KCAL_TO_KJ`).
        """
        return self.energy_kcal(theta) * KCAL_TO_KJ

    def energy_kcal(self, theta: Tensor) -> Tensor:
        """MMFF energy in RDKit's kcal/mol, ``(B,)`` float64."""
        x = self.positions(theta)
        if self.backend == "torch" or (self.backend == "auto" and x.device.type != "cpu"):
            return self._torch(x)
        return _RDKitEnergy.apply(x, self._ff, torch.is_grad_enabled() and x.requires_grad)

    def rdkit_energy_kcal(self, positions: Tensor) -> Tensor:
        """RDKit's own MMFF energy (kcal/mol) of positions ``(B, N, 3)`` Å (the reference path)."""
        return _RDKitEnergy.apply(positions, self._ff, False)

    def log_prob(self, theta: Tensor) -> Tensor:
        """:math:`-U(x(\\theta))/k_BT` (kJ/mol over kJ/mol), ``(B,)`` float64, unnormalized."""
        return -self.energy(theta) / self.kT

    def _check(self, theta: Tensor) -> Tensor:
        if theta.dim() != 2 or theta.shape[1] != self.num_torsions:
            raise ValueError(
                f"torsions must have shape (B, {self.num_torsions}) for this molecule, got {tuple(theta.shape)}"
            )
        return theta

    # -- RDKit output -------------------------------------------------------------------
    def to_mol(self, theta: Tensor):
        """A copy of the molecule with one conformer per row of ``theta`` ``(B, T)``."""
        Chem = _chem()
        from rdkit.Geometry import Point3D

        x = self.positions(theta.detach()).cpu().numpy()
        out = Chem.Mol(self.mol)
        out.RemoveAllConformers()
        for b in range(x.shape[0]):
            conf = Chem.Conformer(x.shape[1])
            for a in range(x.shape[1]):
                conf.SetAtomPosition(a, Point3D(*x[b, a]))
            conf.Set3D(True)
            out.AddConformer(conf, assignId=True)
        return out

    def __repr__(self) -> str:
        smi = _chem().MolToSmiles(_chem().RemoveHs(self.mol))
        return (
            f"TorsionTarget({smi!r}, torsions={self.num_torsions}, {self.forcefield}, "
            f"T={self.temperature} K, backend={self.backend!r})"
        )
