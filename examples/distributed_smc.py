"""SMC on the README's 10-d Gaussian mixture, one population sharded over processes.

Run it on 2 processes of this machine (gloo on CPUs, NCCL with one GPU per process)::

    torchrun --nproc_per_node=2 examples/distributed_smc.py

or on one process (``python examples/distributed_smc.py``), or under SLURM
(``sbatch examples/distributed_smc.slurm``). Every process holds its share of the particles;
the ESS, the temperatures and the evidence are the whole population's, and resampling is the
exact resampling of the whole population followed by a balanced exchange of the particles
(``mcsample.distributed``). ``--islands`` runs independent sub-populations instead, combined at
the end (no communication during the run). Rank 0 prints the result; the exact log Z is 3.

Options: ``--num-particles`` (the whole population, default 16384), ``--islands``,
``--checkpoint PATH`` (one file per process and a manifest; rerun the same command to resume).
"""

from __future__ import annotations

import argparse

import torch

import mcsample as mc
from mcsample import distributed
from mcsample.systems.analytic import GaussianMixture


def mixture(dim: int, device) -> GaussianMixture:
    """4 separated unit Gaussians, weights 0.1 0.2 0.3 0.4, exact log Z = 3 (as in the README)."""
    target = GaussianMixture.separated(
        dim=dim, num_modes=4, spread=6.0, log_scale=3.0, generator=torch.Generator().manual_seed(0)
    )
    return (
        target
        if device.type == "cpu"
        else GaussianMixture(target.weights.to(device), target.means.to(device), target.covariances.to(device), 3.0)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-particles", type=int, default=16384)
    ap.add_argument("--islands", action="store_true", help="independent islands instead of one population")
    ap.add_argument("--checkpoint", default=None)
    args = ap.parse_args()

    shard = distributed.init()  # the process group from torchrun's or SLURM's environment (None: one process)
    rank = 0 if shard is None else shard.rank
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    target = mixture(10, device)
    initial = torch.distributions.MultivariateNormal(
        torch.zeros(10, dtype=torch.float64, device=device), 64.0 * torch.eye(10, dtype=torch.float64, device=device)
    )
    result = mc.smc(
        target,
        initial,
        num_particles=args.num_particles,
        kernel=mc.kernels.MALA(),
        generator=torch.Generator(device=device).manual_seed(2),
        checkpoint=args.checkpoint,
        progress=True,
        group=distributed.islands() if args.islands else None,
    )
    modes = result.particles.expectation(target.responsibilities)  # collective: every rank calls it
    if rank == 0:
        print(result)
        print(result.particles)
        pairs = zip(modes.value.tolist(), modes.stderr.tolist())
        print("mode weights", " ".join(f"{v:.3f} ± {s:.3f}" for v, s in pairs))
    if shard is not None:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
