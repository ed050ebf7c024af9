r"""A von Mises mixture torsion network: a transferable proposal over a molecule's torsions.

VonMisesNet (Swanson, Williams & Jonas, ICML 2023) predicts, from the molecular graph alone,
a mixture of von Mises distributions for every rotatable torsion,

.. math::  q(\theta_t) = \sum_{c=1}^{K} \pi_{tc}\,
           \frac{e^{\kappa_{tc}\cos(\theta_t-\mu_{tc})}}{2\pi I_0(\kappa_{tc})},
           \qquad \kappa = 20\,\sigma(\cdot) + 1,

and samples the torsions independently, :math:`q(\theta) = \prod_t q(\theta_t)`. Because
:math:`q` is normalized and exact, importance sampling and SMC can correct it to the
Boltzmann density of :class:`~mcsample.systems.molecules.TorsionTarget`.

The network here:

* **Graph.** Heavy atoms with RDKit features (element, heavy degree, hydrogens, charge,
  hybridization, aromaticity, ring membership and sizes) and bonds (order, conjugation, ring,
  rotatable), ``num_layers`` rounds of message passing with mean aggregation, residual
  updates and layer norm (as VonMisesNet, smaller: hidden 64 and 6 layers instead of 256 and
  20, with dropout; the default checkpoint is 0.34 MB in float16).
* **Torsion frame.** A torsion's angle depends on which neighbours i and l define it and on
  the 3D arrangement around the bond (chirality). Each side of the bond is summarized from
  its neighbours n with the angle :math:`\delta_n` by which n's dihedral is offset from the
  defining neighbour's in the fixed reference conformer (:math:`\pm 120°` around sp3 atoms,
  180° around sp2 atoms): :math:`s_j = h_j + \sum_n g(h_n, \cos\delta_n, \sin\delta_n)`. The
  sign of :math:`\sin\delta` carries chirality (VonMisesNet uses separate heads per
  chirality instead), so the enantiomer is the same graph with :math:`\sin\delta` negated —
  used as free data augmentation (:meth:`MolGraph.mirrored`). The torsion embedding is
  symmetric under reading the bond backwards, as the dihedral is.
* **Autoregressive mode** (beyond VonMisesNet). With ``autoregressive=True`` torsion t's
  mixture is conditioned on the torsions drawn before it (the target's torsion order, RDKit's
  bond order): :math:`q(\theta)=\prod_t q(\theta_t\mid\theta_{<t})`, the context
  :math:`c_t = \sum_{s<t} a_{ts}\odot v(e_s, \cos k\theta_s, \sin k\theta_s)_{k=1..3}` with
  gates :math:`a_{ts}` from both torsion embeddings and their distance in the graph of rigid
  fragments. ``log_prob`` evaluates all factors in parallel (teacher forcing); ``sample``
  draws torsion by torsion.

Each torsion's density also gets a small uniform component,
:math:`q_t = (1-\epsilon)\,\mathrm{MixVM} + \epsilon/2\pi` (:math:`\epsilon` = 0.05): defensive
importance sampling (Hesterberg 1995). A network trained on a few hundred molecules is
sometimes confidently wrong on a new one; without the floor a missed mode gets no samples and
no weight ever, with it every torsion value keeps density :math:`\ge\epsilon/2\pi`, so
importance weights stay bounded per torsion and SMC's independence moves can reach it.

Sampling uses ``torch.distributions.MixtureSameFamily`` of ``VonMises`` (exact rejection
sampler of Best & Fisher 1979). torch's sampler takes no generator and draws from the global
RNG, so :meth:`VonMisesProposal.sample` forks the RNG and seeds it from ``generator``: a
fixed seed reproduces the samples and the caller's global RNG is left alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Categorical, MixtureSameFamily, VonMises

from mcsample._optional import require

require("rdkit", extra="molecules")

__all__ = [
    "VonMisesConfig",
    "MolGraph",
    "featurize",
    "batch_graphs",
    "VonMisesNet",
    "VonMisesProposal",
    "DEFAULT_CHECKPOINT",
    "load_default",
    "load_checkpoint",
    "save_checkpoint",
]

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "von_mises_default.pt"

_ELEMENTS = (6, 7, 8, 9, 15, 16, 17, 35, 53)
ATOM_FEATURES = len(_ELEMENTS) + 1 + 5 + 4 + 3 + 4 + 2 + 5
BOND_FEATURES = 7
NUM_PROXIMITY = 4


def _one_hot(value, choices) -> list[float]:
    out = [0.0] * (len(choices) + 1)
    out[choices.index(value) if value in choices else len(choices)] = 1.0
    return out


def _atom_features(atom) -> list[float]:
    from rdkit import Chem

    hyb = atom.GetHybridization()
    H = Chem.rdchem.HybridizationType
    heavy_degree = sum(1 for n in atom.GetNeighbors() if n.GetAtomicNum() > 1)
    ring = atom.GetOwningMol().GetRingInfo()
    f = _one_hot(atom.GetAtomicNum(), list(_ELEMENTS))
    f += _one_hot(min(heavy_degree, 4), [0, 1, 2, 3])
    f += _one_hot(min(atom.GetTotalNumHs(), 3), [0, 1, 2])
    f += _one_hot(max(-1, min(1, atom.GetFormalCharge())), [-1, 0])
    f += _one_hot(hyb, [H.SP, H.SP2, H.SP3])
    f += [float(atom.GetIsAromatic()), float(atom.IsInRing())]
    f += [float(ring.IsAtomInRingOfSize(atom.GetIdx(), s)) for s in (3, 4, 5, 6)]
    f += [float(atom.IsInRing() and not any(ring.IsAtomInRingOfSize(atom.GetIdx(), s) for s in (3, 4, 5, 6)))]
    return f


def _bond_features(bond, rotatable: bool) -> list[float]:
    from rdkit import Chem

    B = Chem.rdchem.BondType
    f = [float(bond.GetBondType() == t) for t in (B.SINGLE, B.DOUBLE, B.TRIPLE, B.AROMATIC)]
    f += [float(bond.GetIsConjugated()), float(bond.IsInRing()), float(rotatable)]
    return f


@dataclass
class MolGraph:
    """A molecule's heavy-atom graph and torsion frames, as tensors.

    ``atoms (n, ATOM_FEATURES)``; ``edges (2, E)`` both directions; ``edge_attr (E, 7)``;
    ``torsions (T, 4)`` heavy-atom indices of (i, j, k, l) (for a hydrogen rotor l = k);
    ``bond_attr (T, 7)``; side entries ``side_torsion, side_which (0: j side, 1: k side),
    side_atom, side_angle (S, 2) = (cos δ, sin δ)``; ``proximity (T, T)`` the distance of two
    torsion bonds in the graph of rigid fragments, capped at ``NUM_PROXIMITY - 1``.
    """

    atoms: Tensor
    edges: Tensor
    edge_attr: Tensor
    torsions: Tensor
    bond_attr: Tensor
    side_torsion: Tensor
    side_which: Tensor
    side_atom: Tensor
    side_angle: Tensor
    proximity: Tensor

    @property
    def num_atoms(self) -> int:
        return self.atoms.shape[0]

    @property
    def num_torsions(self) -> int:
        return self.torsions.shape[0]

    def mirrored(self) -> MolGraph:
        """The enantiomer's graph: the same, with every side offset :math:`\\sin\\delta`
        negated. Its torsion density is :math:`q(-\\theta)`."""
        ang = self.side_angle.clone()
        ang[:, 1] = -ang[:, 1]
        return MolGraph(**{**self.__dict__, "side_angle": ang})

    def to(self, device) -> MolGraph:
        return MolGraph(**{k: v.to(device) for k, v in self.__dict__.items()})


def featurize(target) -> MolGraph:
    """Build the :class:`MolGraph` of a :class:`~mcsample.systems.molecules.TorsionTarget`
    (its molecule, torsions and reference conformer)."""
    from mcsample.systems.molecules import dihedral

    mol = target.mol
    heavy = [a.GetIdx() for a in mol.GetAtoms() if a.GetAtomicNum() > 1]
    hidx = {a: n for n, a in enumerate(heavy)}
    torsion_bonds = {tuple(sorted((j, k))) for _, j, k, _ in target.torsions}
    atoms = torch.tensor([_atom_features(mol.GetAtomWithIdx(a)) for a in heavy], dtype=torch.float32)
    src, dst, eattr = [], [], []
    for b in mol.GetBonds():
        u, v = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        if u in hidx and v in hidx:
            f = _bond_features(b, tuple(sorted((u, v))) in torsion_bonds)
            src += [hidx[u], hidx[v]]
            dst += [hidx[v], hidx[u]]
            eattr += [f, f]
    ref = target.reference_positions.detach().cpu().to(torch.float64)
    tors, battr, s_t, s_w, s_a, s_ang = [], [], [], [], [], []
    for t, (i, j, k, l) in enumerate(target.torsions):
        tors.append([hidx[i], hidx[j], hidx[k], hidx.get(l, hidx[k])])
        battr.append(_bond_features(mol.GetBondBetweenAtoms(j, k), True))
        base = float(dihedral(ref[i], ref[j], ref[k], ref[l]))
        for which, (centre, other) in enumerate(((j, k), (k, j))):
            for n in mol.GetAtomWithIdx(centre).GetNeighbors():
                a = n.GetIdx()
                if a == other or a not in hidx:
                    continue
                if which == 0:
                    d = float(dihedral(ref[a], ref[j], ref[k], ref[l])) - base
                else:
                    d = float(dihedral(ref[i], ref[j], ref[k], ref[a])) - base
                s_t.append(t)
                s_w.append(which)
                s_a.append(hidx[a])
                s_ang.append([math.cos(d), math.sin(d)])
    T = len(target.torsions)
    prox = _torsion_proximity(target)
    return MolGraph(
        atoms=atoms,
        edges=torch.tensor([src, dst], dtype=torch.long).reshape(2, -1),
        edge_attr=torch.tensor(eattr, dtype=torch.float32).reshape(-1, BOND_FEATURES),
        torsions=torch.tensor(tors, dtype=torch.long).reshape(T, 4),
        bond_attr=torch.tensor(battr, dtype=torch.float32).reshape(T, BOND_FEATURES),
        side_torsion=torch.tensor(s_t, dtype=torch.long),
        side_which=torch.tensor(s_w, dtype=torch.long),
        side_atom=torch.tensor(s_a, dtype=torch.long),
        side_angle=torch.tensor(s_ang, dtype=torch.float32).reshape(-1, 2),
        proximity=prox,
    )


def _torsion_proximity(target) -> Tensor:
    """Graph distance between torsion bonds in the tree of rigid fragments (0 = share one)."""
    from mcsample.systems.molecules import rigid_fragments

    T = len(target.torsions)
    if T == 0:
        return torch.zeros(0, 0, dtype=torch.long)
    frag = rigid_fragments(target.mol, target.torsions)
    F = int(frag.max()) + 1
    ends = [(int(frag[j]), int(frag[k])) for _, j, k, _ in target.torsions]
    adj = [[] for _ in range(F)]
    for a, b in ends:
        adj[a].append(b)
        adj[b].append(a)
    dist = np.full((F, F), F, dtype=np.int64)
    for s in range(F):  # BFS on the fragment tree
        dist[s, s], frontier = 0, [s]
        while frontier:
            nxt = []
            for a in frontier:
                for b in adj[a]:
                    if dist[s, b] > dist[s, a] + 1:
                        dist[s, b] = dist[s, a] + 1
                        nxt.append(b)
            frontier = nxt
    out = np.zeros((T, T), dtype=np.int64)
    for t, (a, b) in enumerate(ends):
        for u, (c, d) in enumerate(ends):
            out[t, u] = min(dist[a, c], dist[a, d], dist[b, c], dist[b, d])
    return torch.as_tensor(np.minimum(out, NUM_PROXIMITY - 1))


def batch_graphs(graphs: list[MolGraph]) -> tuple[MolGraph, list[int]]:
    """Concatenate graphs into one disconnected graph (indices offset); returns it and the
    number of torsions of each (to split the torsion outputs). ``proximity`` is block-diagonal
    with ``NUM_PROXIMITY - 1`` between molecules (unused across molecules)."""
    offs_a, offs_t = 0, 0
    parts = {k: [] for k in MolGraph.__dataclass_fields__}
    sizes = []
    T_total = sum(g.num_torsions for g in graphs)
    prox = torch.full((T_total, T_total), NUM_PROXIMITY - 1, dtype=torch.long)
    for g in graphs:
        parts["atoms"].append(g.atoms)
        parts["edges"].append(g.edges + offs_a)
        parts["edge_attr"].append(g.edge_attr)
        parts["torsions"].append(g.torsions + offs_a)
        parts["bond_attr"].append(g.bond_attr)
        parts["side_torsion"].append(g.side_torsion + offs_t)
        parts["side_which"].append(g.side_which)
        parts["side_atom"].append(g.side_atom + offs_a)
        parts["side_angle"].append(g.side_angle)
        T = g.num_torsions
        prox[offs_t : offs_t + T, offs_t : offs_t + T] = g.proximity
        sizes.append(T)
        offs_a += g.num_atoms
        offs_t += T
    cat = {k: torch.cat(v, dim=1 if k == "edges" else 0) for k, v in parts.items() if k != "proximity"}
    return MolGraph(**cat, proximity=prox), sizes


@dataclass
class VonMisesConfig:
    r"""Architecture: ``hidden`` width, ``num_layers`` message-passing rounds, ``components``
    von Mises per torsion, ``autoregressive`` conditioning on earlier torsions, ``dropout`` in
    the hidden layers of every MLP (training only), and ``uniform_weight`` :math:`\epsilon`, the
    weight of a uniform component in each torsion's mixture (defensive importance sampling)."""

    hidden: int = 64
    num_layers: int = 6
    components: int = 4
    autoregressive: bool = False
    dropout: float = 0.1
    uniform_weight: float = 0.05


