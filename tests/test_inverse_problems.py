"""Measurement operators, the Pyro-model target and the exact Gaussian-mixture posterior.

Deterministic checks (adjoints, SVDs, closed forms) use float64 and tight tolerances. The one
statistical check (moments of exact posterior samples) uses a fixed seed and 5-standard-error
bounds (false-failure rate below 1e-5 per coordinate for a fresh seed).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mcsample.systems.inverse_problems import (
    Blur,
    DenseOperator,
    Downsample,
    Mask,
    PyroTarget,
    gaussian_blur_kernel,
    gmm_benchmark_means,
    gmm_benchmark_problem,
    linear_gaussian_posterior,
    mixture_posterior,
)

F64 = torch.float64


def _operators(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(1, 6, 6, generator=g) < 0.5
    mask[0, 0, 0] = True
    kernel = torch.rand(3, 5, generator=g, dtype=F64)
    return [
        DenseOperator(torch.randn(3, 7, generator=g, dtype=F64), 0.3),
        Mask(mask, 0.1),
        Blur(kernel / kernel.sum(), (2, 6, 8), 0.2),
        Blur(gaussian_blur_kernel(5, 1.0), (8, 8), 0.05),
        Downsample(2, (1, 8, 6), 0.1),
        Downsample(3, (6, 9), 0.1),
    ]


@pytest.mark.parametrize("op", _operators(), ids=lambda o: type(o).__name__)
def test_adjoint_matches_forward(op):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, *op.event_shape, generator=g, dtype=F64)
    y = torch.randn(5, *op.obs_shape, generator=g, dtype=F64)
    lhs = (op.forward(x) * y).flatten(1).sum(1)
    rhs = (x * op.adjoint(y)).flatten(1).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", _operators(), ids=lambda o: type(o).__name__)
def test_svd_reconstructs_operator(op):
    A = op.matrix()
    assert A.shape == (op.obs_dim, op.dim)
    U, S, V = op.svd()
    r = S.numel()
    torch.testing.assert_close(U @ torch.diag(S) @ V.T, A, atol=1e-10, rtol=0)
    torch.testing.assert_close(U.T @ U, torch.eye(r, dtype=F64), atol=1e-10, rtol=0)
    torch.testing.assert_close(V.T @ V, torch.eye(r, dtype=F64), atol=1e-10, rtol=0)
    assert bool((S[:-1] >= S[1:] - 1e-12).all()) or not isinstance(op, DenseOperator)


@settings(max_examples=15, deadline=None)
@given(h=st.integers(1, 4), w=st.integers(1, 4), f=st.integers(1, 3), c=st.integers(1, 2))
def test_downsample_adjoint_any_shape(h, w, f, c):
    op = Downsample(f, (c, h * f, w * f), 0.1)
    g = torch.Generator().manual_seed(h * 100 + w * 10 + f)
    x = torch.randn(2, *op.event_shape, generator=g, dtype=F64)
    y = torch.randn(2, *op.obs_shape, generator=g, dtype=F64)
    torch.testing.assert_close((op.forward(x) * y).sum(), (x * op.adjoint(y)).sum())
    # block averages of a constant image are that constant
    torch.testing.assert_close(
        op.forward(torch.ones(1, *op.event_shape, dtype=F64)), torch.ones(1, *op.obs_shape, dtype=F64)
    )


@pytest.mark.parametrize("op", _operators()[:5], ids=lambda o: type(o).__name__)
def test_likelihood_gradient_and_laplacian(op):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, *op.event_shape, generator=g, dtype=F64)
    y = op.simulate(torch.randn(1, *op.event_shape, generator=g, dtype=F64), generator=g)[0]
    A = op.matrix()
    ref = torch.distributions.MultivariateNormal(
        x.flatten(1) @ A.T, covariance_matrix=op.sigma_y**2 * torch.eye(op.obs_dim, dtype=F64)
    ).log_prob(y.flatten())
    torch.testing.assert_close(op.log_likelihood(x, y), ref)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(-op.log_likelihood(xr, y).sum(), xr)
    torch.testing.assert_close(op.potential_grad(x, y), grad)
    lap = torch.full((3,), float((A * A).sum() / op.sigma_y**2), dtype=F64)
    torch.testing.assert_close(op.potential_laplacian(x), lap)


def test_mask_and_errors():
    op = Mask(torch.tensor([[True, False], [False, True]]), 0.1)
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    torch.testing.assert_close(op.forward(x), torch.tensor([[1.0, 4.0]]))
    with pytest.raises(ValueError, match="shape"):
        op.forward(torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="sigma_y"):
        Mask(torch.ones(2, 2, dtype=torch.bool), 0.0)
    with pytest.raises(ValueError, match="divisible"):
        Downsample(3, (1, 8, 8), 0.1)
    with pytest.raises(ValueError, match="odd"):
        Blur(torch.ones(2, 2), (4, 4), 0.1)


# ---------------------------------------------------------------------------------------------
# Pyro models


def _pyro_model(n):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(2.0, dtype=F64)))
    sigma = pyro.sample("sigma", dist.LogNormal(torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64)))
    w = pyro.sample("w", dist.Dirichlet(torch.ones(3, dtype=F64)))
    with pyro.plate("data", n):
        pyro.sample("y", dist.Normal(mu + w[..., 0], sigma), obs=None)


@pytest.mark.parametrize("vectorized", [True, False])
def test_pyro_target_matches_hand_computation(vectorized):
    data = torch.tensor([0.3, -1.2, 2.0, 0.5], dtype=F64)
    target = PyroTarget(_pyro_model, 4, observations={"y": data}, vectorized=vectorized)
    assert target.site_names == ["mu", "sigma", "w"]
    assert target.event_shape == torch.Size([4])  # mu, log sigma, 2 stick-breaking coordinates
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    mu, log_sigma, u = z[:, 0], z[:, 1], z[:, 2:]
    sigma = log_sigma.exp()
    sb = torch.distributions.transforms.StickBreakingTransform()
    w = sb(u)
    hand = (
        -0.5 * (mu / 2) ** 2
        - math.log(2 * math.sqrt(2 * math.pi))  # N(0, 2)
        - log_sigma
        - 0.5 * log_sigma**2
        - 0.5 * math.log(2 * math.pi)
        + log_sigma  # LogNormal + Jacobian
        + math.log(2.0)  # Dirichlet(1,1,1) density is Γ(3) = 2 on the simplex
        + sb.log_abs_det_jacobian(u, w)
        + (
            -0.5 * ((data - mu[:, None] - w[:, :1]) / sigma[:, None]) ** 2
            - torch.log(sigma[:, None])
            - 0.5 * math.log(2 * math.pi)
        ).sum(-1)
    )
    torch.testing.assert_close(target.log_prob(z), hand, rtol=1e-10, atol=1e-10)
    values = target.constrain(z)
    torch.testing.assert_close(values["sigma"], sigma)
    torch.testing.assert_close(target.unconstrain(values), z)


def test_pyro_target_constrained_space_and_errors():
    data = torch.tensor([0.3, -1.2], dtype=F64)
    target = PyroTarget(_pyro_model, 2, observations={"y": data}, unconstrained=False)
    assert target.event_shape == torch.Size([5])  # mu, sigma, w (3 on the simplex)
    z = torch.tensor([[0.5, 1.5, 0.2, 0.3, 0.5]], dtype=F64)
    hand = (
        dist.Normal(0.0, 2.0).log_prob(torch.tensor(0.5, dtype=F64))
        + dist.LogNormal(0.0, 1.0).log_prob(torch.tensor(1.5, dtype=F64))
        + math.log(2.0)
        + dist.Normal(0.5 + 0.2, 1.5).log_prob(data).sum()
    )
    torch.testing.assert_close(target.log_prob(z), hand.reshape(1))
    with pytest.raises(ValueError, match="does not sample"):
        PyroTarget(_pyro_model, 2, observations={"nope": data})
    with pytest.raises(ValueError, match="expects z of shape"):
        target.log_prob(torch.zeros(2, 3, dtype=F64))


# ---------------------------------------------------------------------------------------------
# Gaussian-mixture benchmark


def test_benchmark_problem_follows_the_paper():
    means = gmm_benchmark_means(8)
    assert means.shape == (25, 8)
    torch.testing.assert_close(means[0], torch.tensor([16.0, 16.0] * 4, dtype=F64))  # i = j = -2
    prob = gmm_benchmark_problem(80, 4, torch.Generator().manual_seed(3))
    U, S, V = prob.operator.svd()
    assert prob.operator.A.shape == (4, 80)
    assert bool((S > 0).all()) and bool((S < 1).all()) and bool((S[:-1] >= S[1:]).all())
    assert 0 < prob.operator.sigma_y < float(S.max())
    torch.testing.assert_close(prob.weights.sum(), torch.tensor(1.0, dtype=F64))


def test_mixture_posterior_is_prior_times_likelihood_over_evidence():
    """log p(x|y) = log p(x) + log p(y|x) - log p(y) pointwise, in d = 8 with a full covariance."""
    g = torch.Generator().manual_seed(4)
    d, m, K = 8, 3, 5
    w = torch.rand(K, generator=g, dtype=F64)
    means = 3 * torch.randn(K, d, generator=g, dtype=F64)
    L = torch.randn(d, d, generator=g, dtype=F64) / 3
    C = L @ L.T + 0.5 * torch.eye(d, dtype=F64)
    A = torch.randn(m, d, generator=g, dtype=F64)
    sigma, y = 0.4, torch.randn(m, generator=g, dtype=F64)
    post, log_py = mixture_posterior(w, means, C, A, sigma, y)
    x = torch.randn(10, d, generator=g, dtype=F64) * 3
    prior = torch.logsumexp(
        torch.distributions.MultivariateNormal(means, C).log_prob(x[:, None]) + torch.log(w / w.sum()), -1
    )
    lik = DenseOperator(A, sigma).log_likelihood(x, y)
    torch.testing.assert_close(post.log_prob(x), prior + lik - log_py, rtol=1e-10, atol=1e-10)
    # one component: agrees with the Gaussian formula
    pm, pc, lpy = linear_gaussian_posterior(A, sigma, y, means[0], C)
    post1, lpy1 = mixture_posterior(w[:1], means[:1], C, A, sigma, y)
    torch.testing.assert_close(post1.means[0], pm)
    torch.testing.assert_close(post1.cov, pc)
    torch.testing.assert_close(lpy1, lpy)


def test_benchmark_posterior_against_quadrature():
    """d = 2, d_y = 1: posterior mean, covariance and evidence by a 2-D Riemann sum."""
    prob = gmm_benchmark_problem(2, 1, torch.Generator().manual_seed(0))  # three modes matter
    assert prob.operator.sigma_y > 0.05  # the grid below resolves the posterior
    h = 0.04  # the trapezoid rule is spectrally accurate for Gaussians of width >> h
    r = torch.arange(-23.0, 23.0 + h / 2, h, dtype=F64)
    X = torch.stack(torch.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)
    log_prior = torch.full((X.shape[0],), -math.inf, dtype=F64)
    for w, m in zip(prob.weights, prob.means):  # one component at a time keeps memory small
        comp = -0.5 * ((X - m) ** 2).sum(-1) - math.log(2 * math.pi) + torch.log(w)
        log_prior = torch.logaddexp(log_prior, comp)
    log_joint = log_prior + prob.operator.log_likelihood(X, prob.y)
    log_z = torch.logsumexp(log_joint, 0) + 2 * math.log(h)
    W = torch.softmax(log_joint, 0)
    mean = W @ X
    cov = (X - mean).T @ ((X - mean) * W[:, None])
    torch.testing.assert_close(log_z, prob.log_evidence, atol=1e-6, rtol=0)
    torch.testing.assert_close(mean, prob.posterior.mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(cov, prob.posterior.covariance, atol=1e-5, rtol=0)


def test_exact_posterior_sampler_moments():
    prob = gmm_benchmark_problem(8, 2, torch.Generator().manual_seed(5))
    n = 40_000
    x = prob.posterior.sample(n, torch.Generator().manual_seed(6))
    sd = prob.posterior.covariance.diagonal().sqrt()
    assert bool(((x.mean(0) - prob.posterior.mean).abs() < 5 * sd / math.sqrt(n)).all())
