"""Each MCMC kernel leaves its target invariant: start from exact draws, move, compare moments.

With 4000 independent chains the moment estimates have standard errors from the chains
themselves; bounds are 5 SE (plus the exact draws' own noise), false-failure rate < 1e-5.
A kernel that never accepted would pass trivially, so the acceptance rate is checked too.
"""

import math

import pytest
import torch

import mcsample as mc
from mcsample.kernels import run_chain
from mcsample.systems.analytic import Banana, Gaussian

KERNELS = [mc.kernels.RandomWalk(), mc.kernels.MALA(), mc.kernels.HMC()]


def targets():
    cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    return [Gaussian(torch.tensor([1.0, -2.0], dtype=torch.float64), cov), Banana(dim=2, a=1.0, b=0.5)]


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: type(k).__name__)
@pytest.mark.parametrize("which", [0, 1], ids=["gaussian", "banana"])
def test_kernel_leaves_target_invariant(kernel, which):
    target = targets()[which]
    g = torch.Generator().manual_seed(0)
    n = 4000
    x0 = target.sample((n,), generator=g)
    x, rates = run_chain(kernel, target, x0, 30, step_size=0.6, generator=g)
    assert 0.2 < float(rates.mean()) < 0.999
    moved = (x != x0).any(-1).double().mean()
    assert float(moved) > 0.5
    for f, exact in ((lambda v: v, target.mean), (lambda v: v**2, torch.diagonal(target.covariance) + target.mean**2)):
        vals = f(x)
        se = vals.std(0) / math.sqrt(n)
        assert bool(((vals.mean(0) - exact).abs() < 5 * math.sqrt(2) * se).all()), (vals.mean(0), exact)


def test_mala_without_correction_would_fail():
    # the test above can fail: an unadjusted Langevin move with a large step biases the variance
    target = targets()[0]
    g = torch.Generator().manual_seed(1)
    x = target.sample((4000,), generator=g)
    h = 0.9
    for _ in range(30):
        grad = -torch.linalg.solve(target.covariance, (x - target.mean).T).T
        x = x + 0.5 * h**2 * grad + h * torch.randn(x.shape, generator=g, dtype=x.dtype)
    se = (x**2).std(0) / math.sqrt(4000)
    exact = torch.diagonal(target.covariance) + target.mean**2
    assert bool(((x**2).mean(0) - exact).abs().max() > 5 * math.sqrt(2) * se.max())


def test_step_size_adaptation_moves_toward_target_rate():
    k = mc.kernels.MALA()
    h = torch.tensor(1.0, dtype=torch.float64)
    assert float(k.adapt(h, torch.tensor(0.1))) < 1.0
    assert float(k.adapt(h, torch.tensor(0.9))) > 1.0
    assert float(mc.kernels.RandomWalk(adaptive=False).adapt(h, torch.tensor(0.0))) == 1.0


def test_independence_kernel_smc_evidence_on_an_asymmetric_mixture():
    """SMC with MALA + independence moves recovers an exact log Z within 5 stderr."""
    import mcsample as mc
    from mcsample.kernels import MALA, Independence
    from mcsample.systems.analytic import GaussianMixture

    target = GaussianMixture.separated(
        dim=4, num_modes=3, spread=5.0, log_scale=1.5, generator=torch.Generator().manual_seed(3)
    )
    q = torch.distributions.MultivariateNormal(
        torch.zeros(4, dtype=torch.float64), 36 * torch.eye(4, dtype=torch.float64)
    )
    res = mc.smc(
        target, q, 3000, kernel=Independence(local=MALA(), proposal=q), generator=torch.Generator().manual_seed(0)
    )
    err = abs(float(res.log_evidence) - float(target.log_normalizer))
    assert err < 5 * float(res.log_evidence_stderr) + 1e-3
    with pytest.raises(TypeError):
        Independence(local=None, proposal=q)
