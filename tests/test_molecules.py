"""TorsionTarget: geometry and energies against RDKit, units, torsion choice, errors, data set."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

pytest.importorskip("rdkit")
from rdkit import Chem  # noqa: E402
from rdkit.Chem import rdMolDescriptors, rdMolTransforms  # noqa: E402

from mcsample.systems.molecules import (  # noqa: E402
    K_B,
    KCAL_TO_KJ,
    MoleculeError,
    TorsionTarget,
    rotatable_torsions,
)

# 6 torsions: ester, anilide side chain, morpholine linker
SMILES = "CCOC(=O)c1ccccc1NC(=O)CCN1CCOCC1"


@pytest.fixture(scope="module")
def target():
    return TorsionTarget.from_smiles(SMILES)


def _random_theta(T, n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, T, generator=g, dtype=torch.float64) * 2 - 1) * math.pi


def _rdkit_set(target, theta):
    """Coordinates from RDKit's own SetDihedralRad applied torsion by torsion."""
    out = []
    for row in theta.tolist():
        conf = Chem.Conformer(target.mol.GetConformer(0))
        for (i, j, k, l), v in zip(target.torsions, row):
            rdMolTransforms.SetDihedralRad(conf, i, j, k, l, v)
        out.append(conf.GetPositions())
    return torch.tensor(np.array(out))


def test_positions_match_rdkit_set_dihedral(target):
    theta = _random_theta(target.num_torsions, 16, 0)
    ours = target.positions(theta)
    ref = _rdkit_set(target, theta)
    assert float((ours - ref).abs().max()) < 1e-8
    # and the dihedrals are exactly the requested ones (wrapped)
    back = target.torsion_angles(ours)
    diff = torch.remainder(back - theta + math.pi, 2 * math.pi) - math.pi
    assert float(diff.abs().max()) < 1e-9


@pytest.mark.parametrize("backend", ["torch", "rdkit"])
def test_energy_matches_rdkit_mmff(backend):
    t = TorsionTarget.from_smiles(SMILES, backend=backend)
    theta = _random_theta(t.num_torsions, 32, 1)
    coords = _rdkit_set(t, theta)
    ff = t._ff
    expected = torch.tensor([ff.CalcEnergy(c.ravel().tolist()) for c in coords.numpy()], dtype=torch.float64)
    ours = t.energy_kcal(theta)
    # clashing random torsions reach 1e4 kcal/mol: compare to 1e-4 kcal/mol absolute
    assert float((ours - expected).abs().max()) < 1e-4
    # units: kJ/mol once, log_prob = -U / kT
    assert torch.allclose(t.energy(theta), ours * KCAL_TO_KJ, rtol=1e-12, atol=0)
    assert torch.allclose(t.log_prob(theta), -ours * KCAL_TO_KJ / (K_B * 300.0), rtol=1e-12, atol=0)


def test_torch_backend_on_mmff94s():
    t = TorsionTarget.from_smiles("CC(C)Cc1ccc(cc1)C(C)C(=O)O", forcefield="MMFF94s", backend="torch")
    theta = _random_theta(t.num_torsions, 8, 2)
    assert float((t.energy_kcal(theta) - t.rdkit_energy_kcal(t.positions(theta))).abs().max()) < 1e-4


def test_gradients_agree_between_backends_and_finite_differences():
    smi = "OCCc1ccc(O)cc1C(=O)OC"
    a = TorsionTarget.from_smiles(smi, backend="torch")
    b = TorsionTarget.from_smiles(smi, backend="rdkit")
    # moderate-energy points: near the reference conformer
    theta = (a.reference_torsions + 0.3 * _random_theta(a.num_torsions, 4, 3) / math.pi).requires_grad_(True)
    (ga,) = torch.autograd.grad(a.log_prob(theta).sum(), theta)
    (gb,) = torch.autograd.grad(b.log_prob(theta).sum(), theta)
    assert torch.allclose(ga, gb, rtol=1e-6, atol=1e-6)
    h = 1e-5
    with torch.no_grad():
        for t in range(a.num_torsions):
            e = torch.zeros_like(theta)
            e[:, t] = h
            fd = (b.log_prob(theta + e) - b.log_prob(theta - e)) / (2 * h)
            assert torch.allclose(fd, gb[:, t], rtol=1e-4, atol=1e-4)


def test_periodic_and_shapes(target):
    theta = _random_theta(target.num_torsions, 4, 4)
    assert torch.allclose(target.log_prob(theta), target.log_prob(theta + 2 * math.pi), rtol=1e-10)
    assert target.event_shape == torch.Size([6])
    assert target.log_prob(theta).shape == (4,)
    with pytest.raises(ValueError, match=r"shape \(B, 6\)"):
        target.log_prob(theta[:, :5])


