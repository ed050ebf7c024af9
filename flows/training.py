r"""Training normalizing flows for sampling: from data, from the energy, and from their own weighted samples.

Three objectives, for any flow with an exact ``log_prob`` and a sampler
(``sample_and_log_prob``, plus ``rsample_and_log_prob`` for the reverse KL):

* **Maximum likelihood** on samples of the target (MD frames): minimize
  :math:`-\frac1B\sum_i \log q_\theta(x_i)`, the forward KL up to a constant. Mass-covering,
  but only as good as the data's coverage.
* **Reverse KL** from the energy alone (Noé et al., Science 2019):
  :math:`\mathrm{KL}(q_\theta\|\pi) = E_{q_\theta}[\log q_\theta(x) - \log\tilde\pi(x)] + \log Z`,
  by reparameterized draws. Mode-seeking: it needs no data but tends to drop rare states.
* **Self-normalized importance sampling (SNIS) refits**, with an optional temperature ladder
  (the reweighting stage of temperature-annealed Boltzmann generators, Schopmans & Friederich,
  ICML 2025; the self-improvement of Prose, Tan et al. 2025): draw :math:`x_i\sim q_\theta`,
  weight :math:`w_i\propto\tilde\pi(x_i)^{\beta}/q_\theta(x_i)`, resample a buffer from the
  weights and refit by maximum likelihood on it with the penalty
  :math:`\lambda\,E[(\log q_\theta - \log q_{\rm frozen})^2]` that keeps the flow near the one
  that drew the buffer. This estimates the forward KL to :math:`\pi^\beta` (mass-covering) from
  the flow's own proposals; lowering the temperature step by step (:math:`\beta\uparrow 1`)
  keeps the weights usable at every step.

Every function shows a progress bar (loss and a validation ESS), saves a checkpoint every
``checkpoint_every`` steps (model, optimizer, step, generator state and a fingerprint of the
run's arguments), and resumes from it: a resumed run equals an uninterrupted one. A checkpoint of
another run (other arguments, another model architecture) is refused with an error naming the
difference. :func:`save_flow` / :func:`load_flow` store the trained model with its architecture
and provenance.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mcsample.checkpoint import differences, save_atomic
from mcsample.diagnostics import ess as kish_ess
from mcsample.protocols import check_generator
from mcsample.resampling import resample

__all__ = [
    "TrainingHistory",
    "fit_maximum_likelihood",
    "fit_reverse_kl",
    "fit_snis",
    "importance_ess",
    "save_flow",
    "load_flow",
]


@dataclass
class TrainingHistory:
    """What a training run recorded: ``loss`` per step; ``valid_step``, ``valid_metric``
    (validation NLL for maximum likelihood, ESS fraction otherwise); ``beta`` per SNIS round;
    ``seconds`` of wall time, summed over interrupted and resumed sessions."""

    loss: list = field(default_factory=list)
    valid_step: list = field(default_factory=list)
    valid_metric: list = field(default_factory=list)
    beta: list = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "loss": list(self.loss),
            "valid_step": list(self.valid_step),
            "valid_metric": list(self.valid_metric),
            "beta": list(self.beta),
            "seconds": float(self.seconds),
        }


# ------------------------------------------------------------------------------ checkpoints


def _model_fingerprint(model) -> dict:
    cfg = model.config() if callable(getattr(model, "config", None)) else {}
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    return {"config": _plain(cfg), "parameters": shapes}


def _plain(obj):
    """Plain Python containers and scalars (loadable with ``torch.load(weights_only=True)``)."""
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    return obj


class _Run:
    """Checkpoint/resume of one training stage (model, optimizer, step, generator, history)."""

    def __init__(self, path, stage: str, fingerprint: dict, model, optimizer, generator, history, scheduler=None):
        self.path = None if path is None else os.fspath(path)
        self.stage = stage
        self.fingerprint = {"stage": stage, "model": _model_fingerprint(model), **_plain(fingerprint)}
        self.model, self.optimizer, self.generator = model, optimizer, generator
        self.scheduler = scheduler
        self.history = history
        self.step = 0
        self.extra: dict = {}
        self._clock = time.perf_counter()
        self._seconds_before = 0.0

    def resume(self) -> int:
        if self.path is None or not os.path.exists(self.path):
            return 0
        saved = torch.load(self.path, weights_only=True)
        if saved.get("kind") != "flow-training":
            raise ValueError(f"{self.path} is not a flow-training checkpoint")
        _refuse_mismatch(saved.get("fingerprint", {}), self.fingerprint, self.path)
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scheduler is not None and "scheduler" in saved:
            self.scheduler.load_state_dict(saved["scheduler"])
        self.generator.set_state(saved["generator"])
        for k, v in saved["history"].items():
            setattr(self.history, k, float(v) if k == "seconds" else list(v))
        self._seconds_before = self.history.seconds
        self.extra = saved.get("extra", {})
        self.step = int(saved["step"])
        return self.step

    def tick(self) -> None:
        """Update the history's wall time (this session plus the resumed ones)."""
        self.history.seconds = self._seconds_before + time.perf_counter() - self._clock

    def save(self, step: int) -> None:
        self.tick()
        if self.path is None:
            return
        blob = {
            "kind": "flow-training",
            "fingerprint": self.fingerprint,
            "step": int(step),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "history": self.history.to_dict(),
            "extra": self.extra,
        }
        if self.scheduler is not None:
            blob["scheduler"] = self.scheduler.state_dict()
        save_atomic(blob, self.path)


