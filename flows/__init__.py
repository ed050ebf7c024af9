"""Proposal generators: Boltzmann generators (normalizing flows over internal coordinates), von
Mises mixture torsion networks and diffusion priors.

Trained models ship with the package and load by name with :func:`pretrained`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["pretrained", "CHECKPOINTS"]

#: folder of the shipped checkpoints (each described in its README)
CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"

_BOLTZMANN = {
    ("alanine_dipeptide", "obc1"): "alanine_dipeptide_obc1.pt",
    ("alanine_dipeptide", "vacuum"): "alanine_dipeptide_vacuum.pt",
}


def pretrained(name="alanine_dipeptide", solvent: str = "obc1", **kwargs):
    """A shipped trained model as a Proposal.

    * ``"alanine_dipeptide"`` (``solvent="obc1"`` or ``"vacuum"``): the Boltzmann generator of
      ``mcsample.systems.peptides.alanine_dipeptide(solvent)`` (AMBER ff96, 300 K), a
      :class:`~mcsample.flows.boltzmann_generator.BoltzmannGenerator` over ``(B, 22, 3)`` nm.
      A :class:`~mcsample.systems.peptides.Peptide` may be passed instead of the name: the
      flow trained for it is returned, or a ``ValueError`` says none ships.
    * ``"von_mises"``: the conformer torsion network
      (:func:`mcsample.flows.von_mises.load_default`).
    * ``"transferable"``: the :class:`~mcsample.flows.transferable.TransferableFlow` trained on
      48 zwitterionic dipeptides (amber14-all + OBC1, 310 K); ``.proposal(peptide)`` gives the
      Cartesian proposal of any peptide, seen or not.

    Checkpoints and their provenance are described in ``flows/checkpoints/README.md``.
    """
    if name == "von_mises":
        from mcsample.flows.von_mises import load_default

        return load_default()
    if name == "transferable":
        path = CHECKPOINTS / "transferable.pt"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing; make it with `python examples/peptides/transferable_data.py` "
                "then `python examples/peptides/transferable.py train`"
            )
        from mcsample.flows.training import load_flow

        return load_flow(path, **kwargs)
    peptide = None
    if not isinstance(name, str):
        peptide = name
        pname = str(getattr(peptide, "name", ""))
        for n, s in _BOLTZMANN:
            if pname == f"{n}_{s}":
                name, solvent = n, s
                break
        else:
            raise ValueError(
                f"no shipped Boltzmann generator for the peptide {pname!r}; shipped: "
                f"{sorted(f'{n}_{s}' for n, s in _BOLTZMANN)}. Train one with "
                "mcsample.flows.training (see examples/peptides/alanine_dipeptide.py)"
            )
    key = (name, solvent)
    if key not in _BOLTZMANN:
        raise ValueError(
            f"no shipped model {name!r} with solvent={solvent!r}; shipped: "
            f"{sorted(set(_BOLTZMANN) | {('von_mises', None), ('transferable', None)})}"
        )
    path = CHECKPOINTS / _BOLTZMANN[key]
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; make it with `python examples/peptides/alanine_dipeptide.py --solvent {solvent}`"
        )
    from mcsample.flows.training import load_flow

    return load_flow(path, system=peptide, **kwargs)
