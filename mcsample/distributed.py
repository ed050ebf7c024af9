r"""One particle population sharded over many processes (``torch.distributed``).

When a population (:math:`10^7`–:math:`10^9` particles, or thousands of particles with
expensive network evaluations) no longer fits one device, every rank of a process group holds
:math:`N/R` of the particles and their float64 log-weights, and the Feynman-Kac core
(:mod:`mcsample.feynman_kac`) runs the *same* algorithm as on one device: the global quantities
come from small collectives and the resampling is the exact resampling of the whole
population. Runs are sharded when given a process group (``group=``), or, with ``group=None``,
whenever the default group of :func:`torch.distributed.init_process_group` is initialized with
more than one process; ``group=False`` runs on this process alone.

**Reductions.** Every global ESS, conditional ESS (adaptive tempering), log-evidence increment
and normalized expectation comes from logsumexp sufficient statistics: each rank sends its
local maximum :math:`m_r` and :math:`s_r = \sum_{i\in r} e^{\ell_i - m_r}`; with
:math:`M = \max_r m_r`, :math:`\operatorname{lse}(\ell) = M + \log\sum_r s_r e^{m_r - M}`.
No unnormalized weight is ever exponentiated, and the statistics are all-gathered and combined
on the CPU in rank order, so every rank takes the same decisions (resample or not, the next
temperature) bit for bit.

**Resampling** (Douc, Cappé & Moulines 2005; the distributed form of Murray, Lee & Jacob 2016
and Lee & Whiteley's "exact" parallel resampling): with the per-rank totals
:math:`T_r` and their prefix :math:`P_r = \sum_{q<r} T_q`, rank :math:`r`'s particles occupy
:math:`[N P_r/S, N P_{r+1}/S)` of the scaled cumulative weights, so each rank computes the
offspring counts of its own particles from a few shared random numbers drawn on rank 0:

* ``systematic``: one uniform :math:`U`, broadcast; particle :math:`i` ends its offspring at
  :math:`\lceil x_i - U\rceil` — the same counts as :func:`mcsample.resample` of the
  concatenated population with the same :math:`U`;
* ``stratified``: the uniform of stratum :math:`k` is a fixed function of a key broadcast from
  rank 0 and of :math:`k` (blocks of :math:`2^{16}` uniforms, each from a generator seeded by
  the key and the block), so each rank draws only the strata it covers and the counts do not
  depend on how the population is split;
* ``multinomial``: rank 0's key draws the number of sorted uniforms that fall in each rank's
  interval, :math:`(M_r) \sim \mathrm{Multinomial}(N, T/S)`; each rank then draws its
  :math:`M_r` offspring from its own normalized weights — exactly multinomial resampling of the
  whole population.

``residual`` and ``ssp`` are not available sharded. The offspring are then **balanced**: each
rank keeps up to :math:`N/R` of its own offspring, and the surplus goes to ranks in deficit
(a greedy transfer plan all ranks compute from the gathered counts) in one all-to-all of the
moving rows only — the particles, the per-particle ``cache`` tensors of the state and the
time-0 ancestors as *global* ids; a particle sent with several offspring travels once, with its
count. Only surplus offspring cross ranks, the fewest any balanced exchange can move.
``torch.distributed.all_to_all_single`` is used where the backend has it (gloo and NCCL in
torch ≥ 2.0); otherwise an all-gather of the moving rows (``EXCHANGE``).

**Results.** A sharded run returns :class:`ShardedSamples`: the local particles, with
``log_evidence``, ``log_evidence_stderr``, ``ess`` and ``khat`` of the *whole* population
(computed at the end of the run, the same on every rank); ``expectation`` and ``resample`` are
collective (call them on every rank); :func:`gather` brings the whole population to one rank.
The evidence's standard error is the single-process one (the online fixed-lag genealogy of
:class:`~mcsample.weighted.Genealogy`: each resampling event's offspring noise per lineage
group, Olsson & Douc's window, the banked blocks) computed on *global* ancestor ids: every sum
over lineage groups goes through :class:`ShardPopulation`, which sends each rank's per-group
partial sums to the group's owner rank in one all-to-all.

**Islands** (:func:`islands`): on a slow interconnect each rank runs an independent
sub-population, resampled locally, with no communication until the end; the islands are then
combined with the unbiased evidence :math:`\hat Z = \sum_r n_r\hat Z_r/N` (the mean of the
islands' :math:`\hat Z_r`) and each island's particles weighted by its share
:math:`n_r\hat Z_r/\sum_q n_q\hat Z_q` (Vergé, Dubarry, Del Moral & Moulines 2015, "On
parallel implementation of sequential Monte Carlo methods: the island particle model"). The
price: resampling within islands of :math:`N/R` particles, and the variance of
:math:`\hat Z` grows with the spread of the islands' :math:`\hat Z_r`, which the exact global
mode does not have (``benchmarks/distributed.py`` measures it).

**Failures.** An exception on one rank inside a sharded run sets a flag in the group's store
and shuts the process group down, so that the other ranks raise :class:`ShardedRunError`
(naming the rank and its error) at their next collective instead of waiting for the group's
timeout; errors that every rank detects together (NaN weights, anywhere) raise the same
``ValueError`` on every rank and leave the group usable. With NCCL, the other ranks stop when
the launcher (``torchrun``, SLURM) ends the job or at the group's timeout.

**Checkpoints**: one file per rank plus a manifest at the checkpoint path (world size, the
step, the run fingerprint); a run resumes with the same world size, and a checkpoint of another
world size or of a single-process run is refused with the reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import glob
import inspect
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from mcsample.checkpoint import default_generator, differences, save_atomic
from mcsample.diagnostics import _gpd_fit
from mcsample.resampling import resample as _resample
from mcsample.weighted import Estimate, Genealogy, Population, RunningMoments, WeightedSamples

__all__ = [
    "Shard",
    "Islands",
    "ShardedSamples",
    "ShardPopulation",
    "ShardedRunError",
    "SCHEMES",
    "islands",
    "use",
    "shardable",
    "sharded",
    "active",
    "init",
    "local_size",
    "count",
    "split_generator",
    "ess",
    "conditional_ess",
    "mean",
    "weighted_moments",
    "check_log_weights",
    "offspring",
    "exchange",
    "resample_state",
    "gather",
    "balanced_sizes",
    "last_exchange",
    "comm",
]

#: the schemes that resample a sharded population exactly
SCHEMES = ("systematic", "stratified", "multinomial")
#: how rows move: "auto" (all_to_all_single, else all_gather), "all_to_all" or "all_gather"
EXCHANGE = "auto"
#: uniforms per block of the stratified stream
BLOCK = 1 << 16
#: what the last exchange moved (rows, offspring, bytes; for benchmarks)
last_exchange: dict = {}
#: time spent in collectives (waiting for other ranks included) and their number, this process
comm: dict = {"seconds": 0.0, "calls": 0}

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("mcsample_shard", default=None)
_LOCAL = object()  # in _ACTIVE: a run on this process alone (group=False, or no group)
_RUNS = [0]
_MASK64 = (1 << 64) - 1


class ShardedRunError(RuntimeError):
    """Another rank of a sharded run failed; the message names the rank and its error."""


def _dist():
    import torch.distributed as dist

    return dist


# ---------------------------------------------------------------------------------------------
# the process group


class Shard:
    """This rank's place in a sharded run: the process group, ``rank``, ``world_size``, the
    device collectives run on (CUDA for NCCL, else the CPU) and whether the ranks are
    independent ``islands``."""

    def __init__(self, group=None, islands: bool = False):
        dist = _dist()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        nccl = self.backend == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.islands = bool(islands)
        _RUNS[0] += 1
        self.run_id = _RUNS[0]

    def __repr__(self) -> str:
        mode = "islands" if self.islands else "sharded"
        return f"Shard({mode}, rank {self.rank} of {self.world_size}, {self.backend})"

    # -- failures ---------------------------------------------------------------------------
    @property
    def _failure_key(self) -> str:
        return f"mcsample/failure/{self.run_id}"

    def _store(self):
        try:
            return _dist().distributed_c10d._get_default_store()
        except Exception:  # no store to share the reason: the group's own errors remain
            return None

    def remote_failure(self) -> str | None:
        """The failure another rank reported, if any."""
        store = self._store()
        try:
            if store is not None and store.check([self._failure_key]):
                return store.get(self._failure_key).decode(errors="replace")
        except Exception:
            return None
        return None

    def fail(self, exc: BaseException) -> None:
        """Report ``exc`` to the other ranks and shut the group down, so that they raise at
        their next collective instead of hanging."""
        store = self._store()
        try:
            if store is not None:
                store.set(self._failure_key, f"rank {self.rank} of {self.world_size}: {type(exc).__name__}: {exc}")
        except Exception:
            pass
        try:
            _dist().destroy_process_group(self.group)
        except Exception:
            pass

    def _call(self, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        except ShardedRunError:
            raise
        except Exception as e:
            msg = self.remote_failure()
            if msg is not None:
                raise ShardedRunError(f"the sharded run stopped: {msg}") from e
            raise
        finally:
            comm["seconds"] += time.perf_counter() - t0
            comm["calls"] += 1

    # -- collectives (on self.device) --------------------------------------------------------
    def all_gather(self, t: Tensor) -> Tensor:
        """``(world_size, *t.shape)``: every rank's ``t``, on the CPU."""
        t = t.to(self.device).contiguous()
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        self._call(lambda: _dist().all_gather(out, t, group=self.group))
        return torch.stack(out).cpu()

    def broadcast(self, t: Tensor) -> Tensor:
        """Rank 0's ``t`` on every rank (on the CPU)."""
        t = t.to(self.device).contiguous().clone()
        self._call(lambda: _dist().broadcast(t, group=self.group, group_src=0))
        return t.cpu()

    def gather(self, t: Tensor, dst: int = 0) -> list[Tensor] | None:
        """Every rank's ``t`` (same shape) on rank ``dst``, ``None`` elsewhere."""
        t = t.to(self.device).contiguous()
        out = [torch.empty_like(t) for _ in range(self.world_size)] if self.rank == dst else None
        self._call(lambda: _dist().gather(t, out, group=self.group, group_dst=dst))
        return None if out is None else [o.cpu() for o in out]

    def barrier(self) -> None:
        self.all_gather(torch.zeros(1))

    def alltoallv(self, rows: Tensor, send: list[int]) -> tuple[Tensor, list[int]]:
        """Send ``rows[sum(send[:d]):sum(send[:d+1])]`` to rank ``d``; returns the rows received
        (in rank order, on the device of ``rows``) and how many came from each rank."""
        dist = _dist()
        R = self.world_size
        sizes = self.all_gather(torch.tensor(send, dtype=torch.long))  # (R, R): [src, dst]
        recv = sizes[:, self.rank].tolist()
        width = rows.shape[1:]
        out = torch.empty((sum(recv), *width), dtype=rows.dtype, device=self.device)
        src = rows.to(self.device).contiguous()
        mode = EXCHANGE
        if mode in ("auto", "all_to_all"):
            try:
                self._call(lambda: dist.all_to_all_single(out, src, recv, send, group=self.group))
                return out.to(rows.device), recv
            except ShardedRunError:
                raise
            except RuntimeError:
                if mode == "all_to_all":
                    raise
        # all_gather of the moving rows, padded to the largest sender
        most = int(sizes.sum(1).max())
        pad = torch.zeros((most, *width), dtype=rows.dtype, device=self.device)
        pad[: src.shape[0]] = src
        bufs = [torch.empty_like(pad) for _ in range(R)]
        self._call(lambda: dist.all_gather(bufs, pad, group=self.group))
        parts = []
        for s in range(R):
            start = int(sizes[s, : self.rank].sum())
            parts.append(bufs[s][start : start + recv[s]])
        return torch.cat(parts).to(rows.device), recv

    # -- layout -------------------------------------------------------------------------------
    def sizes(self, n_local: int) -> list[int]:
        """Every rank's particle count."""
        return [int(v) for v in self.all_gather(torch.tensor([n_local], dtype=torch.long))[:, 0]]


