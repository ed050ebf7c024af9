"""Data-generation throughput: batched BAOAB Langevin (``run_langevin``) against OpenMM MD.

What is compared, on the same system in the same run:

* ours: :func:`mcsample.systems.langevin.run_langevin` with R replicas integrated together
  (one batched energy + forces call per step: the compiled numba engine on the CPU, the fused
  torch engine on a GPU), R in 1 ... 2048, in replica-steps per second (R x steps / wall time);
* theirs: OpenMM's ``LangevinMiddleIntegrator`` on its CPU platform (one Context), with its
  default threads (all cores) and with one thread, in steps per second (``integrator.step(n)``,
  no reporting in between).

Both use a 1 fs step, friction 1/ps, the System's masses and the same temperature. OpenMM is
timed right before every row of ours and each ratio compares the two neighbours in time (the
machine is shared and its load drifts). Ratios are the result; absolute rates on shared CPUs
are noise. The load average before and after is printed and stored in the final JSON line.

    python benchmarks/langevin.py                        # alanine dipeptide OBC1, float32 + float64
    python benchmarks/langevin.py --system AL --threads 1 2
    python benchmarks/langevin.py --device cuda --replicas 1 64 512 2048 16384
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch


def _system(name: str):
    from mcsample.systems.peptides import Peptide, alanine_dipeptide

    if name == "ala2-obc1":
        return alanine_dipeptide("obc1")
    if name == "ala2-vacuum":
        return alanine_dipeptide("vacuum")
    # a training dipeptide of the transferable data set (zwitterionic, amber14 + OBC1, 310 K)
    return Peptide.from_sequence(name, caps=False, solvent="obc1", temperature=310.0, cutoff=2.0)


def openmm_steps_per_s(peptide, min_time: float, threads: int | None = None) -> float:
    """Steps per wall second of OpenMM's LangevinMiddleIntegrator (1 fs, 1/ps), CPU platform
    (``threads``: its default, all cores, when ``None``)."""
    import openmm
    import openmm.unit as unit

    integ = openmm.LangevinMiddleIntegrator(
        peptide.temperature * unit.kelvin, 1 / unit.picosecond, 1 * unit.femtosecond
    )
    props = {} if threads is None else {"Threads": str(int(threads))}
    ctx = openmm.Context(peptide.system, integ, openmm.Platform.getPlatformByName("CPU"), props)
    ctx.setPositions(peptide.positions.numpy())
    ctx.setVelocitiesToTemperature(peptide.temperature * unit.kelvin, 1)
    integ.step(100)
    done, n, t0 = 0, 200, time.perf_counter()
    while time.perf_counter() - t0 < min_time:
        integ.step(n)
        done += n
        n = min(2 * n, 20000)
    return done / (time.perf_counter() - t0)


def ours_replica_steps_per_s(peptide, replicas: int, dtype, device, min_time: float) -> float:
    """Replica-steps per wall second of run_langevin (1 fs, 1/ps), one frame per call."""
    from mcsample.systems.langevin import run_langevin

    gen = torch.Generator(device=device).manual_seed(0)
    kw = dict(dtype=dtype, device=device, progress=False, generator=gen)
    x = peptide.positions.to(device=device, dtype=dtype)
    res = run_langevin(peptide, replicas, 0.01, report_interval_ps=0.01, positions=x, **kw)  # warm-up
    steps, done, t0 = 10, 0, time.perf_counter()
    while time.perf_counter() - t0 < min_time:
        res = run_langevin(
            peptide,
            replicas,
            steps / 1000.0,
            report_interval_ps=steps / 1000.0,
            positions=res.final_positions,
            velocities=res.final_velocities,
            **kw,
        )
        done += steps
        steps = min(2 * steps, 5000)
    if device != "cpu":
        torch.cuda.synchronize()
    return done * replicas / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--system", default="ala2-obc1", help="ala2-obc1, ala2-vacuum, or a training dipeptide such as AL")
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 64, 512, 2048])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    ap.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch/numba threads for ours (OpenMM keeps its default)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds per measurement")
    args = ap.parse_args(argv)

    import openmm

    load_before = os.getloadavg()
    peptide = _system(args.system)
    print(
        f"# {args.system}: {peptide.n_atoms} atoms, {peptide.temperature:g} K; torch "
        f"{torch.__version__}, OpenMM {openmm.__version__}; {os.cpu_count()} CPUs "
        f"({platform.machine()}), load average {load_before[0]:.1f}",
        flush=True,
    )
    threads = args.threads if args.device == "cpu" else [torch.get_num_threads()]
    default_threads = torch.get_num_threads()
    rows = []
    for nt in threads:
        for dt in args.dtypes:
            for r in args.replicas:
                torch.set_num_threads(default_threads)
                omm = openmm_steps_per_s(peptide, args.min_time)
                omm1 = openmm_steps_per_s(peptide, args.min_time, threads=1)
                torch.set_num_threads(nt)
                ours = ours_replica_steps_per_s(peptide, r, getattr(torch, dt), args.device, args.min_time)
                rows.append(
                    {
                        "device": args.device,
                        "threads": nt,
                        "dtype": dt,
                        "replicas": r,
                        "replica_steps_per_s": ours,
                        "openmm_steps_per_s": omm,
                        "openmm_1thread_steps_per_s": omm1,
                        "ratio": ours / omm,
                        "ratio_vs_openmm_1thread": ours / omm1,
                    }
                )
                print(
                    f"  {args.device} {nt}t {dt:7s} R={r:5d}: {ours:9.0f} replica-steps/s "
                    f"(OpenMM {omm:6.0f}, 1 thread {omm1:6.0f} steps/s) ratio {ours / omm:6.1f}x, "
                    f"{ours / omm1:6.1f}x",
                    flush=True,
                )
    torch.set_num_threads(default_threads)
    load_after = os.getloadavg()
    print(
        f"\n{'device':6s} {'thr':>3s} {'dtype':8s} {'R':>5s} {'ours/s':>10s} {'OpenMM/s':>9s} "
        f"{'ratio':>7s} {'OpenMM 1t':>9s} {'ratio':>7s}"
    )
    for r in rows:
        print(
            f"{r['device']:6s} {r['threads']:3d} {r['dtype']:8s} {r['replicas']:5d} "
            f"{r['replica_steps_per_s']:10.0f} {r['openmm_steps_per_s']:9.0f} {r['ratio']:6.1f}x "
            f"{r['openmm_1thread_steps_per_s']:9.0f} {r['ratio_vs_openmm_1thread']:6.1f}x"
        )
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f}")
    print(
        json.dumps(
            {
                "benchmark": "langevin_throughput",
                "system": args.system,
                "n_atoms": peptide.n_atoms,
                "cpus": os.cpu_count(),
                "load_average_before": load_before,
                "load_average_after": load_after,
                "median_openmm_steps_per_s": float(np.median([r["openmm_steps_per_s"] for r in rows])),
                "results": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
