"""A particle population sharded over processes (``mcsample.distributed``), on gloo over loopback.

Each launch starts 2 or 4 CPU processes, as ``torchrun`` would (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR=127.0.0.1`` and a free port), that run this file's ``__main__`` checks and save
what they found; the tests compare that with the same computation on the whole population in
this process. Every launch has a timeout, so that a hang fails instead of blocking the suite.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mcsample as mc
from mcsample import distributed as D
from mcsample.weighted import Genealogy, WeightedSamples

F64 = torch.float64
N_POP = 1003  # not a multiple of 2 or 4: unequal shares
LAUNCH_TIMEOUT = 120


# ---------------------------------------------------------------------------------------------
# shared inputs: every rank and this process build the same global population


def population(case: str, n: int = N_POP):
    """Global log-weights of one test case (float64)."""
    g = torch.Generator().manual_seed(123)
    lw = 2.0 * torch.randn(n, dtype=F64, generator=g)
    if case == "empty_rank":  # the second share carries no weight at all: zero offspring there
        lo, hi = _bounds(n, 2, 1)
        lw[lo:hi] = -math.inf
    elif case == "one_heavy":  # one particle holds almost all the weight
        lw[7] = 40.0
    return lw


def _bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    sizes = D.balanced_sizes(n, world)
    lo = sum(sizes[:rank])
    return lo, lo + sizes[rank]


def reference_stratified(lw: torch.Tensor, key: int) -> torch.Tensor:
    """Offspring counts of stratified resampling of the whole population, by binary search
    over the normalized cumulative weights, with the uniforms of the keyed stream."""
    n = lw.numel()
    u = D._keyed_uniforms(key, 0, n)
    cdf = torch.cumsum(torch.exp(lw - lw.max()), 0)
    cdf = cdf / cdf[-1]
    draws = (torch.arange(n, dtype=F64) + u) / n
    idx = torch.searchsorted(cdf, draws, right=True).clamp(max=n - 1)
    return torch.bincount(idx, minlength=n)


def shared_draws(seed: int, scheme: str) -> tuple[float, int]:
    """What rank 0 draws from ``Generator().manual_seed(seed)``: U, then the key."""
    g = torch.Generator().manual_seed(seed)
    U = float(torch.rand((), dtype=F64, generator=g))
    if scheme == "systematic":
        return U, 0
    hi, lo = (int(v) for v in torch.randint(0, 2**31, (2,), generator=g))
    return U, (hi << 31) | lo


def gaussian_target():
    from mcsample.systems.analytic import Gaussian

    return Gaussian(
        torch.tensor([1.0, -0.5, 2.0], dtype=F64), torch.diag(torch.tensor([0.3, 0.5, 0.2], dtype=F64)), log_scale=1.5
    )


def broad_initial():
    return torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(3, dtype=F64), 3.0 * torch.ones(3, dtype=F64)), 1
    )


# ---------------------------------------------------------------------------------------------
# the checks each rank runs (python tests/test_distributed.py CHECK OUTDIR)


def tds_problem():
    """Twisted diffusion sampling of a 3-d Gaussian prior observed through a 2x3 operator."""
    from mcsample import posterior as P
    from mcsample.flows.diffusion.gmm import GaussianMixtureDiffusion
    from mcsample.flows.diffusion.schedules import VPSchedule
    from mcsample.systems.inverse_problems import DenseOperator

    m = torch.tensor([1.0, -0.5, 0.3], dtype=F64)
    C = torch.tensor([[1.0, 0.6, 0.1], [0.6, 0.8, 0.0], [0.1, 0.0, 0.5]], dtype=F64)
    model = GaussianMixtureDiffusion(torch.ones(1, dtype=F64), m[None], C[None], VPSchedule("linear", beta_max=20.0))
    op = DenseOperator(torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.3, -0.8]], dtype=F64), 0.2)
    return P.TDS(model, op, torch.tensor([1.5, -0.4], dtype=F64), num_steps=15, grid="log_snr")


def check_resampling(rank: int, world: int, out: dict, outdir: Path) -> None:
    """Sharded offspring and exchange for every case and exact scheme, plus the fallback
    exchange and multinomial unbiasedness."""
    for case in ("random", "empty_rank", "one_heavy"):
        lw = population(case)
        lo, hi = _bounds(N_POP, world, rank)
        ids = torch.arange(lo, hi)
        cache = torch.stack([ids.to(torch.float32), -ids.to(torch.float32)], 1)
        for scheme, mode in (
            ("systematic", "auto"),
            ("stratified", "auto"),
            ("systematic", "all_gather"),
            ("multinomial", "auto"),
        ):
            D.EXCHANGE = mode
            counts = D.offspring(lw[lo:hi], scheme, torch.Generator().manual_seed(7))
            moved = D.exchange([ids, cache, ids.to(F64)], counts)
            D.EXCHANGE = "auto"
            out[f"{case}/{scheme}/{mode}"] = {
                "counts": counts,
                "ids": moved[0],
                "cache": moved[1],
                "ids64": moved[2],
                "sent": dict(D.last_exchange),
            }


def check_stats(rank: int, world: int, out: dict, outdir: Path) -> None:
    """Global ESS, CESS, evidence, error bars, expectations, k-hat and gather."""
    lw = population("random")
    lo, hi = _bounds(N_POP, world, rank)
    incr = 0.3 * torch.randn(N_POP, dtype=F64, generator=torch.Generator().manual_seed(5))
    x = torch.randn(N_POP, 2, dtype=F64, generator=torch.Generator().manual_seed(6))
    eves = torch.arange(N_POP) // 37  # lineages that span ranks
    with D.use(None):
        out["ess"] = D.ess(lw[lo:hi])
        out["cess"] = D.conditional_ess(lw[lo:hi], incr[lo:hi])
        out["count"] = D.count(hi - lo)
        ws = D.finish(WeightedSamples(x[lo:hi], lw[lo:hi], log_scale=0.25))
        gen = D.finish(
            WeightedSamples(x[lo:hi], lw[lo:hi], log_scale=0.25, genealogy=Genealogy.from_ancestors(eves[lo:hi], 3))
        )
        out["ws"] = {
            "log_evidence": ws.log_evidence,
            "stderr": ws.log_evidence_stderr,
            "ess": ws.ess,
            "khat": ws.khat,
            "mean": tuple(ws.expectation()),
            "W": ws.normalized_weights,
        }
        out["gen"] = {"stderr": gen.log_evidence_stderr, "mean": tuple(gen.expectation(lambda v: v[:, 0] ** 2))}
        full = gen.gather(0)
        out["gathered"] = (
            None
            if full is None
            else {"x": full.samples, "lw": full.log_weights, "eves": full.ancestors, "log_evidence": full.log_evidence}
        )
        # NaN on one rank: every rank raises the same error, and the group stays usable
        bad = lw[lo:hi].clone()
        if rank == world - 1:
            bad[3] = math.nan
        try:
            D.ess(bad)
            out["nan"] = "no error"
        except ValueError as e:
            out["nan"] = str(e)
        out["after_nan"] = D.count(1)


def check_smc(rank: int, world: int, out: dict, outdir: Path) -> None:
    """SMC on an analytic Gaussian (exact log Z), checkpoints and resume, islands, corrector."""
    target, initial = gaussian_target(), broad_initial()
    kw = dict(kernel=mc.kernels.RandomWalk(num_steps=2), schedule="adaptive")
    r = mc.smc(target, initial, 2000, generator=torch.Generator().manual_seed(3), **kw)
    out["smc"] = {
        "log_evidence": r.log_evidence,
        "stderr": r.log_evidence_stderr,
        "betas": r.betas,
        "ess_history": r.ess_history,
        "local": len(r.particles),
        "N": r.particles.num_particles,
        "mean": tuple(r.particles.expectation()),
        "resampled": r.resampled,
    }
    # checkpoint every step; at step 3 keep a copy of the checkpoint of step 2
    ck, kept = str(outdir / "run.pt"), str(outdir / "kept.pt")

    def keep(state):
        if state.index == 3:
            shutil.copy(D._rank_file(ck, rank, world, 2), D._rank_file(kept, rank, world, 2))
            if rank == 0:
                shutil.copy(ck, kept)

    a = mc.smc(
        target,
        initial,
        600,
        generator=torch.Generator().manual_seed(4),
        checkpoint=ck,
        checkpoint_every=1,
        callback=keep,
        **kw,
    )
    torch.distributed.barrier()
    b = mc.smc(
        target, initial, 600, generator=torch.Generator().manual_seed(4), checkpoint=kept, checkpoint_every=1, **kw
    )
    out["resume"] = {
        "a": a.log_evidence,
        "b": b.log_evidence,
        "ax": a.particles.samples,
        "bx": b.particles.samples,
        "steps": len(a.betas),
    }
    # islands
    isl = mc.smc(target, initial, 2000, generator=torch.Generator().manual_seed(5), group=D.islands(), **kw)
    out["islands"] = {
        "log_evidence": isl.log_evidence,
        "stderr": isl.log_evidence_stderr,
        "info": isl.particles.info["distributed"],
        "mean": tuple(isl.particles.expectation()),
    }
    # the Feynman-Kac corrector and importance sampling run sharded through the same core
    from mcsample.correctors import annealed, fk_corrector
    from mcsample.flows.diffusion.gmm import GaussianMixtureDiffusion
    from mcsample.flows.diffusion.schedules import VPSchedule, time_grid

    model = GaussianMixtureDiffusion(
        [0.7, 0.3], torch.tensor([[-1.5], [1.5]], dtype=F64), torch.tensor([0.25, 0.25], dtype=F64), VPSchedule()
    )
    ws = fk_corrector(
        annealed(model, 2.0),
        1000,
        1,
        time_grid(model.schedule, 60, "uniform", t_min=1e-3),
        dtype=F64,
        resample_threshold=0.5,
        generator=torch.Generator().manual_seed(8),
    )
    out["corrector"] = {
        "log_evidence": ws.log_evidence,
        "stderr": ws.log_evidence_stderr,
        "local": len(ws),
        "resampled": ws.info["resampled_at"],
    }
    isr = mc.importance_sample(target, initial, 4000, generator=torch.Generator().manual_seed(9))
    out["importance"] = {"log_evidence": isr.log_evidence, "stderr": isr.log_evidence_stderr, "local": len(isr)}
    alone = mc.smc(target, initial, 300, generator=torch.Generator().manual_seed(rank), group=False, **kw)
    out["alone"] = {
        "type": type(alone.particles).__name__,
        "local": len(alone.particles),
        "log_evidence": alone.log_evidence,
    }
    tds = tds_problem().run(1000, generator=torch.Generator().manual_seed(10), dtype=F64)
    out["tds"] = {"log_evidence": tds.log_evidence, "stderr": tds.log_evidence_stderr, "local": len(tds)}


def check_resume_other_world(rank: int, world: int, out: dict, outdir: Path) -> None:
    """A checkpoint of 2 processes is refused by 4 (the same error on every rank)."""
    src = Path(os.environ["MCSAMPLE_TEST_CHECKPOINT"])
    try:
        mc.smc(
            gaussian_target(),
            broad_initial(),
            600,
            kernel=mc.kernels.RandomWalk(num_steps=2),
            generator=torch.Generator().manual_seed(4),
            checkpoint=src,
        )
        out["error"] = "no error"
    except ValueError as e:
        out["error"] = str(e)
    with D.use(None):
        out["after"] = D.count(1)


class _NaNOnLastRank:
    """A Gaussian whose log-density turns NaN on the last rank after a few calls."""

    def __init__(self, rank: int, world: int):
        self.inner, self.bad, self.calls = gaussian_target(), rank == world - 1, 0
        self.event_shape = self.inner.event_shape if hasattr(self.inner, "event_shape") else torch.Size([3])

    def log_prob(self, x):
        self.calls += 1
        lp = self.inner.log_prob(x)
        if self.bad and self.calls > 4:
            lp = lp.clone()
            lp[0] = math.nan
        return lp


def check_failure(rank: int, world: int, out: dict, outdir: Path) -> None:
    """A target that returns NaN on one rank stops every rank with the reason."""
    try:
        mc.smc(
            _NaNOnLastRank(rank, world),
            broad_initial(),
            400,
            kernel=mc.kernels.RandomWalk(num_steps=2),
            generator=torch.Generator().manual_seed(1),
        )
        out["error"] = ("none", "")
    except Exception as e:  # noqa: BLE001 - the type is what is checked
        out["error"] = (type(e).__name__, str(e))


def _allcat(shard, t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (any length) concatenated in rank order."""
    sizes = shard.sizes(t.shape[0])
    pad = torch.zeros((max(sizes),) + tuple(t.shape[1:]), dtype=t.dtype)
    pad[: t.shape[0]] = t.cpu()
    return torch.cat([g[:k] for g, k in zip(shard.all_gather(pad), sizes)])


