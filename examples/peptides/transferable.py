"""Train the transferable dipeptide flow, and evaluate it on sequences it never saw.

``train``: maximum likelihood of :class:`mcsample.flows.transferable.TransferableFlow` over the
equilibrium frames of the 48 training dipeptides made by ``transferable_data.py`` (by default
the packed set shipped as ``examples/peptides/data/transferable_dipeptides.npz``; ``--data``
also takes a folder written by that script): internal coordinates of every frame, equivalent
hydrogens relabelled to each peptide's structure, packed across sequences; every frame trains,
and the last 8 frames of each sequence monitor the fit (generalization is what ``evaluate``
measures, on reference MD of sequences never trained on); a progress bar and a resumable
checkpoint; the trained weights go to ``flows/checkpoints/transferable.pt`` with their
provenance (data manifest, settings, seed, NLL of the monitored frames, wall time).

``evaluate``: for each sequence (default: the 8 held-out dipeptides EW FF IQ LQ PE TL VT YW and
4 training ones as a control), with reference parallel-tempering MD of the same settings as the
training data (``transferable_data.py``'s sampler, another seed): zero-shot importance sampling
(normalized Kish ESS, energy W2 in kT, torus W2 of the backbone phi/psi), the same after SNIS
fine-tuning on that sequence (Prose's self-improvement, :func:`mcsample.flows.training.fit_snis`),
and after SMC from the flow (:func:`mcsample.sample_peptide` with ``method="smc"``); wall time
and energy evaluations of each. One table printed and written as
``outputs/peptides/transferable_eval/evaluation.json``, and Ramachandran plots (flow, SMC, MD)
side by side per sequence, ``outputs/peptides/transferable_eval/rama_<SEQ>.png``.

Usage::

    python examples/peptides/transferable.py train          # writes flows/checkpoints/transferable.pt (~35 min)
    python examples/peptides/transferable_data.py           # regenerate the data instead (~1 hour; its docstring)
    python examples/peptides/transferable.py evaluate       # held-out table, JSON and plots
    python examples/peptides/transferable.py evaluate --quick --sequences EW   # 2-3 minutes
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from transferable_data import TRAINING_SEQUENCES  # noqa: E402

HELD_OUT = ("EW", "FF", "IQ", "LQ", "PE", "TL", "VT", "YW")
CONTROLS = ("AL", "GR", "KW", "SP")
CHECKPOINT = ROOT / "flows" / "checkpoints" / "transferable.pt"
#: the packed training data set (``transferable_data.py --export``), shipped with the examples
DATA = HERE / "data" / "transferable_dipeptides.npz"
#: training recipe of the shipped checkpoint
RECIPE = {
    "architecture": {"layers": 8, "width": 48, "heads": 4, "depth": 1, "bins": 8, "cells": "free"},
    "steps": 2000,
    "batch_size": 256,
    "lr": 1e-3,
    "kl_steps": 0,
    "kl_lr": 1e-4,
    "seed": 0,
}


def make_peptide(seq: str):
    from mcsample.systems.peptides import Peptide

    return Peptide.from_sequence(seq, caps=False, solvent="obc1", temperature=310.0, cutoff=2.0)


def load_frames(data: Path, seq: str):
    """``(xyz float32 (F, n, 3) nm, walker (F,), potential energy (F,) kJ/mol)`` of one
    sequence: from a data folder (``<SEQ>.npz``) or from the packed data set (one ``.npz``)."""
    import transferable_data as td

    if data.is_file():
        return td.load_packed(data, seq)
    path = data / f"{seq}.npz"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run examples/peptides/transferable_data.py first")
    with np.load(path, allow_pickle=False) as f:
        walker = f["walker"] if "walker" in f.files else np.zeros(len(f["xyz"]), dtype=np.int64)
        return f["xyz"].astype(np.float32), walker, f["potential_energy"].astype(np.float64)


def reference_md(seq: str, folder: Path, quick: bool, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reference frames and energies of ``seq`` made by the training data's sampler with the
    training data's settings (read from ``data/manifest.json``) and another seed; cached in
    ``folder``."""
    import transferable_data as td

    settings = dict(td.read_manifest(data)["settings"])
    settings["seed"] = int(settings["seed"]) + 1000
    if quick:
        settings.update(num_walkers=4, num_temperatures=3, time_ps=0.4, equilibration_ps=0.2)
        folder = folder.with_name(folder.name + "_quick")
    folder.mkdir(parents=True, exist_ok=True)
    if td._existing(folder / f"{seq}.npz", settings) is None:
        td._run_one(seq, settings, str(folder), False)
    xyz, _, energies = load_frames(folder, seq)
    return xyz, energies


