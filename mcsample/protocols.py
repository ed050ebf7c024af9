r"""The seams between targets, proposals and estimators.

mcsample is duck-typed: anything with the right methods plugs in. A
``torch.distributions.Distribution`` is both a :class:`Target` and a :class:`Proposal`; a zuko
flow (``flow()`` returns a distribution) is a proposal; a Pyro distribution is both.

* A **target** is an unnormalized log-density :math:`\log \tilde\pi(x)` over a leading batch
  dimension: ``log_prob(x) -> Tensor[batch]``. Gradients come from autograd unless the target
  offers ``score(x)`` :math:`= \nabla_x \log\tilde\pi(x)`.
* A **proposal** can be sampled and evaluated: ``sample(sample_shape)`` and ``log_prob(x)``.
  Where it offers ``sample_and_log_prob(n)`` (or zuko's ``rsample_and_log_prob``) that fast
  path is used. Our own proposals accept ``generator=`` in ``sample``; for the others,
  :func:`draw` forks the global RNG and seeds it from the caller's generator so that a fixed
  seed still gives the same numbers.
* A **diffusion model** noises data by :math:`q_t(x_t \mid x_0) = \mathcal N(\alpha_t x_0,
  \sigma_t^2 I)`, :math:`t\in[0,1]` (0 = data, 1 = noise) and offers the score
  :math:`\nabla\log q_t(x)`; see :class:`NoiseSchedule` and :class:`DiffusionModel`.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "Target",
    "Proposal",
    "NoiseSchedule",
    "DiffusionModel",
    "draw",
    "log_prob_and_grad",
    "check_log_prob",
]


@runtime_checkable
class Target(Protocol):
    """An unnormalized log-density :math:`\\log\\tilde\\pi(x)`, batched over the leading dim."""

    def log_prob(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class Proposal(Protocol):
    """A distribution we can sample from and evaluate exactly (normalized)."""

    def sample(self, sample_shape: torch.Size = ...) -> Tensor: ...

    def log_prob(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class NoiseSchedule(Protocol):
    r"""Forward noising :math:`x_t = \alpha_t x_0 + \sigma_t \varepsilon`, :math:`t\in[0,1]`.

    The forward SDE is :math:`dx = f(t)\,x\,dt + g(t)\,dW` with
    :math:`f = \mathrm{d}\log\alpha/\mathrm{d}t` and
    :math:`g^2 = \mathrm{d}\sigma^2/\mathrm{d}t - 2 f \sigma^2`; the log-SNR is
    :math:`\lambda(t) = \log(\alpha_t/\sigma_t)`.
    """

    def alpha(self, t: Tensor) -> Tensor: ...

    def sigma(self, t: Tensor) -> Tensor: ...

    def log_snr(self, t: Tensor) -> Tensor: ...

    def t_of_log_snr(self, lam: Tensor) -> Tensor: ...

    def f(self, t: Tensor) -> Tensor: ...

    def g2(self, t: Tensor) -> Tensor: ...


@runtime_checkable
class DiffusionModel(Protocol):
    r"""A noise schedule plus the score :math:`s(x,t) = \nabla_x \log q_t(x)` of the noised data."""

    schedule: NoiseSchedule

    def score(self, x: Tensor, t: Tensor) -> Tensor: ...


# --------------------------------------------------------------------------------------------
# helpers shared by the estimators


def device_index(device: torch.device) -> int | None:
    """The device's index, the current CUDA device for a bare ``cuda`` (as a generator made with
    ``torch.Generator("cuda")`` reports it); ``None`` for the CPU."""
    if device.type == "cuda" and device.index is None:
        return torch.cuda.current_device()
    return device.index


def check_log_prob(values: Tensor, batch: int, who: str = "target") -> Tensor:
    """Check a batch of log-densities: shape ``(batch,)`` and no NaN (``-inf`` is allowed).

    Raises ``ValueError`` naming the expected shape, or how many particles gave NaN and the
    first few indices: a NaN from a target is a bug upstream, never a zero weight.
    """
    if not isinstance(values, Tensor):
        raise TypeError(f"{who}.log_prob must return a torch.Tensor, got {type(values).__name__}")
    if values.shape != (batch,):
        raise ValueError(
            f"{who}.log_prob returned shape {tuple(values.shape)}; expected ({batch},): one "
            f"log-density per particle (is the event shape right, or is a sum missing?)"
        )
    if bool((values < float("inf")).all()):  # one reduction, one device sync: no NaN, no +inf
        return values
    nan = torch.isnan(values)
    if bool(nan.any()):
        where = torch.nonzero(nan).flatten()
        raise ValueError(
            f"{who}.log_prob returned NaN for {int(where.numel())} of {batch} particles "
            f"(first at indices {where[:5].tolist()})"
        )
    if bool((values == float("inf")).any()):
        where = torch.nonzero(values == float("inf")).flatten()
        raise ValueError(
            f"{who}.log_prob returned +inf for {int(where.numel())} of {batch} particles "
            f"(first at indices {where[:5].tolist()})"
        )
    return values


@functools.lru_cache(maxsize=256)
def _accepts_generator_cached(fn) -> bool:
    try:
        return "generator" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _accepts_generator(fn: Callable) -> bool:
    try:
        return _accepts_generator_cached(getattr(fn, "__func__", fn))
    except TypeError:  # unhashable callable
        pass
    try:
        return "generator" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _seed_from(generator: torch.Generator | None) -> int | None:
    if generator is None:
        return None
    return int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))


def draw(proposal, num: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draw ``num`` samples and their log-densities from any proposal.

    Uses ``sample_and_log_prob``/``rsample_and_log_prob`` when the proposal has them. If the
    proposal's sampler takes no ``generator`` (torch and Pyro distributions), the global RNG is
    seeded from ``generator`` and restored afterwards, so results are reproducible and the caller's global
    RNG state is untouched.
    """
    fast = getattr(proposal, "sample_and_log_prob", None) or getattr(proposal, "rsample_and_log_prob", None)
    sampler = fast if fast is not None else proposal.sample
    shape = (num,)
    if _accepts_generator(sampler):
        out = sampler(shape, generator=generator)
    elif generator is None:
        out = sampler(shape)
    else:
        # seed the global generator of the generator's device from ours, restore it afterwards
        if generator.device.type == "cuda":
            gen = torch.cuda.default_generators[device_index(generator.device)]
        else:
            gen = torch.default_generator
        saved = gen.get_state()
        gen.manual_seed(_seed_from(generator))
        try:
            out = sampler(shape)
        finally:
            gen.set_state(saved)
    if fast is not None:
        x, log_q = out
    else:
        x = out
        log_q = proposal.log_prob(x)
    x = x.detach()
    log_q = check_log_prob(log_q.detach(), num, "proposal")
    return x, log_q


