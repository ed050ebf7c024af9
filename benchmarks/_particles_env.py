r"""Run N. Chopin's ``particles`` library next to mcsample, in a virtual environment of its own.

``particles`` (the companion code of Chopin & Papaspiliopoulos, *An Introduction to Sequential
Monte Carlo*, Springer 2020) compiles its resampling loops with numba and pins ``numpy<2``,
which cannot live in mcsample's environment (numpy 2). So the benchmark keeps a second virtual
environment, ``benchmarks/.venv-particles/`` (created on first use with ``pip install
particles``, git-ignored through a ``.gitignore`` written inside it), and times ``particles``
there through a subprocess, in the same run and on the same weights as mcsample.

This file has two roles and imports only the standard library at the top, so that it runs
under either interpreter:

* imported by ``benchmarks/resampling.py``: :func:`ensure_venv` builds or finds the environment,
  :func:`time_particles` runs this same file in it and returns its timings;
* run as a script by the environment's Python (``python _particles_env.py --logw F.npy --ns ...``):
  loads the log-weights, warms every scheme up (numba compiles on the first call, so the
  compilation never enters a timing), then times each scheme at each :math:`N` and prints one
  JSON line.

Two times are reported per scheme and :math:`N`: ``resample`` (``particles.resampling.<scheme>
(W, M)`` on normalized weights :math:`W`, what the library's function does) and
``normalize_resample`` (``exp_and_normalise(lw)`` first, what a user holding log-weights pays,
the same work ``mcsample.resample`` does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

VENV = Path(__file__).resolve().parent / ".venv-particles"
PACKAGES = ["particles==0.4", "numpy<2", "numba"]
SCHEMES = ["systematic", "stratified", "multinomial", "residual", "ssp"]


def _venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _probe(python: Path) -> str | None:
    """``None`` if ``python`` imports particles and numba, else the error text."""
    proc = subprocess.run(
        [str(python), "-c", "import particles.resampling, numba, numpy; print(numpy.__version__)"],
        capture_output=True, text=True, timeout=300,
    )
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]


def ensure_venv(log=print) -> tuple[Path | None, str | None]:
    """Find or create ``benchmarks/.venv-particles`` with ``particles`` installed.

    Returns ``(python, None)`` when it works, ``(None, reason)`` when it cannot be made (no
    network to PyPI, no wheel for this Python, ...), so that the benchmark can still run and
    say why the ``particles`` column is missing.
    """
    python = _venv_python()
    if python.exists() and _probe(python) is None:
        return python, None
    base = getattr(sys, "_base_executable", None) or sys.executable
    log(f"[particles] creating {VENV} and installing {' '.join(PACKAGES)} (first use, ~1-2 min)")
    try:
        if not python.exists():
            subprocess.run([base, "-m", "venv", str(VENV)], check=True, capture_output=True,
                           text=True, timeout=600)
            (VENV / ".gitignore").write_text("# created by benchmarks/_particles_env.py\n*\n")
        proc = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *PACKAGES],
            capture_output=True, text=True, timeout=1200,
        )
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"could not create {VENV}: {err}"
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return None, f"pip install {' '.join(PACKAGES)} failed: {tail}"
    problem = _probe(python)
    if problem is not None:
        return None, f"particles installed but does not import: {problem}"
    return python, None


def time_particles(
    python: Path, logw_file: Path, ns: list[int], schemes: list[str], repeats: int,
    min_time: float, seed: int, timeout: float = 3600,
) -> tuple[dict | None, str | None]:
    """Run this file under ``python``; returns ``(results, None)`` or ``(None, reason)``.

    ``results[scheme][str(N)] = {"resample": seconds, "normalize_resample": seconds}``
    (medians), plus ``results["_versions"]``.
    """
    cmd = [str(python), str(Path(__file__).resolve()), "--logw", str(logw_file),
           "--ns", *map(str, ns), "--schemes", *schemes, "--repeats", str(repeats),
           "--min-time", str(min_time), "--seed", str(seed)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"the particles timing subprocess ran past {timeout:.0f} s"
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return None, f"the particles timing subprocess failed: {tail}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


# --------------------------------------------------------------------------------------------
# the timing script, run by the environment's interpreter (numpy<2, numba, particles)


def median_time(fn, repeats: int, min_time: float) -> float:
    """Median wall time of ``fn()`` over at least ``repeats`` calls and ``min_time`` seconds."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    k = len(times)
    return times[k // 2] if k % 2 else 0.5 * (times[k // 2 - 1] + times[k // 2])


def _main(argv: list[str]) -> None:
    import argparse
    from importlib import metadata

    import numba
    import numpy as np
    from particles import resampling as rs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logw", required=True)
    parser.add_argument("--ns", type=int, nargs="+", required=True)
    parser.add_argument("--schemes", nargs="+", default=SCHEMES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    np.random.seed(args.seed)  # particles draws from numpy's global RNG
    all_lw = np.load(args.logw)
    small = rs.exp_and_normalise(all_lw[:1000])
    for scheme in args.schemes:  # compile every numba function before any timing
        rs.resampling(scheme, small)
    out: dict = {"_versions": {"particles": metadata.version("particles"),
                               "numpy": np.__version__, "numba": numba.__version__}}
    for scheme in args.schemes:
        out[scheme] = {}
        for n in args.ns:
            lw = np.ascontiguousarray(all_lw[:n])
            W = rs.exp_and_normalise(lw)
            rs.resampling(scheme, W)  # warm caches at this size
            out[scheme][str(n)] = {
                "resample": median_time(lambda: rs.resampling(scheme, W), args.repeats,
                                        args.min_time),
                "normalize_resample": median_time(
                    lambda: rs.resampling(scheme, rs.exp_and_normalise(lw)), args.repeats,
                    args.min_time),
            }
    print(json.dumps(out))


if __name__ == "__main__":
    _main(sys.argv[1:])