def _mlp(i: int, h: int, o: int, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.SiLU(), nn.Dropout(dropout), nn.Linear(h, o))


class _Layer(nn.Module):
    """One message-passing round: :math:`m_v = \\mathrm{mean}_{u\\to v}\\,\\phi(h_u, e_{uv})`,
    :math:`h_v \\leftarrow \\mathrm{LN}(h_v + \\psi(h_v, m_v))` (VonMisesNet's update)."""

    def __init__(self, h: int, dropout: float = 0.0):
        super().__init__()
        self.msg = _mlp(h + BOND_FEATURES, h, h, dropout)
        self.upd = _mlp(2 * h, h, h, dropout)
        self.norm = nn.LayerNorm(h)

    def forward(self, h: Tensor, edges: Tensor, eattr: Tensor) -> Tensor:
        src, dst = edges
        m = self.msg(torch.cat([h[src], eattr], -1))
        agg = torch.zeros_like(h).index_add_(0, dst, m)
        deg = (
            torch.zeros(h.shape[0], device=h.device, dtype=h.dtype)
            .index_add_(0, dst, torch.ones_like(dst, dtype=h.dtype))
            .clamp_min(1.0)
        )
        return self.norm(h + self.upd(torch.cat([h, agg / deg[:, None]], -1)))


