"""Equilibrium samples of the 48 training dipeptides of a transferable peptide flow.

Every sequence is a zwitterionic dipeptide (free NH3+/COO- termini) in amber14-all.xml with
implicit/obc1.xml, 310 K, no constraints, CutoffNonPeriodic 2 nm: the settings of the
Timewarp/Prose two-residue data sets, built by
``Peptide.from_sequence(seq, caps=False, solvent="obc1", temperature=310.0, cutoff=2.0)``.
Only the 48 training sequences below are ever simulated (held-out sequences stay unseen).

Sampler: batched parallel tempering on the project's torch energy
(:func:`mcsample.systems.langevin.run_langevin_pt`), all replicas of all temperatures in one
energy call per step: ``--walkers`` 32 independent replica-exchange chains over ``--temps`` 6
temperatures on a geometric ladder 310 K to ``--t-max`` 800 K (swap acceptance 0.23-0.51),
BAOAB Langevin with a 2 fs step, friction 1/ps and hydrogen masses of 4 Da (mass
repartitioning: the sampled configurations do not depend on the masses; checked against
OpenMM's 1 fs integrator in ``tests/test_langevin.py``), float32 positions, swap attempts every
0.02 ps. Every replica starts from the minimized structure with psi(1) = 145 deg and
phi(2) = -75 deg (the polyproline/beta basin) and its own Maxwell velocities;
``--equilibration-ps`` 6 ps are dropped, then frames of the 310 K configurations every 0.1 ps
for ``--time-ps`` 10 ps: 32 x 100 = 3,200 frames per sequence, 153,600 in all (64 MB), correlated
within a walker, independent across walkers. Side-chain rotamers, and methyl and ammonium
rotors, are far from equilibrated within one walker (many stay in one well for the 10 ps):
the walkers are what average over them, and 8 walkers gave rotamer populations that differed
by up to 0.3 from 32 walkers' (Lys chi1 of Lys-Met).

What the data are and are not: the phi<0 basins (beta, polyproline, alpha_R) and the glycine
basins (phi of Gly crosses freely: P(phi>0) 0.39-0.61 for CG, KG, MG, WG) are sampled; the
phi>0 basins (alpha_L) of the other residues are under-represented. Their entry and exit take
~10 ps even at 800-1000 K, longer than these runs, and a start in alpha_L does not relax
within them (Leu-Met, 12 ps runs: P(phi>0) 0.75 from a phi = +60 deg start, 0.002 from the
beta start).
Starting in the beta basin biases P(phi>0) low rather than high; importance sampling or SMC
with the trained flow corrects the weights, and ``--time-ps`` buys convergence.

Outputs (``--out``, default ``outputs/peptides/transferable/``; ``--quick``: ``.../quick/``):

* ``<SEQ>.npz`` -- :func:`mcsample.systems.md.save_npz` format (``MDResult.load`` reads it):
  ``xyz`` float32 ``(F, n, 3)`` nm, frame-major over the walkers (frame ``f`` of walker ``w`` is
  row ``f * W + w``), ``potential_energy`` kJ/mol, ``time_ps``, the topology, ``metadata``
  (JSON: settings, seed, package versions, host and load, wall time, peptide identity,
  summary), plus ``walker`` ``(F,)``, ``pt_temperatures``, ``pt_acceptance`` and
  ``pt_state_energies`` ``(frames, K, W)``;
* ``manifest.json`` -- every finished sequence's summary and the whole run's settings.

Rerunning the same command skips the sequences already written (resume after an interruption);
different settings for an existing file are refused rather than mixed. Each sequence's seed is
derived from ``--seed`` and the sequence, so the order of the runs does not matter.

Measured cost of the full set: 119 minutes of one x86_64 core (2 to 5 minutes per sequence),
about an hour with the default two processes on 2 cores; 8 walkers took 14 minutes.
``--quick`` (CG and AV, 4 walkers x 3 temperatures x 0.4 ps) takes about 10 s, most of it
loading the compiled energy.

The shipped data set. ``--export FILE --thin K`` packs a finished folder into one compressed
``.npz`` (:func:`export`; :func:`load_packed` reads one sequence): every K-th frame of each
walker, coordinates centred on each frame's centroid in float16 (resolution better than 0.0005
nm), energies in float32, and the folder's manifest (settings, per-sequence summaries, package
versions) with the packing. ``examples/peptides/data/transferable_dipeptides.npz`` (10 MB), the
training data of the shipped transferable checkpoint, is the default run (seed 0) packed with
``--thin 3``: 34 frames 0.3 ps apart from each of the 32 walkers, 1,088 per sequence, 52,224
in all. Adjacent 0.1 ps frames are strongly correlated (the autocorrelation of the side-chain
torsions' unit vectors is still 0.4-0.6 at 0.4 ps), so thinning loses little.

Usage::

    python examples/peptides/transferable_data.py             # all 48 sequences, 2 processes (~1 hour)
    python examples/peptides/transferable_data.py --export examples/peptides/data/transferable_dipeptides.npz --thin 3
    python examples/peptides/transferable_data.py --quick     # 2 sequences, tiny run (seconds)
    python examples/peptides/transferable_data.py --sequences AL GR --walkers 8 --out outputs/peptides/t8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
import zlib
from multiprocessing import get_context
from pathlib import Path

import numpy as np

#: the training sequences (two residues, one-letter codes)
TRAINING_SEQUENCES = (
    "AL AV AW CG CH CN CS EP EV FE FI FM GR HL ID IL KG KM KS KW LM MG MI ML MP MT MV MY PC PD "
    "PM PS QT RD RQ SH SI SP TK VH VM WD WG WI WV WY YC YN"
).split()
QUICK_SEQUENCES = ("CG", "AV")
DEFAULT_OUT = Path("outputs") / "peptides" / "transferable"
FORMAT = "transferable-data-1"
# atoms of a residue inside a chain (with hydrogens), to start the largest peptides first
_ATOMS = dict(
    G=7,
    A=10,
    S=11,
    C=11,
    D=12,
    P=14,
    N=14,
    T=14,
    E=15,
    V=16,
    Q=17,
    H=17,
    M=17,
    I=19,
    L=19,
    K=22,
    F=20,
    Y=21,
    R=24,
    W=24,
)


def _settings(a) -> dict:
    """What defines the data of one sequence (a file written with other settings is refused)."""
    return {
        "format": FORMAT,
        "force_field": "amber14-all.xml + implicit/obc1.xml",
        "termini": "zwitterionic (caps=False)",
        "cutoff_nm": 2.0,
        "temperature_K": 310.0,
        "sampler": "batched parallel tempering (mcsample.systems.langevin.run_langevin_pt)",
        "num_temperatures": a.temps,
        "t_max_K": a.t_max,
        "num_walkers": a.walkers,
        "timestep_fs": a.timestep_fs,
        "friction_per_ps": a.friction,
        "hydrogen_mass": a.hydrogen_mass,
        "exchange_interval_ps": a.exchange_ps,
        "report_interval_ps": a.report_ps,
        "equilibration_ps": a.equilibration_ps,
        "time_ps": a.time_ps,
        "dtype": "float32",
        "start_phi_psi_deg": [-75.0, 145.0],
        "seed": a.seed,
    }


def _sequence_seed(seed: int, seq: str) -> int:
    """The integer seed of one sequence: independent of the order the sequences run in."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(seq.encode())]).generate_state(1)[0])


