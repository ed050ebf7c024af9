"""Transferable-flow throughput: proposals + exact log-densities per second for a dipeptide, and the
importance weight against the single-molecule Boltzmann generator's, same run.

What is measured for a zwitterionic dipeptide (amber14-all + OBC1, 310 K, 2 nm cutoff):

* **transferable flow**: ``proposal(peptide).sample_and_log_prob`` (draws, exact log q,
  float64 Cartesian output) per second at batch 1024, and ``log_prob`` of 1024 given
  configurations per second (with the shipped free-torsion checkpoint both include the harmonic
  completion of the stiff coordinates: four damped Newton steps, each one energy gradient and
  one to three energies per draw);
* **energy**: the batched torch energy at the same batch, so the share of the flow in an
  importance-sampling step is visible;
* **reference**: the single-molecule :class:`~mcsample.flows.boltzmann_generator.BoltzmannGenerator`
  architecture of alanine dipeptide (8 coupling layers, MLP conditioners), same batch, as the
  our/their ratio of the price of transferability (time per proposal).

Uses the shipped ``flows/checkpoints/transferable.pt`` when it exists (else an untrained flow
of the same architecture: the cost does not depend on the weights). Prints one table and a
JSON line; about a minute on 2 CPU cores.

    python benchmarks/transferable.py --sequence EW
    python benchmarks/transferable.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def _timeit(fn, min_time: float = 1.0, min_calls: int = 2) -> float:
    """Median seconds per call over at least ``min_calls`` calls and ``min_time`` seconds."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="transferable-flow throughput")
    ap.add_argument("--sequence", default="EW", help="dipeptide (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=1024, help="batch size (default: %(default)s)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    args = ap.parse_args(argv)

    from mcsample.flows import CHECKPOINTS
    from mcsample.flows.boltzmann_generator import BoltzmannGenerator
    from mcsample.flows.training import load_flow
    from mcsample.flows.transferable import TransferableConfig, TransferableFlow
    from mcsample.systems.peptides import Peptide

    pep = Peptide.from_sequence(args.sequence, caps=False, solvent="obc1", temperature=310.0, cutoff=2.0)
    path = CHECKPOINTS / "transferable.pt"
    flow = load_flow(path) if path.exists() else TransferableFlow(TransferableConfig())
    flow = flow.to(args.device)
    prop = flow.proposal(pep).to(args.device)
    n = args.batch
    g = torch.Generator(device=args.device).manual_seed(0)
    with torch.no_grad():
        x, _ = prop.sample_and_log_prob((n,), g)
    t_sample = _timeit(lambda: prop.sample_and_log_prob((n,), g))

    def density():
        with torch.no_grad():
            prop.log_prob(x)

    t_density = _timeit(density)

    def energy():
        with torch.no_grad():
            pep.log_prob(x.cpu() if args.device == "cpu" else x)

    t_energy = _timeit(energy)
    # the single-molecule architecture on the same peptide's internal coordinates
    frames = x[:64].detach().cpu()
    single = BoltzmannGenerator.from_data(pep, frames, layers=8, hidden=128).to(args.device)
    t_single = _timeit(lambda: single.sample_and_log_prob((n,), g))
    rows = [
        ("transferable: sample + log q", t_sample),
        ("transferable: log q of given x", t_density),
        ("torch energy (same batch)", t_energy),
        ("single-molecule flow: sample + log q", t_single),
    ]
    cores = os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{args.sequence}: {pep.n_atoms} atoms, batch {n}, device {args.device}, "
        f"{platform.processor() or platform.machine()}, {cores} cores, load {load:.1f}, "
        f"torch threads {torch.get_num_threads()}, trained weights: {path.exists()}"
    )
    print(f"{'':40s} {'s/batch':>9s} {'per s':>10s}")
    for name, t in rows:
        print(f"{name:40s} {t:9.3f} {n / t:10.0f}")
    print(f"ratio transferable / single-molecule (time per proposal): {t_sample / t_single:.2f}")
    print(
        json.dumps(
            {
                "sequence": args.sequence,
                "batch": n,
                "device": args.device,
                "cores": cores,
                "load": load,
                "seconds": dict(rows),
                "ratio_transferable_over_single": t_sample / t_single,
            }
        )
    )


if __name__ == "__main__":
    main()
