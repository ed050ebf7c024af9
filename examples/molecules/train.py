"""Train the von Mises mixture torsion network and write the shipped checkpoint.

Reproduces ``flows/checkpoints/von_mises_default.pt`` (see the README there):

1. reference torsion samples at 300 K of every training molecule (425) of
   ``systems/data/molecules/molecules.csv`` by parallel tempering on its
   :class:`~mcsample.systems.molecules.TorsionTarget` (MMFF94; settings
   :data:`common.TRAIN_REFERENCE`: 6 replicas 300-1500 K x 16 chains, 500 burn-in
   iterations, 3000 samples thinned by 4, seed 0), cached in ``outputs/molecules/reference/train/``;
2. maximum likelihood (AdamW, cosine schedule, dropout, mirror-image augmentation) of
   :class:`~mcsample.flows.von_mises.VonMisesNet` on 90% of them, early-stopped on the other
   10% (split by scaffold; the held-out test molecules are never used);
3. optionally (``--snis-steps``) self-normalized importance-weighted fine-tuning on the
   training targets;
4. the checkpoint (float16 weights) written atomically to ``--out``.

Run time on a 2-core CPU: 45-60 min of one core for the references (425 molecules, 6-10 s
each; cached afterwards; ``--references-only`` computes just them), about 8 min for the 600
maximum-likelihood steps (the autoregressive model: about 25 min). Outputs: the checkpoint
and ``outputs/molecules/train_log_<name>.json``.

    python examples/molecules/train.py                     # default model
    python examples/molecules/train.py --autoregressive --out outputs/molecules/ar.pt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EVAL_REFERENCE, OUTPUTS, TRAIN_REFERENCE, load_molecules, make_target, reference  # noqa: E402

from mcsample.flows.training_von_mises import (  # noqa: E402
    TrainingSet,
    fine_tune_snis,
    fit_maximum_likelihood,
    negative_log_likelihood,
)
from mcsample.flows.von_mises import DEFAULT_CHECKPOINT, VonMisesConfig, VonMisesNet, featurize, save_checkpoint  # noqa: E402


def build_set(rows, settings, kind, progress=True):
    names, graphs, samples, targets = [], [], [], []
    t0 = time.time()
    for n, row in enumerate(rows):
        target = make_target(row)
        s = reference(row, target, settings, kind)
        names.append(row["name"])
        graphs.append(featurize(target))
        samples.append(s)
        targets.append(target)
        if progress:
            print(f"[{n + 1}/{len(rows)}] {row['name']} T={target.num_torsions} ({time.time() - t0:.0f} s)", flush=True)
    return TrainingSet(names, graphs, samples), targets


def main(argv=None):
    ap = argparse.ArgumentParser(description="train the von Mises torsion network")
    ap.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--uniform-weight", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=64, help="reference samples per molecule per step")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--components", type=int, default=4)
    ap.add_argument("--autoregressive", action="store_true")
    ap.add_argument("--snis-steps", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--references-only", action="store_true", help="only compute/cache the references")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N training molecules")
    ap.add_argument(
        "--valid-fraction", type=float, default=0.1, help="training scaffolds held back from the fit for early stopping"
    )
    ap.add_argument(
        "--heldout-nll",
        action="store_true",
        help="report the final NLL on the held-out test molecules (references of evaluate.py)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    rows = load_molecules("train")[: args.limit]
    cut = int(256 * args.valid_fraction)
    is_valid = [hashlib.md5(r["scaffold"].encode()).digest()[1] < cut for r in rows]
    full, targets = build_set(rows, TRAIN_REFERENCE, "train")
    pick = lambda flag: TrainingSet(
        *[[v for v, f in zip(col, is_valid) if f == flag] for col in (full.names, full.graphs, full.samples)]
    )
    train, valid = pick(False), pick(True)
    fit_targets = [t for t, f in zip(targets, is_valid) if not f]
    if args.references_only:
        return
    config = VonMisesConfig(
        hidden=args.hidden,
        num_layers=args.layers,
        components=args.components,
        autoregressive=args.autoregressive,
        dropout=args.dropout,
        uniform_weight=args.uniform_weight,
    )
    net = VonMisesNet(config)
    print(f"fit on {len(train)} molecules, early stopping on {len(valid)}", flush=True)
    t0 = time.time()
    log = fit_maximum_likelihood(
        net,
        train,
        steps=args.steps,
        lr=args.lr,
        batch=args.batch,
        generator=torch.Generator().manual_seed(args.seed),
        valid=valid,
        weight_decay=args.weight_decay,
        progress=True,
    )
    fit_time = time.time() - t0
    snis = []
    if args.snis_steps:
        snis = fine_tune_snis(
            net, fit_targets, steps=args.snis_steps, generator=torch.Generator().manual_seed(args.seed), progress=True
        )
    heldout = None
    if args.heldout_nll:
        test = build_set(load_molecules("heldout"), EVAL_REFERENCE, "heldout", progress=False)[0]
        with torch.no_grad():
            heldout = float(
                negative_log_likelihood(
                    net, test.graphs, [s.float() for s in test.samples], 10**9, torch.Generator().manual_seed(0)
                )
            )
        print(f"held-out test NLL per torsion: {heldout:.3f} nats", flush=True)
    meta = {
        "what": "VonMisesNet-style torsion mixture trained by maximum likelihood on parallel-tempering "
        "reference samples (MMFF94, 300 K) of the training molecules of molecules.csv",
        "script": "examples/molecules/train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "reference": TRAIN_REFERENCE,
        "steps": args.steps,
        "lr": args.lr,
        "batch": args.batch,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "snis_steps": args.snis_steps,
        "fit_molecules": len(train),
        "early_stopping_molecules": len(valid),
        "best_step": log[-1].get("best_step"),
        "best_valid_nll": log[-1].get("best_valid_nll"),
        "heldout_test_nll": heldout,
        "fit_seconds": round(fit_time),
    }
    save_checkpoint(net, args.out, meta)
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    with open(OUTPUTS / f"train_log_{args.out.stem}.json", "w") as f:
        json.dump({"meta": meta, "log": log, "snis": snis}, f, indent=1)
    print(
        f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB); best validation NLL "
        f"{meta['best_valid_nll']} nats/torsion at step {meta['best_step']}"
    )


if __name__ == "__main__":
    main()
