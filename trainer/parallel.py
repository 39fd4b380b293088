"""Context parallelism: each sample's token sequence split across a group of processes, with diffusers' own
Ulysses or ring attention doing the communication; data parallelism (DDP) across those groups.

Ranks are laid out as (data-parallel group, context-parallel rank): ranks dp * degree ... dp * degree + degree - 1
form one context-parallel group (neighbours, so on one node when the degree divides the GPUs per node). A group
shares one sample stream: data sharding, noise and timesteps follow the data-parallel rank only.

Gradients: the transformer gathers its output on every rank of a group, each rank computes the same loss, and the
backward of the gather keeps only the rank's own slice, so a rank's LoRA gradient is its tokens' share of the
sample's gradient (the shares sum to it; probed against one process to 3e-7). DDP averages over all processes,
so the loss is scaled by the degree before backward: the mean over data-parallel groups of each sample's gradient.
FSDP2 (accelerate's, over all processes) reduce-scatters the same average, so it composes unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer.config import TrainSection, UserError


def cp_backends(kind: str) -> list[str]:
    """train.attention_backend values diffusers runs context-parallel; ring attention merges the partial
    attentions with their log-sum-exp, which the plain SDPA backend does not return."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    names = sorted(_AttentionBackendRegistry._supports_context_parallel - {"native"})
    return names if kind == "ring" else ["sdpa", *names]


@dataclass(frozen=True)
class Layout:
    """Where this process sits: its context-parallel group (`dp_rank` of `dp`) and its place in it."""

    degree: int = 1
    cp_rank: int = 0
    dp: int = 1
    dp_rank: int = 0

    @property
    def lead(self) -> bool:
        """The group's first rank: the one that counts the group's samples and writes its validation videos."""
        return self.cp_rank == 0


def layout(degree: int, rank: int, world: int) -> Layout:
    return Layout(degree, rank % degree, world // degree, rank // degree)


def check_context_parallel(
    t: TrainSection, family: Any, world: int, device: torch.device, deepspeed: bool, shapes: list[tuple]
) -> None:
    """Refuse, before anything trains, a context-parallel setup that cannot run; `shapes`: (width, height, frames)
    of the training samples."""
    degree, kind = t.context_parallel, t.context_parallel_kind
    if degree == 1:
        return
    what = f"train.context_parallel = {degree}"
    if world % degree:
        raise UserError(f"{what} does not divide the {world} launched process(es): launch a multiple of {degree}")
    if family.context_parallel_plan() is None:
        raise UserError(f"{what}: the {family.name} family has no context-parallel plan (diffusers has none for it)")
    if deepspeed or t.block_offload or t.offload_inactive_expert:
        raise UserError(
            f"{what} runs under DDP or FSDP2 only (not with DeepSpeed, block_offload or offload_inactive_expert)"
        )
    if t.token_routing:  # routing cuts the sequence the plan splits at the first block
        raise UserError(f"{what} does not combine with train.token_routing (both reshape the token sequence)")
    if kind == "ring" and device.type != "cuda":
        raise UserError(
            f'{what}: context_parallel_kind = "ring" needs an attention backend that returns the log-sum-exp '
            f'({", ".join(cp_backends("ring"))}); none of them runs on the {device.type}: use "ulysses"'
        )
    if t.attention_backend not in cp_backends(kind):
        raise UserError(
            f"{what}: train.attention_backend = {t.attention_backend!r} cannot run {kind} attention; "
            f"use one of {', '.join(cp_backends(kind))}"
        )
    for width, height, frames in sorted(set(shapes)):
        n = sequence_length(family, width, height, frames)
        if n % degree:
            raise UserError(
                f"{what}: samples of {width}x{height}, {frames} frames have {n} tokens, not a multiple of {degree} "
                "(each process takes an equal share): choose other resolutions or frame counts"
            )


def sequence_length(family: Any, width: int, height: int, frames: int) -> int:
    """Video tokens the transformer sees for a (width, height, frames) sample."""
    (st, sh, sw), (pt, ph, pw) = family.vae_stride, family.patch
    return ((frames - 1) // st + 1) // pt * (height // sh // ph) * (width // sw // pw)


def device_mesh(degree: int, kind: str, world: int, device: torch.device) -> Any:
    """The (dp, ring, ulysses) mesh of all processes, in the rank layout above."""
    from torch.distributed.device_mesh import init_device_mesh

    ring, ulysses = (degree, 1) if kind == "ring" else (1, degree)
    return init_device_mesh(device.type, (world // degree, ring, ulysses), mesh_dim_names=("dp", "ring", "ulysses"))


def enable_context_parallel(transformer: nn.Module, plan: dict, kind: str, mesh: Any, device: torch.device) -> None:
    """diffusers' context parallelism on `transformer` with our mesh. What `enable_parallelism` does, without its
    device lookup (`rank % torch.accelerator.device_count()`, a division by zero on a CPU)."""
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    degree = mesh["ring"].size() * mesh["ulysses"].size()
    heads = transformer.config.get("num_attention_heads")
    if kind == "ulysses" and heads and heads % degree:
        raise UserError(
            f"train.context_parallel = {degree}: Ulysses splits the {heads} attention heads of "
            f'the transformer evenly: choose a degree that divides {heads}, or context_parallel_kind = "ring"'
        )
    cp = ContextParallelConfig(ring_degree=mesh["ring"].size(), ulysses_degree=mesh["ulysses"].size(), mesh=mesh)
    config = ParallelConfig(context_parallel_config=cp)
    config.setup(torch.distributed.get_rank(), torch.distributed.get_world_size(), device, mesh=mesh)
    transformer._parallel_config = config
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    apply_context_parallel(transformer, cp, plan)
