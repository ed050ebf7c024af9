r"""The engine on a CUDA device against the same machine's CPU, in one run.

Three measurements, each timed with ``torch.cuda.synchronize`` around the call (wall clock,
median of repeated calls after a warm-up call; SMC: one run after a small warm-up):

* **resampling**: ``mc.resample(log_w, scheme=...)`` from unnormalized float64 log-weights
  :math:`\ell\sim N(0,1)` at :math:`N = 10^5 \dots 10^8`: CUDA (the torch code) against the CPU
  (the numba kernels, one thread) on the same machine; ratio CPU / GPU.
* **importance sampling overhead**: ``mc.importance_sample`` of a 10-d Gaussian target
  (benchmarks/importance.py's pair) on CUDA, against the bare loop that only draws and
  evaluates; ratio engine / bare (the CPU goal is at most 1.2). Batches stay at or below
  :math:`10^5`: torch's ``MultivariateNormal.log_prob`` on CUDA took 8.5 s for :math:`10^6`
  rows against 0.5 ms for :math:`10^5` (H200, torch 2.11), a cliff of torch's, not the engine's
  (``importance_sample`` caps its default batch at :math:`2^{16}`).
* **SMC**: adaptive annealed SMC with MALA on the 10-d, 3-mode Gaussian mixture of the tests,
  :math:`N = 10^4` and :math:`10^5` particles, CUDA against the CPU with all its cores; log Z
  against the exact value.

Prints tables and a final JSON line. About 2-4 minutes on an H100/H200 machine.

    python benchmarks/gpu.py
    python benchmarks/gpu.py --ns 1e5 1e6 --smc-particles 10000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from importance import bare, gaussian_pair  # noqa: E402

import mcsample as mc  # noqa: E402
from mcsample.systems.analytic import GaussianMixture  # noqa: E402

SCHEMES = ["multinomial", "stratified", "systematic", "residual", "ssp"]


def timed(fn, device: str, min_time: float = 0.3, min_calls: int = 3) -> float:
    """Median wall seconds of fn() after one warm-up call, synchronizing CUDA around each call."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    times, start = [], time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def resampling(ns: list[int], cpu_max: int) -> list[dict]:
    rows = []
    for n in ns:
        lw = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        lw_gpu = lw.cuda()
        g_gpu, g_cpu = torch.Generator("cuda").manual_seed(1), torch.Generator().manual_seed(1)
        for scheme in SCHEMES:
            gpu = timed(lambda: mc.resample(lw_gpu, scheme=scheme, generator=g_gpu), "cuda")
            cpu = timed(lambda: mc.resample(lw, scheme=scheme, generator=g_cpu), "cpu") if n <= cpu_max else None
            rows.append(
                {
                    "n": n,
                    "scheme": scheme,
                    "gpu_ms": 1e3 * gpu,
                    "cpu_ms": None if cpu is None else 1e3 * cpu,
                    "cpu_over_gpu": None if cpu is None else cpu / gpu,
                }
            )
            print(
                f"{n:9.0e} {scheme:12s} gpu {1e3 * gpu:9.3f} ms   cpu "
                + ("     –" if cpu is None else f"{1e3 * cpu:9.3f} ms   cpu/gpu {cpu / gpu:7.1f}"),
                flush=True,
            )
    return rows


def importance(num: int, batches: list[int]) -> list[dict]:
    target, proposal = gaussian_pair(10)
    to = lambda d: torch.distributions.MultivariateNormal(d.loc.cuda(), scale_tril=d.scale_tril.cuda())  # noqa: E731
    target, proposal = to(target), to(proposal)
    rows = []
    for b in batches:
        t_bare = timed(lambda: bare(target, proposal, num, b), "cuda")
        t_eng = timed(lambda: mc.importance_sample(target, proposal, num, batch_size=b), "cuda")
        t_str = timed(
            lambda: mc.importance_sample(
                target, proposal, num, batch_size=b, keep_samples=False, statistics={"x": lambda x: x}
            ),
            "cuda",
        )
        rows.append(
            {
                "num": num,
                "batch": b,
                "bare_s": t_bare,
                "engine_s": t_eng,
                "stream_s": t_str,
                "engine_over_bare": t_eng / t_bare,
                "stream_over_bare": t_str / t_bare,
            }
        )
        print(
            f"IS {num:.0e} batch {b:.0e}: bare {t_bare * 1e3:8.1f} ms  engine {t_eng * 1e3:8.1f} ms "
            f"({t_eng / t_bare:.2f}x)  stream {t_str * 1e3:8.1f} ms ({t_str / t_bare:.2f}x)",
            flush=True,
        )
    return rows


def smc(particles: list[int]) -> list[dict]:
    cpu_target = GaussianMixture.separated(
        dim=10, num_modes=3, spread=4.0, std=1.0, log_scale=-1.5, generator=torch.Generator().manual_seed(123)
    )
    rows = []
    for device in ("cuda", "cpu"):
        dev = torch.device(device)
        target = GaussianMixture(
            cpu_target.weights.to(dev), cpu_target.means.to(dev), cpu_target.covariances.to(dev), cpu_target.log_scale
        )
        initial = torch.distributions.MultivariateNormal(
            torch.zeros(10, dtype=torch.float64, device=dev), 16.0 * torch.eye(10, dtype=torch.float64, device=dev)
        )
        for n in particles:
            g = torch.Generator(device).manual_seed(0)
            mc.smc(target, initial, 100, kernel=mc.kernels.MALA(num_steps=4), generator=g)  # warm-up
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            sync()
            t0 = time.perf_counter()
            r = mc.smc(target, initial, n, kernel=mc.kernels.MALA(num_steps=4), generator=g)
            sync()
            t = time.perf_counter() - t0
            rows.append(
                {
                    "device": device,
                    "particles": n,
                    "seconds": t,
                    "steps": len(r.betas) - 1,
                    "log_z": float(r.log_evidence),
                    "log_z_stderr": float(r.log_evidence_stderr),
                    "exact": cpu_target.log_scale,
                }
            )
            print(
                f"SMC {device:4s} N={n:.0e}: {t:7.2f} s, {len(r.betas) - 1} steps, log Z "
                f"{float(r.log_evidence):.3f} ± {float(r.log_evidence_stderr):.3f} (exact {cpu_target.log_scale})",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", type=float, nargs="+", default=[1e5, 1e6, 1e7, 1e8])
    ap.add_argument("--cpu-max", type=float, default=1e7, help="largest N also timed on the CPU")
    ap.add_argument("--is-num", type=float, default=1e7)
    ap.add_argument("--is-batches", type=float, nargs="+", default=[1e4, 1e5])
    ap.add_argument("--smc-particles", type=float, nargs="+", default=[1e4, 1e5])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device (torch.cuda.is_available() is False)")
    torch.set_num_threads(1)  # the CPU contenders: numba kernels and torch on one thread
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "resampling": resampling([int(n) for n in args.ns], int(args.cpu_max)),
        "importance": importance(int(args.is_num), [int(b) for b in args.is_batches]),
    }
    torch.set_num_threads(os.cpu_count() or 1)  # SMC on the CPU gets every core
    out["smc"] = smc([int(n) for n in args.smc_particles])
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
