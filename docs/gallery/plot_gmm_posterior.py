"""
Posterior sampling with a diffusion prior: the Gaussian-mixture benchmark
=========================================================================

Runs ``examples/inverse_problems/gmm_benchmark.py`` on a few small problems: a 25-component
Gaussian-mixture prior in dimension 8, one or two noisy random projections as the measurement,
and an exact posterior to compare with. Each sampler (DPS, TDS, MCGdiff, the ensemble sampler)
is scored by the sliced Wasserstein distance of its samples to exact posterior samples; the
row ``exact`` is the distance between two exact sample sets, the floor. The script's defaults
(20 problems, d = 8 and 80, up to 2,000 particles) take 6–16 minutes.
"""

import importlib.util
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from mcsample import posterior
from mcsample.flows.diffusion import GaussianMixtureDiffusion, VPSchedule
from mcsample.systems.inverse_problems import gmm_benchmark_problem


def repository_root() -> Path:
    """The checkout this script lives in (sphinx-gallery runs it from ``docs/gallery``)."""
    here = Path.cwd().resolve()
    for path in (here, *here.parents):
        if (path / "examples" / "inverse_problems" / "gmm_benchmark.py").exists():
            return path
    raise FileNotFoundError("run this script from inside a checkout of the mcsample repository")


spec = importlib.util.spec_from_file_location(
    "gmm_benchmark", repository_root() / "examples" / "inverse_problems" / "gmm_benchmark.py"
)
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)

args = "--dims 8 --obs-dims 1 2 --problems 4 --particles 500 --samples 500 --methods dps tds mcgdiff ensemble-half"
rows = benchmark.main([*args.split(), "--out", tempfile.mkdtemp(prefix="gmm_benchmark_")])

# %%
# Mean sliced Wasserstein distance over the problems (lower is better; the bars are 95 %
# intervals over only four problems).
fig, ax = plt.subplots(figsize=(7, 3.5))
for k, dy in enumerate((1, 2)):
    sel = [r for r in rows if r["d_y"] == dy]
    xs = [i + 0.4 * k for i in range(len(sel))]
    ax.bar(
        xs, [r["sliced_w_mean"] for r in sel], width=0.4, yerr=[r["sliced_w_ci95"] for r in sel], label=f"d_y = {dy}"
    )
    ax.set_xticks([i + 0.2 for i in range(len(sel))], [r["method"] for r in sel])
ax.set_ylabel("sliced Wasserstein to the exact posterior")
ax.legend()
fig.tight_layout()

# %%
# One problem up close: the first two coordinates of TDS's weighted particles (resampled) and
# of exact posterior draws.
prob = gmm_benchmark_problem(8, 1, generator=torch.Generator().manual_seed(3))
prior = GaussianMixtureDiffusion(prob.weights, prob.means, 1.0, VPSchedule(beta_max=40.0))
ws = posterior.tds(prior, prob.operator, prob.y, 1000, generator=torch.Generator().manual_seed(4))
x = ws.resample(1000, generator=torch.Generator().manual_seed(5))
exact = prob.posterior.sample(1000, generator=torch.Generator().manual_seed(6))
fig, ax = plt.subplots(figsize=(5, 5))
ax.scatter(prob.means[:, 0], prob.means[:, 1], marker="+", color="gray", label="prior modes")
ax.scatter(exact[:, 0], exact[:, 1], s=4, alpha=0.4, label="exact posterior")
ax.scatter(x[:, 0], x[:, 1], s=4, alpha=0.4, label="TDS")
ax.legend()
ax.set_aspect("equal")
fig.tight_layout()
