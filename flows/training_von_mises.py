r"""Training the von Mises mixture network: reference samples, maximum likelihood, SNIS tuning.

1. **Reference samples** (:func:`parallel_tempering`). The project makes its own ground truth,
   as VonMisesNet did with parallel-tempering HMC: replica-exchange Metropolis on
   :class:`~mcsample.systems.molecules.TorsionTarget` (Swendsen & Wang 1986; Geyer 1991).
   ``R`` replicas at temperatures :math:`T_r = T_0\rho^r` each run ``C`` chains of
   :math:`\pi_r \propto e^{\beta_r\log p}`, :math:`\beta_r = T_0/T_r`. A local move is, per
   chain and with equal probability, a wrapped Gaussian random walk on all torsions (step
   size adapted per replica during burn-in towards 30% acceptance) or a uniform redraw of one
   torsion (an independence move that jumps barriers in one step); both are symmetric, so the
   Metropolis ratio is :math:`e^{\beta_r\Delta\log p}`. Then neighbouring replicas swap
   states (even and odd pairs alternately) with probability
   :math:`\min(1, e^{(\beta_r-\beta_{r+1})(\log p_{r+1}-\log p_r)})`. Samples of the
   :math:`T_0` replica after burn-in, thinned, are the reference.
2. **Maximum likelihood** (:func:`fit_maximum_likelihood`): minimize the mean negative
   log-likelihood per torsion of the reference samples of all training molecules under the
   network (AdamW, dropout), each molecule also seen as its enantiomer (negated torsions,
   mirrored frames: :meth:`~mcsample.flows.von_mises.MolGraph.mirrored`), keeping the weights
   with the best NLL on validation molecules held back from the fit (with a few hundred
   molecules the network memorizes them within a few hundred steps).
3. **SNIS fine-tuning** (:func:`fine_tune_snis`), optional: draw from the network, weight by
   :math:`w \propto p/q` (self-normalized, detached) and maximize
   :math:`\sum_i \bar w_i \log q(\theta_i)` — a step of the inclusive-KL (reweighted wake-sleep
   / self-improvement) objective, with a penalty :math:`\lambda E[(\log q-\log q_0)^2]` to the
   frozen maximum-likelihood network as in Prose et al. (2025).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mcsample.protocols import generator_or_seed

__all__ = [
    "PTState",
    "pt_init",
    "pt_step",
    "parallel_tempering",
    "TrainingSet",
    "negative_log_likelihood",
    "fit_maximum_likelihood",
    "fine_tune_snis",
]


def _wrap(theta: Tensor) -> Tensor:
    return torch.remainder(theta + math.pi, 2 * math.pi) - math.pi


@dataclass
class PTState:
    """Parallel-tempering state: ``theta (R, C, T)``, ``log_prob (R, C)`` at the base
    temperature, ``betas (R,)``, random-walk ``step_size (R,)``, and counters of accepted
    local moves and swaps per replica (``swap_accept`` for the pair r, r+1)."""

    theta: Tensor
    log_prob: Tensor
    betas: Tensor
    step_size: Tensor
    iteration: int = 0
    local_accept: Tensor = None
    local_tries: int = 0
    swap_accept: Tensor = None
    swap_tries: Tensor = None


def pt_init(
    target,
    num_chains: int,
    num_replicas: int = 6,
    max_temperature_ratio: float = 5.0,
    generator: torch.Generator | None = None,
    device=None,
) -> PTState:
    """Chains started uniformly on the torus; temperatures :math:`T_0\\rho^r` up to
    ``max_temperature_ratio`` times the target's."""
    device = device or torch.device("cpu")
    T = target.event_shape[0]
    R, C = num_replicas, num_chains
    theta = (torch.rand(R, C, T, dtype=torch.float64, generator=generator, device=device) * 2 - 1) * math.pi
    with torch.no_grad():
        lp = target.log_prob(theta.reshape(R * C, T)).reshape(R, C).to(torch.float64)
    ratio = max_temperature_ratio ** (1.0 / max(R - 1, 1))
    betas = torch.tensor([ratio**-r for r in range(R)], dtype=torch.float64, device=device)
    return PTState(
        theta,
        lp,
        betas,
        torch.full((R,), 0.5, dtype=torch.float64, device=device),
        local_accept=torch.zeros(R, dtype=torch.float64, device=device),
        swap_accept=torch.zeros(max(R - 1, 0), dtype=torch.float64, device=device),
        swap_tries=torch.zeros(max(R - 1, 0), dtype=torch.float64, device=device),
    )