def check_genealogy(rank: int, world: int, out: dict, outdir: Path) -> None:
    """The online genealogy of a sharded population through 40 resampling events (past the
    32-event lag window; systematic, stratified and multinomial in turn), mirrored by a
    single-process genealogy given the same ancestor indices of the concatenated population."""
    from mcsample import feynman_kac as fk

    lo, hi = _bounds(N_POP, world, rank)
    X = torch.randn(N_POP, dtype=F64, generator=torch.Generator().manual_seed(11))

    def log_g(x, t):  # a function of the particle's value only, so the order does not matter
        return -0.05 * (x - 0.02 * t) ** 2

    schemes = ("systematic", "stratified", "multinomial")
    with D.use(None) as shard:
        state = fk.start(X[lo:hi].clone())
        ref, Xref, carried = Genealogy.start(N_POP), X.clone(), True
        for t in range(40):
            state = fk.reweight(state, log_g(state.x, t))
            LW = _allcat(shard, state.log_w)
            scheme = schemes[t % 3]
            new = fk.resample_if_needed(state, 0.0, scheme, torch.Generator().manual_seed(100 + t), force=True)
            idx = _allcat(shard, new.genealogy.enochs[0])
            Xnew = _allcat(shard, new.x)
            carried = carried and torch.equal(Xnew, Xref[idx])
            ref = ref.resampled(LW, idx, scheme)
            Xref, state = Xnew, new
        state = fk.reweight(state, log_g(state.x, 40))
        LW = _allcat(shard, state.log_w)
        pop = D.ShardPopulation(shard, shard.sizes(state.log_w.numel()), float(torch.logsumexp(LW, 0)))
        gen = state.genealogy

        def estimates(g, lw, x, population):
            return torch.stack(
                [
                    g.log_evidence_variance(lw, population),
                    g.lag_variance(lw, population),
                    g.eve_variance(lw, population),
                    g.block_variance(lw, population),
                    g.lee_whiteley_variance(lw, population),
                    g.lineages(lw, population).to(F64),
                    g.expectation_stderr(population.normalize(lw), x[:, None], population)[0],
                ]
            )

        out["genealogy"] = {
            "sharded": estimates(gen, state.log_w, state.x, pop),
            "single": estimates(ref, LW, Xref, mc.weighted.LOCAL),
            "eves": torch.equal(_allcat(shard, gen.eves), ref.eves),
            "carried": carried,
            "result_stderr": fk.to_weighted_samples(state).log_evidence_stderr,
            "ref_stderr": ref.log_evidence_stderr(LW),
        }


