"""Boltzmann generators: exact densities of the coupling flow and of the Cartesian proposal,
round trips, checkpoints that refuse another system, resumable training, and the shipped
alanine-dipeptide flows as importance-sampling proposals."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mcsample as mc
from mcsample.flows import training
from mcsample.flows.boltzmann_generator import LOG_RIGID_VOLUME, BoltzmannGenerator
from mcsample.flows.coupling import CouplingConfig, CouplingSplineFlow

openmm = pytest.importorskip("openmm")


@pytest.fixture(scope="module")
def ala2():
    from mcsample.systems.peptides import alanine_dipeptide

    return alanine_dipeptide("vacuum")


def _randomize(module, sd, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(sd * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _frames(peptide, n=256, sd=0.003, seed=0):
    g = torch.Generator().manual_seed(seed)
    return peptide.positions[None] + sd * torch.randn(n, peptide.n_atoms, 3, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------ coupling flow


def test_coupling_flow_integrates_to_one_on_line_times_circle():
    """∫∫ q(x, θ) dx dθ = 1 by quadrature on R × T for a flow with random weights."""
    flow = _randomize(CouplingSplineFlow(CouplingConfig(circular=[False, True], layers=4, hidden=16)), 0.2, 0).double()
    xs = torch.linspace(-14, 14, 1401, dtype=torch.float64)
    ts = torch.linspace(-math.pi, math.pi, 721, dtype=torch.float64)[:-1]
    X, T = torch.meshgrid(xs, ts, indexing="ij")
    with torch.no_grad():
        lp = flow.log_prob(torch.stack([X.reshape(-1), T.reshape(-1)], -1))
    integral = float(lp.exp().sum() * (xs[1] - xs[0]) * (ts[1] - ts[0]))
    assert abs(integral - 1.0) < 2e-3


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), n_circ=st.integers(0, 5), n_real=st.integers(0, 5))
def test_coupling_flow_round_trip_and_log_density(seed, n_circ, n_real):
    """invert(transform(x)) = x (angles mod 2π) and sample_and_log_prob agrees with log_prob."""
    if n_circ + n_real < 2:
        n_real = 2
    circ = [True] * n_circ + [False] * n_real
    flow = _randomize(
        CouplingSplineFlow(CouplingConfig(circular=circ, layers=4, hidden=16, seed=seed)), 0.3, seed
    ).double()
    x, lq = flow.sample_and_log_prob((64,), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert torch.allclose(flow.log_prob(x), lq, atol=1e-8)
        u, _ = flow.transform(x)
        back, _ = flow.invert(u)
    d = back - x
    d = torch.where(flow.circular, torch.remainder(d + math.pi, 2 * math.pi) - math.pi, d)
    assert float(d.abs().max()) < 1e-8
    c = flow.circular
    assert bool(((x[:, c] >= -math.pi) & (x[:, c] < math.pi)).all())


def test_coupling_flow_is_periodic_in_angles():
    flow = _randomize(
        CouplingSplineFlow(CouplingConfig(circular=[True, False, True], layers=4, hidden=16)), 0.5, 1
    ).double()
    x = flow.sample((32,), generator=torch.Generator().manual_seed(0))
    shifted = x + torch.tensor([2 * math.pi, 0.0, -4 * math.pi], dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(flow.log_prob(shifted), flow.log_prob(x), atol=1e-9)


# ------------------------------------------------------------------------------ Cartesian proposal


def test_cartesian_density_is_the_change_of_variables(ala2):
    """log q(x) equals log p0(u) + log Haar(p) − log|det ∂x/∂(u, t, p, q, γ)| by autograd."""
    bg = BoltzmannGenerator.from_data(ala2, _frames(ala2), layers=4, hidden=32)
    _randomize(bg.flow, 0.2, 3)
    bg = bg.double()
    flow = bg.flow
    g = torch.Generator().manual_seed(5)
    u = flow.sample_base(1, generator=g).double()
    rigid = torch.tensor([[0.1, -0.2, 0.3, 1.1, 0.4, -2.0]], dtype=torch.float64)
    inputs = torch.cat([rigid, u], dim=-1)[0]

    def to_x(v):
        z_int, _ = flow.invert(v[None, 6:])
        x, _ = bg.ic.to_cartesian(torch.cat([v[None, :6], z_int], dim=-1))
        return x.reshape(-1)

    jac = torch.autograd.functional.jacobian(to_x, inputs)
    log_det = torch.linalg.slogdet(jac)[1]
    log_base = float(flow._base_log_prob(u)[0])
    haar = math.log(math.sin(1.1)) - LOG_RIGID_VOLUME  # translation: uniform over 1 nm³
    expected = log_base + haar - float(log_det)
    with torch.no_grad():
        x = to_x(inputs).reshape(1, -1, 3)
        got = float(bg.log_prob(x)[0])
    assert got == pytest.approx(expected, abs=1e-6)


def test_log_prob_is_invariant_under_rigid_motions_and_matches_sampling(ala2):
    bg = BoltzmannGenerator.from_data(ala2, _frames(ala2), layers=4, hidden=32)
    _randomize(bg.flow, 0.1, 4)
    x, lq = bg.sample_and_log_prob((128,), generator=torch.Generator().manual_seed(0))
    assert x.shape == (128, 22, 3) and x.dtype == torch.float64
    with torch.no_grad():
        assert torch.allclose(bg.log_prob(x), lq, atol=2e-3)
        R = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0]
        moved = x @ R.T + torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
        assert torch.allclose(bg.log_prob(moved), bg.log_prob(x), atol=2e-3)


def test_float32_round_trip_to_1e5_nm(ala2):
    """x → internal → latent → internal → x reproduces positions to 1e-5 nm (flow in float32)."""
    bg = BoltzmannGenerator.from_data(ala2, _frames(ala2), layers=4, hidden=32)
    _randomize(bg.flow, 0.1, 2)
    x = _frames(ala2, n=64, sd=0.01, seed=3)
    with torch.no_grad():
        z = bg.ic.to_internal(x)
        u, _ = bg.flow.transform(z[:, 6:])
        assert u.dtype == torch.float32
        z_back, _ = bg.flow.invert(u)
        x_back, _ = bg.ic.to_cartesian(torch.cat([z[:, :6], z_back.double()], dim=-1))
    assert float((x_back - x).abs().max()) < 1e-5


def test_bad_positions_are_refused(ala2):
    bg = BoltzmannGenerator.from_data(ala2, _frames(ala2), layers=2, hidden=8)
    with pytest.raises(ValueError, match="shape"):
        bg.log_prob(torch.zeros(3, 21, 3))
    x = _frames(ala2, n=4)
    x[2, 5, 0] = float("nan")
    with pytest.raises(ValueError, match="1 of 4 configurations"):
        bg.log_prob(x)


# ------------------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip_and_refuses_another_system(ala2, tmp_path):
    from mcsample.systems.peptides import alanine_dipeptide

    bg = BoltzmannGenerator.from_data(ala2, _frames(ala2), layers=2, hidden=16)
    _randomize(bg.flow, 0.1, 0)
    path = tmp_path / "flow.pt"
    training.save_flow(bg, path, meta={"what": "test"})
    back = training.load_flow(path, system=ala2)
    assert back.meta == {"what": "test"}
    x = _frames(ala2, n=16)
    with torch.no_grad():
        assert torch.equal(back.log_prob(x), bg.log_prob(x))
    with pytest.raises(ValueError, match="system_sha256"):
        training.load_flow(path, system=alanine_dipeptide("obc1"))
    with pytest.raises(ValueError, match="temperature_K"):
        training.load_flow(path, system=alanine_dipeptide("vacuum", temperature=350.0))


def _interrupting(model, after: int):
    """A model whose log_prob raises on call number ``after`` (a simulated crash)."""
    calls = {"n": 0}
    original = model.log_prob

    def log_prob(x):
        calls["n"] += 1
        if calls["n"] == after:
            raise KeyboardInterrupt
        return original(x)

    model.log_prob = log_prob
    return model


def test_maximum_likelihood_resumes_exactly(ala2, tmp_path):
    data = _frames(ala2, n=512, sd=0.005)
    kw = dict(steps=20, batch_size=32, lr=1e-3, checkpoint_every=5, progress=False)

    def fresh():
        torch.manual_seed(0)
        return BoltzmannGenerator.from_data(ala2, data, layers=2, hidden=16)

    straight = fresh()
    training.fit_maximum_likelihood(straight, data, generator=torch.Generator().manual_seed(0), **kw)
    path = tmp_path / "ml.pt"
    crashed = _interrupting(fresh(), after=13)
    with pytest.raises(KeyboardInterrupt):
        training.fit_maximum_likelihood(
            crashed, data, generator=torch.Generator().manual_seed(0), checkpoint=path, **kw
        )
    resumed = fresh()
    training.fit_maximum_likelihood(resumed, data, generator=torch.Generator().manual_seed(0), checkpoint=path, **kw)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="lr"):
        training.fit_maximum_likelihood(
            fresh(), data, generator=torch.Generator().manual_seed(0), checkpoint=path, **{**kw, "lr": 2e-3}
        )


def test_snis_refit_resumes_exactly(ala2, tmp_path):
    data = _frames(ala2, n=512, sd=0.005)
    kw = dict(
        betas=(0.5, 1.0),
        rounds_per_beta=2,
        num_samples=256,
        buffer_size=128,
        steps_per_round=3,
        batch_size=32,
        progress=False,
    )

    def fresh():
        torch.manual_seed(0)
        return BoltzmannGenerator.from_data(ala2, data, layers=2, hidden=16)

    straight = fresh()
    training.fit_snis(straight, ala2.log_prob, generator=torch.Generator().manual_seed(0), **kw)
    path = tmp_path / "snis.pt"
    crashed = _interrupting(fresh(), after=9)
    with pytest.raises(KeyboardInterrupt):
        training.fit_snis(crashed, ala2.log_prob, generator=torch.Generator().manual_seed(0), checkpoint=path, **kw)
    resumed = fresh()
    training.fit_snis(resumed, ala2.log_prob, generator=torch.Generator().manual_seed(0), checkpoint=path, **kw)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_short_training_lowers_validation_nll(ala2):
    """Maximum likelihood on MD frames (20 ps of OpenMM Langevin MD) lowers the held-out NLL."""
    from mcsample.systems.md import run_md

    md = run_md(ala2, 20.0, report_interval_ps=0.05, generator=torch.Generator().manual_seed(0), progress=False)
    x = ala2.from_mdtraj(md.trajectory)
    train, valid = x[::2], x[1::2]
    bg = BoltzmannGenerator.from_data(ala2, train, layers=4, hidden=64)
    before = training.validation_nll(bg, valid)
    hist = training.fit_maximum_likelihood(
        bg,
        train,
        valid=valid,
        steps=150,
        batch_size=64,
        lr=2e-3,
        valid_every=50,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    after = hist.valid_metric[-1]
    # the identity flow is a product of Gaussians and uniform torsions: training must beat it
    assert after < before - 5.0, (before, after)


# ------------------------------------------------------------------------------ shipped flows


@pytest.mark.parametrize("solvent", ["obc1", "vacuum"])
def test_shipped_flow_importance_sampling(solvent):
    """The shipped flow's IS on its own system: ESS above 1% of 10⁴ draws, finite log Z."""
    from mcsample.flows import pretrained
    from mcsample.systems.peptides import alanine_dipeptide

    peptide = alanine_dipeptide(solvent)
    flow = pretrained("alanine_dipeptide", solvent=solvent)
    ws = mc.importance_sample(peptide, flow, 10_000, batch_size=5000, generator=torch.Generator().manual_seed(0))
    assert float(ws.ess) > 100
    assert math.isfinite(float(ws.log_evidence)) and float(ws.log_evidence_stderr) < 0.5


