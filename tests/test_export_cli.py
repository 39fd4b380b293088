"""`vidlora export / convert / merge` and `lora.init_from` on a real tiny Wan training run.

The real client is diffusers: files the CLI writes are loaded with `WanPipeline.load_lora_weights` into a fresh
pipeline (no code of ours on the loading side) and must reproduce the trained transformer. ComfyUI is stood in for by
the key map re-derived in tests/comfyui_rules.py. HunyuanVideo is not a trainable family on this branch yet: its
adapters go through the same commands from a canonical adapter file of a tiny HunyuanVideoTransformer3DModel with a
random LoRA (built as in tests/test_formats.py).

Headline commands run as a user runs them (a subprocess); the rest call the same `trainer.cli.main` in-process.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel, WanPipeline, WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from data import media, synth
from data.cache import load_entry
from tests import comfyui_rules as comfy
from tests.conftest import run_cli, train_capturing, write_recipe
from tests.test_formats import (
    HV_TARGETS_TINY,
    Trained,
    comfy_key_map,
    hunyuan_inputs,
    hunyuan_pipeline,
    tiny_hunyuan,
    to_diffusers_layout,
)
from trainer import cli
from trainer import train as train_module
from trainer.config import LoraSection, UserError, load_recipe
from trainer.export import add_initial_adapter, merge_into_folder
from trainer.formats import FORMATS, alphas_from_model, import_lora, load_lora, merge_lora, save_lora
from trainer.models import get_family

pytestmark = pytest.mark.slow
STEPS = 4


def recipe_text(tmp: Path, model: Path, clips: Path, run: str, lora: str, steps: int = STEPS) -> str:
    return f"""
