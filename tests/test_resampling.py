"""Resampling schemes: validity, unbiased offspring counts, count bounds, zero weights.

False-failure rates: the z-tests use |z| < 5 per particle and scheme (two-sided p = 5.7e-7), so
with 5 schemes x 12 particles the whole test fails falsely with probability < 4e-5.
"""

import math

import pytest
import torch
from hypothesis import given, strategies as st

import mcsample as mc

SCHEMES = ["multinomial", "stratified", "systematic", "residual", "ssp"]

log_weights = st.lists(
    st.one_of(st.floats(min_value=-30, max_value=30, allow_nan=False), st.just(-math.inf)),
    min_size=1, max_size=50,
).filter(lambda v: any(math.isfinite(a) for a in v))


def counts(idx, n):
    return torch.bincount(idx, minlength=n)


def count_se(c, expected, reps):
    """Standard error of mean counts: the sample sd, but never below sqrt(f(1-f)), the least sd
    an integer count with a mean of fractional part f can have (a few repeats may not show it)."""
    f = expected - torch.floor(expected)
    return torch.maximum(c.std(0), torch.sqrt(f * (1 - f))) / math.sqrt(reps)


@pytest.mark.parametrize("scheme", SCHEMES)
@given(lw=log_weights, num=st.integers(1, 80), seed=st.integers(0, 2**31))
def test_valid_indices_and_no_zero_weight_draws(scheme, lw, num, seed):
    lw = torch.tensor(lw, dtype=torch.float64)
    idx = mc.resample(lw, num, scheme, torch.Generator().manual_seed(seed))
    assert idx.dtype == torch.long and idx.shape == (num,)
    assert int(idx.min()) >= 0 and int(idx.max()) < lw.numel()
    assert bool(torch.isfinite(lw[idx]).all()), "a zero-weight particle was drawn"


@pytest.mark.parametrize("scheme", ["systematic", "ssp"])
@given(lw=log_weights, seed=st.integers(0, 2**31))
def test_counts_are_floor_or_ceil(scheme, lw, seed):
    lw = torch.tensor(lw, dtype=torch.float64)
    n = lw.numel()
    c = counts(mc.resample(lw, None, scheme, torch.Generator().manual_seed(seed)), n)
    nw = n * torch.softmax(lw, 0)
    assert bool((c >= torch.floor(nw - 1e-9)).all()) and bool((c <= torch.ceil(nw + 1e-9)).all())
    assert int(c.sum()) == n


@given(lw=log_weights, seed=st.integers(0, 2**31))
def test_residual_keeps_the_integer_part(lw, seed):
    lw = torch.tensor(lw, dtype=torch.float64)
    n = lw.numel()
    c = counts(mc.resample(lw, None, "residual", torch.Generator().manual_seed(seed)), n)
    assert bool((c >= torch.floor(n * torch.softmax(lw, 0) - 1e-9)).all())


@pytest.mark.parametrize("scheme", SCHEMES)
@given(lw=log_weights, seed=st.integers(0, 2**31), shift=st.sampled_from([-512.0, 3.0, 256.0]))
def test_shift_invariance(scheme, lw, seed, shift):
    lw = torch.tensor(lw, dtype=torch.float64)
    a = mc.resample(lw, None, scheme, torch.Generator().manual_seed(seed))
    b = mc.resample(lw + shift, None, scheme, torch.Generator().manual_seed(seed))
    assert torch.equal(counts(a, lw.numel()), counts(b, lw.numel()))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_mean_offspring_is_n_w(scheme):
    g = torch.Generator().manual_seed(11)
    n, reps = 12, 3000
    lw = torch.randn(n, generator=g, dtype=torch.float64) * 1.5
    lw[3] = -math.inf
    expected = n * torch.softmax(lw, 0)
    c = torch.stack([counts(mc.resample(lw, None, scheme, g), n) for _ in range(reps)]).double()
    mean, se = c.mean(0), count_se(c, expected, reps)
    z_ok = (mean - expected).abs() <= 5 * se + 1e-12
    assert bool(z_ok.all()), (scheme, mean, expected, se)
    assert float(c[:, 3].max()) == 0.0


def test_systematic_has_lower_variance_than_multinomial():
    g = torch.Generator().manual_seed(5)
    n = 50
    lw = torch.randn(n, generator=g, dtype=torch.float64)
    var = {}
    for scheme in ("multinomial", "systematic"):
        c = torch.stack([counts(mc.resample(lw, None, scheme, g), n) for _ in range(400)]).double()
        var[scheme] = float(c.var(0).sum())
    assert var["systematic"] < 0.5 * var["multinomial"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_extreme_weights(scheme):
    g = torch.Generator().manual_seed(0)
    tiny = math.log(1e-300)
    lw = torch.tensor([tiny, -math.inf, tiny, -math.inf, tiny])
    for _ in range(50):
        idx = mc.resample(lw, 1000, scheme, g)
        assert set(idx.tolist()) <= {0, 2, 4}
    # float32 log-weights whose weights underflow in float32: still exact in float64
    lw32 = torch.tensor([0.0, -math.inf, -120.0, -math.inf], dtype=torch.float32)
    idx = mc.resample(lw32, 10_000, scheme, g)
    assert set(idx.tolist()) <= {0, 2}
    dominant = torch.tensor([0.0, -1e4, -1e4, -math.inf])
    assert set(mc.resample(dominant, 100, scheme, g).tolist()) == {0}


def test_reproducible_and_errors():
    lw = torch.randn(100, dtype=torch.float64)
    a = mc.resample(lw, scheme="stratified", generator=torch.Generator().manual_seed(3))
    b = mc.resample(lw, scheme="stratified", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown resampling scheme 'bogus'"):
        mc.resample(lw, scheme="bogus")
    with pytest.raises(ValueError, match="all 2 log-weights are -inf"):
        mc.resample(torch.full((2,), -math.inf))
    with pytest.raises(ValueError, match="NaN for 1 of 3"):
        mc.resample(torch.tensor([0.0, float("nan"), 0.0]))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_large_draws_take_the_bucket_path_unbiased(scheme):
    # num >= 8192 uses the O(N + M) bucket walk for multinomial/residual: same properties
    g = torch.Generator().manual_seed(21)
    n, num, reps = 30, 20_000, 40
    lw = torch.randn(n, generator=g, dtype=torch.float64) * 2
    lw[[0, 7, 29]] = -math.inf
    expected = num * torch.softmax(lw, 0)
    c = torch.stack([counts(mc.resample(lw, num, scheme, g), n) for _ in range(reps)]).double()
    assert bool((c.sum(1) == num).all()) and float(c[:, [0, 7, 29]].max()) == 0.0
    assert bool(((c.mean(0) - expected).abs() <= 5 * count_se(c, expected, reps) + 1e-9).all())
    if scheme == "multinomial":  # i.i.d. draws: Var = num W (1 - W), and random order
        W = expected / num
        assert torch.allclose(c.var(0), num * W * (1 - W), rtol=0.6, atol=1.0)
        idx = mc.resample(lw, num, scheme, g)
        assert not bool((idx[1:] >= idx[:-1]).all())
