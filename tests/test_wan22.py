"""Wan 2.2 A14B: two experts trained right by construction (tiny two-expert models, CPU).

- the noise levels: each expert trains only on its side of the model's boundary, drawn from the same shifted
  distribution restricted to that side (its shape kept), and steps go to each expert with its share of it;
- the files: one adapter per expert, in every format, that diffusers' own pipeline loads (the low-noise one with
  `load_into_transformer_2=True`) and that then reproduces each trained expert;
- the run: exact resume after SIGKILL, 2-process DDP equal to one process with the same global batch.
"""

from __future__ import annotations

import json
import signal

import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline

from tests.conftest import run_cli, train_capturing, write_recipe
from tests.training_setup import kill_group, losses, prepare_cache, recipe_text, start_run, train_run, wait_for_step
from trainer.checkpoint import latest_checkpoint, read_adapter
from trainer.config import load_recipe
from trainer.flow_matching import route, sample_sigmas, sigma_mass, unshift_sigmas
from trainer.models import get_family

EXPERTS = ("high_noise", "low_noise")


@pytest.fixture(scope="module")
def prepared22(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan22")
    run_cli("make-tiny", "wan22", root / "model")
    return prepare_cache(root, root / "model", family="wan22")


def make_recipe(tmp, prepared, name, steps=12, experts="both", **train):
    model, cache = prepared
    text = recipe_text(model, cache, tmp / name, steps, family="wan22", **train)
    text = text.replace('family = "wan22"', f'family = "wan22"\nexperts = "{experts}"')
    text = text.replace("[export]", '[export]\nformats = ["diffusers", "comfyui", "kohya"]')
    return write_recipe(tmp / f"{name}.toml", text)


# ---------------------------------------------------------------------------------------------------------------------
# Noise levels
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["logit_normal", "uniform", "sigmoid"])
def test_each_expert_draws_the_restricted_distribution_not_a_clipped_one(method):
    """Drawn in a range, the noise levels follow the full distribution's conditional law there: same quantiles as
    the full draws that fall in the range, none outside it, no mass piled on the boundary."""
    shift, b = 12.0, 0.875
    full = sample_sigmas(200_000, method, shift, torch.Generator().manual_seed(0))
    for low, high in ((b, 1.0), (0.0, b)):
        got = sample_sigmas(50_000, method, shift, torch.Generator().manual_seed(1), sigma_range=(low, high))
        assert got.min() >= low and got.max() < high + 1e-6
        want = full[(full >= low) & (full < high)]
        q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
        assert torch.allclose(got.quantile(q), want.quantile(q), atol=0.01), (low, high)
        assert (got - low).abs().lt(1e-4).float().mean() < 0.01  # not clipped onto the boundary
        assert sigma_mass((low, high), method, shift) == pytest.approx(len(want) / len(full), abs=0.005)


def test_steps_go_to_each_expert_with_its_share():
    masses = [sigma_mass(r, "logit_normal", 12.0) for r in ((0.875, 1.0), (0.0, 0.875))]
    picks = torch.tensor([route(42, step, masses) for step in range(4000)])
    assert (picks == 0).float().mean().item() == pytest.approx(masses[0] / sum(masses), abs=0.025)
    assert [route(42, s, masses) for s in range(50)] == [route(42, s, masses) for s in range(50)]  # no hidden state


class Spy:
    """Which noise levels each expert saw, and at which it received LoRA gradients."""

    def __init__(self):
        self.seen = {c: [] for c in ("transformer", "transformer_2")}
        self.grads = {c: [] for c in ("transformer", "transformer_2")}

    def attach(self, model):
        for component, expert in model.experts.items():
            expert.register_forward_pre_hook(self.forward_hook(component), with_kwargs=True)
            for p in expert.parameters():
                if p.requires_grad:
                    p.register_hook(self.grad_hook(component))

    def forward_hook(self, component):
        def hook(module, args, kwargs):
            self.seen[component].append(kwargs["timestep"].flatten().tolist())

        return hook

    def grad_hook(self, component):
        def hook(grad):
            if grad.abs().sum() > 0:
                self.grads[component].append(self.seen[component][-1])

        return hook


