"""Analysis functions against exact answers (histogram KL, W1 of shifts, two-state free energies).

Most checks are exact identities. The two statistical checks use fixed seeds and bounds of
5 standard errors (false-failure rate < 1e-6 each if the error estimate is right).
"""

from __future__ import annotations

import math

import mdtraj as md
import numpy as np
import pytest
import torch

from mcsample.systems import analysis as A

# ------------------------------------------------------------------------------ weights


def test_weights_normalize_and_errors():
    lw = np.array([0.0, math.log(3.0), -math.inf])
    w = A.normalized_weights(3, log_weights=lw)
    assert np.allclose(w, [0.25, 0.75, 0.0])
    assert np.allclose(A.normalized_weights(3, weights=[1.0, 3.0, 0.0]), w)
    assert np.allclose(A.normalized_weights(3, log_weights=torch.tensor(lw)), w)
    # huge log-weights do not overflow
    assert np.allclose(A.normalized_weights(2, log_weights=[1000.0, 1000.0 + math.log(3)]), [0.25, 0.75])
    assert A.effective_sample_size(weights=[1, 1, 1, 1]) == pytest.approx(4.0)
    assert A.effective_sample_size(log_weights=lw) == pytest.approx(1 / (0.25**2 + 0.75**2))
    with pytest.raises(ValueError, match="NaN"):
        A.normalized_weights(2, log_weights=[0.0, float("nan")])
    with pytest.raises(ValueError, match="-inf"):
        A.normalized_weights(2, log_weights=[-math.inf, -math.inf])
    with pytest.raises(ValueError, match="length"):
        A.normalized_weights(3, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="non-negative"):
        A.normalized_weights(2, weights=[1.0, -2.0])


def test_statistical_inefficiency_of_ar1():
    """AR(1) with coefficient ρ has g = (1+ρ)/(1-ρ); i.i.d. noise has g ≈ 1."""
    rng = np.random.default_rng(0)
    n, rho = 200_000, 0.6
    e = rng.standard_normal(n)
    x = np.empty(n)
    x[0] = e[0]
    for t in range(1, n):
        x[t] = rho * x[t - 1] + math.sqrt(1 - rho**2) * e[t]
    g = A.statistical_inefficiency(x)
    assert abs(g - (1 + rho) / (1 - rho)) < 0.15 * 4.0, g
    assert A.statistical_inefficiency(rng.standard_normal(n)) < 1.1


# ------------------------------------------------------------------------------ KL


def test_kl_of_identical_histograms_is_zero_and_weights_equal_repeats():
    rng = np.random.default_rng(1)
    a = rng.uniform(-math.pi, math.pi, size=(500, 2))
    assert A.torsion_kl(a, a) == 0.0
    # integer weights are the same as repeating samples
    w = rng.integers(1, 4, size=500)
    rep = np.repeat(a, w, axis=0)
    assert A.torsion_kl(a, rep, weights_p=w) == pytest.approx(0.0, abs=1e-12)
    assert A.torsion_kl(a, rep, log_weights_p=np.log(w)) == pytest.approx(0.0, abs=1e-12)


def test_kl_of_disjoint_point_masses_is_the_pseudocount_formula():
    eps, bins = 1e-6, 60
    p = np.array([[0.1, 0.1]])
    q = np.array([[-2.0, 1.0]])
    expected = math.log((1 + eps) / eps) / (1 + bins * bins * eps)
    assert A.torsion_kl(p, q, bins=bins, pseudocount=eps) == pytest.approx(expected, rel=1e-12)


def test_kl_treats_pi_and_minus_pi_as_the_same_bin():
    assert A.torsion_kl(np.array([[math.pi, 0.0]]), np.array([[-math.pi, 0.0]])) == 0.0


# ------------------------------------------------------------------------------ Wasserstein


