"""Resampling schemes: validity, unbiased offspring counts, count bounds, zero weights.

Every property test runs on both CPU implementations: the numba kernels (the default on the
CPU) and the torch code (the GPU path), selected through ``resampling.CPU_BACKEND``.

False-failure rates: the z-tests use |z| < 5 per particle and scheme (two-sided p = 5.7e-7), so
with 2 backends x 5 schemes x 12 particles the whole test fails falsely with probability < 7e-5.
"""

import contextlib
import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mcsample as mc
from mcsample import _resampling_numba, resampling

SCHEMES = ["multinomial", "stratified", "systematic", "residual", "ssp"]
BACKENDS = ["numba", "torch"]


@contextlib.contextmanager
def cpu_backend(name):
    old, resampling.CPU_BACKEND = resampling.CPU_BACKEND, name
    try:
        yield
    finally:
        resampling.CPU_BACKEND = old


def resample(backend, *args, **kwargs):
    with cpu_backend(backend):
        return mc.resample(*args, **kwargs)


log_weights = st.lists(
    st.one_of(st.floats(min_value=-30, max_value=30, allow_nan=False), st.just(-math.inf)),
    min_size=1,
    max_size=50,
).filter(lambda v: any(math.isfinite(a) for a in v))


def counts(idx, n):
    return torch.bincount(idx, minlength=n)


