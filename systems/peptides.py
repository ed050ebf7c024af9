r"""Boltzmann peptides: OpenMM systems as batched mcsample targets.

A :class:`Peptide` is the Boltzmann density of a small peptide in implicit solvent or vacuum,

.. math::  \pi(x) \propto \exp(-U(x)/k_B T),\qquad x\in\mathbb R^{n_\mathrm{atoms}\times 3}\ \mathrm{(nm)},

where :math:`U` is the potential energy (kJ/mol) of an OpenMM ``System``. It is an mcsample
``Target`` over batches of shape ``(B, n_atoms, 3)``: ``log_prob(x) = -U(x)/kT``.

Two backends evaluate :math:`U`:

* ``backend="torch"`` (default): :class:`~mcsample.systems.forcefield.TorchForceField`, every
  parameter read out of the System and evaluated for the whole batch at once, on CPU or GPU, in
  float32 or float64, differentiable (agrees with OpenMM's Reference platform to < 1e-9 kJ/mol
  on realistic configurations in float64);
* ``backend="openmm"``: the reference, a pool of OpenMM Contexts (CPU or Reference platform)
  looping over the batch; differentiable too (the backward pass uses OpenMM's forces).

Ways to make one:

* :func:`alanine_dipeptide` — the field's benchmark (ACE-ALA-NME, AMBER ff96 + OBC1 or vacuum,
  300 K, unconstrained), exactly openmmtools' ``AlanineDipeptideImplicit/Vacuum`` as used by
  Boltzmann-generator papers (Noé et al. 2019; Midgley et al. 2023, FAB);
* :meth:`Peptide.from_sequence` — RDKit builds and embeds the heavy atoms with PDB atom names,
  OpenMM's Modeller adds hydrogens, amber14-all.xml with implicit/obc1.xml or obc2.xml (the
  transferable-peptide data sets: OBC1, 310 K, 2 nm CutoffNonPeriodic), then a minimization;
* :meth:`Peptide.from_pdb` and :meth:`Peptide.from_openmm` for structures and systems a user has.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from mcsample._optional import require

require("openmm", "mdtraj", extra="peptides")

__all__ = ["Peptide", "alanine_dipeptide", "boltzmann_constant", "ONE_LETTER_CODES", "SUPPORTED_RESIDUES"]

# k_B * N_A in kJ/(mol K), as OpenMM defines it (openmm.unit.MOLAR_GAS_CONSTANT_R).
_R_KJ = 0.00831446261815324

#: one-letter code -> amber14 residue name at pH 7 (Modeller picks the protonation variant)
ONE_LETTER_CODES = {
    "A": "ALA",
    "R": "ARG",
    "N": "ASN",
    "D": "ASP",
    "C": "CYS",
    "Q": "GLN",
    "E": "GLU",
    "G": "GLY",
    "H": "HIS",
    "I": "ILE",
    "L": "LEU",
    "K": "LYS",
    "M": "MET",
    "F": "PHE",
    "P": "PRO",
    "S": "SER",
    "T": "THR",
    "W": "TRP",
    "Y": "TYR",
    "V": "VAL",
}


#: residue names accepted by ``from_pdb``/``from_sequence`` with amber14 (PDB names are
#: normalized by OpenMM's reader first, e.g. HSD -> HIS)
SUPPORTED_RESIDUES = frozenset(ONE_LETTER_CODES.values()) | {
    "HID",
    "HIE",
    "HIP",
    "CYX",
    "CYM",
    "ASH",
    "GLH",
    "LYN",
    "ACE",
    "NME",
    "NHE",
}


def boltzmann_constant() -> float:
    """:math:`k_B N_A` in kJ/(mol K) (OpenMM's value), so that :math:`kT = k_B N_A T`."""
    return _R_KJ


# --------------------------------------------------------------------------------------------
# the OpenMM reference backend


class _ContextPool:
    """A few OpenMM Contexts over one System; batches are split across them (threads).

    Energies in kJ/mol and forces in kJ/mol/nm, computed in double precision on the host.
    """

    def __init__(self, system, platform: str = "CPU", size: int = 1, threads: int | None = None):
        import openmm

        self.system = system
        self.platform_name = platform
        self.size = max(1, int(size))
        plat = openmm.Platform.getPlatformByName(platform)
        props = {}
        if platform == "CPU" and threads is not None:
            props["Threads"] = str(int(threads))
        self._contexts = []
        for _ in range(self.size):
            integrator = openmm.VerletIntegrator(0.001)
            self._contexts.append(openmm.Context(system, integrator, plat, props))
        self._lock = threading.Lock()

    def _run(self, k: int, xyz: np.ndarray, out_e: np.ndarray, out_f: np.ndarray | None, rows):
        ctx = self._contexts[k]
        for i in rows:
            ctx.setPositions(xyz[i])
            state = ctx.getState(getEnergy=True, getForces=out_f is not None)
            out_e[i] = state.getPotentialEnergy()._value
            if out_f is not None:
                out_f[i] = state.getForces(asNumpy=True)._value

    def evaluate(self, xyz: np.ndarray, forces: bool = True):
        """Energies ``(B,)`` and optionally forces ``(B, n, 3)`` for positions ``(B, n, 3)`` (nm)."""
        xyz = np.ascontiguousarray(xyz, dtype=np.float64)
        b = xyz.shape[0]
        out_e = np.empty(b)
        out_f = np.empty_like(xyz) if forces else None
        with self._lock:
            if self.size == 1 or b < 2:
                self._run(0, xyz, out_e, out_f, range(b))
            else:
                chunks = np.array_split(np.arange(b), self.size)
                with ThreadPoolExecutor(self.size) as ex:
                    list(ex.map(lambda kc: self._run(kc[0], xyz, out_e, out_f, kc[1]), enumerate(chunks)))
        return out_e, out_f


class _OpenMMEnergy(torch.autograd.Function):
    """U(x) from OpenMM with dU/dx = -F from the same call, so the reference is differentiable."""

    @staticmethod
    def forward(ctx, x: Tensor, pool: _ContextPool) -> Tensor:
        xyz = x.detach().to("cpu", torch.float64).numpy()
        e, f = pool.evaluate(xyz, forces=True)
        ctx.save_for_backward(torch.from_numpy(-f).to(device=x.device, dtype=x.dtype))
        return torch.from_numpy(e).to(device=x.device, dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (grad_u,) = ctx.saved_tensors
        return grad_out[:, None, None] * grad_u, None


# --------------------------------------------------------------------------------------------


class Peptide:
    r"""The Boltzmann density :math:`\pi(x)\propto e^{-U(x)/kT}` of an OpenMM System.

    Attributes: ``topology`` (mdtraj), ``openmm_topology``, ``system`` (``openmm.System``),
    ``positions`` (float64 ``(n_atoms, 3)`` nm, minimized unless the constructor was told not
    to), ``temperature`` (K), ``kT`` (kJ/mol), ``n_atoms``, ``sequence``, ``event_shape``.
    ``log_prob(x) = -U(x)/kT`` makes it an mcsample Target over ``(B, n_atoms, 3)``.

    ``minimize``: run OpenMM's L-BFGS minimizer on the given positions (RMS force < 1
    kJ/mol/nm). ``platform`` (``"CPU"``: mixed precision, fast; ``"Reference"``: double
    precision) and ``n_contexts`` configure the Context pool of ``backend="openmm"``.
    """

    def __init__(
        self,
        openmm_topology,
        system,
        positions,
        temperature: float = 300.0,
        *,
        sequence: str | None = None,
        name: str | None = None,
        minimize: bool = True,
        platform: str = "CPU",
        n_contexts: int = 1,
    ):
        import mdtraj

        self.openmm_topology = openmm_topology
        self.system = system
        self.temperature = float(temperature)
        self.kT = _R_KJ * self.temperature
        self.platform = platform
        self.n_contexts = int(n_contexts)
        self.topology = mdtraj.Topology.from_openmm(openmm_topology)
        self.n_atoms = self.topology.n_atoms
        if system.getNumParticles() != self.n_atoms:
            raise ValueError(
                f"the System has {system.getNumParticles()} particles but the topology has {self.n_atoms} atoms"
            )
        for i in range(system.getNumParticles()):
            if system.isVirtualSite(i):
                raise ValueError(f"virtual sites are not supported (particle {i})")
        if system.getNumConstraints() > 0:
            raise ValueError(
                f"the System has {system.getNumConstraints()} constraints; the Boltzmann "
                "density over Cartesian coordinates needs an unconstrained System "
                "(createSystem(constraints=None, rigidWater=False))"
            )
        self.sequence = sequence if sequence is not None else _sequence_of(self.topology)
        self.name = name or self.sequence
        pos = _to_nm_array(positions)
        if pos.shape != (self.n_atoms, 3):
            raise ValueError(f"positions have shape {pos.shape}; expected ({self.n_atoms}, 3)")
        if minimize:
            pos = _minimize(system, pos)
        self.positions = torch.as_tensor(pos, dtype=torch.float64)
        self._pool: _ContextPool | None = None
        self._ff = None
        self._ff_devices: dict = {}

    # -------------------------------------------------------------------------- constructors
    @classmethod
    def from_openmm(cls, topology, system, positions, temperature: float = 300.0, **kwargs):
        """Wrap an OpenMM ``Topology``, ``System`` and positions (nm array or Quantity)."""
        return cls(topology, system, positions, temperature, **kwargs)

    @classmethod
    def from_pdb(
        cls,
        path,
        forcefield: str = "amber14",
        solvent: str = "obc1",
        temperature: float = 310.0,
        cutoff: float | None = None,
        add_hydrogens: bool = True,
        **kwargs,
    ):
        """Read a PDB file, add missing hydrogens (Modeller, pH 7), parametrize and minimize.

        ``forcefield``: ``"amber14"`` (amber14-all.xml) or a list of OpenMM force-field XML
        files; ``solvent``: ``"vacuum"``, ``"obc1"`` or ``"obc2"`` (amber14's ``implicit/*.xml``);
        ``cutoff``: ``None`` for NoCutoff, or nm for CutoffNonPeriodic.
        """
        import openmm.app as app

        pdb = app.PDBFile(str(path))
        return cls._from_structure(
            pdb.topology, pdb.positions, forcefield, solvent, temperature, cutoff, add_hydrogens, **kwargs
        )

    @classmethod
    def _from_structure(
        cls, topology, positions, forcefield, solvent, temperature, cutoff, add_hydrogens, sequence=None, **kwargs
    ):
        import openmm.app as app

        ff = _forcefield(forcefield, solvent)
        if forcefield == "amber14":
            unknown = [
                f"{r.name} {r.id} (chain {r.chain.id})" for r in topology.residues() if r.name not in SUPPORTED_RESIDUES
            ]
            if unknown:
                raise ValueError(
                    f"unsupported residue(s) {unknown}: amber14 here covers the 20 standard amino "
                    f"acids, their protonation variants and ACE/NME/NHE caps "
                    f"({sorted(SUPPORTED_RESIDUES)})"
                )
        modeller = app.Modeller(topology, positions)
        try:
            if add_hydrogens:
                modeller.addHydrogens(ff, pH=7.0)
            system = _create_system(ff, modeller.topology, cutoff)
        except ValueError as err:
            raise ValueError(f"cannot parametrize the peptide: {_explain(err, ff, topology)}") from err
        return cls(modeller.topology, system, modeller.positions, temperature, sequence=sequence, **kwargs)

    @classmethod
    def from_sequence(
        cls,
        sequence: str,
        caps: bool = True,
        forcefield: str = "amber14",
        solvent: str = "obc1",
        temperature: float = 310.0,
        cutoff: float | None = None,
        seed: int = 0,
        **kwargs,
    ):
        """Build a peptide from its one-letter sequence (e.g. ``"KDEA"``).

        RDKit builds the L-peptide (``Chem.MolFromSequence``, PDB atom names), optionally adds
        ACE/NME caps (else zwitterionic termini), embeds it (ETKDG, ``seed``); OpenMM's Modeller
        adds hydrogens at pH 7; amber14-all.xml (+ implicit/obc1.xml or obc2.xml), no
        constraints; then a minimization. ``cutoff`` (nm) selects CutoffNonPeriodic.
        """
        topology, positions = _build_heavy_atoms(sequence, caps=caps, seed=seed)
        return cls._from_structure(
            topology, positions, forcefield, solvent, temperature, cutoff, True, sequence=sequence.upper(), **kwargs
        )

    # -------------------------------------------------------------------------- energies
    @property
    def event_shape(self) -> torch.Size:
        """``(n_atoms, 3)``."""
        return torch.Size([self.n_atoms, 3])

    @property
    def forcefield(self):
        """The batched energy (:class:`~mcsample.systems.forcefield.TorchForceField`, CPU copy)."""
        if self._ff is None:
            from .forcefield import TorchForceField

            self._ff = TorchForceField.from_openmm(self.system)
        return self._ff

    def _forcefield_for(self, x: Tensor):
        """The force field with its parameters on ``x``'s device (one copy per device, cached)."""
        if x.device.type == "cpu":
            return self.forcefield
        if x.device not in self._ff_devices:
            import copy

            self._ff_devices[x.device] = copy.deepcopy(self.forcefield).to(x.device)
        return self._ff_devices[x.device]

    def _context_pool(self) -> _ContextPool:
        if self._pool is None:
            self._pool = _ContextPool(self.system, self.platform, self.n_contexts)
        return self._pool

    def _batched(self, x: Tensor) -> tuple[Tensor, bool]:
        x = torch.as_tensor(x)
        if x.shape[-2:] != (self.n_atoms, 3):
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (B, {self.n_atoms}, 3) in nm")
        if x.dim() == 2:
            return x.unsqueeze(0), True
        if x.dim() != 3:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (B, {self.n_atoms}, 3)")
        return x, False

    def energy(self, x: Tensor, backend: str = "torch") -> Tensor:
        """Potential energy :math:`U(x)` in kJ/mol, shape ``(B,)`` for ``x`` of ``(B, n, 3)`` nm.

        ``log_prob = -U/kT``. ``backend="torch"``: :class:`TorchForceField`, the whole batch at
        once on ``x``'s device and dtype, differentiable (on the CPU a compiled numba loop, on a
        GPU fused torch kernels); ``"openmm"``: the reference, OpenMM Contexts looping over the
        batch (float64 on the host; differentiable through OpenMM's forces).
        """
        xb, single = self._batched(x)
        if backend == "torch":
            u = self._forcefield_for(xb).energy(xb)
        elif backend == "openmm":
            u = _OpenMMEnergy.apply(xb, self._context_pool())
        else:
            raise ValueError(f"unknown backend {backend!r}; use 'torch' or 'openmm'")
        return u[0] if single else u

    def forces(self, x: Tensor, backend: str = "torch") -> Tensor:
        """Forces :math:`-\\nabla U(x)` in kJ/mol/nm, same shape as ``x``."""
        xb, single = self._batched(x)
        if backend == "openmm":
            _, f = self._context_pool().evaluate(xb.detach().to("cpu", torch.float64).numpy())
            out = torch.from_numpy(f).to(device=xb.device, dtype=xb.dtype)
        elif backend == "torch":
            out = self._forcefield_for(xb).forces(xb)
        else:
            raise ValueError(f"unknown backend {backend!r}; use 'torch' or 'openmm'")
        return out[0] if single else out

    def log_prob(self, x: Tensor, backend: str = "torch") -> Tensor:
        """Unnormalized Boltzmann log-density :math:`-U(x)/kT`, shape ``(B,)``."""
        return -self.energy(x, backend=backend) / self.kT

    def regularized_log_prob(
        self, x: Tensor, high_energy: float = 1e3, max_energy: float = 1e9, backend: str = "torch"
    ) -> Tensor:
        """:math:`-\\mathrm{linlogcut}(U(x))/kT`: the soft-capped energy of Boltzmann-generator
        training (Noé et al. 2019), identical to :meth:`log_prob` while :math:`U <` ``high_energy``
        (kJ/mol), logarithmic above, capped at ``max_energy``. Not the exact density: use it for
        training losses, never for importance weights.
        """
        from .forcefield import linlogcut

        return -linlogcut(self.energy(x, backend=backend), high_energy, max_energy) / self.kT

    def score(self, x: Tensor) -> Tensor:
        """:math:`\\nabla_x \\log\\pi = F(x)/kT` (torch backend)."""
        return self.forces(x) / self.kT

    def identity(self) -> dict:
        """What defines this Boltzmann density, for checkpoints that must match it.

        ``name``, ``sequence``, ``temperature_K``, ``n_atoms``, ``topology_sha256`` (atom names,
        elements, residues and bonds) and ``system_sha256`` (the serialized OpenMM System: force
        field, solvent model, cutoff, every parameter).
        """
        import hashlib

        import openmm

        top = self.topology
        atoms = ";".join(
            f"{a.residue.index}:{a.residue.name}:{a.name}:{a.element.symbol if a.element is not None else '?'}"
            for a in top.atoms
        )
        bonds = ";".join(
            f"{min(b[0].index, b[1].index)}-{max(b[0].index, b[1].index)}"
            for b in sorted(top.bonds, key=lambda b: (min(b[0].index, b[1].index), max(b[0].index, b[1].index)))
        )
        system = openmm.XmlSerializer.serialize(self.system)
        return {
            "name": str(self.name),
            "sequence": str(self.sequence),
            "temperature_K": float(self.temperature),
            "n_atoms": int(self.n_atoms),
            "topology_sha256": hashlib.sha256(f"{atoms}|{bonds}".encode()).hexdigest()[:16],
            "system_sha256": hashlib.sha256(system.encode()).hexdigest()[:16],
        }

    # -------------------------------------------------------------------------- mdtraj
    def to_mdtraj(self, x: Tensor):
        """An ``mdtraj.Trajectory`` of the configurations ``x`` (``(B, n, 3)`` or ``(n, 3)``, nm)."""
        import mdtraj

        xb, _ = self._batched(x)
        xyz = xb.detach().to("cpu", torch.float64).numpy().astype(np.float32)
        return mdtraj.Trajectory(xyz, self.topology)

    def from_mdtraj(self, traj, dtype: torch.dtype = torch.float64) -> Tensor:
        """The coordinates of an ``mdtraj.Trajectory`` as a ``(B, n_atoms, 3)`` tensor (nm)."""
        if traj.n_atoms != self.n_atoms:
            raise ValueError(f"trajectory has {traj.n_atoms} atoms; the peptide has {self.n_atoms}")
        return torch.as_tensor(np.asarray(traj.xyz), dtype=dtype)

    def __repr__(self) -> str:
        return (
            f"Peptide({self.name!r}, n_atoms={self.n_atoms}, T={self.temperature} K, "
            f"forces={[type(f).__name__ for f in self.system.getForces()]})"
        )


# --------------------------------------------------------------------------------------------
# alanine dipeptide, the field's benchmark


def alanine_dipeptide(solvent: str = "obc1", temperature: float = 300.0, minimize: bool = True, **kwargs) -> Peptide:
    """ACE-ALA-NME with AMBER ff96, unconstrained, 300 K: openmmtools' test systems.

    ``solvent="obc1"`` is ``AlanineDipeptideImplicit(constraints=None)`` (OBC1 GB as a
    CustomGBForce with the ACE surface term, from the prmtop), ``"vacuum"`` is
    ``AlanineDipeptideVacuum(constraints=None)``; the Boltzmann-generator benchmark of
    Noé et al. (2019) and FAB (Midgley et al. 2023).
    """
    require("openmmtools", extra="peptides", by="alanine_dipeptide")
    import logging
    import warnings

    logging.getLogger("pymbar").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import contextlib
        import os

        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            from openmmtools import testsystems

    if solvent == "obc1":
        ts = testsystems.AlanineDipeptideImplicit(constraints=None)
    elif solvent == "vacuum":
        ts = testsystems.AlanineDipeptideVacuum(constraints=None)
    else:
        raise ValueError(f"alanine_dipeptide solvent must be 'obc1' or 'vacuum', got {solvent!r}")
    return Peptide(
        ts.topology,
        ts.system,
        ts.positions,
        temperature,
        sequence="ACE-ALA-NME",
        name=f"alanine_dipeptide_{solvent}",
        minimize=minimize,
        **kwargs,
    )


# --------------------------------------------------------------------------------------------
# helpers


def _to_nm_array(positions) -> np.ndarray:
    if hasattr(positions, "value_in_unit"):
        import openmm.unit as unit

        positions = positions.value_in_unit(unit.nanometer)
    if isinstance(positions, Tensor):
        positions = positions.detach().cpu().numpy()
    return (
        np.array([[float(c) for c in p] for p in positions], dtype=np.float64)
        if not isinstance(positions, np.ndarray)
        else positions.astype(np.float64)
    )


def _minimize(system, pos: np.ndarray, tolerance: float = 1.0, max_iterations: int = 0):
    """Local energy minimization (L-BFGS, OpenMM's LocalEnergyMinimizer, CPU platform).

    ``tolerance`` is the RMS force (kJ/mol/nm) at which the minimizer stops.
    """
    import openmm

    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"))
    ctx.setPositions(pos)
    openmm.LocalEnergyMinimizer.minimize(ctx, tolerance, max_iterations)
    return ctx.getState(getPositions=True).getPositions(asNumpy=True)._value.astype(np.float64)


def _build_heavy_atoms(sequence: str, caps: bool = True, seed: int = 0):
    """RDKit: L-peptide from one-letter codes with PDB atom names, embedded (ETKDGv3).

    Returns an OpenMM ``Topology`` and positions of the heavy atoms (hydrogens are removed:
    OpenMM's Modeller adds them with the force field's names and pH-7 protonation states).
    ``caps=True`` adds ACE (C, O, CH3) before and NME (N, C) after the chain; otherwise the
    termini stay free (Modeller makes them NH3+ and COO-).
    """
    require("rdkit", extra="peptides", by="Peptide.from_sequence")
    import openmm.app as app
    from rdkit import Chem
    from rdkit.Chem import AllChem

    seq = sequence.strip().upper()
    if not seq:
        raise ValueError("empty peptide sequence")
    unknown = sorted({c for c in seq if c not in ONE_LETTER_CODES})
    if unknown:
        raise ValueError(
            f"unsupported residue code(s) {unknown} in sequence {sequence!r}; supported are "
            f"the 20 standard amino acids {''.join(sorted(ONE_LETTER_CODES))}"
        )
    mol = Chem.RWMol(Chem.MolFromSequence(seq))
    if caps:
        first_n = next(
            a.GetIdx()
            for a in mol.GetAtoms()
            if a.GetPDBResidueInfo().GetResidueNumber() == 1 and a.GetPDBResidueInfo().GetName().strip() == "N"
        )
        last = len(seq)
        oxt = next(a.GetIdx() for a in mol.GetAtoms() if a.GetPDBResidueInfo().GetName().strip() == "OXT")
        last_c = next(a.GetIdx() for a in mol.GetAtomWithIdx(oxt).GetNeighbors())

        def add(symbol, name, resname, resnum):
            atom = Chem.Atom(symbol)
            info = Chem.AtomPDBResidueInfo()
            info.SetName(f" {name:<3s}" if len(name) < 4 else name)
            info.SetResidueName(resname)
            info.SetResidueNumber(resnum)
            info.SetChainId("A")
            info.SetIsHeteroAtom(False)
            atom.SetMonomerInfo(info)
            return mol.AddAtom(atom)

        mol.RemoveAtom(oxt)  # indices above oxt shift down by one
        if first_n > oxt:
            first_n -= 1
        if last_c > oxt:
            last_c -= 1
        c = add("C", "C", "ACE", 0)
        o = add("O", "O", "ACE", 0)
        ch3 = add("C", "CH3", "ACE", 0)
        mol.AddBond(c, o, Chem.BondType.DOUBLE)
        mol.AddBond(c, ch3, Chem.BondType.SINGLE)
        mol.AddBond(c, first_n, Chem.BondType.SINGLE)
        n = add("N", "N", "NME", last + 1)
        cm = add("C", "C", "NME", last + 1)
        mol.AddBond(last_c, n, Chem.BondType.SINGLE)
        mol.AddBond(n, cm, Chem.BondType.SINGLE)
    mol = mol.GetMol()
    Chem.SanitizeMol(mol)
    molh = Chem.AddHs(mol, addCoords=False, addResidueInfo=True)
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed)
    if AllChem.EmbedMolecule(molh, params) != 0:
        params.useRandomCoords = True
        if AllChem.EmbedMolecule(molh, params) != 0:
            raise RuntimeError(f"RDKit could not embed the peptide {sequence!r}")
    heavy = Chem.RemoveHs(molh)
    # order atoms residue by residue (ACE first, NME last) as a PDB file would
    order = sorted(
        range(heavy.GetNumAtoms()), key=lambda i: (heavy.GetAtomWithIdx(i).GetPDBResidueInfo().GetResidueNumber(), i)
    )
    heavy = Chem.RenumberAtoms(heavy, order)
    block = Chem.MolToPDBBlock(heavy, flavor=2 | 8)  # no CONECT for standard residues
    import io

    pdb = app.PDBFile(io.StringIO(block))
    return pdb.topology, pdb.positions


def _sequence_of(topology) -> str:
    return "-".join(r.name for r in topology.residues)


def _forcefield(forcefield, solvent):
    import openmm.app as app

    if forcefield == "amber14":
        files = ["amber14-all.xml"]
    elif isinstance(forcefield, str):
        files = [forcefield]
    else:
        files = list(forcefield)
    if solvent in ("obc1", "obc2"):
        files.append(f"implicit/{solvent}.xml")
    elif solvent != "vacuum":
        raise ValueError(f"unknown solvent {solvent!r}; use 'vacuum', 'obc1' or 'obc2'")
    return app.ForceField(*files)


def _create_system(ff, topology, cutoff):
    import openmm.app as app
    import openmm.unit as unit

    method = app.NoCutoff if cutoff is None else app.CutoffNonPeriodic
    kw = {} if cutoff is None else {"nonbondedCutoff": float(cutoff) * unit.nanometer}
    return ff.createSystem(
        topology, nonbondedMethod=method, constraints=None, rigidWater=False, removeCMMotion=True, **kw
    )


def _explain(err: Exception, ff=None, topology=None) -> str:
    """OpenMM's template errors name the residue; add the heavy atoms its template lacks."""
    import re

    msg = str(err)
    m = re.search(r"residue (\d+) \((\w+)\)", msg)
    if "template" not in msg.lower() or m is None:
        return msg
    extra = []
    try:  # the residue's templates (with terminal variants N*/C*), heavy atoms by name
        res = list(topology.residues())[int(m.group(1))]
        known = set()
        for key in (res.name, "N" + res.name, "C" + res.name):
            if key in ff._templates:
                known |= {a.name for a in ff._templates[key].atoms}
        if known:
            extra = [
                a.name for a in res.atoms() if a.element is not None and a.element.symbol != "H" and a.name not in known
            ]
    except Exception:  # diagnosis only: never hide OpenMM's own message
        extra = []
    if extra:
        msg += f" Atom(s) {extra} of {m.group(2)} {m.group(1)} are not in its template."
    return msg + (
        " (amber14 covers the 20 standard amino acids, their protonation variants, ACE/NME caps and standard termini)"
    )