def test_energy_w1_of_shift_is_the_shift_and_uses_weights():
    rng = np.random.default_rng(2)
    e = rng.normal(-100.0, 12.0, size=1000)
    w = rng.uniform(0.1, 2.0, size=1000)
    assert A.energy_wasserstein(e, e + 3.5) == pytest.approx(3.5, rel=1e-12)
    assert A.energy_wasserstein(e, e + 3.5, weights_p=w, weights_q=w) == pytest.approx(3.5, rel=1e-12)
    # weights matter: two points 0 and 1 with weights (1, 3) vs (3, 1): W1 = |0.75 - 0.25| = 0.5
    assert A.energy_wasserstein([0.0, 1.0], [0.0, 1.0], weights_p=[1, 3], weights_q=[3, 1]) == pytest.approx(0.5)


def test_energy_wasserstein_ignores_a_clash_of_negligible_weight():
    """Importance draws include clashes at 1e9 kT whose weights are 1e-200: their mass is
    nothing, and W2 is the one of the other draws. (Ten weights of 0.1 sum to 1 - 1e-16 in
    float64; the quantile coupling used to hand that gap to the largest draw, 10 kT of W2.) A
    clash of real weight still counts."""
    e, w, ref = np.arange(10.0), np.full(10, 0.1), np.array([1.0, 3.0, 5.0, 8.0])
    clean = A.energy_wasserstein(e, ref, weights_p=w, p=2)
    assert clean == pytest.approx(math.sqrt(0.75), rel=1e-12)
    clash = A.energy_wasserstein(np.append(e, 1e9), ref, weights_p=np.append(w, 1e-200), p=2)
    assert clash == pytest.approx(clean, rel=1e-12)
    real = A.energy_wasserstein(np.append(e, 1e9), ref, weights_p=np.append(w, 1e-6), p=2)
    assert real > 1e5


@pytest.mark.parametrize("p", [1, 2])
def test_circular_wasserstein_of_shift_and_wraparound(p):
    rng = np.random.default_rng(3)
    a = rng.uniform(-0.5, 0.5, size=200)
    assert A.circular_wasserstein(a, a + 0.3, p=p) == pytest.approx(0.3, abs=1e-6)
    # across ±π the ground distance is the short arc: 3.0 to -3.0 is 2π - 6
    assert A.circular_wasserstein([3.0], [-3.0], p=p) == pytest.approx(2 * math.pi - 6.0, abs=1e-6)
    # weights: masses (1,3) vs (3,1) on the points 0 and 1: W1 = 0.5·1
    if p == 1:
        assert A.circular_wasserstein([0.0, 1.0], [0.0, 1.0], [1, 3], [3, 1]) == pytest.approx(0.5, abs=1e-6)


def test_torus_wasserstein_of_shift_and_wraparound():
    rng = np.random.default_rng(4)
    a = rng.uniform(-0.3, 0.3, size=(150, 2))
    shift = np.array([0.2, -0.1])
    assert A.torus_wasserstein(a, a + shift) == pytest.approx(np.hypot(*shift), abs=1e-9)
    assert A.torus_wasserstein(a, a + shift, p=1) == pytest.approx(np.hypot(*shift), abs=1e-9)
    b = np.array([[3.0, -3.0]])
    c = np.array([[-3.0, 3.0]])
    assert A.torus_wasserstein(b, c) == pytest.approx(math.sqrt(2) * (2 * math.pi - 6), abs=1e-9)
    # subsampling large sets still gives the shift (every subsample is a shifted copy's subsample)
    big = rng.uniform(-0.3, 0.3, size=(3000, 2))
    assert A.torus_wasserstein(big, big, max_samples=500) < 0.1


# ------------------------------------------------------------------------------ free energies