def test_sample_peptide_is_and_smc_agree_on_the_evidence(tmp_path):
    """IS and SMC from the shipped OBC1 flow estimate the same log Z (within 5 combined stderr)
    and write PDB + weights JSON that read back."""
    import json

    from mcsample.systems.peptides import alanine_dipeptide

    peptide = alanine_dipeptide("obc1")
    g = torch.Generator().manual_seed(1)
    ens_is = mc.sample_peptide(peptide, 4000, "is", generator=g)
    ens_smc = mc.sample_peptide(peptide, 500, "smc", generator=g)
    a, b = ens_is.diagnostics, ens_smc.diagnostics
    assert a.energy_evaluations == 4000 and b.energy_evaluations > 500
    assert abs(a.log_evidence - b.log_evidence) < 5 * math.hypot(a.log_evidence_stderr, b.log_evidence_stderr)
    assert ens_is.positions.shape == (4000, 22, 3)
    assert float(ens_is.weights.sum()) == pytest.approx(1.0)
    pops = ens_smc.basin_populations()
    assert sum(v for v, _ in pops.values()) == pytest.approx(1.0)
    written = ens_is.save(tmp_path / "samples.pdb")
    meta = json.loads((tmp_path / "samples.weights.json").read_text())
    assert len(meta["weights"]) == 4000 and str(tmp_path / "samples.pdb") in written
    from rdkit import Chem

    ens_smc.save(tmp_path / "smc.sdf")
    mols = list(Chem.SDMolSupplier(str(tmp_path / "smc.sdf"), removeHs=False, sanitize=False))
    assert len(mols) == 500 and mols[0].GetNumAtoms() == 22
    total = sum(m.GetDoubleProp("boltzmann_weight") for m in mols)
    assert total == pytest.approx(1.0, abs=1e-6)


