"""A Boltzmann generator for alanine dipeptide: MD data, training, and IS / SMC corrections.

The whole pipeline of :mod:`mcsample.flows.boltzmann_generator` on the field's benchmark,
openmmtools' alanine dipeptide (ACE-ALA-NME, AMBER ff96, unconstrained, 300 K) with OBC1
implicit solvent or in vacuum:

1. **Data** (``outputs/peptides/flow_data/``): OpenMM Langevin MD (LangevinMiddle, 1 fs,
   friction 1/ps, 10 ps equilibration, a frame every 0.1 ps) of 1 ns at 300 K and 1 ns at
   600 K, where the φ>0 basins (αL, C7ax) are visited often; the two runs go in parallel
   processes and resume when interrupted (:func:`mcsample.systems.md.run_md`).
2. **Training** (:mod:`mcsample.flows.training`), three checkpointed, resumable stages:
   maximum likelihood on the pooled frames of both temperatures (a broad flow that covers
   φ>0); reverse KL on the energy plus the likelihood of the same frames (Noé et al. 2019:
   the energy sharpens bonds and angles that 10⁴ frames cannot resolve, the data keep the rare
   basins); self-normalized importance-sampling refits at 300 K (mass-covering), then a
   second, gentler round of them. ``--pretrained`` skips data and
   training and loads the shipped flow (:func:`mcsample.flows.pretrained`).
3. **Estimates** (:func:`mcsample.sample_peptide`): importance sampling of ``--num-samples``
   draws and annealed SMC with ``--smc-particles`` particles: ESS and k̂, log Z ± stderr,
   ΔF(φ>0 − φ<0) ± stderr in kT, the populations of C5 / C7eq / αR / C7ax / αL, against the
   300 K MD frames (and a parallel-tempering reference where
   ``outputs/peptides/alanine_dipeptide_<solvent>_pt.npz`` exists, from
   ``examples/peptides/reference_md.py --sampler pt``).

Outputs (``--out``, default ``outputs/peptides/boltzmann_generator/<solvent>/``):
``flow.pt`` (the trained flow with its provenance), ``training/`` (stage checkpoints),
``ramachandran.png`` (flow, IS-reweighted, SMC and MD side by side, F in kT),
``energies.png`` (potential-energy histograms), ``results.json`` (every number above, and with
``--repeats k`` the spread of k independent IS and SMC runs against their reported stderr).

Run time, measured on 2 shared CPU cores with the two solvents in parallel (one thread each):
MD 5 min (OBC1) / 2 min (vacuum); training 24 min (maximum likelihood 3.4 min, reverse KL
9 min, SNIS 2 × 6 min); estimates 2.5 min. With ``--pretrained`` about 3 minutes (only the
estimates). ``--quick`` (20 ps MD, short training, 2,000 samples) checks the wiring in about
1 minute and gives a poor flow.

    python examples/peptides/alanine_dipeptide.py --pretrained              # OBC1, shipped flow
    python examples/peptides/alanine_dipeptide.py --solvent vacuum          # train from scratch
    python examples/peptides/alanine_dipeptide.py --quick
    python examples/peptides/alanine_dipeptide.py --pretrained --repeats 10 --num-samples 20000 --smc-particles 2000
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

DATA = Path("outputs") / "peptides" / "flow_data"

#: training recipe (the shipped flows were made with these settings, seed 0)
RECIPE = {
    "architecture": {"layers": 8, "hidden": 128, "depth": 2, "bins": 8, "bound": 5.0},
    "maximum_likelihood": {"steps": 1500, "batch_size": 256, "lr": 1e-3},
    "reverse_kl": {"steps": 1500, "batch_size": 256, "lr": 3e-4, "data_weight": 1.0},
    "snis": {
        "rounds_per_beta": 24,
        "num_samples": 16384,
        "buffer_size": 16384,
        "steps_per_round": 50,
        "batch_size": 256,
        "lr": 1e-4,
        "regularization": 0.5,
        "truncate": 0.002,
    },
    "snis_polish": {
        "rounds_per_beta": 24,
        "num_samples": 16384,
        "buffer_size": 16384,
        "steps_per_round": 50,
        "batch_size": 256,
        "lr": 5e-5,
        "regularization": 0.5,
        "truncate": 0.002,
    },
}
QUICK = {
    "architecture": {"layers": 4, "hidden": 64, "depth": 2, "bins": 8, "bound": 5.0},
    "maximum_likelihood": {"steps": 200, "batch_size": 128, "lr": 1e-3},
    "reverse_kl": {"steps": 100, "batch_size": 128, "lr": 3e-4, "data_weight": 1.0},
    "snis": {
        "rounds_per_beta": 3,
        "num_samples": 2048,
        "buffer_size": 2048,
        "steps_per_round": 10,
        "batch_size": 128,
        "lr": 1e-4,
        "regularization": 0.5,
        "truncate": 0.002,
    },
    "snis_polish": {
        "rounds_per_beta": 2,
        "num_samples": 2048,
        "buffer_size": 2048,
        "steps_per_round": 10,
        "batch_size": 128,
        "lr": 5e-5,
        "regularization": 0.5,
        "truncate": 0.002,
    },
}


def md_path(solvent: str, temperature: float, quick: bool) -> Path:
    tag = "_quick" if quick else ""
    return DATA / f"alanine_dipeptide_{solvent}_{int(temperature)}K_md{tag}.npz"


def _md_job(solvent: str, temperature: float, seed: int, quick: bool, progress: bool) -> str:
    from mcsample.systems.md import run_md
    from mcsample.systems.peptides import alanine_dipeptide

    path = md_path(solvent, temperature, quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    run_md(
        alanine_dipeptide(solvent),
        20.0 if quick else 1000.0,
        temperature=temperature,
        report_interval_ps=0.1,
        equilibration_ps=10.0,
        generator=torch.Generator().manual_seed(seed),
        path=path,
        progress=progress,
        threads=1,
    )
    return str(path)


def make_data(solvent: str, quick: bool, progress: bool) -> dict:
    """MD at 300 K (seed 0) and 600 K (seed 1), in two processes; resumes existing files."""
    jobs = [(solvent, 300.0, 0, quick, progress), (solvent, 600.0, 1, quick, False)]
    with ProcessPoolExecutor(2) as pool:
        paths = list(pool.map(_md_job, *zip(*jobs)))
    return {"300K": paths[0], "600K": paths[1]}


def train(peptide, data: dict, recipe: dict, out: Path, seed: int, progress: bool):
    """Maximum likelihood on both temperatures' frames, reverse KL + their likelihood, then SNIS
    refits at 300 K; each stage checkpointed and resumable."""
    from mcsample.flows import training
    from mcsample.flows.boltzmann_generator import BoltzmannGenerator
    from mcsample.systems.md import MDResult

    x300 = peptide.from_mdtraj(MDResult.load(data["300K"]).trajectory)
    x600 = peptide.from_mdtraj(MDResult.load(data["600K"]).trajectory)
    frames = torch.cat([x300, x600])
    torch.manual_seed(seed)
    flow = BoltzmannGenerator.from_data(peptide, frames, seed=seed, **recipe["architecture"])
    ckpt = out / "training"
    ckpt.mkdir(parents=True, exist_ok=True)
    ml = training.fit_maximum_likelihood(
        flow,
        frames,
        generator=torch.Generator().manual_seed(seed),
        progress=progress,
        checkpoint=ckpt / "maximum_likelihood.pt",
        **recipe["maximum_likelihood"],
    )
    rkl = training.fit_reverse_kl(
        flow,
        peptide.regularized_log_prob,
        eval_log_prob=peptide.log_prob,
        data=frames,
        generator=torch.Generator().manual_seed(seed + 1),
        progress=progress,
        checkpoint=ckpt / "reverse_kl.pt",
        valid_every=500,
        **recipe["reverse_kl"],
    )
    snis = training.fit_snis(
        flow,
        peptide.log_prob,
        betas=[1.0],
        generator=torch.Generator().manual_seed(seed + 2),
        progress=progress,
        checkpoint=ckpt / "snis.pt",
        **recipe["snis"],
    )
    polish = training.fit_snis(
        flow,
        peptide.log_prob,
        betas=[1.0],
        generator=torch.Generator().manual_seed(seed + 3),
        progress=progress,
        checkpoint=ckpt / "snis_polish.pt",
        **recipe["snis_polish"],
    )
    times = {
        "maximum_likelihood": ml.seconds,
        "reverse_kl": rkl.seconds,
        "snis": snis.seconds,
        "snis_polish": polish.seconds,
    }
    meta = {
        "what": f"BoltzmannGenerator for {peptide.name} (AMBER ff96, {peptide.temperature} K)",
        "made_by": "examples/peptides/alanine_dipeptide.py",
        "recipe": recipe,
        "seed": seed,
        "data": {k: {"file": os.path.basename(v), "frames": int(MDResult.load(v).n_frames)} for k, v in data.items()},
        "training_seconds": sum(times.values()),
        "stage_seconds": times,
        "reverse_kl_ess_history": rkl.valid_metric,
        "snis_ess_history": snis.valid_metric + polish.valid_metric,
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
    }
    training.save_flow(flow, out / "flow.pt", meta)
    return flow, meta


def _ramachandran_panels(panels: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mcsample.systems import analysis

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, (title, (phi, psi, w)) in zip(axes[0], panels.items()):
        F, edges = analysis.ramachandran_free_energy(phi, psi, weights=w, bins=60)
        mesh = ax.pcolormesh(edges, edges, np.ma.masked_invalid(F).T, cmap="viridis", vmin=0, vmax=12)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("φ (rad)")
        ax.set_ylabel("ψ (rad)")
        ax.set_aspect("equal")
    fig.colorbar(mesh, ax=axes[0].tolist(), label="F (kT)", shrink=0.85)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def evaluate(peptide, flow, data: dict | None, args, out: Path) -> dict:
    import mcsample as mc
    from mcsample.peptide_sampling import BASINS, basin_index, summary_table
    from mcsample.systems import analysis
    from mcsample.systems.md import MDResult

    g = torch.Generator().manual_seed(args.seed)
    ens_is = mc.sample_peptide(peptide, args.num_samples, "is", proposal=flow, generator=g, progress=args.progress)
    ens_smc = mc.sample_peptide(peptide, args.smc_particles, "smc", proposal=flow, generator=g, progress=args.progress)
    print(summary_table({"IS": ens_is, "SMC": ens_smc}))
    results = {
        "peptide": peptide.identity(),
        "flow_meta": getattr(flow, "meta", {}),
        "is": ens_is.summary(),
        "smc": ens_smc.summary(),
        "references": {},
    }
    phi_q, psi_q = ens_is.ramachandran()
    panels = {
        "flow (unweighted)": (phi_q.numpy(), psi_q.numpy(), None),
        f"IS (ESS {ens_is.diagnostics.ess_fraction:.1%})": (phi_q.numpy(), psi_q.numpy(), ens_is.weights.numpy()),
    }
    phi_s, psi_s = ens_smc.ramachandran()
    panels["SMC"] = (phi_s.numpy(), psi_s.numpy(), ens_smc.weights.numpy())
    energy_sets = {
        "flow": (ens_is.energies.numpy(), None),
        "IS": (ens_is.energies.numpy(), ens_is.weights.numpy()),
        "SMC": (ens_smc.energies.numpy(), ens_smc.weights.numpy()),
    }
    refs = {}
    if data is not None:
        md = MDResult.load(data["300K"])
        refs[f"MD 300 K ({md.n_frames * 0.1 / 1000:g} ns)"] = data["300K"]
    pt = Path("outputs") / "peptides" / f"alanine_dipeptide_{args.solvent}_pt.npz"
    if pt.exists():
        refs["PT 300 K"] = str(pt)
    for name, path in refs.items():
        md = MDResult.load(path)
        phi, psi = analysis.ramachandran_angles(md.trajectory)
        g_ind = analysis.statistical_inefficiency((np.asarray(phi) > 0).astype(float))
        dF = analysis.free_energy_difference(phi, statistical_inefficiency=g_ind)
        idx = basin_index(torch.as_tensor(np.asarray(phi)), torch.as_tensor(np.asarray(psi))).numpy()
        results["references"][name] = {
            "path": os.path.basename(path),
            "frames": int(md.n_frames),
            "mean_energy_kj_mol": float(np.mean(md.energies)),
            "free_energy_difference_kT": {"value": dF.value, "stderr": dF.stderr, "p_positive": dF.p_positive},
            "basin_populations": {b: float(np.mean(idx == k)) for k, b in enumerate(BASINS)},
            "energy_w1_kT": {
                "IS": analysis.energy_wasserstein(
                    ens_is.energies.numpy(), md.energies, weights_p=ens_is.weights.numpy()
                )
                / peptide.kT,
                "SMC": analysis.energy_wasserstein(
                    ens_smc.energies.numpy(), md.energies, weights_p=ens_smc.weights.numpy()
                )
                / peptide.kT,
            },
        }
        panels[name] = (np.asarray(phi), np.asarray(psi), None)
        energy_sets[name] = (md.energies, None)
        r = results["references"][name]
        print(
            f"{name}: <U> {r['mean_energy_kj_mol']:.2f} kJ/mol, ΔF {dF.value:.2f} ± {dF.stderr:.2f} kT "
            f"(P(φ>0) = {dF.p_positive:.4f}, {len(md.energies)} frames)"
        )
    _ramachandran_panels(panels, out / "ramachandran.png")
    analysis.plot_energy_histograms(
        energy_sets, out / "energies.png", title=f"alanine dipeptide ({args.solvent}), 300 K"
    )
    return results


def calibration(peptide, flow, args) -> dict:
    """``--repeats`` independent runs of IS and SMC: does the run-to-run spread of log Z and ΔF
    match the stderr each run reports? (ratio sd / mean stderr; 1 is honest)."""
    import mcsample as mc

    out = {}
    for method, n in (("is", args.num_samples), ("smc", args.smc_particles)):
        rows = []
        for seed in range(1000, 1000 + args.repeats):
            e = mc.sample_peptide(peptide, n, method, proposal=flow, generator=torch.Generator().manual_seed(seed))
            dF = e.free_energy_difference()
            rows.append(
                (
                    e.diagnostics.log_evidence,
                    e.diagnostics.log_evidence_stderr,
                    dF["value"],
                    dF["stderr"],
                    e.diagnostics.ess_fraction,
                )
            )
        a = np.array(rows, dtype=float)
        out[method] = {
            "num": n,
            "repeats": args.repeats,
            "log_evidence_mean": float(a[:, 0].mean()),
            "log_evidence_sd": float(a[:, 0].std(ddof=1)),
            "log_evidence_stderr_mean": float(a[:, 1].mean()),
            "delta_f_mean": float(a[:, 2].mean()),
            "delta_f_sd": float(a[:, 2].std(ddof=1)),
            "delta_f_stderr_mean": float(a[:, 3].mean()),
            "ess_fraction_mean": float(a[:, 4].mean()),
            "runs": a.tolist(),
        }
        r = out[method]
        print(
            f"{method.upper()} x{args.repeats} ({n}): log Z {r['log_evidence_mean']:.3f}, "
            f"sd {r['log_evidence_sd']:.3f} "
            f"vs stderr {r['log_evidence_stderr_mean']:.3f}; ΔF {r['delta_f_mean']:.2f} kT, sd {r['delta_f_sd']:.2f} "
            f"vs stderr {r['delta_f_stderr_mean']:.2f}; ESS {r['ess_fraction_mean']:.1%}"
        )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--solvent", choices=["obc1", "vacuum"], default="obc1")
    ap.add_argument("--pretrained", action="store_true", help="load the shipped flow instead of training")
    ap.add_argument("--quick", action="store_true", help="20 ps of MD, a short training, 2000 samples")
    ap.add_argument("--num-samples", type=int, default=None, help="IS draws (default 100000; quick 2000)")
    ap.add_argument("--smc-particles", type=int, default=None, help="SMC particles (default 10000; quick 500)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=0,
        help="also repeat IS and SMC with this many seeds and compare their spread with "
        "the reported stderr (about 40 s per repeat)",
    )
    ap.add_argument("--progress", action="store_true", default=True)
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    args.num_samples = args.num_samples or (2000 if args.quick else 100_000)
    args.smc_particles = args.smc_particles or (500 if args.quick else 10_000)
    out = Path(
        args.out
        or Path("outputs") / "peptides" / "boltzmann_generator" / (args.solvent + ("_quick" if args.quick else ""))
    )
    out.mkdir(parents=True, exist_ok=True)

    from mcsample.flows import pretrained
    from mcsample.peptide_sampling import finite_json
    from mcsample.systems.peptides import alanine_dipeptide

    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    peptide = alanine_dipeptide(args.solvent)
    data = None
    if args.pretrained:
        flow = pretrained("alanine_dipeptide", solvent=args.solvent)
        if md_path(args.solvent, 300.0, False).exists():
            data = {"300K": str(md_path(args.solvent, 300.0, False))}
    else:
        data = make_data(args.solvent, args.quick, args.progress)
        flow, _ = train(peptide, data, QUICK if args.quick else RECIPE, out, args.seed, args.progress)
    results = evaluate(peptide, flow, data, args, out)
    if args.repeats > 1:
        results["calibration"] = calibration(peptide, flow, args)
    results["seconds"] = time.perf_counter() - t0
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(finite_json(results), indent=1, default=float))
    os.replace(tmp, out / "results.json")
    print(
        f"wrote {out / 'results.json'}, {out / 'ramachandran.png'}, {out / 'energies.png'} ({results['seconds']:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
