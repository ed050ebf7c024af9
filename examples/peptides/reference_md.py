"""Reference MD data set for alanine dipeptide (AMBER ff96, OBC1 implicit solvent and vacuum, 300 K).

The data that peptide flows train on and are scored against: Langevin MD
(``LangevinMiddleIntegrator``) of openmmtools' ``AlanineDipeptideImplicit`` /
``AlanineDipeptideVacuum`` (``constraints=None``: every bond vibrates, hence a 1 fs step), the
Boltzmann-generator benchmark of Noé et al. (2019) and FAB (Midgley et al. 2023), through
:func:`mcsample.systems.md.run_md`.

Settings (defaults): 300 K, 1 fs, friction 1/ps, 10 ps of unrecorded equilibration after a
local minimization, then ``--time-ns`` 1.0 ns per solvent with a frame every 0.1 ps
(10,000 frames), seed 0; the two solvents run in parallel processes (``--jobs 2``).

Outputs (default ``outputs/peptides/``, see ``examples/peptides/README.md`` for the format):

* ``alanine_dipeptide_{obc1,vacuum}_md.npz`` — frames, potential energies, topology and
  provenance (+ the OpenMM checkpoint: rerunning the same command resumes/extends it);
* ``alanine_dipeptide_{obc1,vacuum}_md.json`` — provenance and summary statistics (mean
  energy, statistical inefficiency, P(φ>0) and ΔF(φ>0 − φ<0) with error bars);
* ``ramachandran_{obc1,vacuum}.png`` and ``energies.png``.

Run time on this project's 2-core CPU (OpenMM CPU platform, one thread per solvent, the two
solvents in parallel): measured 445 s (7.4 min) for the default 1 ns each on the shared machine
(load average 9-11 from other jobs): OBC1 2,400 steps/s (the limit), vacuum 9,500 steps/s;
one OBC1 step costs about 0.25 ms of CPU, so an idle machine needs about 4-5 min. ``--quick``
(20 ps each) takes 20-50 s. ``--time-ns`` sets the length.

1 ns samples the φ<0 basins (C7eq/β, αR) but visits the φ>0 basins (αL, C7ax) rarely or never
(transitions on the ns scale); the ``.json`` counts the visits. For ΔF(φ>0 − φ<0) run longer or
use parallel tempering (:func:`mcsample.systems.md.run_parallel_tempering`).

Usage::

    python examples/peptides/reference_md.py            # 1 ns per solvent, ~5-8 min
    python examples/peptides/reference_md.py --quick    # 20 ps per solvent, under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path("outputs") / "peptides"


def _run_one(solvent: str, args: dict) -> dict:
    """One solvent: MD, then the summary and the Ramachandran plot. Runs in a worker process."""
    import torch

    from mcsample.systems import analysis as A
    from mcsample.systems.md import run_md, run_parallel_tempering
    from mcsample.systems.peptides import alanine_dipeptide

    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    pep = alanine_dipeptide(solvent, temperature=args["temperature"])
    pt = args["sampler"] == "pt"
    tag = "pt" if pt else "md"
    path = out / f"alanine_dipeptide_{solvent}_{tag}.npz"
    t0 = time.perf_counter()
    if pt:
        temps = args["temperature"] * (args["t_max"] / args["temperature"]) ** np.linspace(0, 1, args["replicas"])
        res = run_parallel_tempering(
            pep,
            temps,
            args["equilibration_ps"] + args["time_ps"],
            exchange_interval_ps=args["report_ps"],
            timestep_fs=args["timestep_fs"],
            friction_per_ps=args["friction"],
            report_interval_ps=args["report_ps"],
            generator=torch.Generator().manual_seed(args["seed"]),
            platform=args["platform"],
            path=path,
            progress=not args["no_progress"],
            threads=args["threads"],
        )
        # drop the equilibration frames (the run starts at the minimized structure)
        keep = res.trajectory.time > args["equilibration_ps"] + 1e-9
        res.trajectory, res.potential_energy = res.trajectory[keep], res.potential_energy[keep]
    else:
        res = run_md(
            pep,
            args["time_ps"],
            timestep_fs=args["timestep_fs"],
            friction_per_ps=args["friction"],
            report_interval_ps=args["report_ps"],
            equilibration_ps=args["equilibration_ps"],
            generator=torch.Generator().manual_seed(args["seed"]),
            platform=args["platform"],
            path=path,
            progress=not args["no_progress"],
            threads=args["threads"],
        )
    wall = time.perf_counter() - t0
    phi, psi = A.ramachandran_angles(res.trajectory)
    g_e = A.statistical_inefficiency(res.energies)
    g_phi = A.statistical_inefficiency((phi > 0).astype(float))
    dF = A.free_energy_difference(phi, kT=1.0, statistical_inefficiency=g_phi)
    kT = pep.kT
    plot = A.plot_ramachandran(
        phi,
        psi,
        out / f"ramachandran_{solvent}{'_pt' if pt else ''}.png",
        kT=1.0,
        vmax=10.0,
        title=f"alanine dipeptide, ff96 {solvent}, {pep.temperature:g} K, "
        f"{args['time_ps'] / 1000:g} ns " + (f"PT ({args['replicas']} replicas)" if pt else "MD"),
    )
    summary = dict(res.metadata)
    summary.update(
        {
            "file": path.name,
            "sampler": args["sampler"],
            "analysed_frames": int(res.trajectory.n_frames),
            "command": " ".join(sys.argv),
            "solvent": solvent,
            "kT_kJ_per_mol": kT,
            "steps_per_second": (res.metadata["steps"] / res.metadata["wall_time_s"])
            if res.metadata.get("wall_time_s") and "steps" in res.metadata
            else None,
            "wall_time_this_call_s": wall,
            "energy_mean_kJ_per_mol": float(res.energies.mean()),
            "energy_std_kJ_per_mol": float(res.energies.std()),
            "energy_statistical_inefficiency": g_e,
            "energy_mean_stderr_kJ_per_mol": float(res.energies.std() * np.sqrt(g_e / len(res.energies))),
            "p_phi_positive": dF.p_positive,
            "deltaF_phi_pos_minus_neg_kT": dF.value,
            "deltaF_stderr_kT": dF.stderr,
            "phi_statistical_inefficiency": g_phi,
            # entries into φ>0: with few of them the ΔF error bar (which assumes many) is not reliable
            "phi_positive_visits": int(np.sum(np.diff((phi > 0).astype(int)) == 1) + int(phi[0] > 0)),
            "ramachandran_png": os.path.basename(plot),
        }
    )
    # strict JSON: an empty region gives ΔF = ±inf, written as null
    summary = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in summary.items()}
    tmp = out / f".alanine_dipeptide_{solvent}_{tag}.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True, allow_nan=False))
    os.replace(tmp, out / f"alanine_dipeptide_{solvent}_{tag}.json")
    return summary


def _fmt(value, stderr) -> str:
    if value is None:
        return "inf kT (φ>0 not visited: run longer)"
    return f"{value:.2f} ± {stderr:.2f} kT"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--solvent", nargs="+", default=["obc1", "vacuum"], choices=["obc1", "vacuum"])
    parser.add_argument("--time-ns", type=float, default=1.0, help="production length per solvent (ns)")
    parser.add_argument("--quick", action="store_true", help="20 ps per solvent (about a minute)")
    parser.add_argument("--timestep-fs", type=float, default=1.0)
    parser.add_argument("--friction", type=float, default=1.0, help="Langevin friction (1/ps)")
    parser.add_argument("--report-ps", type=float, default=0.1, help="one frame every this many ps")
    parser.add_argument("--equilibration-ps", type=float, default=10.0)
    parser.add_argument("--temperature", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--platform", default="CPU", help="OpenMM platform (CPU, Reference, CUDA, ...)")
    parser.add_argument("--jobs", type=int, default=2, help="solvents run in parallel processes")
    parser.add_argument(
        "--sampler",
        choices=["md", "pt"],
        default="md",
        help="plain Langevin MD, or parallel tempering (replica exchange) whose 300 K replica visits the φ>0 basins",
    )
    parser.add_argument("--replicas", type=int, default=6, help="PT: number of temperatures")
    parser.add_argument("--t-max", type=float, default=600.0, help="PT: highest temperature (K), geometric ladder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-progress", action="store_true")
    a = parser.parse_args(argv)
    time_ps = 20.0 if a.quick else 1000.0 * a.time_ns
    out = a.out if not a.quick or a.out != DEFAULT_OUT else DEFAULT_OUT / "quick"
    jobs = max(1, min(a.jobs, len(a.solvent)))
    args = {
        "out": str(out),
        "time_ps": time_ps,
        "timestep_fs": a.timestep_fs,
        "friction": a.friction,
        "report_ps": a.report_ps,
        "equilibration_ps": 2.0 if a.quick else a.equilibration_ps,
        "temperature": a.temperature,
        "seed": a.seed,
        "platform": a.platform,
        "no_progress": a.no_progress,
        "threads": 1 if jobs > 1 else None,
        "sampler": a.sampler,
        "replicas": a.replicas,
        "t_max": a.t_max,
    }
    t0 = time.perf_counter()
    if jobs == 1:
        summaries = [_run_one(s, args) for s in a.solvent]
    else:
        with ProcessPoolExecutor(jobs) as pool:
            futures = [pool.submit(_run_one, s, args) for s in a.solvent]
            summaries = [f.result() for f in futures]

    from mcsample.systems import analysis as A
    from mcsample.systems.md import MDResult

    sets = {}
    for s in summaries:
        sets[s["solvent"]] = MDResult.load(out / s["file"]).energies
    A.plot_energy_histograms(
        sets,
        out / f"energies{'_pt' if a.sampler == 'pt' else ''}.png",
        title=f"alanine dipeptide ff96, {a.temperature:g} K ({a.sampler.upper()})",
    )
    print(f"\nwrote {out}/ in {time.perf_counter() - t0:.0f} s")
    for s in summaries:
        print(
            f"  {s['solvent']:7s} {s['analysed_frames']} frames, {s['time_ps'] / 1000:g} ns, "
            f"{s['steps_per_second'] or float('nan'):.0f} steps/s; <U> = {s['energy_mean_kJ_per_mol']:.2f} ± "
            f"{s['energy_mean_stderr_kJ_per_mol']:.2f} kJ/mol; P(φ>0) = {s['p_phi_positive']:.4f}, "
            f"ΔF(φ>0 − φ<0) = {_fmt(s['deltaF_phi_pos_minus_neg_kT'], s['deltaF_stderr_kT'])} "
            f"({s['phi_positive_visits']} visits to φ>0)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
