r"""Reference molecular dynamics with OpenMM: Langevin MD and parallel tempering.

**Langevin MD.** :func:`run_md` integrates the Langevin equation with OpenMM's
``LangevinMiddleIntegrator`` (the BAOAB-type "middle" splitting of Zhang et al., J. Phys. Chem. A
2019), whose configurations sample :math:`\exp(-U/k_BT)` up to an :math:`O(\Delta t^2)`
discretization error; the reference data sets of the field use it with 1 fs steps and no
constraints (e.g. transferable-samplers, Timewarp). Every ``report_interval_ps`` a frame and its
potential energy (kJ/mol) are recorded. The result is an :class:`MDResult`: an
``mdtraj.Trajectory`` plus energies and the run's provenance.

**Files and resuming.** With ``path=...`` the run is written to a compressed ``.npz``
(:func:`save_npz`, atomically: a temporary name then ``os.replace``) at the end and every
``checkpoint_every_s`` seconds, including an OpenMM checkpoint (``Context.createCheckpoint``:
positions, velocities, step count and the integrator's random-number state) and, as a portable
fallback, the last positions and velocities. Calling :func:`run_md` again with the same ``path``
and a longer ``time_ps`` continues the run; on the same platform the continuation is the same
trajectory an uninterrupted run would have produced. A different System or integrator setting
raises instead of silently mixing runs.

**Parallel tempering** (replica exchange; Swendsen & Wang 1986, Sugita & Okamoto 1999).
:func:`run_parallel_tempering` runs one OpenMM Context per temperature
:math:`T_1 < \dots < T_K`; every ``exchange_interval_ps`` it proposes swaps of neighbouring
temperatures (even pairs, then odd pairs, alternating), accepted with probability
:math:`\min\{1, \exp[(\beta_i-\beta_j)(U_i-U_j)]\}`, where :math:`U_i` is the energy of the
configuration currently at temperature :math:`T_i`. An accepted swap exchanges the
temperatures of the two replicas' integrators and rescales their velocities by
:math:`\sqrt{T_\mathrm{new}/T_\mathrm{old}}` (Sugita & Okamoto), which keeps the Maxwell
distribution. Frames are recorded at the lowest (target) temperature. With ``path`` it saves
and resumes like :func:`run_md`: one OpenMM checkpoint per replica, the replica permutation,
the exchange counts and the swap RNG's state, so a continued run equals an uninterrupted one on
the same platform.

**Randomness.** Both take a ``generator`` (``torch.Generator``); one integer is drawn from it,
:math:`s\sim\mathcal U\{1,\dots,2^{31}-2\}`, and OpenMM's integrator and velocity seeds (and
the swap RNG of parallel tempering) are derived from :math:`s`, which the metadata records as
``seed``. ``generator=None`` draws :math:`s` from torch's global RNG (``torch.manual_seed``);
continuing a saved run without a generator keeps the run's recorded seed.

Units are OpenMM's: nm, ps, K, kJ/mol; ``log_prob = -U/kT``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from mcsample._optional import require
from mcsample.protocols import generator_or_seed

require("openmm", "mdtraj", extra="peptides")

__all__ = [
    "MDResult",
    "PTResult",
    "run_md",
    "run_parallel_tempering",
    "save_npz",
    "load_npz",
    "FORMAT_VERSION",
]

#: version of the ``.npz`` layout written by :func:`save_npz`
FORMAT_VERSION = 1
_R_KJ = 0.00831446261815324  # k_B N_A, kJ/(mol K), OpenMM's value


# --------------------------------------------------------------------------------------------
# results and the file format


@dataclass
class MDResult:
    """An MD (or parallel-tempering) trajectory with its energies and provenance.

    ``trajectory``: ``mdtraj.Trajectory`` (nm, time in ps); ``potential_energy``: ``(F,)``
    float64 kJ/mol; ``metadata``: force field, temperature, timestep, friction, seed, ...
    """

    trajectory: object
    potential_energy: np.ndarray
    metadata: dict = field(default_factory=dict)

    @property
    def energies(self) -> np.ndarray:
        """Alias of ``potential_energy`` (kJ/mol)."""
        return self.potential_energy

    @property
    def n_frames(self) -> int:
        return int(self.trajectory.n_frames)

    def save(self, path) -> None:
        """Write :func:`save_npz` (atomically)."""
        save_npz(path, self.trajectory, self.potential_energy, self.metadata)

    @classmethod
    def load(cls, path) -> MDResult:
        """Read a file written by :meth:`save` or :func:`run_md`."""
        traj, energy, meta, _ = load_npz(path)
        return cls(traj, energy, meta)


@dataclass
class PTResult(MDResult):
    """:class:`MDResult` at the target (lowest) temperature, plus the exchange statistics.

    ``acceptance``: ``(K-1,)`` swap acceptance rate of each neighbour pair;
    ``attempts``: ``(K-1,)`` attempts per pair; ``temperatures``: ``(K,)`` K;
    ``state_energies``: ``(F, K)`` potential energy at each temperature at each frame;
    ``replica_at_state``: ``(F, K)`` which replica held each temperature.
    """

    acceptance: np.ndarray = None
    attempts: np.ndarray = None
    temperatures: np.ndarray = None
    state_energies: np.ndarray = None
    replica_at_state: np.ndarray = None


def _topology_arrays(top) -> dict:
    atoms = list(top.atoms)
    return {
        "atom_name": np.array([a.name for a in atoms]),
        "atom_element": np.array([a.element.symbol if a.element is not None else "" for a in atoms]),
        "atom_residue": np.array([a.residue.index for a in atoms], dtype=np.int64),
        "residue_name": np.array([r.name for r in top.residues]),
        "residue_seq": np.array([r.resSeq for r in top.residues], dtype=np.int64),
        "residue_chain": np.array([r.chain.index for r in top.residues], dtype=np.int64),
        "bonds": np.array([[b[0].index, b[1].index] for b in top.bonds], dtype=np.int64).reshape(-1, 2),
    }


def _topology_from_arrays(d) -> object:
    import mdtraj as md

    top = md.Topology()
    chains = [top.add_chain() for _ in range(int(d["residue_chain"].max()) + 1)]
    residues = [
        top.add_residue(str(name), chains[int(c)], resSeq=int(seq))
        for name, seq, c in zip(d["residue_name"], d["residue_seq"], d["residue_chain"])
    ]
    atoms = []
    for name, el, r in zip(d["atom_name"], d["atom_element"], d["atom_residue"]):
        element = md.element.get_by_symbol(str(el)) if str(el) else md.element.virtual
        atoms.append(top.add_atom(str(name), element, residues[int(r)]))
    for i, j in d["bonds"]:
        top.add_bond(atoms[int(i)], atoms[int(j)])
    return top


def _atomic_savez(path, arrays: dict) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    os.replace(tmp, path)


def save_npz(path, trajectory, potential_energy, metadata: dict, extra: dict | None = None) -> None:
    """Write a trajectory to a compressed ``.npz``, atomically.

    Keys: ``xyz`` float32 ``(F, n, 3)`` nm; ``time_ps`` float64 ``(F,)``;
    ``potential_energy`` float64 ``(F,)`` kJ/mol; the topology as arrays ``atom_name``,
    ``atom_element``, ``atom_residue``, ``residue_name``, ``residue_seq``, ``residue_chain``,
    ``bonds`` ``(m, 2)``; ``metadata``: a JSON string (provenance); ``format_version``; plus
    ``extra`` arrays (the resume state of :func:`run_md`). No pickled objects.
    """
    arrays = {
        "xyz": np.asarray(trajectory.xyz, dtype=np.float32),
        "time_ps": np.asarray(trajectory.time, dtype=np.float64),
        "potential_energy": np.asarray(potential_energy, dtype=np.float64),
        "metadata": np.array(json.dumps(metadata, sort_keys=True)),
        "format_version": np.array(FORMAT_VERSION),
    }
    arrays.update(_topology_arrays(trajectory.topology))
    if extra:
        arrays.update(extra)
    _atomic_savez(path, arrays)


def load_npz(path):
    """Read :func:`save_npz`: ``(mdtraj.Trajectory, potential_energy, metadata, extra)``.

    ``extra`` holds the remaining arrays (e.g. the resume state).
    """
    import mdtraj as md

    with np.load(path, allow_pickle=False) as f:
        d = {k: f[k] for k in f.files}
    top = _topology_from_arrays(d)
    traj = md.Trajectory(d.pop("xyz"), top, time=d.pop("time_ps"))
    energy = d.pop("potential_energy")
    meta = json.loads(str(d.pop("metadata")))
    for k in (
        "atom_name",
        "atom_element",
        "atom_residue",
        "residue_name",
        "residue_seq",
        "residue_chain",
        "bonds",
        "format_version",
    ):
        d.pop(k, None)
    return traj, energy, meta, d


# --------------------------------------------------------------------------------------------
# helpers


def _trajectory(peptide, xyz: list, times: list):
    """The frames so far as an mdtraj Trajectory (float32 nm, times in ps)."""
    import mdtraj as md

    top = peptide.topology
    return md.Trajectory(
        np.asarray(xyz, dtype=np.float32).reshape(len(xyz), top.n_atoms, 3),
        top,
        time=np.asarray(times, dtype=np.float64),
    )


def _run_metadata(
    settings: dict, peptide, platform: str, n_frames: int, frame_ps: float, done: bool, wall: float, **more
) -> dict:
    """Provenance of a run so far: its settings plus system, platform, progress and timing."""
    import openmm

    meta = dict(settings)
    meta.update(
        {
            "force_field": _force_field_name(peptide),
            "system": getattr(peptide, "name", "peptide"),
            "platform": platform,
            "openmm_version": openmm.__version__,
            "n_frames": n_frames,
            "time_ps": n_frames * frame_ps,
            "complete": bool(done),
            "wall_time_s": wall,
            **more,
        }
    )
    return meta


class _Autosave:
    """Call ``save(done, wall_s)`` every ``every_s`` seconds (:meth:`tick`), on Ctrl-C (leaving
    the ``with`` block) and once complete (:meth:`finish`); ``save=None`` saves nothing.
    ``wall_s`` counts ``wall_before`` (earlier sessions of the run) plus the time since start."""

    def __init__(self, save, every_s: float, wall_before: float = 0.0):
        self.save, self.every_s, self.wall_before = save, every_s, wall_before
        self.start = self.last = time.perf_counter()

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.start

    def tick(self) -> None:
        if self.save is not None and time.perf_counter() - self.last > self.every_s:
            self.save(False, self.wall())
            self.last = time.perf_counter()

    def finish(self) -> float:
        wall = self.wall()
        if self.save is not None:
            self.save(True, wall)
        return wall

    def __enter__(self) -> _Autosave:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is KeyboardInterrupt and self.save is not None:
            self.save(False, self.wall())
        return False


def _load_same_run(path, settings: dict):
    """:func:`load_npz` of a run to continue, refusing one written with other ``settings``."""
    traj, energy, meta, extra = load_npz(path)
    for key, value in settings.items():
        if meta.get(key) != value:
            hint = "; generator=None continues it with its recorded seed" if key == "seed" else ""
            raise ValueError(
                f"{path} was written with {key}={meta.get(key)!r}, not {value!r}: refusing to "
                f"continue a different run (choose another path{hint})"
            )
    return traj, energy, meta, extra


def _system_hash(system) -> str:
    import openmm

    return hashlib.sha256(openmm.XmlSerializer.serialize(system).encode()).hexdigest()[:16]


def _run_seed(generator, seed, who: str) -> int | None:
    """The run's integer seed drawn from ``generator`` (``None``: torch's global RNG; returns
    ``None`` then, so that a resumed run may keep its recorded seed); ``seed`` is the deprecated
    integer alias, equivalent to ``generator=torch.Generator().manual_seed(seed)``."""
    generator = generator_or_seed(who, generator, seed)
    return None if generator is None else _draw_seed(generator)


def _draw_seed(generator=None) -> int:
    import torch

    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(1, 2**31 - 1, (), generator=generator, device=device))


def _settle_seed(drawn: int | None, path, kind: str) -> int:
    """The seed of this run: ``drawn`` (from the caller's generator), or, with no generator,
    the one recorded in ``path`` when continuing that run of ``kind``, else a fresh one from
    torch's global RNG."""
    if drawn is not None:
        return drawn
    if path is not None and os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as f:  # the metadata only, not the frames
                meta = json.loads(str(f["metadata"]))
        except Exception:  # unreadable: _load_same_run reports it
            meta = {}
        if meta.get("kind") == kind and "seed" in meta:
            return int(meta["seed"])
    return _draw_seed()


def _openmm_seed(seed: int, salt: int = 0) -> int:
    """A positive 31-bit seed for OpenMM (0 would mean 'pick a random one')."""
    return int(np.random.SeedSequence([int(seed), salt]).generate_state(1)[0] % (2**31 - 2)) + 1


def _make_context(system, temperature, timestep_fs, friction_per_ps, platform, threads, seed):
    import openmm
    import openmm.unit as unit

    integrator = openmm.LangevinMiddleIntegrator(
        temperature * unit.kelvin, friction_per_ps / unit.picosecond, timestep_fs * unit.femtosecond
    )
    integrator.setRandomNumberSeed(seed)
    plat = openmm.Platform.getPlatformByName(platform)
    props = {"Threads": str(int(threads))} if (platform == "CPU" and threads) else {}
    return openmm.Context(system, integrator, plat, props), integrator


def _positions_nm(positions) -> np.ndarray:
    if hasattr(positions, "detach"):
        positions = positions.detach().cpu().numpy()
    return np.asarray(positions, dtype=np.float64)


def _steps(time_ps: float, timestep_fs: float) -> int:
    return int(round(time_ps * 1000.0 / timestep_fs))


def _force_field_name(peptide) -> str:
    name = getattr(peptide, "name", "")
    if "alanine_dipeptide" in str(name):
        return "AMBER ff96 (openmmtools alanine dipeptide)"
    return ", ".join(sorted({type(f).__name__ for f in peptide.system.getForces()}))


# --------------------------------------------------------------------------------------------
# Langevin MD


def run_md(
    peptide,
    time_ps: float,
    temperature: float | None = None,
    timestep_fs: float = 1.0,
    friction_per_ps: float = 1.0,
    report_interval_ps: float = 1.0,
    generator=None,
    platform: str = "CPU",
    path=None,
    progress: bool = True,
    *,
    minimize: bool = True,
    positions=None,
    equilibration_ps: float = 0.0,
    threads: int | None = None,
    checkpoint_every_s: float = 60.0,
    seed: int | None = None,
) -> MDResult:
    r"""Langevin MD of ``peptide`` with OpenMM's ``LangevinMiddleIntegrator``.

    Samples :math:`\propto\exp(-U/k_BT)` (up to the :math:`O(\Delta t^2)` integrator bias).

    Args:
        peptide: has ``system`` (OpenMM), ``topology`` (mdtraj), ``positions`` ``(n, 3)`` nm,
            ``temperature``.
        time_ps: length of the production run (ps), after ``equilibration_ps``.
        temperature: K (default: the peptide's).
        timestep_fs, friction_per_ps: integrator settings (1 fs: no constraints, as the field).
        report_interval_ps: one frame (positions + potential energy) every this many ps.
        generator: ``torch.Generator``; seeds the initial Maxwell velocities and the
            integrator's noise (module docstring; ``None``: torch's global RNG). The seed used
            is recorded as ``metadata["seed"]``; continuing a run with ``path`` needs the same
            generator seed (or none).
        platform: OpenMM platform name ("CPU", "Reference", "CUDA", ...); ``threads`` for CPU.
        path: ``.npz`` file to save to and resume from (module docstring).
        progress: tqdm bar over frames.
        minimize: local energy minimization before the run (ignored when resuming).
        positions: start here instead of ``peptide.positions``.
        equilibration_ps: unrecorded MD before the first frame.
        checkpoint_every_s: wall-clock seconds between saves when ``path`` is given.
        seed: deprecated; ``generator=torch.Generator().manual_seed(seed)``.

    Returns:
        :class:`MDResult`; ``metadata`` has the settings, the number of steps, the wall time and
        a hash of the System.
    """
    import openmm
    import openmm.unit as unit

    seed = _settle_seed(_run_seed(generator, seed, "run_md"), path, "langevin_md")
    temperature = float(peptide.temperature if temperature is None else temperature)
    report_steps = _steps(report_interval_ps, timestep_fs)
    if report_steps < 1:
        raise ValueError(f"report_interval_ps={report_interval_ps} is shorter than one step ({timestep_fs} fs)")
    n_frames = _steps(time_ps, timestep_fs) // report_steps
    eq_steps = _steps(equilibration_ps, timestep_fs)
    settings = {
        "kind": "langevin_md",
        "integrator": "LangevinMiddleIntegrator",
        "temperature_K": temperature,
        "timestep_fs": float(timestep_fs),
        "friction_per_ps": float(friction_per_ps),
        "report_interval_ps": report_steps * timestep_fs / 1000.0,
        "equilibration_ps": eq_steps * timestep_fs / 1000.0,
        "seed": int(seed),
        "system_sha256": _system_hash(peptide.system),
        "n_atoms": int(peptide.system.getNumParticles()),
    }
    context, integrator = _make_context(
        peptide.system, temperature, timestep_fs, friction_per_ps, platform, threads, _openmm_seed(seed)
    )

    xyz: list[np.ndarray] = []
    energies: list[float] = []
    times: list[float] = []
    wall_before = 0.0
    resumed = False
    if path is not None and os.path.exists(path):
        traj, e_old, meta, extra = _load_same_run(path, settings)
        xyz = list(traj.xyz)
        energies = list(e_old)
        times = list(traj.time)
        wall_before = float(meta.get("wall_time_s", 0.0))
        try:
            context.loadCheckpoint(extra["checkpoint"].tobytes())
        except Exception as err:  # another platform or OpenMM version: restart from the state
            warnings.warn(
                f"OpenMM checkpoint in {path} not loadable ({err}); continuing from the "
                "saved positions and velocities with fresh random numbers",
                stacklevel=2,
            )
            context.setPositions(extra["last_positions"])
            context.setVelocities(extra["last_velocities"])
            context.setStepCount(int(extra["step"]))
            context.setTime(float(extra["step"]) * timestep_fs / 1000.0)
        resumed = True
    else:
        pos = _positions_nm(peptide.positions if positions is None else positions)
        context.setPositions(pos)
        if minimize:
            openmm.LocalEnergyMinimizer.minimize(context, 1.0, 0)
        context.setVelocitiesToTemperature(temperature * unit.kelvin, _openmm_seed(seed, 1))
        if eq_steps:
            integrator.step(eq_steps)
        context.setStepCount(0)
        context.setTime(0.0)

    def snapshot(done: bool, wall: float):
        state = context.getState(getPositions=True, getVelocities=True)
        meta = _run_metadata(
            settings,
            peptide,
            platform,
            len(xyz),
            report_steps * timestep_fs / 1000.0,
            done,
            wall,
            steps=int(context.getStepCount()),
        )
        return _trajectory(peptide, xyz, times), meta, state

    def save(done: bool, wall: float):
        traj, meta, state = snapshot(done, wall)
        extra = {
            "checkpoint": np.frombuffer(context.createCheckpoint(), dtype=np.uint8),
            "last_positions": state.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
            "last_velocities": state.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond),
            "step": np.array(int(context.getStepCount())),
        }
        save_npz(path, traj, np.asarray(energies, dtype=np.float64), meta, extra)

    autosave = _Autosave(save if path is not None else None, checkpoint_every_s, wall_before)
    bar = tqdm(
        total=n_frames,
        initial=min(len(xyz), n_frames),
        disable=not progress,
        desc=f"MD {getattr(peptide, 'name', '')} {temperature:g} K",
        unit="frame",
    )
    with bar, autosave:
        while len(xyz) < n_frames:
            integrator.step(report_steps)
            state = context.getState(getPositions=True, getEnergy=True)
            e = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            if not math.isfinite(e):
                raise FloatingPointError(
                    f"MD blew up at step {context.getStepCount()}: potential energy {e}; use a "
                    "smaller timestep or minimize first"
                )
            xyz.append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
            energies.append(e)
            times.append(context.getStepCount() * timestep_fs / 1000.0)
            bar.update(1)
            autosave.tick()
    wall = autosave.finish()
    traj, meta, _ = snapshot(True, wall)
    meta["resumed"] = resumed
    n_keep = n_frames
    return MDResult(traj[:n_keep], np.asarray(energies[:n_keep], dtype=np.float64), meta)


