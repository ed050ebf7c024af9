r"""Resampling speed: mcsample against plain numpy and against ``particles`` (numba), same run.

Resampling turns :math:`N` weighted particles into :math:`N` equally weighted ones by drawing
ancestor indices whose offspring counts have mean :math:`N W_i`; every scheme inverts the
cumulative weights :math:`C_i = \sum_{j\le i} W_j` at some uniforms (Douc, Cappé & Moulines
2005; Chopin & Papaspiliopoulos 2020, ch. 9). This script times, for
:math:`N = 10^3 \dots 10^7` and the schemes systematic, stratified, multinomial, residual and
SSP:

* **ours**: :func:`mcsample.resample` on CPU tensors of unnormalized float64 log-weights (the
  numba kernels of ``mcsample/_resampling_numba.py``), so the normalization
  :math:`W = \mathrm{softmax}(\ell)` (and the input checks) are inside the timing, as a user
  pays them; with ``--torch-path`` also **torch**, the same call with
  ``mcsample.resampling.CPU_BACKEND = "torch"``: the torch code that runs on GPUs, on the CPU;
* **numpy**: a straightforward vectorized numpy version (``benchmarks/_numpy_resampling.py``:
  softmax, ``cumsum``, ``searchsorted``), also from log-weights; no SSP;
* **particles** (N. Chopin's library, numba-compiled), in a virtual environment of its own,
  ``benchmarks/.venv-particles/``, created on first use with pip because ``particles`` pins
  ``numpy<2`` (see ``benchmarks/_particles_env.py``). Two columns: ``particles(W)`` calls
  ``particles.resampling.<scheme>(W, N)`` on already normalized weights, the library function
  itself; ``particles(lw)`` adds ``exp_and_normalise(lw)``, the same work as ours.

All three use the same log-weights :math:`\ell_i \sim \mathcal N(0, \text{scale}^2)` from a fixed
seed (the first :math:`N` of one array, passed to ``particles`` through a ``.npy`` file).
Measurements are interleaved in rounds (ours, numpy, particles, then the next round in rotated
order) so that the load of a shared machine falls on all of them alike; each number is the
median over all calls. numpy and numba run on one thread, so ours does too by default
(``torch.set_num_threads(1)``; ``--threads`` changes it). Ratios are ours / theirs: below 1
means mcsample is faster.

torch's CPU allocator does not ask Linux for transparent huge pages unless the environment
variable ``THP_MEM_ALLOC_ENABLE=1`` is set before torch is imported (numpy does this by
itself); at :math:`N=10^7` the page faults of fresh 80 MB buffers then dominate the torch path.
The numba path allocates its buffers with numpy (torch only fills them with uniforms), so it
gets huge pages either way. ``--thp`` sets the variable for this run, to measure the difference.

Usage::

    python benchmarks/resampling.py            # full: N = 1e3..1e7, ~2.5 min on a loaded 2-core CPU
    python benchmarks/resampling.py --quick    # N = 1e3..1e5, ~15 s
    python benchmarks/resampling.py --torch-path   # + the torch path column, ~3 min
    python benchmarks/resampling.py --no-particles --schemes systematic --ns 1000000

It prints a table and, as its last line, one JSON object with every number. The first run also
creates ``benchmarks/.venv-particles`` (about 20 s with a warm pip cache); if that fails (no
network, no wheel) the ``particles`` columns are left out and the reason is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _numpy_resampling as npr  # noqa: E402
import _particles_env as penv  # noqa: E402

SCHEMES = ["systematic", "stratified", "multinomial", "residual", "ssp"]
FULL_NS = [10**3, 10**4, 10**5, 10**6, 10**7]
QUICK_NS = [10**3, 10**4, 10**5]


def median(xs: list[float]) -> float:
    """Median of a non-empty list."""
    xs = sorted(xs)
    k = len(xs)
    return xs[k // 2] if k % 2 else 0.5 * (xs[k // 2 - 1] + xs[k // 2])


def interleaved(
    contenders: dict[str, Callable[[int, float], dict[str, list[float]]]],
    rounds: int,
    calls: int,
    min_time: float,
) -> dict[str, dict[str, float]]:
    """Median wall and CPU time of each contender, measured in ``rounds`` interleaved rounds.

    ``contenders[name](calls, min_time)`` runs at least ``calls`` calls and ``min_time``
    seconds and returns ``{"wall": [...], "cpu": [...]}``, the times of each call. Round ``r``
    visits the contenders in an order rotated by ``r``, so a burst of load on a shared machine
    hits all of them. Returns ``{name: {"wall": median, "cpu": median}}``.
    """
    names = list(contenders)
    times = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(rounds):
        for k in range(len(names)):
            name = names[(k + r) % len(names)]
            for clock, ts in contenders[name](calls, min_time).items():
                times[name][clock] += ts
    return {name: {clock: median(ts) for clock, ts in t.items()} for name, t in times.items()}


def run(
    ns: list[int],
    schemes: list[str],
    *,
    rounds: int,
    calls: int,
    min_time: float,
    seed: int,
    scale: float,
    threads: int,
    use_particles: bool,
    clock: str = "cpu",
    ours: Callable | None = None,
    variants: dict[str, Callable] | None = None,
    log=print,
) -> dict:
    """Time every (N, scheme) for ours, numpy and particles; returns a JSON-able dict.

    ``ours(log_w, scheme, generator)`` defaults to :func:`mcsample.resample`. ``variants``
    (``{name: fn}`` with the same signature) are timed in the same rounds and reported as
    ``name_s`` and ``name/ours``: the way to measure a change to the engine against the
    released one and the same baselines before making it. Each row holds both clocks
    (``wall`` and ``cpu``, each ``{name_s: seconds, ratio: value}``); the table and the
    top-level ``name_s`` / ratio keys of a row use ``clock``.
    """
    import numpy as np
    import torch

    import mcsample as mc

    torch.set_num_threads(threads)
    ours = ours or (lambda lw, scheme, gen: mc.resample(lw, scheme=scheme, generator=gen))
    all_lw = np.random.default_rng(seed).normal(size=max(ns)) * scale
    out: dict = {
        "config": {
            "ns": ns,
            "schemes": schemes,
            "clock": clock,
            "rounds": rounds,
            "calls": calls,
            "min_time": min_time,
            "seed": seed,
            "scale": scale,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
            "cpus": os.cpu_count(),
        },
        "particles_missing": None,
        "results": [],
    }
    worker = None
    with tempfile.TemporaryDirectory() as tmp:
        if use_particles:
            python, reason = penv.ensure_venv(log=log)
            if python is not None:
                logw_file = Path(tmp) / "logw.npy"
                np.save(logw_file, all_lw)
                try:
                    worker = penv.ParticlesWorker(python, logw_file, schemes, seed)
                    out["config"]["particles_versions"] = worker.versions
                except RuntimeError as err:
                    reason = str(err)
            if worker is None:
                out["particles_missing"] = reason
                log(f"[particles] column left out: {reason}")
        else:
            out["particles_missing"] = "--no-particles"
        try:
            _header(log, worker is not None, list(variants or {}), clock)
            for n in ns:
                lw_np = np.ascontiguousarray(all_lw[:n])
                lw_t = torch.from_numpy(lw_np.copy())
                gen = torch.Generator().manual_seed(seed)
                rng = np.random.default_rng(seed)
                for scheme in schemes:
                    contenders = _contenders(n, scheme, lw_np, lw_t, gen, rng, ours, worker)
                    for name, fn in (variants or {}).items():
                        contenders[name] = _timed(lambda fn=fn, scheme=scheme: fn(lw_t, scheme, gen))
                    for fn in contenders.values():  # warm-up: first-touch, caches
                        fn(1, 0.0)
                    t = interleaved(contenders, rounds, calls, min_time)
                    row = {"n": n, "scheme": scheme}
                    for c in ("wall", "cpu"):
                        row[c] = _ratios({name: v[c] for name, v in t.items()}, variants)
                    row.update(row[clock])
                    out["results"].append(row)
                    _print_row(log, row, worker is not None, list(variants or {}))
        finally:
            if worker is not None:
                worker.close()
    return out


def _ratios(t: dict[str, float], variants: dict | None) -> dict[str, float]:
    row = {f"{k}_s": v for k, v in t.items()}
    for other in ("numpy", "particles_W", "particles_lw"):
        if other in t:
            row[f"ours/{other}"] = t["ours"] / t[other]
    for name in variants or {}:
        row[f"{name}/ours"] = t[name] / t["ours"]
    return row


def _timed(fn: Callable[[], object]) -> Callable[[int, float], list[float]]:
    def measure(calls: int, min_time: float) -> list[float]:
        return penv.timed_calls(fn, calls, min_time)

    return measure


def _contenders(n, scheme, lw_np, lw_t, gen, rng, ours, worker) -> dict:
    c = {"ours": _timed(lambda: ours(lw_t, scheme, gen))}
    if scheme in npr.SCHEMES:
        c["numpy"] = _timed(lambda: npr.SCHEMES[scheme](lw_np, n, rng))
    if worker is not None:
        for variant in ("W", "lw"):
            c[f"particles_{variant}"] = lambda calls, min_time, v=variant: worker.time(scheme, n, v, calls, min_time)
    return c


_COLS = [
    ("ours", "ours_s"),
    ("numpy", "numpy_s"),
    ("particles(W)", "particles_W_s"),
    ("particles(lw)", "particles_lw_s"),
    ("ours/numpy", "ours/numpy"),
    ("ours/part(W)", "ours/particles_W"),
    ("ours/part(lw)", "ours/particles_lw"),
]


def _columns(with_particles: bool, variants: list[str]) -> list[tuple[str, str]]:
    cols = [c for c in _COLS if with_particles or "part" not in c[0]]
    for name in variants:
        cols += [(name, f"{name}_s"), (f"{name}/ours", f"{name}/ours")]
    return cols


def _header(log, with_particles: bool, variants: list[str], clock: str) -> None:
    cols = _columns(with_particles, variants)
    log(f"{clock} times in ms (median), ratios ours/theirs (< 1: mcsample faster)")
    log(f"{'N':>9} {'scheme':<12}" + "".join(f"{name:>14}" for name, _ in cols))


def _print_row(log, row: dict, with_particles: bool, variants: list[str]) -> None:
    cols = _columns(with_particles, variants)
    cells = []
    for _name, key in cols:
        v = row.get(key)
        if v is None:
            cells.append(f"{'-':>14}")
        elif key.endswith("_s"):
            cells.append(f"{v * 1e3:>14.4g}")
        else:
            cells.append(f"{v:>14.2f}")
    log(f"{row['n']:>9.0e} {row['scheme']:<12}" + "".join(cells))


def summary(out: dict, log=print) -> None:
    """Geometric-mean ratios over N >= 1e5 and the goal's verdict per baseline."""
    for other in ("numpy", "particles_W", "particles_lw"):
        key = f"ours/{other}"
        ratios = [r[key] for r in out["results"] if key in r and r["n"] >= 10**5]
        if ratios:
            gm = math.exp(sum(map(math.log, ratios)) / len(ratios))
            wins = sum(r < 1 for r in ratios)
            log(f"ours/{other} at N >= 1e5: geometric mean {gm:.2f}, ours faster in {wins} of {len(ratios)}")