def count_se(c, expected, reps):
    """Standard error of mean counts: the sample sd, but never below sqrt(f(1-f)), the least sd
    an integer count with a mean of fractional part f can have (a few repeats may not show it)."""
    f = expected - torch.floor(expected)
    return torch.maximum(c.std(0), torch.sqrt(f * (1 - f))) / math.sqrt(reps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", SCHEMES)
@given(lw=log_weights, num=st.integers(1, 80), seed=st.integers(0, 2**31))
def test_valid_indices_and_no_zero_weight_draws(backend, scheme, lw, num, seed):
    lw = torch.tensor(lw, dtype=torch.float64)
    idx = resample(backend, lw, num, scheme, torch.Generator().manual_seed(seed))
    assert idx.dtype == torch.long and idx.shape == (num,) and idx.device == lw.device
    assert int(idx.min()) >= 0 and int(idx.max()) < lw.numel()
    assert bool(torch.isfinite(lw[idx]).all()), "a zero-weight particle was drawn"
    if scheme != "multinomial":  # every scheme but multinomial returns sorted indices
        assert bool((idx[1:] >= idx[:-1]).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", ["systematic", "ssp"])
@given(lw=log_weights, seed=st.integers(0, 2**31))
def test_counts_are_floor_or_ceil(backend, scheme, lw, seed):
    lw = torch.tensor(lw, dtype=torch.float64)
    n = lw.numel()
    c = counts(resample(backend, lw, None, scheme, torch.Generator().manual_seed(seed)), n)
    nw = n * torch.softmax(lw, 0)
    assert bool((c >= torch.floor(nw - 1e-9)).all()) and bool((c <= torch.ceil(nw + 1e-9)).all())
    assert int(c.sum()) == n


@pytest.mark.parametrize("backend", BACKENDS)
@given(lw=log_weights, seed=st.integers(0, 2**31))
def test_residual_keeps_the_integer_part(backend, lw, seed):
    lw = torch.tensor(lw, dtype=torch.float64)
    n = lw.numel()
    c = counts(resample(backend, lw, None, "residual", torch.Generator().manual_seed(seed)), n)
    assert bool((c >= torch.floor(n * torch.softmax(lw, 0) - 1e-9)).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", SCHEMES)
@given(lw=log_weights, seed=st.integers(0, 2**31), shift=st.sampled_from([-512.0, 3.0, 256.0]))
def test_shift_invariance(backend, scheme, lw, seed, shift):
    lw = torch.tensor(lw, dtype=torch.float64)
    a = resample(backend, lw, None, scheme, torch.Generator().manual_seed(seed))
    b = resample(backend, lw + shift, None, scheme, torch.Generator().manual_seed(seed))
    assert torch.equal(counts(a, lw.numel()), counts(b, lw.numel()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_mean_offspring_is_n_w(backend, scheme):
    g = torch.Generator().manual_seed(11)
    n, reps = 12, 3000
    lw = torch.randn(n, generator=g, dtype=torch.float64) * 1.5
    lw[3] = -math.inf
    expected = n * torch.softmax(lw, 0)
    with cpu_backend(backend):
        c = torch.stack([counts(mc.resample(lw, None, scheme, g), n) for _ in range(reps)])
    c = c.double()
    mean, se = c.mean(0), count_se(c, expected, reps)
    z_ok = (mean - expected).abs() <= 5 * se + 1e-12
    assert bool(z_ok.all()), (scheme, mean, expected, se)
    assert float(c[:, 3].max()) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_systematic_has_lower_variance_than_multinomial(backend):
    g = torch.Generator().manual_seed(5)
    n = 50
    lw = torch.randn(n, generator=g, dtype=torch.float64)
    var = {}
    for scheme in ("multinomial", "systematic"):
        with cpu_backend(backend):
            c = torch.stack([counts(mc.resample(lw, None, scheme, g), n) for _ in range(400)])
        c = c.double()
        var[scheme] = float(c.var(0).sum())
    assert var["systematic"] < 0.5 * var["multinomial"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_extreme_weights(backend, scheme):
    g = torch.Generator().manual_seed(0)
    tiny = math.log(1e-300)
    lw = torch.tensor([tiny, -math.inf, tiny, -math.inf, tiny])
    with cpu_backend(backend):
        for _ in range(50):
            idx = mc.resample(lw, 1000, scheme, g)
            assert set(idx.tolist()) <= {0, 2, 4}
        # float32 log-weights whose weights underflow in float32: still exact in float64
        lw32 = torch.tensor([0.0, -math.inf, -120.0, -math.inf], dtype=torch.float32)
        idx = mc.resample(lw32, 10_000, scheme, g)
        assert set(idx.tolist()) <= {0, 2}
        dominant = torch.tensor([0.0, -1e4, -1e4, -math.inf])
        assert set(mc.resample(dominant, 100, scheme, g).tolist()) == {0}
        # a lone positive weight among zeros at either end gets every draw
        for k in (0, 99):
            one = torch.full((100,), -math.inf, dtype=torch.float64)
            one[k] = -700.0
            assert set(mc.resample(one, 37, scheme, g).tolist()) == {k}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_reproducible_and_errors(backend, scheme):
    lw = torch.randn(100, dtype=torch.float64)
    a = resample(backend, lw, None, scheme, torch.Generator().manual_seed(3))
    b = resample(backend, lw, None, scheme, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with cpu_backend(backend):
        with pytest.raises(ValueError, match="unknown resampling scheme 'bogus'"):
            mc.resample(lw, scheme="bogus")
        with pytest.raises(ValueError, match="all 2 log-weights are -inf"):
            mc.resample(torch.full((2,), -math.inf), scheme=scheme)
        with pytest.raises(ValueError, match="NaN for 1 of 3"):
            mc.resample(torch.tensor([0.0, float("nan"), 0.0]), scheme=scheme)
        with pytest.raises(ValueError, match=r"\+inf entries"):
            mc.resample(torch.tensor([0.0, math.inf]), scheme=scheme)
        with pytest.raises(ValueError, match="1-D"):
            mc.resample(torch.zeros(2, 3), scheme=scheme)
        with pytest.raises(ValueError, match="empty"):
            mc.resample(torch.zeros(0), 5, scheme=scheme)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_large_draws_take_the_bucket_path_unbiased(backend, scheme):
    # num >= 8192 uses the O(N + M) bucket walk for multinomial/residual: same properties
    g = torch.Generator().manual_seed(21)
    n, num, reps = 30, 20_000, 40
    lw = torch.randn(n, generator=g, dtype=torch.float64) * 2
    lw[[0, 7, 29]] = -math.inf
    expected = num * torch.softmax(lw, 0)
    with cpu_backend(backend):
        c = torch.stack([counts(mc.resample(lw, num, scheme, g), n) for _ in range(reps)])
    c = c.double()
    assert bool((c.sum(1) == num).all()) and float(c[:, [0, 7, 29]].max()) == 0.0
    assert bool(((c.mean(0) - expected).abs() <= 5 * count_se(c, expected, reps) + 1e-9).all())
    if scheme == "multinomial":  # i.i.d. draws: Var = num W (1 - W), and random order
        W = expected / num
        assert torch.allclose(c.var(0), num * W * (1 - W), rtol=0.6, atol=1.0)
        idx = resample(backend, lw, num, scheme, g)
        assert not bool((idx[1:] >= idx[:-1]).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_many_zero_weights_large_n(backend, scheme):
    # 99% zero weights among 1e5 particles, num = N and num << N: no zero-weight draw, the
    # systematic/ssp counts stay floor or ceil, and the indices are sorted (not multinomial)
    g = torch.Generator().manual_seed(4)
    n = 100_000
    lw = torch.randn(n, generator=g, dtype=torch.float64) * 3
    lw[torch.rand(n, generator=g) < 0.99] = -math.inf
    nw = n * torch.softmax(lw, 0)
    with cpu_backend(backend):
        for num in (n, 333):
            idx = mc.resample(lw, num, scheme, g)
            assert idx.shape == (num,) and bool(torch.isfinite(lw[idx]).all())
            if scheme != "multinomial":
                assert bool((idx[1:] >= idx[:-1]).all())
        if scheme in ("systematic", "ssp"):
            c = counts(mc.resample(lw, n, scheme, g), n)
            assert bool((c >= torch.floor(nw - 1e-9)).all() and (c <= torch.ceil(nw + 1e-9)).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_input_forms_give_the_same_draws(backend, scheme):
    # float32, non-contiguous and requires_grad inputs: same draws as their float64 copy
    lw = torch.randn(300, dtype=torch.float64).float()
    ref = resample(backend, lw.double(), 500, scheme, torch.Generator().manual_seed(8))
    strided = torch.stack([lw, lw], 1)[:, 0]
    for form in (lw, strided, lw.clone().requires_grad_()):
        idx = resample(backend, form, 500, scheme, torch.Generator().manual_seed(8))
        assert torch.equal(idx, ref)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_cpu_dispatch(scheme):
    # CPU weights go to the numba kernels unless CPU_BACKEND says "torch"
    lw = torch.randn(1000, dtype=torch.float64)
    kernels = {"numba": {**resampling.SCHEMES, **_resampling_numba.SCHEMES}, "torch": resampling.SCHEMES}
    for backend, schemes in kernels.items():
        idx = resample(backend, lw, 1000, scheme, torch.Generator().manual_seed(1))
        direct = schemes[scheme](lw, 1000, torch.Generator().manual_seed(1))
        assert torch.equal(idx, direct)
    a, b = (resample(k, lw, 1000, scheme, torch.Generator().manual_seed(1)) for k in kernels)
    if scheme in ("systematic", "stratified"):
        # same uniforms, same formula E_i: equal but for rounding at a stratum edge (none here)
        assert torch.equal(a, b)
    else:  # other algorithms: the same 1000 indices would be a bug in the dispatch
        assert not torch.equal(a, b)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n", [10, 1000, 100_000])
def test_results_do_not_share_scratch_memory(scheme, n):
    # the compiled kernels reuse buffers within a call; a result must survive the next calls
    lw = torch.randn(n, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    first = resampling.resample(lw, n, scheme=scheme, generator=g)
    kept = first.clone()
    for _ in range(3):
        resampling.resample(lw, n, scheme=scheme, generator=g)
        resampling.resample(lw.flip(0), n // 2 + 1, scheme=scheme, generator=g)
    assert torch.equal(first, kept)


def test_generator_device_check():
    assert resampling._same_device(torch.device("cpu"), torch.device("cpu"))
    assert resampling._same_device(torch.device("cuda:1"), torch.device("cuda:1"))
    assert not resampling._same_device(torch.device("cuda:0"), torch.device("cuda:1"))
    assert not resampling._same_device(torch.device("cpu"), torch.device("cuda:0"))
    with pytest.raises(ValueError, match="generator is on cpu but the log-weights are on meta"):
        resampling.resample(torch.zeros(3, device="meta"), generator=torch.Generator())


def test_fix_total_moves_rounding_leftovers():
    # the safety net for sum(counts) != num after SSP rounding: never onto a zero weight
    w = np.array([0.5, 0.0, 1.0, 1.5, 0.0])
    for counts_in, num in (([1, 0, 1, 1, 0], 5), ([1, 0, 2, 3, 0], 4)):
        c = np.array(counts_in, dtype=np.int64)
        _resampling_numba._fix_total(c, w, float(w.sum()), num)
        assert c.sum() == num and c[1] == c[4] == 0
        assert (np.abs(c - num * w / w.sum()) < 1 + 1e-12).all()


def test_without_numba_the_torch_path_runs(monkeypatch):
    # numba missing: the import fails and CPU weights take the torch code
    monkeypatch.setitem(sys.modules, "mcsample._resampling_numba", None)
    monkeypatch.setattr(resampling, "_NUMBA_SCHEMES", None)
    lw = torch.randn(500, dtype=torch.float64)
    idx = mc.resample(lw, scheme="ssp", generator=torch.Generator().manual_seed(2))
    ref = resampling.SCHEMES["ssp"](lw, 500, torch.Generator().manual_seed(2))
    assert torch.equal(idx, ref) and resampling._NUMBA_SCHEMES == {}
