"""Energy + forces throughput: batched torch (TorchForceField) against OpenMM, same configurations.

What is compared: configurations per second for the potential energy *and* forces of alanine
dipeptide (AMBER ff96 + OBC1 GB, openmmtools' ``AlanineDipeptideImplicit``, 22 atoms) or any
other system below:

* ours: ``TorchForceField.energy_and_forces`` on a batch of B configurations at once, for
  B in 1 … 16384, float32 and float64: on the CPU with the default engine (a compiled numba
  loop per configuration, parallel over the batch) and with the pure-torch ``fused`` engine,
  with 1 and 2 threads; on CUDA (``fused``) when torch sees a GPU;
* theirs: OpenMM's CPU platform evaluating the same configurations one by one in one process
  (one Context; ``setPositions`` + ``getState(getEnergy=True, getForces=True)``), the way
  Boltzmann-generator codes call it; OpenMM's CUDA platform too when it is available.

OpenMM is timed right before every torch row and each ratio compares the two neighbours in
time (the machine is shared, and its load drifts). Besides wall-clock throughput, the table
gives the ratio per CPU-second (process CPU time, all threads), which is less sensitive to
other processes. Output: a table with ratios ours/theirs and a final JSON line. Runs in about
3-5 minutes on a 2-core CPU (less with fewer --batches/--engines); writes nothing to disk.

    python benchmarks/energy.py                       # alanine dipeptide, OBC1
    python benchmarks/energy.py --system kdea --batches 1 64 1024
    python benchmarks/energy.py --device cuda
"""

from __future__ import annotations

import argparse
import json
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
    if name == "kdea":
        return Peptide.from_sequence("KDEA", solvent="obc1", cutoff=2.0)
    raise SystemExit(f"unknown system {name!r}")


def _configurations(peptide, num: int, seed: int = 0) -> np.ndarray:
    """Minimized structure plus 0.01 nm Gaussian noise: realistic, all different."""
    rng = np.random.default_rng(seed)
    x0 = peptide.positions.numpy()
    return x0[None] + 0.01 * rng.standard_normal((num, *x0.shape))


