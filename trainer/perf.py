"""Speed at real sizes: model-size presets, the FLOPs of one LoRA training step, device peaks, and the
recipe's speed switches (torch.compile, attention backend, selective gradient checkpointing).

The FLOPs formula is written as the list of matrix products one step runs (`step_ops`), so it can be read,
documented (docs/performance.md) and checked against PyTorch's own FLOP counter on a tiny model
(tests/test_perf.py). `scripts/bench_train.py` uses the presets and the formula to print s/step and MFU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainer.config import UserError

if TYPE_CHECKING:
    from trainer.config import ModelSection, Recipe
    from trainer.models.base import ModelFamily

# --- model-size presets: the published transformer configs (diffusers layout), built with random weights ---


@dataclass(frozen=True)
class ModelPreset:
    family: str  # the registered family whose transformer, batch layout and FLOPs formula it uses
    config: dict[str, Any]  # kwargs of the family's diffusers transformer class
    text_tokens: int  # text length the transformer sees (Wan pads to 512; HunyuanVideo: at most 256)
    source: str = ""  # where the config was published

    @property
    def family_class(self) -> type[ModelFamily]:
        from trainer.models import family_class

        return family_class(self.family)


def presets() -> dict[str, ModelPreset]:
    """Every family's bench presets (`ModelFamily.bench_presets`) by name."""
    from trainer.models import FAMILIES, family_class

    out: dict[str, ModelPreset] = {}
    for name in FAMILIES:
        for key, (config, tokens, source) in family_class(name).bench_presets.items():
            out.setdefault(key, ModelPreset(name, config, tokens, source))
    return out


