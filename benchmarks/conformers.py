r"""Conformer generation speed: the von Mises network (+ importance sampling) vs RDKit ETKDG.

For a few held-out molecules of ``systems/data/molecules/molecules.csv`` the same run times, on
one CPU thread:

* ``etkdg``: ``rdDistGeom.EmbedMultipleConfs`` (ETKDGv3), the field's default generator;
* ``etkdg+mmff``: the same followed by ``MMFFOptimizeMoleculeConfs`` (what the evaluation's
  baseline does);
* ``network``: torsions from the shipped von Mises mixture network and their Cartesian
  coordinates :math:`x(\theta)` (the conformers, ready to write);
* ``network+IS``: the same plus the MMFF energies and normalized importance weights
  (:func:`mcsample.importance_sample`): Boltzmann-weighted conformers;
* ``network+SMC``: annealed SMC from the network to the Boltzmann density with
  :class:`~mcsample.systems.conformers.TorsionMoves`, as ``sample_conformers(method="smc")`` runs it.

VonMisesNet (Swanson et al. 2023) reports 3.1 ms per conformer on CPU against ETKDG's 12.3 ms.
Printed: ms per conformer, and the ratios ours / ETKDG (< 1 means faster), then one JSON line.
Absolute times on a shared 2-core machine are noise; the ratios are measured in the same run.

Run time about 2-3 min on a 2-core CPU: ``python benchmarks/conformers.py [--n 200]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _best(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="conformers per molecule")
    ap.add_argument("--molecules", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from rdkit import Chem
    from rdkit.Chem import rdDistGeom
    from rdkit.Chem import rdForceFieldHelpers as FH

    import mcsample as mc
    from mcsample.flows.von_mises import load_default
    from mcsample.systems.molecules import TorsionTarget

    rows = [
        r
        for r in csv.DictReader(open(ROOT / "systems" / "data" / "molecules" / "molecules.csv"))
        if r["split"] == "heldout"
    ]
    rows = sorted(rows, key=lambda r: -int(r["num_torsions"]))[: args.molecules]
    net = load_default()
    totals = {k: 0.0 for k in ("etkdg", "etkdg+mmff", "network", "network+IS", "network+SMC")}
    n = args.n
    for row in rows:
        target = TorsionTarget.from_smiles(row["smiles"])
        mol = Chem.Mol(target.mol)

        def etkdg(minimize=False):
            m = Chem.Mol(mol)
            m.RemoveAllConformers()
            p = rdDistGeom.ETKDGv3()
            p.randomSeed = 0
            p.numThreads = 1
            rdDistGeom.EmbedMultipleConfs(m, n, p)
            if minimize:
                FH.MMFFOptimizeMoleculeConfs(m, numThreads=1, maxIters=2000)

        gen = torch.Generator().manual_seed(0)

        def network():
            q = net.proposal(target)  # includes featurizing the molecule and the graph network
            theta, _ = q.sample_and_log_prob(n, generator=gen)
            target.positions(theta.double())

        def network_is():
            q = net.proposal(target)
            ws = mc.importance_sample(target, q, n, generator=gen)
            target.positions(ws.samples.double())

        def network_smc():
            from mcsample.systems.conformers import TorsionMoves, _Float64

            q = _Float64(net.proposal(target))
            res = mc.smc(target, q, n, kernel=TorsionMoves(num_steps=5, proposal=q), generator=gen)
            target.positions(res.particles.samples)

        network()  # warm-up
        t = {
            "etkdg": _best(etkdg, args.repeats),
            "etkdg+mmff": _best(lambda: etkdg(True), args.repeats),
            "network": _best(network, args.repeats),
            "network+IS": _best(network_is, args.repeats),
            "network+SMC": _best(network_smc, args.repeats),
        }
        for k, v in t.items():
            totals[k] += v
        print(
            f"{row['name']:22s} T={target.num_torsions}  "
            + "  ".join(f"{k} {1e3 * v / n:7.3f} ms" for k, v in t.items()),
            flush=True,
        )
    per = {k: 1e3 * v / (n * len(rows)) for k, v in totals.items()}
    ratios = {
        "network/etkdg": per["network"] / per["etkdg"],
        "network+IS/etkdg": per["network+IS"] / per["etkdg"],
        "network+IS/etkdg+mmff": per["network+IS"] / per["etkdg+mmff"],
        "network+SMC/etkdg+mmff": per["network+SMC"] / per["etkdg+mmff"],
    }
    print("\nms per conformer (mean over molecules): " + ", ".join(f"{k} {v:.3f}" for k, v in per.items()))
    print("ratios (ours / theirs): " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print(
        json.dumps(
            {"benchmark": "conformers", "n": n, "molecules": len(rows), "ms_per_conformer": per, "ratios": ratios}
        )
    )


if __name__ == "__main__":
    main()
