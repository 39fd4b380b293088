"""Rectified-flow training math shared by every family (Wan and HunyuanVideo train the same way).

x_t = (1 - sigma) * x_0 + sigma * noise, and the transformer predicts the velocity noise - x_0: the
direction the sampler integrates against as sigma goes from 1 (noise) to 0 (data). The timestep the
transformer sees is sigma * 1000, as in diffusers' FlowMatch schedulers.
"""

from __future__ import annotations

import torch


def shift_sigmas(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The schedulers' timestep shift: shift > 1 moves samples towards noise (needed for large videos)."""
    return shift * t / (1 + (shift - 1) * t)


def sample_sigmas(
    n: int,
    method: str,
    shift: float,
    generator: torch.Generator,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    sigmoid_scale: float = 1.0,
) -> torch.Tensor:
    """n noise levels in (0, 1): uniform, logit-normal (SD3) or sigmoid of a scaled normal, then shifted."""
    if method == "uniform":
        t = torch.rand(n, generator=generator)
    elif method == "logit_normal":
        t = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator))
    elif method == "sigmoid":
        t = torch.sigmoid(sigmoid_scale * torch.randn(n, generator=generator))
    else:
        raise ValueError(f"unknown timestep sampling {method!r}")
    return shift_sigmas(t.clamp(1e-5, 1 - 1e-5), shift)


def step_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    """A generator that depends only on (seed, micro-step, rank): noise and timesteps need no saved state,
    so a resumed run draws exactly what an uninterrupted one would."""
    return torch.Generator().manual_seed((seed * 1_000_003 + micro_step) * 4099 + rank)


def noisy_and_target(
    latents: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, velocity target) for clean latents [B, ...] at per-sample sigmas [B]."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.device, latents.dtype)
    return (1 - s) * latents + s * noise, noise - latents
