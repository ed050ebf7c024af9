r"""Batched Langevin dynamics over many replicas on the batched torch energy, with optional
replica exchange (parallel tempering).

OpenMM integrates one configuration at a time; :class:`~mcsample.systems.forcefield.TorchForceField`
evaluates thousands at once. :func:`run_langevin` integrates the Langevin equation

.. math:: dx = v\,dt,\qquad m\,dv = -\nabla U(x)\,dt - \gamma m v\,dt + \sqrt{2\gamma m k_BT}\,dW

for ``R`` independent replicas ``(R, n, 3)`` (nm) in one energy call per step, with the BAOAB
splitting of Leimkuhler & Matthews (Appl. Math. Res. Express 2013; J. Chem. Phys. 138, 174102,
2013), :math:`h` the timestep:

.. math::
   \mathrm B:\ v \leftarrow v + \tfrac h2 F(x)/m,\quad
   \mathrm A:\ x \leftarrow x + \tfrac h2 v,\quad
   \mathrm O:\ v \leftarrow e^{-\gamma h} v + \sqrt{(1-e^{-2\gamma h})\,k_BT/m}\;\xi,\quad
   \mathrm A,\ \mathrm B,

:math:`\xi\sim\mathcal N(0, I)`, one force evaluation per step (the last kick's force is the next
step's first). Its configurations sample :math:`\exp(-U/k_BT)` up to an :math:`O(h^2)` error
with a small constant (exactly for harmonic :math:`U`); OpenMM's ``LangevinMiddleIntegrator``
(Zhang et al., J. Phys. Chem. A 2019) is the same scheme with the two half kicks of
consecutive steps merged (velocities kept half a step apart), so both sample the same positions.
With friction 0 it is velocity Verlet (energy-conserving to :math:`O(h^2)`).

Units are OpenMM's: nm, ps, K, kJ/mol, masses in g/mol (Dalton) from the OpenMM ``System``, the
timestep in fs and the friction in 1/ps; ``log_prob = -U/kT``. No constraints (the project's
Systems have none). When the System has a ``CMMotionRemover`` the centre-of-mass velocity is
removed after every O step, as OpenMM does; the energy is translation invariant, so this changes
nothing in the sampled internal coordinates.

:func:`run_langevin_pt` runs ``K`` temperatures times ``W`` walkers, all ``K·W`` replicas in one
energy call per step; every ``exchange_interval_ps`` each walker proposes swaps between
neighbouring temperatures (even pairs, then odd pairs, alternating), accepted with probability
:math:`\min\{1, e^{(\beta_i-\beta_j)(U_i-U_j)}\}` (Swendsen & Wang 1986; Sugita & Okamoto 1999);
swapped configurations keep their velocities rescaled by :math:`\sqrt{T_\mathrm{new}/T_\mathrm{old}}`.
Frames are recorded at the first (target) temperature.

Blow-ups (non-finite positions or energies, or energies above ``max_energy``) raise
:class:`BlowUpError` naming the replicas, the step and their temperature. Randomness comes from
``generator`` (a ``torch.Generator`` on the positions' device): the initial Maxwell velocities,
the O steps and the swap decisions. Nothing leaves the device inside the loop but one check
per recorded frame.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mcsample.protocols import check_generator

__all__ = [
    "BlowUpError",
    "LangevinResult",
    "run_langevin",
    "run_langevin_pt",
    "geometric_temperatures",
    "maxwell_velocities",
    "masses_of",
    "block_stderr",
]

_R_KJ = 0.00831446261815324  # k_B N_A in kJ/(mol K), OpenMM's value


class BlowUpError(FloatingPointError, ValueError):
    """Non-finite positions or energies, or energies above ``max_energy``, in some replicas
    (timestep too large, a clash in the start structure)."""


# --------------------------------------------------------------------------------------------
# helpers


def masses_of(system, hydrogen_mass: float | None = None) -> np.ndarray:
    """Particle masses (g/mol, float64 ``(n,)``) of an OpenMM ``System``.

    ``hydrogen_mass`` (g/mol) repartitions mass as OpenMM's ``createSystem(hydrogenMass=...)``
    does: each hydrogen gets that mass and its bonded partner loses the difference (bonds read
    from the System's ``HarmonicBondForce``). Masses do not enter :math:`\\exp(-U/kT)` over
    positions, so the sampled configurations are unchanged; heavier hydrogens allow a longer
    timestep (Feenstra, Hess & Berendsen, J. Comput. Chem. 1999).
    """
    n = system.getNumParticles()
    m = np.array([system.getParticleMass(i)._value for i in range(n)], dtype=np.float64)
    if np.any(m <= 0):
        raise ValueError(
            f"particles {np.flatnonzero(m <= 0).tolist()} have zero mass (fixed "
            "particles are not supported by the Langevin integrator)"
        )
    if hydrogen_mass is not None:
        import openmm

        hydrogen = np.abs(m - 1.008) < 0.1
        for force in system.getForces():
            if isinstance(force, openmm.HarmonicBondForce):
                for b in range(force.getNumBonds()):
                    i, j, *_ = force.getBondParameters(b)
                    for h, heavy in ((i, j), (j, i)):
                        if hydrogen[h] and not hydrogen[heavy]:
                            delta = float(hydrogen_mass) - m[h]
                            m[h] += delta
                            m[heavy] -= delta
        if np.any(m <= 0):
            raise ValueError(
                f"hydrogen_mass={hydrogen_mass} leaves atoms {np.flatnonzero(m <= 0).tolist()} without mass"
            )
    return m


def geometric_temperatures(t_min: float, t_max: float, num: int) -> list[float]:
    r"""A geometric ladder :math:`T_k = T_{min}(T_{max}/T_{min})^{k/(K-1)}`, :math:`k=0..K-1`:
    constant :math:`\beta_k/\beta_{k+1}`, the usual choice for a roughly constant heat capacity
    (Kofke, J. Chem. Phys. 2002)."""
    if num < 2 or not (0 < t_min < t_max):
        raise ValueError(f"need num >= 2 and 0 < t_min < t_max; got {num}, {t_min}, {t_max}")
    return [float(t_min * (t_max / t_min) ** (k / (num - 1))) for k in range(num)]


def maxwell_velocities(masses: Tensor, kT: Tensor, num: int, generator=None, remove_com: bool = False) -> Tensor:
    r"""Maxwell-Boltzmann velocities :math:`v_{ri}\sim\mathcal N(0, k_BT_r/m_i\,I_3)` (nm/ps),
    ``(num, n, 3)``, in ``masses``' dtype and device; ``kT`` (kJ/mol) is a scalar or ``(num,)``.
    ``remove_com`` subtracts each replica's centre-of-mass velocity."""
    kT = torch.as_tensor(kT, dtype=masses.dtype, device=masses.device).reshape(-1, 1, 1)
    z = torch.randn((num, masses.shape[0], 3), generator=generator, dtype=masses.dtype, device=masses.device)
    v = z * torch.sqrt(kT / masses[None, :, None])
    return _remove_com(v, masses) if remove_com else v


def _remove_com(v: Tensor, masses: Tensor) -> Tensor:
    m = masses[None, :, None]
    return v - (m * v).sum(1, keepdim=True) / masses.sum()


def block_stderr(series, num_blocks: int = 20) -> tuple[float, float]:
    r"""Mean of a correlated time series and its block-averaged standard error
    (Flyvbjerg & Petersen, J. Chem. Phys. 1989): the series is cut into ``num_blocks``
    contiguous blocks and :math:`\mathrm{se} = \mathrm{sd}(\bar a_b)/\sqrt{B}`; blocks longer
    than the correlation time make the block means independent."""
    a = np.asarray(series, dtype=np.float64).reshape(-1)
    b = min(int(num_blocks), a.size)
    if b < 2:
        return float(a.mean()), math.nan
    n = (a.size // b) * b
    means = a[a.size - n :].reshape(b, -1).mean(1)
    return float(a.mean()), float(means.std(ddof=1) / math.sqrt(b))


# --------------------------------------------------------------------------------------------
# results


@dataclass
class LangevinResult:
    r"""Frames of a batched Langevin (or parallel-tempering) run.

    ``positions``: ``(F, R, n, 3)`` nm (``frame_dtype``, CPU), frame-major: ``positions[f, r]``
    is replica ``r`` at ``time_ps[f]``; ``energies``: ``(F, R)`` float64 kJ/mol
    (``log_prob = -U/kT``); ``temperature``: K of the recorded frames; ``topology``: mdtraj
    (``None`` for non-peptide systems); ``final_positions``/``final_velocities``: ``(R, n, 3)``
    of the last step, to continue a run. Parallel tempering adds ``temperatures`` ``(K,)``,
    ``acceptance`` ``(K-1,)`` (swap acceptance of each neighbour pair),
    ``state_energies`` ``(F, K, W)`` and ``walker_at_state`` ``(F, K, W)`` (which configuration
    lineage, labelled by its starting temperature, each temperature held). ``metadata``:
    settings, seed, masses, timing.
    """

    positions: Tensor
    energies: Tensor
    time_ps: np.ndarray
    temperature: float
    topology: object = None
    final_positions: Tensor | None = None
    final_velocities: Tensor | None = None
    metadata: dict = field(default_factory=dict)
    temperatures: np.ndarray | None = None
    acceptance: np.ndarray | None = None
    state_energies: Tensor | None = None
    walker_at_state: Tensor | None = None

    @property
    def num_frames(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_replicas(self) -> int:
        return int(self.positions.shape[1])

    def samples(self, discard_ps: float = 0.0) -> Tensor:
        """All recorded configurations after ``discard_ps``, ``(F'·R, n, 3)`` (frame-major)."""
        keep = torch.as_tensor(self.time_ps > discard_ps + 1e-9)
        x = self.positions[keep]
        return x.reshape(-1, *x.shape[2:])

    def mean_energy(self, discard_ps: float = 0.0) -> tuple[float, float]:
        """:math:`\\langle U\\rangle` (kJ/mol) and its standard error: the replicas are
        independent, so the error is the spread of the per-replica time averages over
        :math:`\\sqrt R`; with one replica, block averaging over time (:func:`block_stderr`)."""
        keep = torch.as_tensor(self.time_ps > discard_ps + 1e-9)
        u = self.energies[keep].numpy()
        if u.shape[1] == 1:
            return block_stderr(u[:, 0])
        per = u.mean(0)
        return float(per.mean()), float(per.std(ddof=1) / math.sqrt(per.size))

    def trajectory(self, replica: int | None = None):
        """An ``mdtraj.Trajectory``: one replica in time order, or (``None``) every frame of
        every replica, frame-major (times repeat)."""
        import mdtraj

        if self.topology is None:
            raise ValueError("this run has no topology (not a peptide)")
        if replica is None:
            xyz = self.positions.reshape(-1, *self.positions.shape[2:])
            t = np.repeat(self.time_ps, self.num_replicas)
        else:
            xyz, t = self.positions[:, int(replica)], self.time_ps
        return mdtraj.Trajectory(xyz.to(torch.float32).numpy(), self.topology, time=t)


# --------------------------------------------------------------------------------------------
# the system: energy, forces, masses


class _Model:
    """What the integrator needs: ``energy_and_forces``, masses, start positions, topology."""

    def __init__(self, target, masses, hydrogen_mass, remove_com_motion):
        system = getattr(target, "system", None)
        if masses is None:
            if system is not None:
                masses = masses_of(system, hydrogen_mass)
            elif hasattr(target, "masses"):
                masses = target.masses
            else:
                raise ValueError("no masses: pass masses= (g/mol) or a target with an OpenMM system")
        elif hydrogen_mass is not None:
            raise ValueError("pass masses= or hydrogen_mass=, not both")
        self.masses = torch.as_tensor(np.asarray(masses, dtype=np.float64))
        if hasattr(target, "_forcefield_for"):  # a Peptide: its batched torch energy
            self.energy_and_forces = lambda x: target._forcefield_for(x).energy_and_forces(x)
        elif hasattr(target, "energy_and_forces"):
            self.energy_and_forces = target.energy_and_forces
        else:
            raise TypeError(f"{type(target).__name__} has no energy_and_forces(x) and is not a Peptide")
        self.positions = getattr(target, "positions", None)
        self.topology = getattr(target, "topology", None)
        self.name = str(getattr(target, "name", type(target).__name__))
        self.default_temperature = getattr(target, "temperature", None)
        if remove_com_motion is None:
            remove_com_motion = False
            if system is not None:
                import openmm

                remove_com_motion = any(isinstance(f, openmm.CMMotionRemover) for f in system.getForces())
        self.remove_com = bool(remove_com_motion)
        self.system_sha256 = None
        if system is not None:
            import hashlib

            import openmm

            self.system_sha256 = hashlib.sha256(openmm.XmlSerializer.serialize(system).encode()).hexdigest()[:16]


def _start(model: _Model, positions, num: int, dtype, device) -> Tensor:
    pos = model.positions if positions is None else positions
    if pos is None:
        raise ValueError("no start positions: pass positions=")
    x = torch.as_tensor(pos).to(device=device, dtype=dtype)
    if x.dim() == 2:
        x = x.expand(num, *x.shape)
    if x.dim() != 3 or x.shape[0] != num or x.shape[1:] != (model.masses.shape[0], 3):
        raise ValueError(
            f"positions have shape {tuple(x.shape)}; expected ({model.masses.shape[0]}, 3) "
            f"or ({num}, {model.masses.shape[0]}, 3)"
        )
    return x.clone().contiguous()


def _check_generator(generator, device) -> None:
    check_generator(generator)
    if generator is None:
        return
    if torch.device(generator.device).type != torch.device(device).type:
        raise ValueError(
            f"the generator is on {generator.device} but the replicas are on {device}: "
            f"pass torch.Generator(device={str(device)!r})"
        )


# --------------------------------------------------------------------------------------------
# the integrator


class _BAOAB:
    """BAOAB steps for a batch of replicas with per-replica temperatures (module docstring)."""

    def __init__(
        self,
        model: _Model,
        kT: Tensor,
        timestep_fs: float,
        friction_per_ps: float,
        dtype,
        device,
        generator,
        max_energy: float = math.inf,
    ):
        self.model, self.generator = model, generator
        self.max_energy = float(max_energy)
        self.m = model.masses.to(device=device, dtype=dtype)
        self.inv_m = (1.0 / self.m)[None, :, None]
        self.h = float(timestep_fs) / 1000.0
        if not self.h > 0:
            raise ValueError(f"timestep_fs must be positive, got {timestep_fs}")
        if friction_per_ps < 0:
            raise ValueError(f"friction_per_ps must be >= 0, got {friction_per_ps}")
        self.a = math.exp(-float(friction_per_ps) * self.h)
        self.set_kT(kT)

    def set_kT(self, kT: Tensor) -> None:
        self.kT = kT.to(self.m)
        self.sigma = torch.sqrt((1.0 - self.a**2) * self.kT[:, None, None] * self.inv_m)

    def forces(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u, f = self.model.energy_and_forces(x)
        return u.to(torch.float64), f.to(x.dtype)

    def steps(self, x, v, f, u, n: int, bad: Tensor, step0: int):
        half = 0.5 * self.h
        kick = half * self.inv_m
        for k in range(n):
            v = torch.addcmul(v, f, kick)  # B
            x = torch.add(x, v, alpha=half)  # A
            if self.a < 1.0:  # O
                xi = torch.randn(x.shape, generator=self.generator, dtype=x.dtype, device=x.device)
                v = torch.addcmul(v * self.a, self.sigma, xi)
                if self.model.remove_com:
                    v = _remove_com(v, self.m)
            x = torch.add(x, v, alpha=half)  # A
            u, f = self.forces(x)
            v = torch.addcmul(v, f, kick)  # B
            ok = (u < self.max_energy) & torch.isfinite(x.sum((1, 2)))  # False for NaN too
            bad = torch.where(ok | (bad >= 0), bad, torch.full_like(bad, step0 + k + 1))
        return x, v, f, u, bad


def _raise_if_blown_up(bad: Tensor, kT: Tensor, timestep_fs: float, max_energy: float) -> None:
    if bool((bad >= 0).any()):
        idx = torch.nonzero(bad >= 0).flatten().cpu()
        first = int(bad[idx].min())
        temps = sorted({round(float(t) / _R_KJ, 1) for t in kT[idx].cpu()})
        shown = idx[:10].tolist()
        raise BlowUpError(
            f"Langevin dynamics blew up: {idx.numel()} replica(s) {shown}"
            f"{' ...' if idx.numel() > 10 else ''} have non-finite positions or energies (or "
            f"energies above max_energy={max_energy:g} kJ/mol), the first at step {first} "
            f"(temperature(s) {temps} K, timestep {timestep_fs} fs); use a smaller timestep, "
            "minimize the start structure, or check the system"
        )


def _seed_meta(generator) -> dict:
    return {"generator_initial_seed": int(generator.initial_seed())} if generator is not None else {}


def _steps_of(ps: float, timestep_fs: float, what: str) -> int:
    n = int(round(float(ps) * 1000.0 / float(timestep_fs)))
    if n < 0:
        raise ValueError(f"{what} must be >= 0, got {ps}")
    return n


def _run(
    model: _Model,
    kT_rows: Tensor,
    num_frames: int,
    report_steps: int,
    eq_steps: int,
    timestep_fs: float,
    friction_per_ps: float,
    x: Tensor,
    v: Tensor | None,
    generator,
    frame_dtype,
    progress: bool,
    desc: str,
    max_energy: float,
    exchange=None,
    record_rows=None,
):
    """The driver: equilibration, then ``num_frames`` blocks of ``report_steps`` steps, each
    followed by a frame of the rows ``record_rows`` (all if ``None``); ``exchange(x, v, f, u)``
    (parallel tempering) runs every ``exchange.every`` steps and returns the permuted state."""
    dtype, device = x.dtype, x.device
    integ = _BAOAB(model, kT_rows, timestep_fs, friction_per_ps, dtype, device, generator, max_energy)
    if v is None:
        v = maxwell_velocities(integ.m, integ.kT, x.shape[0], generator, model.remove_com)
    else:
        v = torch.as_tensor(v).to(device=device, dtype=dtype).clone()
        if v.shape != x.shape:
            raise ValueError(f"velocities have shape {tuple(v.shape)}; expected {tuple(x.shape)}")
    u, f = integ.forces(x)
    bad = torch.full((x.shape[0],), -1, dtype=torch.long, device=device)
    bad = torch.where((u < max_energy) & torch.isfinite(x.sum((1, 2))), bad, torch.zeros_like(bad))
    _raise_if_blown_up(bad, integ.kT, timestep_fs, max_energy)
    rows = slice(None) if record_rows is None else record_rows
    n_rec = x.shape[0] if record_rows is None else len(range(*record_rows.indices(x.shape[0])))
    frames = torch.empty((num_frames, n_rec, *x.shape[1:]), dtype=frame_dtype, device=device)
    energies = torch.empty((num_frames, n_rec), dtype=torch.float64, device=device)
    extra_frames = []
    every = exchange.every if exchange is not None else None

    def advance(x, v, f, u, bad, n, step):
        if every is None:
            x, v, f, u, bad = integ.steps(x, v, f, u, n, bad, step)
            return x, v, f, u, bad, step + n
        while n > 0:
            k = min(n, every - step % every)
            x, v, f, u, bad = integ.steps(x, v, f, u, k, bad, step)
            step, n = step + k, n - k
            if step % every == 0:
                x, v, f, u = exchange(x, v, f, u)
        return x, v, f, u, bad, step

    t0 = time.perf_counter()
    step = 0
    total = eq_steps + num_frames * report_steps
    bar = tqdm(total=total, disable=not progress, desc=desc, unit="step", mininterval=1.0)
    with bar:
        while step < eq_steps:  # unrecorded, in report-sized chunks
            n = min(report_steps, eq_steps - step)
            x, v, f, u, bad, step = advance(x, v, f, u, bad, n, step)
            _raise_if_blown_up(bad, integ.kT, timestep_fs, max_energy)
            bar.update(n)
        for i in range(num_frames):
            x, v, f, u, bad, step = advance(x, v, f, u, bad, report_steps, step)
            _raise_if_blown_up(bad, integ.kT, timestep_fs, max_energy)
            frames[i] = x[rows].to(frame_dtype)
            energies[i] = u[rows]
            if exchange is not None:
                extra_frames.append(exchange.record(u))
            bar.update(report_steps)
    wall = time.perf_counter() - t0
    times = report_steps * np.arange(1, num_frames + 1) * (float(timestep_fs) / 1000.0)
    return frames.cpu(), energies.cpu(), times, x, v, wall, step, extra_frames


def _settings(
    model,
    timestep_fs,
    friction_per_ps,
    report_steps,
    eq_steps,
    dtype,
    frame_dtype,
    num_replicas,
    generator,
    hydrogen_mass,
    masses_given,
):
    return {
        "integrator": "BAOAB (Leimkuhler & Matthews 2013), batched torch",
        "system": model.name,
        "system_sha256": model.system_sha256,
        "timestep_fs": float(timestep_fs),
        "friction_per_ps": float(friction_per_ps),
        "report_interval_ps": report_steps * float(timestep_fs) / 1000.0,
        "equilibration_ps": eq_steps * float(timestep_fs) / 1000.0,
        "num_replicas": int(num_replicas),
        "dtype": str(dtype).replace("torch.", ""),
        "frame_dtype": str(frame_dtype).replace("torch.", ""),
        "hydrogen_mass": hydrogen_mass,
        "masses": "given" if masses_given else ("repartitioned" if hydrogen_mass else "OpenMM System"),
        "remove_com_motion": model.remove_com,
        "torch_version": torch.__version__,
        **_seed_meta(generator),
    }


def run_langevin(
    target,
    num_replicas: int,
    time_ps: float,
    temperature: float | None = None,
    timestep_fs: float = 1.0,
    friction_per_ps: float = 1.0,
    report_interval_ps: float = 0.1,
    generator: torch.Generator | None = None,
    progress: bool = True,
    *,
    equilibration_ps: float = 0.0,
    positions=None,
    velocities=None,
    dtype: torch.dtype = torch.float64,
    device=None,
    frame_dtype: torch.dtype = torch.float32,
    masses=None,
    hydrogen_mass: float | None = None,
    remove_com_motion: bool | None = None,
    max_energy: float = 1e8,
) -> LangevinResult:
    r"""Langevin dynamics (BAOAB) of ``num_replicas`` independent replicas, batched.

    Samples :math:`\propto\exp(-U/k_BT)` per replica up to the :math:`O(h^2)` splitting error
    (module docstring; Leimkuhler & Matthews 2013).

    Args:
        target: a :class:`~mcsample.systems.peptides.Peptide` (masses from its OpenMM System,
            energy and forces from its batched torch force field on the positions' device), or
            any object with ``energy_and_forces(x) -> (U (R,), F (R, n, 3))``, ``masses``
            ``(n,)`` g/mol and ``positions`` ``(n, 3)`` nm.
        num_replicas: R, integrated together (one energy call per step).
        time_ps: recorded time after ``equilibration_ps``.
        temperature: K (default: the target's).
        timestep_fs, friction_per_ps: 1 fs and 1/ps by default (no constraints).
        report_interval_ps: one frame of every replica every this many ps.
        generator: ``torch.Generator`` on the positions' device (velocities and noise).
        equilibration_ps: unrecorded dynamics first, from ``positions`` with independent
            Maxwell velocities per replica (how replicas forget a common start).
        positions: ``(n, 3)`` (shared) or ``(R, n, 3)`` nm; default the target's (minimized).
        velocities: ``(R, n, 3)`` nm/ps to continue a run (default: Maxwell at ``temperature``).
        dtype: float64 or float32 positions and velocities; ``device``: where they live
            (default: ``positions``' device, else CPU).
        frame_dtype: storage of the frames (float32, float16 or float64).
        masses, hydrogen_mass: override the System's masses, or repartition hydrogen mass
            (:func:`masses_of`); neither changes the sampled configurations.
        remove_com_motion: zero the centre-of-mass velocity after each O step (default: when
            the System has a ``CMMotionRemover``, as OpenMM).
        max_energy: kJ/mol; a replica above it counts as blown up (a thermal peptide stays
            within a few thousand kJ/mol of its minimum).

    Returns:
        :class:`LangevinResult`, ``positions`` ``(F, R, n, 3)``, ``energies`` ``(F, R)``.

    Raises:
        BlowUpError: non-finite energies or positions, naming the replicas and the step.
    """
    model = _Model(target, masses, hydrogen_mass, remove_com_motion)
    temperature = model.default_temperature if temperature is None else temperature
    if temperature is None or not float(temperature) > 0:
        raise ValueError(f"temperature must be a positive number of kelvin (the target has none), got {temperature!r}")
    temperature = float(temperature)
    if device is None:
        device = positions.device if isinstance(positions, Tensor) else "cpu"
    _check_generator(generator, device)
    report_steps = _steps_of(report_interval_ps, timestep_fs, "report_interval_ps")
    if report_steps < 1:
        raise ValueError(f"report_interval_ps={report_interval_ps} is shorter than one step")
    num_frames = _steps_of(time_ps, timestep_fs, "time_ps") // report_steps
    eq_steps = _steps_of(equilibration_ps, timestep_fs, "equilibration_ps")
    x = _start(model, positions, int(num_replicas), dtype, device)
    kT = torch.full((x.shape[0],), _R_KJ * temperature, dtype=torch.float64, device=device)
    frames, energies, times, xf, vf, wall, steps, _ = _run(
        model,
        kT,
        num_frames,
        report_steps,
        eq_steps,
        timestep_fs,
        friction_per_ps,
        x,
        velocities,
        generator,
        frame_dtype,
        progress,
        f"Langevin {model.name} {temperature:g} K x{x.shape[0]}",
        max_energy,
    )
    meta = _settings(
        model,
        timestep_fs,
        friction_per_ps,
        report_steps,
        eq_steps,
        dtype,
        frame_dtype,
        x.shape[0],
        generator,
        hydrogen_mass,
        masses is not None,
    )
    meta.update(
        {
            "kind": "batched_langevin",
            "temperature_K": temperature,
            "steps": steps,
            "time_ps": float(times[-1]) if len(times) else 0.0,
            "wall_time_s": wall,
            "replica_steps_per_s": steps * x.shape[0] / max(wall, 1e-9),
            "device": str(device),
        }
    )
    return LangevinResult(frames, energies, times, temperature, model.topology, xf.detach(), vf.detach(), meta)


class _Exchange:
    """Neighbour swaps of parallel tempering over ``K`` temperatures x ``W`` walkers; rows are
    ``k * W + w``. Even pairs then odd pairs, alternating, every ``every`` steps."""

    def __init__(self, temps: Tensor, walkers: int, every: int, generator):
        self.K, self.W, self.every, self.generator = temps.numel(), walkers, every, generator
        self.beta = 1.0 / (_R_KJ * temps)  # (K,) float64
        self.T_rows = temps.repeat_interleave(walkers)
        self.count = 0
        dev = temps.device
        self.accepted = torch.zeros(self.K - 1, dtype=torch.float64, device=dev)
        self.attempts = torch.zeros(self.K - 1, dtype=torch.float64, device=dev)
        self.label = torch.arange(self.K, device=dev).repeat_interleave(walkers)  # lineage
        self.base = torch.arange(self.K * walkers, device=dev).reshape(self.K, walkers)

    def __call__(self, x, v, f, u):
        K, W = self.K, self.W
        first = self.count % 2
        self.count += 1
        s = torch.arange(first, K - 1, 2, device=x.device)
        if s.numel() == 0:
            return x, v, f, u
        uk = u.reshape(K, W)
        log_a = (self.beta[s] - self.beta[s + 1])[:, None] * (uk[s] - uk[s + 1])  # (P, W)
        r = torch.rand(log_a.shape, generator=self.generator, dtype=torch.float64, device=x.device)
        acc = torch.log(r) < log_a
        self.accepted[s] += acc.sum(1).to(torch.float64)
        self.attempts[s] += W
        src = self.base.clone()
        src[s] = torch.where(acc, self.base[s + 1], self.base[s])
        src[s + 1] = torch.where(acc, self.base[s], self.base[s + 1])
        src = src.reshape(-1)
        scale = torch.sqrt(self.T_rows / self.T_rows[src])
        x, f, u = x[src], f[src], u[src]
        v = v[src] * scale.to(v.dtype)[:, None, None]
        self.label = self.label[src]
        return x, v, f, u

    def record(self, u):
        return u.reshape(self.K, self.W).clone(), self.label.reshape(self.K, self.W).clone()


def run_langevin_pt(
    target,
    temperatures,
    num_walkers: int,
    time_ps: float,
    exchange_interval_ps: float = 0.1,
    timestep_fs: float = 1.0,
    friction_per_ps: float = 1.0,
    report_interval_ps: float = 0.1,
    generator: torch.Generator | None = None,
    progress: bool = True,
    *,
    equilibration_ps: float = 0.0,
    positions=None,
    velocities=None,
    dtype: torch.dtype = torch.float64,
    device=None,
    frame_dtype: torch.dtype = torch.float32,
    masses=None,
    hydrogen_mass: float | None = None,
    remove_com_motion: bool | None = None,
    max_energy: float = 1e8,
) -> LangevinResult:
    r"""Parallel tempering: ``num_walkers`` independent replica-exchange chains over
    ``temperatures`` (ascending, K; the first is the target), all ``K·W`` replicas in one
    energy call per step.

    Every ``exchange_interval_ps`` each walker proposes swaps of neighbouring temperatures,
    accepted with :math:`\min\{1, e^{(\beta_i-\beta_j)(U_i-U_j)}\}`, velocities rescaled by
    :math:`\sqrt{T_\mathrm{new}/T_\mathrm{old}}` (Sugita & Okamoto 1999); between exchanges
    BAOAB at each replica's temperature (module docstring). Frames of the W configurations at
    ``temperatures[0]`` every ``report_interval_ps`` (a multiple of the exchange interval).
    ``positions``: ``(n, 3)`` or ``(K·W, n, 3)`` (row ``k·W + w`` starts at temperature k).
    Other arguments as :func:`run_langevin`.

    Returns:
        :class:`LangevinResult` at ``temperatures[0]`` (``positions`` ``(F, W, n, 3)``) with
        ``temperatures``, ``acceptance``, ``state_energies`` and ``walker_at_state``.
    """
    model = _Model(target, masses, hydrogen_mass, remove_com_motion)
    temps = np.asarray(temperatures, dtype=np.float64)
    if temps.ndim != 1 or temps.size < 2 or np.any(np.diff(temps) <= 0) or temps[0] <= 0:
        raise ValueError(f"temperatures must be at least two, positive and strictly increasing; got {temps.tolist()}")
    if device is None:
        device = positions.device if isinstance(positions, Tensor) else "cpu"
    _check_generator(generator, device)
    K, W = temps.size, int(num_walkers)
    if W < 1:
        raise ValueError(f"num_walkers must be >= 1, got {num_walkers}")
    ex_steps = _steps_of(exchange_interval_ps, timestep_fs, "exchange_interval_ps")
    report_steps = _steps_of(report_interval_ps, timestep_fs, "report_interval_ps")
    if ex_steps < 1 or report_steps < 1 or report_steps % ex_steps:
        raise ValueError(
            f"report_interval_ps={report_interval_ps} must be a positive multiple of "
            f"exchange_interval_ps={exchange_interval_ps} (both at least one step)"
        )
    num_frames = _steps_of(time_ps, timestep_fs, "time_ps") // report_steps
    eq_steps = _steps_of(equilibration_ps, timestep_fs, "equilibration_ps")
    x = _start(model, positions, K * W, dtype, device)
    t = torch.as_tensor(temps, device=device)
    kT_rows = (_R_KJ * t).repeat_interleave(W)
    exchange = _Exchange(t, W, ex_steps, generator)
    frames, energies, times, xf, vf, wall, steps, extra = _run(
        model,
        kT_rows,
        num_frames,
        report_steps,
        eq_steps,
        timestep_fs,
        friction_per_ps,
        x,
        velocities,
        generator,
        frame_dtype,
        progress,
        f"PT {model.name} {K}T x{W}",
        max_energy,
        exchange=exchange,
        record_rows=slice(0, W),
    )
    acceptance = (exchange.accepted / exchange.attempts.clamp(min=1)).cpu().numpy()
    state_e = torch.stack([e for e, _ in extra]).cpu() if extra else torch.empty(0, K, W)
    labels = torch.stack([lab for _, lab in extra]).cpu() if extra else torch.empty(0, K, W)
    meta = _settings(
        model,
        timestep_fs,
        friction_per_ps,
        report_steps,
        eq_steps,
        dtype,
        frame_dtype,
        K * W,
        generator,
        hydrogen_mass,
        masses is not None,
    )
    meta.update(
        {
            "kind": "batched_parallel_tempering",
            "temperature_K": float(temps[0]),
            "temperatures_K": temps.tolist(),
            "num_walkers": W,
            "exchange_interval_ps": ex_steps * float(timestep_fs) / 1000.0,
            "acceptance": acceptance.tolist(),
            "steps": steps,
            "time_ps": float(times[-1]) if len(times) else 0.0,
            "wall_time_s": wall,
            "replica_steps_per_s": steps * K * W / max(wall, 1e-9),
            "device": str(device),
        }
    )
    return LangevinResult(
        frames,
        energies,
        times,
        float(temps[0]),
        model.topology,
        xf.detach(),
        vf.detach(),
        meta,
        temperatures=temps,
        acceptance=acceptance,
        state_energies=state_e,
        walker_at_state=labels,
    )
