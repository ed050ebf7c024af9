"""TorchForceField against OpenMM's Reference platform (float64), clashes, float32, errors.

Agreement criterion: per configuration |ΔU| < 1e-3 kJ/mol and force RMS error
< 1e-3 kJ/mol/nm, on short Langevin-MD snapshots and on strongly perturbed configurations
(Gaussian noise of 0.03 and 0.05 nm on every atom: energies up to ~1e6 kJ/mol), for alanine
dipeptide (ff96, vacuum and OBC1) and KDEA (amber14 + OBC1, without and with a 2 nm cutoff),
through all three engines (compiled numba loop, fused torch with analytic pair gradients,
pure torch autograd). Deterministic (fixed seeds).
"""

from __future__ import annotations

import copy

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest
import torch

from mcsample.systems.forcefield import TorchForceField, UnsupportedForceError, linlogcut
from mcsample.systems.peptides import Peptide, alanine_dipeptide

TOL_U = 1e-3  # kJ/mol
TOL_F = 1e-3  # kJ/mol/nm, RMS over atoms and components


def reference(system, xyz: np.ndarray):
    """Energies (B,) and forces (B, n, 3) from OpenMM's Reference platform (double precision)."""
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    es, fs = [], []
    for x in xyz:
        ctx.setPositions(x)
        s = ctx.getState(getEnergy=True, getForces=True)
        es.append(s.getPotentialEnergy()._value)
        fs.append(s.getForces(asNumpy=True)._value)
    return np.array(es), np.array(fs)


def md_snapshots(
    system, positions: np.ndarray, temperature: float, num: int = 3, every: int = 100, seed: int = 1
) -> np.ndarray:
    """``num`` frames of OpenMM Langevin dynamics (1 fs, 1/ps), ``every`` steps apart."""
    integ = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, 1.0 / unit.picosecond, 0.001 * unit.picoseconds)
    integ.setRandomNumberSeed(seed)
    ctx = openmm.Context(system, integ, openmm.Platform.getPlatformByName("CPU"))
    ctx.setPositions(positions)
    ctx.setVelocitiesToTemperature(temperature * unit.kelvin, seed)
    frames = []
    for _ in range(num):
        integ.step(every)
        frames.append(ctx.getState(getPositions=True).getPositions(asNumpy=True)._value)
    return np.array(frames)


_CACHE: dict = {}


def _kdea() -> Peptide:
    if "kdea" not in _CACHE:
        _CACHE["kdea"] = Peptide.from_sequence("KDEA", solvent="obc1", temperature=310.0)
    return _CACHE["kdea"]


def _system_with(peptide: Peptide, files, **kwargs):
    return app.ForceField(*files).createSystem(peptide.openmm_topology, constraints=None, rigidWater=False, **kwargs)


def _case(name: str):
    """(system, configurations) for a named case: MD snapshots + strongly perturbed ones."""
    if name in _CACHE:
        return _CACHE[name]
    if name.startswith("ala2"):
        pep = alanine_dipeptide("vacuum" if name == "ala2-vacuum" else "obc1")
        system = pep.system
    else:
        pep = _kdea()
        system = pep.system
        if name == "kdea-obc1-cut2":
            system = _system_with(
                pep,
                ["amber14-all.xml", "implicit/obc1.xml"],
                nonbondedMethod=app.CutoffNonPeriodic,
                nonbondedCutoff=2.0 * unit.nanometer,
            )
    x0 = pep.positions.numpy()
    rng = np.random.default_rng(7)
    frames = md_snapshots(system, x0, pep.temperature)
    perturbed = np.concatenate([x0[None] + s * rng.standard_normal((2, *x0.shape)) for s in (0.03, 0.05)])
    _CACHE[name] = (system, np.concatenate([frames, perturbed]))
    return _CACHE[name]


CASES = ["ala2-vacuum", "ala2-obc1", "kdea-obc1", "kdea-obc1-cut2"]


