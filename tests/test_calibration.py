"""Single-run error bars of the log-evidence are calibrated.

Every particle algorithm reports :math:`\\log\\hat Z` with a standard error computed from the
one run (:class:`mcsample.weighted.Genealogy`). Here each algorithm runs with R = 100 fixed seeds
on a small problem whose :math:`\\log Z` is exact, and the fraction of runs with
:math:`|\\log\\hat Z - \\log Z| < 2\\,\\mathrm{stderr}` must lie in [0.85, 0.99] (0.954 for a
Gaussian error with a known standard deviation; a little less when it is estimated).

False failures: the number of covered runs is Binomial(100, p). For a calibrated estimator
(p between 0.92 and 0.95) it falls outside [85, 99] with probability below 0.6 %; an estimator
with p = 0.90 fails 4 % of the seed sets, one with p = 0.97 (too conservative) 5 %. The seeds
are fixed, so a failure is reproducible.

Problems (chosen so that the discretization bias of :math:`\\log\\hat Z` is small against its
spread, which no error bar can fix): annealed SMC on a Gaussian; the Feynman-Kac corrector for
a tempered 2-D Gaussian mixture; TDS on a Gaussian prior, where the model's own reverse chain
has an exact evidence at any number of steps; MCGdiff on the same prior (resampling at every
step, where Lee & Whiteley's multinomial correction drives the estimate below zero).
"""

from __future__ import annotations

import math

import pytest
import torch

import mcsample as mc
import mcsample.correctors as C
from mcsample import posterior as P
from mcsample.flows.diffusion.gmm import GaussianMixtureDiffusion
from mcsample.flows.diffusion.schedules import VPSchedule, time_grid
from mcsample.systems.analytic import Gaussian
from mcsample.systems.inverse_problems import DenseOperator, linear_gaussian_posterior
from mcsample.weighted import Genealogy

F64 = torch.float64
SEEDS = range(100)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: intra-op threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _coverage(run, exact: float) -> dict:
    """Run ``run(generator)`` for every seed; coverage of the 2-stderr interval and the error's
    mean and spread (a bias shows as a mean error comparable to the spread)."""
    errs, ses, online = [], [], True
    for seed in SEEDS:
        ws = run(torch.Generator().manual_seed(seed))
        errs.append(float(ws.log_evidence) - exact)
        ses.append(float(ws.log_evidence_stderr))
        online = online and ws.genealogy is not None and ws.genealogy.has_history
    e, s = torch.tensor(errs, dtype=F64), torch.tensor(ses, dtype=F64)
    return {
        "coverage": float((e.abs() < 2 * s).double().mean()),
        "mean_err": float(e.mean()),
        "sd_err": float(e.std()),
        "mean_se": float(s.mean()),
        "online": online,
    }


def _check(stats: dict) -> None:
    if not 0.85 <= stats["coverage"] <= 0.99 and not stats["online"]:
        pytest.xfail(
            "the algorithm records only time-0 ancestors (no Genealogy.start / resampled "
            f"record), so only Lee & Whiteley's estimator is available: {stats}"
        )
    assert 0.85 <= stats["coverage"] <= 0.99, stats


# -- the estimator on its own ------------------------------------------------------------------


def _independent_blocks(scheme: str, seed: int, n: int = 256, blocks: int = 24, sigma: float = 0.3):
    r"""Log-weights drawn afresh in every block (perfect mixing), lag 8 < 23 resampling events:
    the exact relative variance of :math:`\hat Z` is :math:`(1 + (e^{\sigma^2}-1)/N)^{B} - 1`.
    Returns the error of :math:`\log\hat Z`, the genealogy and the last log-weights."""
    g = torch.Generator().manual_seed(seed)
    gen = Genealogy.start(n, lag=8)
    err = 0.0
    for k in range(blocks):
        log_w = sigma * torch.randn(n, dtype=F64, generator=g)
        err += float(torch.logsumexp(log_w, 0)) - math.log(n) - sigma**2 / 2
        if k + 1 < blocks:
            gen = gen.resampled(log_w, mc.resample(log_w, n, scheme, g), scheme=scheme)
    return err, gen, log_w


@pytest.mark.parametrize("scheme", ["systematic", "stratified", "ssp", "residual", "multinomial"])
def test_independent_blocks_coverage_for_every_scheme(scheme):
    """With weights independent across 24 resampling blocks the 2-stderr interval covers the
    error in 85-99 % of 200 runs for every scheme (measured 0.91-0.96; with 200 runs a true
    0.91 falls below 0.85 with probability 1e-3). Lee & Whiteley's multinomial correction goes
    negative for the low-variance schemes (measured coverage 0-3 %, 52 % for multinomial)."""
    errs, ses = [], []
    for seed in range(200):
        err, gen, log_w = _independent_blocks(scheme, seed)
        errs.append(err)
        ses.append(float(gen.log_evidence_stderr(log_w)))
    cover = sum(abs(e) < 2 * s for e, s in zip(errs, ses)) / len(errs)
    assert 0.85 <= cover <= 0.99, cover


