r"""One SMC step of a population sharded over 1, 2 and 4 processes (``mcsample.distributed``).

The step is the whole of :func:`mcsample.smc.step`: reweight to the next temperature, the
global ESS, the exact global resampling (systematic, every step) with the balanced exchange of
the particles, and one random-walk move of every particle with the population's preconditioner
and acceptance rate, on the 10-d Gaussian mixture of the README from a broad Gaussian (so the
weights are uneven and many offspring change rank). Measured:

* **weak scaling**: :math:`2^{15}` particles per process, so :math:`N = 2^{15}R`; the ideal
  is a constant time per step;
* **strong scaling**: :math:`N = 2^{16}` in all; the ideal is a time :math:`\propto 1/R`;
* **comm**: the fraction of the step spent in collectives (waiting for the slowest rank
  included), the mean over ranks;
* **bytes**: what the exchange sent to other ranks per resampling, against the lower bound:
  the surplus offspring (the fewest that any balanced layout must move off their rank) times
  the bytes of one particle (``x``, cached log-densities, ancestor id);
* **adaptive β**: the same step with the adaptive schedule, whose bisection needs one small
  all-gather per evaluation of the conditional ESS.

``R = 1`` is the single-process engine (no process group): the baseline the ratios divide by.
Processes are started as ``torchrun`` would, gloo over loopback. A second part (``--islands``)
runs the README's SMC many times, exact global mode against islands, and compares the spread
of log Z (exact: 3).

Usage::

    python benchmarks/distributed.py               # scaling table (~2 min on 2 cores)
    python benchmarks/distributed.py --islands 20  # + 20 seeds of global vs islands (~4 min)
    python benchmarks/distributed.py --quick       # smaller populations
    python benchmarks/distributed.py --repeats 0 --islands 40 --islands-world 4 --islands-particles 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import mcsample as mc
from mcsample import distributed as D
from mcsample.smc import init as smc_init
from mcsample.smc import step as smc_step
from mcsample.systems.analytic import GaussianMixture

DIM = 10


def problem():
    target = GaussianMixture.separated(
        dim=DIM, num_modes=4, spread=6.0, log_scale=3.0, generator=torch.Generator().manual_seed(0)
    )
    initial = torch.distributions.MultivariateNormal(
        torch.zeros(DIM, dtype=torch.float64), 64.0 * torch.eye(DIM, dtype=torch.float64)
    )
    return target, initial


def time_step(num_particles: int, schedule, repeats: int) -> dict:
    """Median wall time of one SMC step from the same start, with the time in collectives and
    what the exchange moved (this rank)."""
    target, initial = problem()
    kernel = mc.kernels.RandomWalk(num_steps=1)
    with D.use(None):
        g = D.split_generator(torch.Generator().manual_seed(1))
        state = smc_init(target, initial, D.local_size(num_particles), kernel, g)
        times, comm, sent = [], [], []
        for k in range(repeats + 1):
            c0 = D.comm["seconds"]
            t0 = time.perf_counter()
            smc_step(state, target, initial, kernel, schedule, resample_threshold=1.0, scheme="systematic", generator=g)
            if k:  # the first is a warm-up
                times.append(time.perf_counter() - t0)
                comm.append(D.comm["seconds"] - c0)
                sent.append(dict(D.last_exchange))
    i = times.index(statistics.median(times))
    return {"seconds": times[i], "comm": comm[i], **{f"x_{k}": v for k, v in sent[i].items()}}


def islands_run(seed: int, islands: bool, num_particles: int) -> dict:
    target, initial = problem()
    group = D.islands() if islands else None
    r = mc.smc(
        target,
        initial,
        num_particles,
        kernel=mc.kernels.MALA(),
        generator=torch.Generator().manual_seed(seed),
        group=group,
    )
    return {"log_evidence": float(r.log_evidence), "stderr": float(r.log_evidence_stderr)}


def worker(job: dict) -> dict:
    if job["kind"] == "step":
        fixed = mc.FixedSchedule((0.02, 1.0))
        out = {
            "fixed": time_step(job["num"], fixed, job["repeats"]),
            "adaptive": time_step(job["num"], "adaptive", job["repeats"]),
        }
    else:
        out = {"runs": [islands_run(s, job["islands"], job["num"]) for s in job["seeds"]]}
    return out


# ---------------------------------------------------------------------------------------------
# launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, job: dict) -> list[dict]:
    """Run ``job`` on ``world`` processes (gloo, loopback), or in this process for 1."""
    if world == 1:
        torch.set_num_threads(1)
        return [worker(job)]
    with tempfile.TemporaryDirectory() as d:
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": "1",
        }
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", json.dumps(job), d],
                env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            )
            for r in range(world)
        ]
        for p in procs:
            if p.wait(timeout=1800) != 0:
                raise RuntimeError(f"a worker of {world} processes failed")
        return [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(world)]


def _worker_main(job: str, outdir: str) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    out = worker(json.loads(job))
    Path(outdir, f"rank{dist.get_rank()}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def summarize(ranks: list[dict], which: str) -> dict:
    steps = [r[which] for r in ranks]
    sec = max(s["seconds"] for s in steps)
    comm = statistics.mean(s["comm"] / s["seconds"] for s in steps)
    out = {"seconds": sec, "comm_fraction": comm}
    if len(ranks) > 1:
        row = steps[0]["x_row_bytes"]
        out.update(
            bytes=sum(s["x_bytes"] for s in steps),
            rows=sum(s["x_rows"] for s in steps),
            surplus=steps[0]["x_lower_bound_offspring"],
            lower_bound_bytes=steps[0]["x_lower_bound_offspring"] * (row - 8),
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2^12 per process, 2^13 in all")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--islands",
        type=int,
        default=0,
        metavar="SEEDS",
        help="also run SMC SEEDS times, exact global mode against islands (2 processes)",
    )
    ap.add_argument("--islands-world", type=int, default=2, help="processes (islands) for --islands")
    ap.add_argument("--islands-particles", type=int, default=4096, help="the whole population for --islands")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _worker_main(*args.worker)
    per, total = (1 << 12, 1 << 13) if args.quick else (1 << 15, 1 << 16)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
        f"(processes beyond that share them), torch {torch.__version__}, gloo over loopback; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    results = {"weak": {}, "strong": {}}
    for world in args.worlds if args.repeats > 0 else []:
        for mode, num in (("weak", per * world), ("strong", total)):
            ranks = launch(world, {"kind": "step", "num": num, "repeats": args.repeats})
            results[mode][world] = {
                "num": num,
                "fixed": summarize(ranks, "fixed"),
                "adaptive": summarize(ranks, "adaptive"),
            }
    header = (
        f"{'scaling':7} {'R':>2} {'N':>8} {'step ms':>8} {'vs R=1':>7} {'comm %':>7} "
        f"{'adaptive ms':>11} {'comm %':>7} {'rows sent':>9} {'kB sent':>8} {'kB bound':>9} {'sent/bound':>10}"
    )
    if args.repeats > 0:
        print(header)
        print("-" * len(header))
    for mode in ("weak", "strong") if args.repeats > 0 else []:
        base = results[mode][args.worlds[0]]["fixed"]["seconds"]
        for world, r in results[mode].items():
            f, a = r["fixed"], r["adaptive"]
            moved = f"{'-':>9} {'-':>8} {'-':>9} {'-':>10}"
            if world > 1:
                moved = (
                    f"{f['rows']:>9d} {f['bytes'] / 1e3:>8.1f} {f['lower_bound_bytes'] / 1e3:>9.1f} "
                    f"{f['bytes'] / max(f['lower_bound_bytes'], 1):>10.2f}"
                )
            print(
                f"{mode:7} {world:>2} {r['num']:>8} {1e3 * f['seconds']:>8.1f} {f['seconds'] / base:>7.2f} "
                f"{100 * f['comm_fraction']:>6.0f}% {1e3 * a['seconds']:>11.1f} "
                f"{100 * a['comm_fraction']:>6.0f}% {moved}"
            )
    if args.islands:
        seeds = list(range(100, 100 + args.islands))
        n, R = args.islands_particles, args.islands_world
        rows = {
            "single process": launch(1, {"kind": "islands", "islands": False, "num": n, "seeds": seeds})[0],
            f"global, {R} processes": launch(R, {"kind": "islands", "islands": False, "num": n, "seeds": seeds})[0],
            f"islands, {R} processes": launch(R, {"kind": "islands", "islands": True, "num": n, "seeds": seeds})[0],
        }
        print(f"\nlog Z of the README's SMC (exact 3), N = {n} in all, {len(seeds)} seeds each")
        print(f"{'mode':22} {'mean':>7} {'sd':>6} {'mean stderr':>11} {'|err|>3se':>9}")
        summary = {}
        for name, r in rows.items():
            z = [x["log_evidence"] for x in r["runs"]]
            se = [x["stderr"] for x in r["runs"]]
            out = sum(abs(v - 3.0) > 3 * s for v, s in zip(z, se))
            summary[name] = {
                "mean": statistics.mean(z),
                "sd": statistics.stdev(z),
                "stderr": statistics.mean(se),
                "outside_3se": out,
            }
            print(
                f"{name:22} {statistics.mean(z):>7.3f} {statistics.stdev(z):>6.3f} {statistics.mean(se):>11.3f} "
                f"{out:>9d}"
            )
        results["islands"] = summary
    print(json.dumps({"benchmark": "distributed", "cores": os.cpu_count(), **results}))


if __name__ == "__main__":
    main()
