"""Training-data options on real prepared caches of the tiny Wan model: caption dropout, masked loss and
regularisation datasets. Exact resume and 1-vs-2-process equality of caption dropout are proven by the runs of
tests/test_resume.py and tests/test_multiprocess.py, which train with it on."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data import media, synth
from data.cache import load_entry, read_meta
from data.dataset import BucketBatchSampler, CachedDataset
from data.discover import discover
from tests.conftest import run_cli, train_capturing, write_recipe
from tests.training_setup import CAPTIONS, recipe_text
from trainer.config import UserError, load_recipe
from trainer.flow_matching import step_generator
from trainer.models import get_family
from trainer.train import build_model, collate_batch, flow_loss


@pytest.mark.slow
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


@pytest.fixture(scope="module")
def masked(tmp_path_factory, tiny_wan):
    """(recipe, cache) of five 9-frame clips: clip0 with a still mask (left half white), clip4 with a video mask (its
    first 5 frames white, then black), clip3 with none, clip1/clip2 with masks of the wrong size / length; and a
    regularisation dataset of two clips with half of each batch (batch size 3)."""
    root = tmp_path_factory.mktemp("masked")
    clips = root / "clips"
    for i in range(5):
        media.write_video(clips / f"clip{i}.mp4", synth.pattern_frames(9, 64, 64, seed=i))
        (clips / f"clip{i}.txt").write_text(CAPTIONS[i % 4] + "\n", encoding="utf-8")
    left = np.zeros((64, 64, 3), np.uint8)
    left[:, :32] = 255
    media.write_image(clips / "clip0.mask.png", left)
    media.write_video(clips / "clip1.mask.mp4", np.full((9, 32, 32, 3), 255, np.uint8))
    media.write_video(clips / "clip2.mask.mp4", np.full((5, 64, 64, 3), 255, np.uint8))
    early = np.zeros((9, 64, 64, 3), np.uint8)
    early[:5] = 255
    media.write_video(clips / "clip4.mask.mp4", early)
    for i in range(2):
        media.write_video(root / f"reg/reg{i}.mp4", synth.pattern_frames(9, 64, 64, seed=10 + i))
        (root / f"reg/reg{i}.txt").write_text("a ball\n", encoding="utf-8")
    text = recipe_text(tiny_wan, root / "cache", root / "run", 2, batch_size=3)
    regular = f'[[data.datasets]]\npath = "{root / "reg"}"\nresolutions = [64]\ntarget_frames = [9]\n'
    text = text.replace("[lora]", regular + 'role = "regularisation"\nshare = 0.5\n[lora]')
    recipe = write_recipe(root / "r.toml", text)
    run_cli("prepare", recipe)
    return recipe, root / "cache"


@pytest.mark.slow
def test_masks_are_windowed_cached_on_the_latent_grid_and_mismatches_reported(masked):
    recipe, cache = masked
    rows = {Path(r["path"]).name: r for r in json.loads((cache / "report.json").read_text())["inputs"]}
    assert rows["clip1.mp4"]["status"] == rows["clip2.mp4"]["status"] == "failed"
    assert rows["clip1.mp4"]["reason"] == f"mask {cache.parent / 'clips/clip1.mask.mp4'} is 32x32, the clip 64x64"
    assert rows["clip2.mp4"]["reason"] == f"mask {cache.parent / 'clips/clip2.mask.mp4'} has 5 frames, the clip 9"
    assert rows["clip3.mp4"]["status"] == "ok" and rows["clip3.mp4"]["mask_missing"]
    assert rows["clip0.mp4"]["mask"].endswith("clip0.mask.png") and "clip0.mask.png" not in rows  # not a clip
    index = json.loads((cache / "index.json").read_text())["samples"]
    samples = {Path(s["source"]).name: s for s in index if s["dataset"] == "clips"}
    assert sorted(samples) == ["clip0.mp4", "clip3.mp4", "clip4.mp4"]
    assert "mask" not in load_entry(cache / samples["clip3.mp4"]["file"])
    still = load_entry(cache / samples["clip0.mp4"]["file"])["mask"]
    assert still.shape == (1, 3, 8, 8)  # the latents' grid: 9 frames -> 3, 64 px -> 8
    assert torch.equal(still[..., :4], torch.ones(1, 3, 8, 4)) and torch.equal(still[..., 4:], torch.zeros(1, 3, 8, 4))
    video = load_entry(cache / samples["clip4.mp4"]["file"])["mask"][0].mean((1, 2))
    assert video.tolist() == pytest.approx([1, 1, 0], abs=0.02)  # frame 0 | frames 1-4 | frames 5-8


@pytest.mark.slow
def test_a_zero_mask_gives_zero_gradient_from_its_region(masked):
    """The real loss of the loop on the tiny Wan with a LoRA: the gradient reaching the prediction is exactly zero
    where the mask is zero (mask_weight 0) and not elsewhere; with mask_weight 0.5 the region counts again."""
    recipe, cache = masked
    recipe = load_recipe(recipe)
    family = get_family(recipe.model)
    model = build_model(recipe, family, torch.float32)
    grads = []

    def keep_pred_grad(module, args, pred):
        pred.register_hook(grads.append)  # d loss / d prediction

    model.register_forward_hook(keep_pred_grad)
    names = {Path(e["source"]).name: i for i, e in enumerate(CachedDataset(cache).entries)}

    def grad(clip, outside=0.0):
        data = CachedDataset(cache, mask_weights={"clips": outside})
        batch = collate_batch(family, [data[names[clip]]])
        model.zero_grad()
        flow_loss(model, batch, recipe, [step_generator(0, 0, 0)]).backward()
        return grads.pop()[0].abs()

    g = grad("clip0.mp4")
    assert torch.all(g[..., 4:] == 0) and torch.all(g[..., :4].flatten(1).amax(1) > 0)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert torch.all(grad("clip0.mp4", outside=0.5)[..., 4:].flatten(1).amax(1) > 0)
    g = grad("clip4.mp4")
    assert torch.all(g[:, 2] < 1e-3 * g[:, :2].max()) and g[:, :2].amax() > 0  # the black frames: next to nothing
    assert torch.all(grad("clip3.mp4").flatten(1).amax(1) > 0)  # no mask: everything counts


@pytest.mark.slow
def test_masked_unmasked_and_regularisation_samples_train_together(masked, capsys):
    """Batch size 3 with half of each batch regularisation: batch 0 has 2 training samples and 1 regularisation
    sample, batch 1 the last training sample and 2 regularisation ones; clip3 (no mask) trains with masked clips."""
    recipe, cache = masked
    data = CachedDataset(cache, regularisation={"reg": 0.5})
    sampler = BucketBatchSampler(data, 3, seed=42)
    batches = [[data.entries[i]["dataset"] for i in b] for b in sampler.global_batches()]
    assert sorted(map(sorted, batches)) == [["clips", "clips", "reg"], ["clips", "reg", "reg"]]
    run, _ = train_capturing(recipe)
    assert "  reg       reg: 2 samples, 0.5 of each batch; logged as loss_reg" in capsys.readouterr().out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["loss_reg"]) for r in rows)


class Shapes:
    """A dataset of only what the sampler reads: shapes and which dataset each sample is from."""

    def __init__(self, datasets, regularisation):
        self.entries = [{"dataset": d, "shape": s} for d, s in datasets]
        self.regularisation = regularisation

    def __len__(self):
        return len(self.entries)

    def shape_key(self, i):
        return self.entries[i]["shape"]


def test_regularisation_fills_its_share_of_every_batch_on_any_number_of_processes():
    a, b = (64, 64, 9), (32, 64, 9)
    data = Shapes([("train", a)] * 10 + [("train", b)] * 3 + [("reg", a)] * 4 + [("people", a)] * 2, {})
    data.regularisation = {"reg": 0.25, "people": 0.25}
    one = BucketBatchSampler(data, 4, seed=1)
    ranks = [BucketBatchSampler(data, 2, seed=1, num_replicas=2, rank=r) for r in range(2)]
    for epoch in range(3):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        batches = one.global_batches()
        trained = [i for batch in batches for i in batch if data.entries[i]["dataset"] == "train"]
        assert sorted(trained) == list(range(13))  # every training sample once per epoch
        for batch in batches:
            kinds = [data.entries[i]["dataset"] for i in batch]
            assert len({data.shape_key(i) for i in batch}) == 1
            if data.shape_key(batch[0]) == a and len(batch) == 4:
                assert kinds.count("train") == 2  # half of the batch: the two shares together
            if data.shape_key(batch[0]) == b:
                assert kinds == ["train"] * len(batch)  # no regularisation sample of that shape
        # N processes with batch size B see what one process with N x B sees (short tails are padded for 2 ranks)
        for x, y, batch in zip(*[list(r) for r in ranks], batches):
            assert [i for i, _ in x + y] == batch or len(batch) < 4
    assert len(one) == len(one.global_batches())


def test_masks_are_found_next_to_clips_or_in_a_metadata_column_and_are_not_clips(tmp_path):
    frames = synth.pattern_frames(5, 32, 32)
    white = np.full((32, 32, 3), 255, np.uint8)
    for name in ("a", "b", "c"):
        media.write_video(tmp_path / f"{name}.mp4", frames)
        (tmp_path / f"{name}.txt").write_text(f"clip {name}\n", encoding="utf-8")
    media.write_image(tmp_path / "a.mask.png", white)
    media.write_image(tmp_path / "a.mask.jpg", white)  # a second mask for a: reported, not used
    media.write_image(tmp_path / "ghost.mask.png", white)  # no clip named ghost
    media.write_image(tmp_path / "masks/for_b.png", white)
    (tmp_path / "list.jsonl").write_text(json.dumps({"path": "b.mp4", "caption": "b", "mask": "masks/for_b.png"}))
    found = discover(tmp_path)
    items = {Path(i.path).name: i for i in found.items}
    assert sorted(items) == ["a.mp4", "b.mp4", "c.mp4"]  # no mask is a clip (and none needs a caption)
    assert Path(items["a.mp4"].mask).name == "a.mask.jpg" and items["c.mp4"].mask is None
    assert items["b.mp4"].mask == str(tmp_path / "masks/for_b.png") and items["b.mp4"].extra == {}
    skipped = {Path(s.path).name: s.reason for s in found.skipped}
    assert skipped["ghost.mask.png"] == "mask file, but no media file named ghost.* is used"
    assert skipped["a.mask.png"].startswith("another mask for a.*")