@pytest.mark.parametrize(
    "smi",
    [
        SMILES,
        "CC(C)Cc1ccc(cc1)C(C)C(=O)O",
        "CN(C)CCOC(c1ccccc1)c1ccccc1",
        "CC(=O)Nc1ccc(O)cc1",
        "FC(F)(F)c1ccc(OCC)cc1",
    ],
)
def test_torsions_are_rdkit_strict_rotatable_bonds(smi):
    mol = Chem.MolFromSmiles(smi)
    t = rotatable_torsions(Chem.AddHs(mol))
    assert len(t) == rdMolDescriptors.CalcNumRotatableBonds(mol)


def test_terminal_hydrogen_rotors_excluded_by_default():
    mol = Chem.AddHs(Chem.MolFromSmiles("CCO"))  # ethanol: C-C (methyl) and C-O (hydroxyl) rotors
    assert rotatable_torsions(mol) == []
    with_h = rotatable_torsions(mol, hydrogen_rotors=True)
    assert len(with_h) == 2
    assert all(mol.GetAtomWithIdx(l).GetAtomicNum() == 1 for *_, l in with_h)
    t = TorsionTarget(mol, hydrogen_rotors=True)
    theta = _random_theta(2, 8, 5)
    assert float((t.energy_kcal(theta) - t.rdkit_energy_kcal(t.positions(theta))).abs().max()) < 1e-4


def test_ring_bonds_never_torsions(target):
    ring = {tuple(sorted((b.GetBeginAtomIdx(), b.GetEndAtomIdx()))) for b in target.mol.GetBonds() if b.IsInRing()}
    assert all(tuple(sorted((j, k))) not in ring for _, j, k, _ in target.torsions)


def test_error_salt():
    with pytest.raises(MoleculeError, match="2 fragments.*Na"):
        TorsionTarget.from_smiles("CC(=O)[O-].[Na+]")


def test_error_missing_hydrogens():
    with pytest.raises(MoleculeError, match="missing 8 hydrogens.*AddHs"):
        TorsionTarget(Chem.MolFromSmiles("CCOC(C)=O"))


def test_error_unsupported_atom_type():
    with pytest.raises(MoleculeError, match="MMFF94 has no atom type.*B"):
        TorsionTarget.from_smiles("OB(O)c1ccccc1")
    with pytest.raises(MoleculeError, match="Se"):
        TorsionTarget.from_smiles("C[Se]CCO")


def test_from_sdf(tmp_path):
    mol = Chem.AddHs(Chem.MolFromSmiles("CCOc1ccccc1"))
    from rdkit.Chem import AllChem

    AllChem.EmbedMolecule(mol, randomSeed=1)
    path = tmp_path / "m.sdf"
    w = Chem.SDWriter(str(path))
    w.write(mol)
    w.close()
    t = TorsionTarget.from_sdf(path, use_existing_conformer=True)
    assert t.num_torsions == 2
    heavy_only = tmp_path / "heavy.sdf"
    w = Chem.SDWriter(str(heavy_only))
    w.write(Chem.RemoveHs(mol))
    w.close()
    with pytest.raises(MoleculeError, match="missing .* hydrogens"):
        TorsionTarget.from_sdf(heavy_only)
    assert TorsionTarget.from_sdf(heavy_only, add_hydrogens=True).num_torsions == 2


def test_to_mol_conformers(target):
    theta = _random_theta(target.num_torsions, 3, 6)
    m = target.to_mol(theta)
    assert m.GetNumConformers() == 3
    got = torch.tensor(np.array([c.GetPositions() for c in m.GetConformers()]))
    assert torch.allclose(got, target.positions(theta), atol=1e-10)


def test_dataset_split_by_scaffold():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "systems" / "data" / "molecules" / "molecules.csv"
    rows = list(csv.DictReader(open(path)))
    train = {r["scaffold"] for r in rows if r["split"] == "train"}
    held = {r["scaffold"] for r in rows if r["split"] == "heldout"}
    assert len(rows) >= 100 and len(held) >= 10
    assert not train & held
    assert all(1 <= int(r["num_torsions"]) <= 8 for r in rows)
    # the recorded torsion counts are those of the target's definition
    for r in rows[::25]:
        assert len(rotatable_torsions(Chem.AddHs(Chem.MolFromSmiles(r["smiles"])))) == int(r["num_torsions"])
