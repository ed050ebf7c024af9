"""Internal coordinates: Z-matrix, exact round trip, exact log|det J|, the internal-coordinate target.

All checks here are deterministic (fixed seeds, exact identities up to float64 round-off):
no false-failure rate to state.
"""

from __future__ import annotations

import math

import mdtraj as md
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mcsample.systems.coordinates import (
    InternalCoordinates,
    InternalCoordinateTarget,
    bond_angles,
    dihedral_angles,
    nerf_place,
    zmatrix_from_topology,
)
from mcsample.systems.peptides import alanine_dipeptide


@pytest.fixture(scope="module")
def ala2():
    return alanine_dipeptide("obc1")


@pytest.fixture(scope="module")
def ic(ala2):
    return InternalCoordinates.from_topology(ala2.topology)


def _random_rotation(gen, dtype=torch.float64):
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=dtype))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _configs(ala2, n=8, noise=0.01, seed=0):
    """Minimized structure, perturbed, randomly rotated and translated (float64, nm)."""
    gen = torch.Generator().manual_seed(seed)
    x = ala2.positions[None].repeat(n, 1, 1)
    x = x + noise * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    rot = torch.stack([_random_rotation(gen) for _ in range(n)])
    shift = torch.randn(n, 1, 3, generator=gen, dtype=torch.float64)
    return x @ rot.transpose(1, 2) + shift


def _name(top, i):
    a = top.atom(int(i))
    return f"{a.residue.name}:{a.name}"


# ------------------------------------------------------------------------------ Z-matrix


def test_zmatrix_backbone_first_heavy_before_hydrogens_bonded_references(ala2):
    top = ala2.topology
    z = zmatrix_from_topology(top)
    names = [_name(top, i) for i in z[:, 0]]
    assert names[:7] == ["ACE:CH3", "ACE:C", "ALA:N", "ALA:CA", "ALA:C", "NME:N", "NME:C"]
    is_h = np.array([top.atom(int(i)).element.symbol == "H" for i in z[:, 0]])
    assert not is_h[:10].any() and is_h[10:].all()
    bonds = {frozenset((b[0].index, b[1].index)) for b in top.bonds}
    for k, (i, a, b, c) in enumerate(z):
        if k >= 1:
            assert frozenset((i, a)) in bonds, f"row {k}: {names[k]} not bonded to its reference"
        if k >= 3:
            assert frozenset((a, b)) in bonds
            # c bonded to b (proper torsion) or to a (improper, sibling reference)
            assert frozenset((b, c)) in bonds or frozenset((a, c)) in bonds


def test_backbone_phi_psi_are_zmatrix_torsions(ala2, ic):
    """φ and ψ of the Ramachandran plot are single internal coordinates (flows see them directly)."""
    x = _configs(ala2, n=4)
    z = ic.to_internal(x)
    traj = md.Trajectory(x.numpy().astype(np.float32), ala2.topology)
    phi_idx, phi = md.compute_phi(traj)
    psi_idx, psi = md.compute_psi(traj)
    tors = ic.torsion_atoms()  # rows (i, a, b, c); dihedral(i,a,b,c) == dihedral(c,b,a,i)
    for idx, ref in ((phi_idx[0], phi[:, 0]), (psi_idx[0], psi[:, 0])):
        k = [r for r in range(len(tors)) if list(tors[r][::-1]) == list(idx)]
        assert len(k) == 1 and ic.torsion_index(idx) == k[0]
        got = z[:, ic.torsion_slice][:, k[0]].numpy()
        assert np.abs(np.angle(np.exp(1j * (got - ref)))).max() < 1e-5
    with pytest.raises(KeyError, match="not a torsion"):
        ic.torsion_index([0, 1, 2, 3])


def test_zmatrix_errors_name_the_problem():
    top = md.Topology()
    chain = top.add_chain()
    res = top.add_residue("MOL", chain)
    atoms = [top.add_atom(f"C{i}", md.element.carbon, res) for i in range(4)]
    top.add_bond(atoms[0], atoms[1])
    top.add_bond(atoms[1], atoms[2])
    with pytest.raises(ValueError, match="not connected"):
        zmatrix_from_topology(top)
    with pytest.raises(ValueError, match="at least 3 atoms"):
        t2 = md.Topology()
        r2 = t2.add_residue("X", t2.add_chain())
        t2.add_atom("C", md.element.carbon, r2)
        zmatrix_from_topology(t2)
    with pytest.raises(ValueError, match="placed earlier"):
        InternalCoordinates(np.array([[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, -1], [3, 3, 1, 0]]))