CHECKS = {
    "resampling": check_resampling,
    "stats": check_stats,
    "smc": check_smc,
    "genealogy": check_genealogy,
    "resume_other_world": check_resume_other_world,
    "failure": check_failure,
}


def _worker(names: str, outdir: str) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    out: dict = {}
    for name in names.split(","):
        CHECKS[name](rank, world, out, Path(outdir))
    torch.save(out, Path(outdir) / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, checks: str, outdir: Path, env: dict | None = None) -> list[dict]:
    """Run ``checks`` on ``world`` gloo processes; every rank's findings."""
    outdir.mkdir(parents=True, exist_ok=True)
    base = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    if sys.platform.startswith("linux"):
        base.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, checks, str(outdir)],
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=LAUNCH_TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{checks} on {world} processes did not finish in {LAUNCH_TIMEOUT} s (a hang)")
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} of {world} failed:\n{log[-3000:]}"
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    d = tmp_path_factory.mktemp("two")
    return launch(2, "resampling,stats,smc,genealogy,failure", d), d


@pytest.fixture(scope="module")
def four(tmp_path_factory, two):
    d = tmp_path_factory.mktemp("four")
    return launch(
        4, "resampling,stats,genealogy,resume_other_world", d, env={"MCSAMPLE_TEST_CHECKPOINT": str(two[1] / "run.pt")}
    )