def pt_step(state: PTState, target, generator: torch.Generator | None = None, adapt: bool = False) -> PTState:
    """One local Metropolis move of every chain, then one round of replica swaps."""
    R, C, T = state.theta.shape
    dev = state.theta.device
    g = generator
    # local move: random walk on all torsions, or a uniform redraw of one torsion
    rw = torch.rand(R, C, 1, generator=g, device=dev, dtype=torch.float64) < 0.5
    step = state.theta + state.step_size[:, None, None] * torch.randn(
        R, C, T, generator=g, device=dev, dtype=torch.float64
    )
    which = torch.randint(0, T, (R, C, 1), generator=g, device=dev)
    fresh = (torch.rand(R, C, 1, generator=g, device=dev, dtype=torch.float64) * 2 - 1) * math.pi
    redraw = state.theta.scatter(-1, which, fresh)
    prop = _wrap(torch.where(rw, step, redraw))
    with torch.no_grad():
        lp = target.log_prob(prop.reshape(R * C, T)).reshape(R, C).to(torch.float64)
    log_a = state.betas[:, None] * (lp - state.log_prob)
    u = torch.rand(R, C, generator=g, device=dev, dtype=torch.float64)
    acc = torch.log(u) < torch.nan_to_num(log_a, nan=-math.inf)
    theta = torch.where(acc[..., None], prop, state.theta)
    logp = torch.where(acc, lp, state.log_prob)
    step_size = state.step_size
    rw_acc = ((acc & rw[..., 0]).sum(1) / rw[..., 0].sum(1).clamp_min(1)).to(torch.float64)
    if adapt:
        step_size = (step_size * torch.exp(rw_acc - 0.3)).clamp(1e-3, math.pi)
    # swaps between neighbours r, r+1 (even pairs on even iterations, odd on odd)
    swap_acc, swap_tries = state.swap_accept.clone(), state.swap_tries.clone()
    for r in range(state.iteration % 2, R - 1, 2):
        log_s = (state.betas[r] - state.betas[r + 1]) * (logp[r + 1] - logp[r])
        s = torch.log(torch.rand(C, generator=g, device=dev, dtype=torch.float64)) < log_s
        a, b = theta[r].clone(), theta[r + 1].clone()
        theta[r] = torch.where(s[:, None], b, a)
        theta[r + 1] = torch.where(s[:, None], a, b)
        la, lb = logp[r].clone(), logp[r + 1].clone()
        logp[r] = torch.where(s, lb, la)
        logp[r + 1] = torch.where(s, la, lb)
        swap_acc[r] += s.to(torch.float64).mean()
        swap_tries[r] += 1
    return PTState(
        theta,
        logp,
        state.betas,
        step_size,
        state.iteration + 1,
        state.local_accept + acc.to(torch.float64).mean(1),
        state.local_tries + 1,
        swap_acc,
        swap_tries,
    )