class _Clock:
    """Wall-clock and process CPU time (all threads) since construction."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rates(self, n: int) -> tuple[float, float]:
        return n / (time.perf_counter() - self.wall), n / max(time.process_time() - self.cpu, 1e-9)


def openmm_throughput(context, xyz: np.ndarray, min_time: float = 1.0) -> tuple[float, float]:
    """Configurations per wall second and per CPU second, one setPositions/getState per config."""
    done, clock = 0, _Clock()
    while True:
        for x in xyz:
            context.setPositions(x)
            state = context.getState(getEnergy=True, getForces=True)
            state.getPotentialEnergy()
            state.getForces(asNumpy=True)
        done += len(xyz)
        if time.perf_counter() - clock.wall >= min_time:
            return clock.rates(done)


def torch_throughput(ff, x: torch.Tensor, min_time: float = 1.0) -> tuple[float, float]:
    """Configurations per wall second and per CPU second of ``energy_and_forces`` on ``x``."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    ff.energy_and_forces(x)
    sync()
    reps, clock = 0, _Clock()
    while True:
        ff.energy_and_forces(x)
        sync()
        reps += 1
        if time.perf_counter() - clock.wall >= min_time and reps >= 2:
            return clock.rates(reps * x.shape[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--system", default="ala2-obc1", choices=["ala2-obc1", "ala2-vacuum", "kdea"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256, 1024, 4096, 16384])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    ap.add_argument("--device", default=None, help="cpu, cuda (default: cpu, plus cuda if available)")
    ap.add_argument("--engines", nargs="+", default=["numba", "fused"])
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="CPU threads for the torch/numba runs (OpenMM keeps its default)",
    )
    ap.add_argument("--openmm-configs", type=int, default=500)
    ap.add_argument("--min-time", type=float, default=1.0)
    args = ap.parse_args(argv)

    import openmm

    peptide = _system(args.system)
    ff = peptide.forcefield
    n_max = max(args.batches)
    xyz = _configurations(peptide, max(n_max, args.openmm_configs))
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    omm_platforms = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]

    print(f"# {args.system}: {peptide.n_atoms} atoms, forces {[type(f).__name__ for f in peptide.system.getForces()]}")
    print(
        f"# torch {torch.__version__} ({torch.get_num_threads()} threads), OpenMM "
        f"{openmm.__version__}, {platform.processor() or platform.machine()}"
    )
    ctx = openmm.Context(peptide.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"))
    omm_xyz = xyz[: args.openmm_configs]
    openmm_throughput(ctx, omm_xyz[:10], 0.0)  # warm-up
    rows = []
    default_threads = torch.get_num_threads()
    for device in devices:
        ffd = ff.to(device)
        engines = args.engines if device == "cpu" else ["fused"]
        threads = args.threads if device == "cpu" else [default_threads]
        for engine in engines:
            ffd.engine = engine
            for nt in threads:
                for dt in args.dtypes:
                    dtype = getattr(torch, dt)
                    for b in args.batches:
                        # OpenMM right before each row: the ratio compares neighbours in time
                        torch.set_num_threads(default_threads)
                        omm_wall, omm_cpu = openmm_throughput(ctx, omm_xyz, args.min_time)
                        torch.set_num_threads(nt)
                        x = torch.as_tensor(xyz[:b], dtype=dtype, device=device)
                        wall, cpu = torch_throughput(ffd, x, args.min_time)
                        rows.append(
                            {
                                "device": device,
                                "engine": engine,
                                "threads": nt,
                                "dtype": dt,
                                "batch": b,
                                "configs_per_s": wall,
                                "configs_per_cpu_s": cpu,
                                "openmm_cpu_configs_per_s": omm_wall,
                                "openmm_cpu_configs_per_cpu_s": omm_cpu,
                                "ratio_vs_openmm_cpu": wall / omm_wall,
                                "cpu_time_ratio_vs_openmm_cpu": cpu / omm_cpu,
                            }
                        )
                        print(
                            f"  {device:4s} {engine:6s} {nt}t {dt:7s} B={b:6d}: {wall:10.0f} conf/s "
                            f"(OpenMM {omm_wall:6.0f}) ratio {wall / omm_wall:6.1f}x, "
                            f"per CPU-second {cpu / omm_cpu:6.1f}x",
                            flush=True,
                        )
        torch.set_num_threads(default_threads)
        ff.to("cpu")
        ff.engine = "auto"
    omm_cuda = None
    if "CUDA" in omm_platforms and "cuda" in devices:
        cctx = openmm.Context(peptide.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CUDA"))
        omm_cuda = openmm_throughput(cctx, omm_xyz, 2 * args.min_time)[0]
        print(f"OpenMM CUDA platform, one by one: {omm_cuda:.0f} conf/s")
        for r in rows:
            r["ratio_vs_openmm_cuda"] = r["configs_per_s"] / omm_cuda

    print(
        f"\n{'device':6s} {'engine':6s} {'thr':>3s} {'dtype':8s} {'batch':>6s} {'conf/s':>10s} "
        f"{'OpenMM':>7s} {'ratio':>7s} {'CPU-s ratio':>11s}"
    )
    for r in rows:
        print(
            f"{r['device']:6s} {r['engine']:6s} {r['threads']:3d} {r['dtype']:8s} {r['batch']:6d} "
            f"{r['configs_per_s']:10.0f} {r['openmm_cpu_configs_per_s']:7.0f} "
            f"{r['ratio_vs_openmm_cpu']:6.1f}x {r['cpu_time_ratio_vs_openmm_cpu']:10.1f}x"
        )
    big = [r["ratio_vs_openmm_cpu"] for r in rows if r["device"] == "cpu" and r["batch"] >= 1024]
    big_cpu = [r["cpu_time_ratio_vs_openmm_cpu"] for r in rows if r["device"] == "cpu" and r["batch"] >= 1024]
    omm_rates = [r["openmm_cpu_configs_per_s"] for r in rows if r["device"] == "cpu"]
    summary = {
        "benchmark": "energy_forces_throughput",
        "system": args.system,
        "n_atoms": peptide.n_atoms,
        "openmm_cpu_configs_per_s_median": float(np.median(omm_rates)) if omm_rates else None,
        "openmm_cuda_configs_per_s": omm_cuda,
        "results": rows,
        "best_cpu_ratio_batch_ge_1024": max(big) if big else None,
        "best_cpu_time_ratio_batch_ge_1024": max(big_cpu) if big_cpu else None,
        "goal_30x_met": (max(big) >= 30.0) if big else None,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
