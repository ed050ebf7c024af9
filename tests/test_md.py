"""Reference MD, resume, parallel tempering, and SMC on alanine dipeptide against MD.

The MD checks are deterministic (seeded generators; the Reference platform is bit-reproducible).
The SMC-vs-MD check is statistical: the bound is 5 combined standard errors (MD error from
the statistical inefficiency of the energy series, SMC error from the weights); its false-
failure rate is below 1e-6 if those errors are right (the MD one is an estimate from a short
run, see the test).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mcsample.systems.md import MDResult, load_npz, run_md, run_parallel_tempering
from mcsample.systems.peptides import alanine_dipeptide


@pytest.fixture(scope="module")
def ala2():
    return alanine_dipeptide("obc1")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _drawn_seed(seed: int) -> int:
    """The integer seed a run draws from ``torch.Generator().manual_seed(seed)``."""
    return int(torch.randint(1, 2**31 - 1, (), generator=_gen(seed)))


def test_short_md_gives_finite_energies_and_an_mdtraj_trajectory(ala2):
    res = run_md(ala2, 0.3, report_interval_ps=0.01, generator=_gen(1), progress=False)  # 300 steps of 1 fs
    traj = res.trajectory
    assert traj.n_frames == 30 and traj.n_atoms == 22
    assert [a.name for a in traj.topology.atoms] == [a.name for a in ala2.topology.atoms]
    assert traj.topology.n_bonds == ala2.topology.n_bonds
    assert np.allclose(traj.time, 0.01 * np.arange(1, 31))
    assert np.isfinite(res.energies).all() and res.energies.dtype == np.float64
    # the recorded energies are the System's energies of the recorded frames (float32 positions)
    u = ala2.energy(torch.as_tensor(traj.xyz[:5], dtype=torch.float64), backend="openmm").numpy()
    assert np.abs(u - res.energies[:5]).max() < 0.05
    # thermal: well above the minimum, well below a blow-up (3n-6 = 60 quadratic dofs ≈ 75 kJ/mol)
    u_min = float(ala2.energy(ala2.positions[None], backend="openmm"))
    assert u_min < res.energies.mean() < u_min + 200
    meta = res.metadata
    assert meta["timestep_fs"] == 1.0 and meta["seed"] == _drawn_seed(1) and meta["temperature_K"] == 300.0
    assert meta["steps"] == 300 and meta["integrator"] == "LangevinMiddleIntegrator"


def test_resume_continues_the_same_trajectory(ala2, tmp_path):
    """Half a run saved, then extended, equals the uninterrupted run (Reference platform: exact).

    The continuation is given no generator: it keeps the seed recorded in the file."""
    kw = dict(report_interval_ps=0.02, platform="Reference", progress=False)
    whole = run_md(ala2, 0.2, generator=_gen(7), **kw)
    path = tmp_path / "md.npz"
    first = run_md(ala2, 0.1, path=path, generator=_gen(7), **kw)
    assert first.n_frames == 5 and not first.metadata["resumed"]
    traj, energy, meta, extra = load_npz(path)
    assert meta["complete"] and meta["n_frames"] == 5 and int(extra["step"]) == 100
    assert meta["seed"] == whole.metadata["seed"] == _drawn_seed(7)
    resumed = run_md(ala2, 0.2, path=path, **kw)
    assert resumed.metadata["resumed"] and resumed.metadata["steps"] == 200
    assert np.array_equal(resumed.trajectory.xyz, whole.trajectory.xyz)
    assert np.array_equal(resumed.energies, whole.energies)
    assert np.allclose(resumed.trajectory.time, whole.trajectory.time)
    # the file now holds the whole run and loads back as an MDResult with its topology
    back = MDResult.load(path)
    assert back.n_frames == 10 and back.trajectory.topology.n_bonds == ala2.topology.n_bonds
    assert [r.name for r in back.trajectory.topology.residues] == ["ACE", "ALA", "NME"]
    # a different setting is refused rather than mixed into the same file
    with pytest.raises(ValueError, match="friction_per_ps"):
        run_md(ala2, 0.3, path=path, **{**kw, "friction_per_ps": 2.0})
    with pytest.raises(ValueError, match="seed="):  # another generator seed is another run
        run_md(ala2, 0.3, path=path, generator=_gen(8), **kw)


def test_resume_from_positions_when_checkpoint_is_foreign(ala2, tmp_path):
    """A checkpoint from another platform falls back to the saved positions and velocities."""
    path = tmp_path / "md.npz"
    run_md(ala2, 0.05, report_interval_ps=0.01, generator=_gen(2), platform="Reference", progress=False, path=path)
    with pytest.warns(UserWarning, match="checkpoint"):
        res = run_md(ala2, 0.1, report_interval_ps=0.01, generator=_gen(2), platform="CPU", progress=False, path=path)
    assert res.n_frames == 10 and np.isfinite(res.energies).all()
    # continuity: the first new frame is 10 fs after the last saved one, so atoms moved little
    step = np.linalg.norm(res.trajectory.xyz[5] - res.trajectory.xyz[4], axis=-1).max()
    assert step < 0.05
    assert res.metadata["steps"] == 100


def test_generator_seeds_the_trajectory(ala2):
    """Same generator seed, same trajectory (Reference platform: bitwise); another seed, another
    trajectory; the integer drawn from the generator is the recorded seed."""
    kw = dict(report_interval_ps=0.01, platform="Reference", progress=False, minimize=False)
    a = run_md(ala2, 0.03, generator=_gen(11), **kw)
    b = run_md(ala2, 0.03, generator=_gen(11), **kw)
    c = run_md(ala2, 0.03, generator=_gen(12), **kw)
    assert np.array_equal(a.trajectory.xyz, b.trajectory.xyz) and np.array_equal(a.energies, b.energies)
    assert np.abs(a.trajectory.xyz - c.trajectory.xyz).max() > 1e-4
    assert a.metadata["seed"] == _drawn_seed(11) != c.metadata["seed"]
    # the run advances the generator by exactly that one draw: the next run gets a new seed
    g, ref = _gen(11), _gen(11)
    draws = [int(torch.randint(1, 2**31 - 1, (), generator=ref)) for _ in range(2)]
    assert run_md(ala2, 0.01, generator=g, **kw).metadata["seed"] == draws[0]
    assert run_md(ala2, 0.01, generator=g, **kw).metadata["seed"] == draws[1]


def test_seed_is_a_deprecated_alias_of_generator(ala2):
    """``seed=s`` warns, names the replacement, and runs exactly ``generator=manual_seed(s)``."""
    kw = dict(report_interval_ps=0.01, platform="Reference", progress=False, minimize=False)
    with pytest.warns(DeprecationWarning, match=r"generator=torch\.Generator\(\)\.manual_seed"):
        old = run_md(ala2, 0.02, seed=5, **kw)
    new = run_md(ala2, 0.02, generator=_gen(5), **kw)
    assert np.array_equal(old.trajectory.xyz, new.trajectory.xyz)
    assert old.metadata["seed"] == new.metadata["seed"] == _drawn_seed(5)
    pt_kw = dict(exchange_interval_ps=0.01, report_interval_ps=0.01, platform="Reference", progress=False)
    with pytest.warns(DeprecationWarning, match="generator="):
        old = run_parallel_tempering(ala2, [300.0, 330.0], 0.02, seed=5, **pt_kw)
    new = run_parallel_tempering(ala2, [300.0, 330.0], 0.02, generator=_gen(5), **pt_kw)
    assert np.array_equal(old.state_energies, new.state_energies)
    with pytest.raises(TypeError, match="not both"):
        run_md(ala2, 0.01, seed=5, generator=_gen(5), **kw)


def test_generator_must_be_a_torch_generator(ala2):
    """An integer (or a numpy Generator) where a torch.Generator belongs is refused, naming the fix."""
    with pytest.raises(TypeError, match=r"torch\.Generator.*manual_seed"):
        run_md(ala2, 0.01, generator=3, progress=False)
    with pytest.raises(TypeError, match="Generator"):
        run_parallel_tempering(ala2, [300.0, 330.0], 0.01, generator=np.random.default_rng(0), progress=False)


def test_parallel_tempering_swaps(ala2):
    res = run_parallel_tempering(
        ala2,
        [300.0, 320.0, 345.0],
        0.6,
        exchange_interval_ps=0.02,
        report_interval_ps=0.04,
        generator=_gen(0),
        progress=False,
    )
    assert res.trajectory.n_frames == 15 and res.trajectory.n_atoms == 22
    assert res.attempts.tolist() == [15, 15]  # 30 exchange rounds, alternating even/odd pairs
    assert np.all(res.acceptance > 0.0) and np.all(res.acceptance < 1.0)
    assert np.isfinite(res.energies).all()
    # the recorded energies are those of the configuration at the target temperature
    assert np.array_equal(res.energies, res.state_energies[:, 0])
    # every row of replica_at_state is a permutation
    assert all(sorted(r) == [0, 1, 2] for r in res.replica_at_state.tolist())
    with pytest.raises(ValueError, match="increasing"):
        run_parallel_tempering(ala2, [320.0, 300.0], 0.1, progress=False)
    with pytest.raises(ValueError, match="multiple"):
        run_parallel_tempering(
            ala2, [300.0, 320.0], 0.1, exchange_interval_ps=0.03, report_interval_ps=0.05, progress=False
        )


# ------------------------------------------------------------------------------ SMC vs MD


class _BroadStart:
    r"""Initial SMC distribution over the 3n-6 internal coordinates of alanine dipeptide.

    φ and ψ uniform on the circle (the broad part: every Ramachandran basin, clashes included);
    the other coordinates around the minimized structure: bonds N(b₀, 0.005 nm), angles
    N(θ₀, 0.1 rad), the other torsions wrapped normal (σ = 0.3 rad; the sum over images k = -1,
    0, 1 is exact to e^{-50}), so chirality and the trans peptide bonds are kept (a uniform
    start on those would produce D-Ala and cis states that MD at 300 K never visits). The
    log-density is exact and 2π-periodic in the torsions, like the target.
    """

    def __init__(self, target, free_torsions, sb=0.005, sa=0.1, st=0.3):
        ic = target.transform
        self.mu = target.reference_z[6:].clone()
        nb, na = ic.n_atoms - 1, ic.n_atoms - 2
        s = torch.full_like(self.mu, st)
        s[:nb], s[nb : nb + na] = sb, sa
        self.s = s
        self.circ = target.circular_mask
        self.free = torch.zeros_like(self.circ)
        self.free[[nb + na + k for k in free_torsions]] = True

    def sample(self, shape, generator=None):
        n = shape[0]
        z = self.mu + self.s * torch.randn(n, self.mu.numel(), dtype=self.mu.dtype, generator=generator)
        u = (2 * torch.rand(n, self.mu.numel(), dtype=self.mu.dtype, generator=generator) - 1) * math.pi
        z = torch.where(self.free, u, z)
        return torch.where(self.circ, torch.remainder(z + math.pi, 2 * math.pi) - math.pi, z)

    def log_prob(self, z):
        d = z - self.mu
        norm = -torch.log(self.s) - 0.5 * math.log(2 * math.pi)
        lin = -0.5 * (d / self.s) ** 2 + norm
        dc = torch.remainder(d + math.pi, 2 * math.pi) - math.pi
        images = torch.tensor([-2 * math.pi, 0.0, 2 * math.pi], dtype=z.dtype)
        wrapped = torch.logsumexp(-0.5 * ((dc[..., None] + images) / self.s[:, None]) ** 2, -1) + norm
        lp = torch.where(self.circ, wrapped, lin)
        lp = torch.where(self.free, torch.full_like(lp, -math.log(2 * math.pi)), lp)
        return lp.sum(-1)


def _beta_basin(phi, psi):
    """The extended/C7eq basin of alanine dipeptide: φ < 0 and ψ outside the helical (-2, 1) rad."""
    return (phi < 0) & ~((psi > -2.0) & (psi < 1.0))


def _genealogy_stderr(values, weights, ancestors):
    r"""Standard error of :math:`\sum_i \bar w_i f_i` from the particles' time-0 ancestors.

    :math:`\widehat{se}^2 = \sum_a \big(\sum_{i: A_i = a} \bar w_i (f_i - \hat\mu)\big)^2`
    (Chan & Lai 2013; Lee & Whiteley 2018): particles sharing an ancestor count as one, so the
    duplicates that resampling creates do not shrink the error.
    """
    mu = float(np.sum(weights * values))
    groups = np.zeros(int(ancestors.max()) + 1)
    np.add.at(groups, ancestors, weights * (values - mu))
    return mu, float(np.sqrt(np.sum(groups**2)))


@pytest.fixture
def one_thread():
    """Batches of 256 small molecules run faster on one torch thread on a shared 2-core CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_parallel_tempering_resume_continues_the_same_run(ala2, tmp_path):
    """Half a PT run saved, then extended, equals the uninterrupted run (Reference platform)."""
    kw = dict(exchange_interval_ps=0.02, report_interval_ps=0.04, platform="Reference", progress=False)
    temps = [300.0, 330.0, 365.0]
    whole = run_parallel_tempering(ala2, temps, 0.4, generator=_gen(3), **kw)
    path = tmp_path / "pt.npz"
    first = run_parallel_tempering(ala2, temps, 0.2, path=path, generator=_gen(3), **kw)
    assert first.trajectory.n_frames == 5 and not first.metadata["resumed"]
    resumed = run_parallel_tempering(ala2, temps, 0.4, path=path, generator=_gen(3), **kw)
    assert resumed.metadata["resumed"] and resumed.trajectory.n_frames == 10
    assert np.array_equal(resumed.trajectory.xyz, whole.trajectory.xyz)
    assert np.array_equal(resumed.state_energies, whole.state_energies)
    assert np.array_equal(resumed.replica_at_state, whole.replica_at_state)
    assert (
        resumed.attempts.tolist() == whole.attempts.tolist()
        and resumed.acceptance.tolist() == whole.acceptance.tolist()
    )
    assert 0 < whole.acceptance.min() and whole.acceptance.max() < 1  # swaps happened and were refused
    traj, _, meta, extra = load_npz(path)
    assert meta["complete"] and meta["n_frames"] == 10 and len(extra["pt_replica_at_state"]) == 10
    with pytest.raises(ValueError, match=f"seed={_drawn_seed(3)}"):
        run_parallel_tempering(ala2, temps, 0.4, path=path, generator=_gen(4), **kw)


