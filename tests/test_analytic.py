"""The analytic targets' exact normalizers and moments, checked independently."""

import math

import pytest
import torch

from mcsample.systems.analytic import Banana, BayesianLinearRegression, Funnel, Gaussian, GaussianMixture


def quadrature_log_z(target, lim=12.0, n=1201):
    grid = torch.linspace(-lim, lim, n, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    lp = target.log_prob(torch.stack([xx.flatten(), yy.flatten()], -1))
    h = float(grid[1] - grid[0])
    return float(torch.logsumexp(lp, 0)) + 2 * math.log(h)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Gaussian(
            torch.tensor([0.3, -0.2], dtype=torch.float64),
            torch.tensor([[1.0, 0.5], [0.5, 2.0]], dtype=torch.float64),
            0.7,
        ),
        lambda: GaussianMixture(
            torch.tensor([1.0, 3.0]),
            torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=torch.float64),
            torch.eye(2, dtype=torch.float64) * 0.5,
            log_scale=-1.2,
        ),
        lambda: Banana(dim=2, a=1.0, b=0.5, log_scale=0.4),
        lambda: Funnel(dim=2, scale=1.0, log_scale=0.1),
    ],
    ids=["gaussian", "mixture", "banana", "funnel"],
)
def test_log_normalizer_by_quadrature(make):
    target = make()
    assert quadrature_log_z(target) == pytest.approx(float(target.log_normalizer), abs=2e-3)


@pytest.mark.parametrize(
    "make",
    [
        lambda: GaussianMixture.separated(dim=3, num_modes=3, generator=torch.Generator().manual_seed(0)),
        lambda: Banana(dim=3, a=1.2, b=0.4),
        lambda: Funnel(dim=3, scale=1.0),
    ],
    ids=["mixture", "banana", "funnel"],
)
def test_sample_moments(make):
    target = make()
    n = 200_000
    x = target.sample((n,), generator=torch.Generator().manual_seed(1))
    se_mean = x.std(0) / math.sqrt(n)
    assert bool(((x.mean(0) - target.mean).abs() < 5 * se_mean).all())
    var = x.var(0)
    se_var = ((x - x.mean(0)) ** 2).std(0) / math.sqrt(n)
    assert bool(((var - torch.diagonal(target.covariance)).abs() < 5 * se_var).all())


def test_linear_regression_evidence_identity():
    # log p(y) = log p(w, y) - log p(w | y) at any w; the posterior is Gaussian in closed form
    t = BayesianLinearRegression.synthetic(num_data=30, dim=3, generator=torch.Generator().manual_seed(0))
    post = torch.distributions.MultivariateNormal(t.mean, t.covariance)
    w = torch.randn(5, 3, dtype=torch.float64)
    lz = t.log_prob(w) - post.log_prob(w)
    assert torch.allclose(lz, t.log_normalizer.expand(5), atol=1e-8)
    x = t.sample((100_000,), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(x.mean(0), t.mean, atol=5 * float(x.std(0).max()) / math.sqrt(100_000))


def test_errors():
    with pytest.raises(ValueError, match=r"covariance must have shape \(2, 2\)"):
        Gaussian(torch.zeros(2), torch.eye(3))
    with pytest.raises(ValueError, match="weights must be 2 non-negative"):
        GaussianMixture(torch.tensor([1.0, -1.0]), torch.zeros(2, 2), torch.eye(2))
    with pytest.raises(ValueError, match=r"y must have shape \(4,\)"):
        BayesianLinearRegression(torch.zeros(4, 2), torch.zeros(3))