def parallel_tempering(
    target,
    num_samples: int = 4000,
    num_chains: int = 16,
    num_replicas: int = 6,
    max_temperature_ratio: float = 5.0,
    burn_in: int = 1000,
    thin: int = 4,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[Tensor, dict]:
    """Reference torsion samples ``(num_samples, T)`` of ``target`` (at its temperature) by
    replica-exchange Metropolis; returns them and diagnostics (acceptance rates, step sizes).

    Cost: ``num_replicas * num_chains`` energies per iteration, ``burn_in + thin *
    num_samples / num_chains`` iterations.
    """
    T = target.event_shape[0]
    if T == 0:
        return torch.zeros(num_samples, 0, dtype=torch.float64), {}
    state = pt_init(target, num_chains, num_replicas, max_temperature_ratio, generator)
    iters = math.ceil(num_samples / num_chains) * thin
    out = []
    bar = tqdm(total=burn_in + iters, disable=not progress, desc="parallel tempering", leave=False)
    for it in range(burn_in + iters):
        state = pt_step(state, target, generator, adapt=it < burn_in)
        if it == burn_in - 1:
            state.local_accept.zero_()
            state.local_tries = 0
            state.swap_accept.zero_()
            state.swap_tries.zero_()
        if it >= burn_in and (it - burn_in) % thin == thin - 1:
            out.append(state.theta[0].clone())
        bar.update(1)
    bar.close()
    samples = torch.cat(out)[:num_samples]
    info = {
        "local_acceptance": (state.local_accept / max(state.local_tries, 1)).tolist(),
        "swap_acceptance": (state.swap_accept / state.swap_tries.clamp_min(1)).tolist(),
        "step_size": state.step_size.tolist(),
        "temperatures": (target.temperature / state.betas).tolist(),
        "iterations": burn_in + iters,
    }
    return samples, info


# -- maximum likelihood -------------------------------------------------------------------


@dataclass
class TrainingSet:
    """Featurized molecules and their reference torsion samples (one entry per molecule)."""

    names: list[str]
    graphs: list
    samples: list[Tensor]

    def __len__(self) -> int:
        return len(self.names)


def negative_log_likelihood(net, graphs, samples, batch: int, generator) -> Tensor:
    """Mean negative log-likelihood per torsion over a random minibatch of each molecule's
    samples (one graph-network pass over all molecules batched together). Independent mode:
    one mixture log-density call over all (sample, torsion) pairs of all molecules;
    autoregressive mode: molecules padded to the largest torsion count, each context running
    over its own torsions only."""
    from mcsample.flows.von_mises import NUM_PROXIMITY, _wrap, batch_graphs, torsion_log_density

    big, sizes = batch_graphs(graphs)
    emb = net.embed(big)
    if not net.config.autoregressive:
        thetas, which, start = [], [], 0
        for x, T in zip(samples, sizes):
            if T:
                idx = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=generator)
                thetas.append(x[idx].reshape(-1))
                which.append((start + torch.arange(T)).repeat(len(idx)))
            start += T
        theta, which = torch.cat(thetas).to(emb.dtype), torch.cat(which)
        logits, loc, conc = net.mixture_params(emb)
        lp = torsion_log_density((logits[which], loc[which], conc[which]), _wrap(theta), net.config.uniform_weight)
        return -lp.mean()
    # autoregressive: pad every molecule to the largest torsion count and run all at once
    M, Tm, H = len(graphs), max(sizes), emb.shape[-1]
    if Tm == 0:
        return emb.sum() * 0.0
    B = max(min(batch, x.shape[0]) for x in samples)
    E = emb.new_zeros(M, Tm, H)
    prox = torch.full((M, Tm, Tm), NUM_PROXIMITY - 1, dtype=torch.long)
    theta = emb.new_zeros(M, B, Tm)
    valid = torch.zeros(M, B, Tm, dtype=torch.bool)
    start = 0
    for m, (g, x, T) in enumerate(zip(graphs, samples, sizes)):
        if T:
            E[m, :T] = emb[start : start + T]
            prox[m, :T, :T] = g.proximity
            idx = torch.randint(0, x.shape[0], (min(B, x.shape[0]),), generator=generator)
            theta[m, : len(idx), :T] = x[idx].to(emb.dtype)
            valid[m, : len(idx), :T] = True
        start += T
    gates = net.gates(E, prox)  # (M, Tm, Tm, H)
    ctx = torch.einsum("mtsh,mbsh->mbth", gates, net.values(E, theta))
    params = net.mixture_params(E[:, None], ctx)  # each (M, B, Tm, K)
    lp = torsion_log_density(params, _wrap(theta), net.config.uniform_weight)
    return -lp[valid].mean()


def _generator(generator, seed, who: str) -> torch.Generator:
    """``generator`` (``None``: one seeded from torch's global RNG), or the deprecated integer
    ``seed`` as ``torch.Generator().manual_seed(seed)``."""
    generator = generator_or_seed(who, generator, seed)
    if generator is None:
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
    return generator


def fit_maximum_likelihood(
    net,
    train: TrainingSet,
    steps: int = 600,
    lr: float = 2e-3,
    batch: int = 64,
    mirror: bool = True,
    generator: torch.Generator | None = None,
    valid: TrainingSet | None = None,
    weight_decay: float = 1e-4,
    progress: bool = False,
    log_every: int = 50,
    *,
    seed: int | None = None,
) -> list[dict]:
    """AdamW on the mean NLL per torsion (nats) of the reference samples, cosine-decayed
    learning rate; each step uses every training molecule (and its mirror image) with
    ``batch`` random samples. With ``valid`` (molecules held back from the fit, never the test
    set) the NLL on it is logged every ``log_every`` steps and the network ends with the
    weights of the best validation NLL (early stopping). Returns the log.

    ``generator`` (``torch.Generator``) draws the minibatches and seeds the dropout masks (in
    a forked RNG: the global one is left alone) and the validation draws; ``seed`` is its
    deprecated integer alias."""
    gen = _generator(generator, seed, "fit_maximum_likelihood")
    draws = torch.randint(0, 2**62, (2,), generator=gen, device=gen.device).tolist()
    valid_seed, dropout_seed = int(draws[0]), int(draws[1])
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(dropout_seed)  # dropout masks
        log = _fit_ml_loop(
            net, train, steps, lr, batch, mirror, gen, valid, weight_decay, progress, log_every, valid_seed
        )
    return log


