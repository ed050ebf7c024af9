r"""Checkpoints: an algorithm's state, saved atomically, resumed exactly.

Every iterative algorithm here (annealed SMC, Feynman-Kac correctors, the posterior samplers)
keeps its whole progress in a dataclass of tensors, numbers and lists, and draws every random
number from one ``torch.Generator``. A checkpoint is that state as a plain dictionary plus the
generator's state; resuming from it replays the remaining steps with the same random numbers,
so an interrupted run gives the same result as an uninterrupted one. Files are written to a
temporary name and renamed, so a crash never leaves half a checkpoint, and they load with
``torch.load(..., weights_only=True)`` (no pickled code).
"""

from __future__ import annotations

import os

import torch

__all__ = ["save_atomic", "save_state", "load_state", "default_generator"]


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path.tmp<pid>`` then ``os.replace`` onto ``path``."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_state(path: str | os.PathLike, state: dict, generator: torch.Generator, kind: str) -> None:
    """Write ``state`` (a dataclass's ``to_dict``) and the generator state, tagged with ``kind``."""
    save_atomic({"kind": kind, "state": state, "generator": generator.get_state()}, path)


def load_state(path: str | os.PathLike | None, kind: str, generator: torch.Generator | None,
               device=None) -> tuple[dict | None, torch.Generator | None]:
    """``(state_dict, generator)`` from ``path`` if it exists, else ``(None, generator)``.

    The generator (created on ``device``, or that of the saved particles ``x``, when ``None``) is set to the saved state. A file
    written by another algorithm raises a ``ValueError`` naming both.
    """
    if path is None or not os.path.exists(path):
        return None, generator
    saved = torch.load(path, weights_only=True)
    found = saved.get("kind", "smc") if isinstance(saved, dict) else None
    if found != kind:
        raise ValueError(f"checkpoint {os.fspath(path)} was written by {found!r}, not {kind!r}")
    if generator is None:
        x = saved["state"].get("x")
        if device is None:
            device = x.device if isinstance(x, torch.Tensor) else "cpu"
        generator = torch.Generator(device=device)
    generator.set_state(saved["generator"])
    return saved["state"], generator


def default_generator(device=None) -> torch.Generator:
    """A generator seeded from the global RNG: runs without ``generator=`` stay reproducible
    under ``torch.manual_seed`` and can still be checkpointed."""
    g = torch.Generator(device=device if device is not None else "cpu")
    g.manual_seed(int(torch.randint(0, 2**62, ())))
    return g