@pytest.mark.slow
def test_each_expert_learns_only_from_its_side_of_the_boundary(prepared22, tmp_path):
    spy = Spy()
    run, model = train_capturing(make_recipe(tmp_path, prepared22, "both", steps=24), on_build=spy.attach)
    boundary = 875.0  # the tiny model's boundary_ratio x 1000, the pipeline's switch
    assert spy.grads["transformer"] and spy.grads["transformer_2"]
    assert all(t >= boundary for ts in spy.grads["transformer"] for t in ts)
    assert all(t < boundary for ts in spy.grads["transformer_2"] for t in ts)
    assert all(t >= boundary for ts in spy.seen["transformer"] for t in ts)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["steps_high_noise"] + rows[-1]["steps_low_noise"] == 24
    assert {"loss_high_noise", "loss_low_noise"} <= set().union(*rows)
    for expert in EXPERTS:  # one adapter per expert, self-describing
        meta = read_adapter(run / f"adapter_{expert}.safetensors")[1]
        assert meta["family"] == "wan22" and meta["expert"] == expert
        assert meta["sigma_range"] == ([0.875, 1.0] if expert == "high_noise" else [0.0, 0.875])


@pytest.mark.slow
def test_one_expert_per_run_loads_and_trains_only_that_expert(prepared22, tmp_path):
    spy = Spy()
    run, transformer = train_capturing(make_recipe(tmp_path, prepared22, "low", steps=6, experts="low"), spy.attach)
    assert spy.seen["transformer"] == [] and len(spy.seen["transformer_2"]) == 6
    times = torch.tensor(spy.seen["transformer_2"]).flatten()
    assert times.max() < 875.0
    assert sorted(p.name for p in run.glob("adapter*.safetensors")) == ["adapter_low_noise.safetensors"]
    assert sorted(p.name for p in run.glob("pytorch_lora_weights*")) == ["pytorch_lora_weights_low_noise.safetensors"]


def test_expert_ranges_come_from_the_model_and_shifts_from_the_official_configs(tmp_path):
    for family, boundary, shift in (("wan22", 0.875, 12.0), ("wan22_i2v", 0.9, 5.0)):
        run_cli("make-tiny", family, tmp_path / family)
        fam = get_family(load_recipe(None, [f"model.family={family}", f"model.path={tmp_path / family}"]).model)
        high, low = fam.denoisers()
        assert (high.component, high.sigmas, low.component, low.sigmas) == (
            "transformer", (boundary, 1.0), "transformer_2", (0.0, boundary)
        )  # fmt: skip
        assert fam.default_shift == shift
        # the boundary in the pipeline's own terms: timestep >= boundary_ratio x 1000 runs `transformer`
        assert unshift_sigmas(torch.tensor(boundary), shift) < boundary


# ---------------------------------------------------------------------------------------------------------------------
# Files in diffusers' own pipeline
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained22(prepared22, tmp_path_factory):
    """A two-expert run that also validates through the two-expert pipeline (videos, loss per expert)."""
    tmp = tmp_path_factory.mktemp("trained22")
    recipe = make_recipe(tmp, prepared22, "run", steps=12)
    validation = "[validation]\nevery = 12\nholdout_clips = 1\nnum_frames = 5\ninference_steps = 2\n"
    recipe = write_recipe(recipe, recipe.read_text() + validation)
    run, model = train_capturing(recipe)
    return prepared22[0], run, model


@pytest.mark.slow
def test_validation_uses_both_experts_and_reports_each(trained22):
    _, run, _ = trained22
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = next(r for r in rows if "val_loss" in r)
    assert {"val_loss_high_noise", "val_loss_low_noise"} <= set(val)  # sigmas 0.1..0.9 fall on both sides
    assert list((run / "validation/step-000012").glob("*.mp4"))


