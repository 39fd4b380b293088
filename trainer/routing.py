"""Token routing (TREAD) for training: a share of each sample's video tokens skips a span of middle blocks.

Per sample, a random subset of the video tokens (drawn from the sample's own generator, after its noise, timestep and
conditions, so it depends on (seed, micro-step, slot) only) goes through the span with its RoPE and per-token timestep
inputs; the other tokens skip it and are put back in place after the span's last block. The blocks run as they are:
forward pre-hooks cut their per-token inputs to the routed tokens (what each input is, the family says through
`ModelFamily.route_block_args`; the token sequence is a block's first argument) and a hook on the span's last block
scatters its output back into the full sequence (`ModelFamily.route_block_output`: where the output holds it).
So gradient checkpointing (diffusers' hook calls the block, hooks included), compile and the LoRA see ordinary blocks.
Training only: validation, samples and exports call the transformer without routed tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainer.config import UserError

if TYPE_CHECKING:
    from trainer.models.base import ModelFamily

ROUTED = "routed_tokens"  # batch key: [B, k] sorted indices of the video tokens that go through the span


def routed_count(tokens: int, share: float) -> int:
    """Tokens that go through the span when `share` of `tokens` are routed around it (at least one)."""
    return max(1, tokens - round(tokens * share))


def span_of(n_blocks: int, blocks: tuple[int, int], what: str = "train.token_routing_blocks") -> range:
    """The block indices of the span [start, stop) (Python slice semantics); refused when it is empty."""
    span = range(n_blocks)[slice(*blocks)]
    if not span:
        raise UserError(
            f"{what} = {list(blocks)}: no block of the transformer's {n_blocks} falls in that span "
            "(a [start, stop) slice, negative counts from the end)"
        )
    return span


def draw_routed(tokens: int, share: float, generators: list[torch.Generator]) -> torch.Tensor:
    """[B, k]: per sample, the sorted indices of the tokens that go through the span, drawn from its generator."""
    k = routed_count(tokens, share)
    return torch.stack([torch.randperm(tokens, generator=g)[:k].sort().values for g in generators])


def pick(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The routed tokens of a per-token tensor [B or 1, N, ...] (token dimension 1): [B, k, ...]."""
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None]
    return tensor.expand(keep.shape[0], *tensor.shape[1:])[rows, keep.to(tensor.device)]


class TokenRouter:
    """Hooks on the span of one transformer that route the tokens `keep` holds; installed once, so gradient
    checkpointing's recompute in backward (after the forward has returned) routes the same tokens. Inactive without
    `keep` and without autograd (validation videos and samples run under no_grad)."""

    def __init__(self, family: ModelFamily, transformer: nn.Module, blocks: tuple[int, int]):
        chain = family.routed_blocks(transformer)
        self.family = family
        self.span = [chain[i] for i in span_of(len(chain), blocks)]
        family.route_span(self.span)
        self.keep: torch.Tensor | None = None  # set per forward by `Denoisers`
        self.full: torch.Tensor | None = None  # the sequence entering the span, to put the routed tokens back into
        for block in self.span:
            block.register_forward_pre_hook(self.enter)
        self.span[-1].register_forward_hook(self.leave)

    def active(self) -> bool:
        return self.keep is not None and torch.is_grad_enabled()

    def enter(self, module: nn.Module, args: tuple) -> tuple | None:
        if not self.active():
            return None
        hidden, *rest = args
        if module is self.span[0]:
            self.full, hidden = hidden, pick(hidden, self.keep)
        return (hidden, *self.family.route_block_args(tuple(rest), lambda t: pick(t, self.keep)))

    def leave(self, module: nn.Module, args: tuple, out: Any) -> Any:
        if not self.active():
            return None
        return self.family.route_block_output(out, self.put_back)

    def put_back(self, routed: torch.Tensor) -> torch.Tensor:
        """The full sequence entering the span with the routed tokens replaced by `routed` [B, k, ...]."""
        rows = torch.arange(self.keep.shape[0], device=routed.device)[:, None]
        return self.full.index_put((rows, self.keep.to(routed.device)), routed.to(self.full.dtype))
