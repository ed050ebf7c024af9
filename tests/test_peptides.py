"""Peptide targets: construction from sequences, PDB files and OpenMM systems; backends; errors.

Deterministic (fixed seeds); no statistical assertions.
"""

from __future__ import annotations

import numpy as np
import openmm
import openmm.app as app
import pytest
import torch

from mcsample.protocols import Target, check_log_prob
from mcsample.systems.peptides import Peptide, alanine_dipeptide, boltzmann_constant

_CACHE: dict = {}


def ala2(solvent="obc1") -> Peptide:
    if solvent not in _CACHE:
        _CACHE[solvent] = alanine_dipeptide(solvent)
    return _CACHE[solvent]


def kdea_cut() -> Peptide:
    if "kdea" not in _CACHE:
        _CACHE["kdea"] = Peptide.from_sequence("KDEA", caps=True, solvent="obc1", cutoff=2.0)
    return _CACHE["kdea"]


def _chirality(peptide: Peptide, residue_index: int) -> float:
    """Signed volume (N-CA)·((C-CA)×(CB-CA)) of one residue: its sign tells L from D."""
    res = list(peptide.topology.residues)[residue_index]
    pos = {a.name: peptide.positions[a.index].numpy() for a in res.atoms}
    ca = pos["CA"]
    return float(np.dot(pos["N"] - ca, np.cross(pos["C"] - ca, pos["CB"] - ca)))


@pytest.mark.parametrize("solvent", ["vacuum", "obc1"])
def test_alanine_dipeptide_is_the_openmmtools_system(solvent):
    p = ala2(solvent)
    assert p.n_atoms == 22 and p.event_shape == torch.Size([22, 3])
    assert [r.name for r in p.topology.residues] == ["ACE", "ALA", "NME"]
    assert p.temperature == 300.0 and p.kT == pytest.approx(boltzmann_constant() * 300.0)
    assert p.kT == pytest.approx(2.494, abs=1e-3)
    names = {type(f).__name__ for f in p.system.getForces()}
    assert ("CustomGBForce" in names) == (solvent == "obc1")
    assert p.system.getNumConstraints() == 0
    assert p.positions.dtype == torch.float64 and p.positions.shape == (22, 3)
    # minimized: small RMS force
    f = p.forces(p.positions, backend="openmm")
    assert f.square().mean().sqrt() < 5.0
    assert isinstance(p, Target)


def test_log_prob_is_minus_energy_over_kT_and_backends_agree():
    p = ala2("obc1")
    g = torch.Generator().manual_seed(0)
    x = p.positions + 0.005 * torch.randn((8, 22, 3), generator=g, dtype=torch.float64)
    u = p.energy(x)
    lp = check_log_prob(p.log_prob(x), 8)
    assert torch.allclose(lp, -u / p.kT)
    u_omm = p.energy(x, backend="openmm")  # CPU platform: mixed precision
    assert (u - u_omm).abs().max() < 1e-2
    assert (p.forces(x) - p.forces(x, backend="openmm")).abs().max() < 0.05
    # one configuration without a batch dimension gives a scalar
    assert p.energy(x[0]).shape == () and torch.allclose(p.energy(x[0]), u[0])
    with pytest.raises(ValueError, match=r"\(B, 22, 3\)"):
        p.energy(torch.zeros(4, 21, 3))
    with pytest.raises(ValueError, match="backend"):
        p.energy(x, backend="amber")


def test_openmm_backend_is_differentiable_and_pooled():
    p = ala2("vacuum")
    g = torch.Generator().manual_seed(1)
    x = (p.positions + 0.01 * torch.randn((6, 22, 3), generator=g, dtype=torch.float64)).requires_grad_(True)
    u = p.energy(x, backend="openmm")
    (grad,) = torch.autograd.grad(u.sum(), x)
    assert torch.allclose(-grad, p.forces(x.detach(), backend="openmm"))
    pooled = Peptide.from_openmm(p.openmm_topology, p.system, p.positions, 300.0, minimize=False, n_contexts=2)
    assert torch.allclose(pooled.energy(x.detach(), backend="openmm"), u.detach())


def test_score_and_regularized_log_prob():
    p = ala2("obc1")
    x = p.positions[None].repeat(3, 1, 1)
    x[1, 5] = x[1, 6]  # a clash
    assert torch.allclose(p.score(x[:1]), p.forces(x[:1]) / p.kT)
    lp = p.log_prob(x)
    reg = p.regularized_log_prob(x, high_energy=1e3, max_energy=1e8)
    assert torch.isfinite(reg).all()
    assert reg[0] == pytest.approx(lp[0].item())  # physical: unchanged
    assert reg[1] > lp[1] and reg[1] > -(1e3 + np.log(1e8)) / p.kT - 1e-9


def test_mdtraj_round_trip():
    p = ala2("vacuum")
    x = p.positions[None].repeat(2, 1, 1)
    traj = p.to_mdtraj(x)
    assert traj.n_frames == 2 and traj.n_atoms == 22
    back = p.from_mdtraj(traj)
    assert back.shape == (2, 22, 3) and back.dtype == torch.float64
    assert (back - x).abs().max() < 1e-6  # float32 storage in mdtraj
    import mdtraj

    _, phi = mdtraj.compute_phi(traj)
    assert phi.shape == (2, 1)