def test_sample_peptide_refuses_a_flow_for_another_system():
    from mcsample.flows import pretrained
    from mcsample.systems.peptides import alanine_dipeptide

    with pytest.raises(ValueError, match="system_sha256"):
        mc.sample_peptide(alanine_dipeptide("vacuum"), 10, proposal=pretrained("alanine_dipeptide", solvent="obc1"))
    with pytest.raises(ValueError, match="method"):
        mc.sample_peptide(alanine_dipeptide("vacuum"), 10, method="mcmc")


def test_sample_peptide_num_samples_is_a_deprecated_alias():
    """``num_samples=`` warns, names ``num_particles``, and gives the same weighted samples."""
    from mcsample.systems.peptides import alanine_dipeptide

    peptide = alanine_dipeptide("vacuum")
    new = mc.sample_peptide(peptide, num_particles=64, generator=torch.Generator().manual_seed(2))
    with pytest.warns(DeprecationWarning, match="num_particles"):
        old = mc.sample_peptide(peptide, num_samples=64, generator=torch.Generator().manual_seed(2))
    assert len(old.samples) == 64 and torch.equal(old.samples.samples, new.samples.samples)
    assert torch.equal(old.weights, new.weights)
    with pytest.raises(TypeError, match="not both"):
        mc.sample_peptide(peptide, 64, num_samples=64)


