r"""Run N. Chopin's ``particles`` library next to mcsample, in a virtual environment of its own.

``particles`` (the companion code of Chopin & Papaspiliopoulos, *An Introduction to Sequential
Monte Carlo*, Springer 2020) compiles its resampling loops with numba and pins ``numpy<2``,
which cannot live in mcsample's environment (numpy 2). So the benchmark keeps a second virtual
environment, ``benchmarks/.venv-particles/`` (created on first use with ``pip install
particles``, git-ignored through a ``.gitignore`` written inside it), and times ``particles``
there through a subprocess, in the same run and on the same weights as mcsample.

This file has two roles and imports only the standard library at the top, so that it runs
under either interpreter:

* imported by ``benchmarks/resampling.py``: :func:`ensure_venv` builds or finds the environment
  and :class:`ParticlesWorker` starts this same file in it as a long-lived timing process;
* run as a script by the environment's Python: loads the log-weights from a ``.npy`` file,
  seeds numpy's global RNG (which ``particles`` draws from), warms every scheme up (numba
  compiles on the first call, so compilation never enters a timing), then either answers
  JSON-line timing requests (``--serve``) or, standalone, times every scheme at each ``--ns``
  and prints one JSON line::

      benchmarks/.venv-particles/bin/python benchmarks/_particles_env.py \
          --logw lw.npy --ns 1000 100000 --repeats 5

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
        capture_output=True,
        text=True,
        timeout=300,
    )
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]


def _ignore_in_git() -> None:
    gitignore = VENV / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("# created by benchmarks/_particles_env.py\n*\n")


def ensure_venv(log=print) -> tuple[Path | None, str | None]:
    """Find or create ``benchmarks/.venv-particles`` with ``particles`` installed.

    Returns ``(python, None)`` when it works, ``(None, reason)`` when it cannot be made (no
    network to PyPI, no wheel for this Python, ...), so that the benchmark can still run and
    say why the ``particles`` column is missing.
    """
    python = _venv_python()
    if python.exists() and _probe(python) is None:
        _ignore_in_git()
        return python, None
    base = getattr(sys, "_base_executable", None) or sys.executable
    log(f"[particles] creating {VENV} and installing {' '.join(PACKAGES)} (first use, ~1-2 min)")
    try:
        if not python.exists():
            subprocess.run([base, "-m", "venv", str(VENV)], check=True, capture_output=True, text=True, timeout=600)
            _ignore_in_git()
        proc = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *PACKAGES],
            capture_output=True,
            text=True,
            timeout=1200,
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


class ParticlesWorker:
    """A ``particles`` timing process kept alive for the whole benchmark.

    The benchmark interleaves its measurements (mcsample, numpy, particles, mcsample, ...) so
    that the load of a shared machine falls on all three alike; a long-lived worker makes that
    possible without paying numba's start-up and compilation at every call. Requests and
    answers are JSON lines on the worker's stdin and stdout.
    """

    def __init__(self, python: Path, logw_file: Path, schemes: list[str], seed: int):
        self.proc = subprocess.Popen(
            [
                str(python),
                str(Path(__file__).resolve()),
                "--logw",
                str(logw_file),
                "--schemes",
                *schemes,
                "--seed",
                str(seed),
                "--serve",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line:
            err = " | ".join(self.proc.stderr.read().strip().splitlines()[-3:])
            raise RuntimeError(f"the particles worker did not start: {err}")
        self.versions = json.loads(line)["versions"]

    def time(self, scheme: str, n: int, variant: str, calls: int, min_time: float) -> dict[str, list[float]]:
        """Wall and CPU seconds of each of ``calls`` (or more, ``min_time`` s) calls of ``scheme``.

        ``variant="W"``: ``particles.resampling.<scheme>(W, N)`` on normalized weights;
        ``variant="lw"``: ``exp_and_normalise(lw)`` first, from the log-weights.
        """
        request = {"scheme": scheme, "n": n, "variant": variant, "calls": calls, "min_time": min_time}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            err = " | ".join(self.proc.stderr.read().strip().splitlines()[-3:])
            raise RuntimeError(f"the particles worker died: {err}")
        return json.loads(line)

    def close(self) -> None:
        """Stop the worker (it exits when its stdin closes)."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# --------------------------------------------------------------------------------------------
# the timing script, run by the environment's interpreter (numpy<2, numba, particles)


def timed_calls(fn, calls: int, min_time: float) -> dict[str, list[float]]:
    """Times of ``fn()`` over at least ``calls`` calls and ``min_time`` wall seconds (<= 1000).

    Returns ``{"wall": [...], "cpu": [...]}``: wall-clock seconds of each call and the CPU
    seconds this process spent in it (user + system, all threads). On a shared machine the
    wall time of a single-threaded call swings with the load of others; its CPU time much less.
    """
    wall: list[float] = []
    cpu: list[float] = []
    start = time.perf_counter()
    while len(wall) < calls or (time.perf_counter() - start < min_time and len(wall) < 1000):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        t1, c1 = time.perf_counter(), time.process_time()
        wall.append(t1 - t0)
        cpu.append(c1 - c0)
    return {"wall": wall, "cpu": cpu}


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    k = len(xs)
    return xs[k // 2] if k % 2 else 0.5 * (xs[k // 2 - 1] + xs[k // 2])


def _main(argv: list[str]) -> None:
    import argparse
    from importlib import metadata

    import numpy as np
    from particles import resampling as rs

    parser = argparse.ArgumentParser(description="time particles' resampling schemes")
    parser.add_argument("--logw", required=True, help=".npy file of float64 log-weights")
    parser.add_argument("--schemes", nargs="+", default=SCHEMES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--serve", action="store_true", help="answer JSON-line requests on stdin (used by the benchmark)"
    )
    parser.add_argument("--ns", type=int, nargs="+", help="one-shot mode: time these N")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.2)
    args = parser.parse_args(argv)

    np.random.seed(args.seed)  # particles draws from numpy's global RNG
    all_lw = np.load(args.logw)
    small = rs.exp_and_normalise(all_lw[:1000])
    for scheme in args.schemes:  # compile every numba function before any timing
        rs.resampling(scheme, small)
    versions = {name: metadata.version(name) for name in ("particles", "numpy", "numba")}
    cache: dict[int, tuple] = {}

    def call(scheme: str, n: int, variant: str):
        if n not in cache:
            lw = np.ascontiguousarray(all_lw[:n])
            cache.clear()
            cache[n] = (lw, rs.exp_and_normalise(lw))
        lw, W = cache[n]
        if variant == "W":
            return lambda: rs.resampling(scheme, W)
        return lambda: rs.resampling(scheme, rs.exp_and_normalise(lw))

    if args.serve:
        print(json.dumps({"versions": versions}), flush=True)
        for line in sys.stdin:
            req = json.loads(line)
            fn = call(req["scheme"], req["n"], req["variant"])
            print(json.dumps(timed_calls(fn, req["calls"], req["min_time"])), flush=True)
        return
    out: dict = {"_versions": versions}
    for scheme in args.schemes:
        out[scheme] = {}
        for n in args.ns or []:
            out[scheme][str(n)] = {}
            for variant, key in (("W", "resample"), ("lw", "normalize_resample")):
                fn = call(scheme, n, variant)
                fn()  # warm caches at this size
                times = timed_calls(fn, args.repeats, args.min_time)
                out[scheme][str(n)][key] = {clock: _median(ts) for clock, ts in times.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    _main(sys.argv[1:])
