"""The training side of the cache: reads entries only and knows nothing about model families.

Data order and caption choice are functions of (seed, epoch) alone, never of global RNG state or of
worker processes, so a resumed run sees exactly the batches an uninterrupted run would. With several
processes the sampler cuts global batches (batch_size x processes samples of one shape) and hands each
rank its slice: ranks never see the same sample in a step, and N processes with batch size B see the
same global batches as one process with batch size N x B.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from data.cache import load_entry, read_meta
from data.prepare import load_index
from trainer.config import UserError


def holdout_sources(samples: list[dict[str, Any]], n: int) -> set[str]:
    """The source clips held out for validation: the first n by a hash of their path (stable per cache,
    independent of seeds), so every run on a cache holds out the same clips."""
    sources = sorted({s["source"] for s in samples}, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    return set(sources[:n])


class CachedDataset(Dataset):
    """One item per (sample, repeat); each item is the sample's tensors plus one of its captions' tensors.

    Items are addressed as (index, epoch): the caption drawn for a multi-caption sample depends on both, and so
    does whether the item trains on the empty prompt instead (`caption_dropout`, its share of the items).
    `holdout_clips` moves every sample of that many source clips to `heldout` (for the validation loss).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        seed: int = 0,
        holdout_clips: int = 0,
        caption_dropout: float = 0.0,
        mask_weights: dict[str, float] | None = None,
        regularisation: dict[str, float] | None = None,
    ):
        self.root = Path(cache_dir)
        index = load_index(self.root)
        self.family = index["family"]
        samples = index["samples"]
        held = holdout_sources(samples, holdout_clips) if holdout_clips else set()
        self.heldout = [s for s in samples if s["source"] in held]
        self.entries = [s for s in samples if s["source"] not in held for _ in range(s["repeats"])]
        if not self.entries:
            why = f" after holding out {holdout_clips} clips for validation" if held else ""
            raise ValueError(f"{self.root / 'index.json'}: the cache holds no training samples{why}")
        self.validation_text_ids: list[str] = index.get("validation", [])
        self.validation_negative_id: str | None = index.get("validation_negative")
        self.seed, self.caption_dropout = seed, caption_dropout
        self.mask_weights = mask_weights or {}  # dataset name -> loss weight outside its masks (default 0)
        self.regularisation = regularisation or {}  # regularisation dataset name -> its share of each batch
        if self.regularisation and all(e["dataset"] in self.regularisation for e in self.entries):
            raise UserError(f"{self.root}: the cache holds no training samples besides the regularisation datasets")
        if caption_dropout and any("empty_text_id" not in e for e in self.entries):
            raise UserError(
                f"{self.root}: train.caption_dropout needs the empty prompt's embedding, which this cache lacks: "
                "run `vidlora prepare` with the recipe (it encodes only that)"
            )

    def __len__(self) -> int:
        return len(self.entries)

    def shape_key(self, i: int) -> tuple:
        """Samples batch together only when their latents have the same shape (same bucket and length)."""
        e = self.entries[i]
        return (*e["bucket"], len(e["frames"]))

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        e = self.entries[i]
        caption = random.Random(f"{self.seed}/{epoch}/{i}").choice(e["text_ids"])
        if self.caption_dropout and random.Random(f"{self.seed}/{epoch}/{i}/drop").random() < self.caption_dropout:
            caption = e["empty_text_id"]  # drawn from (seed, epoch, item) only: same on resume and any rank
        return self.load(e, caption)

    def load(self, entry: dict[str, Any], text_id: str) -> dict[str, Any]:
        """A sample's tensors (fp32) with one caption's tensors under "text" and its cache file under "file"."""
        item: dict[str, Any] = {k: v.float() for k, v in load_entry(self.root / entry["file"]).items()}
        if "mask" in item:  # the loss weight: 1 inside the mask, the dataset's mask_weight outside
            outside = self.mask_weights.get(entry["dataset"], 0.0)
            item["mask"] = outside + (1 - outside) * item["mask"]
        if self.regularisation:  # for loss_reg in the metrics
            item["regularisation"] = torch.tensor(entry["dataset"] in self.regularisation)
        item["text"] = self.text(text_id)
        item["file"] = entry["file"]
        return item

    def text(self, text_id: str) -> dict[str, torch.Tensor]:
        return {k: v.float() for k, v in load_entry(self.root / "text" / f"{text_id}.safetensors").items()}

    def caption(self, text_id: str) -> str:
        return (read_meta(self.root / "text" / f"{text_id}.safetensors") or {}).get("caption", text_id)


class BucketBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of same-shape samples, shuffled per epoch from (seed, epoch), sharded over processes.

    Each epoch is a list of global batches of up to batch_size x num_replicas same-shape samples; rank r
    takes slice r of each. A bucket's last global batch may be short: with one process it simply trains
    smaller, with several it is topped up from the start of its (shuffled) bucket to a multiple of the
    process count so every rank gets the same number of samples (as torch's DistributedSampler pads).
    Yields [(index, epoch), ...] so workers need no epoch state.

    Regularisation datasets (`dataset.regularisation`: name -> share) are not part of the epoch: they fill their
    share of the slots of each global batch (over consecutive batches of a bucket when a batch is smaller than one
    over the share), drawn with replacement from their samples of the batch's shape, so every training sample is
    still seen once per epoch and an epoch has more batches.
    """

    def __init__(
        self,
        dataset: CachedDataset,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.groups: dict[tuple, list[int]] = defaultdict(list)
        shares = getattr(dataset, "regularisation", {})
        self.share = sum(shares.values())
        self.regular: dict[tuple, list[tuple[int, float]]] = defaultdict(list)  # shape -> (index, draw weight)
        for i in range(len(dataset)):
            name = dataset.entries[i]["dataset"] if shares else None
            if name in shares:
                self.regular[dataset.shape_key(i)].append((i, shares[name]))
            else:
                self.groups[dataset.shape_key(i)].append(i)
        for pool in self.regular.values():  # each dataset weighs its share, whatever its size
            counts = defaultdict(int)
            for i, _ in pool:
                counts[dataset.entries[i]["dataset"]] += 1
            pool[:] = [(i, w / counts[dataset.entries[i]["dataset"]]) for i, w in pool]
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Start `epoch` at its global batch number `skip` (a resumed run skips what it already trained)."""
        self.epoch, self.skip = epoch, skip

    def global_batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}/{self.epoch}")
        size, world = self.batch_size * self.num_replicas, self.num_replicas
        out = []
        for key in sorted(self.groups):
            idx = list(self.groups[key])
            if self.shuffle:
                rng.shuffle(idx)
            if self.regular.get(key):
                out += self._mixed_batches(idx, self.regular[key], random.Random(f"{self.seed}/{self.epoch}/reg/{key}"))
                continue
            for start in range(0, len(idx), size):
                batch = idx[start : start + size]
                short = -len(batch) % world
                out.append(batch + [idx[k % len(idx)] for k in range(short)])
        if self.shuffle:
            rng.shuffle(out)
        return out

    def _mixed_batches(self, idx: list[int], pool: list[tuple[int, float]], rng: random.Random) -> list[list[int]]:
        """One bucket's global batches with regularisation samples in `floor((b+1) s G) - floor(b s G)` slots of
        batch b (share s, global batch G): exactly the share over the bucket, as evenly as the batch size allows."""
        size, out, taken = self.batch_size * self.num_replicas, [], 0
        indices, weights = [i for i, _ in pool], [w for _, w in pool]
        while taken < len(idx):
            b = len(out)
            k = math.floor((b + 1) * self.share * size) - math.floor(b * self.share * size)
            batch = idx[taken : taken + size - k]
            taken += len(batch)
            batch += rng.choices(indices, weights, k=k)
            batch += [idx[j % len(idx)] for j in range(-len(batch) % self.num_replicas)]
            out.append(batch)
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.global_batches()[self.skip :]:
            per_rank = len(batch) // self.num_replicas
            yield [(i, self.epoch) for i in batch[self.rank * per_rank : (self.rank + 1) * per_rank]]

    def __len__(self) -> int:
        if self.regular:
            return len(self.global_batches()) - self.skip
        size = self.batch_size * self.num_replicas
        return sum(-(-len(g) // size) for g in self.groups.values()) - self.skip


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack sample tensors; cached text tensors and file names stay lists. A sample without a loss mask in a batch
    with masked ones counts everywhere (weight 1)."""
    if any("mask" in it for it in items):
        items = [it if "mask" in it else {**it, "mask": torch.ones_like(it["latents"][:1])} for it in items]
    batch: dict[str, Any] = {k: torch.stack([it[k] for it in items]) for k in items[0] if k not in ("text", "file")}
    batch["text"] = [it["text"] for it in items]
    batch["files"] = [it["file"] for it in items]
    return batch
