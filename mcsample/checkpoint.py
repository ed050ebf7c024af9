r"""Checkpoints: an algorithm's state, saved atomically, resumed exactly.

Every iterative algorithm here (annealed SMC, Feynman-Kac correctors, the posterior samplers)
keeps its whole progress in a dataclass of tensors, numbers and lists, and draws every random
number from one ``torch.Generator``. A checkpoint is that state as a plain dictionary plus the
generator's state; resuming from it replays the remaining steps with the same random numbers,
so an interrupted run gives the same result as an uninterrupted one. Files are written to a
temporary name and renamed, so a crash never leaves half a checkpoint, and they load with
``torch.load(..., weights_only=True)`` (no pickled code).

A checkpoint also carries a **fingerprint** of the run that wrote it (:func:`fingerprint`): the
algorithm, its arguments, the particle count, dtype and device kind, a hash of the generator's
state at the start of the call (its seed), and an identity of the target and proposal (a hash of
their log-densities at a few probe points, or of their tensors). Resuming with anything
different raises a ``ValueError`` that names each difference, so a checkpoint can never return
another run's result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys

import torch

__all__ = [
    "save_atomic",
    "save_state",
    "load_state",
    "default_generator",
    "fingerprint",
    "describe",
    "probe_identity",
    "differences",
]


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path.tmp<pid>`` then ``os.replace`` onto ``path``."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _tensor_id(t: torch.Tensor) -> dict:
    t = t.detach()
    return {
        "shape": list(t.shape),
        "dtype": str(t.dtype),
        "sha256": _sha(t.to("cpu").contiguous().view(torch.uint8).numpy().tobytes()) if t.numel() else "",
    }


def describe(value, depth: int = 2):
    """A deterministic, plain description of an argument for a run fingerprint.

    Numbers, strings and ``None`` as they are; tensors by shape, dtype and a hash of their
    bytes; lists, tuples and dicts elementwise; dataclasses (kernels, schedules) by their
    fields; ``torch.nn.Module`` by a hash of its state dict; other objects by their type and
    (to ``depth`` levels) their tensor, number and string attributes.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return _tensor_id(value)
    if isinstance(value, (list, tuple)):
        return [describe(v, depth) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v, depth) for k, v in value.items()}
    if isinstance(value, (torch.dtype, torch.device, torch.Size)):
        return str(value)
    name = f"{type(value).__module__}.{type(value).__qualname__}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            "type": name,
            **{
                f.name: describe(getattr(value, f.name), depth - 1) if depth > 0 else None
                for f in dataclasses.fields(value)
            },
        }
    if isinstance(value, torch.nn.Module):
        blob = b"".join(_tensor_id(t)["sha256"].encode() for t in value.state_dict().values())
        return {"type": name, "state_sha256": _sha(blob)}
    if depth <= 0 or not hasattr(value, "__dict__"):
        return {"type": name}
    attrs = {
        k: describe(v, depth - 1)
        for k, v in sorted(vars(value).items())
        if not k.startswith("_") and isinstance(v, (bool, int, float, str, torch.Tensor))
    }
    return {"type": name, **attrs}


def probe_identity(target, initial=None, num: int = 4) -> str | None:
    """Hash of ``target`` (and ``initial``) log-densities at ``num`` points drawn from ``initial``
    with a fixed seed (the caller's random state is untouched): two targets that differ anywhere
    near the proposal differ here. ``None`` when the densities cannot be evaluated."""
    from mcsample.protocols import draw

    if initial is None:
        return None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(20261130)
            x, lq = draw(initial, num, None)
            lp = target.log_prob(x)
        values = torch.stack([lq.to(torch.float64).cpu(), lp.to(torch.float64).cpu()])
    except Exception:  # a target that cannot be probed this way keeps the other checks
        return None
    text = f"{x.dtype} {x.device.type} " + " ".join(f"{v:.9g}" for v in values.flatten().tolist())
    return _sha(text.encode())


def fingerprint(kind: str, generator: torch.Generator | None, **arguments) -> dict:
    """The identity of a run: ``kind``, every argument through :func:`describe`, and a hash of
    ``generator``'s state at the start of the call (``None`` when no generator was given)."""
    gen = None if generator is None else _sha(generator.get_state().numpy().tobytes())
    return {"kind": kind, "generator": gen, **{k: describe(v) for k, v in arguments.items()}}


def differences(saved: dict, current: dict) -> list[str]:
    """One line per key where two run fingerprints differ (a missing generator matches any)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if key == "generator" and (a is None or b is None):
            continue  # a run started without a generator resumes from the saved random state
        if a != b:
            what = {"generator": "the generator's seed state", "identity": "the target or proposal"}.get(key, key)
            out.append(f"{what} differs (checkpoint {_short(a)}, this call {_short(b)})")
    return out


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 70 else s[:67] + "..."


def save_state(
    path: str | os.PathLike, state: dict, generator: torch.Generator, kind: str, run: dict | None = None
) -> None:
    """Write ``state`` (a dataclass's ``to_dict``), the generator state and the run's
    :func:`fingerprint`, tagged with ``kind``."""
    save_atomic({"kind": kind, "state": state, "generator": generator.get_state(), "fingerprint": run}, path)


def load_state(
    path: str | os.PathLike | None,
    kind: str,
    generator: torch.Generator | None,
    device=None,
    run: dict | None = None,
    progress_of=None,
) -> tuple[dict | None, torch.Generator | None]:
    """``(state_dict, generator)`` from ``path`` if it exists, else ``(None, generator)``.

    The generator (created on ``device``, or that of the saved particles ``x``, when ``None``) is
    set to the saved state. A file written by another algorithm, or by a run whose
    :func:`fingerprint` differs from ``run``, raises a ``ValueError`` naming the differences.
    ``progress_of(state) -> str`` (e.g. ``"step 12 of 40"``) is printed as "resumed at ..." on
    stderr.
    """
    if path is None or not os.path.exists(path):
        return None, generator
    saved = torch.load(path, weights_only=True)
    found = saved.get("kind", "smc") if isinstance(saved, dict) else None
    if found != kind:
        raise ValueError(f"checkpoint {os.fspath(path)} was written by {found!r}, not {kind!r}")
    if run is not None:
        previous = saved.get("fingerprint")
        if previous is None:
            raise ValueError(
                f"checkpoint {os.fspath(path)} carries no run fingerprint (written by an "
                "older version); it cannot be matched to this run: delete it or choose "
                "another path"
            )
        diff = differences(previous, run)
        if diff:
            raise ValueError(
                f"checkpoint {os.fspath(path)} belongs to another run: "
                + "; ".join(diff)
                + ". Delete it or choose another path."
            )
    if generator is None:
        x = saved["state"].get("x")
        if device is None:
            device = x.device if isinstance(x, torch.Tensor) else "cpu"
        generator = torch.Generator(device=device)
    generator.set_state(saved["generator"])
    if progress_of is not None:
        print(f"{os.fspath(path)}: resumed at {progress_of(saved['state'])}", file=sys.stderr)
    return saved["state"], generator


def default_generator(device=None) -> torch.Generator:
    """A generator seeded from the global RNG: runs without ``generator=`` stay reproducible
    under ``torch.manual_seed`` and can still be checkpointed."""
    g = torch.Generator(device=device if device is not None else "cpu")
    g.manual_seed(int(torch.randint(0, 2**62, ())))
    return g
