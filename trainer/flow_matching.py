"""Rectified-flow training math shared by every family (Wan and HunyuanVideo train the same way).

x_t = (1 - sigma) * x_0 + sigma * noise, and the transformer predicts the velocity noise - x_0: the
direction the sampler integrates against as sigma goes from 1 (noise) to 0 (data). The timestep the
transformer sees is sigma * 1000, as in diffusers' FlowMatch schedulers.

A family with several denoisers (Wan 2.2's experts) splits the noise levels: each expert trains on the part of the
same shifted distribution that falls in its range, renormalised (never clipped to the boundary), and a step goes to
an expert with that part's probability, so over a run every noise level is drawn as often as with one denoiser.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shift_sigmas(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The schedulers' timestep shift: shift > 1 moves samples towards noise (needed for large videos)."""
    return shift * t / (1 + (shift - 1) * t)


def unshift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The inverse of `shift_sigmas`."""
    return sigmas / (shift - (shift - 1) * sigmas)


def _cdf(t: torch.Tensor, method: str, logit_mean: float, logit_std: float, sigmoid_scale: float) -> torch.Tensor:
    """P(T <= t) of the unshifted time's distribution."""
    if method == "uniform":
        return t
    z = torch.logit(t)
    z = (z - logit_mean) / logit_std if method == "logit_normal" else z / sigmoid_scale
    return torch.special.ndtr(z)


def _inverse_cdf(u: torch.Tensor, method: str, logit_mean: float, logit_std: float, sigmoid_scale: float):
    if method == "uniform":
        return u
    z = torch.special.ndtri(u)
    return torch.sigmoid(logit_mean + logit_std * z if method == "logit_normal" else sigmoid_scale * z)


def sigma_mass(sigma_range: tuple[float, float], method: str, shift: float, **params: float) -> float:
    """The probability that a sampled (shifted) noise level falls in [low, high)."""
    bounds = unshift_sigmas(torch.tensor(sigma_range, dtype=torch.float64), shift)
    low, high = _cdf(bounds, method, **_params(params)).tolist()
    return high - low


def _params(params: dict[str, float]) -> dict[str, float]:
    return {"logit_mean": 0.0, "logit_std": 1.0, "sigmoid_scale": 1.0, **params}


def sample_sigmas(
    n: int,
    method: str,
    shift: float,
    generator: torch.Generator,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    sigmoid_scale: float = 1.0,
    sigma_range: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """n noise levels in (0, 1): uniform, logit-normal (SD3) or sigmoid of a scaled normal, then shifted.

    `sigma_range` (low, high) restricts them to that part of the same distribution: drawn by inverting its CDF on
    the restricted interval, so the shape inside the range is kept."""
    if sigma_range != (0.0, 1.0):
        params = {"logit_mean": logit_mean, "logit_std": logit_std, "sigmoid_scale": sigmoid_scale}
        bounds = unshift_sigmas(torch.tensor(sigma_range, dtype=torch.float64), shift).clamp(1e-5, 1 - 1e-5)
        u_low, u_high = _cdf(bounds, method, **params)
        u = u_low + (u_high - u_low) * torch.rand(n, generator=generator, dtype=torch.float64)
        t = _inverse_cdf(u, method, **params).clamp(*bounds.tolist())
        return shift_sigmas(t, shift).float()
    if method == "uniform":
        t = torch.rand(n, generator=generator)
    elif method == "logit_normal":
        t = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator))
    elif method == "sigmoid":
        t = torch.sigmoid(sigmoid_scale * torch.randn(n, generator=generator))
    else:
        raise ValueError(f"unknown timestep sampling {method!r}")
    return shift_sigmas(t.clamp(1e-5, 1 - 1e-5), shift)


def route(seed: int, step: int, masses: list[float]) -> int:
    """Which denoiser an optimizer step trains: index i with probability masses[i] / sum, from (seed, step) only,
    so every process (and a resumed run) picks the same one."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 7919 + 17)
    return int(torch.multinomial(torch.tensor(masses, dtype=torch.float64), 1, generator=g))


def step_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    """A generator that depends only on (seed, micro-step, rank): noise and timesteps need no saved state,
    so a resumed run draws exactly what an uninterrupted one would."""
    return torch.Generator().manual_seed((seed * 1_000_003 + micro_step) * 4099 + rank)


def flow_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of a batch: the mean squared error, or with `weight` (broadcastable to the latents, 0 where the
    output is not used) each sample's weighted mean, then their mean: a sample's loss does not depend on what else is
    in its batch, so N processes with batch size B still train on what one process with N x B would."""
    if weight is None:
        return F.mse_loss(pred.float(), target.float())
    err = (pred.float() - target.float()).square()
    weight = weight.to(err).expand_as(err)
    total = weight.flatten(1).sum(1).clamp_min(torch.finfo(err.dtype).tiny)  # an all-zero mask: that sample adds 0
    return ((err * weight).flatten(1).sum(1) / total).mean()


def sample_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's (weighted) mean squared error [B], as `flow_mse` weighs it: for per-dataset metrics."""
    err = (pred.float() - target.float()).square()
    weight = torch.ones_like(err) if weight is None else weight.to(err).expand_as(err)
    return (err * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(torch.finfo(err.dtype).tiny)


def noisy_and_target(
    latents: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, velocity target) for clean latents [B, ...] at per-sample sigmas [B]."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.device, latents.dtype)
    return (1 - s) * latents + s * noise, noise - latents