# --------------------------------------------------------------------------------------------
# parallel tempering


def run_parallel_tempering(
    peptide,
    temperatures,
    time_ps: float,
    exchange_interval_ps: float = 0.1,
    timestep_fs: float = 1.0,
    friction_per_ps: float = 1.0,
    report_interval_ps: float = 1.0,
    generator=None,
    platform: str = "CPU",
    path=None,
    progress: bool = True,
    *,
    minimize: bool = True,
    threads: int | None = None,
    checkpoint_every_s: float = 60.0,
    seed: int | None = None,
) -> PTResult:
    r"""Replica-exchange MD over ``temperatures`` (ascending; the first is the target).

    Neighbour swaps are accepted with :math:`\min\{1, e^{(\beta_i-\beta_j)(U_i-U_j)}\}`, with
    velocities rescaled by :math:`\sqrt{T_\mathrm{new}/T_\mathrm{old}}` (module docstring).
    ``report_interval_ps`` must be a multiple of ``exchange_interval_ps``. With ``path`` the
    run is saved atomically every ``checkpoint_every_s`` seconds, on Ctrl-C and at the end
    (frames so far, one OpenMM checkpoint per replica, the replica permutation, the exchange
    counts and the swap RNG's state); calling it again with the same ``path`` and settings
    continues the run (a larger ``time_ps`` extends it), as :func:`run_md` does.
    ``generator`` (``torch.Generator``) seeds the integrators, the initial velocities and the
    swaps, as in :func:`run_md` (``seed=`` is its deprecated integer alias).

    Returns:
        :class:`PTResult` at ``temperatures[0]`` with per-pair acceptance rates.
    """
    import openmm
    import openmm.unit as unit

    seed = _settle_seed(_run_seed(generator, seed, "run_parallel_tempering"), path, "parallel_tempering")
    temps = np.asarray(temperatures, dtype=np.float64)
    if temps.ndim != 1 or temps.size < 2 or np.any(np.diff(temps) <= 0):
        raise ValueError(f"temperatures must be at least two, strictly increasing; got {temps.tolist()}")
    K = temps.size
    beta = 1.0 / (_R_KJ * temps)
    ex_steps = _steps(exchange_interval_ps, timestep_fs)
    rep_steps = _steps(report_interval_ps, timestep_fs)
    if ex_steps < 1 or rep_steps % ex_steps != 0:
        raise ValueError(
            f"report_interval_ps={report_interval_ps} must be a positive multiple of "
            f"exchange_interval_ps={exchange_interval_ps}"
        )
    per_report = rep_steps // ex_steps
    n_frames = _steps(time_ps, timestep_fs) // rep_steps
    settings = {
        "kind": "parallel_tempering",
        "integrator": "LangevinMiddleIntegrator",
        "temperature_K": float(temps[0]),
        "temperatures_K": temps.tolist(),
        "timestep_fs": float(timestep_fs),
        "friction_per_ps": float(friction_per_ps),
        "report_interval_ps": rep_steps * timestep_fs / 1000.0,
        "exchange_interval_ps": ex_steps * timestep_fs / 1000.0,
        "seed": int(seed),
        "system_sha256": _system_hash(peptide.system),
    }
    rng = np.random.default_rng(seed)

    contexts, integrators = [], []
    for k in range(K):
        ctx, integ = _make_context(
            peptide.system, temps[k], timestep_fs, friction_per_ps, platform, threads, _openmm_seed(seed, 10 + k)
        )
        contexts.append(ctx)
        integrators.append(integ)

    rep_at = np.arange(K)  # replica (context) holding each temperature index
    accepted = np.zeros(K - 1, dtype=np.int64)
    attempts = np.zeros(K - 1, dtype=np.int64)
    xyz, energies, state_e, rep_hist, times = [], [], [], [], []
    n_exchange, wall_before, resumed = 0, 0.0, False
    if path is not None and os.path.exists(path):
        traj, e_old, meta, extra = _load_same_run(path, settings)
        if "pt_rep_at" not in extra:
            raise ValueError(
                f"{path} has no resume state (written before runs could be resumed): choose another path or remove it"
            )
        xyz, energies, times = list(traj.xyz), list(e_old), list(traj.time)
        state_e, rep_hist = list(extra["pt_state_energies"]), list(extra["pt_replica_at_state"])
        accepted, attempts = extra["pt_accepted"].copy(), extra["pt_attempts"].copy()
        rep_at, n_exchange = extra["pt_rep_at"].copy(), int(extra["pt_n_exchange"])
        rng.bit_generator.state = json.loads(str(extra["pt_rng_state"]))
        wall_before = float(meta.get("wall_time_s", 0.0))
        for k in range(K):
            try:
                contexts[k].loadCheckpoint(extra[f"pt_checkpoint_{k}"].tobytes())
            except Exception as err:
                raise ValueError(
                    f"{path}: the OpenMM checkpoint of replica {k} does not load here "
                    f"({err}); resume on the platform and OpenMM version that wrote it, "
                    "or choose another path"
                ) from err
        for s_, r in enumerate(rep_at):  # each replica's thermostat at the temperature it holds
            integrators[r].setTemperature(temps[s_] * unit.kelvin)
        resumed = True
    else:
        start_pos = _positions_nm(peptide.positions)
        if minimize:
            contexts[0].setPositions(start_pos)
            openmm.LocalEnergyMinimizer.minimize(contexts[0], 1.0, 0)
            start_pos = contexts[0].getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        for k in range(K):
            contexts[k].setPositions(start_pos)
            contexts[k].setVelocitiesToTemperature(temps[k] * unit.kelvin, _openmm_seed(seed, 100 + k))

    def result_and_meta(done: bool, wall: float):
        acceptance = accepted / np.maximum(attempts, 1)
        meta = _run_metadata(
            settings,
            peptide,
            platform,
            len(xyz),
            rep_steps * timestep_fs / 1000.0,
            done,
            wall,
            acceptance=acceptance.tolist(),
        )
        result = PTResult(
            _trajectory(peptide, xyz, times),
            np.asarray(energies, dtype=np.float64),
            meta,
            acceptance=acceptance,
            attempts=attempts.copy(),
            temperatures=temps,
            state_energies=np.asarray(state_e, dtype=np.float64).reshape(-1, K),
            replica_at_state=np.asarray(rep_hist, dtype=np.int64).reshape(-1, K),
        )
        return result, meta

    def save(done: bool, wall: float):
        result, meta = result_and_meta(done, wall)
        extra = {
            "pt_acceptance": result.acceptance,
            "pt_attempts": attempts,
            "pt_accepted": accepted,
            "pt_temperatures": temps,
            "pt_state_energies": result.state_energies,
            "pt_replica_at_state": result.replica_at_state,
            "pt_rep_at": rep_at,
            "pt_n_exchange": np.array(n_exchange),
            "pt_rng_state": np.array(json.dumps(rng.bit_generator.state)),
        }
        for k in range(K):
            extra[f"pt_checkpoint_{k}"] = np.frombuffer(contexts[k].createCheckpoint(), dtype=np.uint8)
        save_npz(path, result.trajectory, result.potential_energy, meta, extra)

    autosave = _Autosave(save if path is not None else None, checkpoint_every_s, wall_before)
    bar = tqdm(
        total=n_frames, initial=min(len(xyz), n_frames), disable=not progress, desc=f"PT {K} replicas", unit="frame"
    )
    with bar, autosave:
        while len(xyz) < n_frames:
            for _ in range(per_report):
                for integ in integrators:
                    integ.step(ex_steps)
                u = np.array(
                    [
                        contexts[r].getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
                        for r in range(K)
                    ]
                )  # by replica
                if not np.all(np.isfinite(u)):
                    raise FloatingPointError(f"PT replica energies not finite: {u}")
                first = n_exchange % 2
                for s in range(first, K - 1, 2):
                    i, j = rep_at[s], rep_at[s + 1]
                    attempts[s] += 1
                    log_a = (beta[s] - beta[s + 1]) * (u[i] - u[j])
                    if np.log(rng.uniform()) < log_a:
                        accepted[s] += 1
                        rep_at[s], rep_at[s + 1] = j, i
                        for r, t_old, t_new in ((i, temps[s], temps[s + 1]), (j, temps[s + 1], temps[s])):
                            integrators[r].setTemperature(t_new * unit.kelvin)
                            v = contexts[r].getState(getVelocities=True).getVelocities(asNumpy=True)
                            contexts[r].setVelocities(v * math.sqrt(t_new / t_old))
                n_exchange += 1
            r0 = rep_at[0]
            st = contexts[r0].getState(getPositions=True)
            xyz.append(st.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
            # positions are unchanged since ``u`` was evaluated; reuse it (OpenMM's threaded CPU
            # sums are not bitwise reproducible, so a second evaluation can differ by ~1e-5)
            energies.append(float(u[r0]))
            state_e.append(u[rep_at])
            rep_hist.append(rep_at.copy())
            times.append(len(xyz) * rep_steps * timestep_fs / 1000.0)
            bar.update(1)
            bar.set_postfix(acc=np.round(accepted / np.maximum(attempts, 1), 2).tolist())
            autosave.tick()
    wall = autosave.finish()
    result, meta = result_and_meta(True, wall)
    meta["resumed"] = resumed
    return result