def latent_shape(preset: ModelPreset, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Pixel clip size -> latent [C, f, h, w] of the preset family's VAE."""
    fam = preset.family_class
    ft, fh, fw = fam.vae_stride
    step = fam.bucket_step()
    if frames < 1 or (frames - 1) % ft:
        raise UserError(f"--frames {frames}: must be {ft}k+1")
    if height % step or width % step or height < step or width < step:
        raise UserError(f"--height/--width {height}x{width}: must be multiples of {step}")
    return fam.latent_channels, (frames - 1) // ft + 1, height // fh, width // fw


def grid_tokens(patch: tuple[int, int, int], latent: tuple[int, ...]) -> int:
    """Tokens of a latent [C, f, h, w] cut into patches (frames, height, width)."""
    return math.prod(n // k for n, k in zip(latent[1:], patch))


def video_tokens(preset: ModelPreset, latent: tuple[int, int, int, int]) -> int:
    return grid_tokens(preset.family_class.patch_of(preset.config), latent)


def build_transformer(
    preset: ModelPreset,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    seed: int = 0,
    tensors: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """The transformer at the preset's size with random weights, made directly on `device` in `dtype`.

    Modules the class keeps in fp32 when loading (`_keep_in_fp32_modules`) are kept in fp32 here too, as
    `from_pretrained(..., torch_dtype=dtype)` would. `tensors` (another instance's `model_tensors`) makes a
    second instance that shares those frozen weights instead of holding its own copy.
    """
    cls = preset.family_class.transformer_class
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are born in `dtype`: a 14B model never exists in fp32
    try:
        with torch.device("meta" if tensors is not None else device):
            model = cls(**preset.config)
    finally:
        torch.set_default_dtype(default)
    if tensors is not None:
        for name, tensor in tensors.items():
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            (module._parameters if attr in module._parameters else module._buffers)[attr] = tensor
        return model.eval()
    keep = cls._keep_in_fp32_modules or []
    for name, param in model.named_parameters():
        if any(k in name.split(".") for k in keep):
            param.data = param.data.float()
    return model.eval()


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name (what `build_transformer(tensors=...)` shares)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def random_batch(
    preset: ModelPreset, latent: tuple[int, int, int, int], batch_size: int, text_tokens: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random latents, text embeddings and conditions shaped like a collated training batch of the family."""
    g = torch.Generator().manual_seed(seed)
    out = {"latents": torch.randn(batch_size, *latent, generator=g)}
    out |= preset.family_class.random_text(preset.config, batch_size, text_tokens, g)
    return {**out, **preset.family_class.random_conditions(preset.config, out["latents"], g)}


def bench_family(preset: ModelPreset, cfg: ModelSection, device: str | torch.device = "cpu") -> ModelFamily:
    """The preset's model family, loading a randomly initialised transformer of the preset's size.

    The family's own adapter (presets, transformer call); only the weights are replaced.
    """
    base = preset.family_class

    class RandomWeights(base):
        def config(self, cls: Any, subfolder: str) -> dict[str, Any]:
            """The preset is the transformer's config (no model folder to read it from)."""
            return dict(preset.config)

        def load_transformer(self, dtype: torch.dtype, denoiser: Any = None) -> nn.Module:
            """Random weights the first time; later calls share them (a second model costs no weights)."""
            model = build_transformer(preset, dtype, device, tensors=getattr(self, "base_tensors", None))
            self.base_tensors = model_tensors(model)  # before LoRA wraps the layers: what others can share
            return model

    return RandomWeights(cfg)


# --- the FLOPs of one training step ---------------------------------------------------------------------


@dataclass(frozen=True)
class Matmul:
    """`count` linear layers (or a patch-embedding conv) of fan_in -> fan_out applied to `tokens` rows per sample."""

    name: str
    tokens: int
    fan_in: int
    fan_out: int
    count: int = 1
    input_grad: bool = True  # backward needs d(loss)/d(input): the input depends on a trainable parameter
    lora: str | None = None  # "attn" or "ffn": LoRA presets that adapt this layer
    group: str | None = None  # the ModuleList of repeated blocks it lives in (what gradient checkpointing reruns)
    blocks: tuple[int, int] | None = None  # the blocks of `group` it runs in [start, stop); None: all, evenly
    backward: bool = True  # false when its output never reaches the loss: no gradient flows through it at all


@dataclass(frozen=True)
class Attention:
    """`count` attention products softmax(Q K^T) V with q_tokens queries, kv_tokens keys and inner width dim."""

    name: str
    q_tokens: int
    kv_tokens: int
    dim: int
    count: int = 1
    group: str | None = None
    grad: bool = True  # Q, K, V depend on trainable parameters (false only in the frozen text refiner)
    blocks: tuple[int, int] | None = None


@dataclass(frozen=True)
class TokenRouting:
    """Token routing as the FLOPs count sees it: `share` of the video tokens skip the `span` of the block list
    `group` (of `blocks` blocks)."""

    group: str
    blocks: int
    span: range
    share: float


def token_routing(transformer: nn.Module, family: str, recipe: Recipe) -> TokenRouting | None:
    """The recipe's token routing on a loaded transformer; None when it is off."""
    t = recipe.train
    if not t.token_routing:
        return None
    from trainer.models import family_class
    from trainer.routing import span_of

    chain = family_class(family).routed_blocks(transformer)
    name = next(n for n, c in transformer.named_children() if c is chain)
    return TokenRouting(name, len(chain), span_of(len(chain), tuple(t.token_routing_blocks)), t.token_routing)


def routed_ops(
    preset: ModelPreset, latent: tuple[int, int, int, int], text_tokens: int, routing: TokenRouting, ops: list
) -> list[Matmul | Attention]:
    """`ops` with the routed span's share of each block op computed on the routed tokens only: the family's own ops
    for a latent of exactly that many tokens stand in for the span's blocks."""
    from trainer.routing import routed_count

    k = routed_count(video_tokens(preset, latent), routing.share)
    pt, ph, pw = preset.family_class.patch_of(preset.config)
    short = step_ops(preset, (latent[0], pt, ph, pw * k), text_tokens)
    out: list[Matmul | Attention] = []
    for op, op_k in zip(ops, short, strict=True):
        if op.group != routing.group:
            out.append(op)
            continue
        lo, hi = op.blocks or (0, routing.blocks)
        inside = len(range(max(lo, routing.span.start), min(hi, routing.span.stop)))
        out += [
            replace(op, count=op.count * (hi - lo - inside) // (hi - lo)),
            replace(op_k, count=op.count * inside // (hi - lo)),
        ]
    return out


def step_ops(preset: ModelPreset, latent: tuple[int, int, int, int], text_tokens: int) -> list[Matmul | Attention]:
    """Every matrix product of one forward pass for one sample (the family's `step_ops`)."""
    return preset.family_class.step_ops(preset.config, latent, text_tokens)


@dataclass
class StepFlops:
    """FLOPs of one training step; `model` is what MFU counts, `hardware` adds checkpointing's recompute."""

    forward: float
    backward: float
    recompute: float = 0.0
    by_op: dict[str, float] = field(default_factory=dict)

    @property
    def model(self) -> float:
        return self.forward + self.backward

    @property
    def hardware(self) -> float:
        return self.model + self.recompute


LORA_KINDS = {"default": {"attn", "ffn"}, "attention": {"attn"}}


def step_flops(
    preset: ModelPreset,
    latent: tuple[int, int, int, int],
    text_tokens: int | None = None,
    batch_size: int = 1,
    lora_rank: int = 32,
    lora_targets: str | list[str] = "default",
    checkpointed: dict[str, float] | None = None,
    routing: TokenRouting | None = None,
) -> StepFlops:
    """FLOPs of one LoRA training step (forward, backward, optimizer excluded) on `batch_size` samples.

    Counting rules, per matrix product of an (m x k) by a (k x n) matrix = 2mkn FLOPs:
    - forward: every product once.
    - backward of a frozen layer: only the gradient of its input (one product the size of the forward),
      and only when that input depends on a trainable parameter; frozen weights get no gradient.
    - attention: Q K^T and P V forward; dQ, dK, dV and dP backward (twice the forward).
    - LoRA (rank r) on a layer: forward 2·r·(in+out) per token; backward dB, d(Ax), dA (+ dx when needed).
    - `checkpointed`: {block group: fraction of its blocks rerun}; their forward is done again in backward.
    - `routing`: the routed span's blocks compute on the routed tokens only (what they really compute; with a
      `checkpointed` fraction under 1 the recompute is counted as if spread evenly over the blocks).
    `lora_targets` other than a preset name is counted as the default preset (LoRA is ~1% of the total).
    """
    text_tokens = preset.text_tokens if text_tokens is None else text_tokens
    ops = step_ops(preset, latent, text_tokens)
    if routing is not None:
        ops = routed_ops(preset, latent, text_tokens, routing, ops)
    kinds = (
        LORA_KINDS.get(lora_targets, LORA_KINDS["default"]) if isinstance(lora_targets, str) else LORA_KINDS["default"]
    )
    checkpointed = checkpointed or {}
    fwd = bwd = rec = 0.0
    by_op: dict[str, float] = {}
    r = lora_rank
    for op in ops:
        if isinstance(op, Attention):
            f = 4.0 * op.q_tokens * op.kv_tokens * op.dim * op.count
            b = 2 * f if op.grad else 0.0
        else:
            rows = op.tokens * op.count
            f = 2.0 * rows * op.fan_in * op.fan_out
            b = f if op.input_grad else 0.0
            if op.lora in kinds:
                f += 2.0 * rows * r * (op.fan_in + op.fan_out)
                b += 2.0 * rows * r * (2 * op.fan_out + op.fan_in) + (
                    2.0 * rows * r * op.fan_in if op.input_grad else 0
                )
            b = b if op.backward else 0.0
        f, b = f * batch_size, b * batch_size
        fwd, bwd = fwd + f, bwd + b
        rec += f * checkpointed.get(op.group, 0.0) if op.group else 0.0
        by_op[op.name] = by_op.get(op.name, 0.0) + f + b
    return StepFlops(fwd, bwd, rec, by_op)


def batch_step_flops(transformer: nn.Module, family: str, batch: dict[str, torch.Tensor], recipe: Recipe) -> StepFlops:
    """FLOPs of one micro-batch of the training loop, from the loaded transformer's own config (for MFU logs)."""
    model = getattr(transformer, "module", transformer)  # under DDP
    preset = ModelPreset(family, dict(model.config), batch["prompt_embeds"].shape[1])
    latents = batch["latents"]
    return step_flops(
        preset,
        tuple(latents.shape[1:]),
        batch_size=latents.shape[0],
        lora_rank=recipe.lora.rank,
        lora_targets=recipe.lora.targets,
        checkpointed=checkpointed_fractions(model, recipe),
        routing=token_routing(model, family, recipe),
    )


# --- device peaks -----------------------------------------------------------------------------------

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s with fp32 accumulation, from the vendors'
# datasheets. Matched in order against torch.cuda.get_device_name(): the first substring found wins.
DEVICE_PEAKS_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.4),
    ("H200 NVL", 835.0),
    ("H200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 6000 Ada", 364.2),
    ("A6000", 154.8),
    ("RTX 4090", 165.2),
    ("RTX 3090 Ti", 80.0),
    ("RTX 3090", 71.0),
    ("MI300X", 1307.4),
]


def device_peak_flops(name: str) -> float | None:
    """bf16 dense peak of a GPU by its torch device name, in FLOP/s; None when the table does not know it."""
    for key, tflops in DEVICE_PEAKS_TFLOPS:
        if key.lower() in name.lower():
            return tflops * 1e12
    return None


# --- the recipe's speed switches ---------------------------------------------------------------------


def apply_speed_options(transformer: nn.Module, recipe: Recipe, compile_backend: str | None = None) -> nn.Module:
    """Apply train.attention_backend, train.gradient_checkpointing_ratio and train.compile, in that order.

    Called after the LoRA is added and gradient checkpointing is enabled, so compiled blocks include both.
    `compile_backend` overrides torch.compile's backend (tests use "aot_eager"; default: inductor).
    """
    t = recipe.train
    if t.attention_backend != "sdpa":
        set_attention_backend(transformer, t.attention_backend)
    if t.gradient_checkpointing and t.gradient_checkpointing_ratio < 1:
        checkpoint_some_blocks(transformer, t.gradient_checkpointing_ratio)
    if t.compile:
        kwargs = {"backend": compile_backend} if compile_backend else {}
        if t.compile == "blocks":
            transformer.compile_repeated_blocks(**kwargs)
        else:
            transformer.compile(**kwargs)  # in place: parameter names (and checkpoints) stay the same
    return transformer


def set_attention_backend(transformer: nn.Module, backend: str) -> None:
    """diffusers' attention dispatch for every attention layer; a missing package is a one-line error."""
    import logging

    diffusers_log = logging.getLogger("diffusers.models.modeling_utils")
    level = diffusers_log.level
    diffusers_log.setLevel(logging.ERROR)  # "attention backends are an experimental feature" on every call
    try:
        transformer.set_attention_backend(backend)
    except (RuntimeError, ValueError, ImportError) as e:
        raise UserError(f"train.attention_backend = {backend!r}: {e}") from None
    finally:
        diffusers_log.setLevel(level)


def repeated_block_lists(transformer: nn.Module) -> dict[str, nn.ModuleList]:
    """The ModuleLists of the blocks gradient checkpointing wraps (Wan: blocks; HunyuanVideo: double, single). A class
    may list a variant's blocks only under `_no_split_modules` (diffusers' HunyuanVideo, its token-replace blocks)."""
    names = {
        *(getattr(transformer, "_repeated_blocks", None) or []),
        *(getattr(transformer, "_no_split_modules", None) or []),
    }
    return {
        name: child
        for name, child in transformer.named_children()
        if isinstance(child, nn.ModuleList) and len(child) and type(child[0]).__name__ in names
    }


def checkpointed_blocks(n: int, ratio: float) -> list[int]:
    """round(n * ratio) block indices spread evenly over 0..n-1."""
    k = max(1, round(n * ratio)) if ratio > 0 else 0
    return sorted({min(n - 1, int((i + 0.5) * n / k)) for i in range(k)}) if k else []


def checkpoint_some_blocks(transformer: nn.Module, ratio: float) -> dict[str, float]:
    """Selective activation checkpointing through diffusers' own hook: only some blocks recompute.

    diffusers calls `gradient_checkpointing_func(block, *args)` for every block; blocks not chosen run
    normally and keep their activations. Returns {block list: fraction checkpointed} for the FLOPs count.
    """
    from torch.utils.checkpoint import checkpoint

    chosen: set[int] = set()
    fractions = {}
    for name, blocks in repeated_block_lists(transformer).items():
        idx = checkpointed_blocks(len(blocks), ratio)
        chosen |= {id(blocks[i]) for i in idx}
        fractions[name] = len(idx) / len(blocks)

    def some_blocks(block: nn.Module, *args: Any) -> Any:
        if id(block) in chosen:
            return checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    transformer.enable_gradient_checkpointing(some_blocks)
    return fractions


def checkpointed_fractions(transformer: nn.Module, recipe: Recipe) -> dict[str, float]:
    """{block list: fraction of blocks recomputed in backward} for the recipe (empty without checkpointing)."""
    t = recipe.train
    if not t.gradient_checkpointing:
        return {}
    return {
        name: len(checkpointed_blocks(len(blocks), t.gradient_checkpointing_ratio)) / len(blocks)
        for name, blocks in repeated_block_lists(transformer).items()
    }
