"""Batched BAOAB Langevin dynamics and parallel tempering against exact answers and OpenMM.

Deterministic checks: frictionless BAOAB is velocity Verlet, step for step equal to OpenMM's
``LangevinMiddleIntegrator`` with zero friction (Reference platform, double precision), which
pins down units, masses and the splitting; total energy is conserved to second order.

Statistical checks (fixed seeds; bounds of 5 standard errors or more, false-failure rate below
1e-6 if the errors are right): BAOAB samples the exact configurational variance of harmonic
oscillators at a large timestep (Leimkuhler & Matthews 2013); parallel tempering keeps every
temperature's exact distribution. The slow checks compare alanine dipeptide's <U> and basin
populations with OpenMM's integrator on the same system: OpenMM's error bar by block averaging
of one long trajectory, ours from the spread of independent replicas, each started from the
minimized structure with its own Maxwell velocities and decorrelated by an unrecorded
equilibration longer than the time scale of the observable.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mcsample.systems.langevin import (
    BlowUpError,
    block_stderr,
    geometric_temperatures,
    masses_of,
    maxwell_velocities,
    run_langevin,
    run_langevin_pt,
)

KB = 0.00831446261815324


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Harmonic:
    """Independent 3-d oscillators U = sum_i k_i |x_i|^2 / 2 with masses m_i."""

    def __init__(self, k=(100.0, 400.0, 2500.0), masses=(1.0, 4.0, 12.0)):
        self.k = torch.tensor(k, dtype=torch.float64)
        self.masses = np.asarray(masses, dtype=np.float64)
        self.positions = torch.zeros(len(k), 3, dtype=torch.float64)

    def energy_and_forces(self, x):
        k = self.k.to(x)[None, :, None]
        return 0.5 * (k * x * x).sum((1, 2)), -k * x


@pytest.fixture(scope="module")
def ala2():
    from mcsample.systems.peptides import alanine_dipeptide

    return alanine_dipeptide("obc1")


# -------------------------------------------------------------------------------- exact answers


def test_baoab_samples_the_exact_harmonic_variance_at_a_large_timestep():
    """<x^2> = kT/k per coordinate for omega*h = 1 (BAOAB is exact for harmonic U; a first-order
    or BBK-type scheme is off by ~(omega h)^2/4 = 25 % there)."""
    ho = Harmonic(k=(400.0, 900.0, 4800.0))  # omega = 20, 15, 20 per ps
    h_fs = 50.0  # omega_max * h = 1
    T = 300.0
    res = run_langevin(
        ho,
        2048,
        2.0,
        temperature=T,
        timestep_fs=h_fs,
        friction_per_ps=10.0,
        report_interval_ps=0.1,
        equilibration_ps=2.0,
        generator=_gen(0),
        progress=False,
        frame_dtype=torch.float64,
    )
    assert res.positions.shape == (20, 2048, 3, 3)
    per_replica = (res.positions**2).mean((0, 3))  # (R, n): time average of x^2
    est = per_replica.mean(0)
    se = per_replica.std(0) / math.sqrt(per_replica.shape[0])
    exact = KB * T / ho.k
    z = (est - exact) / se
    assert torch.all(z.abs() < 5), z
    assert torch.all((est / exact - 1).abs() < 0.03)


def test_frictionless_baoab_is_openmm_langevin_middle_step_for_step(ala2):
    """With friction 0 both integrators are velocity Verlet; OpenMM's velocities sit half a
    kick behind, so v_ours(0) = v_openmm(0) + h F(x0) / 2m gives the same positions."""
    import openmm
    import openmm.unit as unit

    m = torch.as_tensor(masses_of(ala2.system))
    v0 = maxwell_velocities(m, KB * 300.0, 1, _gen(1), remove_com=True)[0]
    x0 = ala2.positions
    integ = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 0 / unit.picosecond, 1 * unit.femtosecond)
    ctx = openmm.Context(ala2.system, integ, openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(x0.numpy())
    ctx.setVelocities(v0.numpy())
    ref = []
    for _ in range(100):
        integ.step(1)
        ref.append(ctx.getState(getPositions=True).getPositions(asNumpy=True)._value)
    f0 = ala2.forces(x0[None])[0]
    v_ours = v0 + 0.5e-3 * f0 / m[:, None]
    res = run_langevin(
        ala2,
        1,
        0.1,
        friction_per_ps=0.0,
        report_interval_ps=0.001,
        positions=x0,
        velocities=v_ours[None],
        frame_dtype=torch.float64,
        progress=False,
    )
    diff = np.abs(res.positions[:, 0].numpy() - np.asarray(ref)).max()
    assert diff < 1e-10, diff
    assert res.positions.shape == (100, 1, 22, 3)


def test_total_energy_is_conserved_without_friction(ala2):
    """Velocity Verlet: U + K stays within 0.6 kJ/mol of its start over 0.3 ps at 0.5 fs
    (kT = 2.5 kJ/mol, K ~ 40 kJ/mol), with no drift beyond that, and the deviation is second
    order: halving the step shrinks it about 4x (at least 2.5x)."""
    m = torch.as_tensor(masses_of(ala2.system))[None, :, None]
    dev = {}
    for h in (0.5, 0.25):
        x = v = None
        g = _gen(3)
        total = []
        for seg in range(7):
            res = run_langevin(
                ala2,
                8,
                0.05 if seg else 0.0,
                timestep_fs=h,
                friction_per_ps=0.0,
                report_interval_ps=0.05 if seg else h / 1000,
                positions=x,
                velocities=v,
                generator=g,
                progress=False,
            )
            x, v = res.final_positions, res.final_velocities
            u = res.energies[-1] if seg else ala2.energy(x)
            total.append((u + 0.5 * (m * v**2).sum((1, 2))).numpy())
        total = np.asarray(total)
        dev[h] = np.abs(total - total[0]).max(0)  # per replica
    assert dev[0.5].max() < 0.6, dev[0.5]
    assert np.median(dev[0.5] / dev[0.25]) > 2.5, dev


def test_parallel_tempering_keeps_each_temperature_exact():
    """Swaps accepted with min(1, exp(dbeta dU)) leave every temperature's Boltzmann density
    invariant: <x^2> = kT_0/k for the recorded frames and <U> = (3n/2) kT_k at every rung."""
    ho = Harmonic(k=(400.0, 900.0, 2500.0))
    temps = geometric_temperatures(300.0, 600.0, 4)
    res = run_langevin_pt(
        ho,
        temps,
        256,
        2.0,
        exchange_interval_ps=0.01,
        timestep_fs=10.0,
        friction_per_ps=10.0,
        report_interval_ps=0.1,
        equilibration_ps=1.0,
        generator=_gen(5),
        progress=False,
        frame_dtype=torch.float64,
    )
    assert res.positions.shape == (20, 256, 3, 3)
    assert res.state_energies.shape == (20, 4, 256)
    assert np.all((res.acceptance > 0.2) & (res.acceptance < 0.95)), res.acceptance
    # configurations move across the ladder: lineages started at the top reach the bottom
    assert bool((res.walker_at_state[:, 0] == 3).any())
    per = (res.positions**2).mean((0, 3))
    est, se = per.mean(0), per.std(0) / math.sqrt(per.shape[0])
    z = (est - KB * temps[0] / ho.k) / se
    assert torch.all(z.abs() < 5), z
    u = res.state_energies.mean(0)  # (K, W): per-walker time average
    mean_u, se_u = u.mean(1), u.std(1) / math.sqrt(u.shape[1])
    exact = 1.5 * 3 * KB * torch.as_tensor(temps, dtype=torch.float64)
    assert torch.all(((mean_u - exact) / se_u).abs() < 5), (mean_u, exact, se_u)


# -------------------------------------------------------------------------------- interface


def test_same_generator_same_frames_and_an_mdtraj_trajectory(ala2):
    """A fixed seed reproduces the run; frames are frame-major (F, R, n, 3) in frame_dtype."""
    kw = dict(report_interval_ps=0.01, progress=False, dtype=torch.float32, frame_dtype=torch.float16)
    a = run_langevin(ala2, 4, 0.03, generator=_gen(9), **kw)
    b = run_langevin(ala2, 4, 0.03, generator=_gen(9), **kw)
    c = run_langevin(ala2, 4, 0.03, generator=_gen(10), **kw)
    assert a.positions.dtype == torch.float16 and a.energies.dtype == torch.float64
    assert torch.equal(a.positions, b.positions) and torch.equal(a.energies, b.energies)
    assert not torch.equal(a.positions, c.positions)
    assert np.allclose(a.time_ps, [0.01, 0.02, 0.03])
    traj = a.trajectory(2)
    assert traj.n_frames == 3 and traj.n_atoms == 22 and traj.topology.n_bonds == ala2.topology.n_bonds
    assert a.trajectory().n_frames == 12 and a.samples().shape == (12, 22, 3)
    # the recorded energies are those of the recorded (float32) configurations
    u = ala2.energy(a.final_positions.double()).numpy()
    assert np.allclose(u, a.energies[-1].numpy(), atol=1e-3)
    assert a.metadata["remove_com_motion"] and a.metadata["temperature_K"] == 300.0


def test_a_blow_up_names_the_replica(ala2):
    """Replica 2 started 10^4 times too fast tears apart (energies past max_energy); a NaN in a
    start structure is refused before the first step."""
    m = torch.as_tensor(masses_of(ala2.system))
    v = maxwell_velocities(m, KB * 300.0, 4, _gen(0))
    v[2] *= 1e4
    with pytest.raises(BlowUpError, match=r"replica\(s\) \[2\]"):
        run_langevin(ala2, 4, 0.05, velocities=v, report_interval_ps=0.01, progress=False)
    x = ala2.positions.repeat(3, 1, 1)
    x[1, 5, 0] = float("nan")
    with pytest.raises(BlowUpError, match=r"replica\(s\) \[1\].*step 0"):
        run_langevin(ala2, 3, 0.01, positions=x, progress=False)


def test_bad_arguments_are_refused(ala2):
    with pytest.raises(ValueError, match="multiple of"):
        run_langevin_pt(ala2, [300, 400], 2, 0.1, exchange_interval_ps=0.03, report_interval_ps=0.05, progress=False)
    with pytest.raises(ValueError, match="increasing"):
        run_langevin_pt(ala2, [400, 300], 2, 0.1, progress=False)
    with pytest.raises(TypeError, match="torch.Generator"):
        run_langevin(ala2, 2, 0.01, generator=0, progress=False)
    with pytest.raises(ValueError, match="shape"):
        run_langevin(ala2, 2, 0.01, positions=torch.zeros(3, 22, 3), progress=False)


def test_hydrogen_mass_repartitioning_keeps_the_total_mass(ala2):
    m = masses_of(ala2.system)
    m4 = masses_of(ala2.system, hydrogen_mass=4.0)
    hyd = np.abs(m - 1.008) < 0.1
    assert np.isclose(m4.sum(), m.sum()) and np.allclose(m4[hyd], 4.0)
    assert np.all(m4[~hyd] <= m[~hyd]) and m4.min() > 0


def test_block_stderr_of_white_noise():
    """Block means of iid N(0,1) samples: se ~ 1/sqrt(N)."""
    rng = np.random.default_rng(0)
    mean, se = block_stderr(rng.standard_normal(40000), 20)
    assert abs(se * math.sqrt(40000) - 1.0) < 0.5 and abs(mean) < 5 * se


# -------------------------------------------------------------------------------- against OpenMM


def _basins(phi: np.ndarray, psi: np.ndarray) -> dict:
    """Indicators of alanine dipeptide's basins: phi>0 (alpha_L, C7ax), alpha_R
    (phi<0, -115 deg < psi < 50 deg) and the rest of phi<0 (beta, C7eq, PII)."""
    alpha = (phi < 0) & (psi > -2.0) & (psi < 0.9)
    return {"phi>0": phi > 0, "alpha_R": alpha, "beta": (phi < 0) & ~alpha}


def _openmm_reference(peptide, temperature: float, time_ps: float, seed: int, blocks: int):
    """<U> and basin populations of one OpenMM trajectory (LangevinMiddle, 1 fs, 1/ps, System
    masses, 5 ps unrecorded), each with a block-averaged standard error."""
    from mcsample.systems import analysis as A
    from mcsample.systems.md import run_md

    md = run_md(
        peptide,
        time_ps,
        temperature=temperature,
        report_interval_ps=0.1,
        equilibration_ps=5.0,
        generator=_gen(seed),
        progress=False,
        threads=1,
    )
    phi, psi = A.ramachandran_angles(md.trajectory)
    out = {"U": block_stderr(md.energies, blocks)}
    for name, ind in _basins(phi, psi).items():
        out[name] = block_stderr(ind.astype(float), blocks)
    return out


def _ours(res, topology) -> dict:
    """The same from independent replicas/walkers: mean and spread of per-replica averages."""
    from mcsample.systems import analysis as A

    F, R = res.energies.shape
    phi, psi = A.ramachandran_angles(res.positions.reshape(-1, *res.positions.shape[2:]), topology)
    series = {"U": res.energies.numpy()}
    for name, ind in _basins(phi.reshape(F, R), psi.reshape(F, R)).items():
        series[name] = ind.astype(float)
    out = {}
    for name, s in series.items():
        per = s.mean(0)
        out[name] = (float(per.mean()), float(per.std(ddof=1) / math.sqrt(R)))
    return out


def _assert_agree(ours: dict, theirs: dict, keys, z_max: float = 5.0) -> None:
    for key in ours:
        (a, sa), (b, sb) = ours[key], theirs[key]
        z = (a - b) / math.sqrt(sa**2 + sb**2 + 1e-300)
        print(f"  {key:8s} ours {a:9.4f} ± {sa:.4f}   OpenMM {b:9.4f} ± {sb:.4f}   z = {z:+.2f}")
    for key in keys:
        (a, sa), (b, sb) = ours[key], theirs[key]
        assert abs(a - b) < z_max * math.sqrt(sa**2 + sb**2), (key, a, sa, b, sb)


@pytest.mark.slow
def test_mean_energy_agrees_with_openmm_at_300K(ala2):
    """300 K, alanine dipeptide (ff96 + OBC1): <U> of batched parallel tempering with the
    data-set settings (4 temperatures 300-600 K x 32 walkers, BAOAB 2 fs with 4 Da hydrogens,
    float32; 10 ps dropped, then 10 ps) equals <U> of 150 ps of OpenMM's LangevinMiddleIntegrator
    at 1 fs within 5 combined standard errors. The walkers start at the minimized structure with
    independent Maxwell velocities; <U> relaxes in about a picosecond. (The basin populations
    are printed, not asserted: at 300 K alpha_R <-> beta takes tens of ps, phi>0 nanoseconds,
    so 150 ps of MD does not pin them down; 1 ns of the project's OpenMM MD gave alpha_R 0.16 ±
    0.05, phi>0 0.0008 ± 0.0002, <U> -98.43 ± 0.42 kJ/mol.)"""
    theirs = _openmm_reference(ala2, 300.0, 150.0, seed=11, blocks=10)
    res = run_langevin_pt(
        ala2,
        geometric_temperatures(300.0, 600.0, 4),
        32,
        10.0,
        exchange_interval_ps=0.02,
        timestep_fs=2.0,
        hydrogen_mass=4.0,
        report_interval_ps=0.1,
        equilibration_ps=10.0,
        dtype=torch.float32,
        generator=_gen(12),
        progress=False,
    )
    print(f"\n300 K; swap acceptance {np.round(res.acceptance, 2)}")
    _assert_agree(_ours(res, ala2.topology), theirs, keys=["U"])


@pytest.mark.slow
def test_energy_and_basin_populations_agree_with_openmm_at_600K(ala2):
    """600 K, where phi>0 (alpha_L, C7ax) holds ~6 % and is entered ~90 times per ns:
    <U> and the phi>0, alpha_R and beta populations of 64 independent BAOAB replicas (2 fs,
    4 Da hydrogens, float32; 10 ps dropped after a common minimized start with independent
    Maxwell velocities, then 15 ps) agree with 600 ps of OpenMM at 1 fs (standard errors from
    6 blocks of 100 ps) within 5 combined standard errors."""
    theirs = _openmm_reference(ala2, 600.0, 600.0, seed=21, blocks=6)
    res = run_langevin(
        ala2,
        64,
        15.0,
        temperature=600.0,
        timestep_fs=2.0,
        hydrogen_mass=4.0,
        report_interval_ps=0.1,
        equilibration_ps=10.0,
        dtype=torch.float32,
        generator=_gen(22),
        progress=False,
    )
    print("\n600 K")
    ours = _ours(res, ala2.topology)
    assert ours["phi>0"][0] > 0.01
    _assert_agree(ours, theirs, keys=["U", "phi>0", "alpha_R", "beta"])


# -------------------------------------------------------------------------------- the data set


def _example():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "peptides" / "transferable_data.py"
    spec = importlib.util.spec_from_file_location("transferable_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transferable_data_quick_writes_resumes_and_refuses_other_sequences(tmp_path, capsys):
    """--quick writes two training dipeptides (MDResult-readable, provenance, manifest), a rerun
    skips them, other settings for the same files and non-training sequences are refused."""
    import json

    from mcsample.systems import analysis as A
    from mcsample.systems.md import MDResult

    ex = _example()
    assert len(ex.TRAINING_SEQUENCES) == 48 and len(set(ex.TRAINING_SEQUENCES)) == 48
    assert not {"EW", "FF", "IQ", "LQ", "PE", "TL", "VT", "YW"} & set(ex.TRAINING_SEQUENCES)
    ex.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["sequence"] for s in manifest["sequences"]] == ["AV", "CG"]
    for seq in ("AV", "CG"):
        res = MDResult.load(tmp_path / f"{seq}.npz")
        meta = res.metadata
        assert meta["complete"] and meta["settings"]["force_field"].startswith("amber14-all")
        assert meta["settings"]["temperature_K"] == 310.0 and meta["identity"]["sequence"] == seq
        assert {"torch", "openmm", "mcsample"} <= set(meta["versions"])
        assert res.n_frames == 4 * 4 and np.isfinite(res.energies).all()  # 4 walkers x 0.4 ps/0.1
        assert [r.name for r in res.trajectory.topology.residues] == [_three(c) for c in seq]
        assert res.trajectory.xyz.dtype == np.float32
    capsys.readouterr()
    ex.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    assert "2 of 2 sequences already" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="seed=0, not 1"):
        ex.main(["--quick", "--out", str(tmp_path), "--no-progress", "--seed", "1"])
    with pytest.raises(SystemExit, match="not training sequences"):
        ex.main(["--sequences", "FF", "--out", str(tmp_path / "x"), "--no-progress"])
    # the packed data set: every thin-th frame of each walker, float16 centred coordinates whose
    # internal geometry matches the float32 frames to the float16 resolution
    packed = tmp_path / "packed.npz"
    ex.main(["--quick", "--out", str(tmp_path), "--export", str(packed), "--thin", "2", "--sequences", "AV", "CG"])
    for seq in ("AV", "CG"):
        full = MDResult.load(tmp_path / f"{seq}.npz").trajectory.xyz
        xyz, walker, energy = ex.load_packed(packed, seq)
        assert xyz.shape == (8, full.shape[1], 3) and list(walker) == [0, 1, 2, 3] * 2
        kept = full.reshape(4, 4, -1, 3)[::2].reshape(8, -1, 3)  # frames 0 and 2 of each walker
        d_full = np.linalg.norm(kept[:, :, None] - kept[:, None], axis=-1)
        d_packed = np.linalg.norm(xyz[:, :, None] - xyz[:, None], axis=-1)
        assert np.abs(d_full - d_packed).max() < 2e-3
        assert np.allclose(xyz.mean(1), 0.0, atol=1e-3) and np.isfinite(energy).all()
    manifest = ex.read_manifest(packed)
    assert manifest["packed"]["thin"] == 2 and manifest["settings"]["num_walkers"] == 4
    with pytest.raises(SystemExit, match="holds no frames of GR"):
        ex.load_packed(packed, "GR")
    # every walker starts in the polyproline/beta basin (phi of residue 2, psi of residue 1)
    from mcsample.systems.peptides import Peptide

    pep = Peptide.from_sequence("CG", caps=False, solvent="obc1", temperature=310.0, cutoff=2.0)
    phi, psi = A.ramachandran_angles(ex._start_structure(pep, -75.0, 145.0)[None], pep.topology)
    assert abs(np.rad2deg(phi[0]) + 75) < 30 and abs(np.rad2deg(psi[0]) - 145) < 30


def _three(code: str) -> str:
    from mcsample.systems.peptides import ONE_LETTER_CODES

    return ONE_LETTER_CODES[code]