def _cat(results, key, field):
    return torch.cat([r[key][field] for r in results])


# ---------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", ["random", "empty_rank", "one_heavy"])
@pytest.mark.parametrize("scheme,mode", [("systematic", "auto"), ("stratified", "auto"), ("systematic", "all_gather")])
def test_offspring_equal_single_process(two, four, world, case, scheme, mode):
    """The sharded offspring of every particle, and the multiset of particles after the
    exchange, equal single-process resampling of the whole population with the same uniforms;
    every rank ends with its balanced share, the cached rows travel with their particle."""
    results = two[0] if world == 2 else four
    key = f"{case}/{scheme}/{mode}"
    lw = population(case)
    U, k = shared_draws(7, scheme)
    if scheme == "systematic":
        ref = torch.bincount(mc.resample(lw, N_POP, "systematic", torch.Generator().manual_seed(7)), minlength=N_POP)
    else:
        ref = reference_stratified(lw, k)
    counts = _cat(results, key, "counts")
    assert torch.equal(counts, ref)
    ids = _cat(results, key, "ids")
    assert torch.equal(torch.sort(ids).values, torch.repeat_interleave(torch.arange(N_POP), ref))
    assert [len(r[key]["ids"]) for r in results] == D.balanced_sizes(N_POP, world)
    cache = _cat(results, key, "cache")
    assert torch.equal(cache[:, 0], ids.to(torch.float32)) and torch.equal(cache[:, 1], -ids.to(torch.float32))
    assert torch.equal(_cat(results, key, "ids64"), ids.to(F64))


