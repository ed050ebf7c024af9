"""Evaluate conformer samplers on held-out molecules against long reference MCMC.

For every held-out molecule of ``systems/data/molecules/molecules.csv`` (scaffolds never seen in
training) and each sampler, ``--num-conformers`` conformers are drawn and their torsion
marginals compared with a long parallel-tempering reference of the same
:class:`~mcsample.systems.molecules.TorsionTarget` (MMFF94, 300 K; 10000 samples, settings
``common.EVAL_REFERENCE``, cached in ``outputs/molecules/reference/heldout/``):

(a) ``etkdg``: RDKit ETKDGv3 embedding + MMFF94 minimization of every conformer (the standard
    cheminformatics recipe), torsions measured on the minimized structures;
(b) ``network``: the von Mises mixture network alone (the shipped checkpoint);
(c) ``network+IS``: its samples importance-weighted to the Boltzmann density;
(d) ``network+SMC``: annealed SMC from the network to the target, moves
    :class:`~mcsample.systems.conformers.TorsionMoves` (random walk + independence redraws from the
    network), as ``sample_conformers(method="smc")`` does;
(ref) ``reference subsample``: N reference samples: the finite-sample floor of the metrics.

Metrics (VonMisesNet's, Swanson et al. 2023): KL(reference || sampler) of 32-bin histograms
per torsion, and the earth mover's distance on the circle per torsion (radians), averaged
over torsions and molecules; ESS fraction (ESS / N) of the weighted samplers; milliseconds per
conformer on this CPU (single thread; network timings include building the coordinates,
IS/SMC include the MMFF energies).

Outputs in ``outputs/molecules/``: ``evaluation.csv`` (one row per molecule and method),
``evaluation_summary.csv`` and ``evaluation.png`` (KL per method, and one molecule's marginals).

Measured with the shipped checkpoint (25 held-out molecules, 500 conformers each, shared
2-core CPU; mean / median KL, mean EMD in radians, ESS / N, ms per conformer)::

    etkdg                 4.701  4.056  0.768    -     20.4
    network               1.510  1.149  0.861    -      0.010
    network+IS            1.848  0.430  0.274  0.090    0.030
    network+SMC           0.047  0.036  0.066  0.850    1.13
    reference subsample   0.031  0.030  0.028    -       -

Run time on a 2-core CPU: the first run about 30 min (20 of them computing the 25 held-out
references, cached afterwards), later runs about 8 min; ``--max-molecules 5
--num-conformers 300`` takes 1-2 min once the references exist.

    python examples/molecules/evaluate.py [--checkpoint PATH] [--max-molecules N]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    EVAL_REFERENCE,
    OUTPUTS,
    circular_emd,
    histogram,
    histogram_kl,
    load_molecules,
    make_target,
    reference,
)

import mcsample as mc  # noqa: E402
from mcsample.flows.von_mises import DEFAULT_CHECKPOINT, load_checkpoint  # noqa: E402
from mcsample.systems.conformers import TorsionMoves  # noqa: E402

METHODS = ["etkdg", "network", "network+IS", "network+SMC", "reference subsample"]


def run_etkdg(target, n, seed):
    """ETKDGv3 + MMFF94 minimization, single thread; torsions of the minimized conformers."""
    from rdkit import Chem
    from rdkit.Chem import rdDistGeom
    from rdkit.Chem import rdForceFieldHelpers as FH

    m = Chem.Mol(target.mol)
    m.RemoveAllConformers()
    params = rdDistGeom.ETKDGv3()
    params.randomSeed = seed
    params.numThreads = 1
    t0 = time.perf_counter()
    cids = list(rdDistGeom.EmbedMultipleConfs(m, n, params))
    FH.MMFFOptimizeMoleculeConfs(m, numThreads=1, maxIters=2000)
    dt = time.perf_counter() - t0
    pos = torch.tensor(np.array([m.GetConformer(c).GetPositions() for c in cids]), dtype=torch.float64)
    return target.torsion_angles(pos), None, dt, float("nan")


def run_network(target, q, n, gen):
    t0 = time.perf_counter()
    theta, _ = q.sample_and_log_prob(n, generator=gen)
    target.positions(theta.double())  # building the conformers is part of the cost
    return theta.double(), None, time.perf_counter() - t0, float("nan")


class _F64:
    def __init__(self, q):
        self.q, self.event_shape = q, q.event_shape

    def sample_and_log_prob(self, shape, generator=None):
        x, lq = self.q.sample_and_log_prob(shape, generator=generator)
        return x.double(), lq.double()

    def log_prob(self, x):
        return self.q.log_prob(x).double()


def run_is(target, q, n, gen):
    t0 = time.perf_counter()
    ws = mc.importance_sample(target, _F64(q), n, generator=gen)
    dt = time.perf_counter() - t0
    return ws.samples, ws.normalized_weights, dt, float(ws.ess) / n


def run_smc(target, q, n, gen):
    t0 = time.perf_counter()
    q64 = _F64(q)
    res = mc.smc(target, q64, n, kernel=TorsionMoves(num_steps=5, proposal=q64), generator=gen)
    dt = time.perf_counter() - t0
    p = res.particles
    return p.samples, p.normalized_weights, dt, float(p.ess) / n


def evaluate(rows, net, n, seed, methods=tuple(METHODS), log=print):
    results, marginals = [], {}
    for k, row in enumerate(rows):
        target = make_target(row)
        T = target.num_torsions
        t0 = time.perf_counter()
        ref = reference(row, target, EVAL_REFERENCE, "heldout")
        q = net.proposal(target)
        gen = torch.Generator().manual_seed(seed + k)
        runners = {
            "etkdg": lambda: run_etkdg(target, n, seed + k),
            "network": lambda: run_network(target, q, n, gen),
            "network+IS": lambda: run_is(target, q, n, gen),
            "network+SMC": lambda: run_smc(target, q, n, gen),
            "reference subsample": lambda: (
                ref[torch.randperm(ref.shape[0], generator=gen)[:n]],
                None,
                float("nan"),
                1.0,
            ),
        }
        outs = {m: runners[m]() for m in METHODS if m in methods}
        for method, (theta, w, dt, essf) in outs.items():
            kl = histogram_kl(ref, theta, w)
            emd = circular_emd(ref, theta, w)
            results.append(
                {
                    "molecule": row["name"],
                    "torsions": T,
                    "method": method,
                    "kl": float(kl.mean()),
                    "emd": float(emd.mean()),
                    "ms_per_conformer": 1e3 * dt / n,
                    "ess_fraction": essf,
                }
            )
        if k == 0 or T > marginals.get("T", 0):
            marginals = {
                "T": T,
                "name": row["name"],
                "ref": histogram(ref),
                **{m: histogram(o[0], o[1]) for m, o in outs.items()},
            }
        log(
            f"[{k + 1}/{len(rows)}] {row['name']} T={T}: "
            + ", ".join(f"{r['method']} KL {r['kl']:.3f}" for r in results[-len(outs) :])
            + f" ({time.perf_counter() - t0:.0f} s)"
        )
    return results, marginals


def summarize(results):
    rows = []
    for m in METHODS:
        rs = [r for r in results if r["method"] == m]
        if not rs:
            continue
        essf = [r["ess_fraction"] for r in rs if not math.isnan(r["ess_fraction"])]
        ms = [r["ms_per_conformer"] for r in rs if not math.isnan(r["ms_per_conformer"])]
        rows.append(
            {
                "method": m,
                "mean_kl": float(np.mean([r["kl"] for r in rs])),
                "median_kl": float(np.median([r["kl"] for r in rs])),
                "mean_emd_rad": float(np.mean([r["emd"] for r in rs])),
                "ess_fraction": float(np.mean(essf)) if essf else float("nan"),
                "ms_per_conformer": float(np.mean(ms)) if ms else float("nan"),
                "molecules": len(rs),
            }
        )
    return rows


def _write_csv(rows, path):
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def plot(summary, marginals, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = marginals["T"]
    fig, axes = plt.subplots(1, 1 + min(T, 4), figsize=(4 * (1 + min(T, 4)), 3.4))
    ax = axes[0]
    ax.bar([s["method"] for s in summary], [s["mean_kl"] for s in summary], color="C0")
    ax.set_ylabel("mean KL, 32-bin histograms")
    ax.tick_params(axis="x", rotation=60)
    centers = np.linspace(-math.pi, math.pi, 33)[:-1] + math.pi / 32
    for t in range(min(T, 4)):
        a = axes[1 + t]
        a.plot(centers, marginals["ref"][t], "k-", lw=2, label="reference PT")
        for m, c in zip(["etkdg", "network", "network+IS", "network+SMC"], ["C3", "C1", "C2", "C0"]):
            if m not in marginals:
                continue
            a.plot(centers, marginals[m][t], color=c, lw=1, label=m)
        a.set_title(f"{marginals['name']} torsion {t}")
        a.set_xlabel("radians")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name("tmp_" + path.name)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description="evaluate conformer samplers on held-out molecules")
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--num-conformers", type=int, default=500)
    ap.add_argument("--max-molecules", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUTPUTS)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = load_molecules("heldout")[: args.max_molecules]
    net = load_checkpoint(args.checkpoint)
    results, marginals = evaluate(rows, net, args.num_conformers, args.seed, args.methods)
    summary = summarize(results)
    args.out.mkdir(parents=True, exist_ok=True)
    _write_csv(results, args.out / "evaluation.csv")
    _write_csv(summary, args.out / "evaluation_summary.csv")
    plot(summary, marginals, args.out / "evaluation.png")
    print(
        f"\n{len(rows)} held-out molecules, {args.num_conformers} conformers each (checkpoint {args.checkpoint.name})"
    )
    print(f"{'method':22s} {'mean KL':>8s} {'median KL':>9s} {'EMD rad':>8s} {'ESS/N':>6s} {'ms/conf':>8s}")
    for s in summary:
        print(
            f"{s['method']:22s} {s['mean_kl']:8.3f} {s['median_kl']:9.3f} {s['mean_emd_rad']:8.3f} "
            f"{s['ess_fraction']:6.3f} {s['ms_per_conformer']:8.3f}"
        )
    print(f"outputs in {args.out}")


if __name__ == "__main__":
    main()