def _refuse_mismatch(saved: dict, current: dict, path) -> None:
    diffs = differences(saved, current)
    if diffs:
        raise ValueError(
            f"{path} belongs to another training run; refusing to resume it ("
            + "; ".join(diffs)
            + "). Choose another checkpoint path."
        )


def _generator(generator: torch.Generator | None, device) -> torch.Generator:
    check_generator(generator)
    if generator is not None:
        return generator
    g = torch.Generator(device=device)
    g.manual_seed(int(torch.randint(0, 2**62, ())))
    return g


def _device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_positive(**kwargs) -> None:
    for name, value in kwargs.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")


def _descend(loss: Tensor, model, opt, sched, clip_norm: float, history: TrainingHistory) -> None:
    """One optimizer step on ``loss`` with gradient-norm clipping; records the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    opt.step()
    if sched is not None:
        sched.step()
    history.loss.append(float(loss.detach()))


# ------------------------------------------------------------------------------ diagnostics


def importance_ess(
    model,
    target_log_prob: Callable[[Tensor], Tensor],
    num_samples: int,
    generator: torch.Generator | None = None,
    batch_size: int = 4096,
) -> float:
    r"""Normalized Kish ESS :math:`(\sum w)^2 / (N\sum w^2)` of ``num_samples`` importance draws."""
    log_w = []
    with torch.no_grad():
        done = 0
        while done < num_samples:
            b = min(batch_size, num_samples - done)
            x, lq = model.sample_and_log_prob((b,), generator=generator)
            log_w.append(target_log_prob(x).to(torch.float64) - lq.to(torch.float64))
            done += b
    lw = torch.cat(log_w)
    lw = torch.where(torch.isnan(lw), torch.full_like(lw, -math.inf), lw)
    if not bool(torch.isfinite(lw).any()):
        return 0.0
    return float(kish_ess(lw)) / num_samples


# ------------------------------------------------------------------------------ maximum likelihood


def fit_maximum_likelihood(
    model,
    data: Tensor,
    *,
    valid: Tensor | None = None,
    steps: int = 5000,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    clip_norm: float = 10.0,
    valid_every: int = 250,
    generator: torch.Generator | None = None,
    progress: bool = True,
    checkpoint=None,
    checkpoint_every: int = 500,
) -> TrainingHistory:
    r"""Maximum likelihood: minimize :math:`-\frac1B\sum_{i}\log q_\theta(x_i)` over minibatches of ``data``.

    Adam with a cosine learning-rate decay over ``steps``; minibatches drawn uniformly with
    replacement from ``generator``. ``valid``: held-out samples whose mean NLL is recorded
    every ``valid_every`` steps (the weights of the last step are kept, not the best).

    Returns:
        :class:`TrainingHistory` (loss per step, validation NLL).
    """
    _check_positive(
        steps=steps, batch_size=batch_size, lr=lr, valid_every=valid_every, checkpoint_every=checkpoint_every
    )
    data = torch.as_tensor(data)
    if data.dim() < 2 or data.shape[0] < 1:
        raise ValueError(f"data must be (N, ...) samples with N >= 1, got shape {tuple(data.shape)}")
    if not bool(torch.isfinite(data).all()):
        raise ValueError("data contains NaN or infinite values")
    device = _device(model)
    gen = _generator(generator, "cpu")
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    history = TrainingHistory()
    fp = {
        "objective": "maximum_likelihood",
        "n_data": int(data.shape[0]),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "clip_norm": clip_norm,
        "valid_every": valid_every,
    }
    run = _Run(checkpoint, "maximum_likelihood", fp, model, opt, gen, history, sched)
    start = run.resume()
    bar = tqdm(total=steps, initial=start, disable=not progress, desc="maximum likelihood")
    model.train()
    for step in range(start, steps):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
        batch = data[idx].to(device)
        _descend(-model.log_prob(batch).mean(), model, opt, sched, clip_norm, history)
        if valid is not None and ((step + 1) % valid_every == 0 or step + 1 == steps):
            nll = validation_nll(model, valid)
            history.valid_step.append(step + 1)
            history.valid_metric.append(nll)
            bar.set_postfix(loss=f"{history.loss[-1]:.3f}", valid_nll=f"{nll:.3f}")
        elif step % 25 == 0:
            bar.set_postfix(loss=f"{history.loss[-1]:.3f}")
        bar.update(1)
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            run.save(step + 1)
    bar.close()
    run.tick()
    model.eval()
    return history


def validation_nll(model, data: Tensor, batch_size: int = 4096) -> float:
    """Mean :math:`-\\log q(x)` over ``data`` (no gradients)."""
    device = _device(model)
    total = 0.0
    with torch.no_grad():
        for i in range(0, data.shape[0], batch_size):
            total += float(-model.log_prob(data[i : i + batch_size].to(device)).to(torch.float64).sum())
    return total / data.shape[0]


# ------------------------------------------------------------------------------ reverse KL


def fit_reverse_kl(
    model,
    target_log_prob: Callable[[Tensor], Tensor],
    *,
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 1e-4,
    clip_norm: float = 10.0,
    valid_every: int = 100,
    valid_samples: int = 2048,
    eval_log_prob: Callable[[Tensor], Tensor] | None = None,
    data: Tensor | None = None,
    data_weight: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = True,
    checkpoint=None,
    checkpoint_every: int = 100,
) -> TrainingHistory:
    r"""Reverse KL by reparameterized draws: minimize :math:`E_{q_\theta}[\log q_\theta(x) - \log\tilde\pi(x)]`.

    With ``data``, the loss adds ``data_weight`` times the negative log-likelihood of a minibatch
    of it: the combined energy + data training of Boltzmann generators (Noé et al., Science
    2019), where the data term keeps the rare states that the mode-seeking reverse KL alone
    would drop, and the energy term sharpens what a finite data set cannot resolve.
    ``target_log_prob`` is used in the loss (a soft-capped energy such as
    ``Peptide.regularized_log_prob`` keeps gradients finite at clashes); ``eval_log_prob`` (default
    the same) in the validation ESS. Needs ``model.rsample_and_log_prob``. Adam with a cosine
    learning-rate decay over ``steps``.
    """
    _check_positive(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        valid_every=valid_every,
        valid_samples=valid_samples,
        checkpoint_every=checkpoint_every,
    )
    eval_log_prob = eval_log_prob or target_log_prob
    gen = _generator(generator, _device(model))
    if data is not None:
        data = torch.as_tensor(data)
        if data.shape[0] < 1 or not bool(torch.isfinite(data).all()):
            raise ValueError("data must hold at least one sample and no NaN or infinite values")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    history = TrainingHistory()
    fp = {
        "objective": "reverse_kl",
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "clip_norm": clip_norm,
        "valid_every": valid_every,
        "valid_samples": valid_samples,
        "n_data": 0 if data is None else int(data.shape[0]),
        "data_weight": float(data_weight),
    }
    run = _Run(checkpoint, "reverse_kl", fp, model, opt, gen, history, sched)
    start = run.resume()
    bar = tqdm(total=steps, initial=start, disable=not progress, desc="reverse KL")
    for step in range(start, steps):
        x, lq = model.rsample_and_log_prob((batch_size,), generator=gen)
        lp = target_log_prob(x)
        diff = lq.to(torch.float64) - lp.to(torch.float64)
        finite = torch.isfinite(diff)
        loss = diff[finite].mean() if bool(finite.any()) else diff.sum() * 0
        if data is not None:
            idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen, device=gen.device)
            loss = loss - data_weight * model.log_prob(data[idx.cpu()].to(_device(model))).mean()
        _descend(loss, model, opt, sched, clip_norm, history)
        if (step + 1) % valid_every == 0 or step + 1 == steps:
            e = importance_ess(model, eval_log_prob, valid_samples, gen)
            history.valid_step.append(step + 1)
            history.valid_metric.append(e)
            bar.set_postfix(loss=f"{history.loss[-1]:.3f}", ess=f"{e:.1%}")
        bar.update(1)
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            run.save(step + 1)
    bar.close()
    run.tick()
    return history


# ------------------------------------------------------------------------------ SNIS refits


def fit_snis(
    model,
    target_log_prob: Callable[[Tensor], Tensor],
    *,
    betas=(1.0,),
    rounds_per_beta: int = 10,
    num_samples: int = 8192,
    buffer_size: int = 8192,
    steps_per_round: int = 50,
    batch_size: int = 256,
    lr: float = 1e-4,
    regularization: float = 0.5,
    truncate: float = 0.002,
    clip_norm: float = 10.0,
    valid_samples: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    checkpoint=None,
) -> TrainingHistory:
    r"""Refit a flow to its own importance-weighted proposals, optionally down a temperature ladder.

    For each :math:`\beta` in ``betas`` (increasing to 1: :math:`\pi^\beta` is the Boltzmann
    density at temperature :math:`T/\beta`), ``rounds_per_beta`` rounds of: draw
    ``num_samples`` from the flow, weight :math:`\log w = \beta\log\tilde\pi - \log q`, truncate
    the largest ``truncate`` fraction of log-weights at that quantile (truncated importance
    sampling, Ionides 2008: bounded weights, a vanishing bias), resample ``buffer_size`` points
    (multinomial, float64), freeze a copy of the flow, and take ``steps_per_round`` Adam steps on
    :math:`-\log q_\theta(x) + \lambda(\log q_\theta(x) - \log q_{\rm frozen}(x))^2` over
    minibatches of the buffer (``regularization`` = λ; Prose uses 0.5), the learning rate
    decaying from ``lr`` to 0 on a cosine over all rounds (late refits on a few heavy weights
    then cannot undo the earlier ones). The validation metric
    is the ESS fraction at :math:`\beta = 1` of the round's draws (or of ``valid_samples``
    fresh ones when the round's :math:`\beta < 1`).

    References: Schopmans & Friederich (ICML 2025) for the temperature ladder; Tan et al.
    (2025, Prose) for the regularized self-improvement.
    """
    betas = [float(b) for b in betas]
    if not betas or any(not (0 < b <= 1) for b in betas):
        raise ValueError(f"betas must lie in (0, 1], got {betas}")
    _check_positive(
        rounds_per_beta=rounds_per_beta,
        num_samples=num_samples,
        buffer_size=buffer_size,
        steps_per_round=steps_per_round,
        batch_size=batch_size,
        lr=lr,
    )
    if not 0 <= truncate < 1:
        raise ValueError(f"truncate must lie in [0, 1), got {truncate}")
    if regularization < 0:
        raise ValueError(f"regularization must be >= 0, got {regularization}")
    valid_samples = num_samples if valid_samples is None else int(valid_samples)
    device = _device(model)
    gen = _generator(generator, device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    total_rounds = len(betas) * rounds_per_beta
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_rounds * steps_per_round)
    history = TrainingHistory()
    fp = {
        "objective": "snis",
        "lr_schedule": "cosine",
        "betas": betas,
        "rounds_per_beta": rounds_per_beta,
        "num_samples": num_samples,
        "buffer_size": buffer_size,
        "steps_per_round": steps_per_round,
        "batch_size": batch_size,
        "lr": lr,
        "regularization": regularization,
        "truncate": truncate,
        "clip_norm": clip_norm,
        "valid_samples": valid_samples,
    }
    run = _Run(checkpoint, "snis", fp, model, opt, gen, history, sched)
    start = run.resume()
    schedule = [b for b in betas for _ in range(rounds_per_beta)]
    bar = tqdm(total=len(schedule), initial=start, disable=not progress, desc="SNIS refit", unit="round")
    frozen = copy.deepcopy(model)
    for p in frozen.parameters():
        p.requires_grad_(False)
    for r in range(start, len(schedule)):
        beta = schedule[r]
        x, lq, lp = _draw_weighted(model, target_log_prob, num_samples, gen)
        log_w = beta * lp - lq
        ess_here = float(kish_ess(log_w)) / num_samples if bool(torch.isfinite(log_w).any()) else 0.0
        if beta == 1.0:
            valid = float(kish_ess(lp - lq)) / num_samples if bool(torch.isfinite(lp - lq).any()) else 0.0
        else:
            valid = importance_ess(model, target_log_prob, valid_samples, gen)
        if not bool(torch.isfinite(log_w).any()):
            raise ValueError(
                "every importance weight is zero (the target is -inf at all draws); "
                "the flow is too far from the target for SNIS refits"
            )
        if truncate > 0:
            finite = log_w[torch.isfinite(log_w)]
            cap = torch.quantile(finite, 1 - truncate) if finite.numel() > 1 else finite.max()
            log_w = torch.minimum(log_w, cap)
        idx = resample(log_w, num=buffer_size, scheme="multinomial", generator=gen)
        buffer = x[idx]
        frozen.load_state_dict(model.state_dict())
        with torch.no_grad():
            lq_frozen = torch.cat([frozen.log_prob(buffer[i : i + 4096]) for i in range(0, buffer_size, 4096)])
        model.train()
        for _ in range(steps_per_round):
            j = torch.randint(0, buffer_size, (batch_size,), generator=gen, device=buffer.device)
            lqb = model.log_prob(buffer[j])
            loss = -lqb.mean() + regularization * ((lqb - lq_frozen[j]) ** 2).mean()
            _descend(loss, model, opt, sched, clip_norm, history)
        model.eval()
        history.valid_step.append(r + 1)
        history.valid_metric.append(valid)
        history.beta.append(beta)
        bar.set_postfix(beta=f"{beta:.3f}", ess_beta=f"{ess_here:.1%}", ess=f"{valid:.1%}")
        bar.update(1)
        run.save(r + 1)
    bar.close()
    run.tick()
    return history


def _draw_weighted(model, target_log_prob, num: int, gen, batch_size: int = 4096):
    xs, lqs, lps = [], [], []
    with torch.no_grad():
        done = 0
        while done < num:
            b = min(batch_size, num - done)
            x, lq = model.sample_and_log_prob((b,), generator=gen)
            lp = target_log_prob(x).to(torch.float64)
            if bool(torch.isnan(lp).any()):
                raise ValueError(f"the target returned NaN for {int(torch.isnan(lp).sum())} of {b} draws")
            xs.append(x)
            lqs.append(lq.to(torch.float64))
            lps.append(lp)
            done += b
    return torch.cat(xs), torch.cat(lqs), torch.cat(lps)


# ------------------------------------------------------------------------------ saving models


def save_flow(model, path, meta: dict | None = None) -> None:
    """Save a trained flow: ``{"config": model.config(), "state_dict", "meta"}``, atomically.

    Loadable with ``torch.load(path, weights_only=True)``; ``meta`` holds the provenance (data,
    settings, seed, measured quality)."""
    blob = {
        "format": "mcsample-flow-1",
        "config": _plain(model.config()),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": _plain(dict(meta or {})),
    }
    save_atomic(blob, path)


def load_flow(path, system=None, map_location="cpu"):
    """Load a flow saved by :func:`save_flow`; with ``system`` (a peptide), refuse a flow trained
    for another one (force field, solvent, temperature, topology)."""
    blob = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != "mcsample-flow-1":
        raise ValueError(f"{path} is not a flow saved by mcsample.flows.training.save_flow")
    config = blob["config"]
    kind = config.get("kind")
    if kind == "BoltzmannGenerator":
        from mcsample.flows.boltzmann_generator import BoltzmannGenerator

        model = BoltzmannGenerator.from_config(config)
    elif kind == "TransferableFlow":
        from mcsample.flows.transferable import TransferableFlow

        model = TransferableFlow.from_config(config)
    else:
        raise ValueError(f"{path}: unknown flow kind {kind!r}")
    model.load_state_dict(blob["state_dict"])
    model.meta = blob.get("meta", {})
    model.eval()
    if system is not None:
        model.check_identity(system)
    return model
