"""Reference MD, resume, parallel tempering, and SMC on alanine dipeptide against MD.

The MD checks are deterministic (fixed seeds; the Reference platform is bit-reproducible).
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


def test_short_md_gives_finite_energies_and_an_mdtraj_trajectory(ala2):
    res = run_md(ala2, 0.3, report_interval_ps=0.01, seed=1, progress=False)  # 300 steps of 1 fs
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
    assert meta["timestep_fs"] == 1.0 and meta["seed"] == 1 and meta["temperature_K"] == 300.0
    assert meta["steps"] == 300 and meta["integrator"] == "LangevinMiddleIntegrator"


def test_resume_continues_the_same_trajectory(ala2, tmp_path):
    """Half a run saved, then extended, equals the uninterrupted run (Reference platform: exact)."""
    kw = dict(report_interval_ps=0.02, seed=7, platform="Reference", progress=False)
    whole = run_md(ala2, 0.2, **kw)
    path = tmp_path / "md.npz"
    first = run_md(ala2, 0.1, path=path, **kw)
    assert first.n_frames == 5 and not first.metadata["resumed"]
    traj, energy, meta, extra = load_npz(path)
    assert meta["complete"] and meta["n_frames"] == 5 and int(extra["step"]) == 100
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


def test_resume_from_positions_when_checkpoint_is_foreign(ala2, tmp_path):
    """A checkpoint from another platform falls back to the saved positions and velocities."""
    path = tmp_path / "md.npz"
    run_md(ala2, 0.05, report_interval_ps=0.01, seed=2, platform="Reference", progress=False, path=path)
    with pytest.warns(UserWarning, match="checkpoint"):
        res = run_md(ala2, 0.1, report_interval_ps=0.01, seed=2, platform="CPU", progress=False,
                     path=path)
    assert res.n_frames == 10 and np.isfinite(res.energies).all()
    # continuity: the first new frame is 10 fs after the last saved one, so atoms moved little
    step = np.linalg.norm(res.trajectory.xyz[5] - res.trajectory.xyz[4], axis=-1).max()
    assert step < 0.05
    assert res.metadata["steps"] == 100


def test_parallel_tempering_swaps(ala2):
    res = run_parallel_tempering(ala2, [300.0, 320.0, 345.0], 0.6, exchange_interval_ps=0.02,
                                 report_interval_ps=0.04, seed=0, progress=False)
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
        run_parallel_tempering(ala2, [300.0, 320.0], 0.1, exchange_interval_ps=0.03,
                               report_interval_ps=0.05, progress=False)