def test_zero_offspring_rank_and_only_surplus_moves(two):
    """A rank whose particles all have zero weight gets no offspring and still ends with its
    share; the exchange moves only surplus offspring (the lower bound of any balanced layout)."""
    results, _ = two
    key = "empty_rank/systematic/auto"
    assert int(results[1][key]["counts"].sum()) == 0
    assert len(results[1][key]["ids"]) == D.balanced_sizes(N_POP, 2)[1]
    sent = sum(r[key]["sent"]["offspring"] for r in results)
    assert sent == results[0][key]["sent"]["lower_bound_offspring"] > 0
    assert sum(r[key]["sent"]["rows"] for r in results) <= sent


@pytest.mark.parametrize("world", [2, 4])
def test_multinomial_is_exact(two, four, world):
    """Sharded multinomial resampling draws N offspring of particles with positive weight, and
    its draws per rank are Multinomial(N, T_r/S): mean N T_r/S over 4000 keys (6 standard
    errors), N in all every time, none on a rank without weight."""
    results = two[0] if world == 2 else four
    for case in ("random", "empty_rank", "one_heavy"):
        ids = _cat(results, f"{case}/multinomial/auto", "ids")
        assert ids.numel() == N_POP and bool(torch.isfinite(population(case)[ids]).all())
    totals = [0.1, 0.0, 2.5, 0.4][:world]
    draws = torch.tensor([D._rank_draws(totals, 50, key) for key in range(4000)], dtype=F64)
    assert bool((draws.sum(1) == 50).all()) and bool((draws[:, 1] == 0).all())
    p = torch.tensor(totals, dtype=F64) / sum(totals)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert bool(((mean - 50 * p).abs() <= 6 * se + 1e-12).all()), (mean, 50 * p)


@pytest.mark.parametrize("world", [2, 4])
def test_global_ess_evidence_and_estimates_equal_single_process(two, four, world):
    """ESS, conditional ESS, log-evidence, its error bar (with and without lineages spanning
    ranks), expectations and k-hat of the sharded population equal those of the whole
    population in one process."""
    results = two[0] if world == 2 else four
    lw = population("random")
    incr = 0.3 * torch.randn(N_POP, dtype=F64, generator=torch.Generator().manual_seed(5))
    x = torch.randn(N_POP, 2, dtype=F64, generator=torch.Generator().manual_seed(6))
    eves = torch.arange(N_POP) // 37
    ws = WeightedSamples(x, lw, log_scale=0.25)
    gen = WeightedSamples(x, lw, log_scale=0.25, genealogy=Genealogy.from_ancestors(eves, 3))
    close = dict(rtol=1e-11, atol=1e-13)
    for r in results:
        assert r["count"] == N_POP
        torch.testing.assert_close(r["ess"], mc.ess(lw), **close)
        torch.testing.assert_close(r["cess"], mc.conditional_ess(lw, incr), **close)
        torch.testing.assert_close(r["ws"]["log_evidence"], ws.log_evidence, **close)
        torch.testing.assert_close(r["ws"]["stderr"], ws.log_evidence_stderr, **close)
        torch.testing.assert_close(r["ws"]["ess"], ws.ess, **close)
        torch.testing.assert_close(r["ws"]["khat"], ws.khat, **close)
        est = ws.expectation()
        torch.testing.assert_close(r["ws"]["mean"][0], est.value, **close)
        torch.testing.assert_close(r["ws"]["mean"][1], est.stderr, **close)
        torch.testing.assert_close(r["gen"]["stderr"], gen.log_evidence_stderr, **close)
        est = gen.expectation(lambda v: v[:, 0] ** 2)
        torch.testing.assert_close(r["gen"]["mean"][0], est.value, **close)
        torch.testing.assert_close(r["gen"]["mean"][1], est.stderr, **close)
    torch.testing.assert_close(torch.cat([r["ws"]["W"] for r in results]), ws.normalized_weights, **close)
    full = results[0]["gathered"]
    assert all(r["gathered"] is None for r in results[1:])
    assert torch.equal(full["x"], x) and torch.equal(full["lw"], lw) and torch.equal(full["eves"], eves)
    torch.testing.assert_close(full["log_evidence"], ws.log_evidence, **close)