def _versions() -> dict:
    import importlib.metadata as md

    from mcsample._version import __version__

    out = {"python": platform.python_version(), "mcsample": __version__}
    for name in ("torch", "numpy", "openmm", "mdtraj", "numba", "rdkit"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _existing(path: Path, settings: dict) -> dict | None:
    """The metadata of a finished file with these settings; ``None`` if there is no file."""
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["metadata"]))
    for key, value in settings.items():
        if meta.get("settings", {}).get(key) != value:
            raise SystemExit(
                f"{path} was written with {key}={meta.get('settings', {}).get(key)!r}, "
                f"not {value!r}: choose another --out (or remove the file)"
            )
    return meta if meta.get("complete") else None


def _rotate_torsion(x: np.ndarray, bonds: list, i: int, j: int, k: int, l: int, target: float) -> np.ndarray:
    """Set the dihedral i-j-k-l to ``target`` (radians) by rotating the atoms on l's side of
    the j-k bond about that bond; unchanged when j-k is in a ring (proline's phi)."""
    nbrs = {a: set() for a in range(len(x))}
    for a, b in bonds:
        if {a, b} != {j, k}:
            nbrs[a].add(b)
            nbrs[b].add(a)
    side, todo = {k}, [k]
    while todo:
        for b in nbrs[todo.pop()]:
            if b not in side:
                side.add(b)
                todo.append(b)
    if j in side:
        return x
    b1, b2, b3 = x[j] - x[i], x[k] - x[j], x[l] - x[k]
    n1, n2 = np.cross(b1, b2), np.cross(b2, b3)
    current = np.arctan2(np.dot(np.cross(n1, n2), b2 / np.linalg.norm(b2)), np.dot(n1, n2))
    axis = b2 / np.linalg.norm(b2)
    t = target - current
    idx = np.array(sorted(side))
    r = x[idx] - x[k]
    r = r * np.cos(t) + np.cross(axis, r) * np.sin(t) + axis * (r @ axis)[:, None] * (1 - np.cos(t))  # Rodrigues
    out = x.copy()
    out[idx] = r + x[k]
    return out


