"""Token routing (train.token_routing): the routed span is transparent when every token goes through it, routing 0 is
the model as before, a LoRA trained with routing lowers the full model's loss, FLOPs count what it computes
(tests/test_perf.py), and real runs resume exactly and match across 1 and 2 processes."""

from __future__ import annotations

import signal

import pytest
import torch

from tests.conftest import write_recipe
from tests.test_perf import LATENT, TINY_HV, TINY_HV15, TINY_HV_I2V, TINY_HV_I2V_33, TINY_WAN, losses_after, tiny_model
from tests.training_setup import kill_group, losses, recipe_text, start_run, train_run, wait_for_step
from trainer import perf
from trainer.checkpoint import read_adapter
from trainer.config import RecipeError, UserError
from trainer.flow_matching import step_generator
from trainer.models.hunyuan_video import PerSampleRope
from trainer.models.wan import tiny_transformer_config
from trainer.routing import ROUTED, routed_count
from trainer.train import flow_loss

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_TI2V = perf.ModelPreset("wan22_5b", tiny_transformer_config(in_channels=48, out_channels=48), text_tokens=7)
ROUTE = ["train.token_routing=0.5", "train.token_routing_blocks=[1,2]"]  # the tiny model has 2 blocks


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Graphs compiled by earlier tests (tests/test_perf.py compiles the same tiny model class) are reused by
    dynamo without a guard on the module hooks routing installs: start each test from empty caches."""
    torch._dynamo.reset()


# Routing's families: Wan, Wan's per-token timesteps, HunyuanVideo's single-stream blocks (video | text joint mask),
# its 33-channel I2V and HunyuanVideo 1.5's double-stream blocks; the tiny models have 2 blocks in the routed chain.
FAMILIES = [TINY_WAN, TINY_TI2V, TINY_HV, TINY_HV_I2V_33, TINY_HV15]
FAMILY_IDS = ["wan", "ti2v-5b-per-token-timesteps", "hunyuan-single-stream", "hunyuan-i2v-33ch", "hunyuan15"]
HV_FAMILIES = [TINY_HV, TINY_HV15]


@pytest.mark.parametrize("preset", FAMILIES, ids=FAMILY_IDS)
def test_routing_every_token_through_the_span_is_the_full_model(preset):
    """The hooks cut and put back tokens, RoPE, attention masks and per-token timesteps exactly: with every token
    routed through the span (and gradient checkpointing, which reruns the span in backward) output and gradients are
    the plain model's."""
    recipe, family, model = tiny_model(preset, [*ROUTE, "train.gradient_checkpointing=true"])
    batch = perf.random_batch(preset, (preset.config["out_channels"], *LATENT[1:]), 2, preset.text_tokens)
    noisy, sigmas = torch.randn_like(batch["latents"]), torch.tensor([0.3, 0.8])
    if family.per_token_timesteps:
        batch["first_frame"] = torch.tensor([True, False])  # one sample with timestep 0 on its first frame's tokens
    tokens = perf.grid_tokens(family.patch_of(preset.config), tuple(batch["latents"].shape[1:]))

    def run(routed):
        out = model("transformer", noisy, sigmas, {**batch, ROUTED: routed})
        out.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad()
        return out, grads

    plain, plain_grads = run(None)
    every, every_grads = run(torch.arange(tokens).expand(2, tokens))
    assert torch.equal(every, plain)
    # HunyuanVideo's routed attention runs once per sample (per-sample RoPE): the LoRA weight gradients inside it sum
    # the two samples' terms in another order than one batched product, so they agree to rounding only.
    exact = {"rtol": 1e-5, "atol": 1e-7} if preset.family.startswith("hunyuan") else {"rtol": 0, "atol": 0}
    for a, b in zip(every_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, **exact)
    half, _ = run(torch.arange(0, tokens, 2).expand(2, tokens // 2))
    assert not torch.allclose(half, plain)  # routing changes what the span sees
    with torch.no_grad():  # samples and validation videos (no autograd) always run the full model
        assert torch.equal(model("transformer", noisy, sigmas, {**batch, ROUTED: None}), plain.detach())


@pytest.mark.parametrize("preset", [TINY_WAN, *HV_FAMILIES], ids=["wan", "hunyuan", "hunyuan15"])
def test_routing_zero_trains_exactly_as_before_and_half_routes(preset):
    plain = losses_after([], preset=preset)  # computed here, not cached: the process state of the runs compared
    assert losses_after(["train.token_routing=0", "train.token_routing_blocks=[0,1]"], preset=preset) == plain
    assert losses_after(ROUTE, preset=preset) != plain
    assert routed_count(32760, 0.5) == 16380 and routed_count(3, 0.9) == 1


@pytest.mark.parametrize("preset", HV_FAMILIES, ids=["hunyuan", "hunyuan15"])
def test_hunyuan_routing_trains_alike_with_gradient_checkpointing(preset):
    """Checkpointing reruns the routed span in backward (the per-sample RoPE processor included): same losses."""
    checkpointed = losses_after([*ROUTE, "train.gradient_checkpointing=true"], preset=preset)
    assert checkpointed == pytest.approx(losses_after(ROUTE, preset=preset), rel=1e-5, abs=1e-7)


def full_model_loss_drop(overrides: list[str], steps: int = 30, preset: perf.ModelPreset = TINY_WAN) -> float:
    """Overfit one batch (the same noise every step) with these switches: the loss of the full model, as inference
    runs it, after training over before."""
    recipe, _, model = tiny_model(preset, overrides)
    plain = recipe.model_copy(update={"train": recipe.train.model_copy(update={"token_routing": 0.0})})
    batch = perf.random_batch(preset, LATENT, 2, preset.text_tokens)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)

    def loss(r):
        return flow_loss(model, batch, r, [step_generator(0, 0, j) for j in range(2)])

    with torch.no_grad():
        before = loss(plain).item()
    for _ in range(steps):
        loss(recipe).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        return loss(plain).item() / before


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_routing_trains_alike_compiled(mode):
    """torch.compile (aot_eager, as tests/test_perf.py) traces the span's hooks: the same losses as eager routing."""
    assert losses_after([*ROUTE, f"train.compile={mode}"], compile_backend="aot_eager") == losses_after(ROUTE)


@pytest.mark.parametrize("preset", [TINY_WAN, *HV_FAMILIES], ids=["wan", "hunyuan", "hunyuan15"])
def test_a_lora_trained_with_routing_lowers_the_full_models_loss_nearly_as_much(preset):
    routed, plain = full_model_loss_drop(ROUTE, preset=preset), full_model_loss_drop([], preset=preset)
    assert routed < 0.9  # measured: wan 0.80 (plain 0.78), hunyuan 0.65 (0.62), hunyuan15 0.75 (0.73)
    assert 1 - routed > 0.7 * (1 - plain)


def test_hunyuan_routed_attention_stays_the_models_own():
    """Only the span's blocks get the per-sample RoPE processor, and it passes a later attention backend on to the
    model's processor it runs."""
    _, _, model = tiny_model(TINY_HV, ROUTE)
    transformer = model.experts["transformer"]
    before, routed = (b.attn.processor for b in transformer.single_transformer_blocks)  # span: block 1
    assert isinstance(routed, PerSampleRope) and not isinstance(before, PerSampleRope)
    transformer.set_attention_backend("_native_math")
    assert routed.processor._attention_backend == before._attention_backend == "_native_math"


def test_routing_is_refused_by_name_where_it_cannot_run():
    with pytest.raises(UserError, match=r"train.token_routing_blocks = \[2, -2\]: no block of the transformer's 2"):
        tiny_model(TINY_WAN, ["train.token_routing=0.5"])  # the default span of a 2-block model is empty
    with pytest.raises(RecipeError, match="train.token_routing: the token-replacement HunyuanVideo-I2V"):
        tiny_model(TINY_HV_I2V, ROUTE)
    with pytest.raises(RecipeError, match="train.token_routing"):
        tiny_model(TINY_WAN, ["train.token_routing=1"])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_routed_runs_resume_exactly_and_match_across_one_and_two_processes(prepared, tmp_path):
    """One process with batch 2: killed (SIGKILL) and resumed, it repeats the uninterrupted run bit for bit. Two DDP
    processes with batch 1 route each sample's tokens as one process does (the draws follow the sample's slot in the
    global batch); tolerances as in tests/test_multiprocess.py."""
    model, cache = prepared

    def recipe(name, batch_size=2):
        text = recipe_text(
            model, cache, tmp_path / name, 6, batch_size=batch_size, gradient_accumulation=2, checkpoint_every=2,
            token_routing=0.5, token_routing_blocks=[1, 2],
        )  # fmt: skip
        return write_recipe(tmp_path / f"{name}.toml", text)

    def result(name):
        return losses(tmp_path / name), read_adapter(tmp_path / name / "adapter.safetensors")[0]

    train_run(recipe("ref"))
    proc = start_run(recipe("run"))
    wait_for_step(proc, tmp_path / "run", 3)
    kill_group(proc)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    train_run(recipe("run"), "one", "--resume")
    (ref, ref_lora), (run, run_lora) = result("ref"), result("run")
    assert run == ref and all(torch.equal(run_lora[k], ref_lora[k]) for k in ref_lora)

    train_run(recipe("ddp", batch_size=1), "ddp")
    ddp, ddp_lora = result("ddp")
    assert sorted(ddp) == list(range(1, 7))
    assert [ddp[s] for s in ddp] == pytest.approx([ref[s] for s in ddp], rel=1e-5)
    for k in ref_lora:
        assert torch.allclose(ddp_lora[k], ref_lora[k], atol=1e-3 * ref_lora[k].norm().item() + 1e-7)