@pytest.mark.parametrize("world", [2, 4])
def test_nan_on_one_rank_raises_everywhere_and_group_survives(two, four, world):
    """NaN log-weights on one rank raise the same ValueError, naming that rank, on every
    rank; the process group still works afterwards."""
    results = two[0] if world == 2 else four
    for r in results:
        assert "NaN for 1 of 1003 particles" in r["nan"] and f"{{{world - 1}: 1}}" in r["nan"], r["nan"]
        assert r["after_nan"] == world


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_genealogy_equals_single_process(two, four, world):
    """The sharded online genealogy (global ancestor ids, sums through the owner ranks) gives
    the single-process genealogy's estimates on the same ancestry: fixed-lag, Eve, block and
    Lee & Whiteley variances, the lineage count and an expectation's standard error, through 40
    resampling events past the lag window; the result's evidence stderr is the same number."""
    results = two[0] if world == 2 else four
    for r in results:
        g = r["genealogy"]
        assert g["carried"] and g["eves"]
        torch.testing.assert_close(g["sharded"], g["single"], rtol=1e-10, atol=1e-13)
        assert float(g["single"][5]) >= 10 and float(g["single"][0]) > 0
        torch.testing.assert_close(g["result_stderr"].double(), g["ref_stderr"].double(), rtol=1e-10, atol=1e-13)


def test_sharded_smc_log_evidence_matches_exact(two):
    """SMC sharded over 2 processes: log Z of a Gaussian within 4 standard errors of the exact
    value; every rank holds its share and reports the same evidence, temperatures and ESS."""
    results, _ = two
    exact = float(gaussian_target().log_normalizer)
    s0 = results[0]["smc"]
    assert abs(float(s0["log_evidence"]) - exact) < 4 * float(s0["stderr"]), (float(s0["log_evidence"]), exact)
    assert 0 < float(s0["stderr"]) < 0.2 and bool(s0["resampled"].any())
    for r in results:
        torch.testing.assert_close(r["smc"]["log_evidence"], s0["log_evidence"], rtol=0, atol=0)
        assert torch.equal(r["smc"]["betas"], s0["betas"]) and torch.equal(r["smc"]["ess_history"], s0["ess_history"])
        assert r["smc"]["N"] == 2000 and r["smc"]["local"] == 1000
    mean, se = s0["mean"]
    assert bool(((mean - gaussian_target().mean).abs() < 5 * se).all())


def test_sharded_checkpoint_resumes_exactly_and_refuses_other_world_sizes(two, four, tmp_path):
    """A sharded run resumed from the checkpoint of its step 2 ends with the same particles and
    evidence as the uninterrupted run; 4 processes, and a single process, refuse the
    checkpoint of 2 with the reason (the group stays usable)."""
    results, d = two
    for r in results:
        assert r["resume"]["steps"] > 4
        assert torch.equal(r["resume"]["ax"], r["resume"]["bx"])
        assert float(r["resume"]["a"]) == float(r["resume"]["b"])
    for r in four:
        assert "sharded over 2 processes" in r["error"] and "(this run has 4)" in r["error"], r["error"]
        assert r["after"] == 4
    with pytest.raises(ValueError, match="sharded over 2 processes"):
        mc.smc(
            gaussian_target(),
            broad_initial(),
            600,
            kernel=mc.kernels.RandomWalk(num_steps=2),
            generator=torch.Generator().manual_seed(4),
            checkpoint=d / "run.pt",
        )


