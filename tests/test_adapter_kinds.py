"""`lora.kind`: DoRA, LoKr and LoHa through peft's own implementations, trained on the tiny Wan cache, and their files
read by the real clients: diffusers' `load_lora_weights` in a fresh process (DoRA), `vidlora convert` and the ComfyUI
stand-in of tests/comfyui_rules.py (every kind, the whole file). Plain LoRA has the same proofs in test_export_cli.py.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from data.cache import load_entry
from data.media import probe
from tests import comfyui_rules as comfy
from tests.conftest import cli_env, fixed_eval_loss, train_capturing, write_recipe
from tests.training_setup import recipe_text
from trainer import cli
from trainer.checkpoint import finished
from trainer.config import LoraSection, load_recipe
from trainer.export import add_initial_adapter, load_pipeline_adapters
from trainer.models import get_family

pytestmark = pytest.mark.slow
STEPS = 6
KINDS = ("dora", "lokr", "loha")
PEFT_TENSOR = {"dora": "lora_magnitude_vector", "lokr": "lokr_w1", "loha": "hada_w1_a"}

# diffusers' load_lora_weights in a process that imports nothing of vidlora: the file alone must reproduce the run.
DIFFUSERS_CLIENT = """
import sys, torch
from diffusers import WanPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file
model, lora, inputs, out = sys.argv[1:]
pipe = WanPipeline.from_pretrained(model)
pipe.load_lora_weights(lora)
x = load_file(inputs)
with torch.no_grad():
    y = pipe.transformer(hidden_states=x["noisy"], timestep=x["timestep"], encoder_hidden_states=x["text"],
                         return_dict=False)[0]
save_file({"out": y.contiguous()}, out)
"""


@dataclass
class KindRun:
    kind: str
    tmp: Path
    model_dir: Path
    run: Path
    trained: torch.nn.Module
    inputs: dict[str, torch.Tensor]  # a fixed transformer input
    before: float  # fixed-noise loss on a training sample, untrained and trained
    after: float

    def output(self, transformer: torch.nn.Module) -> torch.Tensor:
        x = self.inputs
        with torch.no_grad():
            return transformer(
                hidden_states=x["noisy"], timestep=x["timestep"], encoder_hidden_states=x["text"], return_dict=False
            )[0]


@pytest.fixture(scope="module")
def kind_runs(tmp_path_factory, prepared) -> dict[str, KindRun]:
    """Each kind's run, trained when a test first asks for it."""
    return _Runs(tmp_path_factory, prepared)


class _Runs(dict):
    def __init__(self, tmp_path_factory, prepared) -> None:
        super().__init__()
        self.tmp_path_factory, self.prepared = tmp_path_factory, prepared

    def __missing__(self, kind: str) -> KindRun:
        self[kind] = train_kind(kind, self.tmp_path_factory.mktemp(kind), *self.prepared)
        return self[kind]


def train_kind(kind: str, tmp: Path, model_dir: Path, cache: Path) -> KindRun:
    text = recipe_text(model_dir, cache, tmp / "run", STEPS, learning_rate=1e-2, checkpoint_every=STEPS)
    text = text.replace("[lora]\n", f'[lora]\nkind = "{kind}"\n')
    if kind == "dora":
        text += 'formats = ["diffusers", "comfyui"]\n'  # LoKr/LoHa: comfyui by default (diffusers cannot read them)
    recipe = write_recipe(tmp / "r.toml", text)
    run, trained = train_capturing(recipe)
    family = get_family(load_recipe(recipe).model)
    entry = load_entry(next((cache / "samples").rglob("*.safetensors")))
    prompt = family.collate_text([load_entry(next((cache / "text").glob("*.safetensors")))])
    latents = entry["latents"][None].float()
    after = fixed_eval_loss(family, trained, latents, prompt)
    trained.disable_adapters()  # every kind starts as the identity, so this is the untrained model
    before = fixed_eval_loss(family, trained, latents, prompt)
    trained.enable_adapters()
    noisy = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    inputs = {"noisy": noisy, "timestep": torch.tensor([500.0]), "text": prompt["prompt_embeds"].float()}
    return KindRun(kind, tmp, model_dir, run, trained, inputs, before, after)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_trains_with_peft_own_layers(kind_runs, kind):
    kind_run = kind_runs[kind]
    names = [n for n, p in kind_run.trained.named_parameters() if p.requires_grad]
    prefix = {"dora": ".lora_", "lokr": ".lokr_", "loha": ".hada_"}[kind]
    assert names and all(prefix in n for n in names)
    assert any(PEFT_TENSOR[kind_run.kind] in n for n in names)
    assert kind_run.after < 0.98 * kind_run.before, (kind_run.before, kind_run.after)  # fixed noise: no luck