@dataclass(frozen=True)
class Islands:
    """Run each rank of ``group`` as an independent island; see :func:`islands`."""

    group: object = None


def islands(group=None) -> Islands:
    """``group=islands()``: every rank of ``group`` (default: the default group) runs its own
    sub-population with no communication during the run (resampling within the island); the
    results are combined at the end: evidence :math:`\\sum_r n_r\\hat Z_r/N`, each island's
    particles weighted by its share :math:`n_r\\hat Z_r/\\sum_q n_q\\hat Z_q` (Vergé et al. 2015)."""
    return Islands(group)


def _resolve(group) -> Shard | None:
    dist = _dist()
    isl = isinstance(group, Islands)
    if isl:
        group = group.group
    if group is False:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None or isl:
            raise RuntimeError(
                "a process group was given but torch.distributed is not initialized: "
                "call torch.distributed.init_process_group (or mcsample.distributed.init) "
                "first, e.g. under torchrun"
            )
        return None
    if dist.get_world_size(group) < 2:
        return None
    return Shard(group, islands=isl)


def active() -> Shard | None:
    """The shard of the sharded run or islands in progress on this thread, if any."""
    s = _ACTIVE.get()
    return None if s is _LOCAL else s


def entered() -> bool:
    """Whether a run (sharded or not) is in progress on this thread: :func:`use` with
    ``group=None`` then joins it."""
    return _ACTIVE.get() is not None


def sharded() -> Shard | None:
    """The shard when the population in progress is sharded (not islands), else ``None``."""
    s = active()
    return None if s is None or s.islands else s


@contextlib.contextmanager
def use(group=None):
    """Run the block sharded over ``group``: a process group, :func:`islands`, ``False`` (this
    process alone) or ``None`` (the run already in progress, else the default group when it is
    initialized with more than one process). Yields the :class:`Shard` or ``None``. An exception
    on this rank is reported to the others (:meth:`Shard.fail`)."""
    if group is None and entered():
        yield active()
        return
    shard = _resolve(group)
    token = _ACTIVE.set(_LOCAL if shard is None else shard)
    try:
        yield shard
    except BaseException as e:
        if shard is not None and not isinstance(e, ShardedRunError) and not getattr(e, "_collective", False):
            shard.fail(e)
        raise
    finally:
        _ACTIVE.reset(token)


