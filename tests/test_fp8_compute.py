"""train.fp8_compute: refused by name without fp8 tensor cores; on such a GPU a LoRA step's loss and gradients stay
close to bf16's (tolerance: fp8 e4m3 keeps 3 mantissa bits, so each product is off by a few percent at worst and the
errors average out over the sums; the loss within 3%, the LoRA gradient's direction within cosine 0.95)."""

from __future__ import annotations

import pytest
import torch

from trainer import perf
from trainer.config import UserError, load_recipe
from trainer.flow_matching import step_generator
from trainer.memory import fp8_compute_problem
from trainer.models.wan import tiny_transformer_config
from trainer.train import build_model, flow_loss

TINY_WAN = perf.ModelPreset("wan", tiny_transformer_config(), text_tokens=7)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal without a GPU")
def test_fp8_compute_is_refused_by_name_on_the_cpu():
    recipe = load_recipe(None, ["train.fp8_compute=tensor"])
    family = perf.bench_family(TINY_WAN, recipe.model)
    with pytest.raises(UserError, match=r"train.fp8_compute = 'tensor': it needs a CUDA GPU .*on the CPU"):
        build_model(recipe, family, torch.float32)


def test_fp8_compute_and_block_offload_are_refused_together_by_name():
    """Checked with the recipe, before any device: the refusal is the same with and without a GPU."""
    with pytest.raises(UserError, match=r"train.fp8_compute and train.block_offload do not combine: the fp8 copies"):
        load_recipe(None, ["train.fp8_compute=row", "train.block_offload=true"])
    assert load_recipe(None, ["train.block_offload=true"]).train.block_offload  # each alone is a recipe


def lora_step(mode: str | bool) -> tuple[float, torch.Tensor, int]:
    """(loss, LoRA gradient, layers in fp8) of one bf16 step of the small preset on the GPU."""
    preset = perf.presets()["small"]
    recipe = load_recipe(None, [f"train.fp8_compute={mode}" if mode else "train.fp8_compute=false"])
    family = perf.bench_family(preset, recipe.model, "cuda")
    torch.manual_seed(0)
    model = build_model(recipe, family, torch.bfloat16)
    transformer = model.experts["transformer"]
    for p in model.parameters():  # a LoRA that has trained (B = 0 at the start would hide the base's error)
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    latent = perf.latent_shape(preset, 9, 128, 128)
    batch = {k: v.cuda() for k, v in perf.random_batch(preset, latent, 2, preset.text_tokens).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = flow_loss(model, batch, recipe, [step_generator(0, 0, j) for j in range(2)])
    loss.backward()
    grad = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    fp8 = sum(1 for m in transformer.modules() if getattr(m, "_fp8", None) is not None)
    return loss.item(), grad, fp8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["tensor", "row"])
def test_fp8_compute_lora_step_matches_bf16(mode):
    if problem := fp8_compute_problem(torch.device("cuda")):
        pytest.skip(problem)
    loss, grad, _ = lora_step(False)
    loss8, grad8, layers = lora_step(mode)
    assert layers > 0  # the blocks' frozen Linears did multiply in fp8
    assert loss8 == pytest.approx(loss, rel=0.03)
    assert torch.nn.functional.cosine_similarity(grad8, grad, dim=0) > 0.95


@pytest.mark.parametrize("rowwise", [False, True], ids=["tensor", "row"])
def test_fp8_linear_is_the_linear_to_fp8_rounding_and_its_input_gradient_exact(rowwise):
    """The fp8 product itself, where this PyTorch runs _scaled_mm on the CPU: the output within fp8 rounding of the
    Linear's, the input gradient the Linear's own (it is computed from the full-precision weight)."""
    from trainer.memory import fp8_linear_forward

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32).requires_grad_(False)
    x = torch.randn(2, 37, 64, requires_grad=True)  # 74 rows: padded to a multiple of 16 and cut back
    try:
        y = fp8_linear_forward(layer, rowwise, x)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"no _scaled_mm on this CPU build: {e}")
    want = layer(x)
    assert y.shape == want.shape and (y - want).norm() / want.norm() < 0.06  # measured 0.036
    (g,) = torch.autograd.grad(y.sum(), x)
    (g_want,) = torch.autograd.grad(want.sum(), x)
    assert torch.allclose(g, g_want, atol=1e-5)
