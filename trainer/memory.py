"""Memory modes, switched on by the recipe: one place, so the training loop and scripts/bench_train.py
build exactly the same model and optimizer.

    offload_base_weights(transformer, device)  before add_adapter  (block_offload)
    apply_memory_modes(transformer, train)     after add_adapter   (fp8_base, gradient_checkpointing, fp8_compute)
    make_optimizer(params, train)                                  (optimizer = adamw | adamw8bit)

What each costs is in docs/training.md.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from trainer.config import TrainSection, UserError

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
    """fp8 storage of the frozen weights, gradient checkpointing and fp8 compute, on a transformer that has its
    LoRA."""
    if train.fp8_base:
        from diffusers.hooks import apply_layerwise_casting

        compute = next(p.dtype for n, p in transformer.named_parameters() if not p.requires_grad)
        # After add_adapter and skipping "lora_": cast the other way round, the LoRA forward breaks and
        # the LoRA weights would be stored in fp8 too.
        skip = tuple(getattr(transformer, "_skip_layerwise_casting_patterns", None) or ()) + ("lora_", "lokr_", "hada_")
        apply_layerwise_casting(transformer, storage_dtype=FP8, compute_dtype=compute, skip_modules_pattern=skip)
    if train.gradient_checkpointing or train.block_offload:
        transformer.enable_gradient_checkpointing()
    if train.fp8_compute:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if problem := fp8_compute_problem(device):
            raise UserError(f"train.fp8_compute = {train.fp8_compute!r}: {problem}")
        apply_fp8_compute(transformer, train.fp8_compute)


FP8_MAX = torch.finfo(FP8).max


def fp8_compute_problem(device: torch.device) -> str | None:
    """Why `device` cannot run train.fp8_compute (fp8 tensor cores and torch._scaled_mm), or None when it can."""
    if device.type != "cuda":
        return f"it needs a CUDA GPU with fp8 tensor cores; this run is on the {device.type.upper()}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"{name} (compute capability {major}.{minor}) has no fp8 tensor cores (8.9+: Ada, Hopper, Blackwell)"
    return None


class FP8Matmul(torch.autograd.Function):
    """y = x W^T + b with x and W in float8 (torch._scaled_mm, fp32 accumulation); backward gives only the input
    gradient (the base is frozen), in the compute dtype from the full-precision weight."""

    @staticmethod
    def forward(ctx, x, weight, w8, w_scale, bias, rowwise: bool):  # noqa: ANN001 - autograd's signature
        ctx.save_for_backward(weight)
        rows = x.reshape(-1, x.shape[-1])
        pad = -rows.shape[0] % 16  # _scaled_mm wants every dimension a multiple of 16
        if pad:
            rows = torch.nn.functional.pad(rows, (0, 0, 0, pad))
        amax = rows.abs().amax(dim=1, keepdim=True) if rowwise else rows.abs().amax()
        x_scale = (amax.float() / FP8_MAX).clamp(min=1e-12)
        x8 = (rows / x_scale).to(FP8)
        y = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=x.dtype)
        y = y[: y.shape[0] - pad].reshape(*x.shape[:-1], -1)
        return y if bias is None else y + bias  # added here: row-wise _scaled_mm takes no bias

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None, None, None, None


def fp8_linear_forward(layer: nn.Linear, rowwise: bool, x: torch.Tensor) -> torch.Tensor:
    """The forward of a frozen Linear under train.fp8_compute; its fp8 weight and scale are made at the first call
    (on the device the layer then is on) and kept."""
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else layer.weight.dtype
    x = x.to(dtype)
    if getattr(layer, "_fp8", None) is None or layer._fp8[0].device != layer.weight.device:
        w = layer.weight.detach().float()
        amax = w.abs().amax(dim=1, keepdim=True) if rowwise else w.abs().amax()
        scale = (amax / FP8_MAX).clamp(min=1e-12)
        layer._fp8 = ((w / scale).to(FP8), scale.t().contiguous() if rowwise else scale)
    w8, w_scale = layer._fp8
    bias = None if layer.bias is None else layer.bias.to(dtype)
    return FP8Matmul.apply(x, layer.weight, w8, w_scale, bias, rowwise)


def apply_fp8_compute(transformer: nn.Module, mode: str) -> int:
    """Route the frozen Linear layers of the transformer's repeated blocks through `fp8_linear_forward`; returns how
    many. Layers whose sides are not multiples of 16 (what _scaled_mm takes) keep their own forward."""
    from functools import partial

    from trainer.perf import repeated_block_lists

    count = 0
    for blocks in repeated_block_lists(transformer).values():
        for name, layer in blocks.named_modules():
            if type(layer) is not nn.Linear or layer.weight.requires_grad or "lora_" in name:
                continue
            if layer.in_features % 16 or layer.out_features % 16:
                continue
            layer.forward = partial(fp8_linear_forward, layer, mode == "row")
            count += 1
    return count


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