def torch_path(log_w, scheme: str, generator):
    """:func:`mcsample.resample` through its torch code (the GPU path), on the CPU."""
    import mcsample as mc
    from mcsample import resampling

    old, resampling.CPU_BACKEND = resampling.CPU_BACKEND, "torch"
    try:
        return mc.resample(log_w, scheme=scheme, generator=generator)
    finally:
        resampling.CPU_BACKEND = old


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line, run, print the table and the final JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N up to 1e5, few repeats (~15 s)")
    parser.add_argument("--ns", type=float, nargs="+", help="sizes (default 1e3..1e7)")
    parser.add_argument("--schemes", nargs="+", default=SCHEMES, choices=SCHEMES)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for ours")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="log-weights ~ N(0, scale^2); ESS/N = exp(-scale^2)")
    parser.add_argument("--no-particles", action="store_true")
    parser.add_argument(
        "--torch-path", action="store_true", help="also time mcsample's torch code on the CPU (CPU_BACKEND='torch')"
    )
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="which time the table shows (the JSON has both); see the docstring",
    )
    parser.add_argument(
        "--thp", action="store_true", help="set THP_MEM_ALLOC_ENABLE=1 (torch huge pages) before importing torch"
    )
    args = parser.parse_args(argv)
    if args.thp:
        if "torch" in sys.modules:
            raise SystemExit("--thp must be set before torch is imported")
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    ns = [int(n) for n in args.ns] if args.ns else (QUICK_NS if args.quick else FULL_NS)
    # per round and contender: at least `calls` calls and `min_time` seconds
    calls, min_time = (1, 0.02) if args.quick else (1, 0.15)
    t0 = time.perf_counter()
    out = run(
        ns,
        args.schemes,
        rounds=args.rounds,
        calls=calls,
        min_time=min_time,
        seed=args.seed,
        scale=args.scale,
        threads=args.threads,
        use_particles=not args.no_particles,
        clock=args.clock,
        variants={"torch": torch_path} if args.torch_path else None,
    )
    out["wall_s"] = time.perf_counter() - t0
    summary(out)
    print(f"wall time {out['wall_s']:.0f} s")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