def shardable(fn: Callable) -> Callable:
    """Decorate an algorithm whose signature has ``group``: its body runs in :func:`use`."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        group = sig.bind_partial(*args, **kwargs).arguments.get("group")
        with use(group):
            return fn(*args, **kwargs)

    return wrapper


def init(backend: str | None = None, **kwargs) -> Shard | None:
    """Initialize the default process group from ``torchrun``'s or SLURM's environment.

    ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``; under ``srun`` without torchrun they are taken from ``SLURM_PROCID``,
    ``SLURM_NTASKS`` and ``SLURM_LOCALID`` (``MASTER_ADDR``/``MASTER_PORT`` must be exported
    by the batch script). ``backend`` defaults to NCCL with CUDA, else gloo; with CUDA each
    process uses GPU ``LOCAL_RANK``. Returns the :class:`Shard` of the default group (``None``
    for a single process)."""
    dist = _dist()
    env = os.environ
    if "RANK" not in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    if "RANK" not in env or int(env.get("WORLD_SIZE", "1")) < 2:  # `python script.py`: one process
        return None
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), **kwargs)
    return _resolve(None)


# ---------------------------------------------------------------------------------------------
# layout and randomness


def balanced_sizes(num: int, world_size: int) -> list[int]:
    """:math:`\\lfloor N/R\\rfloor` particles per rank, one more on the first :math:`N \\bmod R`."""
    q, rem = divmod(int(num), int(world_size))
    return [q + (r < rem) for r in range(world_size)]


def _owner(ids: Tensor, num: int, world_size: int) -> Tensor:
    """The rank that holds global position ``ids`` in the balanced layout of ``num``."""
    q, rem = divmod(num, world_size)
    edge = rem * (q + 1)
    owner = torch.where(ids < edge, ids // (q + 1), rem + (ids - edge) // max(q, 1))
    return owner.clamp(min=0, max=world_size - 1)


def is_main() -> bool:
    """Whether this process prints and shows progress: rank 0, or not in a sharded run."""
    s = active()
    return s is None or s.rank == 0


def local_size(num_particles: int) -> int:
    """This rank's share of ``num_particles`` in a sharded run or islands (``num_particles``
    otherwise)."""
    s = active()
    if s is None:
        return int(num_particles)
    if num_particles < s.world_size:
        raise ValueError(
            f"num_particles={num_particles} cannot be sharded over {s.world_size} processes "
            "(each needs at least one particle)"
        )
    return balanced_sizes(num_particles, s.world_size)[s.rank]


def count(n_local: int) -> int:
    """The population size: the sum of the ranks' ``n_local`` when sharded."""
    s = sharded()
    return int(n_local) if s is None else sum(s.sizes(int(n_local)))


def _mix(*values: int) -> int:
    """splitmix64 of ``values``: a 63-bit seed."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        z = (h + (int(v) & _MASK64) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h & ((1 << 63) - 1)


def split_generator(generator: torch.Generator | None, device=None) -> torch.Generator | None:
    """This rank's own stream in a sharded run or islands: a generator seeded from one draw of
    ``generator`` (created from the global RNG when ``None``) and the rank, so that ranks
    launched with the same seed still draw different particles. Unchanged outside a run."""
    s = active()
    if s is None:
        return generator
    if generator is None:
        generator = default_generator(device)
    base = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    g = torch.Generator(device=generator.device)
    g.manual_seed(_mix(base, s.rank))
    return g


# ---------------------------------------------------------------------------------------------
# reductions


@dataclass
class _Stats:
    """Gathered logsumexp statistics: ``lse`` the global logsumexp of each row, ``parts``
    ``(R, k, 2)`` every rank's ``(m_r, s_r)``, ``sizes`` every rank's count, ``extras``."""

    lse: list[float]
    parts: Tensor
    sizes: list[int]
    extras: Tensor

    @property
    def num(self) -> int:
        return sum(self.sizes)


def _lse_parts(rows: Tensor) -> Tensor:
    """``(k, 2)``: each row's max :math:`m` and :math:`\\sum e^{\\ell - m}` (``-inf``, 0 if empty)."""
    k, n = rows.shape
    if n == 0:
        return torch.tensor([[-math.inf, 0.0]] * k, dtype=torch.float64)
    m = rows.max(1).values
    safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(rows - safe[:, None]).sum(1)
    return torch.stack([m, s], 1)


def _combine(parts: Tensor) -> Tensor:
    """Global logsumexp of each row from ``(R, k, 2)`` statistics, in rank order, on the CPU."""
    m, s = parts[..., 0], parts[..., 1]
    M = m.max(0).values
    safe = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
    total = (s * torch.exp(m - safe)).sum(0)
    return safe + torch.log(total)


def _stats(shard: Shard, rows: list[Tensor], extras: list[float] = ()) -> _Stats:
    n = rows[0].numel()
    stack = (
        torch.stack([r.to(torch.float64).reshape(-1) for r in rows])
        if n
        else torch.zeros((len(rows), 0), dtype=torch.float64)
    )
    local = torch.cat(
        [_lse_parts(stack).reshape(-1).cpu(), torch.tensor([float(n), *map(float, extras)], dtype=torch.float64)]
    )
    g = shard.all_gather(local)
    k = len(rows)
    parts = g[:, : 2 * k].reshape(-1, k, 2)
    return _Stats(
        lse=_combine(parts).tolist(), parts=parts, sizes=[int(v) for v in g[:, 2 * k]], extras=g[:, 2 * k + 1 :]
    )


def _collective_error(msg: str) -> ValueError:
    e = ValueError(msg)
    e._collective = True  # every rank raises it: the group stays usable
    return e


def _weight_stats(shard: Shard, log_w: Tensor, where: str) -> _Stats:
    """ESS statistics of ``log_w`` (rows ℓ, 2ℓ), refusing NaN anywhere and all-zero weights."""
    log_w = log_w.to(torch.float64)
    nan = torch.isnan(log_w)
    n_nan = int(nan.sum())
    clean = torch.where(nan, torch.full_like(log_w, -math.inf), log_w)
    st = _stats(shard, [clean, 2 * clean], [n_nan])
    nans = st.extras[:, 0].tolist()
    if sum(nans) > 0:
        ranks = {r: int(v) for r, v in enumerate(nans) if v > 0}
        here = (
            f"; here (rank {shard.rank}) first at indices {torch.nonzero(nan).flatten()[:5].tolist()}" if n_nan else ""
        )
        raise _collective_error(
            f"{where}: the log-weight is NaN for {int(sum(nans))} of {st.num} particles "
            f"(per rank: {ranks}{here}); the target, score or potential returned NaN"
        )
    if st.lse[0] == -math.inf:
        raise _collective_error(
            f"{where}: all {st.num} particles (on {shard.world_size} processes) have zero "
            "weight (the target is zero wherever the particles are; check the initial "
            "distribution's support)"
        )
    return st


def check_log_weights(log_w: Tensor, where: str) -> None:
    """The core's check over the whole population: NaN on any rank, or every weight zero,
    raises the same ``ValueError`` on every rank."""
    _weight_stats(sharded(), log_w, where)


def _ess_of(st: _Stats) -> float:
    return math.exp(2 * st.lse[0] - st.lse[1])


def ess(log_w: Tensor, group=None) -> Tensor:
    """Kish ESS :math:`(\\sum w)^2/\\sum w^2` of the whole population from each rank's log-weights
    (:func:`mcsample.ess` when not sharded)."""
    with use(group) as s:
        if s is None or s.islands:
            from mcsample.diagnostics import ess as _ess

            return _ess(log_w)
        return torch.tensor(_ess_of(_weight_stats(s, log_w, "ess")), dtype=torch.float64)


