r"""Boltzmann-weighted peptide configurations in one call, from a shipped normalizing flow.

A researcher who wants the equilibrium ensemble and free energies of a small peptide at its
temperature, without microseconds of MD, calls :func:`sample_peptide`. It draws independent
configurations from a trained Boltzmann generator
(:class:`~mcsample.flows.boltzmann_generator.BoltzmannGenerator`, exact density :math:`q`)
and corrects them to :math:`\pi(x)\propto e^{-U(x)/k_BT}` of the peptide's force field:

* ``method="is"``: self-normalized importance sampling, :math:`w = e^{-U/kT}/q`
  (:func:`mcsample.importance_sample`); one energy evaluation per sample.
* ``method="smc"``: annealed SMC from the flow to the Boltzmann density
  (:func:`mcsample.smc`) in the flow's internal coordinates, where the bonds, angles and
  torsions are separately preconditioned, with MALA moves each followed by an independence
  move that redraws the configuration from the flow (:class:`mcsample.kernels.Independence`).
  Several energy and gradient evaluations per particle; it repairs what importance sampling
  cannot when the flow misses part of the target.

The result holds the weighted Cartesian samples (nm, the peptide's atom order) as a
:class:`~mcsample.weighted.WeightedSamples`, the normalized weights, potential energies
(kJ/mol), an ``mdtraj.Trajectory``, and the diagnostics that say whether to trust them: Kish ESS,
PSIS :math:`\hat k` (< 0.7 reliable), :math:`\log Z` ± its standard error (the configurational
integral per nm³ of translation and per :math:`8\pi^2` of orientation; see
:mod:`mcsample.flows.boltzmann_generator`), the number of energy evaluations and the seconds.

    >>> import mcsample as mc
    >>> from mcsample.systems.peptides import alanine_dipeptide
    >>> ens = mc.sample_peptide(alanine_dipeptide("obc1"), 10_000, method="is")
    >>> print(ens.diagnostics)
    >>> ens.free_energy_difference()          # ΔF(φ>0 − φ<0) ± stderr in kT
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from mcsample._optional import require
from mcsample.diagnostics import ess
from mcsample.protocols import Float64Proposal, check_generator, renamed

require("openmm", "mdtraj", "zuko", extra="peptides")

__all__ = ["PeptideDiagnostics", "PeptideEnsemble", "sample_peptide", "cli"]

#: (φ, ψ) basins of alanine dipeptide, degrees: a partition of the Ramachandran plane
BASINS = ("C5", "C7eq", "alphaR", "C7ax", "alphaL")


def basin_index(phi: Tensor, psi: Tensor) -> Tensor:
    r"""Assign (φ, ψ) in radians to the basins :data:`BASINS` (a partition of the torus).

    φ < 0: αR for −120° < ψ < 30°; otherwise C5 (φ < −120°) or C7eq (−120° ≤ φ < 0, which
    includes the polyproline-II region). φ ≥ 0: C7ax for ψ < 0, αL for ψ ≥ 0 (the usual
    split of the rare left-handed side; Ramachandran regions as in Chodera et al. 2006).
    """
    deg = 180.0 / math.pi
    phi, psi = phi * deg, psi * deg
    alpha_r = (psi > -120) & (psi < 30)
    idx = torch.where(phi < -120, 0, 1)
    idx = torch.where(alpha_r, 2, idx)
    idx = torch.where(phi >= 0, torch.where(psi < 0, 3, 4), idx)
    return idx


@dataclass
class PeptideDiagnostics:
    """How far to trust the weights: ``ess`` (Kish), ``ess_fraction`` = ess / n, ``khat``
    (PSIS; ``-inf`` when all weights are equal, as after SMC's last resampling),
    ``log_evidence`` ± ``log_evidence_stderr``, ``method``, ``num_samples``,
    ``energy_evaluations`` (energies and forces evaluated, each counted once per
    configuration), ``seconds`` of wall time."""

    ess: float
    ess_fraction: float
    khat: float
    log_evidence: float
    log_evidence_stderr: float
    method: str
    num_samples: int
    energy_evaluations: int
    seconds: float

    @property
    def reliable(self) -> bool:
        """:math:`\\hat k < 0.7` (PSIS's threshold), or equal weights."""
        return not self.khat >= 0.7

    def __str__(self) -> str:
        return (
            f"{self.method}: {self.num_samples} samples, ESS {self.ess:.1f} ({self.ess_fraction:.1%}), "
            f"k-hat {self.khat:.2f}, log Z {self.log_evidence:.3f} ± {self.log_evidence_stderr:.3f}, "
            f"{self.energy_evaluations} energy evaluations, {self.seconds:.1f} s"
        )


@dataclass
class PeptideEnsemble:
    """Weighted configurations of a peptide: ``samples`` (:class:`~mcsample.weighted.WeightedSamples`
    over ``(n, n_atoms, 3)`` nm), ``weights`` (n,) normalized float64, ``energies`` (n,) kJ/mol,
    ``diagnostics``, ``peptide``."""

    samples: object
    weights: Tensor
    energies: Tensor
    diagnostics: PeptideDiagnostics
    peptide: object

    def __len__(self) -> int:
        return self.weights.numel()

    @property
    def positions(self) -> Tensor:
        return self.samples.samples

    @property
    def trajectory(self):
        """An ``mdtraj.Trajectory`` of the samples (weights in :attr:`weights`)."""
        return self.peptide.to_mdtraj(self.positions)

    def ramachandran(self) -> tuple[Tensor, Tensor]:
        """Backbone (φ, ψ) of every sample in radians (first φ/ψ pair of the chain), computed once."""
        if getattr(self, "_phi_psi", None) is None:
            from mcsample.systems import analysis

            phi, psi = analysis.ramachandran_angles(self.trajectory)
            self._phi_psi = (torch.as_tensor(np.asarray(phi)), torch.as_tensor(np.asarray(psi)))
        return self._phi_psi

    def free_energy_difference(self) -> dict:
        r""":math:`\Delta F = -\log\frac{P(\phi>0)}{P(\phi<0)}` in kT with its standard error
        (delta method on the self-normalized estimate of :math:`P(\phi>0)`, genealogy-aware
        after SMC resampling). ``{"value", "stderr", "p_positive", "p_positive_stderr",
        "ess_positive"}``; ``value`` is ±inf and ``stderr`` NaN when no sample lies on one side.
        ``ess_positive`` is the Kish ESS of the samples at φ>0 alone: the error bar is a
        large-sample one, and with fewer than ~20 effective samples there (a rare basin met by
        a few heavy weights) the run-to-run spread of ΔF was measured at up to 3× the stderr;
        draw more samples until it is larger."""
        phi, _ = self.ramachandran()
        ind = (phi > 0).to(torch.float64)
        est = self.samples.expectation(lambda x: ind)
        p, se = float(est.value), float(est.stderr)
        lw = self.samples.log_weights
        pos = lw[ind.to(lw.device) > 0]
        ess_pos = float(ess(pos)) if pos.numel() and bool(torch.isfinite(pos).any()) else 0.0
        out = {"p_positive": p, "p_positive_stderr": se, "ess_positive": ess_pos}
        if p <= 0.0 or p >= 1.0:
            return {"value": math.inf if p <= 0 else -math.inf, "stderr": math.nan, **out}
        return {"value": -math.log(p / (1 - p)), "stderr": se / (p * (1 - p)), **out}

    def basin_populations(self) -> dict:
        """Populations of :data:`BASINS` ± standard errors: ``{name: (value, stderr)}``."""
        phi, psi = self.ramachandran()
        onehot = torch.nn.functional.one_hot(basin_index(phi, psi), len(BASINS)).to(torch.float64)
        est = self.samples.expectation(lambda x: onehot)
        return {b: (float(est.value[k]), float(est.stderr[k])) for k, b in enumerate(BASINS)}

    def summary(self) -> dict:
        """Every number of the ensemble as a JSON-ready dictionary."""
        return {
            "diagnostics": asdict(self.diagnostics),
            "free_energy_difference_kT": self.free_energy_difference(),
            "basin_populations": {k: list(v) for k, v in self.basin_populations().items()},
            "peptide": self.peptide.identity(),
            "mean_energy_kj_mol": float((self.weights * self.energies.to(torch.float64)).sum()),
        }

    def save(self, path) -> list[str]:
        """Write the samples: ``.pdb`` / ``.dcd`` / ``.xtc`` (mdtraj; with ``.dcd``/``.xtc`` a
        ``.pdb`` topology beside it) or ``.sdf`` (RDKit; each record carries its
        ``boltzmann_weight`` and ``energy_kj_mol``), and always ``<stem>.weights.json`` with the
        normalized weights, energies and diagnostics. Returns the paths written."""
        path = os.fspath(path)
        stem, ext = os.path.splitext(path)
        ext = ext.lower()
        if ext not in OUTPUT_FORMATS:
            raise ValueError(f"unsupported output format {ext!r}: use {', '.join(OUTPUT_FORMATS)}")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        traj = self.trajectory
        written = []
        tmp = f"{stem}.tmp{os.getpid()}{ext}"
        if ext == ".sdf":
            self._write_sdf(tmp, traj)
        else:
            traj.save(tmp)
        os.replace(tmp, path)
        written.append(path)
        if ext in (".dcd", ".xtc"):
            top = stem + ".topology.pdb"
            traj[0].save(top)
            written.append(top)
        meta = {
            **self.summary(),
            "weights": self.weights.tolist(),
            "energies_kj_mol": self.energies.to(torch.float64).tolist(),
        }
        jpath = stem + ".weights.json"
        tmpj = jpath + f".tmp{os.getpid()}"
        with open(tmpj, "w") as fh:
            json.dump(finite_json(meta), fh, indent=1)
        os.replace(tmpj, jpath)
        written.append(jpath)
        return written

    def _write_sdf(self, path: str, traj) -> None:
        from rdkit import Chem
        from rdkit.Geometry import Point3D

        pdb_path = path + ".template.pdb"
        traj[0].save(pdb_path)
        try:
            template = Chem.MolFromPDBFile(pdb_path, removeHs=False, sanitize=False)
        finally:
            os.remove(pdb_path)
        if template is None:
            raise ValueError("RDKit could not read the peptide's structure to write an SDF")
        xyz = traj.xyz * 10.0  # nm -> Å
        writer = Chem.SDWriter(path)
        try:
            for k in range(traj.n_frames):
                mol = Chem.Mol(template)
                conf = mol.GetConformer()
                for i in range(mol.GetNumAtoms()):
                    conf.SetAtomPosition(i, Point3D(*map(float, xyz[k, i])))
                mol.SetProp("_Name", f"{self.peptide.name} sample {k}")
                mol.SetDoubleProp("boltzmann_weight", float(self.weights[k]))
                mol.SetDoubleProp("energy_kj_mol", float(self.energies[k]))
                writer.write(mol)
        finally:
            writer.close()


def finite_json(obj):
    """``obj`` with every non-finite float replaced by ``None`` (JSON has no inf or NaN; an
    empty φ>0 region gives ΔF = inf)."""
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


#: file formats of :meth:`PeptideEnsemble.save` and ``mcsample peptide -o``
OUTPUT_FORMATS = (".pdb", ".dcd", ".xtc", ".sdf")


class _Counted:
    """A target that counts the configurations whose energy it evaluates."""

    def __init__(self, target):
        self.target = target
        self.event_shape = getattr(target, "event_shape", None)
        self.count = 0

    def log_prob(self, x):
        self.count += int(x.shape[0])
        return self.target.log_prob(x)


def _as_peptide(peptide_or_sequence, solvent: str, temperature: float | None):
    """A Peptide, the name ``"alanine_dipeptide"``, or a one-letter sequence (a zwitterionic
    peptide in the transferable flow's settings: amber14-all + OBC1 implicit solvent, 310 K,
    CutoffNonPeriodic 2 nm)."""
    from mcsample.systems.peptides import ONE_LETTER_CODES, Peptide, alanine_dipeptide

    if isinstance(peptide_or_sequence, Peptide):
        return peptide_or_sequence
    if isinstance(peptide_or_sequence, str):
        key = peptide_or_sequence.strip().replace("-", "").upper()
        if key in ("ALANINEDIPEPTIDE", "ALANINE_DIPEPTIDE", "ACEALANME", "ALDP", "ADP"):
            return alanine_dipeptide(solvent, temperature=300.0 if temperature is None else temperature)
        if len(key) >= 2 and key.isalpha() and not set(key) - set(ONE_LETTER_CODES):
            return Peptide.from_sequence(
                key, caps=False, solvent=solvent, temperature=310.0 if temperature is None else temperature, cutoff=2.0
            )
        raise ValueError(
            f"{peptide_or_sequence!r} is not a peptide name or a sequence of at least two one-letter "
            f"codes ({''.join(sorted(ONE_LETTER_CODES))}); give e.g. 'alanine_dipeptide' or 'AL'"
        )
    raise TypeError(f"expected a Peptide, a name or a sequence, got {type(peptide_or_sequence).__name__}")


def default_proposal(peptide):
    """The shipped single-molecule Boltzmann generator of ``peptide`` when there is one, else
    the transferable flow's proposal for it (:func:`mcsample.flows.pretrained`)."""
    from mcsample.flows import pretrained

    try:
        return pretrained(peptide)
    except ValueError:
        return pretrained("transferable").proposal(peptide)


def sample_peptide(
    peptide,
    num_particles: int | None = None,
    method: str = "is",
    generator: torch.Generator | None = None,
    progress: bool = False,
    *,
    proposal=None,
    solvent: str = "obc1",
    temperature: float | None = None,
    batch_size: int = 4096,
    smc_steps: int = 5,
    finetune_rounds: int = 8,
    num_samples: int | None = None,
) -> PeptideEnsemble:
    r"""Boltzmann-weighted configurations of ``peptide`` from a trained Boltzmann generator.

    Args:
        peptide: a :class:`~mcsample.systems.peptides.Peptide` (e.g. ``alanine_dipeptide("obc1")``),
            the name ``"alanine_dipeptide"``, or a one-letter sequence such as ``"EW"`` (a
            zwitterionic peptide, amber14-all + OBC1, 310 K, 2 nm cutoff); ``solvent`` and
            ``temperature`` build it.
        num_particles: importance samples (``"is"``) or SMC particles (``"smc"``). The default,
            10⁵ (about 25 s of IS on 2 CPU cores), is what the ΔF(φ>0 − φ<0) error bar needs: with
            the shipped vacuum flow its run-to-run spread was 1.7× the reported stderr at 10⁵
            draws and 2.7× at 2·10⁴ (the φ>0 basins are met by a few heavy weights).
        method: ``"is"``, ``"smc"`` (module docstring) or ``"finetune+smc"`` (SNIS
            self-improvement of a copy of the proposal on this peptide,
            :func:`mcsample.flows.training.fit_snis` with ``finetune_rounds`` rounds, then SMC).
        generator: ``torch.Generator`` for reproducible results.
        progress: progress bars.
        proposal: a :class:`~mcsample.flows.boltzmann_generator.BoltzmannGenerator` (default:
            the shipped one for this peptide, else the transferable flow's proposal for it:
            :func:`default_proposal`); its recorded system must match ``peptide``.
        batch_size: configurations per energy batch for ``"is"``.
        smc_steps: MALA + independence moves per SMC step.
        num_samples: deprecated name of ``num_particles``.

    Returns:
        :class:`PeptideEnsemble`: weighted samples, weights, energies (kJ/mol), trajectory,
        diagnostics. ``log_prob = -U/kT`` with U in kJ/mol.
    """
    import mcsample as mc
    from mcsample.flows.boltzmann_generator import LOG_RIGID_VOLUME, BoltzmannGenerator

    if method not in ("is", "smc", "finetune+smc"):
        raise ValueError(f"method must be 'is', 'smc' or 'finetune+smc', got {method!r}")
    num_particles = renamed("sample_peptide", "num_particles", num_particles, "num_samples", num_samples)
    num_particles = 100_000 if num_particles is None else int(num_particles)
    if num_particles < 2:
        raise ValueError(f"num_particles must be at least 2, got {num_particles}")
    check_generator(generator)
    t0 = time.perf_counter()
    peptide = _as_peptide(peptide, solvent, temperature)
    if proposal is None:
        proposal = default_proposal(peptide)
    if not isinstance(proposal, BoltzmannGenerator):
        raise TypeError(f"proposal must be a BoltzmannGenerator, got {type(proposal).__name__}")
    proposal.check_identity(peptide)
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
    finetune_evaluations = 0
    if method == "finetune+smc":
        import copy

        from mcsample.flows.training import fit_snis

        proposal = copy.deepcopy(proposal)
        draws = min(num_particles, 2048)
        fit_snis(
            proposal,
            peptide.log_prob,
            rounds_per_beta=finetune_rounds,
            num_samples=draws,
            buffer_size=draws,
            steps_per_round=20,
            lr=1e-4,
            progress=progress,
            generator=generator,
        )
        finetune_evaluations = finetune_rounds * draws
    if method == "is":
        target = _Counted(peptide)
        ws = mc.importance_sample(
            target, proposal, num_particles, batch_size=batch_size, generator=generator, progress=progress
        )
        evaluations = target.count
    else:
        from mcsample.kernels import MALA, Independence
        from mcsample.systems.coordinates import InternalCoordinateTarget

        internal = _Counted(InternalCoordinateTarget(peptide, zmatrix=proposal.ic.zmatrix, fix_rigid=True))
        q = Float64Proposal(proposal.flow)
        kernel = Independence(num_steps=smc_steps, local=MALA(), proposal=q)
        res = mc.smc(internal, q, num_particles, kernel=kernel, generator=generator, progress=progress)
        z = res.particles
        with torch.no_grad():
            x, _ = proposal.place(z.samples, generator)
        # the Cartesian evidence is the internal one times the rigid-body volume (8π² nm³)
        ws = mc.WeightedSamples(
            x,
            z.log_weights,
            log_scale=z.log_scale + LOG_RIGID_VOLUME,
            ancestors=z.ancestors,
            generations=z.generations,
            ess_history=z.ess_history,
            info={**z.info, "betas": list(map(float, res.betas))},
        )
        evaluations = internal.count
    with torch.no_grad():
        energies = peptide.energy(ws.samples)
    khat = float(ws.khat)
    diag = PeptideDiagnostics(
        ess=float(ws.ess),
        ess_fraction=float(ws.ess) / len(ws),
        khat=khat,
        log_evidence=float(ws.log_evidence),
        log_evidence_stderr=float(ws.log_evidence_stderr),
        method=method,
        num_samples=len(ws),
        energy_evaluations=int(evaluations) + finetune_evaluations,
        seconds=time.perf_counter() - t0,
    )
    return PeptideEnsemble(ws, ws.normalized_weights, energies, diag, peptide)


def summary_table(ensembles: dict) -> str:
    """A plain-text table of diagnostics, ΔF and basin populations, one column per ensemble."""
    est = {n: (e, e.free_energy_difference(), e.basin_populations()) for n, e in ensembles.items()}
    rows = [
        ("ESS (fraction)", lambda e, f, b: f"{e.diagnostics.ess:.0f} ({e.diagnostics.ess_fraction:.1%})"),
        ("k-hat", lambda e, f, b: f"{e.diagnostics.khat:.2f}"),
        ("log Z", lambda e, f, b: f"{e.diagnostics.log_evidence:.3f} ± {e.diagnostics.log_evidence_stderr:.3f}"),
        ("ΔF(φ>0 − φ<0) / kT", lambda e, f, b: "{value:.2f} ± {stderr:.2f}".format(**f)),
        ("ESS at φ>0 (≥ 20 to trust ΔF)", lambda e, f, b: f"{f['ess_positive']:.1f}"),
        ("<U> kJ/mol", lambda e, f, b: f"{float((e.weights * e.energies.double()).sum()):.2f}"),
    ]
    for name in BASINS:
        rows.append((f"P({name})", lambda e, f, b, name=name: "{:.4f} ± {:.4f}".format(*b[name])))
    rows += [
        ("energy evaluations", lambda e, f, b: f"{e.diagnostics.energy_evaluations}"),
        ("seconds", lambda e, f, b: f"{e.diagnostics.seconds:.1f}"),
    ]
    names = list(ensembles)
    cells = [[label] + [fn(*est[n]) for n in names] for label, fn in rows]
    header = [""] + names
    widths = [max(len(str(r[i])) for r in cells + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*r) for r in cells]
    return "\n".join(lines)


def _peptide_from_input(text: str, solvent: str):
    """A name, a one-letter sequence or a PDB file -> the peptide a shipped flow covers; a
    ``ValueError`` / ``FileNotFoundError`` naming the problem otherwise."""
    from mcsample.systems.peptides import ONE_LETTER_CODES, alanine_dipeptide

    if text.lower().endswith(".pdb"):
        if not os.path.exists(text):
            raise FileNotFoundError(f"no such file: {text}")
        if not os.path.isfile(text):
            raise ValueError(f"{text} is not a file")
        with open(text, "rb"):  # unreadable files raise PermissionError here
            pass
        import mdtraj

        try:
            top = mdtraj.load_topology(text)
        except Exception as err:  # mdtraj raises many types for unreadable files
            raise ValueError(f"cannot read {text} as a PDB file ({err})") from err
        residues = [r.name for r in top.residues]
        if residues == ["ACE", "ALA", "NME"]:
            return alanine_dipeptide(solvent)
        raise ValueError(
            f"{text} holds {'-'.join(residues) or 'no residues'}: a shipped Boltzmann "
            "generator exists only for alanine dipeptide (ACE-ALA-NME)"
        )
    key = text.strip().replace("-", "").replace("_", "").upper()
    names = ("ALANINEDIPEPTIDE", "ACEALANME", "ALDP", "ADP")
    if key not in names and (not key.isalpha() or set(key) - set(ONE_LETTER_CODES)):
        raise ValueError(
            f"no shipped flow for {text!r}: it is not a peptide name or a sequence of the "
            f"one-letter codes {''.join(sorted(ONE_LETTER_CODES))}; give 'alanine_dipeptide' "
            "or a .pdb file of it"
        )
    return _as_peptide(text, solvent, None)


def cli(argv=None) -> int:
    """``mcsample peptide INPUT [-n N] [--method is|smc] [--solvent obc1|vacuum] [--seed S]
    [-o OUT] [--overwrite]``: weighted Boltzmann samples of a peptide from the shipped flow.
    Input errors raise ``ValueError`` / ``OSError`` (``mcsample`` turns them into one line and
    exit status 2)."""
    from mcsample.cli import ArgumentParser, add_debug, check_output, seed

    ap = ArgumentParser(
        prog="mcsample peptide",
        description="Boltzmann-weighted configurations of a peptide from the shipped normalizing "
        "flow, corrected by importance sampling or SMC. Writes the samples (PDB/DCD/XTC/SDF), their "
        "weights and a JSON summary, and prints diagnostics, ΔF(φ>0 − φ<0) and basin populations.",
    )
    ap.add_argument(
        "input",
        help="'alanine_dipeptide' (or ACE-ALA-NME), a PDB file of it, or a one-letter "
        "sequence such as EW (a zwitterionic peptide sampled from the transferable flow)",
    )
    ap.add_argument(
        "-n",
        "--num-samples",
        type=int,
        default=100_000,
        help="importance samples or SMC particles, at least 2 (default: %(default)s)",
    )
    ap.add_argument(
        "--method",
        choices=["is", "smc", "finetune+smc"],
        default="is",
        help="estimator; finetune+smc refits a copy of the flow to this peptide first (default: %(default)s)",
    )
    ap.add_argument(
        "--solvent",
        choices=["obc1", "vacuum"],
        default="obc1",
        help="OBC1 implicit solvent or vacuum (AMBER ff96 for alanine dipeptide, amber14-all "
        "for sequences) (default: %(default)s)",
    )
    ap.add_argument("--seed", type=seed, default=0, help="random seed (default: %(default)s)")
    ap.add_argument(
        "-o",
        "--out",
        default="peptide_samples.pdb",
        help="samples file, .pdb/.dcd/.xtc/.sdf; the weights and summary go to "
        "<stem>.weights.json, and a .dcd/.xtc gets its topology in <stem>.topology.pdb "
        "(default: %(default)s)",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace existing output files (default: off)")
    ap.add_argument("--progress", action="store_true", help="show progress bars (default: off)")
    add_debug(ap)
    args = ap.parse_args(argv)
    if args.num_samples < 2:
        ap.error(f"argument -n/--num-samples: must be at least 2, got {args.num_samples}")
    stem, ext = os.path.splitext(args.out)
    if ext.lower() not in OUTPUT_FORMATS:
        raise ValueError(f"--out must end in {', '.join(OUTPUT_FORMATS)}, got {args.out}")
    outputs = [args.out, stem + ".weights.json"]
    if ext.lower() in (".dcd", ".xtc"):
        outputs.append(stem + ".topology.pdb")
    for path in outputs:
        check_output(path, args.overwrite)
    peptide = _peptide_from_input(args.input, args.solvent)
    ens = sample_peptide(
        peptide,
        args.num_samples,
        args.method,
        generator=torch.Generator().manual_seed(args.seed),
        progress=args.progress,
    )
    written = ens.save(args.out)
    print(summary_table({f"{peptide.name} ({args.method})": ens}))
    print(
        "k-hat > 0.7: do not trust these weights; use --method smc"
        if not ens.diagnostics.reliable
        else "k-hat < 0.7: the importance weights are reliable"
    )
    print("wrote " + ", ".join(written))
    return 0