def train(args) -> None:
    from mcsample.flows.training import fit_maximum_likelihood, fit_reverse_kl, save_flow, validation_nll
    from mcsample.flows.transferable import (
        PackedFlow,
        PackedTarget,
        TransferableConfig,
        TransferableFlow,
        match_hydrogen_labels,
        pack,
    )
    from mcsample.systems.coordinates import InternalCoordinates, zmatrix_from_topology

    torch.manual_seed(RECIPE["seed"])
    architecture = {**RECIPE["architecture"], "width": args.width, "bins": args.bins}
    flow = TransferableFlow(TransferableConfig(**architecture))
    if args.init:
        from mcsample.flows.training import load_flow

        flow = load_flow(args.init)
    sequences = args.sequences or list(TRAINING_SEQUENCES)
    bad = sorted(set(sequences) - set(TRAINING_SEQUENCES))
    if bad:
        raise SystemExit(f"not training sequences: {bad} (the held-out ones stay unseen)")
    tokens, train_z, valid_z, peptides = [], [], [], []
    t0 = time.perf_counter()
    for seq in sequences:
        xyz, walker, _ = load_frames(Path(args.data), seq)
        pep = make_peptide(seq)
        peptides.append(pep)
        x = match_hydrogen_labels(pep, torch.as_tensor(xyz, dtype=torch.float64))
        z = InternalCoordinates(zmatrix_from_topology(pep.topology)).to_internal(x)[:, 6:]
        tokens.append(flow.tokenize(pep))
        train_z.append(z.float())
        valid_z.append(z[-8:].float())  # monitored (also trained on)
    rows_train, rows_valid = pack(tokens, train_z), pack(tokens, valid_z)
    print(
        f"{len(sequences)} sequences, {rows_train.shape[0]} training and {rows_valid.shape[0]} "
        f"monitored frames ({time.perf_counter() - t0:.0f} s to load)"
    )
    model = PackedFlow(flow, tokens)
    steps = 200 if args.quick else args.steps
    ckpt = Path(args.out).with_suffix(".training.pt")
    seconds = 0.0
    if steps > 0:
        history = fit_maximum_likelihood(
            model,
            rows_train,
            valid=rows_valid,
            steps=steps,
            batch_size=RECIPE["batch_size"],
            lr=args.lr,
            valid_every=max(steps // 10, 1),
            generator=torch.Generator().manual_seed(RECIPE["seed"]),
            progress=True,
            checkpoint=ckpt,
            checkpoint_every=100,
        )
        seconds += history.seconds
    if args.kl_steps > 0:
        # energy + data training over the training sequences (the likelihood term keeps what
        # reverse KL alone would drop); draws spread over 8 sequences per step
        history = fit_reverse_kl(
            model,
            PackedTarget(peptides, tokens),
            data=rows_train,
            steps=args.kl_steps,
            batch_size=RECIPE["batch_size"],
            lr=args.kl_lr,
            valid_every=args.kl_steps,
            valid_samples=256,
            generator=torch.Generator().manual_seed(RECIPE["seed"] + 1),
            progress=True,
            checkpoint=Path(args.out).with_suffix(".kl.pt"),
            checkpoint_every=50,
        )
        seconds += history.seconds
    flow.training_set = list(sequences)
    nll = validation_nll(model, rows_valid)
    from transferable_data import read_manifest

    previous = getattr(flow, "meta", {}) if args.init else {}
    meta = {
        "recipe": {**RECIPE, "architecture": architecture},
        "steps": steps,
        "lr": args.lr,
        "kl_steps": args.kl_steps,
        "kl_lr": args.kl_lr,
        "initialized_from": previous or None,
        "training_sequences": list(sequences),
        "data": {k: v for k, v in read_manifest(Path(args.data)).items() if k in ("settings", "packed")},
        "monitored_nll": nll,
        "wall_time_s": seconds,
        "made_by": "python examples/peptides/transferable.py train",
    }
    save_flow(flow, args.out, meta)
    print(f"NLL of the monitored (training) frames {nll:.2f} nats per configuration; wrote {args.out}")


def _metrics(pep, ws_x, log_w, md_xyz, md_energies) -> dict:
    """Normalized ESS, energy W2 (kT) and torus W2 of phi/psi against the MD reference."""
    import mcsample as mc
    from mcsample.systems import analysis as A

    kT = float(pep.kT)
    with torch.no_grad():
        energies = -(pep.log_prob(ws_x) * kT).numpy()
    lw = log_w.numpy()
    phi, psi = A.ramachandran_angles(ws_x.numpy(), pep.topology)
    mphi, mpsi = A.ramachandran_angles(md_xyz, pep.topology)
    return {
        "ess_fraction": float(mc.ess(log_w)) / len(lw),
        "khat": float(mc.diagnostics.psis(log_w)[1]) if bool(torch.isfinite(log_w).any()) else math.nan,
        "energy_w2_kT": float(A.energy_wasserstein(energies / kT, md_energies / kT, log_weights_p=lw, p=2)),
        "torus_w2": float(A.torus_wasserstein(np.stack([phi, psi], -1), np.stack([mphi, mpsi], -1), log_weights_p=lw)),
        "phi": phi,
        "psi": psi,
        "log_w": lw,
    }


def _md_nll(pep, proposal, md_xyz, frames: int = 2000) -> float:
    """Mean negative log-density (nats per configuration, Cartesian nm) of reference MD frames
    under the proposal, equivalent hydrogens relabelled to the peptide's copy."""
    from mcsample.flows.transferable import match_hydrogen_labels

    x = torch.as_tensor(md_xyz[:: max(1, len(md_xyz) // frames)], dtype=torch.float64)
    with torch.no_grad():
        return float(-proposal.log_prob(match_hydrogen_labels(pep, x)).mean())


def evaluate(args) -> None:
    import mcsample as mc
    from mcsample.flows.training import fit_snis, load_flow
    from mcsample.systems import analysis as A

    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    flow = load_flow(args.checkpoint)
    sequences = args.sequences or list(HELD_OUT + CONTROLS)
    n = 512 if args.quick else args.num_particles
    table = []
    for seq in sequences:
        pep = make_peptide(seq)
        md_xyz, md_energies = reference_md(seq, Path(args.reference), args.quick, Path(args.data))
        row = {"sequence": seq, "held_out": seq not in TRAINING_SEQUENCES, "md_frames": len(md_xyz)}
        g = torch.Generator().manual_seed(0)
        # zero-shot importance sampling
        t0 = time.perf_counter()
        prop = flow.proposal(pep, hessian=args.hessian)
        ws = mc.importance_sample(pep, prop, n, batch_size=1024, generator=g)
        zs = _metrics(pep, ws.samples, ws.log_weights, md_xyz, md_energies)
        row["zero_shot"] = {k: v for k, v in zs.items() if k not in ("phi", "psi", "log_w")}
        row["zero_shot"].update(seconds=time.perf_counter() - t0, energy_evaluations=n)
        row["zero_shot"]["md_nll"] = _md_nll(pep, prop, md_xyz)
        # the uncorrected flow: its draws without weights
        raw = _metrics(pep, ws.samples, torch.zeros_like(ws.log_weights), md_xyz, md_energies)
        row["flow"] = {k: raw[k] for k in ("energy_w2_kT", "torus_w2")}
        if args.zero_shot:
            table.append(row)
            print(_line(row), flush=True)
            _write(out, args, sequences, n, table)
            continue
        # SNIS fine-tuning on this sequence, then importance sampling again
        t0 = time.perf_counter()
        tuned = copy.deepcopy(prop)  # a trainable copy, its tokens reused (no second scan)
        rounds = 2 if args.quick else args.finetune_rounds
        fit_snis(
            tuned,
            pep.log_prob,
            rounds_per_beta=rounds,
            num_samples=min(n, 2048),
            buffer_size=min(n, 2048),
            steps_per_round=20,
            lr=1e-4,
            progress=False,
            generator=torch.Generator().manual_seed(1),
        )
        ws_ft = mc.importance_sample(pep, tuned, n, batch_size=1024, generator=torch.Generator().manual_seed(2))
        ft = _metrics(pep, ws_ft.samples, ws_ft.log_weights, md_xyz, md_energies)
        row["finetuned"] = {k: v for k, v in ft.items() if k not in ("phi", "psi", "log_w")}
        row["finetuned"].update(seconds=time.perf_counter() - t0, energy_evaluations=n + rounds * min(n, 2048))
        # SMC from the (zero-shot) flow
        t0 = time.perf_counter()
        m = 256 if args.quick else args.smc_particles
        ens = mc.sample_peptide(pep, m, method="smc", proposal=prop, generator=torch.Generator().manual_seed(3))
        sm = _metrics(pep, ens.samples.samples, ens.samples.log_weights, md_xyz, md_energies)
        row["smc"] = {k: v for k, v in sm.items() if k not in ("phi", "psi", "log_w")}
        row["smc"].update(seconds=time.perf_counter() - t0, energy_evaluations=int(ens.diagnostics.energy_evaluations))
        table.append(row)
        mphi, mpsi = A.ramachandran_angles(md_xyz, pep.topology)
        _plot(out / f"rama_{seq}.png", seq, zs, sm, (mphi, mpsi))
        print(_line(row), flush=True)
        _write(out, args, sequences, n, table)
    print(f"wrote {out}")


def _write(out: Path, args, sequences: list[str], n: int, table: list[dict]) -> None:
    """The table so far as JSON (written after every sequence, so that an interrupted run keeps
    what it measured)."""
    name = "evaluation" if args.sequences is None else "evaluation_" + "_".join(sequences)
    name += "_zero_shot.json" if args.zero_shot else ".json"
    settings = {
        "checkpoint": str(args.checkpoint),
        "particles": n,
        "smc_particles": args.smc_particles,
        "finetune_rounds": args.finetune_rounds,
        "hessian": args.hessian,
    }
    (out / name).write_text(json.dumps({**settings, "rows": table}, indent=1))


def _line(row: dict) -> str:
    z, raw = row["zero_shot"], row["flow"]
    tag = "held-out" if row["held_out"] else "training"
    line = (
        f"{row['sequence']:3s} {tag:8s} MD NLL {z['md_nll']:.1f} | ESS {z['ess_fraction']:.3%} (k-hat {z['khat']:.2f})"
    )
    if "smc" not in row:
        return line + f" | energy W2 {raw['energy_w2_kT']:.3g} / {z['energy_w2_kT']:.3g} kT (flow / IS)"
    f, s = row["finetuned"], row["smc"]
    return (
        line + f" -> {f['ess_fraction']:.3%} fine-tuned | energy W2 {raw['energy_w2_kT']:.3g} / "
        f"{z['energy_w2_kT']:.3g} / {f['energy_w2_kT']:.3g} / {s['energy_w2_kT']:.3g} kT | torus W2 "
        f"{raw['torus_w2']:.3f} / {z['torus_w2']:.3f} / {f['torus_w2']:.3f} / {s['torus_w2']:.3f} "
        f"(flow / flow IS / fine-tuned IS / SMC)"
    )


def _plot(path: Path, seq: str, flow_metrics: dict, smc_metrics: dict, md) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharex=True, sharey=True)
    panels = [
        ("flow (unweighted)", flow_metrics["phi"], flow_metrics["psi"], None),
        (
            "SMC (weighted)",
            smc_metrics["phi"],
            smc_metrics["psi"],
            np.exp(smc_metrics["log_w"] - smc_metrics["log_w"].max()),
        ),
        ("MD (reference)", md[0], md[1], None),
    ]
    for ax, (title, phi, psi, w) in zip(axes, panels):
        ax.hist2d(phi, psi, bins=60, range=[[-np.pi, np.pi], [-np.pi, np.pi]], weights=w, cmap="viridis")
        ax.set_title(f"{seq}: {title}")
        ax.set_xlabel("phi")
    axes[0].set_ylabel("psi")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    tr = sub.add_parser("train", help="maximum likelihood over the 48 training sequences")
    tr.add_argument(
        "--data",
        default=str(DATA),
        help="packed data set or data folder of transferable_data.py (default: %(default)s)",
    )
    tr.add_argument("--out", default=str(CHECKPOINT), help="checkpoint to write (default: %(default)s)")
    tr.add_argument("--steps", type=int, default=RECIPE["steps"], help="Adam steps (default: %(default)s)")
    tr.add_argument("--sequences", nargs="*", help="a subset of the training sequences (default: all 48)")
    tr.add_argument("--init", help="start from the weights of this checkpoint (default: a fresh flow)")
    tr.add_argument("--lr", type=float, default=RECIPE["lr"], help="peak learning rate (default: %(default)s)")
    tr.add_argument(
        "--width", type=int, default=RECIPE["architecture"]["width"], help="token width (default: %(default)s)"
    )
    tr.add_argument(
        "--bins", type=int, default=RECIPE["architecture"]["bins"], help="spline bins (default: %(default)s)"
    )
    tr.add_argument(
        "--kl-steps",
        type=int,
        default=RECIPE["kl_steps"],
        help="reverse-KL + likelihood steps after maximum likelihood (default: %(default)s)",
    )
    tr.add_argument("--kl-lr", type=float, default=RECIPE["kl_lr"], help="their learning rate (default: %(default)s)")
    tr.add_argument("--quick", action="store_true", help="200 steps (a smoke run)")
    ev = sub.add_parser("evaluate", help="held-out table, JSON and Ramachandran plots")
    ev.add_argument("--checkpoint", default=str(CHECKPOINT), help="trained flow (default: %(default)s)")
    ev.add_argument(
        "--data",
        default=str(DATA),
        help="training data (packed file or folder), whose settings the reference MD repeats (default: %(default)s)",
    )
    ev.add_argument(
        "--results", default="outputs/peptides/transferable_eval", help="output folder (default: %(default)s)"
    )
    ev.add_argument(
        "--reference",
        default="outputs/peptides/transferable_eval/reference_md",
        help="reference MD folder, made when missing (default: %(default)s)",
    )
    ev.add_argument("--sequences", nargs="*", help="sequences to evaluate (default: 8 held-out + 4 training)")
    ev.add_argument("--num-particles", type=int, default=8192, help="IS draws per sequence (default: %(default)s)")
    ev.add_argument("--finetune-rounds", type=int, default=8, help="SNIS rounds (default: %(default)s)")
    ev.add_argument("--smc-particles", type=int, default=512, help="SMC particles (default: %(default)s)")
    ev.add_argument("--quick", action="store_true", help="512 draws, 2 SNIS rounds, short reference MD")
    ev.add_argument("--zero-shot", action="store_true", help="zero-shot importance sampling only")
    ev.add_argument(
        "--hessian",
        choices=["reference", "local"],
        default="reference",
        help="covariance of the stiff coordinates' completion (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    (train if args.stage == "train" else evaluate)(args)


if __name__ == "__main__":
    main()