ENGINES = ["numba", "fused", "autograd"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", CASES)
def test_agrees_with_openmm_reference(name, engine):
    system, xyz = _case(name)
    u_ref, f_ref = reference(system, xyz)
    ff = TorchForceField.from_openmm(system, engine=engine)
    u, f = ff.energy_and_forces(torch.as_tensor(xyz))
    du = np.abs(u.numpy() - u_ref)
    rms = np.sqrt(((f.numpy() - f_ref) ** 2).mean(axis=(1, 2)))
    assert u.dtype == torch.float64 and u.shape == (len(xyz),)
    assert np.abs(u_ref).max() > 1e4  # the perturbed configurations are strong
    assert du.max() < TOL_U, (name, du)
    assert rms.max() < TOL_F, (name, rms)


def test_components_match_openmm_force_groups():
    """Each force's share: OpenMM force groups against ``energy_components``."""
    system, xyz = _case("kdea-obc1")
    system = copy.deepcopy(system)
    forces = system.getForces()
    for k, force in enumerate(forces):
        force.setForceGroup(k)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    comps = TorchForceField.from_openmm(system).energy_components(torch.as_tensor(xyz[:3]))
    for k, force in enumerate(forces):
        name = type(force).__name__
        if name == "CMMotionRemover":
            assert name not in comps
            continue
        ref = []
        for x in xyz[:3]:
            ctx.setPositions(x)
            ref.append(ctx.getState(getEnergy=True, groups={k}).getPotentialEnergy()._value)
        assert np.abs(comps[name].numpy() - np.array(ref)).max() < 1e-6, name


def _other_systems():
    pep = _kdea()
    gbsa = _system_with(pep, ["amber99sbildn.xml", "amber99_obc.xml"])  # GBSAOBCForce
    gbsa_cut = _system_with(
        pep,
        ["amber99sbildn.xml", "amber99_obc.xml"],
        nonbondedMethod=app.CutoffNonPeriodic,
        nonbondedCutoff=1.0 * unit.nanometer,
    )
    obc2_salt = _system_with(
        pep,
        ["amber14-all.xml", "implicit/obc2.xml"],
        nonbondedMethod=app.CutoffNonPeriodic,
        nonbondedCutoff=1.2 * unit.nanometer,
        implicitSolventKappa=1.0 / unit.nanometer,
    )
    vac_switch = _system_with(
        pep,
        ["amber14-all.xml"],
        nonbondedMethod=app.CutoffNonPeriodic,
        nonbondedCutoff=1.0 * unit.nanometer,
        switchDistance=0.8 * unit.nanometer,
    )
    return {
        "GBSAOBCForce": gbsa,
        "GBSAOBCForce-cutoff": gbsa_cut,
        "obc2-kappa-cutoff": obc2_salt,
        "vacuum-reaction-field-switch": vac_switch,
    }


def test_other_gb_models_cutoffs_and_switching():
    """GBSAOBCForce (OBC2 + Tinker's inside correction), OBC2 with salt, LJ switching."""
    pep = _kdea()
    rng = np.random.default_rng(3)
    x0 = pep.positions.numpy()
    xyz = np.concatenate([x0[None], x0[None] + 0.03 * rng.standard_normal((2, *x0.shape))])
    # a stretched copy puts pairs on both sides of the 1 nm cutoff and switching region
    xyz = np.concatenate([xyz, 1.6 * xyz[:1]])
    for name, system in _other_systems().items():
        u_ref, f_ref = reference(system, xyz)
        for engine in ENGINES:
            u, f = TorchForceField.from_openmm(system, engine=engine).energy_and_forces(torch.as_tensor(xyz))
            assert np.abs(u.numpy() - u_ref).max() < TOL_U, (name, engine)
            assert np.sqrt(((f.numpy() - f_ref) ** 2).mean(axis=(1, 2))).max() < TOL_F, (name, engine)


def test_torsion_sign_convention_with_asymmetric_phase():
    """A phase of 0.7 rad distinguishes φ from -φ: OpenMM's sign convention is reproduced."""
    system = openmm.System()
    for _ in range(4):
        system.addParticle(12.0)
    torsion = openmm.PeriodicTorsionForce()
    torsion.addTorsion(0, 1, 2, 3, 1, 0.7, 5.0)
    torsion.addTorsion(0, 1, 2, 3, 3, -1.1, 2.0)
    system.addForce(torsion)
    angle = openmm.HarmonicAngleForce()
    angle.addAngle(0, 1, 2, 1.9, 100.0)
    system.addForce(angle)
    xyz = np.random.default_rng(0).standard_normal((16, 4, 3)) * 0.15
    u_ref, f_ref = reference(system, xyz)
    u, f = TorchForceField.from_openmm(system).energy_and_forces(torch.as_tensor(xyz))
    assert np.abs(u.numpy() - u_ref).max() < 1e-9
    assert np.abs(f.numpy() - f_ref).max() < 1e-7


def test_unsupported_forces_raise_and_name_them():
    system = copy.deepcopy(alanine_dipeptide("vacuum").system)
    extra = openmm.CustomExternalForce("x^2")
    extra.addParticle(0, [])
    system.addForce(extra)
    with pytest.raises(UnsupportedForceError, match="CustomExternalForce"):
        TorchForceField.from_openmm(system)
    gbn2 = _system_with(_kdea(), ["amber14-all.xml", "implicit/gbn2.xml"])
    with pytest.raises(UnsupportedForceError, match="CustomGBForce not recognised"):
        TorchForceField.from_openmm(gbn2)
    pme = openmm.System()
    pme.addParticle(1.0)
    nb = openmm.NonbondedForce()
    nb.addParticle(0.0, 0.3, 0.1)
    nb.setNonbondedMethod(openmm.NonbondedForce.PME)
    pme.addForce(nb)
    with pytest.raises(UnsupportedForceError, match="PME"):
        TorchForceField.from_openmm(pme)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clashes_give_no_nan(dtype, engine):
    """Overlapping atoms: huge finite energies (or +inf), finite forces, never NaN."""
    system, xyz = _case("ala2-obc1")
    ff = TorchForceField.from_openmm(system, engine=engine)
    x0 = torch.as_tensor(xyz[0])
    clashes = [x0.clone() for _ in range(4)]
    clashes[0][7] = clashes[0][3]  # two atoms on top of each other
    clashes[1][:] = clashes[1][0]  # every atom at one point
    clashes[2][12] = clashes[2][4] + 1e-7  # 1e-6 Å apart
    clashes[3][5:9] = clashes[3][5]  # a bonded group collapsed
    x = torch.stack(clashes).to(dtype)
    u, f = ff.energy_and_forces(x)
    assert not torch.isnan(u).any() and not torch.isnan(f).any()
    assert torch.isfinite(f).all()
    assert (u > 1e6).all()  # clashes are very improbable
    # gradients through energy() (the path samplers use) are NaN-free as well
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ff.energy(xg).sum(), xg)
    assert torch.isfinite(g).all()


