"""Memory modes, switched on by the recipe: one place, so the training loop and scripts/bench_train.py
build exactly the same model and optimizer.

    offload_base_weights(transformer, device)  before add_adapter  (block_offload)
    apply_memory_modes(transformer, train)     after add_adapter   (fp8_base, gradient_checkpointing)
    make_optimizer(params, train)                                  (optimizer = adamw | adamw8bit)

What each costs is in docs/training.md.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from trainer.config import TrainSection

FP8 = torch.float8_e4m3fn


def offload_base_weights(transformer: nn.Module, device: torch.device) -> None:
    """Keep every frozen layer's weights on the CPU and move them to `device` only while the layer runs.

    diffusers' group offloading at leaf level, applied *before* the LoRA is added: each offloaded group is
    then one frozen base layer, and the LoRA weights (added later, and moved to `device` by the caller)
    never take part in offloading, so their updates and gradients stay where the optimizer expects them.
    Autograd keeps the onloaded copy a layer's backward needs, so this saves memory only together with
    gradient checkpointing (which recomputes one block at a time); the trainer turns that on.
    """
    from diffusers.hooks import apply_group_offloading

    apply_group_offloading(transformer, onload_device=device, offload_device="cpu", offload_type="leaf_level")


def apply_memory_modes(transformer: nn.Module, train: TrainSection) -> None:
    """fp8 storage of the frozen weights and gradient checkpointing, on a transformer that has its LoRA."""
    if train.fp8_base:
        from diffusers.hooks import apply_layerwise_casting

        compute = next(p.dtype for n, p in transformer.named_parameters() if not p.requires_grad)
        # After add_adapter and skipping "lora_": cast the other way round, the LoRA forward breaks and
        # the LoRA weights would be stored in fp8 too.
        skip = tuple(getattr(transformer, "_skip_layerwise_casting_patterns", None) or ()) + ("lora_", "lokr_", "hada_")
        apply_layerwise_casting(transformer, storage_dtype=FP8, compute_dtype=compute, skip_modules_pattern=skip)
    if train.gradient_checkpointing or train.block_offload:
        transformer.enable_gradient_checkpointing()


def make_optimizer(params: Iterable[nn.Parameter] | list[dict], train: TrainSection) -> torch.optim.Optimizer:
    """AdamW from torch, or bitsandbytes' AdamW8bit (block-wise 8-bit moments; tensors under 4096
    elements keep fp32 state) with the same hyperparameters. `params` may be parameter groups (one per expert)."""
    kwargs = {
        "lr": train.learning_rate,
        "betas": train.adam_betas,
        "weight_decay": train.weight_decay,
        "eps": train.adam_epsilon,
    }
    if train.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(list(params), **kwargs)
    return torch.optim.AdamW(list(params), **kwargs)


def parameter_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes of trainable and frozen parameters as stored now (fp8 storage shows here)."""
    out = {"trainable": 0, "frozen": 0}
    for p in module.parameters():
        out["trainable" if p.requires_grad else "frozen"] += p.numel() * p.element_size()
    return out
