"""The harmonic completion of a peptide's stiff internal coordinates and the transferable flow
over free torsions that it completes: the conditional is the Gaussian it claims, it sits at the
force field's minimum, it matches the Boltzmann conditional well enough for importance sampling,
and the completed proposal's density is exact through the Cartesian round trip."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("openmm")
pytest.importorskip("zuko")

import mcsample as mc  # noqa: E402
from mcsample.flows.harmonic import HarmonicCompletion  # noqa: E402
from mcsample.flows.training import load_flow, save_flow  # noqa: E402
from mcsample.flows.transferable import (  # noqa: E402
    CompletedFlow,
    PackedFlow,
    TransferableConfig,
    TransferableFlow,
    pack,
)
from mcsample.systems.coordinates import InternalCoordinateTarget, zmatrix_from_topology  # noqa: E402
from mcsample.systems.peptides import Peptide  # noqa: E402


@pytest.fixture(scope="module")
def peptides():
    return {
        s: Peptide.from_sequence(s, caps=False, solvent="obc1", temperature=310.0, cutoff=2.0) for s in ("AL", "GW")
    }


def _free_flow(seed: int = 0) -> TransferableFlow:
    """A free-torsion flow away from the identity (its last layers start at zero)."""
    torch.manual_seed(seed)
    flow = TransferableFlow(TransferableConfig(layers=4, width=32, cells="free"))
    for c in flow.conditioners:
        torch.nn.init.normal_(c.out.weight, std=0.05)
        torch.nn.init.normal_(c.out.bias, std=0.3)
    return flow.double()


@pytest.fixture(scope="module")
def bound(peptides):
    """The AL proposal's completed flow (tokens and Hessian computed once)."""
    return _free_flow().bind(peptides["AL"])


def _rotated(completion: HarmonicCompletion, shift: float, n: int, seed: int) -> torch.Tensor:
    """The minimized structure with its free torsions moved by up to ``shift`` rad."""
    z = completion.z0.repeat(n, 1)
    free = torch.ones(z.shape[1], dtype=torch.bool)
    free[completion.stiff] = False
    g = torch.Generator().manual_seed(seed)
    z[:, free] += shift * (2 * torch.rand(n, int(free.sum()), generator=g, dtype=z.dtype) - 1)
    return z


def test_completion_draws_the_gaussian_it_scores(bound):
    """complete() returns log N(h; mu(s), Sigma) of its draws: equal to log_prob() on them and to
    torch's MultivariateNormal with the same mean and covariance."""
    c = bound.completion
    z = _rotated(c, 0.3, 6, 0)
    zc, lq = c.complete(z, torch.Generator().manual_seed(1))
    free = torch.ones(z.shape[1], dtype=torch.bool)
    free[c.stiff] = False
    torch.testing.assert_close(zc[:, free], z[:, free], rtol=0, atol=0)
    torch.testing.assert_close(c.log_prob(zc), lq, atol=1e-8, rtol=0)
    mu = c.mean(z)
    mvn = torch.distributions.MultivariateNormal(mu, covariance_matrix=c.cov)
    # stiff torsions are wrapped onto the circle: their offset from the mean is the short way round
    h = zc[:, c.stiff]
    offset = torch.where(c.periodic, torch.remainder(h - mu + math.pi, 2 * math.pi) - math.pi, h - mu)
    torch.testing.assert_close(mvn.log_prob(mu + offset), lq, atol=1e-6, rtol=0)


def test_local_hessian_draws_the_density_it_scores(bound, peptides):
    """With hessian="local" every draw has its own covariance, the inverse Hessian at
    (s, mu(s)): complete() and log_prob() agree, and at the minimized structure's own free
    torsions that precision is the reference one."""
    from mcsample.systems.coordinates import zmatrix_from_topology as zmat

    c = bound.completion
    free = torch.ones(c.z0.shape[0], dtype=torch.bool)
    free[c.stiff] = False
    local = HarmonicCompletion(peptides["AL"], zmat(peptides["AL"].topology), free, hessian="local")
    z = _rotated(c, 0.3, 4, 5)
    zc, lq = local.complete(z, torch.Generator().manual_seed(6))
    torch.testing.assert_close(local.log_prob(zc), lq, atol=1e-6, rtol=0)
    _, evals, _, _ = local.gaussian(c.z0[None])
    torch.testing.assert_close(evals[0].log(), c.evals.log(), atol=0.05, rtol=0)