@pytest.mark.slow
def test_report_draws_each_expert(trained22):
    _, run, _ = trained22
    run_cli("report", run, "--thumbnails", "0")
    page = (run / "report.html").read_text(encoding="utf-8")
    charts = {f.split("</figcaption>")[0]: f for f in page.split("<figure><figcaption>")[1:]}
    for expert in EXPERTS:  # a line per expert: training loss, validation loss, steps trained
        assert f">{expert} (smoothed)</text>" in charts["training loss"]
        assert f">{expert}</text>" in charts["validation loss"] and f">{expert}</text>" in charts["steps per expert"]
    assert 'src="validation/step-000012/00-a_yellow_star_spins_slowly.mp4#t=0"' in page


def expert_outputs(transformer, transformer_2, family):
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 16, 3, 8, 8, generator=g)
    batch = {"prompt_embeds": torch.randn(1, 6, 32, generator=g)}
    with torch.no_grad():
        return [
            family.predict(t, noisy, torch.tensor([s]), batch) for t, s in ((transformer, 0.95), (transformer_2, 0.3))
        ]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["diffusers", "comfyui", "kohya"])
def test_expert_files_load_into_both_transformers_of_diffusers_pipeline(trained22, fmt, tmp_path):
    """The real client, as its docs say: load_lora_weights(high); load_lora_weights(low, load_into_transformer_2=True)."""
    model_dir, run, model = trained22
    family = model.family
    out = run_cli("export", run, "--format", fmt, "--out-dir", tmp_path, "--name", "style", "--dtype", "fp32").stdout
    files = {e: tmp_path / f"style_{fmt}_{e}.safetensors" for e in EXPERTS}
    assert all(f.is_file() for f in files.values()), out
    pipe = WanPipeline.from_pretrained(model_dir)
    before = expert_outputs(pipe.transformer, pipe.transformer_2, family)
    pipe.load_lora_weights(str(files["high_noise"]))
    pipe.load_lora_weights(str(files["low_noise"]), load_into_transformer_2=True)
    got = expert_outputs(pipe.transformer, pipe.transformer_2, family)
    want = expert_outputs(model.experts["transformer"], model.experts["transformer_2"], family)
    for g, w, b in zip(got, want, before):
        assert not torch.allclose(w, b, atol=1e-5)  # each expert did learn something
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_pair_converts_merges_and_starts_a_run(trained22, tmp_path):
    model_dir, run, model = trained22
    family = model.family
    run_cli("export", run, "--format", "kohya", "--out-dir", tmp_path, "--name", "k")
    out = run_cli("convert", *sorted(tmp_path.glob("k_kohya_*.safetensors")), "--to", "comfyui", "--out-dir", tmp_path)
    for e in EXPERTS:  # the expert survives a conversion, in the name and the header
        assert read_adapter(tmp_path / f"k_kohya_comfyui_{e}.safetensors")[1]["expert"] == e, out.stdout
    run_cli("merge", model_dir, run, "--out", tmp_path / "merged")
    merged = WanPipeline.from_pretrained(model_dir, transformer=None, transformer_2=None)
    from diffusers import WanTransformer3DModel

    merged_t = [
        WanTransformer3DModel.from_pretrained(tmp_path / "merged" / c) for c in ("transformer", "transformer_2")
    ]
    del merged
    for g, w in zip(
        expert_outputs(*merged_t, family),
        expert_outputs(model.experts["transformer"], model.experts["transformer_2"], family),
    ):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    # lora.init_from takes the pair: each expert starts from its own adapter
    recipe = make_recipe(tmp_path, (model_dir, trained22[1].parent / "cache"), "b", steps=1)
    recipe = write_recipe(recipe, recipe.read_text().replace("[lora]", f'[lora]\ninit_from = "{run}"'))
    from trainer.train import build_model

    loaded = build_model(load_recipe(recipe), family, torch.float32)
    for c in ("transformer", "transformer_2"):
        a = {k: v for k, v in loaded.experts[c].state_dict().items() if "lora" in k}
        b = {k: v for k, v in model.experts[c].state_dict().items() if "lora" in k}
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].float()) for k in a)


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_with_two_experts_then_resume_is_exact(prepared22, tmp_path):
    steps = 16
    ref = make_recipe(tmp_path, prepared22, "ref", steps, checkpoint_every=4, dataloader_workers=2)
    train_run(ref)
    recipe = make_recipe(tmp_path, prepared22, "run", steps, checkpoint_every=4, dataloader_workers=2)
    proc = start_run(recipe)
    wait_for_step(proc, tmp_path / "run", 9)
    kill_group(proc)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert latest_checkpoint(tmp_path / "run/checkpoints") is not None
    train_run(recipe, "one", "--resume")
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")
    for e in EXPERTS:
        a = read_adapter(tmp_path / f"run/adapter_{e}.safetensors")[0]
        b = read_adapter(tmp_path / f"ref/adapter_{e}.safetensors")[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_ddp_with_two_experts_matches_one_process(prepared22, tmp_path):
    from tests.test_multiprocess import assert_lora_close

    one = make_recipe(tmp_path, prepared22, "one", 8, batch_size=2, gradient_accumulation=2)
    two = make_recipe(tmp_path, prepared22, "two", 8, batch_size=1, gradient_accumulation=2)
    train_run(one)
    train_run(two, "ddp")
    got, want = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert got.keys() == want.keys()
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5)
    for e in EXPERTS:
        assert_lora_close(
            read_adapter(tmp_path / f"two/adapter_{e}.safetensors")[0],
            read_adapter(tmp_path / f"one/adapter_{e}.safetensors")[0],
        )


