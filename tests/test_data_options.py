"""Training-data options on real prepared caches of the tiny Wan model: caption dropout, masked loss and
regularisation datasets. Exact resume and 1-vs-2-process equality of caption dropout are proven by the runs of
tests/test_resume.py and tests/test_multiprocess.py, which train with it on."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from data.cache import read_meta
from data.dataset import CachedDataset
from trainer.config import UserError


def test_caption_dropout_draws_a_seeded_share_of_empty_prompts(prepared, tmp_path):
    _, cache = prepared
    items = [(i, epoch) for epoch in range(40) for i in range(4)]

    def dropped(seed):
        data = CachedDataset(cache, seed=seed, caption_dropout=0.25)
        empty = data.entries[0]["empty_text_id"]
        assert read_meta(cache / "text" / f"{empty}.safetensors")["caption"] == ""  # embedded once, at prepare
        out = []
        for key in items:
            text = data[key]["text"]
            own = [data.text(t) for t in data.entries[key[0]]["text_ids"]]
            is_empty = all(torch.equal(v, data.text(empty)[k]) for k, v in text.items())
            assert is_empty or any(all(torch.equal(v, o[k]) for k, v in text.items()) for o in own)
            out.append(is_empty)
        return out

    first = dropped(42)
    assert 0.15 < sum(first) / len(first) < 0.35
    assert dropped(42) == first  # a function of (seed, epoch, item): the same on resume and on every rank
    assert dropped(7) != first

    # a cache prepared without caption dropout has no empty prompt: training says so in one line
    bare = tmp_path / "bare"
    shutil.copytree(cache, bare)
    index = json.loads((bare / "index.json").read_text())
    for s in index["samples"]:
        s.pop("empty_text_id")
    (bare / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"bare: train.caption_dropout needs the empty prompt's embedding.*prepare"):
        CachedDataset(bare, caption_dropout=0.1)
    assert len(CachedDataset(bare)) == 4
