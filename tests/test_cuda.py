"""The engine on a CUDA device: the same exact answers as on the CPU (skipped without a GPU).

Every piece keeps its tensors on the device of its inputs (DESIGN.md); these checks run the
public functions with CUDA tensors and CUDA generators and compare against exact values, and
the force field against its CPU evaluation (``test_forcefield.py::test_cuda_matches_cpu``).
"""

import math

import pytest
import torch

import mcsample as mc
from mcsample.systems.analytic import GaussianMixture

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
F64 = torch.float64


def cuda_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


@pytest.mark.parametrize("scheme", ["multinomial", "stratified", "systematic", "residual", "ssp"])
def test_resampling_offspring_means_on_cuda(scheme):
    # mean offspring count N w_i over R repeats: z-test per particle, |z| < 5 for all 50
    n, reps = 50, 2000
    lw = torch.randn(n, dtype=F64, device="cuda", generator=cuda_generator(0)) * 1.5
    lw[7] = -math.inf  # never drawn
    g = cuda_generator(1)
    counts = torch.stack(
        [torch.bincount(mc.resample(lw, n, scheme=scheme, generator=g), minlength=n) for _ in range(reps)]
    ).to(F64)
    assert counts.device.type == "cuda" and bool((counts.sum(1) == n).all())
    assert float(counts[:, 7].sum()) == 0.0
    w = torch.softmax(lw, 0)
    sd = torch.sqrt(n * w * (1 - w) / reps).clamp_min(1e-12)
    z = (counts.mean(0) - n * w) / sd
    assert float(z.abs().max()) < 5, z


def test_importance_sampling_evidence_on_cuda():
    d = 5
    target = torch.distributions.MultivariateNormal(
        torch.ones(d, dtype=F64, device="cuda"), torch.eye(d, dtype=F64, device="cuda")
    )
    proposal = torch.distributions.MultivariateNormal(
        torch.zeros(d, dtype=F64, device="cuda"), 2.0 * torch.eye(d, dtype=F64, device="cuda")
    )
    ws = mc.importance_sample(target, proposal, 200_000, batch_size=50_000)
    assert ws.log_weights.device.type == "cuda"
    assert abs(float(ws.log_evidence)) < 5 * float(ws.log_evidence_stderr) + 1e-3  # log Z = 0
    est = ws.expectation()
    assert bool(((est.value - 1.0).abs() < 5 * est.stderr).all())


def test_smc_mixture_evidence_on_cuda_matches_cpu_and_exact():
    cpu = GaussianMixture.separated(
        dim=10, num_modes=3, spread=4.0, std=1.0, log_scale=-1.5, generator=torch.Generator().manual_seed(123)
    )
    target = GaussianMixture(cpu.weights.cuda(), cpu.means.cuda(), cpu.covariances.cuda(), cpu.log_scale)
    initial = torch.distributions.MultivariateNormal(
        torch.zeros(10, dtype=F64, device="cuda"), 16.0 * torch.eye(10, dtype=F64, device="cuda")
    )
    g = cuda_generator(7)
    runs = [mc.smc(target, initial, 4000, kernel=mc.kernels.MALA(num_steps=4), generator=g) for _ in range(4)]
    logz = torch.tensor([float(r.log_evidence) for r in runs], dtype=F64)
    assert runs[0].particles.samples.device.type == "cuda"
    se = max(float(logz.std()) / 2, 0.02)
    assert abs(float(logz.mean()) - cpu.log_scale) < 5 * se
    mean = runs[0].particles.expectation().value.cpu()
    assert bool(((mean - cpu.mean).abs() < 0.35).all())


def test_ensemble_sampler_on_cuda_matches_gaussian_posterior():
    from mcsample import posterior as P
    from mcsample.flows.diffusion import GaussianMixtureDiffusion, VPSchedule
    from mcsample.systems.inverse_problems import DenseOperator

    sched = VPSchedule("linear")
    m = torch.tensor([1.0, -0.5, 0.3], dtype=F64)
    C = torch.tensor([[1.0, 0.6, 0.1], [0.6, 0.8, 0.0], [0.1, 0.0, 0.5]], dtype=F64)
    model = GaussianMixtureDiffusion(torch.ones(1, dtype=F64), m[None], C[None], sched).to("cuda")
    A = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.3, -0.8]], dtype=F64)
    op = DenseOperator(A.cuda(), 0.2)
    y = torch.tensor([1.5, -0.4], dtype=F64, device="cuda")
    ws = P.ensemble_sampler(
        model, op, y, 4000, num_steps=200, likelihood_drift=0.5, generator=cuda_generator(2), dtype=F64, device="cuda"
    )
    assert ws.samples.device.type == "cuda"
    # exact posterior of N(α m, α² C + σ² I) at t_min = 1e-3 under y = A x + 0.2 ε
    t = torch.tensor(1e-3, dtype=F64)
    a, s = float(sched.alpha(t)), float(sched.sigma(t))
    prior_cov = a * a * C + s * s * torch.eye(3, dtype=F64)
    gain = prior_cov @ A.T @ torch.linalg.inv(A @ prior_cov @ A.T + 0.04 * torch.eye(2, dtype=F64))
    post_mean = a * m + gain @ (y.cpu() - A @ (a * m))
    est = ws.expectation().value.cpu()
    assert bool(((est - post_mean).abs() < 0.05).all()), (est, post_mean)