def test_relaxation_stays_at_the_minimized_structure(bound):
    """At the minimized structure's own free torsions mu(s) is that structure's stiff
    coordinates, within a tenth of their harmonic widths."""
    c = bound.completion
    mu = c.mean(c.z0[None])[0]
    width = torch.sqrt(torch.diagonal(c.cov))
    assert float(((mu - c.z0[c.stiff]) / width).abs().max()) < 0.1


def test_laplace_conditional_is_close_to_the_boltzmann_conditional(bound, peptides):
    """Importance weights pi(s, h) / q(h | s) at fixed free torsions (the minimized structure's,
    and ones moved by up to 0.4 rad) keep a normalized ESS above 40 % of 512 draws: the stiff
    coordinates' Boltzmann conditional is nearly the Gaussian (measured: 60-73 %)."""
    c = bound.completion
    target = InternalCoordinateTarget(
        peptides["AL"], zmatrix=zmatrix_from_topology(peptides["AL"].topology), fix_rigid=True
    )
    for shift, seed in ((0.0, 0), (0.4, 1), (0.4, 2)):
        z = _rotated(c, shift, 1, seed).repeat(512, 1)
        zc, lq = c.complete(z, torch.Generator().manual_seed(seed + 10))
        with torch.no_grad():
            lw = target.log_prob(zc) - lq
        assert float(mc.ess(lw)) / 512 > 0.4, (shift, seed, float(mc.ess(lw)) / 512)


def test_completed_proposal_density_is_exact(bound, peptides):
    """The Cartesian proposal's log_prob reproduces the log-density of its draws (flow over the
    free torsions times the completion, Jacobian of the internal coordinates included), and the
    flow's change of variables over the free torsions is its autograd Jacobian."""
    flow = bound.bound.flow
    prop = flow.proposal(peptides["AL"], tokens=bound.tokens)
    assert isinstance(prop.flow, CompletedFlow)
    x, lq = prop.sample_and_log_prob((8,), torch.Generator().manual_seed(3))
    torch.testing.assert_close(prop.log_prob(x), lq, atol=1e-6, rtol=0)
    b = bound.bound
    free = torch.ones(b.event_shape[0], dtype=torch.bool)
    free[bound.completion.stiff] = False
    z = prop.internal(x[:1])

    def on_free(v):
        full = z[0].clone()
        full[free] = v
        return b.transform(full[None])[0][0][free]

    J = torch.autograd.functional.jacobian(on_free, z[0, free])
    _, ladj = b.transform(z)
    assert float(torch.linalg.slogdet(J)[1]) == pytest.approx(float(ladj.detach()), abs=1e-8)
    lp = b.log_prob(z)
    u, _ = b.transform(z)
    # the base: uniform on each free torsion and on the k wells of a symmetric rotor
    k = b.tokens.from_cells(b.tokens.period[None].double())[0][free]
    base = float((math.log(2 * math.pi) + torch.log(k)).sum())
    assert float(lp.detach()) == pytest.approx(float(ladj.detach()) - base, abs=1e-8)
    assert u.shape == z.shape


def test_free_flow_padding_and_checkpoint(peptides, tmp_path):
    """A peptide's free-torsion density alone equals its density in a padded batch with a
    longer peptide, and a checkpoint restores the architecture (cells="free") and weights."""
    flow = _free_flow(1)
    toks = [flow.tokenize(peptides[s]) for s in ("AL", "GW")]
    zs = [
        flow.bind(peptides[s], t).bound.sample((3,), torch.Generator().manual_seed(i))
        for i, (s, t) in enumerate(zip(("AL", "GW"), toks))
    ]
    batched = PackedFlow(flow, toks).log_prob(pack(toks, zs).double())
    for i, (s, t) in enumerate(zip(("AL", "GW"), toks)):
        alone = flow.bind(peptides[s], t).bound.log_prob(zs[i])
        torch.testing.assert_close(batched[3 * i : 3 * i + 3], alone, atol=1e-8, rtol=0)
    save_flow(flow, tmp_path / "free.pt", meta={})
    back = load_flow(tmp_path / "free.pt").double()
    assert back.architecture.cells == "free"
    bb = back.bind(peptides["GW"], toks[1]).bound
    torch.testing.assert_close(bb.log_prob(zs[1]), flow.bind(peptides["GW"], toks[1]).bound.log_prob(zs[1]))