def test_generic_molecule_without_backbone_round_trips():
    """A branched molecule with no residue names (neopentanol-like heavy skeleton + H)."""
    top = md.Topology()
    res = top.add_residue("LIG", top.add_chain())
    C = [top.add_atom(f"C{i}", md.element.carbon, res) for i in range(5)]
    O = top.add_atom("O1", md.element.oxygen, res)
    for i in range(1, 5):
        top.add_bond(C[0], C[i])
    top.add_bond(C[1], O)
    hs = []
    for parent, count in ((C[1], 2), (C[2], 3), (C[3], 3), (C[4], 3), (O, 1)):
        for _ in range(count):
            h = top.add_atom("H", md.element.hydrogen, res)
            top.add_bond(parent, h)
            hs.append(h)
    z = zmatrix_from_topology(top)
    assert z[0, 0] == C[0].index  # the most connected heavy atom starts
    t = InternalCoordinates(z)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, top.n_atoms, 3, generator=gen, dtype=torch.float64) * 0.2
    x2, _ = t.to_cartesian(t.to_internal(x))
    assert (x2 - x).abs().max() < 1e-9


# ------------------------------------------------------------------------------ geometry


def test_nerf_places_exactly():
    gen = torch.Generator().manual_seed(2)
    xa, xb, xc = torch.randn(3, 50, 3, generator=gen, dtype=torch.float64)
    r = 0.1 + torch.rand(50, generator=gen, dtype=torch.float64)
    theta = 0.1 + 2.9 * torch.rand(50, generator=gen, dtype=torch.float64)
    phi = (2 * torch.rand(50, generator=gen, dtype=torch.float64) - 1) * math.pi
    x = nerf_place(xa, xb, xc, r, theta, phi)
    assert torch.allclose((x - xa).norm(dim=-1), r, atol=1e-12)
    assert torch.allclose(bond_angles(x, xa, xb), theta, atol=1e-10)
    assert torch.allclose(dihedral_angles(x, xa, xb, xc), phi, atol=1e-10)


def test_dihedral_matches_mdtraj(ala2):
    x = _configs(ala2, n=5, noise=0.05)
    traj = md.Trajectory(x.numpy().astype(np.float32), ala2.topology)
    quads = np.array([[0, 1, 4, 6], [4, 6, 8, 14], [6, 8, 14, 16], [8, 14, 16, 18], [10, 8, 6, 7]])
    ref = md.compute_dihedrals(traj, quads)
    xs = x.float().double()
    got = dihedral_angles(*(xs[:, quads[:, k]] for k in range(4))).numpy()
    assert np.abs(np.angle(np.exp(1j * (got - ref)))).max() < 1e-5


# ------------------------------------------------------------------------------ bijection


def test_round_trip_float64_below_1e6_nm(ala2, ic):
    x = _configs(ala2, n=16, noise=0.03)
    z = ic.to_internal(x)
    x2, _ = ic.to_cartesian(z)
    err = (x2 - x).norm(dim=-1).max().item()
    assert err < 1e-6, err
    assert err < 1e-12  # what float64 actually gives (1e-6 nm would be enough for the weights)
    z2 = ic.to_internal(x2)
    diff = torch.remainder(z2 - z + math.pi, 2 * math.pi) - math.pi
    assert diff.abs().max() < 1e-10


def test_round_trip_float32(ala2, ic):
    x = _configs(ala2, n=16, noise=0.03).float()
    x2, ld = ic.to_cartesian(ic.to_internal(x))
    assert x2.dtype == torch.float32 and ld.dtype == torch.float32
    assert (x2 - x).norm(dim=-1).max() < 1e-4  # ~1e-6 relative to positions of order 1 nm