def test_islands_combine_to_the_mean_evidence(two):
    """Islands: the combined log Z is the log of the mean of the islands' Z (equal sizes), the
    shares are the islands' Z over their sum, and it estimates the exact log Z."""
    results, _ = two
    info = results[0]["islands"]["info"]
    z = torch.tensor(info["island_log_evidence"], dtype=F64)
    combined = float(torch.logsumexp(z, 0) - math.log(len(z)))
    exact = float(gaussian_target().log_normalizer)
    for r in results:
        assert float(r["islands"]["log_evidence"]) == pytest.approx(combined, abs=1e-12)
        assert r["islands"]["info"]["island_share"] == pytest.approx(torch.softmax(z, 0).tolist(), abs=1e-12)
    assert abs(combined - exact) < 4 * float(results[0]["islands"]["stderr"])
    assert len(set(info["island_log_evidence"])) == 2  # independent islands
    mean, se = results[0]["islands"]["mean"]
    assert bool(((mean - gaussian_target().mean).abs() < 5 * se).all())
    for r in results:  # group=False inside a process group: a whole run on each process
        assert r["alone"]["type"] == "WeightedSamples" and r["alone"]["local"] == 300
    assert results[0]["alone"]["log_evidence"] != results[1]["alone"]["log_evidence"]


def test_corrector_posterior_and_importance_run_sharded(two):
    """The Feynman-Kac corrector, twisted diffusion sampling and importance sampling shard
    through the same core: each rank holds its share, the ranks agree on the evidence, and
    sharded TDS agrees with a single-process run within 5 combined standard errors."""
    results, _ = two
    for name, n in (("corrector", 500), ("importance", 2000), ("tds", 500)):
        vals = [float(r[name]["log_evidence"]) for r in results]
        assert vals[0] == vals[1] and math.isfinite(vals[0]) and [r[name]["local"] for r in results] == [n, n]
    assert len(results[0]["corrector"]["resampled"]) > 0
    exact = float(gaussian_target().log_normalizer)
    imp = results[0]["importance"]
    assert abs(float(imp["log_evidence"]) - exact) < 5 * float(imp["stderr"])
    single = tds_problem().run(1000, generator=torch.Generator().manual_seed(11), dtype=F64)
    sharded = results[0]["tds"]
    se = math.hypot(float(single.log_evidence_stderr), float(sharded["stderr"]))
    assert abs(float(single.log_evidence) - float(sharded["log_evidence"])) < 5 * se


def test_failure_on_one_rank_stops_every_rank(two):
    """A target returning NaN on one rank only: that rank raises its ValueError and the other
    ranks stop at their next collective with a ShardedRunError naming it; nothing hangs."""
    results, _ = two
    kind0, msg0 = results[0]["error"]
    kind1, msg1 = results[1]["error"]
    assert kind1 == "ValueError" and "NaN" in msg1
    assert kind0 == "ShardedRunError" and "rank 1 of 2" in msg0 and "NaN" in msg0


def test_single_process_is_unchanged():
    """Without a process group, group=None and group=False give the same run as before."""
    target, initial = gaussian_target(), broad_initial()
    kernel = mc.kernels.RandomWalk(num_steps=1)
    a = mc.smc(target, initial, 200, kernel=kernel, generator=torch.Generator().manual_seed(0))
    b = mc.smc(target, initial, 200, kernel=kernel, generator=torch.Generator().manual_seed(0), group=False)
    assert type(a.particles) is WeightedSamples and torch.equal(a.particles.samples, b.particles.samples)
    with pytest.raises(RuntimeError, match="not initialized"):
        mc.smc(target, initial, 200, group=D.islands())


def test_transfer_plan_moves_only_surplus():
    """The greedy plan sends exactly each rank's surplus to ranks in deficit."""
    have, want = [7, 0, 3, 2], [3, 3, 3, 3]
    T = D._transfer_plan(have, want)
    assert [sum(row) for row in T] == [4, 0, 0, 0]
    assert [sum(T[s][d] for s in range(4)) for d in range(4)] == [0, 3, 0, 1]


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