def test_smc_on_alanine_dipeptide_matches_md_energies(ala2, one_thread):
    """SMC over internal coordinates from a broad start.

    SMC (adaptive tempering, HMC moves) on :class:`InternalCoordinateTarget` with the rigid
    body fixed, from :class:`_BroadStart`, then twelve HMC moves at β = 1 on the resampled
    particles (rejuvenation: SMC with few moves per temperature collapses onto low-energy
    particles, by up to 4 kJ/mol in some seeds, which the moves at β = 1 remove). Compared with
    MD in the extended (β/C7eq) basin, where
    a 40 ps MD run is: the populations of the basins relax on 10-1000 ps time scales (their
    mean energies differ by 3-13 kJ/mol), so a test-sized MD run can only pin the energy
    distribution within a basin. The MD uses friction 5/ps, which leaves the sampled
    distribution unchanged and shortens the energy autocorrelation (statistical inefficiency
    ≈ 3 frames at 0.05 ps, against ≈ 15 at 1/ps). Bound: 5 combined standard errors. The SMC
    error is the genealogy estimate, floored at the run-to-run standard deviation of this test's
    SMC mean measured over seeds 0-5 (1.9 kJ/mol, with six rejuvenation moves; twelve give
    less): with a few dozen surviving ancestors the genealogy estimate alone is itself noisy
    and was as low as 0.26 kJ/mol in one seed.
    """
    import mcsample as mc
    from mcsample.kernels import run_chain
    from mcsample.systems import analysis as A
    from mcsample.systems.coordinates import InternalCoordinateTarget

    # --- MD reference
    ref = run_md(
        ala2,
        40.0,
        friction_per_ps=5.0,
        report_interval_ps=0.05,
        equilibration_ps=2.0,
        generator=_gen(3),
        threads=1,
        progress=False,
    )
    phi_md, psi_md = A.ramachandran_angles(ref.trajectory)
    in_md = _beta_basin(phi_md, psi_md)
    assert in_md.mean() > 0.5
    e_md = ref.energies[in_md]
    g = A.statistical_inefficiency(e_md)
    mean_md, se_md = e_md.mean(), e_md.std() * math.sqrt(g / e_md.size)

    # --- SMC
    target = InternalCoordinateTarget(ala2, fix_rigid=True)
    ic = target.transform
    import mdtraj as md

    t0 = md.Trajectory(ala2.positions[None].numpy().astype(np.float32), ala2.topology)
    free = [ic.torsion_index(md.compute_phi(t0)[0][0]), ic.torsion_index(md.compute_psi(t0)[0][0])]
    initial = _BroadStart(target, free)
    gen = torch.Generator().manual_seed(0)
    kernel = mc.kernels.HMC(num_steps=2, num_leapfrog=10)
    n = 256
    res = mc.smc(target, initial, n, kernel=kernel, schedule=mc.AdaptiveSchedule(cess=0.7), generator=gen)
    lw = res.particles.log_weights
    assert torch.isfinite(res.particles.samples).all() and not torch.isnan(lw).any()
    assert math.isfinite(float(res.log_evidence)) and res.betas[-1] == 1.0
    assert res.acceptance_history.min() > 0.2

    idx = mc.resample(lw, generator=gen)
    z, ancestors = res.particles.samples[idx], res.state.ancestors[idx]
    scale = z.std(0)
    z, rates = run_chain(kernel, target, z, 12, step_size=float(res.state.step_size), scale=scale, generator=gen)
    assert rates.mean() > 0.3
    x, _ = target.to_cartesian(z)
    e = ala2.energy(x).detach().numpy()
    assert np.isfinite(e).all()
    phi, psi = A.ramachandran_angles(x.detach().numpy(), ala2.topology)
    in_smc = _beta_basin(phi, psi)
    assert in_smc.mean() > 0.5  # SMC finds the dominant basin from uniform φ/ψ
    w = in_smc / in_smc.sum()
    mean_smc, se_gen = _genealogy_stderr(e, w, ancestors.numpy())
    se_smc = max(se_gen, 1.9)

    tol = 5 * math.hypot(se_md, se_smc)
    print(
        f"MD {mean_md:.2f} ± {se_md:.2f}, SMC {mean_smc:.2f} ± {se_gen:.2f} (used {se_smc:.2f}) "
        f"kJ/mol (tol {tol:.2f}); "
        f"W1 {A.energy_wasserstein(e, e_md, weights_p=w):.2f}, std {e_md.std():.2f}"
    )
    assert abs(mean_smc - mean_md) < tol
    # the bound is informative: below the width of the distribution (≈ 13 kJ/mol); an SMC that
    # has not equilibrated (five MALA moves per step) came out 40 kJ/mol too high
    assert tol < e_md.std()