def conditional_ess(log_w: Tensor, log_incr: Tensor, group=None) -> Tensor:
    r"""Conditional ESS (Zhou, Johansen & Aston 2016) of the whole population,
    :math:`N e^{2a - b - c}` with :math:`a = \operatorname{lse}(\ell + \delta)`,
    :math:`b = \operatorname{lse}(\ell + 2\delta)`, :math:`c = \operatorname{lse}(\ell)`
    (:func:`mcsample.conditional_ess` when not sharded)."""
    with use(group) as s:
        if s is None or s.islands:
            from mcsample.diagnostics import conditional_ess as _cess

            return _cess(log_w, log_incr)
        lw = log_w.to(torch.float64)
        inc = torch.as_tensor(log_incr, device=lw.device).to(torch.float64)
        if inc.shape != lw.shape:
            raise ValueError(f"log_incr has shape {tuple(inc.shape)}; expected {tuple(lw.shape)} like log_w")
        if bool(torch.isnan(inc).any()):
            raise ValueError(f"log_incr has NaN for {int(torch.isnan(inc).sum())} particles")
        st = _stats(s, [lw, lw + inc, lw + 2 * inc])
        c, a, b = st.lse
        if not math.isfinite(a):
            return torch.zeros((), dtype=torch.float64)
        return torch.tensor(math.exp(math.log(st.num) + 2 * a - b - c), dtype=torch.float64)


def mean(values: Tensor) -> Tensor:
    """Mean over the particles of every rank (dimension 0), as a tensor on ``values``' device."""
    s = sharded()
    if s is None:
        return values.mean(0)
    v = values.to(torch.float64).reshape(values.shape[0], -1)
    g = s.all_gather(torch.cat([v.sum(0).cpu(), torch.tensor([float(v.shape[0])], dtype=torch.float64)]))
    tot = g.sum(0)
    out = (tot[:-1] / tot[-1]).reshape(values.shape[1:])
    return out.to(dtype=values.dtype, device=values.device)


def weighted_moments(x: Tensor, log_w: Tensor) -> tuple[Tensor, Tensor]:
    """Self-normalized weighted mean and variance of ``x`` per coordinate over the population
    (two passes: mean, then :math:`\\sum_i W_i (x_i - \\mu)^2`)."""
    s = sharded()
    if s is None:
        W = torch.softmax(log_w, 0).to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
        mu = (W * x).sum(0)
        return mu, (W * (x - mu) ** 2).sum(0)
    st = _weight_stats(s, log_w, "weighted moments")
    W = torch.exp(log_w.to(torch.float64) - st.lse[0])
    xf = x.to(torch.float64).reshape(x.shape[0], -1)
    mu = s.all_gather((W @ xf).cpu()).sum(0).to(xf.device)
    var = s.all_gather((W @ (xf - mu) ** 2).cpu()).sum(0).to(xf.device)
    shape = x.shape[1:]
    return mu.reshape(shape).to(x.dtype), var.reshape(shape).to(x.dtype)


