"""The training side of the cache: reads entries only and knows nothing about model families.

Data order and caption choice are functions of (seed, epoch) alone, never of global RNG state, so a
resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from data.cache import load_entry
from data.prepare import load_index


class CachedDataset(Dataset):
    """One item per (sample, repeat); each item is the sample's tensors plus one of its captions' tensors."""

    def __init__(self, cache_dir: str | Path, seed: int = 0):
        self.root = Path(cache_dir)
        index = load_index(self.root)
        self.family = index["family"]
        self.entries = [s for s in index["samples"] for _ in range(s["repeats"])]
        if not self.entries:
            raise ValueError(f"{self.root / 'index.json'}: the cache holds no samples")
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def shape_key(self, i: int) -> tuple:
        """Samples batch together only when their latents have the same shape (same bucket and length)."""
        e = self.entries[i]
        return (*e["bucket"], len(e["frames"]))

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.entries[i]
        item: dict[str, Any] = {k: v.float() for k, v in load_entry(self.root / e["file"]).items()}
        caption = random.Random(f"{self.seed}/{self.epoch}/{i}").choice(e["text_ids"])
        item["text"] = {k: v.float() for k, v in load_entry(self.root / "text" / f"{caption}.safetensors").items()}
        return item

    def text(self, text_ids: list[str]) -> list[dict[str, torch.Tensor]]:
        return [
            {k: v.float() for k, v in load_entry(self.root / "text" / f"{t}.safetensors").items()} for t in text_ids
        ]


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of same-shape samples, shuffled per epoch from (seed, epoch); a small bucket still trains
    (its last batch is simply smaller) instead of being dropped."""

    def __init__(self, dataset: CachedDataset, batch_size: int, seed: int, shuffle: bool = True):
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.groups: dict[tuple, list[int]] = defaultdict(list)
        for i in range(len(dataset)):
            self.groups[dataset.shape_key(i)].append(i)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}/{self.epoch}")
        out = []
        for key in sorted(self.groups):
            idx = list(self.groups[key])
            if self.shuffle:
                rng.shuffle(idx)
            out += [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        if self.shuffle:
            rng.shuffle(out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return sum(-(-len(g) // self.batch_size) for g in self.groups.values())


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack sample tensors; cached text tensors stay a list for the family's `collate_text`."""
    batch: dict[str, Any] = {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "text"}
    batch["text"] = [it["text"] for it in items]
    return batch