def check_event_shape(target, x: Tensor, who: str = "proposal") -> None:
    """Raise ``ValueError`` when draws ``x`` (``(N, *event)``) do not have the target's
    ``event_shape`` (checked only when the target declares one)."""
    shape = getattr(target, "event_shape", None)
    if shape is None:
        return
    shape = tuple(shape)
    if tuple(x.shape[1:]) != shape:
        raise ValueError(
            f"the {who} draws samples of event shape {tuple(x.shape[1:])}, but the target's event shape is {shape}"
        )


def check_generator(generator) -> None:
    """Raise ``TypeError`` unless ``generator`` is ``None`` or a ``torch.Generator``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (or None), got {type(generator).__name__}")


def renamed(where: str, new_name: str, new, old_name: str, old, stacklevel: int = 3):
    """The value of a renamed keyword argument: ``new``, or the deprecated ``old`` with a
    ``DeprecationWarning``; a ``TypeError`` when both are given."""
    if old is None:
        return new
    if new is not None:
        raise TypeError(f"{where}: pass {new_name} or the deprecated {old_name}, not both")
    warnings.warn(f"{where}({old_name}=...) is deprecated; use {new_name}=", DeprecationWarning, stacklevel=stacklevel)
    return old


def generator_or_seed(where: str, generator, seed, stacklevel: int = 4) -> torch.Generator | None:
    """``generator`` (checked to be a ``torch.Generator`` or ``None``), or the deprecated integer
    ``seed`` as ``torch.Generator().manual_seed(seed)`` with a ``DeprecationWarning``."""
    if seed is not None:
        if generator is not None:
            raise TypeError(f"{where}: pass generator= or the deprecated seed=, not both")
        warnings.warn(
            f"{where}(seed=...) is deprecated; pass generator=torch.Generator().manual_seed(seed)",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        return torch.Generator().manual_seed(int(seed))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{where}: generator must be a torch.Generator (or None), got {type(generator).__name__}; "
            "for an integer seed s pass generator=torch.Generator().manual_seed(s)"
        )
    return generator


class Float64Proposal:
    """A proposal whose samples and log-densities are cast to float64 (the targets' dtype), for
    the engine; draws go through :func:`draw`."""

    def __init__(self, q):
        self.q = q
        self.event_shape = getattr(q, "event_shape", None)

    def sample_and_log_prob(self, shape, generator=None):
        n = int(shape[0]) if isinstance(shape, (tuple, list, torch.Size)) else int(shape)
        x, lq = draw(self.q, n, generator)
        return x.to(torch.float64), lq.to(torch.float64)

    def log_prob(self, x):
        return self.q.log_prob(x).to(torch.float64)


def log_prob_and_grad(target, x: Tensor) -> tuple[Tensor, Tensor]:
    """``log_prob(x)`` and its gradient in ``x``, from ``target.score`` when it has one."""
    score = getattr(target, "score", None)
    if callable(score):
        with torch.no_grad():
            lp = target.log_prob(x)
        return lp.detach(), score(x).detach()
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        lp = target.log_prob(xr)
        (grad,) = torch.autograd.grad(lp.sum(), xr)
    return lp.detach(), grad.detach()