def test_from_sequence_kdea_with_cutoff():
    p = kdea_cut()
    assert [r.name for r in p.topology.residues] == ["ACE", "LYS", "ASP", "GLU", "ALA", "NME"]
    assert p.sequence == "KDEA" and p.temperature == 310.0
    forces = {type(f).__name__: f for f in p.system.getForces()}
    nb = forces["NonbondedForce"]
    assert nb.getNonbondedMethod() == openmm.NonbondedForce.CutoffNonPeriodic
    assert nb.getCutoffDistance()._value == pytest.approx(2.0)
    assert forces["CustomGBForce"].getNonbondedMethod() == openmm.CustomGBForce.CutoffNonPeriodic
    charge = sum(nb.getParticleParameters(i)[0]._value for i in range(p.n_atoms))
    assert charge == pytest.approx(-1.0, abs=1e-6)  # K+ D- E- at pH 7
    assert p.system.getNumConstraints() == 0
    # peptide bonds trans, L-amino acids (same handedness as openmmtools' L-alanine)
    import mdtraj

    _, omega = mdtraj.compute_omega(p.to_mdtraj(p.positions))
    assert (np.abs(np.degrees(omega)) > 150).all()
    ref = np.sign(_chirality(ala2("vacuum"), 1))
    assert all(np.sign(_chirality(p, k)) == ref for k in (1, 2, 3, 4))
    # the torch energy is the OpenMM one
    x = p.positions[None]
    assert (p.energy(x) - p.energy(x, backend="openmm")).abs().max() < 1e-2


def test_from_sequence_zwitterion_vacuum():
    p = Peptide.from_sequence("GA", caps=False, solvent="vacuum", temperature=300.0)
    names = {(a.residue.name, a.name) for a in p.topology.atoms}
    assert {("GLY", "H"), ("GLY", "H2"), ("GLY", "H3"), ("ALA", "OXT")} <= names  # NH3+, COO-
    assert not any(type(f).__name__ == "CustomGBForce" for f in p.system.getForces())
    nb = next(f for f in p.system.getForces() if isinstance(f, openmm.NonbondedForce))
    assert sum(nb.getParticleParameters(i)[0]._value for i in range(p.n_atoms)) == pytest.approx(0.0, abs=1e-6)


def test_unknown_residues_raise_and_name_them(tmp_path):
    with pytest.raises(ValueError, match=r"\['X'\]"):
        Peptide.from_sequence("AXA")
    # a PDB file with a residue amber14 does not know
    p = ala2("vacuum")
    path = tmp_path / "bad.pdb"
    top = app.Topology()
    chain = top.addChain()
    for res in p.openmm_topology.residues():
        new = top.addResidue("XYZ" if res.name == "ALA" else res.name, chain)
        for atom in res.atoms():
            top.addAtom(atom.name, atom.element, new)
    with open(path, "w") as fh:
        app.PDBFile.writeFile(top, p.positions.numpy() * 10 * openmm.unit.angstrom, fh)
    with pytest.raises(ValueError, match="XYZ"):
        Peptide.from_pdb(path, solvent="vacuum")


def test_from_pdb_round_trip(tmp_path):
    p = ala2("vacuum")
    path = tmp_path / "ala2.pdb"
    with open(path, "w") as fh:
        app.PDBFile.writeFile(p.openmm_topology, p.positions.numpy() * 10 * openmm.unit.angstrom, fh)
    q = Peptide.from_pdb(path, forcefield="amber14", solvent="obc2", temperature=310.0)
    assert q.n_atoms == 22 and q.temperature == 310.0
    assert any(type(f).__name__ == "CustomGBForce" for f in q.system.getForces())
    x = q.positions[None]
    assert (q.energy(x) - q.energy(x, backend="openmm")).abs().max() < 1e-2


def test_constrained_systems_are_rejected():
    p = ala2("vacuum")
    ff = app.ForceField("amber14-all.xml")
    system = ff.createSystem(p.openmm_topology, constraints=app.HBonds)
    with pytest.raises(ValueError, match="constraints"):
        Peptide.from_openmm(p.openmm_topology, system, p.positions, 300.0)


def test_unknown_atoms_raise_and_name_them(tmp_path):
    """An extra heavy atom (CX) in ALA: the error names the residue and the atom."""
    p = ala2("vacuum")
    good = tmp_path / "ala2.pdb"
    with open(good, "w") as fh:
        app.PDBFile.writeFile(p.openmm_topology, p.positions.numpy() * 10 * openmm.unit.angstrom, fh)
    lines = []
    for line in good.read_text().splitlines():
        lines.append(line)
        if line.startswith("ATOM") and line[12:16] == " CB " and line[17:20] == "ALA":
            lines.append(line[:12] + " CX " + line[16:30] + f"{float(line[30:38]) + 1.5:8.3f}" + line[38:])
    bad = tmp_path / "bad.pdb"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"ALA.*\['CX'\]"):
        Peptide.from_pdb(bad, solvent="vacuum")
