"""The default job: adaptive SMC on a hard analytic target, checked against exact answers.

A 10-dimensional mixture of four well-separated Gaussians (unequal weights, known normalizer)
is sampled by annealed SMC from a broad Gaussian with MALA moves and an adaptive schedule.
The run prints its diagnostics (steps, schedule length, final ESS, log Z ± stderr against the
exact value, mode weights against the exact ones) and saves a plot of the weighted marginals
against the exact mixture marginals (a few seconds on a 2-core CPU).

Then the peptide job (:func:`run_peptide`): the shipped Boltzmann generator of alanine
dipeptide (AMBER ff96 + OBC1, 300 K) corrected by importance sampling and by SMC, and a summary
table of ESS, k-hat, log Z, ΔF(φ>0 − φ<0) and basin populations (about a minute).

The target comes from ``mcsample.systems.analytic``: this module is a top-level convenience
(like the command line), so it may reach into ``systems``.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch

import mcsample as mc
from mcsample.protocols import generator_or_seed


def _generator(generator, seed, who: str) -> torch.Generator:
    """``generator``, or the deprecated integer ``seed`` as one; default seed 0, so that the
    printed numbers are reproducible."""
    generator = generator_or_seed(who, generator, seed)
    if generator is None:
        return torch.Generator().manual_seed(0)
    return generator


def run(
    out_dir: str = "outputs/demo",
    num_particles: int = 4096,
    generator: torch.Generator | None = None,
    dim: int = 10,
    progress: bool = True,
    *,
    seed: int | None = None,
) -> dict:
    """Run the demo; returns the numbers it printed and writes ``summary.json`` and ``marginals.png``.

    ``generator`` (``torch.Generator``; default seeded with 0) draws the mixture and the SMC
    run; ``seed`` is its deprecated integer alias."""
    from mcsample.systems.analytic import GaussianMixture

    g = _generator(generator, seed, "run")
    target = GaussianMixture.separated(dim=dim, num_modes=4, spread=6.0, std=1.0, log_scale=3.0, generator=g)
    initial = torch.distributions.MultivariateNormal(
        torch.zeros(dim, dtype=torch.float64), 64.0 * torch.eye(dim, dtype=torch.float64)
    )
    t0 = time.perf_counter()
    result = mc.smc(
        target,
        initial,
        num_particles,
        kernel=mc.kernels.MALA(num_steps=8),
        schedule=mc.AdaptiveSchedule(cess=0.9),
        generator=g,
        progress=progress,
    )
    seconds = time.perf_counter() - t0
    p = result.particles
    mode_weights = p.expectation(lambda x: target.responsibilities(x))
    mean = p.expectation()
    summary = {
        "target": f"{dim}-d mixture of 4 Gaussians, log Z = {float(target.log_normalizer):.4f}",
        "particles": num_particles,
        "steps": len(result.betas) - 1,
        "resamplings": int(result.resampled.sum()),
        "final_ess": float(p.ess),
        "log_evidence": float(result.log_evidence),
        "log_evidence_stderr": float(result.log_evidence_stderr),
        "log_evidence_exact": float(target.log_normalizer),
        "mode_weights": [round(float(v), 4) for v in mode_weights.value],
        "mode_weights_stderr": [round(float(v), 4) for v in mode_weights.stderr],
        "mode_weights_exact": [round(float(v), 4) for v in target.weights],
        "max_abs_mean_error": float((mean.value - target.mean).abs().max()),
        "seconds": round(seconds, 2),
    }
    z_score = (summary["log_evidence"] - summary["log_evidence_exact"]) / max(summary["log_evidence_stderr"], 1e-12)
    rows = [
        ("SMC steps (beta schedule length)", f"{summary['steps']}"),
        ("resampling events", f"{summary['resamplings']}"),
        ("final ESS", f"{summary['final_ess']:.0f} / {num_particles}"),
        ("log Z (SMC)", f"{summary['log_evidence']:.4f} ± {summary['log_evidence_stderr']:.4f}"),
        ("log Z (exact)", f"{summary['log_evidence_exact']:.4f}"),
        ("z-score", f"{z_score:+.2f}"),
        ("mode weights (SMC)", " ".join(f"{v:.3f}" for v in summary["mode_weights"])),
        ("mode weights (exact)", " ".join(f"{v:.3f}" for v in summary["mode_weights_exact"])),
        ("max |mean error|", f"{summary['max_abs_mean_error']:.3f}"),
        ("wall time", f"{seconds:.1f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nmcsample demo: adaptive SMC (MALA) on a {summary['target']}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    os.makedirs(out_dir, exist_ok=True)
    _write_json(summary, os.path.join(out_dir, "summary.json"))
    _plot_marginals(target, p, os.path.join(out_dir, "marginals.png"), generator=g)
    print(f"  wrote {out_dir}/summary.json and {out_dir}/marginals.png")
    return summary


def run_peptide(
    out_dir: str = "outputs/demo",
    num_samples: int = 20_000,
    num_particles: int = 2000,
    generator: torch.Generator | None = None,
    progress: bool = True,
    *,
    seed: int | None = None,
) -> dict | None:
    """Alanine dipeptide (OBC1, 300 K) from the shipped flow by IS (``num_samples`` draws) and
    SMC (``num_particles``); prints the summary table and writes ``peptide_summary.json``.
    Returns ``None`` (with a printed reason) when OpenMM or the shipped checkpoint is missing.
    ``generator``: as in :func:`run` (``seed``: its deprecated integer alias)."""
    g = _generator(generator, seed, "run_peptide")
    try:
        from mcsample.peptide_sampling import sample_peptide, summary_table
        from mcsample.systems.peptides import alanine_dipeptide

        peptide = alanine_dipeptide("obc1")
    except ImportError as err:
        print(f"\n(peptide demo skipped: {err})")
        return None
    print(
        f"\nmcsample demo: alanine dipeptide (AMBER ff96 + OBC1, 300 K) from the shipped "
        f"Boltzmann generator, {num_samples} IS draws and {num_particles} SMC particles"
    )
    ens = {
        "IS": sample_peptide(peptide, num_samples, "is", generator=g, progress=progress),
        "SMC": sample_peptide(peptide, num_particles, "smc", generator=g, progress=progress),
    }
    print(summary_table(ens))
    khat = ens["IS"].diagnostics.khat
    print(
        f"  IS k-hat {khat:.2f}: "
        + (
            "below 0.7, the importance weights are reliable"
            if khat < 0.7
            else "above 0.7, do not trust IS alone; use SMC"
        )
    )
    out = {name: e.summary() for name, e in ens.items()}
    os.makedirs(out_dir, exist_ok=True)
    _write_json(out, os.path.join(out_dir, "peptide_summary.json"))
    print(f"  wrote {out_dir}/peptide_summary.json")
    return out


def _write_json(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _plot_marginals(target, particles, path: str, generator=None, num_dims: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = particles.samples
    W = particles.normalized_weights
    fig, axes = plt.subplots(1, num_dims, figsize=(3.2 * num_dims, 3.0))
    for i, ax in enumerate(axes):
        lo, hi = float(x[:, i].min()) - 2, float(x[:, i].max()) + 2
        grid = torch.linspace(lo, hi, 400, dtype=torch.float64)
        # exact marginal of a Gaussian mixture: mixture of the 1-d marginals
        sd = target.covariances[:, i, i].sqrt()
        dens = (
            target.weights[:, None]
            * torch.exp(-0.5 * ((grid[None] - target.means[:, i, None]) / sd[:, None]) ** 2)
            / (sd[:, None] * math.sqrt(2 * math.pi))
        ).sum(0)
        ax.hist(
            x[:, i].numpy(),
            bins=80,
            range=(lo, hi),
            weights=W.numpy(),
            density=True,
            alpha=0.5,
            color="tab:blue",
            label="SMC (weighted)",
        )
        ax.plot(grid.numpy(), dens.numpy(), color="black", lw=1.2, label="exact")
        ax.set_xlabel(f"x[{i}]")
        ax.set_yticks([])
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("mcsample demo: weighted SMC marginals vs the exact mixture")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