def base_weights(model_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(the tiny model's weights by ComfyUI's internal names, internal name -> diffusers name)."""
    state = WanTransformer3DModel.from_pretrained(model_dir / "transformer").state_dict()
    internal = comfy.wan_original_weights(2)
    renamed = convert_wan_transformer_to_diffusers({n: torch.tensor([float(i)]) for i, n in enumerate(internal)})
    to_diffusers = {internal[int(v.item())]: k for k, v in renamed.items()}
    return {n: state[to_diffusers[n]] for n in internal if to_diffusers[n] in state}, to_diffusers


def comfyui_output(kind_run: KindRun, lora_file: Path) -> torch.Tensor:
    """The tiny model's output after the ComfyUI stand-in applied every key of `lora_file`."""
    weights, to_diffusers = base_weights(kind_run.model_dir)
    sd = load_file(lora_file)
    patched, not_loaded = comfy.comfyui_patched_weights(sd, comfy.comfyui_lora_key_map("wan", weights), weights)
    assert not_loaded == [] and patched, lora_file.name
    model = WanTransformer3DModel.from_pretrained(kind_run.model_dir / "transformer")
    missing = model.load_state_dict({to_diffusers[k]: v for k, v in patched.items()}, strict=False).unexpected_keys
    assert missing == []
    return kind_run.output(model)


@pytest.mark.parametrize("kind", KINDS)
def test_comfyui_reads_every_key_and_reproduces_the_run(kind_runs, kind):
    kind_run = kind_runs[kind]
    files = [kind_run.run / "run_comfyui.safetensors"]
    if kind_run.kind != "dora":  # `vidlora convert` re-imports and re-writes LoKr/LoHa: comfyui -> kohya -> comfyui
        out = kind_run.tmp / "converted"
        assert cli.main(["convert", str(files[0]), "--to", "kohya", "--out-dir", str(out)]) == 0
        assert (
            cli.main(["convert", str(out / "run_comfyui_kohya.safetensors"), "--to", "comfyui", "--out-dir", str(out)])
            == 0
        )
        files += [out / "run_comfyui_kohya.safetensors", out / "run_comfyui_kohya_comfyui.safetensors"]
    expected = kind_run.output(kind_run.trained)
    for f in files:
        torch.testing.assert_close(comfyui_output(kind_run, f), expected, atol=1e-5, rtol=1e-4, msg=f.name)


def test_dora_loads_in_diffusers_in_a_fresh_process(kind_runs):
    kind_run = kind_runs["dora"]
    inputs, out = kind_run.tmp / "inputs.safetensors", kind_run.tmp / "diffusers_out.safetensors"
    save_file(kind_run.inputs, inputs)
    lora = kind_run.run / "pytorch_lora_weights.safetensors"
    assert "lora_magnitude_vector" in " ".join(load_file(lora))
    cmd = [sys.executable, "-c", DIFFUSERS_CLIENT, str(kind_run.model_dir), str(lora), str(inputs), str(out)]
    subprocess.run(cmd, cwd=kind_run.tmp, env=cli_env(), check=True, capture_output=True, timeout=300)
    got = load_file(out)["out"]
    torch.testing.assert_close(got, kind_run.output(kind_run.trained), atol=1e-5, rtol=1e-4)
    kind_run.trained.disable_adapters()
    assert not torch.allclose(got, kind_run.output(kind_run.trained), atol=1e-4)
    kind_run.trained.enable_adapters()


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_diffusers_export_of_lokr_and_loha_is_refused_by_name(kind_runs, kind, capsys):
    kind_run = kind_runs[kind]
    assert not list(kind_run.run.glob("pytorch_lora_weights*"))
    assert cli.main(["export", str(kind_run.run), "--format", "diffusers", "--out-dir", str(kind_run.tmp / "x")]) == 2
    name = {"lokr": "LoKr", "loha": "LoHa"}[kind]
    assert f"diffusers cannot load {name} adapters" in capsys.readouterr().err
    assert not (kind_run.tmp / "x").exists() or not any((kind_run.tmp / "x").iterdir())


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_lokr_and_loha_runs_finish_and_name_their_model(kind_runs, kind):
    """A finished run is not trained again by `--resume`, and the export header names the hidden size."""
    kind_run = kind_runs[kind]
    assert finished(kind_run.run, STEPS, main=False) and not finished(kind_run.run, STEPS + 1, main=False)
    hidden = WanTransformer3DModel.load_config(kind_run.model_dir / "transformer")
    with safe_open(kind_run.run / "run_comfyui.safetensors", "pt") as f:
        header = f.metadata()
    assert f"(hidden {hidden['num_attention_heads'] * hidden['attention_head_dim']})" in header["variant"], header


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_lokr_and_loha_runs_sample_through_peft(kind_runs, kind):
    """diffusers cannot read them, so `vidlora sample --lora RUN` loads the run's adapter through peft: the
    pipeline's transformer then computes what the trained one does."""
    kind_run = kind_runs[kind]
    family = get_family(load_recipe(kind_run.tmp / "r.toml").model)
    pipe = family.load_pipeline(torch.float32)
    load_pipeline_adapters(family, pipe, kind_run.run)
    torch.testing.assert_close(kind_run.output(pipe.transformer), kind_run.output(kind_run.trained), atol=1e-5, rtol=0)
    if kind == "lokr":  # the command a user runs
        out = kind_run.tmp / "sample.mp4"
        args = ["--prompt", "a cat", "--lora", str(kind_run.run), "--out", str(out), "--steps", "2"]
        assert cli.main(["sample", str(kind_run.tmp / "r.toml"), *args, "--frames", "5", "--height", "32"]) == 0
        assert probe(out).num_frames == 5


@pytest.mark.parametrize("kind", KINDS)
def test_init_from_starts_from_each_kind(kind_runs, kind):
    kind_run = kind_runs[kind]
    recipe = load_recipe(kind_run.tmp / "r.toml")
    family = get_family(recipe.model)
    fresh = family.load_transformer(torch.float32)
    lora = LoraSection(init_from=str(kind_run.run))
    add_initial_adapter(fresh, lora, family)
    assert lora.kind == kind_run.kind
    torch.testing.assert_close(kind_run.output(fresh), kind_run.output(kind_run.trained), atol=1e-5, rtol=1e-4)
