"""Shared pieces of the molecule examples: the molecule set, cached reference samples, metrics.

* :func:`load_molecules` reads ``systems/data/molecules/molecules.csv`` (see its README).
* :func:`reference` returns parallel-tempering torsion samples of a molecule at 300 K,
  computed once and cached under ``outputs/molecules/reference/`` (atomic writes), so the
  training and evaluation scripts share them.
* :func:`histogram_kl` and :func:`circular_emd`: the metrics of VonMisesNet (Swanson et al.
  2023) on torsion marginals: KL of 32-bin histograms, and the earth mover's distance on the
  circle (POT's ``ot.wasserstein_circle``, angles rescaled to [0, 1) and the distance
  reported in radians).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "systems" / "data" / "molecules" / "molecules.csv"
OUTPUTS = ROOT / "outputs" / "molecules"

# reference settings: (samples, chains, replicas, burn-in, thin)
TRAIN_REFERENCE = dict(num_samples=3000, num_chains=16, num_replicas=6, burn_in=500, thin=4)
EVAL_REFERENCE = dict(num_samples=10000, num_chains=32, num_replicas=6, burn_in=500, thin=4)


def load_molecules(split: str | None = None) -> list[dict]:
    """Rows of the molecule CSV (``name, source, smiles, num_torsions, ..., split``)."""
    with open(DATA) as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if split is None or r["split"] == split]


def make_target(row: dict, temperature: float = 300.0):
    from mcsample.systems.molecules import TorsionTarget

    return TorsionTarget.from_smiles(row["smiles"], temperature=temperature)


def reference(row: dict, target, settings: dict, kind: str, seed: int = 0, cache: Path | None = None) -> torch.Tensor:
    """Parallel-tempering samples ``(S, T)`` of ``target``, cached in
    ``outputs/molecules/reference/<kind>/<name>.pt`` together with the settings used."""
    from mcsample.flows.training_von_mises import parallel_tempering

    cache = (cache or OUTPUTS / "reference") / kind
    path = cache / f"{row['name']}.pt"
    key = {**settings, "seed": seed, "smiles": row["smiles"], "temperature": target.temperature}
    if path.exists():
        blob = torch.load(path, weights_only=True)
        if blob.get("key") == key:
            return blob["samples"]
    samples, info = parallel_tempering(target, generator=torch.Generator().manual_seed(seed), **settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": key, "samples": samples, "info": {k: v for k, v in info.items()}}, tmp)
    os.replace(tmp, path)
    return samples


def histogram(theta: torch.Tensor, weights: torch.Tensor | None = None, bins: int = 32) -> np.ndarray:
    """Normalized 32-bin histograms ``(T, bins)`` of torsions ``(S, T)`` on [-pi, pi)."""
    th = torch.remainder(theta.detach().double() + math.pi, 2 * math.pi).cpu().numpy()
    w = None if weights is None else weights.detach().double().cpu().numpy()
    out = []
    for t in range(th.shape[1]):
        h, _ = np.histogram(th[:, t], bins=bins, range=(0, 2 * math.pi), weights=w)
        out.append(h / max(h.sum(), 1e-300))
    return np.array(out)


def histogram_kl(
    ref: torch.Tensor, theta: torch.Tensor, weights: torch.Tensor | None = None, bins: int = 32, eps: float = 1e-6
) -> np.ndarray:
    """KL(reference || model) per torsion of ``bins``-bin histograms, both floored at ``eps``
    and renormalized (VonMisesNet's metric)."""
    p = histogram(ref, bins=bins) + eps
    q = histogram(theta, weights, bins) + eps
    p /= p.sum(1, keepdims=True)
    q /= q.sum(1, keepdims=True)
    return (p * np.log(p / q)).sum(1)


def circular_emd(ref: torch.Tensor, theta: torch.Tensor, weights: torch.Tensor | None = None) -> np.ndarray:
    """Earth mover's distance on the circle per torsion, in radians (POT
    ``wasserstein_circle`` with p=1 on angles / 2pi)."""
    import ot

    a = (torch.remainder(ref.double(), 2 * math.pi) / (2 * math.pi)).cpu().numpy()
    b = (torch.remainder(theta.detach().double(), 2 * math.pi) / (2 * math.pi)).cpu().numpy()
    wa = np.full(a.shape[0], 1.0 / a.shape[0])
    wb = np.full(b.shape[0], 1.0 / b.shape[0]) if weights is None else weights.detach().double().cpu().numpy()
    wb = wb / wb.sum()
    out = []
    for t in range(a.shape[1]):
        out.append(float(ot.wasserstein_circle(a[:, t], b[:, t], wa, wb, p=1)[0]) * 2 * math.pi)
    return np.array(out)