def test_float32_close_to_float64():
    """float32: |ΔU| < 1e-2 kJ/mol and relative force RMS < 1e-4 on MD snapshots (measured
    ~8e-4 and ~2e-6)."""
    system, xyz = _case("kdea-obc1")
    ff = TorchForceField.from_openmm(system)
    x = torch.as_tensor(xyz[:3])
    u64, f64 = ff.energy_and_forces(x)
    u32, f32 = ff.energy_and_forces(x.float())
    assert u32.dtype == torch.float32 and f32.dtype == torch.float32
    assert (u32.double() - u64).abs().max() < 1e-2
    rel = (f32.double() - f64).square().mean().sqrt() / f64.square().mean().sqrt()
    assert rel < 1e-4


def test_autograd_path_is_twice_differentiable():
    """Hessian-vector product from autograd equals a central difference of the forces."""
    system, xyz = _case("ala2-obc1")
    ff = TorchForceField.from_openmm(system, engine="autograd")
    x = torch.as_tensor(xyz[:1]).clone().requires_grad_(True)
    v = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (g,) = torch.autograd.grad(ff.energy(x).sum(), x, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), x)
    h = 1e-6
    fd = (ff.forces(x.detach() - h * v) - ff.forces(x.detach() + h * v)) / (2 * h)
    assert torch.allclose(hv, fd, rtol=1e-5, atol=1e-3)


def test_chunked_evaluation_equals_unchunked():
    system, xyz = _case("ala2-obc1")
    x = torch.as_tensor(xyz)
    full = TorchForceField.from_openmm(system).energy_and_forces(x)
    tiny = TorchForceField.from_openmm(system, max_pairs_per_chunk=2 * 22 * 22).energy_and_forces(x)
    assert torch.allclose(full[0], tiny[0], rtol=0, atol=1e-9)
    assert torch.allclose(full[1], tiny[1], rtol=0, atol=1e-9)


def test_linlogcut_is_identity_below_and_log_above():
    u = torch.tensor([-50.0, 10.0, 999.0, 1e4, 1e12, float("inf"), float("nan")], requires_grad=True)
    r = linlogcut(u, high=1e3, max=1e9)
    assert torch.equal(r[:3], u[:3].detach())
    assert r[3].item() == pytest.approx(1e3 + np.log1p(9e3))
    assert r[4].item() == pytest.approx(1e3 + np.log1p(1e9 - 1e3))
    assert torch.isfinite(r).all()
    (g,) = torch.autograd.grad(r.sum(), u)
    assert torch.isfinite(g).all() and g[0] == 1.0 and g[3].item() == pytest.approx(1 / (1 + 9e3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["ala2-obc1", "kdea-obc1"])
def test_cuda_matches_cpu(case):
    if case.startswith("kdea"):
        pytest.importorskip("rdkit")  # KDEA is built by RDKit
    system, xyz = _case(case)
    ff = TorchForceField.from_openmm(system)
    x = torch.as_tensor(xyz)
    u, f = ff.energy_and_forces(x)
    uc, fc = ff.to("cuda").energy_and_forces(x.cuda())
    assert (uc.cpu() - u).abs().max() < 1e-6
    assert (fc.cpu() - f).abs().max() < 1e-5