def test_equals_lee_whiteley_for_multinomial_within_the_lag():
    """Multinomial resampling, fewer events than the lag: the estimate is Lee & Whiteley's
    :math:`1-(N/(N-1))^g(1-\\sum_e S_e^2)` exactly (when positive)."""
    g = torch.Generator().manual_seed(3)
    gen = Genealogy.start(200, lag=8)
    for _ in range(5):
        log_w = 0.8 * torch.randn(200, dtype=F64, generator=g)
        gen = gen.resampled(log_w, mc.resample(log_w, 200, "multinomial", g), scheme="multinomial")
    log_w = 0.8 * torch.randn(200, dtype=F64, generator=g)
    lw = gen.lee_whiteley_variance(log_w)
    assert float(lw) > 0 and gen.generations == 6
    torch.testing.assert_close(gen.log_evidence_variance(log_w), lw, rtol=1e-12, atol=0)


def test_plain_importance_sampling_is_the_delta_method():
    """No resampling: :math:`\\widehat{\\mathrm{Var}}(w)/(N\\bar w^2)` with the unbiased
    sample variance."""
    log_w = torch.randn(50, dtype=F64, generator=torch.Generator().manual_seed(0))
    w = torch.exp(log_w)
    expected = w.var() / (50 * w.mean() ** 2)
    torch.testing.assert_close(Genealogy.start(50).log_evidence_variance(log_w), expected)


def test_degenerate_genealogy_falls_back_to_block_sum():
    """Every particle descends from one Eve after a long run with multinomial resampling of
    near-uniform weights, and the genealogy estimate says 1 (one lineage: no information). The
    sum of the blocks' delta-method variances is reported instead; here, with weights
    independent across blocks, it is the right answer, about 301 (e^{0.05^2} - 1) / 32."""
    g = torch.Generator().manual_seed(1)
    gen = Genealogy.start(32, lag=1000)
    for _ in range(300):
        log_w = 0.05 * torch.randn(32, dtype=F64, generator=g)
        gen = gen.resampled(log_w, mc.resample(log_w, 32, "multinomial", g), scheme="multinomial")
    log_w = 0.05 * torch.randn(32, dtype=F64, generator=g)
    assert gen.eves.unique().numel() == 1 and int(gen.lineages(log_w)) == 1
    assert float(gen.lag_variance(log_w)) == pytest.approx(1.0)
    v = gen.log_evidence_variance(log_w)
    torch.testing.assert_close(v, gen.block_variance(log_w))
    assert 0.5 * 301 * 0.05**2 / 32 < float(v) < 2 * 301 * 0.05**2 / 32


def test_checkpoint_round_trip_and_purity(tmp_path):
    """``to_dict`` holds plain tensors and numbers (``torch.load(weights_only=True)``);
    ``resampled`` returns a new object and leaves its input unchanged."""
    g = torch.Generator().manual_seed(0)
    gen = Genealogy.start(64, lag=3)
    for _ in range(6):
        log_w = torch.randn(64, dtype=F64, generator=g)
        before = gen.to_dict()
        new = gen.resampled(log_w, mc.resample(log_w, 64, "systematic", g))
        for k, v in gen.to_dict().items():
            assert torch.equal(v, before[k]) if isinstance(v, torch.Tensor) else v == before[k]
        gen = new
    torch.save(gen.to_dict(), tmp_path / "g.pt")
    back = Genealogy.from_dict(torch.load(tmp_path / "g.pt", weights_only=True))
    assert back.enochs.shape == (3, 64) and back.generations == 7
    torch.testing.assert_close(back.log_evidence_stderr(log_w), gen.log_evidence_stderr(log_w))


# -- the algorithms ----------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["systematic", "multinomial"])
def test_smc(scheme):
    """Annealed SMC (adaptive schedule, random-walk moves, N = 1024) from a broad Gaussian to a
    correlated 2-D Gaussian with a known normalizer. Measured coverage 0.91 (systematic) and
    0.92 (multinomial); the error bars run about 10 % short with three random-walk moves per
    step and the adaptive schedule (200 runs: 0.93 with a fixed schedule or 20 moves)."""
    target = Gaussian(
        torch.tensor([2.0, -1.0], dtype=F64), torch.tensor([[0.3, 0.1], [0.1, 0.2]], dtype=F64), log_scale=1.0
    )
    initial = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=F64), 9.0 * torch.eye(2, dtype=F64))
    stats = _coverage(
        lambda g: (
            mc.smc(
                target, initial, 1024, kernel=mc.kernels.RandomWalk(num_steps=3), scheme=scheme, generator=g
            ).particles
        ),
        float(target.log_normalizer),
    )
    _check(stats)