def test_free_energy_difference_exact_two_state():
    phi = np.r_[np.full(300, 1.0), np.full(700, -1.5)]
    r = A.free_energy_difference(phi)
    assert r.p_positive == pytest.approx(0.3)
    assert r.value == pytest.approx(-math.log(0.3 / 0.7))
    assert r.stderr == pytest.approx(math.sqrt(0.3 * 0.7 / 1000) / (0.3 * 0.7))
    # weights (1 for φ>0, 3 for φ<0) on a half/half sample: p = 1/4; kT scales
    phi2 = np.r_[np.full(50, 2.0), np.full(50, -2.0)]
    w = np.r_[np.ones(50), 3 * np.ones(50)]
    r2 = A.free_energy_difference(phi2, weights=w, kT=2.5)
    assert r2.value == pytest.approx(-2.5 * math.log(1 / 3))
    assert r2.ess == pytest.approx(1 / (50 * (1 / 200) ** 2 + 50 * (3 / 200) ** 2))
    # an empty region
    assert A.free_energy_difference(np.full(10, -1.0)).value == math.inf


def test_free_energy_difference_importance_weighted_sample():
    """Target: φ>0 with probability 0.2; proposal draws φ>0 half of the time. |err| < 5 σ."""
    rng = np.random.default_rng(5)
    n = 20_000
    pos = rng.uniform(size=n) < 0.5
    phi = np.where(pos, rng.uniform(0.1, 3.0, n), rng.uniform(-3.0, -0.1, n))
    log_w = np.where(pos, math.log(0.2 / 0.5), math.log(0.8 / 0.5))
    r = A.free_energy_difference(phi, log_weights=log_w)
    truth = -math.log(0.2 / 0.8)
    assert abs(r.value - truth) < 5 * r.stderr
    assert 0.01 < r.stderr < 0.05


def test_ramachandran_free_energy_of_known_histogram(tmp_path):
    # two bins with probability ratio e : 1 → free energies differ by exactly 1 kT
    phi = np.array([-1.0, 1.0])
    psi = np.array([0.5, 0.5])
    F, edges = A.ramachandran_free_energy(phi, psi, weights=[math.e, 1.0], bins=36)
    finite = F[np.isfinite(F)]
    assert sorted(finite.tolist()) == pytest.approx([0.0, 1.0])
    assert edges[0] == -math.pi and edges[-1] == pytest.approx(math.pi)
    F2, _ = A.ramachandran_free_energy(phi, psi, weights=[math.e, 1.0], bins=36, kT=2.5)
    assert np.nanmax(np.where(np.isfinite(F2), F2, np.nan)) == pytest.approx(2.5)
    out = A.plot_ramachandran(
        np.random.default_rng(0).uniform(-3, 3, 500),
        np.random.default_rng(1).uniform(-3, 3, 500),
        tmp_path / "r" / "rama.png",
        title="test",
    )
    with open(out, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_energy_histogram_integrates_to_one_and_plot(tmp_path):
    rng = np.random.default_rng(6)
    e = rng.normal(size=1000)
    dens, edges = A.energy_histogram(e, weights=rng.uniform(size=1000), bins=40)
    assert np.sum(dens * np.diff(edges)) == pytest.approx(1.0)
    out = A.plot_energy_histograms({"a": e, "b": (e + 1, np.ones(1000))}, tmp_path / "e.png")
    with open(out, "rb") as fh:
        assert fh.read(4) == b"\x89PNG"


def test_ramachandran_angles_of_alanine_dipeptide():
    from mcsample.systems.peptides import alanine_dipeptide

    pep = alanine_dipeptide("vacuum")
    x = pep.positions[None].repeat(3, 1, 1).numpy()
    traj = md.Trajectory(x.astype(np.float32), pep.topology)
    phi, psi = A.ramachandran_angles(traj)
    phi2, psi2 = A.ramachandran_angles(x, topology=pep.topology)
    assert phi.shape == (3,) and np.allclose(phi, phi2) and np.allclose(psi, psi2)
    _, ref = md.compute_phi(traj)
    assert np.allclose(phi, ref[:, 0])
    with pytest.raises(ValueError, match="topology"):
        A.ramachandran_angles(x)