class ShardPopulation(Population):
    r"""The sums of :class:`~mcsample.weighted.Population` over a population sharded across the
    ranks of ``shard`` (collective: every rank calls the same methods in the same order), with
    ``lse`` the global logsumexp of the log-weights. Grouped sums go through the groups' owner
    ranks (id mod world size) in one all-to-all of per-group partial sums, so a rank never holds
    more than its share of the groups; totals are all-gathered."""

    def __init__(self, shard: Shard, sizes: list[int], lse: float = math.nan):
        self.shard = shard
        self.sizes = list(sizes)
        self.offset = sum(self.sizes[: shard.rank])
        self.lse = lse

    def size(self, n: int) -> int:
        return sum(self.sizes)

    def ids(self, n: int, device=None) -> Tensor:
        return torch.arange(self.offset, self.offset + n, device=device)

    def normalize(self, log_w: Tensor) -> Tensor:
        return torch.exp(log_w.to(torch.float64) - self.lse)

    def total(self, v: Tensor) -> Tensor:
        local = v.to(torch.float64).sum(0)
        return self.shard.all_gather(local.reshape(-1).cpu()).sum(0).reshape(local.shape).to(v.device)

    def square_sums(self, values: Tensor, groups: Tensor) -> Tensor:
        s, R = self.shard, self.shard.world_size
        k, c, N = groups.shape[0], values.shape[1], self.size(0)
        dev = values.device
        keys = (groups.to(dev) + N * torch.arange(k, device=dev)[:, None]).reshape(-1)
        uniq, inv = torch.unique(keys, return_inverse=True)
        partial = torch.zeros((uniq.numel(), c), dtype=torch.float64, device=dev)
        partial.index_add_(0, inv, values.to(torch.float64).repeat(k, 1))
        dest = uniq % R
        order = torch.argsort(dest, stable=True)
        uniq, partial, dest = uniq[order], partial[order], dest[order]
        send = torch.bincount(dest.cpu(), minlength=R).tolist()
        got, _ = s.alltoallv(_pack([uniq, partial], uniq.numel()), send)
        ids, sums = _unpack(got, [(torch.long, ()), (torch.float64, (c,))])
        u2, inv2 = torch.unique(ids, return_inverse=True)
        S = torch.zeros((u2.numel(), c), dtype=torch.float64, device=sums.device).index_add_(0, inv2, sums)
        local = torch.zeros((k, c), dtype=torch.float64, device=sums.device).index_add_(0, u2 // N, S * S)
        return s.all_gather(local.reshape(-1).cpu()).sum(0).reshape(k, c).to(dev)

    def count_groups(self, groups: Tensor, mask: Tensor) -> Tensor:
        s, R = self.shard, self.shard.world_size
        uniq = torch.unique(groups.to(mask.device)[mask])
        dest = uniq % R
        order = torch.argsort(dest, stable=True)
        send = torch.bincount(dest.cpu(), minlength=R).tolist()
        got, _ = s.alltoallv(_pack([uniq[order]], uniq.numel()), send)
        (ids,) = _unpack(got, [(torch.long, ())])
        local = torch.tensor([float(torch.unique(ids).numel())], dtype=torch.float64)
        return s.all_gather(local).sum().round().long()


# ---------------------------------------------------------------------------------------------
# resampling: offspring counts, then the balanced exchange


def _keyed_uniforms(key: int, start: int, stop: int, device="cpu") -> Tensor:
    """Uniforms ``start..stop-1`` of the stream of ``key``: block ``b`` of :data:`BLOCK` values
    comes from a generator seeded by ``(key, b)``, so any range is drawn without the others."""
    if stop <= start:
        return torch.zeros(0, dtype=torch.float64, device=device)
    out = []
    for b in range(start // BLOCK, (stop - 1) // BLOCK + 1):
        g = torch.Generator(device=device)
        g.manual_seed(_mix(key, b))
        u = torch.rand(BLOCK, dtype=torch.float64, generator=g, device=device)
        lo, hi = max(start - b * BLOCK, 0), min(stop - b * BLOCK, BLOCK)
        out.append(u[lo:hi])
    return torch.cat(out)


def _ends_from_x(x: Tensor, x0: float, x1: float, num: int, scheme: str, U: float, key: int) -> tuple[Tensor, int, int]:
    """End positions of the offspring of particles at scaled cumulative weights ``x`` in
    ``[x0, x1]``, clamped between the ends at ``x0`` and ``x1`` (which every rank computes alike),
    the last one at ``x1``'s."""
    if scheme == "systematic":

        def end(v):
            return torch.ceil(v - U).clamp(min=0, max=num)

        e0, e1 = float(end(torch.tensor(x0, dtype=torch.float64))), float(end(torch.tensor(x1, dtype=torch.float64)))
        ends = end(x)
    else:  # stratified: stratum k's uniform from the keyed stream; U[num] = 1 (no stratum)
        k_lo, k_hi = min(int(math.floor(x0)), num), min(int(math.floor(x1)), num)
        u = _keyed_uniforms(key, k_lo, k_hi + 1, x.device)
        if k_hi == num:
            u[-1] = 1.0

        def end(v, k):
            return k + (u[(k - k_lo).to(torch.long)] < v - k).to(v.dtype)

        def end1(v):
            t = torch.tensor([v], dtype=torch.float64, device=x.device)
            return float(end(t, torch.floor(t).clamp(max=num))[0])

        e0, e1 = end1(x0), end1(x1)
        ends = end(x, torch.floor(x).clamp(min=k_lo, max=k_hi))
    ends = ends.clamp(min=e0, max=e1)
    if ends.numel():
        ends[-1] = e1
    return ends.to(torch.long), int(e0), int(e1)


def _shared_draws(shard: Shard, generator, scheme: str) -> tuple[float, int]:
    """``(U, key)`` drawn from rank 0's generator and broadcast: ``U`` first, as
    :func:`mcsample.resample` draws it (systematic), then a 62-bit key."""
    if shard.rank == 0:
        dev = generator.device if generator is not None else "cpu"
        U = float(torch.rand((), dtype=torch.float64, generator=generator, device=dev))
        hi = lo = 0
        if scheme != "systematic":
            hi, lo = (int(v) for v in torch.randint(0, 2**31, (2,), generator=generator, device=dev))
        t = torch.tensor([U, float(hi), float(lo)], dtype=torch.float64)
    else:
        t = torch.zeros(3, dtype=torch.float64)
    t = shard.broadcast(t)
    return float(t[0]), (int(t[1]) << 31) | int(t[2])


def offspring(
    log_w: Tensor,
    scheme: str = "systematic",
    generator: torch.Generator | None = None,
    group=None,
    num: int | None = None,
) -> Tensor:
    r"""Offspring count of each local particle when the whole sharded population is resampled
    into ``num`` (default :math:`N`) draws with ``scheme`` (see the module docstring); the
    counts of all ranks sum to ``num``. Collective."""
    with use(group) as s:
        if s is None or s.islands:
            idx = _resample(log_w, num, scheme, generator)
            return torch.bincount(idx, minlength=log_w.numel())
        st = _weight_stats(s, log_w, "resampling")
        return _offspring(s, log_w, st, scheme, generator, num)


def _offspring(shard: Shard, log_w: Tensor, st: _Stats, scheme: str, generator, num: int | None) -> Tensor:
    if scheme not in SCHEMES:
        raise _collective_error(
            f"resampling scheme {scheme!r} is not available for a population sharded "
            f"over processes; use one of {list(SCHEMES)}"
        )
    num = st.num if num is None else int(num)
    U, key = _shared_draws(shard, generator, scheme)
    lw = log_w.to(torch.float64)
    n = lw.numel()
    m = st.parts[:, 0, 0].tolist()
    s = st.parts[:, 0, 1].tolist()
    M = max(m)
    scale = [0.0 if not math.isfinite(mr) else math.exp(mr - M) for mr in m]
    totals = [sr * f for sr, f in zip(s, scale)]
    prefix = [0.0]
    for t in totals:
        prefix.append(prefix[-1] + t)
    S = prefix[-1]
    r = shard.rank
    if scheme == "multinomial":
        draws = _rank_draws(totals, num, key)
        if draws[r] == 0 or n == 0:
            return torch.zeros(n, dtype=torch.long, device=log_w.device)
        idx = _resample(lw, draws[r], "multinomial", generator)
        return torch.bincount(idx, minlength=n)
    x0, x1 = prefix[r] / S * num, prefix[r + 1] / S * num
    if r == shard.world_size - 1:
        x1 = float(num)
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=log_w.device)
    c = torch.cumsum(torch.exp(lw - (m[r] if math.isfinite(m[r]) else 0.0)), 0)
    x = (c.mul_(scale[r]).add_(prefix[r])).div_(S).mul_(num) if scale[r] > 0 else torch.full_like(c, x0)
    ends, e0, _ = _ends_from_x(x, x0, x1, num, scheme, U, key)
    return torch.diff(ends, prepend=ends.new_tensor([e0]))


def _rank_draws(totals: list[float], num: int, key: int) -> list[int]:
    r"""How many of ``num`` multinomial draws fall on each rank, :math:`(M_r)\sim
    \mathrm{Multinomial}(N, T_r/S)`, by a chain of binomials on the CPU from ``key`` (the same
    on every rank)."""
    g = torch.Generator().manual_seed(_mix(key, 1))
    S = sum(totals)
    left, rest, draws = float(num), 1.0, []
    for q, t in enumerate(totals):
        p = t / S
        if q == len(totals) - 1:
            k = left
        elif p <= 0.0 or left == 0.0:
            k = 0.0
        else:
            k = float(
                torch.binomial(
                    torch.tensor(left, dtype=torch.float64),
                    torch.tensor(min(p / rest, 1.0) if rest > 0 else 1.0, dtype=torch.float64),
                    generator=g,
                )
            )
        draws.append(int(k))
        left -= k
        rest -= p
    return draws


def _transfer_plan(have: list[int], want: list[int]) -> list[list[int]]:
    """``T[s][d]``: offspring sent from rank s to rank d; surplus ranks fill deficit ranks in
    rank order (two pointers), so only surplus offspring move."""
    R = len(have)
    T = [[0] * R for _ in range(R)]
    give = [(r, have[r] - want[r]) for r in range(R) if have[r] > want[r]]
    take = [(r, want[r] - have[r]) for r in range(R) if have[r] < want[r]]
    i = j = 0
    while i < len(give) and j < len(take):
        (s, a), (d, b) = give[i], take[j]
        k = min(a, b)
        T[s][d] += k
        give[i], take[j] = (s, a - k), (d, b - k)
        i += give[i][1] == 0
        j += take[j][1] == 0
    return T


def _specs(tensors: list[Tensor]) -> list[tuple[torch.dtype, tuple]]:
    return [(t.dtype, tuple(t.shape[1:])) for t in tensors]


def _pack(tensors: list[Tensor], n: int) -> Tensor:
    """``(n, bytes)`` uint8 rows holding each tensor's row ``i`` side by side."""
    cols = []
    for t in tensors:
        width = int(math.prod(t.shape[1:]))
        nbytes = width * t.element_size()
        cols.append(t.detach().reshape(n, width).contiguous().view(torch.uint8).reshape(n, nbytes))
    return torch.cat(cols, 1) if cols else torch.zeros((n, 0), dtype=torch.uint8)


def _unpack(rows: Tensor, specs) -> list[Tensor]:
    out, at, n = [], 0, rows.shape[0]
    for dtype, shape in specs:
        width = int(math.prod(shape))
        nb = width * torch.empty((), dtype=dtype).element_size()
        col = rows[:, at : at + nb].contiguous()
        out.append(
            col.view(dtype).reshape(n, *shape) if width else torch.zeros((n, *shape), dtype=dtype, device=rows.device)
        )
        at += nb
    return out


def exchange(tensors: list[Tensor], counts: Tensor, group=None) -> list[Tensor]:
    """Replace every local particle ``i`` by ``counts[i]`` copies of its rows in ``tensors``
    (leading dimension n) and rebalance the population so that every rank holds its
    :func:`balanced_sizes` share: each rank keeps up to its share of its own offspring (in
    order) and sends the surplus, one row per (particle, destination) with its count, in one
    all-to-all. Collective; the multiset of all ranks' rows is that of the single-process
    ``repeat_interleave``."""
    with use(group) as s:
        if s is None or s.islands:
            return [
                t[torch.repeat_interleave(torch.arange(counts.numel(), device=t.device), counts.to(t.device))]
                for t in tensors
            ]
        return _exchange(s, tensors, counts)


def _exchange(shard: Shard, tensors: list[Tensor], counts: Tensor) -> list[Tensor]:
    R, r = shard.world_size, shard.rank
    n = counts.numel()
    dev = tensors[0].device
    counts = counts.to(dev)
    have = shard.sizes(int(counts.sum()))
    want = balanced_sizes(sum(have), R)
    T = _transfer_plan(have, want)
    order = torch.repeat_interleave(torch.arange(n, device=dev), counts)  # local offspring, in order
    keep = min(have[r], want[r])
    kept = order[:keep]
    surplus = order[keep:]
    amounts = T[r]
    dest = torch.repeat_interleave(torch.arange(R, device=dev), torch.tensor(amounts, dtype=torch.long, device=dev))
    # one row per (destination, particle), with its number of offspring there
    pair = dest * max(n, 1) + surplus
    uniq, per = torch.unique_consecutive(pair, return_counts=True)
    rows_idx, rows_dest = uniq % max(n, 1), uniq // max(n, 1)
    send = torch.bincount(rows_dest, minlength=R).tolist() if uniq.numel() else [0] * R
    originals = [t.to(dev) for t in tensors]
    specs = _specs(originals) + [(torch.long, ())]
    rows = _pack([t[rows_idx] for t in originals] + [per], int(rows_idx.numel()))
    got, _ = shard.alltoallv(rows, send)
    received = _unpack(got, specs)
    times = received[-1]
    out = []
    for t, orig, rec in zip(tensors, originals, received[:-1]):
        new = torch.cat([orig[kept], torch.repeat_interleave(rec, times, dim=0)])
        out.append(new.to(t.device))
    row_bytes = int(rows.shape[1])
    moved_rows = sum(send) - send[r]
    last_exchange.update(
        rows=moved_rows,
        offspring=int(sum(amounts) - amounts[r]),
        row_bytes=row_bytes,
        bytes=moved_rows * row_bytes,
        lower_bound_offspring=sum(max(0, h - w) for h, w in zip(have, want)),
    )
    return out


def resample_state(state, scheme: str, generator, stats: _Stats | None = None):
    """The core's ``take`` for a sharded population: global offspring counts, the balanced
    exchange of ``x``, the per-particle ``cache`` tensors and the global time-0 ancestors, the
    evidence increment :math:`\\log\\frac1N\\sum_i w_i` folded into ``log_scale`` and the weights
    reset; the genealogy (:class:`~mcsample.weighted.Genealogy`) is updated with global
    ancestor ids, its sums over the whole population (:class:`ShardPopulation`)."""
    s = sharded()
    n = state.log_w.numel()
    st = stats if stats is not None else _weight_stats(s, state.log_w, f"step {state.index}")
    counts = _offspring(s, state.log_w, st, scheme, generator, None)
    keys = [k for k, v in state.cache.items() if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n]
    for k, v in state.cache.items():
        if k not in keys and not (
            v is None or isinstance(v, (int, float, str, bool)) or (isinstance(v, Tensor) and v.ndim == 0)
        ):
            raise TypeError(
                f"cache entries must be per-particle tensors with leading dimension {n}, got "
                f"{type(v).__name__} of shape {getattr(v, 'shape', None)}"
            )
    gen = state.genealogy
    if gen.has_history:
        population = ShardPopulation(s, st.sizes, st.lse[0])
        lineage = gen.lineage_rows(n, population)
        gen = gen.weigh_event(state.log_w, counts, scheme, population)
    else:
        lineage = gen.eves[None]
    moved = _exchange(s, [state.x.detach(), *[state.cache[k] for k in keys], lineage.T.contiguous()], counts)
    x, rows = moved[0], moved[-1].T
    cache = dict(state.cache)
    cache.update(zip(keys, moved[1:-1]))
    m = x.shape[0]
    log_scale = state.log_scale + (st.lse[0] - math.log(st.num))
    if gen.has_history:
        genealogy = gen.carried(rows)
    else:
        genealogy = Genealogy.from_ancestors(rows[0], gen.generations + 1)
    return state.replace(
        x=x,
        log_w=torch.zeros(m, dtype=torch.float64, device=state.log_w.device),
        log_scale=log_scale,
        genealogy=genealogy,
        cache=cache,
    )


def start_genealogy(n: int, device=None) -> Genealogy | None:
    """The online genealogy of a sharded start, its Eves the global ids ``offset + arange(n)``;
    ``None`` when the population is not sharded."""
    s = sharded()
    if s is None:
        return None
    offset = sum(s.sizes(n)[: s.rank])
    return replace(Genealogy.start(n, device=device), eves=torch.arange(offset, offset + n, device=device))


def check_scheme(scheme: str) -> None:
    """Refuse, up front, a resampling scheme a sharded run cannot use."""
    if sharded() is not None and scheme not in SCHEMES:
        raise ValueError(
            f"resampling scheme {scheme!r} is not available for a population sharded over "
            f"processes; use one of {list(SCHEMES)}"
        )


# ---------------------------------------------------------------------------------------------
# results


class ShardedSamples(WeightedSamples):
    """This rank's particles of a sharded population (or of one island), with the whole
    population's ``log_evidence``, ``log_evidence_stderr``, ``ess`` and ``khat`` (computed when
    the result is made, identical on every rank; reading them needs no communication).

    ``len()`` and ``samples``/``log_weights`` are local; ``num_particles`` is :math:`N`.
    :meth:`expectation`, :meth:`resample` and :meth:`gather` are collective: call them on every
    rank. ``info["distributed"]`` holds the mode, rank, world size and, for islands, each
    island's log-evidence and share.
    """

    def __init__(self, ws: WeightedSamples, shard: Shard):
        super().__init__(
            ws.samples,
            ws.log_weights,
            log_scale=ws.log_scale,
            genealogy=ws.genealogy,
            generations=ws.generations,
            ess_history=ws.ess_history,
            statistics=ws.statistics,
            info=dict(ws.info),
        )
        self._shard = shard
        self._summarize()

    # -- construction ---------------------------------------------------------------------------
    def _summarize(self) -> None:
        s = self._shard
        lw = self.log_weights
        n = lw.numel()
        g = self.generations
        if s.islands:
            var = (
                float(self.genealogy.log_evidence_variance(lw))
                if self.genealogy is not None and n > 1
                else float(_local_relative_variance(lw, g))
            )
            st = _stats(s, [lw, 2 * lw], [float(self.log_scale), var, float(g)])
        else:
            st = _stats(s, [lw, 2 * lw], [float(g)])
        self.num_particles = st.num
        self._lse = st.lse[0]
        self._ess = torch.tensor(_ess_of(st) if math.isfinite(st.lse[0]) else 0.0, dtype=torch.float64)
        info = {
            "mode": "islands" if s.islands else "sharded",
            "rank": s.rank,
            "world_size": s.world_size,
            "num_particles": st.num,
            "local_particles": n,
        }
        if s.islands:
            # island r: log Z_r = c_r + lse_r - log n_r. Its particles carry w_i e^{c_r}, so that the
            # whole population's lse - log N is log(sum_r n_r Z_r / N), and island r's share of the
            # total weight is n_r Z_r / sum_q n_q Z_q.
            c = st.extras[:, 0]
            no_evidence = bool(torch.isnan(c).any())  # e.g. DPS: equal weights, no evidence
            c = torch.nan_to_num(c, nan=0.0)
            island_lse = st.parts[:, 0, 0] + torch.log(st.parts[:, 0, 1]) + c
            total = torch.logsumexp(island_lse, 0)
            share = torch.exp(island_lse - total)
            sizes = torch.tensor(st.sizes, dtype=torch.float64)
            self._rel_var = float((share * share * st.extras[:, 1]).sum())
            self._lse = float(total)
            self.log_weights = lw + float(c[s.rank])
            self.log_scale = torch.full_like(self.log_scale, math.nan if no_evidence else 0.0)
            self._ess = torch.tensor(_island_ess(st, c), dtype=torch.float64)
            info.update(island_log_evidence=(island_lse - torch.log(sizes)).tolist(), island_share=share.tolist())
        else:
            N = st.num
            if g <= 1 or self.genealogy is None:
                sq = math.exp(st.lse[1] - 2 * st.lse[0])
                cm1 = math.expm1(g * math.log(N / (N - 1))) if N > 1 else math.inf
                self._rel_var = (1.0 + cm1) * sq - cm1
            else:
                population = ShardPopulation(s, st.sizes, self._lse)
                self._rel_var = float(self.genealogy.log_evidence_variance(lw, population))
        self._khat = _global_khat(s, self.log_weights, self.num_particles)
        self.info["distributed"] = info

    # -- the whole population's summaries ------------------------------------------------------
    @property
    def normalized_weights(self) -> Tensor:
        """This rank's slice of the whole population's normalized weights."""
        return torch.exp(self.log_weights - self._lse)

    @property
    def ess(self) -> Tensor:
        return self._ess

    @property
    def log_evidence(self) -> Tensor:
        return self.log_scale + self._lse - math.log(self.num_particles)

    @property
    def log_evidence_stderr(self) -> Tensor:
        dev = self.log_weights.device
        if bool(torch.isnan(self.log_scale)):
            return torch.tensor(math.nan, dtype=torch.float64, device=dev)
        if self.num_particles < 2:
            return torch.tensor(math.inf, dtype=torch.float64, device=dev)
        return torch.tensor(max(self._rel_var, 0.0), dtype=torch.float64, device=dev).sqrt()

    @property
    def khat(self) -> Tensor:
        return self._khat

    def __repr__(self) -> str:
        d = self.info["distributed"]
        return (
            f"ShardedSamples(N={self.num_particles} on {d['world_size']} processes ({d['mode']}), "
            f"local={len(self)}, ess={float(self.ess):.1f}, log_evidence={float(self.log_evidence):.4f}"
            f" ± {float(self.log_evidence_stderr):.2g})"
        )

    # -- collective operations -------------------------------------------------------------------
    def expectation(self, fn=None) -> Estimate:
        r"""Self-normalized :math:`E_\pi[f]` over the whole population with its standard error
        (delta method; after resampling grouped by time-0 ancestor, Lee & Whiteley 2018).
        Collective: call it on every rank."""
        s = self._shard
        if isinstance(fn, str):
            return self._streamed(fn)
        if self.samples is None:
            raise ValueError(
                "these weighted samples kept no samples (keep_samples=False); ask for the statistic by name"
            )
        values = self.samples if fn is None else fn(self.samples)
        n = values.shape[0]
        if n != self.log_weights.numel():
            raise ValueError(f"fn returned {n} values for {self.log_weights.numel()} particles")
        shape = values.shape[1:]
        v = values.to(torch.float64).reshape(n, -1)
        W = self.normalized_weights.to(v.device)
        mu = s.all_gather((W @ v).cpu()).sum(0).to(v.device)
        dev = W[:, None] * (v - mu)
        g = self.generations
        if s.islands:
            # independent islands: each groups by its own ancestors, with its own (n/(n-1))^g
            if self.genealogy is None or g <= 1:
                local = (dev * dev).sum(0)
            else:
                S = torch.zeros_like(dev).index_add_(0, self.genealogy.eves.to(dev.device), dev)
                local = (S * S).sum(0) * math.exp(g * math.log1p(1.0 / max(n - 1, 1)))
            var = s.all_gather(local.cpu()).sum(0)
        elif self.genealogy is None or g <= 1:
            var = s.all_gather((dev * dev).sum(0).cpu()).sum(0)
        else:
            population = ShardPopulation(s, s.sizes(n), self._lse)
            var = self.genealogy.expectation_stderr(W, v, population).cpu() ** 2
        return Estimate(mu.reshape(shape), var.sqrt().to(mu.device).reshape(shape))

    def _streamed(self, name: str) -> Estimate:
        if name not in self.statistics:
            raise KeyError(f"no streamed statistic {name!r}; available: {sorted(self.statistics)}")
        moments, shape = self.statistics[name]
        m = float(moments.max_log_w) if moments.max_log_w is not None else -math.inf
        flat = torch.cat([torch.tensor([m], dtype=torch.float64)] + [t.cpu().reshape(-1) for t in moments.sums])
        g = self._shard.all_gather(flat)
        M = float(g[:, 0].max())
        f = torch.exp(g[:, 0] - M).nan_to_num(0.0)
        sizes = [t.numel() for t in moments.sums]
        sums, at = [], 1
        for k, size in enumerate(sizes):
            power = f if k in (0, 1) else f * f
            sums.append((g[:, at : at + size] * power[:, None]).sum(0).to(moments.sums[k].device))
            at += size
        return RunningMoments(max_log_w=torch.tensor(M, dtype=torch.float64), sums=sums).estimate(shape)

    def resample(
        self, num: int | None = None, scheme: str = "systematic", generator: torch.Generator | None = None
    ) -> Tensor:
        """This rank's balanced share of ``num`` (default :math:`N`) equally weighted draws from
        the whole population (``generator``: rank 0's draws the shared uniforms). Collective."""
        if self.samples is None:
            raise ValueError("these weighted samples kept no samples (keep_samples=False)")
        s = self._shard
        lw = self.log_weights
        st = _stats(s, [lw, 2 * lw])
        counts = _offspring(s, lw, st, scheme, generator, num)
        return _exchange(s, [self.samples], counts)[0]

    def gather(self, dst: int = 0) -> WeightedSamples | None:
        """The whole population as a plain :class:`~mcsample.weighted.WeightedSamples` on rank
        ``dst`` (``None`` on the others), time-0 ancestors as global ids; its ``log_evidence`` is
        the same. Collective; needs the memory of the whole population on ``dst``."""
        s = self._shard
        sizes = s.sizes(len(self))
        most = max(sizes)
        offset = sum(sizes[: s.rank])
        eves = self.ancestors
        if eves is None:
            eves = torch.arange(len(self), device=self.log_weights.device)
        if s.islands:
            eves = eves + offset
        tensors = [self.log_weights, eves.to(self.log_weights.device)]
        if self.samples is not None:
            tensors.append(self.samples.to(self.log_weights.device))
        specs = _specs(tensors)
        rows = _pack(tensors, len(self))
        pad = torch.zeros((most, rows.shape[1]), dtype=torch.uint8, device=rows.device)
        pad[: rows.shape[0]] = rows
        got = s.gather(pad, dst)
        if got is None:
            return None
        parts = _unpack(torch.cat([gr[:k] for gr, k in zip(got, sizes)]), specs)
        info = dict(self.info)
        info["log_evidence_stderr"] = float(self.log_evidence_stderr)
        genealogy = (
            None
            if self.generations <= 1 and self.ancestors is None
            else Genealogy.from_ancestors(parts[1], self.generations)
        )
        return WeightedSamples(
            parts[2] if self.samples is not None else None,
            parts[0],
            log_scale=self.log_scale.cpu(),
            genealogy=genealogy,
            ess_history=self.ess_history,
            info=info,
        )

    def __getstate__(self) -> dict:  # saved results keep their numbers, not the process group
        return {**self.__dict__, "_shard": None}

    def to(self, device) -> ShardedSamples:
        out = object.__new__(ShardedSamples)
        out.__dict__.update(self.__dict__)
        out.samples = None if self.samples is None else self.samples.to(device)
        out.log_weights = self.log_weights.to(device)
        out.log_scale = self.log_scale.to(device)
        out.genealogy = None if self.genealogy is None else self.genealogy.to(device)
        return out


def _local_relative_variance(log_w: Tensor, generations: int) -> Tensor:
    n = log_w.numel()
    W = torch.softmax(log_w, 0)
    c = math.expm1(generations * math.log1p(1.0 / max(n - 1, 1)))
    return (1.0 + c) * (W * W).sum() - c


def _island_ess(st: _Stats, c: Tensor) -> float:
    """ESS of the combined islands, whose weights are the islands' times :math:`e^{c_r}`."""
    m1 = st.parts[:, 0, 0] + c
    m2 = st.parts[:, 1, 0] + 2 * c
    a = _combine(torch.stack([torch.stack([m1, st.parts[:, 0, 1]], 1)], 1))[0]
    b = _combine(torch.stack([torch.stack([m2, st.parts[:, 1, 1]], 1)], 1))[0]
    return math.exp(float(2 * a - b))


def _global_khat(shard: Shard, log_w: Tensor, num: int) -> Tensor:
    """PSIS :math:`\\hat k` (Vehtari et al. 2024) of the whole population: the
    :math:`M+1` largest log-weights of every rank hold the global tail."""
    M = int(math.ceil(min(num / 5.0, 3.0 * math.sqrt(num))))
    inf = torch.tensor(math.inf, dtype=torch.float64)
    if M < 5 or M + 1 > num:
        return inf
    k = min(M + 1, log_w.numel())
    top = torch.full((M + 1,), -math.inf, dtype=torch.float64)
    top[:k] = torch.topk(log_w.to(torch.float64).cpu(), k).values
    tops = shard.gather(top, 0)  # the tails go to rank 0 only; k-hat comes back
    khat = _khat_of_tail(torch.cat(tops), M) if tops is not None else torch.zeros((), dtype=torch.float64)
    return shard.broadcast(khat.reshape(1).to(torch.float64))[0]


def _khat_of_tail(values: Tensor, M: int) -> Tensor:
    inf = torch.tensor(math.inf, dtype=torch.float64)
    tail = torch.topk(values, M + 1).values.flip(0)  # ascending: the cutoff, then the M largest
    lw = tail - tail[-1]
    cutoff = torch.clamp(lw[0], min=math.log(torch.finfo(torch.float64).tiny))
    if bool(lw[-1] <= cutoff):
        return -inf
    t = lw[1:][lw[1:] > cutoff]
    if t.numel() < 5:
        return inf
    khat, _ = _gpd_fit(torch.exp(t) - torch.exp(cutoff))
    return khat if bool(torch.isfinite(khat)) else inf


def finish(ws: WeightedSamples) -> WeightedSamples:
    """The result of a run: :class:`ShardedSamples` in a sharded run or islands (collective),
    ``ws`` unchanged otherwise."""
    s = active()
    return ws if s is None else ShardedSamples(ws, s)


def gather(ws: WeightedSamples, dst: int = 0) -> WeightedSamples | None:
    """The whole population of a sharded result on rank ``dst`` (``None`` on the others); a
    single-process result is returned as it is. Collective."""
    return ws.gather(dst) if isinstance(ws, ShardedSamples) else ws


# ---------------------------------------------------------------------------------------------
# checkpoints: one file per rank, a manifest at the path


def _rank_file(path: str, rank: int, world_size: int, index: int) -> str:
    return f"{path}.rank{rank}-of-{world_size}.step{index}"


def save_state(path, state: dict, generator: torch.Generator, kind: str, run: dict | None = None) -> None:
    """Write this rank's ``state`` and generator, then (rank 0, once every rank has written) the
    manifest at ``path``; older rank files are removed after the manifest moved on."""
    s = active()
    path = os.fspath(path)
    index = int(state["index"])
    mine = _rank_file(path, s.rank, s.world_size, index)
    save_atomic(
        {
            "kind": kind,
            "state": state,
            "generator": generator.get_state(),
            "fingerprint": run,
            "rank": s.rank,
            "world_size": s.world_size,
        },
        mine,
    )
    s.barrier()
    if s.rank == 0:
        save_atomic(
            {
                "kind": f"{kind} (sharded over {s.world_size} processes)",
                "manifest": True,
                "base_kind": kind,
                "world_size": s.world_size,
                "index": index,
                "fingerprint": run,
                "files": [os.path.basename(_rank_file(path, r, s.world_size, index)) for r in range(s.world_size)],
            },
            path,
        )
    s.barrier()
    for old in glob.glob(glob.escape(f"{path}.rank{s.rank}-of-{s.world_size}.step") + "*"):
        if old != mine:
            with contextlib.suppress(OSError):
                os.remove(old)


def load_state(
    path, kind: str, generator: torch.Generator | None, device=None, run: dict | None = None, progress_of=None
) -> tuple[dict | None, torch.Generator | None]:
    """This rank's saved state and generator from the manifest at ``path`` (``(None, generator)``
    when there is none); refuses a checkpoint of another world size, of a single process, of
    another algorithm or of another run."""
    s = active()
    if path is None or not os.path.exists(path):
        return None, generator
    path = os.fspath(path)
    man = torch.load(path, weights_only=True)
    if not (isinstance(man, dict) and man.get("manifest")):
        raise _collective_error(
            f"checkpoint {path} was written by a single process; a run sharded over "
            f"{s.world_size} processes cannot resume it (resume it in one process, or choose "
            "another path)"
        )
    if man["world_size"] != s.world_size:
        raise _collective_error(
            f"checkpoint {path} was written by a run sharded over {man['world_size']} processes; "
            f"resume it with {man['world_size']} processes (this run has {s.world_size}), or "
            "choose another path"
        )
    if man.get("base_kind") != kind:
        raise _collective_error(f"checkpoint {path} was written by {man.get('base_kind')!r}, not {kind!r}")
    mine = _rank_file(path, s.rank, s.world_size, int(man["index"]))
    if not os.path.exists(mine):
        raise ValueError(f"checkpoint {path}: the file of rank {s.rank} ({os.path.basename(mine)}) is missing")
    saved = torch.load(mine, weights_only=True)
    if run is not None:
        diff = differences(saved.get("fingerprint") or {}, run)
        if diff:
            raise ValueError(
                f"checkpoint {path} belongs to another run: " + "; ".join(diff) + ". Delete it or choose another path."
            )
    if generator is None:
        x = saved["state"].get("x")
        generator = torch.Generator(
            device=device if device is not None else (x.device if isinstance(x, Tensor) else "cpu")
        )
    generator.set_state(saved["generator"])
    if progress_of is not None and s.rank == 0:
        print(f"{path}: resumed at {progress_of(saved['state'])} ({s.world_size} processes)", file=sys.stderr)
    return saved["state"], generator
