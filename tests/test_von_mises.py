"""The von Mises mixture network: normalization, sampling vs density, RNG, checkpoints, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("rdkit")
from scipy import stats  # noqa: E402

from mcsample.flows.training_von_mises import (  # noqa: E402
    TrainingSet,
    fit_maximum_likelihood,
    parallel_tempering,
)
from mcsample.flows.von_mises import (  # noqa: E402
    DEFAULT_CHECKPOINT,
    VonMisesConfig,
    VonMisesNet,
    featurize,
    load_checkpoint,
    load_default,
    save_checkpoint,
)
from mcsample.systems.molecules import TorsionTarget  # noqa: E402

ONE = "CCc1ccccc1C(C)(C)O"  # 2 torsions (ethyl, C(CH3)2OH)
TWO = "OCCc1ccc(O)cc1"  # 2 torsions
ONE_TORSION = "CCc1ccccc1"  # 1 torsion: ethyl-phenyl


@pytest.fixture(scope="module")
def targets():
    return {s: TorsionTarget.from_smiles(s) for s in (ONE, TWO, ONE_TORSION)}


def _net(autoregressive, seed=0):
    torch.manual_seed(seed)
    return VonMisesNet(VonMisesConfig(hidden=32, num_layers=3, autoregressive=autoregressive)).eval()


def _grid(n):
    return torch.linspace(-math.pi, math.pi, n + 1)[:-1] + math.pi / n


@pytest.mark.parametrize("autoregressive", [False, True])
def test_log_prob_integrates_to_one_2d(targets, autoregressive):
    q = _net(autoregressive).proposal(targets[TWO])
    n = 200
    g = _grid(n)
    G = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        total = float(q.log_prob(G).double().exp().sum() * (2 * math.pi / n) ** 2)
    # midpoint rule on a smooth periodic integrand converges spectrally: error << 1e-4
    assert abs(total - 1.0) < 1e-4


def test_shipped_checkpoint_integrates_to_one(targets):
    q = load_default().proposal(targets[ONE_TORSION])
    g = _grid(2000)[:, None]
    with torch.no_grad():
        total = float(q.log_prob(g).double().exp().sum() * 2 * math.pi / 2000)
    assert abs(total - 1.0) < 1e-4


@pytest.mark.parametrize("autoregressive", [False, True])
def test_samples_follow_log_prob_chi_square(targets, autoregressive):
    """Joint 2D histogram (8 x 8 bins) of 20000 samples vs bin probabilities from the density
    (fine-grid quadrature). Pearson chi-square with 63 dof; failing at p < 1e-5 means a
    false-failure rate of 1e-5 for a correct sampler (the seed is fixed, so it is deterministic)."""
    q = _net(autoregressive, seed=1).proposal(targets[TWO])
    x = q.sample((20000,), generator=torch.Generator().manual_seed(0))
    assert x.shape == (20000, 2) and float(x.abs().max()) <= math.pi
    bins = 8
    edges = np.linspace(-math.pi, math.pi, bins + 1)
    counts, _, _ = np.histogram2d(x[:, 0].numpy(), x[:, 1].numpy(), bins=[edges, edges])
    m = 40  # quadrature points per bin per axis
    g = _grid(bins * m)
    G = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        dens = q.log_prob(G).double().exp().reshape(bins, m, bins, m).sum((1, 3)) * (2 * math.pi / (bins * m)) ** 2
    expected = dens.numpy() * 20000
    chi2 = ((counts - expected) ** 2 / expected).sum()
    p = stats.chi2.sf(chi2, bins * bins - 1)
    assert p > 1e-5, (chi2, p)


@pytest.mark.parametrize("autoregressive", [False, True])
def test_sample_and_log_prob_consistent_and_seeded(targets, autoregressive):
    q = _net(autoregressive).proposal(targets[ONE])
    state = torch.random.get_rng_state()
    x1, l1 = q.sample_and_log_prob((50,), generator=torch.Generator().manual_seed(3))
    x2, _ = q.sample_and_log_prob((50,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert torch.equal(x1, x2)
    with torch.no_grad():
        assert torch.allclose(q.log_prob(x1), l1, atol=1e-5)
        # periodic in every torsion
        assert torch.allclose(q.log_prob(x1 + 2 * math.pi), l1, atol=1e-4)


def test_autoregressive_conditionals_depend_on_earlier_torsions(targets):
    q = _net(True, seed=2).proposal(targets[TWO])
    th = torch.tensor([[0.0, 1.0], [2.5, 1.0]])
    with torch.no_grad():
        terms = q.log_prob_terms(th)
    assert abs(float(terms[0, 1] - terms[1, 1])) > 1e-4  # theta_1's factor sees theta_0
    q0 = _net(False, seed=2).proposal(targets[TWO])
    with torch.no_grad():
        t0 = q0.log_prob_terms(th)
    assert float((t0[0, 1] - t0[1, 1]).abs()) < 1e-6


def test_checkpoint_round_trip(tmp_path, targets):
    net = _net(True)
    path = tmp_path / "ck.pt"
    save_checkpoint(net, path, {"note": "test"}, half=False)
    back = load_checkpoint(path)
    x = torch.rand(10, 2) * 6 - 3
    with torch.no_grad():
        assert torch.allclose(net.proposal(targets[ONE]).log_prob(x), back.proposal(targets[ONE]).log_prob(x))
    assert back.meta == {"note": "test"}
    blob = torch.load(path, weights_only=True)
    assert blob["config"]["autoregressive"] is True


def test_shipped_checkpoint_is_small():
    assert DEFAULT_CHECKPOINT.exists()
    assert DEFAULT_CHECKPOINT.stat().st_size < 2_000_000


def test_zero_torsions():
    t = TorsionTarget.from_smiles("c1ccccc1")
    q = _net(False).proposal(t)
    x, lq = q.sample_and_log_prob((4,))
    assert x.shape == (4, 0) and torch.equal(lq, torch.zeros(4))


def test_maximum_likelihood_fits_von_mises_samples(targets):
    """Fit to 2000 draws of VonMises(1.0, 8) on the 1-torsion molecule: the fitted circular
    mean is within 0.1 rad and the NLL within 0.05 nats of the truth's (entropy ~ 0.78 nats)."""
    t = targets[ONE_TORSION]
    truth = torch.distributions.VonMises(torch.tensor(1.0), torch.tensor(8.0))
    torch.manual_seed(0)
    x = truth.sample((2000, 1))
    net = VonMisesNet(VonMisesConfig(hidden=16, num_layers=2, components=2))
    ts = TrainingSet(["m"], [featurize(t)], [x])
    log = fit_maximum_likelihood(
        net, ts, steps=150, lr=1e-2, batch=256, mirror=False, log_every=149, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        q = net.proposal(t)
        nll = float(-q.log_prob(x).mean())
        g = _grid(2000)[:, None]
        p = q.log_prob(g).exp()
        mean = math.atan2(float((p * torch.sin(g[:, 0])).sum()), float((p * torch.cos(g[:, 0])).sum()))
    true_nll = float(-truth.log_prob(x).mean())
    assert log[-1]["train_nll"] < log[0]["train_nll"]
    assert abs(mean - 1.0) < 0.1
    assert nll - true_nll < 0.05


def test_maximum_likelihood_seed_is_a_deprecated_alias_and_global_rng_untouched(targets):
    """``seed=s`` warns and trains exactly as ``generator=manual_seed(s)``; training (dropout
    included) leaves torch's global RNG where it was."""
    t = targets[ONE_TORSION]
    torch.manual_seed(1)
    x = torch.distributions.VonMises(torch.tensor(1.0), torch.tensor(8.0)).sample((200, 1))
    ts = TrainingSet(["m"], [featurize(t)], [x])

    def fit(**kw):
        torch.manual_seed(0)
        net = VonMisesNet(VonMisesConfig(hidden=8, num_layers=1, components=2, dropout=0.1))
        before = torch.get_rng_state()
        log = fit_maximum_likelihood(net, ts, steps=5, batch=32, mirror=False, log_every=1, **kw)
        assert torch.equal(torch.get_rng_state(), before)
        return log, net.state_dict()

    new_log, new_state = fit(generator=torch.Generator().manual_seed(3))
    with pytest.warns(DeprecationWarning, match="generator="):
        old_log, old_state = fit(seed=3)
    assert old_log == new_log and all(torch.equal(old_state[k], new_state[k]) for k in new_state)
    assert fit(generator=torch.Generator().manual_seed(4))[0] != new_log
    with pytest.raises(TypeError, match="torch.Generator"):
        fit(generator=3)


def test_parallel_tempering_matches_exact_marginal(targets):
    """1 torsion: PT histogram (16 bins) vs bin probabilities by quadrature of exp(log p).
    Each bin within 5 standard errors, with a conservative effective sample size of N/10
    for the correlated, thinned chains (false-failure rate below 1e-5 per bin)."""
    t = targets[ONE_TORSION]
    x, info = parallel_tempering(
        t,
        num_samples=4000,
        num_chains=32,
        num_replicas=4,
        burn_in=200,
        thin=2,
        generator=torch.Generator().manual_seed(0),
    )
    bins = 16
    counts = np.histogram(x[:, 0].numpy(), bins=bins, range=(-math.pi, math.pi))[0] / x.shape[0]
    g = _grid(bins * 50)[:, None].double()
    with torch.no_grad():
        lp = t.log_prob(g)
    p = torch.softmax(lp, 0).reshape(bins, 50).sum(1).numpy()
    se = np.sqrt(p * (1 - p) / (x.shape[0] / 10)) + 1e-4
    assert np.all(np.abs(counts - p) < 5 * se), (counts, p)
    assert 0.05 < info["local_acceptance"][0] < 0.95


@pytest.mark.parametrize("autoregressive", [False, True])
def test_training_objective_is_the_proposal_log_likelihood(targets, autoregressive):
    """The batched (independent) and padded (autoregressive) training NLL equals the mean of
    the proposal's own per-torsion log-densities on the same minibatch."""
    from mcsample.flows.training_von_mises import negative_log_likelihood

    net = _net(autoregressive, seed=4)
    graphs = [featurize(targets[ONE]), featurize(targets[ONE_TORSION])]
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(30, 2, generator=g) * 6 - 3, torch.rand(30, 1, generator=g) * 6 - 3]
    with torch.no_grad():
        got = float(negative_log_likelihood(net, graphs, xs, 10, torch.Generator().manual_seed(1)))
        gen = torch.Generator().manual_seed(1)
        terms = []
        for graph, x in zip(graphs, xs):
            idx = torch.randint(0, 30, (10,), generator=gen)
            terms.append(net.proposal(graph).log_prob_terms(x[idx]).reshape(-1))
    assert abs(got + float(torch.cat(terms).mean())) < 1e-5
