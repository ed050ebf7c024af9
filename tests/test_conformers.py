"""The conformer API: weights, diagnostics, SDF round trip, correctness of the weighting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("rdkit")
from rdkit import Chem  # noqa: E402

import mcsample as mc  # noqa: E402
from mcsample.systems.conformers import read_conformers, sample_conformers  # noqa: E402
from mcsample.systems.molecules import MoleculeError, TorsionTarget  # noqa: E402

SMI = "CCOc1ccccc1C(=O)N"  # 3 torsions


@pytest.fixture(scope="module")
def ensemble():
    mol = Chem.AddHs(Chem.MolFromSmiles(SMI))
    return sample_conformers(mol, 300, method="is", generator=torch.Generator().manual_seed(0))


def test_ensemble_contents(ensemble):
    assert ensemble.mol.GetNumConformers() == 300 == len(ensemble)
    w = ensemble.weights
    assert w.dtype == torch.float64 and abs(float(w.sum()) - 1) < 1e-12 and bool((w >= 0).all())
    props = torch.tensor(
        [c.GetDoubleProp("boltzmann_weight") for c in ensemble.mol.GetConformers()], dtype=torch.float64
    )
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
    ens = sample_conformers("CCc1ccccc1", 4000, method="is", generator=torch.Generator().manual_seed(1))
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


def test_engine_shim_forwards_without_importing_rdkit():
    """``mcsample.conformers`` (the old home) forwards to ``mcsample.systems.conformers``, and
    importing the engine with it does not import RDKit."""
    import subprocess
    import sys

    import mcsample.conformers as shim

    assert shim.sample_conformers is sample_conformers and shim.TorsionMoves.__module__ == "mcsample.systems.conformers"
    code = (
        "import sys, mcsample, mcsample.conformers; "
        "print('rdkit' in sys.modules, 'mcsample.systems.conformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_num_conformers_is_a_deprecated_alias_of_num_particles():
    """``num_conformers=`` warns, names ``num_particles``, and gives the same ensemble."""
    new = sample_conformers(SMI, num_particles=12, method="is", generator=torch.Generator().manual_seed(4))
    with pytest.warns(DeprecationWarning, match="num_particles"):
        old = sample_conformers(SMI, num_conformers=12, method="is", generator=torch.Generator().manual_seed(4))
    assert len(old) == 12 and torch.equal(old.torsions, new.torsions) and torch.equal(old.weights, new.weights)
    with pytest.raises(TypeError, match="not both"):
        sample_conformers(SMI, 12, num_conformers=12)


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


@pytest.mark.parametrize("beta", [0.4, 1.0])
def test_torsion_moves_leave_tempered_density_invariant(beta):
    """Start 4000 independent chains exactly at pi_beta ~ q^(1-beta) p^beta (inverse CDF on a
    fine grid), apply 4 TorsionMoves; the 24-bin histogram must still match pi_beta: Pearson
    chi-square, 23 dof, failing at p < 1e-5 (false-failure rate 1e-5; the seed is fixed)."""
    from scipy import stats

    from mcsample.kernels import evaluator
    from mcsample.protocols import Float64Proposal as _Float64
    from mcsample.systems.conformers import TorsionMoves, _as_proposal

    target = TorsionTarget.from_smiles("CCc1ccccc1")
    q = _Float64(_as_proposal(None, target))
    m = 24 * 200
    grid = (torch.arange(m, dtype=torch.float64) + 0.5) / m * 2 * math.pi - math.pi
    with torch.no_grad():
        log_pi = (1 - beta) * q.log_prob(grid[:, None]) + beta * target.log_prob(grid[:, None])
    prob = torch.softmax(log_pi, 0)
    g = torch.Generator().manual_seed(0)
    cell = torch.multinomial(prob, 4000, replacement=True, generator=g)
    x = (grid[cell] + (torch.rand(4000, generator=g, dtype=torch.float64) - 0.5) * 2 * math.pi / m)[:, None]
    evaluate = evaluator(target, q)
    kernel = TorsionMoves(num_steps=1, proposal=q)
    point = evaluate(x, False)
    for _ in range(4):
        point, _ = kernel.step(point, evaluate, beta, torch.tensor(0.8, dtype=torch.float64), None, g)
    assert float((point.x - x).abs().max()) > 0.1  # the chains moved
    y = torch.remainder(point.x[:, 0] + math.pi, 2 * math.pi) - math.pi
    counts = torch.histc(y, 24, -math.pi, math.pi).numpy()
    expected = prob.reshape(24, 200).sum(1).numpy() * 4000
    keep = expected > 5
    chi2 = (((counts - expected) ** 2 / expected)[keep]).sum() + abs(counts[~keep].sum() - expected[~keep].sum())
    assert stats.chi2.sf(chi2, int(keep.sum()) - 1) > 1e-5, chi2


def test_smc_expectation_matches_quadrature():
    """16 independent SMC runs (300 particles each) on ethylbenzene: the mean over runs of the
    weighted E[cos 2 theta] is within 5 standard errors (from the spread of the runs) of
    quadrature; with a t distribution of 15 dof the false-failure rate is ~2e-4."""
    target = TorsionTarget.from_smiles("CCc1ccccc1")
    est = []
    for r in range(16):
        ens = sample_conformers(target, 300, method="smc", generator=torch.Generator().manual_seed(100 + r))
        est.append(float((ens.weights * torch.cos(2 * ens.torsions[:, 0])).sum()))
    est = torch.tensor(est, dtype=torch.float64)
    g = torch.linspace(-math.pi, math.pi, 4001, dtype=torch.float64)[:-1][:, None]
    with torch.no_grad():
        p = torch.softmax(target.log_prob(g), 0)
    exact = float((p * torch.cos(2 * g[:, 0])).sum())
    se = float(est.std() / math.sqrt(16))
    assert abs(float(est.mean()) - exact) < 5 * se + 1e-4, (float(est.mean()), exact, se)


def test_cli_writes_sdf(tmp_path, capsys):
    from mcsample.systems.conformers import cli

    out = tmp_path / "c.sdf"
    assert cli(["CCOc1ccccc1", "-n", "20", "--method", "is", "-o", str(out)]) == 0
    mol, w = read_conformers(out)
    assert mol.GetNumConformers() == 20 and abs(float(w.sum()) - 1) < 1e-9
    assert "ESS" in capsys.readouterr().out
