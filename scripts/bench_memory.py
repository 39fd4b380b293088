"""The memory of one LoRA training step at real model sizes, counted without a GPU and without the weights.

    python scripts/bench_memory.py                  # the table of docs/training.md
    python scripts/bench_memory.py --model wan-14b --frames 81 --height 720 --width 1280 --context-parallel 4

The transformer is built from the published config on PyTorch's meta device (shapes only: a 14B model costs no
memory) with the LoRA of `--targets`, and runs one forward (batch 1, bf16) the way diffusers' pipelines call it
(scripts/bench_train.py's `bare_forward`). Every tensor autograd saves for the backward is counted, once, by the
repeated block it is saved in: that is the activation memory of the step. Attention is counted as a fused kernel
(flash, cuDNN, or PyTorch's CPU flash) keeps it: q, k, v, output and the log-sum-exp, never the score matrix.

With gradient checkpointing a step keeps only what the blocks take as input (their hidden states, once per block,
and the shared inputs once) plus, during the backward, one block's saved tensors at a time: `checkpointed` below.
Context parallelism N splits the video tokens, so each process holds about 1/N of the activations (the text
tokens, a few hundred, are not split). The weights are the frozen base in bf16 (half with `train.fp8_base`) plus
the LoRA in fp32 with its gradient and AdamW's two moments.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

# (model, frames, height, width): the table of docs/training.md
TABLE = [
    ("wan-1.3b", 81, 480, 832),
    ("wan-14b", 81, 480, 832),
    ("wan-14b", 81, 720, 1280),
    ("wan22-ti2v-5b", 121, 704, 1280),
    ("hunyuan-13b", 129, 544, 960),
]  # HunyuanVideo 1.5 cannot be counted this way: its forward reads a tensor's value (is the image embedding zero?)
GiB = 1024**3


def size(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


@dataclass
class Saved:
    """Bytes autograd keeps for the backward of one forward."""

    blocks: list[int]  # saved inside each repeated block, in call order
    inputs: int  # the distinct tensors the repeated blocks take: what gradient checkpointing keeps
    other: int  # saved outside the blocks (patch and condition embeddings, the output head)

    @property
    def full(self) -> int:
        return self.other + sum(self.blocks)

    @property
    def checkpointed(self) -> int:
        return self.other + self.inputs + max(self.blocks)


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from tensors_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@contextmanager
def fused_attention() -> Iterator[None]:
    """SDPA as the fused kernels run it: PyTorch's CPU flash attention (it has a meta kernel); on the meta device
    SDPA would otherwise pick the math path, which saves the whole score matrix."""
    real = torch.nn.functional.scaled_dot_product_attention

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
            value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attn_mask, float("-inf")
            )
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return op(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    torch.nn.functional.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = real


def count_saved(transformer: nn.Module, forward: Callable[[], Any], fused: bool = True) -> Saved:
    """Run `forward` (a call of `transformer`) and count what autograd saves for its backward, by repeated block.
    `fused`: attention through `fused_attention` (needed on the meta device; on a CPU, SDPA picks it itself)."""
    from trainer.perf import repeated_block_lists

    blocks = [b for chain in repeated_block_lists(transformer).values() for b in chain]
    params = {id(p) for p in transformer.parameters()}
    seen: dict[int, torch.Tensor] = {}  # kept alive, so ids are not reused
    per_block: dict[int | None, int] = defaultdict(int)
    inputs: dict[int, torch.Tensor] = {}
    current: list[int | None] = [None]

    def enter(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            current[0] = i
            for t in tensors_in((args, kwargs)):
                inputs.setdefault(id(t), t)

        return hook

    def leave(*_: Any) -> None:
        current[0] = None

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base
        if id(t) not in params and id(base) not in params and id(base) not in seen:
            seen[id(base)] = base
            per_block[current[0]] += nbytes(base)
        return t

    handles = [b.register_forward_pre_hook(enter(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(leave) for b in blocks]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fused_attention() if fused else nullcontext():
            forward()
    finally:
        for h in handles:
            h.remove()
    return Saved([per_block[i] for i in range(len(blocks))], sum(map(nbytes, inputs.values())), per_block[None])


def lora_model(preset: Any, targets: str, rank: int, device: str | torch.device = "meta") -> nn.Module:
    """The preset's transformer in bf16 with the family's `targets` LoRA preset (bf16 too: what autocast computes
    in), frozen base."""
    from peft import LoraConfig

    from trainer.perf import build_transformer

    transformer = build_transformer(preset, torch.bfloat16, device)
    transformer.requires_grad_(False)
    regex = preset.family_class.lora_presets.get(targets, targets)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=regex))
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    return transformer


def measure(
    preset: Any, frames: int, height: int, width: int, targets: str, rank: int, device: str = "meta", fused: bool = True
) -> dict:
    """Tokens, saved activations, frozen weight bytes and LoRA training state bytes of one step."""
    from bench_train import bare_forward

    from trainer.perf import latent_shape, random_batch, video_tokens

    latent = latent_shape(preset, frames, height, width)
    transformer = lora_model(preset, targets, rank, device)
    batch = {k: v.to(device, torch.bfloat16 if v.is_floating_point() else v.dtype) for k, v in
             random_batch(preset, latent, 1, preset.text_tokens).items()}  # fmt: skip
    noisy = batch["latents"].requires_grad_(False)
    timestep = torch.full((1,), 500.0, device=device)
    saved = count_saved(transformer, lambda: bare_forward(preset, transformer, noisy, timestep, batch), fused)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    frozen = sum(nbytes(p) for p in transformer.parameters() if not p.requires_grad)
    lora = sum(p.numel() for p in trainable) * 4 * 4  # fp32 weights, gradient and AdamW's two moments
    return {"tokens": video_tokens(preset, latent), "saved": saved, "weights": frozen, "lora": lora}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a preset of scripts/bench_train.py; default: the docs' table")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--targets", default="default", help="the family's LoRA preset (lora.targets)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--context-parallel", type=int, default=4, help="N of the per-process column")
    args = parser.parse_args(argv)
    from trainer.perf import presets

    table = presets()
    cases = [(args.model, args.frames, args.height, args.width)] if args.model else TABLE
    n = args.context_parallel
    print(f"LoRA rank {args.rank} on `{args.targets}`, batch 1, bf16; activations: what autograd saves\n")
    print(
        f"| model | clip | video tokens | base weights | activations | with gradient checkpointing | "
        f"checkpointed, per process at CP {n} |"
    )
    print("|---|---|---|---|---|---|---|")
    for model, frames, height, width in cases:
        r = measure(table[model], frames, height, width, args.targets, args.rank)
        s = r["saved"]
        print(
            f"| {model} | {width}×{height}, {frames} frames | {r['tokens']:,} | {size(r['weights'])} | "
            f"{size(s.full)} | {size(s.checkpointed)} | {size(s.checkpointed / n)} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
