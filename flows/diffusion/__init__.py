"""Diffusion priors: noise schedules, parameterizations, samplers, score networks.

Time runs over t in [0, 1] (0 = data, 1 = noise) with q_t(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I);
see :mod:`mcsample.protocols` for the NoiseSchedule and DiffusionModel protocols.
"""

from mcsample.flows.diffusion.gmm import GaussianMixtureDiffusion
from mcsample.flows.diffusion.networks import ScoreMLP, ScoreUNet
from mcsample.flows.diffusion.parameterization import Denoiser
from mcsample.flows.diffusion.samplers import sample
from mcsample.flows.diffusion.schedules import VESchedule, VPSchedule, time_grid
from mcsample.flows.diffusion.training import load_checkpoint, save_checkpoint, train_score_model

__all__ = [
    "Denoiser",
    "GaussianMixtureDiffusion",
    "ScoreMLP",
    "ScoreUNet",
    "VESchedule",
    "VPSchedule",
    "load_checkpoint",
    "sample",
    "save_checkpoint",
    "time_grid",
    "train_score_model",
]
