"""Build the molecule set ``systems/data/molecules/molecules.csv`` from data RDKit ships.

Sources (all inside the ``rdkit`` wheel, ``rdkit.RDConfig.RDContribDir``):

* ``Fastcluster/testdata/cdk2.sdf`` — 47 CDK2 ligands (ZINC ids);
* ``FreeWilson/data/cmet_ligands.sdf`` — 24 c-Met ligands (ChEMBL assay CHEMBL2321810 series);
* ``PBF/testData/egfr.sdf`` — 365 EGFR ligands; the first member of each Bemis-Murcko scaffold
  is kept (the set is dominated by a few series), at most ``--egfr`` of them;

plus :data:`DRUGS`, a documented list of small approved drugs (SMILES written for this
project from the drugs' well-known structures; names are labels, check against PubChem
before reusing them as identities), and, for training only, ``rdkit.RDConfig.RDDataDir``'s
``NCI/first_5K.smi`` (the first 5000 structures of the NCI open database): the first molecule
of each Bemis-Murcko scaffold with 2 to 8 torsions and 8 to 35 heavy atoms, at most ``--nci``
of them, and only scaffolds outside the held-out bucket (so they never enlarge or leak into
the held-out set).

Filters: one fragment (largest fragment kept for salts), 1 to 8 rotatable torsions by
:class:`~mcsample.systems.molecules.TorsionTarget`'s definition (RDKit strict), at most 35
heavy atoms, MMFF94 parameters for every atom. Split: by Bemis-Murcko scaffold, a scaffold is
held out when the first byte of the MD5 of its SMILES is below 256/5 (about 20%), so no
held-out molecule shares a scaffold with a training molecule and the split is stable under
adding molecules.

Run time: about 10 s on a 2-core CPU. ``python examples/molecules/build_dataset.py``
rewrites the CSV (it is committed; the run is deterministic).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
from pathlib import Path

from rdkit import Chem, RDConfig, RDLogger
from rdkit.Chem import rdForceFieldHelpers as FH
from rdkit.Chem.MolStandardize import rdMolStandardize
from rdkit.Chem.Scaffolds import MurckoScaffold

from mcsample.systems.molecules import rotatable_torsions

RDLogger.DisableLog("rdApp.*")

OUT = Path(__file__).resolve().parents[2] / "systems" / "data" / "molecules" / "molecules.csv"

DRUGS = {
    "ibuprofen": "CC(C)Cc1ccc(cc1)C(C)C(=O)O",
    "naproxen": "COc1ccc2cc(ccc2c1)[C@H](C)C(=O)O",
    "ketoprofen": "CC(C(=O)O)c1cccc(c1)C(=O)c1ccccc1",
    "flurbiprofen": "CC(C(=O)O)c1ccc(c(F)c1)-c1ccccc1",
    "diclofenac": "OC(=O)Cc1ccccc1Nc1c(Cl)cccc1Cl",
    "mefenamic_acid": "Cc1cccc(Nc2ccccc2C(=O)O)c1C",
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "paracetamol": "CC(=O)Nc1ccc(O)cc1",
    "phenacetin": "CCOc1ccc(NC(C)=O)cc1",
    "benzocaine": "CCOC(=O)c1ccc(N)cc1",
    "procaine": "CCN(CC)CCOC(=O)c1ccc(N)cc1",
    "lidocaine": "CCN(CC)CC(=O)Nc1c(C)cccc1C",
    "mexiletine": "CC(N)COc1c(C)cccc1C",
    "propranolol": "CC(C)NCC(O)COc1cccc2ccccc12",
    "atenolol": "CC(C)NCC(O)COc1ccc(CC(N)=O)cc1",
    "metoprolol": "COCCc1ccc(OCC(O)CNC(C)C)cc1",
    "salbutamol": "CC(C)(C)NCC(O)c1ccc(O)c(CO)c1",
    "phenylephrine": "CNC[C@H](O)c1cccc(O)c1",
    "ephedrine": "CN[C@@H](C)[C@H](O)c1ccccc1",
    "amphetamine": "CC(N)Cc1ccccc1",
    "dopamine": "NCCc1ccc(O)c(O)c1",
    "serotonin": "NCCc1c[nH]c2ccc(O)cc12",
    "melatonin": "COc1ccc2[nH]cc(CCNC(C)=O)c2c1",
    "diphenhydramine": "CN(C)CCOC(c1ccccc1)c1ccccc1",
    "chlorpheniramine": "CN(C)CCC(c1ccc(Cl)cc1)c1ccccn1",
    "fluoxetine": "CNCCC(Oc1ccc(cc1)C(F)(F)F)c1ccccc1",
    "venlafaxine": "COc1ccc(cc1)C(CN(C)C)C1(O)CCCCC1",
    "tramadol": "CN(C)C[C@H]1CCCC[C@@]1(O)c1cccc(OC)c1",
    "bupropion": "CC(NC(C)(C)C)C(=O)c1cccc(Cl)c1",
    "nicotine": "CN1CCC[C@H]1c1cccnc1",
    "gabapentin": "NCC1(CC(=O)O)CCCCC1",
    "pregabalin": "CC(C)C[C@H](CN)CC(=O)O",
    "baclofen": "NCC(CC(=O)O)c1ccc(Cl)cc1",
    "phenytoin": "O=C1NC(=O)C(N1)(c1ccccc1)c1ccccc1",
    "tolbutamide": "CCCCNC(=O)NS(=O)(=O)c1ccc(C)cc1",
    "clonidine": "Clc1cccc(Cl)c1NC1=NCCN1",
    "metronidazole": "Cc1ncc(n1CCO)[N+](=O)[O-]",
    "guaifenesin": "COc1ccccc1OCC(O)CO",
    "captopril": "C[C@H](CS)C(=O)N1CCC[C@H]1C(=O)O",
    "warfarin": "CC(=O)CC(c1ccccc1)c1c(O)c2ccccc2oc1=O",
    "indomethacin": "COc1ccc2n(C(=O)c3ccc(Cl)cc3)c(C)c(CC(=O)O)c2c1",
    "sulfamethoxazole": "Cc1cc(NS(=O)(=O)c2ccc(N)cc2)no1",
    "trimethoprim": "COc1cc(Cc2cnc(N)nc2N)cc(OC)c1OC",
    "zolpidem": "Cc1ccc(cc1)-c1nc2ccc(C)cn2c1CC(=O)N(C)C",
    "haloperidol": "OC1(CCN(CCCC(=O)c2ccc(F)cc2)CC1)c1ccc(Cl)cc1",
    "ondansetron": "Cc1nccn1CC1CCc2n(C)c3ccccc3c2C1=O",
    "celecoxib": "Cc1ccc(cc1)-c1cc(nn1-c1ccc(cc1)S(N)(=O)=O)C(F)(F)F",
    "isoniazid": "NNC(=O)c1ccncc1",
    "methylphenidate": "COC(=O)C(c1ccccc1)C1CCCCN1",
    "pheniramine": "CN(C)CCC(c1ccccc1)c1ccccn1",
}

SDF_SOURCES = [
    ("cdk2", "Fastcluster/testdata/cdk2.sdf", "id"),
    ("cmet", "FreeWilson/data/cmet_ligands.sdf", None),
    ("egfr", "PBF/testData/egfr.sdf", "id"),
]


def _clean(mol):
    mol = rdMolStandardize.LargestFragmentChooser().choose(mol)
    return Chem.MolFromSmiles(Chem.MolToSmiles(mol))


def _record(name, source, mol, min_torsions=1, min_heavy=1):
    if mol is None:
        return None
    molh = Chem.AddHs(mol)
    if not FH.MMFFHasAllMoleculeParams(molh):
        return None
    T = len(rotatable_torsions(molh))
    if not min_torsions <= T <= 8 or not min_heavy <= mol.GetNumHeavyAtoms() <= 35:
        return None
    scaffold = MurckoScaffold.MurckoScaffoldSmiles(mol=mol)
    held = hashlib.md5(scaffold.encode()).digest()[0] < 256 // 5
    return {
        "name": name,
        "source": source,
        "smiles": Chem.MolToSmiles(mol),
        "num_torsions": T,
        "heavy_atoms": mol.GetNumHeavyAtoms(),
        "scaffold": scaffold,
        "split": "heldout" if held else "train",
    }


def build(max_egfr: int = 40, max_nci: int = 300) -> list[dict]:
    rows, seen = [], set()
    for tag, rel, id_prop in SDF_SOURCES:
        path = os.path.join(RDConfig.RDContribDir, rel)
        scaffolds = set()
        kept = 0
        for n, mol in enumerate(Chem.SDMolSupplier(path)):
            if mol is None:
                continue
            name = f"{tag}_{mol.GetProp(id_prop) if id_prop and mol.HasProp(id_prop) else n}"
            rec = _record(name, f"RDKit Contrib/{rel} #{n}", _clean(mol))
            if rec is None or rec["smiles"] in seen:
                continue
            if tag == "egfr":
                if rec["scaffold"] in scaffolds or kept >= max_egfr:
                    continue
                scaffolds.add(rec["scaffold"])
            kept += 1
            seen.add(rec["smiles"])
            rows.append(rec)
    for name, smi in DRUGS.items():
        rec = _record(name, "DRUGS list in examples/molecules/build_dataset.py", Chem.MolFromSmiles(smi))
        if rec is None:
            print(f"skipped {name}: outside the filters")
            continue
        if rec["smiles"] not in seen:
            seen.add(rec["smiles"])
            rows.append(rec)
    scaffolds, kept = {r["scaffold"] for r in rows}, 0
    for n, line in enumerate(open(os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi"))):
        if kept >= max_nci:
            break
        parts = line.split()
        mol = Chem.MolFromSmiles(parts[0]) if parts else None
        if mol is None:
            continue
        rec = _record(
            f"nci_{parts[1] if len(parts) > 1 else n}",
            f"RDKit Data/NCI/first_5K.smi line {n + 1}",
            _clean(mol),
            min_torsions=2,
            min_heavy=8,
        )
        if rec is None or rec["split"] == "heldout" or rec["scaffold"] in scaffolds or rec["smiles"] in seen:
            continue
        scaffolds.add(rec["scaffold"])
        seen.add(rec["smiles"])
        rows.append(rec)
        kept += 1
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--egfr", type=int, default=40, help="at most this many EGFR scaffolds")
    ap.add_argument("--nci", type=int, default=300, help="at most this many NCI training scaffolds")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    rows = build(args.egfr, args.nci)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, args.out)
    n_held = sum(r["split"] == "heldout" for r in rows)
    print(f"{len(rows)} molecules ({len(rows) - n_held} train, {n_held} held out) -> {args.out}")


if __name__ == "__main__":
    main()