def _start_structure(pep, phi_deg: float, psi_deg: float) -> np.ndarray:
    """The minimized structure with psi of residue 1 and phi of residue 2 set to the given
    angles (the polyproline/beta region by default), minimized again with OpenMM."""
    import openmm

    top = pep.topology
    atom = {(a.residue.index, a.name): a.index for a in top.atoms}
    bonds = [(b[0].index, b[1].index) for b in top.bonds]
    x = pep.positions.numpy().astype(np.float64)
    x = _rotate_torsion(x, bonds, atom[0, "N"], atom[0, "CA"], atom[0, "C"], atom[1, "N"], np.deg2rad(psi_deg))
    x = _rotate_torsion(x, bonds, atom[0, "C"], atom[1, "N"], atom[1, "CA"], atom[1, "C"], np.deg2rad(phi_deg))
    ctx = openmm.Context(
        pep.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"), {"Threads": "1"}
    )
    ctx.setPositions(x)
    openmm.LocalEnergyMinimizer.minimize(ctx, 1.0, 0)
    return ctx.getState(getPositions=True).getPositions(asNumpy=True)._value


def _run_packed(args: tuple) -> tuple[str, dict]:
    """``(seq, _run_one(*args))`` for a worker process."""
    return args[0], _run_one(*args)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds the pool's ``with``, which terminates the workers