def _bimodal_2d():
    return GaussianMixtureDiffusion(
        [0.7, 0.3],
        torch.tensor([[-1.5, 0.5], [1.5, -0.5]], dtype=F64),
        torch.tensor([0.5, 0.5], dtype=F64),
        VPSchedule(),
    )


def _tempered_log_z(model, beta: float, t: float) -> float:
    """:math:`\\log\\int q_t(x)^\\beta dx` by a 2-D grid sum (spacing 0.02 over [-9, 9]^2)."""
    h = 0.02
    ax = torch.arange(-9.0, 9.0, h, dtype=F64)
    pts = torch.cartesian_prod(ax, ax)
    lp = beta * model.log_prob(pts, torch.full((pts.shape[0],), t, dtype=F64))
    return float(torch.logsumexp(lp, 0)) + 2 * math.log(h)


def test_fk_corrector():
    """The Feynman-Kac corrector for :math:`q^{1/2}` of a 2-D bimodal mixture (target-score
    SDE, 100 steps, N = 256, systematic resampling at ESS < N/2); the exact evidence by
    quadrature. Measured: mean error -0.12 against a spread of 0.20; coverage 0.93, Lee &
    Whiteley's estimator 0.81."""
    model = _bimodal_2d()
    grid = time_grid(VPSchedule(), 100, "uniform", t_min=1e-3)
    stats = _coverage(
        lambda g: C.fk_corrector(C.annealed(model, 0.5), 256, 2, grid, dtype=F64, generator=g),
        _tempered_log_z(model, 0.5, 1e-3),
    )
    _check(stats)


def _gaussian_problem():
    m = torch.tensor([1.0, -0.5, 0.3], dtype=F64)
    cov = torch.tensor([[1.0, 0.6, 0.1], [0.6, 0.8, 0.0], [0.1, 0.0, 0.5]], dtype=F64)
    model = GaussianMixtureDiffusion(torch.ones(1, dtype=F64), m[None], cov[None], VPSchedule("linear"))
    op = DenseOperator(torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.3, -0.8]], dtype=F64), 0.2)
    return model, op, torch.tensor([1.5, -0.4], dtype=F64), m, cov


def _model_chain_gaussian(sampler, m, cov):
    """Law of the sampler's reverse chain :math:`p_\\theta(x_0)` for a Gaussian prior: mean and
    covariance through its affine DDIM kernels (exact score), ending with
    :math:`\\hat x_0(x_{t_{\\min}})`."""
    d = m.numel()
    basis = torch.cat([torch.zeros(1, d, dtype=F64), torch.eye(d, dtype=F64)])
    mu, S = torch.zeros(d, dtype=F64), sampler.prior_std() ** 2 * torch.eye(d, dtype=F64)
    K = sampler.times.numel()
    for j in range(K):
        s = sampler.model.score(basis, sampler._t(basis, j))
        if j + 1 < K:
            mean, c, _ = sampler.kernel(basis, s, j, sampler.eta)
        else:
            mean, c = sampler.x0_from_score(basis, s, j), 0.0
        k0, M = mean[0], (mean[1:] - mean[0]).T
        mu, S = M @ mu + k0, M @ S @ M.T + c**2 * torch.eye(d, dtype=F64)
    return mu, S


def test_tds():
    """TDS (15 steps uniform in log-SNR, N = 256) against the exact evidence of its own reverse
    chain. Measured coverage 0.90; Lee & Whiteley's estimator 0.77 (systematic resampling)."""
    model, op, y, m, cov = _gaussian_problem()
    smp = P.TDS(model, op, y, num_steps=15, grid="log_snr")
    mu0, S0 = _model_chain_gaussian(smp, m, cov)
    exact = float(linear_gaussian_posterior(op.A, op.sigma_y, y, mu0, S0)[2])
    _check(_coverage(lambda g: smp.run(256, generator=g, dtype=F64), exact))


def test_mcgdiff():
    """MCGdiff (30 steps, resampling at every step, N = 256) on the Gaussian prior; exact
    :math:`\\log p(y)`. Measured coverage 0.91; Lee & Whiteley's estimator 0.17 (its
    multinomial correction over-corrects the 32 systematic resamplings)."""
    model, op, y, m, cov = _gaussian_problem()
    exact = float(linear_gaussian_posterior(op.A, op.sigma_y, y, m, cov)[2])
    _check(_coverage(lambda g: P.mcgdiff(model, op, y, 256, num_steps=30, generator=g, dtype=F64), exact))