def test_ranges(ala2, ic):
    z = ic.to_internal(_configs(ala2, n=64, noise=0.05))
    assert (z[:, ic.bond_slice] > 0).all()
    ang = z[:, ic.angle_slice]
    assert ((ang > 0) & (ang < math.pi)).all()
    tor = z[:, ic.torsion_slice]
    assert ((tor > -math.pi) & (tor <= math.pi)).all()
    assert ((z[:, 3] > 0) & (z[:, 3] < math.pi)).all()
    assert ic.circular_mask.sum() == ic.n_atoms - 3 + 2
    assert ic.dim == 3 * 22 and z.shape == (64, 66)


@settings(max_examples=25)
@given(seed=st.integers(0, 2**31 - 1))
def test_internal_to_cartesian_to_internal_is_identity(seed):
    """Random valid internal coordinates (any torsions, angles in (0.2, π-0.2)) come back exactly."""
    ic = _ALA2_IC
    gen = torch.Generator().manual_seed(seed)
    B = 4
    z = torch.empty(B, ic.dim, dtype=torch.float64)
    z[:, 0:3] = torch.randn(B, 3, generator=gen, dtype=torch.float64)
    z[:, 3] = 0.2 + (math.pi - 0.4) * torch.rand(B, generator=gen, dtype=torch.float64)
    z[:, 4:6] = (2 * torch.rand(B, 2, generator=gen, dtype=torch.float64) - 1) * math.pi
    z[:, ic.bond_slice] = 0.09 + 0.08 * torch.rand(B, ic.n_atoms - 1, generator=gen, dtype=torch.float64)
    z[:, ic.angle_slice] = 0.2 + (math.pi - 0.4) * torch.rand(B, ic.n_atoms - 2, generator=gen, dtype=torch.float64)
    z[:, ic.torsion_slice] = (2 * torch.rand(B, ic.n_atoms - 3, generator=gen, dtype=torch.float64) - 1) * math.pi
    x, _ = ic.to_cartesian(z)
    z2 = ic.to_internal(x)
    diff = torch.remainder(z2 - z + math.pi, 2 * math.pi) - math.pi
    assert diff.abs().max() < 1e-9


_ALA2_IC = InternalCoordinates(
    np.array(  # the Z-matrix zmatrix_from_topology builds for openmmtools' alanine dipeptide
        [
            [1, -1, -1, -1],
            [4, 1, -1, -1],
            [6, 4, 1, -1],
            [8, 6, 4, 1],
            [14, 8, 6, 4],
            [16, 14, 8, 6],
            [18, 16, 14, 8],
            [5, 4, 1, 6],
            [10, 8, 6, 14],
            [15, 14, 8, 16],
            [0, 1, 4, 6],
            [2, 1, 4, 0],
            [3, 1, 4, 0],
            [7, 6, 4, 8],
            [9, 8, 6, 14],
            [17, 16, 14, 18],
            [19, 18, 16, 14],
            [20, 18, 16, 19],
            [21, 18, 16, 19],
            [11, 10, 8, 6],
            [12, 10, 8, 11],
            [13, 10, 8, 11],
        ]
    )
)


def test_hardcoded_zmatrix_is_the_built_one(ic):
    assert np.array_equal(ic.zmatrix, _ALA2_IC.zmatrix)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_log_det_jacobian_matches_autograd(ala2, ic, seed):
    """log|det ∂x/∂z| (66×66) from the closed form vs slogdet of autograd's Jacobian."""
    z = ic.to_internal(_configs(ala2, n=1, noise=0.02, seed=seed))[0]
    J = torch.autograd.functional.jacobian(lambda v: ic.to_cartesian(v[None])[0].reshape(-1), z)
    sign, logabs = torch.linalg.slogdet(J)
    _, ld = ic.to_cartesian(z[None])
    assert sign != 0
    assert abs(float(logabs - ld[0])) < 1e-9, (float(logabs), float(ld[0]))


def test_log_det_inverse_direction(ala2, ic):
    """The inverse map's Jacobian determinant is the reciprocal: log|det ∂z/∂x| = -log|det ∂x/∂z|."""
    x = _configs(ala2, n=1, noise=0.02, seed=5)[0]
    J = torch.autograd.functional.jacobian(lambda v: ic.to_internal(v[None])[0], x).reshape(66, 66)
    _, logabs = torch.linalg.slogdet(J)
    _, ld = ic.to_cartesian(ic.to_internal(x[None]))
    assert abs(float(logabs + ld[0])) < 1e-8