@pytest.mark.slow
def test_reference_md_example_quick(tmp_path):
    """examples/peptides/reference_md.py --quick writes the data set, summaries and plots."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "peptides" / "reference_md.py"
    subprocess.run(
        [sys.executable, str(script), "--quick", "--no-progress", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    for solvent in ("obc1", "vacuum"):
        res = MDResult.load(tmp_path / f"alanine_dipeptide_{solvent}_md.npz")
        assert res.n_frames == 200 and np.isfinite(res.energies).all()
        assert res.metadata["timestep_fs"] == 1.0 and res.metadata["temperature_K"] == 300.0
        summary = json.loads((tmp_path / f"alanine_dipeptide_{solvent}_md.json").read_text())
        assert summary["energy_mean_kJ_per_mol"] == pytest.approx(res.energies.mean())
        assert (tmp_path / f"ramachandran_{solvent}.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "energies.png").exists()


@pytest.mark.slow
def test_reference_md_example_parallel_tempering(tmp_path):
    """--sampler pt: the 300 K replica's frames after equilibration, swap statistics, plot."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "peptides" / "reference_md.py"
    subprocess.run(
        [
            sys.executable,
            str(script),
            "--quick",
            "--sampler",
            "pt",
            "--solvent",
            "vacuum",
            "--replicas",
            "3",
            "--t-max",
            "360",
            "--no-progress",
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    summary = json.loads((tmp_path / "alanine_dipeptide_vacuum_pt.json").read_text())
    assert summary["analysed_frames"] == 200  # 20 ps at 0.1 ps, 2 ps of equilibration dropped
    assert summary["temperatures_K"] == pytest.approx([300.0, 300.0 * 1.2**0.5, 360.0])
    assert len(summary["acceptance"]) == 2 and 0.0 < min(summary["acceptance"]) < 1.0
    assert -80.0 < summary["energy_mean_kJ_per_mol"] < -10.0  # plain MD: -45 kJ/mol
    assert (tmp_path / "ramachandran_vacuum_pt.png").read_bytes()[:4] == b"\x89PNG"
