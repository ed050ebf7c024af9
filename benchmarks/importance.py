r"""Engine overhead of importance sampling: ``mc.importance_sample`` against the bare loop.

Importance sampling's real work is drawing :math:`x \sim q` and evaluating
:math:`\log q(x)` and :math:`\log\tilde\pi(x)`; everything else (shape and NaN checks, float64
log-weights, keeping samples, streaming statistics, building the
:class:`~mcsample.WeightedSamples`) is the engine's overhead. This script times, for
:math:`10^6` samples of a 10-dimensional Gaussian target (a ``torch.distributions.
MultivariateNormal`` with a dense, non-trivial covariance) under a broader Gaussian proposal
(same mean shifted by 0.3, covariance :math:`1.5^2\Sigma + 0.5 I`), in batches of several sizes:

* **bare**: the loop a user would write with no engine: ``x = q.sample((b,))``,
  ``q.log_prob(x)``, ``p.log_prob(x)``, nothing kept;
* **engine**: ``mc.importance_sample(p, q, N, batch_size=b)`` (samples kept);
* **engine+gen**: the same with a seeded ``torch.Generator`` (torch distributions take no
  generator, so the engine forks and seeds the global RNG once per batch);
* **stream**: ``keep_samples=False`` with one streamed statistic (the mean,
  ``statistics={"x": lambda x: x}``), so only log-weights and running sums are kept.

It prints each time and the ratio engine / bare (goal: at most 1.2), and a final JSON line.
Measurements are interleaved in rounds and the table shows CPU time of the process (the JSON
has wall time too): on a shared machine that is what stays comparable between contenders.
torch runs on one thread (``--threads`` to change).

Usage::

    python benchmarks/importance.py            # full: 1e6 samples, batches 4096 / 65536 / 1e6; ~30 s
    python benchmarks/importance.py --quick    # 1e5 samples, batches 4096 / 65536; ~5 s
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _particles_env import timed_calls  # noqa: E402
from resampling import interleaved  # noqa: E402

import mcsample as mc  # noqa: E402


def gaussian_pair(dim: int = 10, seed: int = 0):
    """A target :math:`N(\\mu, \\Sigma)` with dense :math:`\\Sigma` and a broader proposal."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g) / dim**0.5
    cov = a @ a.T + 0.5 * torch.eye(dim)
    mean = torch.randn(dim, generator=g)
    target = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    proposal = torch.distributions.MultivariateNormal(mean + 0.3, covariance_matrix=1.5**2 * cov + 0.5 * torch.eye(dim))
    return target, proposal


def bare(target, proposal, num: int, batch: int) -> None:
    """Draw and evaluate proposal and target in batches, keeping nothing."""
    with torch.no_grad():
        done = 0
        while done < num:
            b = min(batch, num - done)
            x = proposal.sample((b,))
            proposal.log_prob(x)
            target.log_prob(x)
            done += b


def contenders(target, proposal, num: int, batch: int) -> dict:
    """The timed calls, each ``(calls, min_time) -> {"wall": [...], "cpu": [...]}``."""

    def t(fn):
        return lambda calls, min_time: timed_calls(fn, calls, min_time)

    def engine(**kw):
        return lambda: mc.importance_sample(target, proposal, num, batch_size=batch, **kw)

    return {
        "bare": t(lambda: bare(target, proposal, num, batch)),
        "engine": t(engine()),
        "engine+gen": t(
            lambda: mc.importance_sample(
                target, proposal, num, batch_size=batch, generator=torch.Generator().manual_seed(1)
            )
        ),
        "stream": t(engine(keep_samples=False, statistics={"x": lambda x: x})),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run, print the table and the final JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1e5 samples (~5 s)")
    parser.add_argument("--num", type=float, help="number of samples (default 1e6)")
    parser.add_argument("--batches", type=float, nargs="+", help="batch sizes")
    parser.add_argument("--dim", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument(
        "--profile", action="store_true", help="also print torch's profiler table for one engine call per batch"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    num = int(args.num or (1e5 if args.quick else 1e6))
    batches = [int(b) for b in (args.batches or ([4096, 65536] if args.quick else [4096, 65536, 10**6]))]
    batches = [min(b, num) for b in batches]
    min_time = 0.3  # per contender and round: several calls when one is short
    target, proposal = gaussian_pair(args.dim)
    t0 = time.perf_counter()
    out = {
        "config": {
            "num": num,
            "dim": args.dim,
            "batches": batches,
            "clock": args.clock,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "rounds": args.rounds,
        },
        "results": [],
    }
    names = ["bare", "engine", "engine+gen", "stream"]
    print(f"{args.clock} times in s (median) for {num:.0e} samples, d={args.dim}; ratio = engine / bare (goal <= 1.2)")
    print(f"{'batch':>8}" + "".join(f"{n:>12}" for n in names) + "".join(f"{n + '/bare':>16}" for n in names[1:]))
    for batch in batches:
        c = contenders(target, proposal, num, batch)
        for fn in c.values():
            fn(1, 0.0)  # warm-up
        t = interleaved(c, args.rounds, 1, min_time)
        row = {"batch": batch}
        for clock in ("wall", "cpu"):
            row[clock] = {f"{k}_s": v[clock] for k, v in t.items()}
            row[clock].update({f"{k}/bare": t[k][clock] / t["bare"][clock] for k in names[1:]})
        out["results"].append(row)
        r = row[args.clock]
        print(
            f"{batch:>8}"
            + "".join(f"{r[n + '_s']:>12.4g}" for n in names)
            + "".join(f"{r[n + '/bare']:>16.3f}" for n in names[1:])
        )
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                mc.importance_sample(target, proposal, num, batch_size=batch)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    out["wall_s"] = time.perf_counter() - t0
    print(f"wall time {out['wall_s']:.0f} s")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
