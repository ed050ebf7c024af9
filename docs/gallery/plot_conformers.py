"""
Boltzmann-weighted conformers
=============================

Conformers of a drug-like molecule from the shipped von Mises mixture network, corrected to
the MMFF94 Boltzmann distribution at 300 K by SMC (``mc.sample_conformers``). The histograms
compare, for each rotatable torsion, the network's proposal with the corrected ensemble.
"""

import matplotlib.pyplot as plt
import numpy as np
import torch
from rdkit import Chem

import mcsample as mc
from mcsample.flows.von_mises import load_default

mol = Chem.AddHs(Chem.MolFromSmiles("CC(=O)Nc1ccc(O)cc1CCN(C)C"))
ens = mc.sample_conformers(mol, 1000, generator=torch.Generator().manual_seed(0))
print(ens.diagnostics)

# %%
# The network alone, for comparison.
q = load_default().proposal(ens.target)
theta_q, _ = q.sample_and_log_prob((4000,), generator=torch.Generator().manual_seed(1))
theta_q = torch.remainder(theta_q.double() + torch.pi, 2 * torch.pi) - torch.pi

T = ens.torsions.shape[1]
fig, axes = plt.subplots(1, T, figsize=(3.2 * T, 3.0), sharey=True)
bins = np.linspace(-np.pi, np.pi, 37)
for t, ax in enumerate(np.atleast_1d(axes)):
    ax.hist(theta_q[:, t].numpy(), bins=bins, density=True, alpha=0.5, label="network")
    ax.hist(
        ens.torsions[:, t].numpy(),
        bins=bins,
        weights=ens.weights.numpy(),
        density=True,
        histtype="step",
        lw=2,
        label="Boltzmann (SMC)",
    )
    ax.set_title(f"torsion {ens.target.torsions[t]}", fontsize=9)
    ax.set_xlabel("angle (rad)")
np.atleast_1d(axes)[0].legend(fontsize=8)
fig.tight_layout()