class VonMisesNet(nn.Module):
    r"""Graph network -> per-torsion von Mises mixture (Swanson et al. 2023), optionally
    autoregressive. ``embed(graph)`` gives torsion embeddings ``(T, H)``;
    ``mixture(emb, context)`` the mixture parameters; ``proposal(target)`` a
    :class:`VonMisesProposal` for one molecule."""

    def __init__(self, config: VonMisesConfig | None = None):
        super().__init__()
        self.config = config = config or VonMisesConfig()
        h, K = config.hidden, config.components
        self.inp = nn.Linear(ATOM_FEATURES, h)
        p = config.dropout
        self.layers = nn.ModuleList(_Layer(h, p) for _ in range(config.num_layers))
        self.side = _mlp(h + 2, h, h, p)
        self.tors = _mlp(2 * h + BOND_FEATURES, h, h, p)
        head_in = 2 * h if config.autoregressive else h
        self.head = _mlp(head_in, h, 4 * K, p)  # logits, cos mu, sin mu, kappa
        if config.autoregressive:
            self.value = _mlp(h + 6, h, h, p)
            self.gate = _mlp(2 * h + NUM_PROXIMITY, h, h, p)

    # -- graph -> torsion embeddings ------------------------------------------------------
    def embed(self, g: MolGraph) -> Tensor:
        """Torsion embeddings ``(T, H)``, symmetric under reversing the bond j-k."""
        h = self.inp(g.atoms)
        for layer in self.layers:
            h = layer(h, g.edges, g.edge_attr)
        T = g.num_torsions
        if T == 0:
            return h.new_zeros(0, h.shape[1])
        msg = self.side(torch.cat([h[g.side_atom], g.side_angle.to(h.dtype)], -1))
        slot = g.side_torsion * 2 + g.side_which
        sides = torch.zeros(2 * T, h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, slot, msg)
        sides = sides.reshape(T, 2, -1) + h[g.torsions[:, 1:3]]
        sj, sk = sides[:, 0], sides[:, 1]
        b = g.bond_attr.to(h.dtype)
        return self.tors(torch.cat([sj, sk, b], -1)) + self.tors(torch.cat([sk, sj, b], -1))

    def mixture_params(self, emb: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits, loc, concentration)``, each ``(..., K)``; :math:`\\kappa = 20\\sigma+1`."""
        x = emb if context is None else torch.cat([emb.expand(context.shape[:-1] + emb.shape[-1:]), context], -1)
        out = self.head(x).unflatten(-1, (4, self.config.components))
        logits, c, s, k = out.unbind(-2)
        return logits, torch.atan2(s, c), 20.0 * torch.sigmoid(k) + 1.0

    # -- autoregressive context -----------------------------------------------------------
    def gates(self, emb: Tensor, proximity: Tensor) -> Tensor:
        """Gates ``(..., T, T, H)`` from embeddings ``(..., T, H)`` and fragment distances
        ``(..., T, T)``; zero on and above the diagonal (torsion t sees only s < t)."""
        T, H = emb.shape[-2], emb.shape[-1]
        prox = nn.functional.one_hot(proximity, NUM_PROXIMITY).to(emb.dtype)
        full = emb.shape[:-2] + (T, T, H)
        pair = torch.cat([emb.unsqueeze(-2).expand(full), emb.unsqueeze(-3).expand(full), prox], -1)
        mask = torch.tril(torch.ones(T, T, dtype=emb.dtype, device=emb.device), -1)
        return torch.sigmoid(self.gate(pair)) * mask[..., None]

    def values(self, emb: Tensor, theta: Tensor) -> Tensor:
        r"""Values ``(..., B, T, H)`` of drawn torsions ``theta (..., B, T)``, embeddings
        ``(..., T, H)``: :math:`v(e_s, \cos k\theta_s, \sin k\theta_s)_{k=1,2,3}`."""
        k = torch.arange(1, 4, dtype=emb.dtype, device=emb.device)
        ang = theta[..., None].to(emb.dtype) * k
        feats = torch.cat([torch.cos(ang), torch.sin(ang)], -1)
        return self.value(torch.cat([emb.unsqueeze(-3).expand(theta.shape + emb.shape[-1:]), feats], -1))

    def proposal(self, target_or_graph) -> VonMisesProposal:
        """The proposal for one molecule (a TorsionTarget or a featurized MolGraph)."""
        g = target_or_graph if isinstance(target_or_graph, MolGraph) else featurize(target_or_graph)
        return VonMisesProposal(self, g)


def _wrap(theta: Tensor) -> Tensor:
    """Map angles to :math:`[-\\pi, \\pi)`."""
    return torch.remainder(theta + math.pi, 2 * math.pi) - math.pi


def _mixture(logits: Tensor, loc: Tensor, conc: Tensor) -> MixtureSameFamily:
    return MixtureSameFamily(Categorical(logits=logits), VonMises(loc, conc), validate_args=False)


def torsion_log_density(params: tuple[Tensor, Tensor, Tensor], theta: Tensor, uniform_weight: float) -> Tensor:
    r"""Per-torsion :math:`\log[(1-\epsilon)\,\mathrm{MixVM}(\theta) + \epsilon/2\pi]`
    (``theta`` already wrapped; ``params`` broadcast against it)."""
    lp = _mixture(*params).log_prob(theta)
    if uniform_weight <= 0:
        return lp
    return torch.logaddexp(
        lp + math.log1p(-uniform_weight), torch.full_like(lp, math.log(uniform_weight) - math.log(2 * math.pi))
    )


def _sample_mixture(logits: Tensor, loc: Tensor, conc: Tensor, n: int | None) -> Tensor:
    """One draw per mixture (``n`` of them if the parameters carry no sample dim): the
    component from ``Categorical``, then only that component's ``VonMises`` is sampled
    (``MixtureSameFamily.sample`` would draw all K components and discard K-1)."""
    shape = () if n is None else (n,)
    comp = Categorical(logits=logits).sample(shape)[..., None]
    pick = lambda v: torch.gather(v.expand(comp.shape[:-1] + v.shape[-1:]), -1, comp)[..., 0]
    return VonMises(pick(loc), pick(conc), validate_args=False).sample()


def _defend(theta: Tensor, uniform_weight: float) -> Tensor:
    r"""Replace each draw, with probability :math:`\epsilon`, by a uniform angle (the mixture's
    uniform component), from the (forked) global RNG like the von Mises sampler."""
    if uniform_weight <= 0:
        return theta
    swap = torch.rand(theta.shape, device=theta.device) < uniform_weight
    return torch.where(swap, (torch.rand(theta.shape, device=theta.device, dtype=theta.dtype) * 2 - 1) * math.pi, theta)


class VonMisesProposal:
    r"""The network's distribution over one molecule's torsions, a
    :class:`~mcsample.protocols.Proposal` over ``(B, T)`` with exact normalized ``log_prob``.

    Independent mode: :math:`\log q(\theta) = \sum_t \log \mathrm{MixVM}(\theta_t)`;
    autoregressive: :math:`\sum_t \log \mathrm{MixVM}(\theta_t\mid\theta_{<t})`. Samples are
    wrapped to :math:`[-\pi,\pi)`; ``log_prob`` is :math:`2\pi`-periodic. The embedding is
    computed once, at construction; gradients flow to the network if grad mode was on then.
    """

    def __init__(self, net: VonMisesNet, graph: MolGraph, emb: Tensor | None = None):
        self.net = net
        self.graph = graph
        self.event_shape = torch.Size([graph.num_torsions])
        if emb is None:
            emb = net.embed(graph)  # differentiable when grad is enabled (training, fine-tuning)
        self.emb = emb
        self.autoregressive = net.config.autoregressive
        self.uniform_weight = float(net.config.uniform_weight)
        if self.autoregressive:
            self._gates = net.gates(emb, graph.proximity)
        else:
            self._params = net.mixture_params(emb)

    def log_prob(self, theta: Tensor) -> Tensor:
        """:math:`\\log q(\\theta)`, ``(B,)`` (float32, the network's dtype)."""
        return self.log_prob_terms(theta).sum(-1)

    def log_prob_terms(self, theta: Tensor) -> Tensor:
        """Per-torsion (conditional) log-densities ``(B, T)``."""
        theta = _wrap(theta.to(self.emb.dtype))
        if theta.shape[-1] == 0:
            return theta.new_zeros(theta.shape)
        if self.autoregressive:
            ctx = torch.einsum("tsh,bsh->bth", self._gates, self.net.values(self.emb, theta))
            params = self.net.mixture_params(self.emb, ctx)
        else:
            params = self._params
        return torsion_log_density(params, theta, self.uniform_weight)

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        """Draw ``sample_shape + (T,)`` torsions; reproducible with ``generator``."""
        return self.sample_and_log_prob(sample_shape, generator)[0]

    def sample_and_log_prob(
        self, sample_shape=torch.Size(), generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Samples and their log-densities in one pass."""
        shape = torch.Size(sample_shape) if not isinstance(sample_shape, int) else torch.Size([sample_shape])
        n = int(math.prod(shape))
        with torch.no_grad():
            if generator is None:
                theta, lq = self._draw(n)
            else:
                devices = [generator.device] if generator.device.type == "cuda" else []
                seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(seed)
                    theta, lq = self._draw(n)
        return theta.reshape(shape + self.event_shape), lq.reshape(shape)

    def _draw(self, n: int) -> tuple[Tensor, Tensor]:
        T = self.event_shape[0]
        if T == 0:
            z = self.emb.new_zeros(n, 0)
            return z, self.emb.new_zeros(n)
        if not self.autoregressive:
            theta = _wrap(_defend(_sample_mixture(*self._params, n), self.uniform_weight))
            return theta, torsion_log_density(self._params, theta, self.uniform_weight).sum(-1)
        theta = self.emb.new_zeros(n, T)
        lq = self.emb.new_zeros(n)
        vals = self.emb.new_zeros(n, T, self.emb.shape[-1])
        for t in range(T):
            ctx = torch.einsum("sh,bsh->bh", self._gates[t], vals)
            params = self.net.mixture_params(self.emb[t], ctx)
            th = _wrap(_defend(_sample_mixture(*params, None), self.uniform_weight))
            lq = lq + torsion_log_density(params, th, self.uniform_weight)
            theta[:, t] = th
            vals[:, t] = self.net.values(self.emb[t : t + 1], th[:, None])[:, 0]
        return theta, lq


# -- checkpoints --------------------------------------------------------------------------


def save_checkpoint(net: VonMisesNet, path: str | Path, meta: dict | None = None, half: bool = True) -> None:
    """Save config + weights (float16 by default, halving the size) atomically; loadable with
    ``torch.load(weights_only=True)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in net.state_dict().items()}
    blob = {"config": asdict(net.config), "state_dict": state, "meta": dict(meta or {})}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path, map_location="cpu") -> VonMisesNet:
    """Load a network saved by :func:`save_checkpoint` (float32, eval mode)."""
    blob = torch.load(Path(path), map_location=map_location, weights_only=True)
    net = VonMisesNet(VonMisesConfig(**blob["config"]))
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()})
    net.meta = blob.get("meta", {})
    return net.eval()


def load_default() -> VonMisesNet:
    """The shipped checkpoint (``flows/checkpoints/von_mises_default.pt``; see its README)."""
    if not DEFAULT_CHECKPOINT.exists():
        raise FileNotFoundError(
            f"no default checkpoint at {DEFAULT_CHECKPOINT}; train one with `python examples/molecules/train.py`"
        )
    return load_checkpoint(DEFAULT_CHECKPOINT)
