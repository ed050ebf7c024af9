"""Cost of the posterior samplers relative to unconditional sampling with the same prior.

For the Gaussian-mixture benchmark problem (25 components, exact score) in d ∈ {8, 80, 800}
with d_y = 2, each sampler of :mod:`mcsample.posterior` runs N particles over the same 100-step
VP grid. The baseline, "theirs", is the unconditional ancestral sampler of
``mcsample.flows.diffusion.samplers`` (DDIM with η = 1) on the same grid and batch: what a user
pays anyway to sample the prior. Printed per sampler: seconds, microseconds per score evaluation
per particle, the ratio to the unconditional sampler (ours/theirs), and the effective sample size
per second (final ESS / seconds; DPS's equal weights count N). Accuracy is measured in
``examples/inverse_problems/gmm_benchmark.py``, not here.

Run: ``python benchmarks/posterior_samplers.py [--dims 8 80 800] [--particles 1000] [--repeats 3]``.
About 1–2 minutes on a 2-core CPU (one thread, the fastest of ``--repeats`` runs is kept). Prints a
table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mcsample import posterior as P
from mcsample.flows.diffusion.gmm import GaussianMixtureDiffusion
from mcsample.flows.diffusion.samplers import ddim, prior_sample
from mcsample.flows.diffusion.schedules import VPSchedule, time_grid
from mcsample.systems.inverse_problems import gmm_benchmark_problem

SAMPLERS = {
    "dps": lambda m, op, y, n, g, s: P.dps(m, op, y, n, num_steps=s, zeta=0.1, generator=g),
    "tds": lambda m, op, y, n, g, s: P.tds(m, op, y, n, num_steps=s, generator=g),
    "mcgdiff": lambda m, op, y, n, g, s: P.mcgdiff(m, op, y, n, num_steps=s, generator=g),
    "ensemble": lambda m, op, y, n, g, s: P.ensemble_sampler(m, op, y, n, num_steps=s, generator=g),
    "ensemble-half": lambda m, op, y, n, g, s: P.ensemble_sampler(
        m, op, y, n, num_steps=s, likelihood_drift=0.5, generator=g
    ),
}


def best_of(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    """Time every sampler at every dimension; print the table and a JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[8, 80, 800])
    ap.add_argument("--obs-dim", type=int, default=2)
    ap.add_argument("--particles", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    schedule = VPSchedule("linear", beta_max=40.0)
    rows = []
    print(
        f"{'sampler':14s} {'d':>4s} {'N':>5s} {'NFE':>4s} {'seconds':>8s} {'us/eval/particle':>17s} "
        f"{'ours/uncond':>11s} {'ESS/s':>8s}"
    )
    for d in args.dims:
        g = torch.Generator().manual_seed(d)
        prob = gmm_benchmark_problem(d, args.obs_dim, g)
        model = GaussianMixtureDiffusion(prob.weights.float(), prob.means.float(), 1.0, schedule)
        grid = time_grid(schedule, args.steps, "uniform", dtype=torch.float32)

        def uncond():
            x = prior_sample(schedule, (args.particles, d), generator=g).float()
            return ddim(model, x, grid, eta=1.0, generator=g)

        base, res = best_of(uncond, args.repeats)
        base_nfe = res.nfe
        print(
            f"{'unconditional':14s} {d:4d} {args.particles:5d} {base_nfe:4d} {base:8.3f} "
            f"{1e6 * base / (base_nfe * args.particles):17.2f} {1.0:11.2f} {'':>8s}"
        )
        for name, run in SAMPLERS.items():
            sec, ws = best_of(lambda: run(model, prob.operator, prob.y, args.particles, g, args.steps), args.repeats)
            nfe = ws.info["nfe"]
            ess = float(ws.ess)
            # the ratio compares equal work: per score evaluation (the baseline makes base_nfe of them)
            ratio = (sec / nfe) / (base / base_nfe)
            row = {
                "sampler": name,
                "d": d,
                "particles": args.particles,
                "nfe": nfe,
                "vjp": ws.info["vjp"],
                "seconds": sec,
                "us_per_eval_particle": 1e6 * sec / (nfe * args.particles),
                "ratio_vs_unconditional": ratio,
                "ess": ess,
                "ess_per_second": ess / sec,
            }
            rows.append(row)
            print(
                f"{name:14s} {d:4d} {args.particles:5d} {nfe:4d} {sec:8.3f} "
                f"{row['us_per_eval_particle']:17.2f} {ratio:11.2f} {row['ess_per_second']:8.0f}"
            )
        rows.append(
            {
                "sampler": "unconditional",
                "d": d,
                "particles": args.particles,
                "nfe": base_nfe,
                "seconds": base,
                "us_per_eval_particle": 1e6 * base / (base_nfe * args.particles),
            }
        )
    print(json.dumps({"benchmark": "posterior_samplers", "steps": args.steps, "obs_dim": args.obs_dim, "rows": rows}))


if __name__ == "__main__":
    main()