# ---------------------------------------------------------------------------------------------------------------------
# Image-to-video
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_i2v_a14b_trains_and_loads_in_its_pipeline(tmp_path):
    """Wan 2.2 I2V A14B: first-frame conditioning without CLIP tokens, both experts, files that
    WanImageToVideoPipeline loads into each transformer."""
    run_cli("make-tiny", "wan22_i2v", tmp_path / "model")
    model, cache = prepare_cache(tmp_path, tmp_path / "model", family="wan22_i2v")
    text = recipe_text(model, cache, tmp_path / "run", 6, family="wan22_i2v")
    run, trained = train_capturing(write_recipe(tmp_path / "r.toml", text))
    family = trained.family
    entry = next((cache / "samples").rglob("*.safetensors"))
    from data.cache import load_entry

    cached = load_entry(entry)
    assert "condition_latents" in cached and "image_embeds" not in cached
    pipe = WanImageToVideoPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(run / "pytorch_lora_weights_high_noise.safetensors"))
    pipe.load_lora_weights(str(run / "pytorch_lora_weights_low_noise.safetensors"), load_into_transformer_2=True)
    g = torch.Generator().manual_seed(0)
    batch = {"prompt_embeds": torch.randn(1, 6, 32, generator=g), "condition_latents": torch.randn(1, 16, 3, 8, 8)}
    noisy = torch.randn(1, 16, 3, 8, 8, generator=g)
    with torch.no_grad():
        for c, s in (("transformer", 0.95), ("transformer_2", 0.5)):
            got = family.predict(getattr(pipe, c), noisy, torch.tensor([s]), batch)
            torch.testing.assert_close(got, family.predict(trained.experts[c], noisy, torch.tensor([s]), batch))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero2_with_two_experts_moves_only_the_step_expert(prepared22, tmp_path):
    """Under DeepSpeed (which steps every parameter it holds) a step still changes only its expert's LoRA."""
    from tests.test_multiprocess import ZERO2
    from trainer.train import step_denoiser

    recipe = make_recipe(tmp_path, prepared22, "z", 6, batch_size=1, checkpoint_every=1)
    train_run(recipe, ZERO2)
    loaded = load_recipe(recipe)
    family = get_family(loaded.model)
    adapters = {
        s: {e: read_adapter(tmp_path / f"z/checkpoints/step-{s:06d}/adapter_{e}.safetensors")[0] for e in EXPERTS}
        for s in range(1, 7)
    }
    trained = set()
    for s in range(2, 7):
        expert = step_denoiser(loaded, family, s - 1).label  # step s is chosen with s - 1 steps done
        trained.add(expert)
        for e in EXPERTS:
            moved = any(not torch.equal(adapters[s][e][k], adapters[s - 1][e][k]) for k in adapters[s][e])
            assert moved == (e == expert), (s, e, expert)
    assert trained == set(EXPERTS), "6 steps did not visit both experts: pick another seed"