def _fit_ml_loop(
    net, train, steps, lr, batch, mirror, gen, valid, weight_decay, progress, log_every, valid_seed
) -> list[dict]:
    graphs, samples = list(train.graphs), [s.to(torch.float32) for s in train.samples]
    if mirror:
        graphs += [g.mirrored() for g in train.graphs]
        samples += [-s for s in samples]
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    log, best = [], (math.inf, None, -1)
    bar = tqdm(range(steps), disable=not progress, desc="maximum likelihood", mininterval=10)
    for step in bar:
        net.train()
        loss = negative_log_likelihood(net, graphs, samples, batch, gen)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            entry = {"step": step, "train_nll": float(loss.detach())}
            if valid is not None and len(valid):
                net.eval()
                with torch.no_grad():
                    v = float(
                        negative_log_likelihood(
                            net,
                            valid.graphs,
                            [s.float() for s in valid.samples],
                            512,
                            torch.Generator().manual_seed(valid_seed),
                        )
                    )
                entry["valid_nll"] = v
                if v < best[0]:
                    best = (v, copy.deepcopy(net.state_dict()), step)
            log.append(entry)
            bar.set_postfix(entry)
    if best[1] is not None:
        net.load_state_dict(best[1])
        log.append({"best_step": best[2], "best_valid_nll": best[0]})
    net.eval()
    return log


def fine_tune_snis(
    net,
    targets: list,
    steps: int = 200,
    num_samples: int = 256,
    lr: float = 2e-4,
    penalty: float = 0.5,
    generator: torch.Generator | None = None,
    progress: bool = False,
    *,
    seed: int | None = None,
) -> list[dict]:
    r"""Self-normalized importance-weighted maximum likelihood on the targets themselves.

    Each step and molecule: :math:`\theta_i\sim q`, :math:`\bar w_i \propto p(\theta_i)/q(\theta_i)`
    (detached, normalized), loss :math:`-\sum_i\bar w_i\log q(\theta_i) + \lambda\,
    \mathrm{mean}_i(\log q(\theta_i)-\log q_0(\theta_i))^2` with :math:`q_0` the network before
    fine-tuning. Returns the log of mean ESS fraction per step.

    Use it to polish a network that already covers the target: at low ESS the objective is
    mode-seeking, and a von Mises component cannot travel to a mode on the other side of the
    circle (the location gradient :math:`\kappa\sin(\theta-\mu)` vanishes there). From a
    random network on ethylbenzene (modes at :math:`\pm 90°`) it locked onto one mode. The
    shipped checkpoint is not fine-tuned. ``generator``: ``torch.Generator`` for the draws
    (``seed``: its deprecated integer alias).
    """
    import copy

    from mcsample.flows.von_mises import featurize

    gen = _generator(generator, seed, "fine_tune_snis")
    frozen = copy.deepcopy(net).eval()
    graphs = [featurize(t) for t in targets]
    with torch.no_grad():
        frozen_q = [frozen.proposal(g) for g in graphs]
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    log = []
    net.eval()  # no dropout: the weights are for this very density
    for step in tqdm(range(steps), disable=not progress, desc="SNIS fine-tuning", mininterval=10):
        loss, ess = 0.0, []
        proposals = []
        with torch.no_grad():
            for t, g in zip(targets, graphs):
                q = net.proposal(g)
                th, lq = q.sample_and_log_prob(num_samples, generator=gen)
                lw = t.log_prob(th.to(torch.float64)) - lq.to(torch.float64)
                w = torch.softmax(lw, 0)
                ess.append(float(1.0 / (w**2).sum()) / num_samples)
                proposals.append((th, w.to(torch.float32)))
        for (th, w), g, q0 in zip(proposals, graphs, frozen_q):
            q = net.proposal(g)
            lq = q.log_prob(th)
            with torch.no_grad():
                lq0 = q0.log_prob(th)
            loss = loss - (w * lq).sum() + penalty * ((lq - lq0) ** 2).mean()
        opt.zero_grad()
        (loss / len(targets)).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        log.append({"step": step, "mean_ess_fraction": sum(ess) / len(ess)})
    net.eval()
    return log
