"""The conformer API: weights, diagnostics, SDF round trip, correctness of the weighting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("rdkit")
from rdkit import Chem  # noqa: E402

import mcsample as mc  # noqa: E402
from mcsample.conformers import read_conformers, sample_conformers  # noqa: E402
from mcsample.systems.molecules import MoleculeError, TorsionTarget  # noqa: E402

SMI = "CCOc1ccccc1C(=O)N"  # 3 torsions


@pytest.fixture(scope="module")
def ensemble():
    mol = Chem.AddHs(Chem.MolFromSmiles(SMI))
    return sample_conformers(mol, 300, generator=torch.Generator().manual_seed(0))


def test_ensemble_contents(ensemble):
    assert ensemble.mol.GetNumConformers() == 300 == len(ensemble)
    w = ensemble.weights
    assert w.dtype == torch.float64 and abs(float(w.sum()) - 1) < 1e-12 and bool((w >= 0).all())
    props = torch.tensor([c.GetDoubleProp("boltzmann_weight") for c in ensemble.mol.GetConformers()], dtype=torch.float64)
    assert torch.allclose(props, w)
    d = ensemble.diagnostics
    assert 1.0 <= d.ess <= 300 and math.isfinite(d.khat) and math.isfinite(d.log_evidence)
    assert abs(d.ess_fraction - d.ess / 300) < 1e-12
    # the conformers carry the sampled torsions and their energies
    x = torch.tensor(np.array([c.GetPositions() for c in ensemble.mol.GetConformers()]))
    assert torch.allclose(ensemble.target.torsion_angles(x), ensemble.torsions, atol=1e-8)
    assert torch.allclose(ensemble.target.energy(ensemble.torsions), ensemble.energies)


def test_sdf_round_trip(ensemble, tmp_path):
    path = ensemble.to_sdf(tmp_path / "out" / "conformers.sdf")
    mol, w = read_conformers(path)
    assert mol.GetNumConformers() == 300
    assert torch.equal(w, ensemble.weights)  # repr() round-trips floats exactly
    a = np.array([c.GetPositions() for c in mol.GetConformers()])
    b = np.array([c.GetPositions() for c in ensemble.mol.GetConformers()])
    assert np.abs(a - b).max() < 1e-4  # SDF keeps 4 decimals
    assert Chem.MolToSmiles(Chem.RemoveHs(mol)) == Chem.MolToSmiles(Chem.MolFromSmiles(SMI))
    assert math.isclose(float(Chem.SDMolSupplier(str(path))[0].GetProp("ensemble_ess")), ensemble.diagnostics.ess)


def test_reproducible_with_generator():
    a = sample_conformers(SMI, 20, generator=torch.Generator().manual_seed(5))
    b = sample_conformers(SMI, 20, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.torsions, b.torsions) and torch.equal(a.weights, b.weights)


def test_importance_weights_are_boltzmann_one_torsion():
    """On ethylbenzene (1 torsion) the weighted mean of cos(2 theta) from the conformer API
    agrees with quadrature of exp(-U/kT) within 5 delta-method standard errors (false-failure
    rate ~6e-7 for a Gaussian estimator error)."""
    ens = sample_conformers("CCc1ccccc1", 4000, generator=torch.Generator().manual_seed(1))
    f = torch.cos(2 * ens.torsions[:, 0])
    W = ens.weights
    est = float((W * f).sum())
    se = float(torch.sqrt((W**2 * (f - est) ** 2).sum()))
    g = torch.linspace(-math.pi, math.pi, 4001, dtype=torch.float64)[:-1][:, None]
    with torch.no_grad():
        p = torch.softmax(ens.target.log_prob(g), 0)
    exact = float((p * torch.cos(2 * g[:, 0])).sum())
    assert abs(est - exact) < 5 * se + 1e-6, (est, exact, se)
    # the evidence: log Z of the 1-D torsion integral by quadrature
    with torch.no_grad():
        logz = float(torch.logsumexp(ens.target.log_prob(g), 0) + math.log(2 * math.pi / 4000))
    assert abs(ens.diagnostics.log_evidence - logz) < 5 * ens.diagnostics.log_evidence_stderr + 1e-3


def test_smc_method():
    ens = sample_conformers(SMI, 100, method="smc", generator=torch.Generator().manual_seed(2))
    assert ens.mol.GetNumConformers() == 100
    assert abs(float(ens.weights.sum()) - 1) < 1e-12
    assert ens.diagnostics.method == "smc" and math.isfinite(ens.diagnostics.log_evidence)


def test_lazy_top_level_name():
    assert mc.sample_conformers is sample_conformers


def test_rigid_molecule():
    ens = sample_conformers("c1ccccc1", 5)
    assert ens.mol.GetNumConformers() == 5 and ens.torsions.shape == (5, 0)
    assert torch.allclose(ens.weights, torch.full((5,), 0.2, dtype=torch.float64))


def test_errors():
    with pytest.raises(MoleculeError, match="fragments"):
        sample_conformers("CCN.Cl", 10)
    with pytest.raises(MoleculeError, match="hydrogens"):
        sample_conformers(Chem.MolFromSmiles(SMI), 10)
    with pytest.raises(ValueError, match="method"):
        sample_conformers(SMI, 10, method="mcmc")
    t = TorsionTarget.from_smiles("CCc1ccccc1")
    with pytest.raises(ValueError, match="event shape"):
        sample_conformers(t, 10, proposal=torch.distributions.Uniform(torch.zeros(2), torch.ones(2)).expand([2]))