[model]
path = "{model}"
[data]
cache_dir = "{tmp / "cache"}"
cache_dtype = "fp32"
decode_workers = 0
[[data.datasets]]
path = "{clips}"
resolutions = [64]
target_frames = [9]
trigger = "sks"
[lora]
{lora}
[train]
output_dir = "{tmp / run}"
max_steps = {steps}
learning_rate = 5e-3
checkpoint_every = 2
dataloader_workers = 0
[logging]
wandb = false
[export]
dtype = "fp32"
formats = ["comfyui", "kohya"]
"""


@dataclass
class WanRun:
    tmp: Path
    model_dir: Path
    clips: Path
    run: Path
    model: torch.nn.Module  # the trained transformer itself (peft-wrapped)
    inputs: tuple  # (noisy, sigmas, text batch)
    expected: torch.Tensor  # the trained transformer's output on `inputs`

    def predict(self, transformer) -> torch.Tensor:
        with torch.no_grad():
            return get_family(load_recipe(self.tmp / "a.toml").model).predict(transformer, *self.inputs)


@pytest.fixture(scope="module")
def wan_run(tmp_path_factory, tiny_wan) -> WanRun:
    tmp = tmp_path_factory.mktemp("export_cli")
    clips = tmp / "clips"
    media.write_video(clips / "clip.mp4", synth.pattern_frames(9, 64, 64, seed=3))
    (clips / "clip.txt").write_text("a red car drives through a city street at night\n", encoding="utf-8")
    recipe = write_recipe(tmp / "a.toml", recipe_text(tmp, tiny_wan, clips, "run", "rank = 4\nalpha = 8"))
    run_cli("prepare", recipe)
    run, model = train_capturing(recipe)
    family = get_family(load_recipe(recipe).model)
    text = family.collate_text([load_entry(next((tmp / "cache/text").glob("*.safetensors")))])
    noisy = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    inputs = (noisy, torch.tensor([0.5]), text)
    with torch.no_grad():
        expected = family.predict(model, *inputs)
    return WanRun(tmp, tiny_wan, clips, run, model, inputs, expected)


@pytest.fixture(scope="module")
def exports(wan_run) -> dict[str, Path]:
    out = wan_run.tmp / "exports"
    proc = run_cli("export", wan_run.run, "--format", "all", "--out-dir", out, "--dtype", "fp32")
    files = {fmt: out / f"run_{fmt}.safetensors" for fmt in FORMATS}
    for fmt, path in files.items():
        assert f"{fmt}: {path}" in proc.stdout
    assert "note: per-module .alpha present" in proc.stdout  # the readers' notes are printed
    return files


def header(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def fresh_pipeline(wan_run: WanRun) -> WanPipeline:
    return WanPipeline.from_pretrained(wan_run.model_dir)


# ---------------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_run_exports_load_in_diffusers(wan_run, exports, fmt):
    pipe = fresh_pipeline(wan_run)
    pipe.load_lora_weights(str(exports[fmt]))
    torch.testing.assert_close(wan_run.predict(pipe.transformer), wan_run.expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(wan_run.predict(fresh_pipeline(wan_run).transformer), wan_run.expected, atol=1e-4)


def test_exports_carry_their_metadata(wan_run, exports):
    storage = {
        "diffusers": "baked into lora_A (read as alpha = rank)",
        "comfyui": "per-module .alpha tensors",  # every module of the default targets is a block module
        "kohya": "per-module .alpha tensors",
    }
    for fmt, path in exports.items():
        meta = header(path)
        assert meta["family"] == "wan" and meta["variant"] == "wan (hidden 24)" and meta["export_format"] == fmt
        assert meta["base_model"] == str(wan_run.model_dir) and meta["steps"] == str(STEPS)
        assert json.loads(meta["rank"]) == 4 and json.loads(meta["alpha"]) == 8
        assert json.loads(meta["trigger_words"]) == ["sks"] and "[train]" in meta["recipe"]
        assert "blocks.N.attn1.to_q" in json.loads(meta["targets"]) and json.loads(meta["lora_modules"]) == 20
        assert meta["alpha_storage"] == storage[fmt] and meta["dtype"] == "fp32" and meta["format"] == "pt"
        assert "lora_adapter_metadata" not in meta  # diffusers would apply that alpha on top of the baked one


def test_run_exports_land_whole_in_comfyui(wan_run, exports):
    """Every key of the comfyui and kohya exports lands on a weight ComfyUI has, with the trained update."""
    key_map = comfy.comfyui_lora_key_map("wan", comfy.wan_original_weights(2))
    peft_sd, alphas = get_peft_model_state_dict(wan_run.model), alphas_from_model(wan_run.model)
    want = {
        f"{m}.weight": peft_sd[f"{m}.lora_B.weight"] @ peft_sd[f"{m}.lora_A.weight"] * (a / 4)
        for m, a in alphas.items()
    }
    for fmt in ("comfyui", "kohya"):
        patches, not_loaded = comfy.comfyui_patches(load_lora(exports[fmt])[0], key_map)
        assert not_loaded == [] and all(len(p) == 1 for p in patches.values())
        got = convert_wan_transformer_to_diffusers({k: p[0] for k, p in patches.items()})
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=k)


def test_export_of_a_checkpoint_uses_the_recipe_defaults(wan_run, capsys):
    """No --format / --out-dir / --dtype: the run's export.formats and dtype, files in the run folder."""
    assert cli.main(["export", str(wan_run.run / "checkpoints" / "step-000002")]) == 0
    out = capsys.readouterr().out
    for fmt in ("comfyui", "kohya"):
        path = wan_run.run / f"run-step-000002_{fmt}.safetensors"
        assert f"{fmt}: {path}" in out
        meta = header(path)
        assert meta["steps"] == "2" and meta["dtype"] == "fp32" and meta["export_format"] == fmt
    assert not (wan_run.run / "run-step-000002_diffusers.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------------------------------


def bakes(fmt: str) -> bool:
    return fmt == "diffusers"  # for Wan only the diffusers layout bakes alpha/rank into lora_A


def products(path: Path) -> dict[str, torch.Tensor]:
    peft_sd, alphas, _ = import_lora(load_lora(path)[0])
    return {m: peft_sd[f"{m}.lora_B.weight"] @ peft_sd[f"{m}.lora_A.weight"] * (a / 4) for m, a in alphas.items()}


def test_convert_round_trips_are_lossless(wan_run, exports, capsys):
    """A -> B -> A through the CLI for every pair: the same file, tensor for tensor (through the diffusers layout,
    which bakes alpha, the same update)."""
    one, two = wan_run.tmp / "convert1", wan_run.tmp / "convert2"
    assert cli.main(["convert", *map(str, exports.values()), "--to", "all", "--out-dir", str(one)]) == 0
    firsts = [one / f"run_{a}_{b}.safetensors" for a in FORMATS for b in FORMATS if a != b]
    assert cli.main(["convert", *map(str, firsts), "--to", "all", "--out-dir", str(two)]) == 0
    out = capsys.readouterr().out
    assert "(wan, from comfyui" in out and "(wan, from kohya" in out and "(wan, from diffusers" in out
    for a in FORMATS:
        original = load_lora(exports[a])[0]
        for b in FORMATS:
            if a == b:
                continue
            back = load_lora(two / f"run_{a}_{b}_{a}.safetensors")[0]
            assert back.keys() == original.keys(), (a, b)
            if bakes(b) and not bakes(a):
                got, want = products(two / f"run_{a}_{b}_{a}.safetensors"), products(exports[a])
                assert all(torch.allclose(got[m], want[m], atol=1e-7, rtol=1e-5) for m in want), (a, b)
            else:
                assert all(torch.equal(back[k], original[k]) for k in original), (a, b)
    meta = header(two / "run_kohya_comfyui_kohya.safetensors")
    assert meta["source_format"] == "comfyui" and meta["steps"] == str(STEPS) and "[train]" in meta["recipe"]


def test_convert_says_when_unsure_and_family_settles_it(wan_run, tmp_path, capsys):
    """A file with only `proj_out` keys fits Wan and HunyuanVideo alike: convert says so; --family settles it."""
    g = torch.Generator().manual_seed(0)
    sd = {"transformer.proj_out.lora_A.weight": torch.randn(2, 24, generator=g)}
    sd["transformer.proj_out.lora_B.weight"] = torch.randn(64, 2, generator=g)
    src = tmp_path / "other_tool.safetensors"
    save_file(sd, str(src), metadata={"ss_network_dim": "2"})
    out = tmp_path / "wan_head.safetensors"
    assert cli.main(["convert", str(src), "--to", "comfyui", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ambiguous model family" in err and "--family" in err and not out.exists()
    assert cli.main(["convert", str(src), "--to", "all", "--out-dir", str(tmp_path), "--family", "wan"]) == 0
    printed = capsys.readouterr().out
    assert "note: no block keys: diffusers' Wan converter fails" in printed  # a reader quirk, said up front
    meta = header(tmp_path / "other_tool_comfyui.safetensors")
    assert meta["family"] == "wan" and meta["source_format"] == "diffusers" and meta["rank"] == "2"
    assert json.loads(meta["source_metadata"]) == {"ss_network_dim": 2}
    patches, not_loaded = comfy.comfyui_patches(
        load_lora(tmp_path / "other_tool_comfyui.safetensors")[0],
        comfy.comfyui_lora_key_map("wan", comfy.wan_original_weights(2)),
    )
    assert not_loaded == [] and list(patches) == ["head.head.weight"]
    want = sd["transformer.proj_out.lora_B.weight"] @ sd["transformer.proj_out.lora_A.weight"]
    torch.testing.assert_close(patches["head.head.weight"][0], want)


# ---------------------------------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------------------------------


def test_refuses_nan_and_unknown_keys_naming_them(wan_run, exports, tmp_path, capsys):
    good = load_lora(exports["comfyui"])[0]
    nan_key = "diffusion_model.blocks.1.ffn.2.lora_B.weight"
    nan = {**good, nan_key: good[nan_key].clone()}
    nan[nan_key][0, 0] = float("nan")
    save_file(nan, str(tmp_path / "nan.safetensors"))
    proc = run_cli("convert", tmp_path / "nan.safetensors", "--to", "kohya", "--out-dir", tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"vidlora: error: {tmp_path / 'nan.safetensors'}: non-finite" in proc.stderr and nan_key in proc.stderr

    wrong = "diffusion_model.blocks.0.self_attn.qq"
    unknown = {**good, f"{wrong}.lora_A.weight": torch.ones(4, 24), f"{wrong}.lora_B.weight": torch.ones(24, 4)}
    save_file(unknown, str(tmp_path / "unknown.safetensors"))
    assert cli.main(["convert", str(tmp_path / "unknown.safetensors"), "--to", "diffusers"]) == 2
    err = capsys.readouterr().err
    assert "unknown.safetensors" in err and f"{wrong}.lora_A.weight" in err and "do not map" in err

    # a run whose adapter went NaN (written around the check) is refused at export too
    canonical, meta = load_lora(wan_run.run / "adapter.safetensors")
    key = next(k for k in canonical if "lora_B" in k)
    canonical[key] = torch.full_like(canonical[key], float("inf"))
    save_file(canonical, str(tmp_path / "adapter.safetensors"), metadata=meta)
    assert cli.main(["export", str(tmp_path / "adapter.safetensors"), "--format", "comfyui"]) == 2
    assert key in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter.safetensors",
        "nan.safetensors",
        "unknown.safetensors",
    ]


# ---------------------------------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------------------------------


def test_merge_equals_fuse_lora(wan_run, exports, capsys):
    out = wan_run.tmp / "merged"
    run_cli("merge", wan_run.model_dir, exports["kohya"], "--strength", "0.7", "--out", out)
    merged = WanTransformer3DModel.from_pretrained(out)
    pipe = fresh_pipeline(wan_run)
    pipe.load_lora_weights(str(exports["kohya"]))
    pipe.fuse_lora(lora_scale=0.7)
    fused = {k.replace(".base_layer.", "."): v for k, v in pipe.transformer.state_dict().items() if ".lora_" not in k}
    state = merged.state_dict()
    assert state.keys() == fused.keys()
    for k in fused:
        torch.testing.assert_close(state[k], fused[k], atol=1e-6, rtol=1e-5, msg=k)
    torch.testing.assert_close(wan_run.predict(merged), wan_run.predict(pipe.transformer), atol=1e-5, rtol=1e-5)
    # a second merge never writes over a folder
    assert cli.main(["merge", str(wan_run.model_dir), str(wan_run.run), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_merge_at_full_strength_is_the_trained_model(wan_run, capsys):
    out = wan_run.tmp / "merged_run"
    assert cli.main(["merge", str(wan_run.model_dir), str(wan_run.run), "--out", str(out)]) == 0
    merged = WanTransformer3DModel.from_pretrained(out)
    torch.testing.assert_close(wan_run.predict(merged), wan_run.expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# lora.init_from
# ---------------------------------------------------------------------------------------------------------------------


def test_init_from_continues_training(wan_run, exports):
    """Run B starts from run A's kohya export: its first transformer is run A's, and it trains on from there."""
    recipe = write_recipe(
        wan_run.tmp / "b.toml",
        recipe_text(
            wan_run.tmp, wan_run.model_dir, wan_run.clips, "run_b", f'init_from = "{exports["kohya"]}"\nalpha = 4', 2
        ),
    )
    initial = {}
    run_b, model_b = train_capturing(
        recipe, on_build=lambda m: initial.setdefault("out", wan_run.predict(m.experts["transformer"]))
    )
    torch.testing.assert_close(initial["out"], wan_run.expected, atol=1e-5, rtol=1e-5)
    # rank and targets adopted from the file, alpha from the recipe (lora_A rescaled: same update)
    meta = header(run_b / "adapter.safetensors")
    assert json.loads(meta["rank"]) == 4 and json.loads(meta["alpha"]) == 4
    assert meta["target_modules"] == get_family(load_recipe(recipe).model).lora_presets["default"]
    # same seed, same data: step 1 sees the same noise and clip as run A's step 1, now with A's adapter in place
    loss = [json.loads(line)["loss"] for line in (wan_run.run / "metrics.jsonl").read_text().splitlines()]
    loss_b = [json.loads(line)["loss"] for line in (run_b / "metrics.jsonl").read_text().splitlines()]
    assert loss_b[0] < loss[0], (loss, loss_b)
    assert not torch.allclose(wan_run.predict(model_b), wan_run.expected, atol=1e-4)  # it trained on


def test_init_from_refuses_what_does_not_fit(wan_run, exports):
    family = get_family(load_recipe(wan_run.tmp / "a.toml").model)
    for lora, match in (
        (f'init_from = "{exports["comfyui"]}"\nrank = 8', "rank 4 but lora.rank = 8"),
        (f'init_from = "{exports["diffusers"]}"\ntargets = "attention"', "leaves out 4 module.*ffn"),
    ):
        text = recipe_text(wan_run.tmp, wan_run.model_dir, wan_run.clips, "run_x", lora)
        recipe = load_recipe(write_recipe(wan_run.tmp / "x.toml", text))
        with pytest.raises(UserError, match=match):
            train_module.build_model(recipe, family, torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# HunyuanVideo through the same commands (library-built adapter; not yet a trainable family here)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hunyuan(tmp_path_factory) -> tuple[Trained, Path]:
    trained = Trained("hunyuan_video", tiny_hunyuan, HV_TARGETS_TINY, hunyuan_inputs())
    path = tmp_path_factory.mktemp("hunyuan") / "adapter.safetensors"
    meta = {"format": "vidlora", "family": "hunyuan_video", "alphas": trained.alphas, "rank": 4, "alpha": 8.0}
    save_lora(path, trained.peft_sd, {**meta, "base_model": "tiny", "steps": 0})
    return trained, path


def test_hunyuan_exports_load_in_diffusers_and_comfyui(hunyuan, capsys):
    trained, adapter = hunyuan
    out = adapter.parent / "exports"
    args = ["export", str(adapter), "--format", "all", "--out-dir", str(out), "--name", "hunyuan", "--dtype", "fp32"]
    assert cli.main(args) == 0
    assert "note: diffusers has no reader for HunyuanVideo kohya files" in capsys.readouterr().out
    for fmt in ("diffusers", "comfyui"):
        pipe = hunyuan_pipeline(copy.deepcopy(trained.base))
        pipe.load_lora_weights(str(out / f"hunyuan_{fmt}.safetensors"))
        torch.testing.assert_close(trained.run(pipe.transformer), trained.out, atol=1e-5, rtol=0)
    for fmt in ("comfyui", "kohya"):  # every key of the written files lands in the ComfyUI stand-in
        sd = load_lora(out / f"hunyuan_{fmt}.safetensors")[0]
        patches, not_loaded = comfy.comfyui_patches(sd, comfy_key_map(trained))
        assert not_loaded == [] and all(len(p) == 1 for p in patches.values())
        got = to_diffusers_layout("hunyuan_video", trained.base.config, {k: p[0] for k, p in patches.items()})
        want = trained.deltas()
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=k)
        assert header(out / f"hunyuan_{fmt}.safetensors")["variant"] == "hunyuan_video (hidden 20)"


def test_hunyuan_merge_and_init_from(hunyuan, tmp_path):
    trained, adapter = hunyuan
    trained.base.save_pretrained(tmp_path / "base")
    out = tmp_path / "merged"
    assert cli.main(["merge", str(tmp_path / "base"), str(adapter), "--out", str(out)]) == 0
    torch.testing.assert_close(
        trained.run(HunyuanVideoTransformer3DModel.from_pretrained(out)), trained.out, atol=1e-5, rtol=0
    )
    kohya = tmp_path / "hv_kohya.safetensors"
    assert cli.main(["export", str(adapter), "--format", "kohya", "--out", str(kohya), "--dtype", "fp32"]) == 0
    model, lora = copy.deepcopy(trained.base), LoraSection(init_from=str(kohya))
    add_initial_adapter(model, lora, SimpleNamespace(name="hunyuan_video", lora_presets={"default": HV_TARGETS_TINY}))
    torch.testing.assert_close(trained.run(model), trained.out, atol=1e-5, rtol=0)
    assert (lora.rank, lora.alpha, lora.targets) == (4, 8.0, "default")
    # a Wan adapter does not go into a HunyuanVideo transformer
    wan_file = tmp_path / "wan.safetensors"
    save_file(
        {
            "diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.ones(2, 20),
            "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.ones(20, 2),
        },
        str(wan_file),
    )
    with pytest.raises(UserError, match="a wan adapter does not fit .*HunyuanVideoTransformer3DModel"):
        merge_into_folder(tmp_path / "base", wan_file, tmp_path / "m2")
    assert not (tmp_path / "m2").exists()


def test_init_from_keeps_per_module_rank_and_alpha(hunyuan, tmp_path):
    """Ranks and alphas that differ per module are adopted exactly: a top-level `proj_out` of rank 2 must not be
    confused with `single_transformer_blocks.0.proj_out` of rank 4 (peft matches patterns as name suffixes)."""
    trained, _ = hunyuan
    g = torch.Generator().manual_seed(5)
    peft_sd = dict(trained.peft_sd)
    peft_sd["proj_out.lora_A.weight"] = torch.randn(2, 20, generator=g)
    peft_sd["proj_out.lora_B.weight"] = torch.randn(4, 2, generator=g)
    alphas = {**trained.alphas, "proj_out": 3.0}
    path = tmp_path / "mixed.safetensors"
    save_lora(path, peft_sd, {"format": "vidlora", "family": "hunyuan_video", "alphas": alphas, "alpha": 8.0})
    model, lora = copy.deepcopy(trained.base), LoraSection(init_from=str(path))
    config = add_initial_adapter(model, lora, SimpleNamespace(name="hunyuan_video", lora_presets={}))
    assert config.r == 4 and config.rank_pattern == {"^proj_out": 2} and config.alpha_pattern == {"^proj_out": 3.0}
    reference = copy.deepcopy(trained.base)
    reference.load_state_dict(merge_lora(trained.base, peft_sd, alphas))
    # merged weights vs a LoRA forward: fp32 rounding only (outputs ~10, so an absolute 1e-5 is a few ulp)
    torch.testing.assert_close(trained.run(model), trained.run(reference), atol=1e-5, rtol=1e-5)


def test_export_refusal_writes_no_partial_set(hunyuan, tmp_path, capsys):
    """`norm_out.linear` has no safe original layout: --format all writes nothing, not just the diffusers file."""
    trained, _ = hunyuan
    peft_sd = {**trained.peft_sd, "norm_out.linear.lora_A.weight": torch.ones(4, 20)}
    peft_sd["norm_out.linear.lora_B.weight"] = torch.ones(40, 4)
    path = tmp_path / "in" / "adapter.safetensors"
    alphas = {**trained.alphas, "norm_out.linear": 8.0}
    save_lora(path, peft_sd, {"format": "vidlora", "family": "hunyuan_video", "alphas": alphas, "alpha": 8.0})
    assert cli.main(["export", str(path), "--format", "all", "--out-dir", str(tmp_path / "out")]) == 2
    assert f"{path}: norm_out.linear: cannot be written in the original layout" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert cli.main(["export", str(path), "--format", "diffusers", "--out-dir", str(tmp_path / "out")]) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["in_diffusers.safetensors"]