def _run_one(seq: str, settings: dict, out: str, progress: bool) -> dict:
    """Simulate one sequence and write ``<seq>.npz`` atomically; returns its summary."""
    import torch

    torch.set_num_threads(1)
    from mcsample.systems import analysis as A
    from mcsample.systems.langevin import geometric_temperatures, run_langevin_pt
    from mcsample.systems.md import save_npz
    from mcsample.systems.peptides import Peptide

    t0 = time.perf_counter()
    pep = Peptide.from_sequence(seq, caps=False, solvent="obc1", temperature=310.0, cutoff=2.0)
    angles = settings.get("start_phi_psi_deg")  # absent in settings from before it existed
    start = _start_structure(pep, *angles) if angles else pep.positions
    t_build = time.perf_counter() - t0
    temps = geometric_temperatures(310.0, settings["t_max_K"], settings["num_temperatures"])
    seed = _sequence_seed(settings["seed"], seq)
    res = run_langevin_pt(
        pep,
        temps,
        settings["num_walkers"],
        settings["time_ps"],
        exchange_interval_ps=settings["exchange_interval_ps"],
        timestep_fs=settings["timestep_fs"],
        friction_per_ps=settings["friction_per_ps"],
        report_interval_ps=settings["report_interval_ps"],
        generator=torch.Generator().manual_seed(seed),
        progress=progress,
        equilibration_ps=settings["equilibration_ps"],
        dtype=torch.float32,
        hydrogen_mass=settings["hydrogen_mass"],
        positions=start,
    )
    F, W = res.num_frames, res.num_replicas
    traj = res.trajectory()  # frame-major: row f * W + w
    energies = res.energies.reshape(-1).numpy()
    u_mean, u_se = res.mean_energy()
    phi, psi = A.ramachandran_angles(traj)
    pos = (phi > 0).reshape(F, W).mean(0)  # per walker
    summary = {
        "sequence": seq,
        "n_atoms": pep.n_atoms,
        "n_frames": int(F * W),
        "energy_mean_kJ_per_mol": u_mean,
        "energy_mean_stderr_kJ_per_mol": u_se,
        "p_phi_positive": float(pos.mean()),
        "p_phi_positive_stderr": float(pos.std(ddof=1) / np.sqrt(W)) if W > 1 else None,
        "walkers_visiting_phi_positive": int(np.sum(pos > 0)),
        "swap_acceptance": [round(float(a), 3) for a in res.acceptance],
        "temperatures_K": [round(t, 2) for t in temps],
        "replica_steps_per_s": res.metadata["replica_steps_per_s"],
        "wall_time_s": time.perf_counter() - t0,
        "build_time_s": t_build,
    }
    meta = {
        "settings": settings,
        "seed_of_this_sequence": seed,
        "identity": pep.identity(),
        "versions": _versions(),
        "host": {
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "command": " ".join(sys.argv),
        "layout": "xyz row f * num_walkers + w is frame f of walker w (310 K)",
        "summary": summary,
        "run": {k: v for k, v in res.metadata.items() if k not in ("acceptance",)},
        "complete": True,
    }
    extra = {
        "walker": np.tile(np.arange(W), F).astype(np.int64),
        "pt_temperatures": np.asarray(temps, dtype=np.float64),
        "pt_acceptance": np.asarray(res.acceptance, dtype=np.float64),
        "pt_state_energies": res.state_energies.numpy(),
    }
    save_npz(Path(out) / f"{seq}.npz", traj, energies, meta, extra)
    return summary


def _write_manifest(out: Path, settings: dict, summaries: dict, wall: float) -> None:
    manifest = {
        "settings": settings,
        "sequences": [summaries[s] for s in sorted(summaries)],
        "num_sequences": len(summaries),
        "total_frames": int(sum(s["n_frames"] for s in summaries.values())),
        "wall_time_this_call_s": wall,
        "versions": _versions(),
    }
    tmp = out / f".manifest.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, out / "manifest.json")


def export(folder: Path, path: Path, thin: int = 2, sequences=None) -> dict:
    """Pack a finished data folder into one compressed ``.npz`` small enough to ship.

    Every ``thin``-th recorded frame of every walker (frame-major layout kept), each frame's
    coordinates centred on their centroid and stored as float16 (resolution better than 0.0005 nm
    within 1 nm of the centroid; internal coordinates do not depend on the translation), the
    potential energies as float32 kJ/mol. Arrays ``<SEQ>_xyz``, ``<SEQ>_walker``,
    ``<SEQ>_potential_energy``; ``manifest``: the folder's manifest (settings, summaries,
    versions) plus the packing (``thin``, dtype). :func:`load_packed` reads it back.
    """
    if thin < 1:
        raise ValueError(f"thin must be a positive integer, got {thin}")
    manifest = json.loads((folder / "manifest.json").read_text())
    sequences = list(sequences or TRAINING_SEQUENCES)
    arrays = {}
    for seq in sequences:
        with np.load(folder / f"{seq}.npz", allow_pickle=False) as f:
            meta = json.loads(str(f["metadata"]))
            if meta.get("settings") != manifest["settings"]:
                raise SystemExit(f"{folder / seq}.npz was written with other settings than the manifest's")
            xyz, walker, energy = f["xyz"], f["walker"], f["potential_energy"]
        W = int(walker.max()) + 1
        keep = (np.arange(len(xyz)) // W) % thin == 0  # every thin-th frame of each walker
        x = xyz[keep].astype(np.float64)
        x -= x.mean(axis=1, keepdims=True)
        arrays[f"{seq}_xyz"] = x.astype(np.float16)
        arrays[f"{seq}_walker"] = walker[keep].astype(np.int16)
        arrays[f"{seq}_potential_energy"] = energy[keep].astype(np.float32)
    manifest["packed"] = {
        "thin": thin,
        "frame_interval_ps": thin * manifest["settings"]["report_interval_ps"],
        "xyz": "float16 nm, centred on each frame's centroid",
        "sequences": sequences,
        "frames": int(sum(len(arrays[f"{s}_xyz"]) for s in sequences)),
        "made_by": f"python examples/peptides/transferable_data.py --out {folder} --export {path.name} --thin {thin}",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, manifest=np.array(json.dumps(manifest, sort_keys=True)), **arrays)
    return manifest


def load_packed(path: Path, seq: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(xyz float32 (F, n, 3) nm, walker (F,), potential energy (F,) kJ/mol)`` of one sequence
    in a file written by :func:`export`."""
    with np.load(path, allow_pickle=False) as f:
        if f"{seq}_xyz" not in f.files:
            raise SystemExit(f"{path} holds no frames of {seq}")
        return (
            f[f"{seq}_xyz"].astype(np.float32),
            f[f"{seq}_walker"].astype(np.int64),
            f[f"{seq}_potential_energy"].astype(np.float64),
        )


def read_manifest(data: Path) -> dict:
    """The manifest of a data folder or of a packed file (:func:`export`)."""
    if data.is_file():
        with np.load(data, allow_pickle=False) as f:
            return json.loads(str(f["manifest"]))
    path = data / "manifest.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run examples/peptides/transferable_data.py first")
    return json.loads(path.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sequences", nargs="+", default=None, help="a subset of the 48 training sequences (default: all)")
    p.add_argument("--quick", action="store_true", help="2 sequences, a tiny run (seconds)")
    p.add_argument("--walkers", type=int, default=32, help="independent PT chains per sequence")
    p.add_argument("--temps", type=int, default=6, help="temperatures on the ladder")
    p.add_argument("--t-max", type=float, default=800.0, help="top temperature (K)")
    p.add_argument("--time-ps", type=float, default=10.0, help="recorded time per walker (ps)")
    p.add_argument("--equilibration-ps", type=float, default=6.0)
    p.add_argument("--timestep-fs", type=float, default=2.0)
    p.add_argument("--hydrogen-mass", type=float, default=4.0, help="Da; 0 keeps the System's masses")
    p.add_argument("--friction", type=float, default=1.0, help="1/ps")
    p.add_argument("--exchange-ps", type=float, default=0.02)
    p.add_argument("--report-ps", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="sequences simulated in parallel processes")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--export",
        type=Path,
        default=None,
        help="pack the finished --out folder into this compressed .npz (float16, every --thin-th frame) and stop",
    )
    p.add_argument("--thin", type=int, default=2, help="keep every thin-th frame of each walker in --export")
    a = p.parse_args(argv)
    if a.quick:
        a.walkers, a.temps, a.time_ps, a.equilibration_ps = 4, 3, 0.4, 0.2
        a.jobs = 1
        if a.out == DEFAULT_OUT:
            a.out = DEFAULT_OUT / "quick"
    seqs = [s.upper() for s in (a.sequences or (QUICK_SEQUENCES if a.quick else TRAINING_SEQUENCES))]
    foreign = [s for s in seqs if s not in TRAINING_SEQUENCES]
    if foreign:
        raise SystemExit(
            f"{foreign} are not training sequences; this data set holds only {' '.join(TRAINING_SEQUENCES)}"
        )
    if a.export is not None:
        m = export(a.out, a.export, a.thin, seqs)
        size = a.export.stat().st_size / 2**20
        print(
            f"wrote {a.export}: {m['packed']['frames']} frames of "
            f"{len(m['packed']['sequences'])} sequences, {size:.1f} MB"
        )
        return 0
    a.hydrogen_mass = a.hydrogen_mass or None
    settings = _settings(a)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)

    summaries, todo = {}, []
    for s in seqs:
        meta = _existing(out / f"{s}.npz", settings)
        if meta is None:
            todo.append(s)
        else:
            summaries[s] = meta["summary"]
    todo.sort(key=lambda s: -sum(_ATOMS[c] for c in s))  # largest first: shorter tail
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    print(f"{len(summaries)} of {len(seqs)} sequences already in {out}; simulating {len(todo)}", flush=True)
    bar = tqdm(total=len(seqs), initial=len(summaries), disable=a.no_progress, unit="sequence", desc="dipeptides")
    with bar:
        if a.jobs <= 1:
            for s in todo:
                summaries[s] = _run_one(s, settings, str(out), not a.no_progress and len(todo) == 1)
                _write_manifest(out, settings, summaries, time.perf_counter() - t0)
                bar.update(1)
        else:
            # a killed or interrupted run stops its workers too (Pool.__exit__ terminates them)
            previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
            try:
                with get_context("spawn").Pool(a.jobs) as pool:
                    jobs = [(s, settings, str(out), False) for s in todo]
                    for seq, summary in pool.imap_unordered(_run_packed, jobs):
                        summaries[seq] = summary
                        _write_manifest(out, settings, summaries, time.perf_counter() - t0)
                        bar.set_postfix(last=seq)
                        bar.update(1)
            finally:
                signal.signal(signal.SIGTERM, previous)
    _write_manifest(out, settings, summaries, time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    print(
        f"\nwrote {len(summaries)} sequences to {out}/ in {wall:.0f} s "
        f"({sum(s['n_frames'] for s in summaries.values())} frames)"
    )
    for s in sorted(summaries):
        r = summaries[s]
        print(
            f"  {s} {r['n_atoms']:3d} atoms  {r['n_frames']} frames  <U> = "
            f"{r['energy_mean_kJ_per_mol']:9.2f} ± {r['energy_mean_stderr_kJ_per_mol']:.2f}  "
            f"P(φ>0) = {r['p_phi_positive']:.3f}  swaps {r['swap_acceptance']}  "
            f"{r['wall_time_s']:.0f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