def test_basins_partition_the_torus():
    from mcsample.peptide_sampling import BASINS, basin_index

    g = torch.Generator().manual_seed(0)
    phi = (torch.rand(10_000, generator=g) * 2 - 1) * math.pi
    psi = (torch.rand(10_000, generator=g) * 2 - 1) * math.pi
    idx = basin_index(phi, psi)
    assert set(idx.unique().tolist()) == set(range(len(BASINS)))
    deg = math.pi / 180
    centres = {"C5": (-155, 160), "C7eq": (-83, 73), "alphaR": (-70, -40), "C7ax": (70, -70), "alphaL": (60, 50)}
    for k, name in enumerate(BASINS):
        p, s = centres[name]
        assert int(basin_index(torch.tensor([p * deg]), torch.tensor([s * deg]))) == k


@pytest.mark.parametrize(
    "argv,message",
    [
        (["peptide", "no_such_peptide"], "no shipped flow"),
        (["peptide", "missing.pdb"], "no such file"),
        (["peptide", "alanine_dipeptide", "-n", "0"], "at least 2"),
        (["peptide", "alanine_dipeptide", "-o", "out.mol2"], ".pdb, .dcd, .xtc, .sdf"),
    ],
)
def test_peptide_cli_bad_input_gets_one_line(argv, message, capsys, tmp_path, monkeypatch):
    from mcsample.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_peptide_cli_writes_samples(tmp_path, capsys):
    from mcsample.cli import main

    out = tmp_path / "ala.pdb"
    assert main(["peptide", "alanine_dipeptide", "-n", "200", "-o", str(out)]) == 0
    assert out.exists() and (tmp_path / "ala.weights.json").exists()
    assert "ΔF" in capsys.readouterr().out
    assert main(["peptide", "alanine_dipeptide", "-n", "200", "-o", str(out)]) == 2  # no --overwrite


def test_engine_smc_on_cartesian_coordinates_matches_importance_sampling():
    """mc.smc(peptide, flow) with the engine's default MALA moves, straight on Cartesian
    coordinates, estimates the same log Z as importance sampling (5 combined stderr)."""
    from mcsample.flows import pretrained
    from mcsample.systems.peptides import alanine_dipeptide

    peptide = alanine_dipeptide("obc1")
    flow = pretrained("alanine_dipeptide", solvent="obc1")
    res = mc.smc(peptide, flow, 400, generator=torch.Generator().manual_seed(2))
    ws = mc.importance_sample(peptide, flow, 4000, generator=torch.Generator().manual_seed(3))
    diff = float(res.log_evidence) - float(ws.log_evidence)
    assert abs(diff) < 5 * math.hypot(float(res.log_evidence_stderr), float(ws.log_evidence_stderr))
    assert res.particles.samples.shape == (400, 22, 3)