def test_gradients_flow_and_device_buffers_move(ala2, ic):
    z = ic.to_internal(_configs(ala2, n=3)).requires_grad_(True)
    x, ld = ic.to_cartesian(z)
    (x.square().sum() + ld.sum()).backward()
    assert torch.isfinite(z.grad).all()
    # buffers follow the module to any device, and nothing in either direction leaves it
    # (the meta device runs shapes only: any .cpu()/.numpy() of data would raise)
    moved = InternalCoordinates(ic.zmatrix).to("meta")
    xm, ldm = moved.to_cartesian(z.detach().to("meta"))
    assert xm.device.type == "meta" and xm.shape == (3, 22, 3) and ldm.shape == (3,)
    assert moved.to_internal(xm).shape == (3, 66)


# ------------------------------------------------------------------------------ target


def test_internal_target_density_is_energy_plus_jacobian(ala2):
    tgt = InternalCoordinateTarget(ala2)
    x = _configs(ala2, n=6, noise=0.005)
    z = tgt.to_internal(x)
    lp = tgt.log_prob(z)
    _, ld = tgt.transform.to_cartesian(z)
    expected = ala2.log_prob(x) + ld
    assert torch.allclose(lp, expected, atol=1e-8, rtol=0)
    assert tgt.event_shape == (66,)


def test_fixed_rigid_target_is_the_marginal(ala2):
    """With the rigid part fixed: same energy, Jacobian without log sin p, any rigid values."""
    full = InternalCoordinateTarget(ala2)
    fixed = InternalCoordinateTarget(ala2, fix_rigid=True)
    assert fixed.event_shape == (60,) and fixed.circular_mask.sum() == 19
    x = _configs(ala2, n=6, noise=0.005, seed=3)
    z = full.to_internal(x)
    lp_full = full.log_prob(z)
    lp_fixed = fixed.log_prob(z[:, 6:])
    assert torch.allclose(lp_fixed, lp_full - torch.log(torch.sin(z[:, 3])), atol=1e-6, rtol=0)
    # the fixed frame reproduces the reference structure exactly
    xr, _ = fixed.to_cartesian(fixed.to_internal(ala2.positions[None]))
    assert (xr - ala2.positions[None]).abs().max() < 1e-12
    # energies do not depend on which rigid-body values are fixed
    other = InternalCoordinateTarget(ala2, fix_rigid=True, reference=x[0])
    assert torch.allclose(other.log_prob(z[:, 6:]), lp_fixed, atol=1e-6, rtol=0)


def test_target_outside_domain_is_minus_inf_and_gradient_finite(ala2):
    tgt = InternalCoordinateTarget(ala2, fix_rigid=True)
    z = tgt.to_internal(_configs(ala2, n=3)).clone()
    z[0, 0] = -0.1  # negative bond
    z[1, tgt.transform.n_atoms - 1] = 3.3  # angle > π (first angle sits after the n-1 bonds)
    z.requires_grad_(True)
    lp = tgt.log_prob(z)
    assert lp[0] == -math.inf and lp[1] == -math.inf and torch.isfinite(lp[2])
    lp[2].backward()
    assert torch.isfinite(z.grad).all()
    # torsions are periodic: shifting one by 2π changes nothing
    z2 = z.detach()[2:3].clone()
    z3 = z2.clone()
    z3[0, -1] += 2 * math.pi
    assert torch.allclose(tgt.log_prob(z2), tgt.log_prob(z3), atol=1e-8)


def test_shape_errors(ala2, ic):
    with pytest.raises(ValueError, match=r"\(B, 22, 3\)"):
        ic.to_internal(torch.zeros(2, 21, 3))
    with pytest.raises(ValueError, match=r"\(B, 66\)"):
        ic.to_cartesian(torch.zeros(2, 60))
    with pytest.raises(ValueError, match=r"\(B, 60\)"):
        InternalCoordinateTarget(ala2, fix_rigid=True).log_prob(torch.zeros(2, 66))