def test_smc_and_snis_take_the_completed_proposal(bound, peptides):
    """sample_peptide runs SMC (MALA drift through the flow with mu(s) held fixed) and SNIS
    fine-tuning on the completed proposal, returning finite weights of the right shape."""
    prop = bound.bound.flow.proposal(peptides["AL"], tokens=bound.tokens)
    ens = mc.sample_peptide(
        peptides["AL"],
        32,
        method="finetune+smc",
        proposal=prop,
        finetune_rounds=1,
        smc_steps=1,
        generator=torch.Generator().manual_seed(4),
    )
    assert ens.samples.samples.shape == (32, peptides["AL"].n_atoms, 3)
    assert bool(torch.isfinite(ens.samples.log_weights).any())
    assert ens.diagnostics.energy_evaluations > 32


def test_maximum_likelihood_of_the_free_torsions_lowers_held_out_nll(peptides):
    """Frames of two peptides (short Langevin runs near their minima) trained jointly on their
    free torsions: the mean NLL of held-out frames starts at the uniform density's (k log 2π for k
    free torsions: the untrained flow is the identity) and falls by more than 8 nats."""
    from mcsample.flows.training import fit_maximum_likelihood
    from mcsample.systems.coordinates import InternalCoordinates
    from mcsample.systems.md import run_md

    torch.manual_seed(0)
    flow = TransferableFlow(TransferableConfig(layers=4, width=16, depth=1, cells="free"))
    tokens, train, valid = [], [], []
    for p in peptides.values():
        md = run_md(
            p, time_ps=2.0, report_interval_ps=0.02, equilibration_ps=0.5, generator=torch.Generator().manual_seed(0)
        )
        x = torch.as_tensor(md.trajectory.xyz, dtype=torch.float64)
        z = InternalCoordinates(zmatrix_from_topology(p.topology)).to_internal(x)[:, 6:].float()
        tokens.append(flow.tokenize(p))
        train.append(z[::2])
        valid.append(z[1::2])
    model = PackedFlow(flow, tokens)
    rows_train, rows_valid = pack(tokens, train), pack(tokens, valid)
    with torch.no_grad():
        before = float(-model.log_prob(rows_valid).mean())
    uniform = sum(int(t.valid.sum()) * len(v) for t, v in zip(tokens, valid)) / sum(map(len, valid))
    assert before == pytest.approx(uniform * math.log(2 * math.pi), abs=1e-3)
    fit_maximum_likelihood(
        model, rows_train, steps=60, batch_size=32, lr=5e-3, progress=False, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        after = float(-model.log_prob(rows_valid).mean())
    assert after < before - 8, (before, after)  # measured: 15.6 -> 1.9


def test_proline_ring_gets_both_puckers_and_planar_rings_one(peptides):
    """A proline ring (non-planar) adds the mirror pucker as a second mixture component, whose
    draws and scores agree; the planar indole ring of tryptophan adds none."""
    gw = _free_flow().bind(peptides["GW"]).completion
    assert gw.components == 1
    pa = Peptide.from_sequence("PA", caps=False, solvent="obc1", temperature=310.0, cutoff=2.0)
    c = _free_flow().bind(pa).completion
    assert c.components == 2
    ring = (c.starts[0] - c.starts[1]).abs() > 1e-9
    assert int(ring.sum()) >= 1 and bool((c.starts[1][ring] == -c.starts[0][ring]).all())
    z = _rotated(c, 0.2, 6, 7)
    zc, lq = c.complete(z, torch.Generator().manual_seed(8))
    torch.testing.assert_close(c.log_prob(zc), lq, atol=1e-6, rtol=0)
    weights = c._log_mix([c.gaussian(z, k) for k in range(2)]).exp()
    torch.testing.assert_close(weights.sum(0), torch.ones(6, dtype=weights.dtype))
