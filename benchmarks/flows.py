"""Boltzmann-generator throughput: the shipped alanine-dipeptide flow against OpenMM, same run.

What is measured, for ``alanine_dipeptide(solvent)`` (22 atoms, AMBER ff96) and the shipped
:class:`~mcsample.flows.boltzmann_generator.BoltzmannGenerator`:

* **flow**: ``sample_and_log_prob`` (draws + exact log-densities, float64 Cartesian output)
  per second at batch 1, 1024 and 16384;
* **energy**: the batched torch energy (``Peptide.energy``) per second at the same batches,
  against OpenMM's CPU platform evaluating the same configurations one by one (the reference
  energy; ratio ours/theirs in time per configuration);
* **importance sampling**: one ``mc.importance_sample`` run of 65,536 draws (batch 16384),
  split into the time spent in the flow and in the energy; its ESS per second against the
  effective samples per second of OpenMM Langevin MD (LangevinMiddle, 1 fs, frames every
  0.1 ps, statistical inefficiency of U from the same run), the way a reference is made.

Prints one table with ratios (below 1: ours takes less time) and a JSON line. About 1-2
minutes on a 2-core CPU.

    python benchmarks/flows.py                  # OBC1
    python benchmarks/flows.py --solvent vacuum --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch


def _timeit(fn, min_time: float = 0.5, min_calls: int = 2) -> float:
    """Median seconds per call over at least ``min_calls`` calls and ``min_time`` seconds."""
    fn()  # warm-up (compilation, caches)
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--solvent", default="obc1", choices=["obc1", "vacuum"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 1024, 16384])
    ap.add_argument("--md-ps", type=float, default=20.0, help="OpenMM MD length for the MD rate (ps)")
    args = ap.parse_args()

    import mcsample as mc
    from mcsample.flows import pretrained
    from mcsample.systems import analysis
    from mcsample.systems.md import run_md
    from mcsample.systems.peptides import alanine_dipeptide

    device = torch.device(args.device)
    peptide = alanine_dipeptide(args.solvent)
    flow = pretrained("alanine_dipeptide", solvent=args.solvent).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for b in args.batches:

        def draw():
            with torch.no_grad():
                flow.sample_and_log_prob((b,), generator=gen)
            _sync(device)

        t_flow = _timeit(draw)
        x = flow.sample((b,), generator=gen)

        def energy():
            with torch.no_grad():
                peptide.energy(x)
            _sync(device)

        t_energy = _timeit(energy)
        n_omm = min(b, 256)
        x_omm = x[:n_omm].cpu()
        t_omm = _timeit(lambda: peptide.energy(x_omm, backend="openmm"), min_time=0.3) / n_omm
        rows.append(
            {
                "batch": b,
                "flow_per_s": b / t_flow,
                "energy_per_s": b / t_energy,
                "openmm_energy_per_s": 1.0 / t_omm,
                "energy_ratio_ours_theirs": (t_energy / b) / t_omm,
            }
        )

    # one importance-sampling run, timed in parts
    n_is, batch = 65_536, 16_384
    t_flow = t_energy = 0.0
    log_w = []
    for _ in range(n_is // batch):
        t = time.perf_counter()
        with torch.no_grad():
            x, lq = flow.sample_and_log_prob((batch,), generator=gen)
        _sync(device)
        t_flow += time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            lp = peptide.log_prob(x)
        _sync(device)
        t_energy += time.perf_counter() - t
        log_w.append(lp.double() - lq.double())
    lw = torch.cat(log_w)
    ess = float(mc.ess(lw))
    t_is = t_flow + t_energy

    # OpenMM MD: effective samples per second
    t = time.perf_counter()
    md = run_md(
        peptide,
        args.md_ps,
        report_interval_ps=0.1,
        generator=torch.Generator().manual_seed(0),
        progress=False,
        threads=1,
    )
    t_md = time.perf_counter() - t
    g = analysis.statistical_inefficiency(md.energies)
    md_ess_per_s = md.n_frames / g / t_md

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, device {device}"
    )
    print(f"# alanine dipeptide ({args.solvent}), shipped flow")
    print(f"{'batch':>7} {'flow draws/s':>14} {'energy/s':>12} {'OpenMM energy/s':>16} {'energy ours/theirs':>19}")
    for r in rows:
        print(
            f"{r['batch']:>7} {r['flow_per_s']:>14.0f} {r['energy_per_s']:>12.0f} "
            f"{r['openmm_energy_per_s']:>16.0f} {r['energy_ratio_ours_theirs']:>19.3f}"
        )
    print(
        f"importance sampling, {n_is} draws: {t_is:.2f} s = flow {t_flow / t_is:.0%} + energy "
        f"{t_energy / t_is:.0%}; ESS {ess:.0f} ({ess / n_is:.1%}) -> {ess / t_is:.0f} effective samples/s"
    )
    print(
        f"OpenMM MD ({args.md_ps:g} ps, 1 thread): {md.n_frames} frames in {t_md:.1f} s, statistical "
        f"inefficiency {g:.1f} -> {md_ess_per_s:.0f} effective samples/s; time per effective "
        f"sample ours/theirs {md_ess_per_s / (ess / t_is):.3f}"
    )
    print(
        json.dumps(
            {
                "system": f"alanine_dipeptide_{args.solvent}",
                "device": str(device),
                "rows": rows,
                "is": {
                    "draws": n_is,
                    "seconds": t_is,
                    "flow_fraction": t_flow / t_is,
                    "energy_fraction": t_energy / t_is,
                    "ess": ess,
                },
                "md": {
                    "ps": args.md_ps,
                    "frames": md.n_frames,
                    "seconds": t_md,
                    "statistical_inefficiency": g,
                    "ess_per_s": md_ess_per_s,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
