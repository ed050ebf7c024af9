"""Importance sampling against closed forms: evidence, unbiasedness, calibrated error bars.

Statistical checks use fixed seeds; bounds are >= 5 standard errors (two-sided false-failure
rate < 1e-6 per check under normality) unless stated.
"""

import math

import pytest
import torch

import mcsample as mc
from mcsample.systems.analytic import Gaussian

D = 3


def problem(log_scale=2.0):
    target = Gaussian(
        torch.tensor([0.5, -1.0, 0.3], dtype=torch.float64),
        torch.tensor([[1.0, 0.3, 0.0], [0.3, 0.8, 0.1], [0.0, 0.1, 0.5]], dtype=torch.float64),
        log_scale=log_scale,
    )
    proposal = torch.distributions.MultivariateNormal(
        torch.zeros(D, dtype=torch.float64), 2.0 * torch.eye(D, dtype=torch.float64)
    )
    return target, proposal


def test_log_evidence_matches_closed_form():
    target, proposal = problem()
    r = mc.importance_sample(target, proposal, 20_000, batch_size=3000, generator=torch.Generator().manual_seed(0))
    assert len(r) == 20_000 and r.samples.shape == (20_000, D)
    err = float(r.log_evidence - target.log_normalizer)
    assert abs(err) < 5 * float(r.log_evidence_stderr)
    assert float(r.log_evidence_stderr) < 0.05  # the bound above is not vacuous
    mean = r.expectation()
    assert bool(((mean.value - target.mean).abs() < 5 * mean.stderr).all())


def test_evidence_unbiased_and_errors_calibrated():
    target, proposal = problem(log_scale=0.0)
    g = torch.Generator().manual_seed(1)
    ratios, z_mean, z_logz = [], [], []
    for _ in range(300):
        r = mc.importance_sample(target, proposal, 400, generator=g)
        ratios.append(math.exp(float(r.log_evidence - target.log_normalizer)))
        est = r.expectation(lambda x: x[:, 0])
        z_mean.append(float((est.value - target.mean[0]) / est.stderr))
        z_logz.append(float((r.log_evidence - target.log_normalizer) / r.log_evidence_stderr))
    ratios = torch.tensor(ratios)
    # E[Z_hat] = Z: the mean ratio is 1 within 5 standard errors
    assert abs(float(ratios.mean()) - 1.0) < 5 * float(ratios.std()) / math.sqrt(len(ratios))
    # z-scores have variance 1: the sample variance of 300 z's has sd ~ sqrt(2/300) = 0.08
    for z in (torch.tensor(z_mean), torch.tensor(z_logz)):
        assert 0.6 < float(z.var()) < 1.4
        assert abs(float(z.mean())) < 5 / math.sqrt(len(z)) + 0.1


def test_streamed_statistics_equal_kept_samples():
    target, proposal = problem()
    kept = mc.importance_sample(target, proposal, 5000, batch_size=700, generator=torch.Generator().manual_seed(2))
    streamed = mc.importance_sample(
        target,
        proposal,
        5000,
        batch_size=700,
        generator=torch.Generator().manual_seed(2),
        keep_samples=False,
        statistics={"x2": lambda x: x**2},
    )
    assert streamed.samples is None
    assert torch.equal(kept.log_weights, streamed.log_weights)
    a, b = kept.expectation(lambda x: x**2), streamed.expectation("x2")
    assert torch.allclose(a.value, b.value, rtol=1e-10) and torch.allclose(a.stderr, b.stderr, rtol=1e-8)
    with pytest.raises(ValueError, match="kept no samples"):
        streamed.expectation(lambda x: x)
    with pytest.raises(KeyError, match="no streamed statistic 'x3'"):
        streamed.expectation("x3")


def test_streamed_statistic_infinite_where_weight_is_zero():
    # a half-space target: f = 1/x1 is inf or nan only where the target (and the weight) is zero
    class HalfGaussian:
        def log_prob(self, x):
            lp = -0.5 * (x**2).sum(-1)
            return torch.where(x[:, 0] > 0, lp, torch.full_like(lp, -math.inf))

    proposal = torch.distributions.MultivariateNormal(
        torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    )
    stat = lambda x: torch.where(x[:, :1] > 0, 1.0 / x[:, :1], torch.full_like(x[:, :1], math.nan))  # noqa: E731
    kw = dict(batch_size=300, generator=torch.Generator().manual_seed(4))
    kept = mc.importance_sample(HalfGaussian(), proposal, 2000, **kw)
    kw["generator"] = torch.Generator().manual_seed(4)
    streamed = mc.importance_sample(HalfGaussian(), proposal, 2000, keep_samples=False, statistics={"f": stat}, **kw)
    w = torch.softmax(kept.log_weights, 0)
    x1 = kept.samples[:, 0]
    expected = (w[x1 > 0] / x1[x1 > 0]).sum()
    est = streamed.expectation("f")
    assert torch.isfinite(est.value).all() and torch.isfinite(est.stderr).all()
    assert torch.allclose(est.value, expected.reshape(1), rtol=1e-10)


def test_reproducible_with_generator_and_resample():
    target, proposal = problem()
    a = mc.importance_sample(target, proposal, 1000, generator=torch.Generator().manual_seed(5))
    b = mc.importance_sample(target, proposal, 1000, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.samples, b.samples) and torch.equal(a.log_weights, b.log_weights)
    xs = a.resample(4000, "systematic", torch.Generator().manual_seed(0))
    assert xs.shape == (4000, D)
    assert a.log_weights.dtype == torch.float64


def test_num_samples_is_a_deprecated_alias_of_num_particles():
    """``num_samples=`` warns, names ``num_particles``, and draws exactly what it does."""
    target, proposal = problem()
    new = mc.importance_sample(target, proposal, num_particles=500, generator=torch.Generator().manual_seed(3))
    with pytest.warns(DeprecationWarning, match="num_particles"):
        old = mc.importance_sample(target, proposal, num_samples=500, generator=torch.Generator().manual_seed(3))
    assert len(old) == 500 and torch.equal(old.samples, new.samples)
    assert torch.equal(old.log_weights, new.log_weights)
    with pytest.raises(TypeError, match="not both"):
        mc.importance_sample(target, proposal, 10, num_samples=10)
    with pytest.raises(TypeError, match="num_particles"):
        mc.importance_sample(target, proposal)


class NaNTarget:
    def log_prob(self, x):
        out = -0.5 * (x**2).sum(-1)
        out[::10] = float("nan")
        return out


class WrongShape:
    def log_prob(self, x):
        return -0.5 * x**2


def test_errors():
    proposal = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="num_particles must be positive"):
        mc.importance_sample(NaNTarget(), proposal, 0)
    with pytest.raises(ValueError, match="NaN for 10 of 100 particles"):
        mc.importance_sample(NaNTarget(), proposal, 100)
    with pytest.raises(ValueError, match=r"expected \(100,\)"):
        mc.importance_sample(WrongShape(), proposal, 100)

    class Zero:
        def log_prob(self, x):
            return torch.full((x.shape[0],), -math.inf)

    with pytest.raises(ValueError, match="all 50 log-weights are -inf"):
        mc.importance_sample(Zero(), proposal, 50)
