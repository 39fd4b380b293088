"""LoRA formats: exports load in diffusers (the real client) and land in the ComfyUI stand-in; conversions are lossless.

Tiny Wan / HunyuanVideo transformers on CPU with a peft LoRA (rank 4, alpha 8, random non-zero A and B).
"""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
from diffusers import (
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.loaders.lora_conversion_utils import (
    _convert_hunyuan_video_lora_to_diffusers,
    _convert_non_diffusers_wan_lora_to_diffusers,
)
from diffusers.loaders.single_file_utils import (
    convert_hunyuan_video_transformer_to_diffusers,
    convert_wan_transformer_to_diffusers,
)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from tests import comfyui_rules as comfy
from trainer import formats
from trainer.formats import (
    FORMATS,
    LoraFormatError,
    alphas_from_model,
    check_lora,
    convert,
    detect_format,
    export_lora,
    import_lora,
    load_lora,
    merge_lora,
    save_lora,
)
from trainer.models import FAMILIES, family_class
from trainer.models.hunyuan_video15 import tiny_transformer_config as hv15_tiny_config

RANK, ALPHA = 4, 8.0
WAN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
HV_ATTN = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
HV_FFN = r"(ff|ff_context)\.net\.(0\.proj|2)"
# Single-block q/k/v/proj_mlp fuse into linear1, which diffusers splits at hidden size 3072: tiny models leave them out.
HV_TARGETS_TINY = rf"(transformer_blocks\.\d+\.({HV_ATTN}|{HV_FFN})|single_transformer_blocks\.\d+\.proj_out)"
HV_TARGETS_FULL = rf"(transformer_blocks\.\d+\.({HV_ATTN}|{HV_FFN})|single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp|proj_out))"


# ---------------------------------------------------------------------------------------------------------------------
# Tiny models with a trained-looking LoRA.
# ---------------------------------------------------------------------------------------------------------------------


def tiny_wan(i2v: bool = False) -> WanTransformer3DModel:
    extra = {"image_dim": 4, "added_kv_proj_dim": 24, "in_channels": 36} if i2v else {"in_channels": 16}
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        **extra,
    )


def tiny_hunyuan(hidden_3072: bool = False) -> HunyuanVideoTransformer3DModel:
    if hidden_3072:  # diffusers' linear1 split hard-codes 3072; keep everything else minimal
        size = {"num_attention_heads": 24, "attention_head_dim": 128, "rope_axes_dim": (16, 56, 56), "mlp_ratio": 0.25}
        size["num_refiner_layers"] = 0
    else:
        size = {"num_attention_heads": 2, "attention_head_dim": 10, "rope_axes_dim": (2, 4, 4), "num_refiner_layers": 1}
    return HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        **size,
    )


def wan_inputs(i2v: bool = False) -> dict:
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 36 if i2v else 16, 3, 16, 16, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
    }
    if i2v:
        inputs["encoder_hidden_states_image"] = torch.randn(1, 5, 4, generator=g)
    return inputs


def hunyuan_inputs(size: int = 4) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 4, 1, size, size, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 3, 16, generator=g),
        "encoder_attention_mask": torch.ones(1, 3),
        "pooled_projections": torch.randn(1, 8, generator=g),
        "guidance": torch.tensor([3500.0]),
    }


class Trained:
    """A base transformer, a copy with a random LoRA, and the LoRA in canonical form."""

    def __init__(self, family: str, make, targets, inputs: dict, seed: int = 0):
        torch.manual_seed(seed)
        self.family, self.inputs = family, inputs
        self.base = make()
        self.model = copy.deepcopy(self.base)
        self.model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets))
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in self.model.named_parameters():
            if "lora_" in name:
                p.data = torch.randn(p.shape, generator=g) * (0.02 if p.shape[-1] > 1000 else 0.3)
        self.peft_sd = get_peft_model_state_dict(self.model)
        self.alphas = alphas_from_model(self.model)
        self.out = self.run(self.model)
        assert not torch.allclose(self.out, self.run(self.base), atol=1e-4), "LoRA update too small to test"

    def run(self, model) -> torch.Tensor:
        with torch.no_grad():
            return model(**self.inputs, return_dict=False)[0]

    def deltas(self) -> dict[str, torch.Tensor]:
        """Trained update per diffusers weight: alpha/rank * B @ A."""
        out = {}
        for name, alpha in self.alphas.items():
            A, B = self.peft_sd[f"{name}.lora_A.weight"], self.peft_sd[f"{name}.lora_B.weight"]
            out[f"{name}.weight"] = (B.flatten(1) @ A.flatten(1)).view(B.shape[0], *A.shape[1:]) * (alpha / A.shape[0])
        return out


@pytest.fixture(scope="module")
def wan() -> Trained:
    return Trained("wan", tiny_wan, WAN_TARGETS, wan_inputs())


@pytest.fixture(scope="module")
def wan_i2v() -> Trained:
    targets = [*WAN_TARGETS, "add_k_proj", "add_v_proj"]
    return Trained("wan_i2v", lambda: tiny_wan(i2v=True), targets, wan_inputs(i2v=True))


@pytest.fixture(scope="module")
def hunyuan() -> Trained:
    return Trained("hunyuan_video", tiny_hunyuan, HV_TARGETS_TINY, hunyuan_inputs())


def products(peft_sd, alphas) -> dict[str, torch.Tensor]:
    return {
        m: peft_sd[f"{m}.lora_B.weight"] @ peft_sd[f"{m}.lora_A.weight"] * (a / peft_sd[f"{m}.lora_A.weight"].shape[0])
        for m, a in alphas.items()
    }


def assert_same_products(got: tuple, want: tuple, atol: float = 1e-6) -> None:
    p_got, p_want = products(*got), products(*want)
    assert p_got.keys() == p_want.keys()
    for m in p_want:
        torch.testing.assert_close(p_got[m], p_want[m], atol=atol, rtol=1e-5, msg=m)


def save_export(trained: Trained, fmt: str, tmp_path) -> str:
    path = str(tmp_path / f"{trained.family}_{fmt}.safetensors")
    save_lora(path, export_lora(trained.peft_sd, trained.alphas, trained.family, fmt), {"family": trained.family})
    return path


# ---------------------------------------------------------------------------------------------------------------------
# The real client: diffusers' own pipelines load our files (no code of ours on the loading side).
# ---------------------------------------------------------------------------------------------------------------------


def wan_pipeline(transformer) -> WanPipeline:
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=transformer)


def hunyuan_pipeline(transformer) -> HunyuanVideoPipeline:
    return HunyuanVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=None,
        scheduler=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_wan_export_loads_in_diffusers(wan, fmt, tmp_path):
    pipe = wan_pipeline(copy.deepcopy(wan.base))
    pipe.load_lora_weights(save_export(wan, fmt, tmp_path))
    torch.testing.assert_close(wan.run(pipe.transformer), wan.out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_wan_i2v_export_loads_in_diffusers(wan_i2v, fmt, tmp_path):
    pipe = wan_pipeline(copy.deepcopy(wan_i2v.base))
    pipe.load_lora_weights(save_export(wan_i2v, fmt, tmp_path))
    torch.testing.assert_close(wan_i2v.run(pipe.transformer), wan_i2v.out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
def test_hunyuan_export_loads_in_diffusers(hunyuan, fmt, tmp_path):
    pipe = hunyuan_pipeline(copy.deepcopy(hunyuan.base))
    pipe.load_lora_weights(save_export(hunyuan, fmt, tmp_path))
    torch.testing.assert_close(hunyuan.run(pipe.transformer), hunyuan.out, atol=1e-5, rtol=0)


def test_diffusers_silently_skips_hunyuan_original_layout_without_qkv(hunyuan, tmp_path):
    """A diffusers quirk we can only report: no img_attn_qkv key -> the original layout is not recognised."""
    keep = {k: v for k, v in hunyuan.peft_sd.items() if k.startswith("single_transformer_blocks.0.proj_out")}
    exported = export_lora(keep, hunyuan.alphas, "hunyuan_video", "comfyui")
    assert any("silently loads nothing" in note for note in check_lora(exported)[2])
    pipe = hunyuan_pipeline(copy.deepcopy(hunyuan.base))
    pipe.load_lora_weights(exported)
    torch.testing.assert_close(hunyuan.run(pipe.transformer), hunyuan.run(hunyuan.base), atol=0, rtol=0)


def test_diffusers_refuses_wan_kohya_without_full_blocks(wan, tmp_path):
    """Another diffusers quirk we report in the notes: its musubi converter needs attention + FFN in every block."""
    keep = {k: v for k, v in wan.peft_sd.items() if ".attn1." in k}
    exported = export_lora(keep, wan.alphas, "wan", "kohya")
    assert any("KeyError" in note for note in check_lora(exported)[2])
    with pytest.raises(KeyError, match="blocks_0_cross_attn_q"):
        wan_pipeline(copy.deepcopy(wan.base)).load_lora_weights(exported)


@pytest.fixture(scope="module")
def hunyuan_3072() -> Trained:
    return Trained("hunyuan_video", lambda: tiny_hunyuan(hidden_3072=True), HV_TARGETS_FULL, hunyuan_inputs(2))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
def test_hunyuan_linear1_loads_in_diffusers(hunyuan_3072, fmt, tmp_path):
    """Single-block linear1 (q, k, v, proj_mlp fused, rank x4) needs hidden 3072 for diffusers' splitter."""
    exported = export_lora(hunyuan_3072.peft_sd, hunyuan_3072.alphas, "hunyuan_video", fmt)
    if fmt == "comfyui":
        assert exported["diffusion_model.single_blocks.0.linear1.lora_A.weight"].shape[0] == 4 * RANK
        assert exported["diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight"].shape[0] == 3 * RANK
    pipe = hunyuan_pipeline(copy.deepcopy(hunyuan_3072.base))
    pipe.load_lora_weights(save_export(hunyuan_3072, fmt, tmp_path))
    torch.testing.assert_close(hunyuan_3072.run(pipe.transformer), hunyuan_3072.out, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# The ComfyUI stand-in: every key lands on one weight, and the update ComfyUI computes is the trained one.
# ---------------------------------------------------------------------------------------------------------------------


def comfy_key_map(trained: Trained) -> dict[str, str]:
    weights = comfy.original_weights(trained.family, trained.base.config)
    return comfy.comfyui_lora_key_map(trained.family, comfy.comfyui_internal_weights(trained.family, weights))


def to_diffusers_layout(family: str, config: dict, internal_deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI-internal weight updates -> diffusers names, through diffusers' own single-file converter.

    HunyuanVideo's single-block `linear1` (q, k, v, then the MLP input, by ComfyUI's SingleStreamBlock) is split here
    when the hidden size is not the 3072 that diffusers' converter assumes."""
    if family.startswith("wan"):
        return convert_wan_transformer_to_diffusers(dict(internal_deltas))
    names = comfy.original_names(family, comfy.original_weights(family, config))
    original = {names[k]: v for k, v in internal_deltas.items()}
    if family.startswith("hunyuan_video15"):  # diffusers has no single-file converter for it: its script's rules
        return comfy.hunyuan_video15_to_diffusers(original)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    split = {}
    for key in [k for k in original if hidden != 3072 and k.endswith(".linear1.weight")]:
        block = key.removesuffix(".linear1.weight").replace("single_blocks", "single_transformer_blocks")
        fused = original.pop(key)
        q, k, v, mlp = fused.split([hidden, hidden, hidden, fused.shape[0] - 3 * hidden], dim=0)
        split |= {f"{block}.attn.to_{n}.weight": t for n, t in zip("qkv", (q, k, v))}
        split[f"{block}.proj_mlp.weight"] = mlp
    return {**convert_hunyuan_video_transformer_to_diffusers(original), **split}


def check_comfyui_lands(trained: Trained, fmt: str) -> None:
    exported = export_lora(trained.peft_sd, trained.alphas, trained.family, fmt)
    patches, not_loaded = comfy.comfyui_patches(exported, comfy_key_map(trained))
    assert not_loaded == []
    assert all(len(p) == 1 for p in patches.values()), "a weight got patched twice"
    got = to_diffusers_layout(trained.family, trained.base.config, {k: p[0] for k, p in patches.items()})
    want = trained.deltas()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("fmt", ["comfyui", "kohya"])
@pytest.mark.parametrize("name", ["wan", "wan_i2v", "hunyuan"])
def test_comfyui_standin_applies_every_key(name, fmt, request):
    check_comfyui_lands(request.getfixturevalue(name), fmt)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["comfyui", "kohya"])
def test_comfyui_standin_hunyuan_linear1(hunyuan_3072, fmt):
    check_comfyui_lands(hunyuan_3072, fmt)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def every_module(request, tmp_path_factory) -> Trained:
    """A family's own tiny transformer (`make-tiny`) with a LoRA on every module peft can adapt."""
    from trainer.config import ModelSection
    from trainer.export import selected_modules

    family = family_class(request.param)
    folder = family.make_tiny(tmp_path_factory.mktemp(request.param))
    base = family(ModelSection(family=request.param, path=str(folder))).load_transformer(torch.float32)
    targets = sorted(selected_modules(base, r".*"))
    trained = Trained.__new__(Trained)
    trained.family, trained.base = request.param, base
    trained.model = copy.deepcopy(base)
    trained.model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets))
    g = torch.Generator().manual_seed(3)
    for name, p in trained.model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    trained.peft_sd, trained.alphas = get_peft_model_state_dict(trained.model), alphas_from_model(trained.model)
    assert set(trained.alphas) == set(targets)
    return trained


@pytest.mark.parametrize("fmt", ["comfyui", "kohya"])
def test_comfyui_loads_every_module_or_export_refuses_it(every_module, fmt):
    """Not only the default preset: for every module vidlora can train, the comfyui and kohya files carry names
    ComfyUI maps (and the update ComfyUI computes is the trained one), or export refuses that module by name."""
    trained, refused = every_module, {}
    kept = dict(trained.alphas)
    while True:
        peft_sd = {k: v for k, v in trained.peft_sd.items() if k.rsplit(".lora_", 1)[0] in kept}
        try:
            exported = export_lora(peft_sd, kept, trained.family, fmt)
            break
        except LoraFormatError as e:
            named = [m for m in kept if re.search(rf"(?<![\w.]){re.escape(m)}(?![\w.])", str(e))]
            assert named, f"refusal names no module: {e}"
            refused |= dict.fromkeys(named, str(e))
            kept = {m: a for m, a in kept.items() if m not in named}
    declared = [
        t.replace(".", r"\.").replace("{i}", r"\d+") for t in family_class(trained.family).lora_names.not_exportable
    ]
    expected = {m for m in trained.alphas if any(re.fullmatch(t, m) for t in declared)}
    assert set(refused) == expected, "refused what the family does not declare"
    patches, not_loaded = comfy.comfyui_patches(exported, comfy_key_map(trained))
    assert not_loaded == [], f"ComfyUI would log 'lora key not loaded' for {not_loaded[:5]}"
    assert all(len(p) == 1 for p in patches.values()), "a weight got patched twice"
    got = to_diffusers_layout(trained.family, trained.base.config, {k: p[0] for k, p in patches.items()})
    want = {k: v for k, v in trained.deltas().items() if k.removesuffix(".weight") in kept}
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k].reshape(want[k].shape), want[k], atol=1e-6, rtol=1e-5, msg=k)


def test_comfyui_standin_reports_keys_it_drops(wan, hunyuan):
    exported = export_lora(wan.peft_sd, wan.alphas, "wan", "comfyui")
    wrong = "diffusion_model.blocks.0.self_attn.qq.lora_A.weight"
    _, not_loaded = comfy.comfyui_patches({**exported, wrong: torch.zeros(1)}, comfy_key_map(wan))
    assert not_loaded == [wrong]
    # ComfyUI reads no diffusers-named Wan key: the reason the comfyui export uses original names.
    diffusers_file = export_lora(wan.peft_sd, wan.alphas, "wan", "diffusers")
    assert comfy.comfyui_patches(diffusers_file, comfy_key_map(wan))[1] == sorted(diffusers_file)
    # musubi-tuner's own HunyuanVideo MLP names are not mapped by ComfyUI; the ones we write are.
    musubi = {"lora_unet_double_blocks_0_img_mlp_fc1.lora_down.weight": torch.zeros(RANK, 20)}
    assert comfy.comfyui_patches(musubi, comfy_key_map(hunyuan))[1] == sorted(musubi)


def test_standin_weight_names_match_diffusers_models():
    """The stand-in's original architectures convert, by diffusers' own converter, to exactly the diffusers models."""
    for i2v in (False, True):
        names = comfy.wan_original_weights(2, i2v=i2v)
        got = convert_wan_transformer_to_diffusers({n: torch.empty(1, device="meta") for n in names})
        assert set(got) == set(tiny_wan(i2v).state_dict())
    names = comfy.hunyuan_video_original_weights(1, 1, 1)
    fake = {n: torch.empty(3 * 3072 + 3 if "linear1" in n else 6, 1, device="meta") for n in names}
    assert set(convert_hunyuan_video_transformer_to_diffusers(fake)) == set(tiny_hunyuan().state_dict())
    names = comfy.hunyuan_video15_original_weights(2, 1)
    got = comfy.hunyuan_video15_to_diffusers({n: torch.empty(6, 1, device="meta") for n in names})
    with torch.device("meta"):
        model = HunyuanVideo15Transformer3DModel(**hv15_tiny_config(num_layers=2))
    assert set(got) == set(model.state_dict())


# ---------------------------------------------------------------------------------------------------------------------
# Name maps agree with diffusers' LoRA converters, row by row.
# ---------------------------------------------------------------------------------------------------------------------


def test_wan_name_map_matches_diffusers_converter():
    fake, want = {}, set()
    for diffusers_name, original in family_class("wan").lora_names.name_map:
        for i in ("0", "1"):
            for suffix in ("lora_A.weight", "lora_B.weight"):
                fake[f"diffusion_model.{original.replace('{i}', i)}.{suffix}"] = torch.zeros(2, 2)
                want.add(f"transformer.{diffusers_name.replace('{i}', i)}.{suffix}")
    assert set(_convert_non_diffusers_wan_lora_to_diffusers(fake)) == want


def test_hunyuan_name_map_matches_diffusers_converter():
    for diffusers_names, original in family_class("hunyuan_video").lora_names.name_map:
        rows = 3 * 3072 + 8 if "linear1" in original else 6
        o = original.replace("{i}", "3")
        fake = {
            f"transformer.{o}.lora_A.weight": torch.zeros(2, 5),
            f"transformer.{o}.lora_B.weight": torch.zeros(rows, 2),
        }
        fake["transformer.double_blocks.9.img_attn_qkv.lora_A.weight"] = torch.zeros(2, 5)  # diffusers' format trigger
        fake["transformer.double_blocks.9.img_attn_qkv.lora_B.weight"] = torch.zeros(6, 2)
        got = {
            k.removesuffix(".lora_A.weight") for k in _convert_hunyuan_video_lora_to_diffusers(fake) if "lora_A" in k
        }
        names = [diffusers_names] if isinstance(diffusers_names, str) else diffusers_names
        want = {f"transformer.{n.replace('{i}', '3')}" for n in names}
        want |= {f"transformer.transformer_blocks.9.attn.to_{p}" for p in "qkv"}
        assert got == want, original
        assert formats.to_diffusers_names("hunyuan_video", o) == tuple(n.replace("{i}", "3") for n in names)


# ---------------------------------------------------------------------------------------------------------------------
# Conversions.
# ---------------------------------------------------------------------------------------------------------------------


def bakes(fmt: str, family: str) -> bool:
    return fmt == "diffusers" or (fmt == "comfyui" and family == "hunyuan_video")


@pytest.mark.parametrize("name", ["wan", "wan_i2v", "hunyuan"])
def test_round_trips_are_lossless(name, request):
    trained = request.getfixturevalue(name)
    canonical = (trained.peft_sd, trained.alphas)
    # kohya keeps alpha and rank: canonical -> kohya -> canonical is exact as tensors, fused layers included.
    peft_sd, alphas, family = import_lora(export_lora(*canonical, trained.family, "kohya"))
    assert family == trained.family and alphas == trained.alphas
    assert peft_sd.keys() == trained.peft_sd.keys()
    assert all(torch.equal(peft_sd[k], trained.peft_sd[k]) for k in peft_sd)
    for a in FORMATS:
        file_a = export_lora(*canonical, trained.family, a)
        assert_same_products(import_lora(file_a)[:2], canonical)
        for b in FORMATS:
            back = convert(convert(file_a, b), a)
            assert back.keys() == file_a.keys(), (a, b)
            # diffusers files, and HunyuanVideo comfyui files, bake alpha/rank into lora_A: alpha != rank survives
            # them only as the product.
            if bakes(b, trained.family) and not bakes(a, trained.family):
                assert_same_products(import_lora(back)[:2], import_lora(file_a)[:2])
            else:
                assert all(torch.equal(back[k], file_a[k]) for k in back), (a, b)


def test_fused_import_from_dense_files_is_exact_as_product():
    """Files trained on the fused original layer (dense B) split like diffusers does: A copied, B cut by rows."""
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(4, 20, generator=g), torch.randn(60, 4, generator=g)
    sd = {
        "transformer.double_blocks.0.img_attn_qkv.lora_A.weight": A,
        "transformer.double_blocks.0.img_attn_qkv.lora_B.weight": B,
    }
    peft_sd, alphas, family = import_lora(sd, "hunyuan_video")  # one double block: HunyuanVideo 1.5's names too
    assert family == "hunyuan_video"
    parts = [f"transformer_blocks.0.attn.to_{p}" for p in "qkv"]
    assert sorted(alphas) == sorted(parts) and set(alphas.values()) == {4.0}
    stacked = torch.cat([products(peft_sd, alphas)[p] for p in parts])
    torch.testing.assert_close(stacked, B @ A)
    # Back to the original layout the rank triples (block-diagonal), but the update is the same.
    fused = export_lora(peft_sd, alphas, "hunyuan_video", "comfyui")
    A2 = fused["diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight"]
    B2 = fused["diffusion_model.double_blocks.0.img_attn_qkv.lora_B.weight"]
    assert A2.shape == (12, 20)
    torch.testing.assert_close(B2 @ A2, B @ A)


def test_partial_fused_targets(hunyuan):
    """q and v only: k's rows of the fused update are zero; linear1 without proj_mlp is refused (size unknown)."""
    keep = {k: v for k, v in hunyuan.peft_sd.items() if ".attn.to_k." not in k}
    alphas = {m: a for m, a in hunyuan.alphas.items() if not m.endswith("attn.to_k")}
    out = export_lora(keep, alphas, "hunyuan_video", "kohya")
    B = out["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert B.shape == (60, 8) and not B[20:40].any()
    assert_same_products(import_lora(out)[:2], (keep, alphas))
    q = {"single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 20)}
    q["single_transformer_blocks.0.attn.to_q.lora_B.weight"] = torch.ones(20, 4)
    with pytest.raises(LoraFormatError, match="proj_mlp"):
        export_lora(q, 8.0, "hunyuan_video", "comfyui")


def test_refuses_modules_without_a_safe_original_layout():
    sd = {"norm_out.linear.lora_A.weight": torch.ones(4, 20), "norm_out.linear.lora_B.weight": torch.ones(40, 4)}
    assert export_lora(sd, 8.0, "hunyuan_video", "diffusers")  # fine in diffusers names
    with pytest.raises(LoraFormatError, match="norm_out.linear.*shift/scale"):
        export_lora(sd, 8.0, "hunyuan_video", "comfyui")
    with pytest.raises(LoraFormatError, match="blocks.0.attn1.to_qq"):
        export_lora(lora_keys("blocks.0.attn1.to_qq"), 1.0, "wan", "kohya")


def test_diffusers_file_with_adapter_metadata_keeps_alpha(wan, tmp_path):
    """diffusers' own save_lora_weights (finetrainers, SimpleTuner) stores unbaked weights + alpha in the header."""
    config = wan.model.peft_config["default"].to_dict()
    WanPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=wan.peft_sd, transformer_lora_adapter_metadata=config
    )
    sd, metadata = load_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert detect_format(sd)[:2] == ("diffusers", "wan")
    assert_same_products(import_lora(sd, metadata=metadata)[:2], (wan.peft_sd, wan.alphas))
    assert import_lora(sd)[1] != wan.alphas  # without the header alpha = rank: the header matters


# ---------------------------------------------------------------------------------------------------------------------
# Merge.
# ---------------------------------------------------------------------------------------------------------------------


def test_merge_equals_diffusers_fuse_lora(wan, tmp_path):
    pipe = wan_pipeline(copy.deepcopy(wan.base))
    pipe.load_lora_weights(save_export(wan, "diffusers", tmp_path))
    pipe.fuse_lora(lora_scale=0.7)
    fused = {k.replace(".base_layer.", "."): v for k, v in pipe.transformer.state_dict().items() if ".lora_" not in k}
    merged = merge_lora(wan.base, wan.peft_sd, wan.alphas, strength=0.7)
    assert merged.keys() == fused.keys()
    for k in fused:
        torch.testing.assert_close(merged[k], fused[k], atol=1e-6, rtol=1e-5, msg=k)
    # merging into the adapted model (peft-wrapped) at strength 1 gives the trained model's outputs
    plain = copy.deepcopy(wan.base)
    plain.load_state_dict(merge_lora(wan.model, wan.peft_sd, wan.alphas))
    torch.testing.assert_close(wan.run(plain), wan.out, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Refusals and detection.
# ---------------------------------------------------------------------------------------------------------------------


def test_refuses_unknown_keys_and_non_finite_values(wan, tmp_path):
    exported = export_lora(wan.peft_sd, wan.alphas, "wan", "comfyui")
    assert check_lora(exported)[:2] == ("comfyui", "wan")
    wrong = "diffusion_model.blocks.0.self_attn.qq.lora_A.weight"
    bad = {**exported, wrong: torch.zeros(RANK, 24), wrong.replace("lora_A", "lora_B"): torch.zeros(24, RANK)}
    for call in (lambda: check_lora(bad), lambda: import_lora(bad), lambda: save_lora(tmp_path / "x.safetensors", bad)):
        with pytest.raises(LoraFormatError, match=wrong.replace(".", r"\.")):
            call()
    assert "do not map" in " ".join(detect_format(bad)[2])
    nan_key = "diffusion_model.blocks.1.ffn.2.lora_B.weight"
    nan = {**exported, nan_key: exported[nan_key].clone()}
    nan[nan_key][0, 0] = float("nan")
    for call in (
        lambda: check_lora(nan),
        lambda: convert(nan, "kohya"),
        lambda: save_lora(tmp_path / "x.safetensors", nan),
    ):
        with pytest.raises(LoraFormatError, match=f"non-finite.*{nan_key}"):
            call()
    half = {k: v for k, v in exported.items() if not k.endswith("self_attn.q.lora_B.weight") or ".0." not in k}
    with pytest.raises(LoraFormatError, match="blocks.0.self_attn.q"):
        import_lora(half)
    with pytest.raises(LoraFormatError, match="dora_scale"):
        check_lora({**exported, "diffusion_model.blocks.0.self_attn.q.dora_scale": torch.ones(1)})
    assert not os.listdir(tmp_path)


def lora_keys(*modules: str, down: str = "lora_A", up: str = "lora_B", alpha: bool = False) -> dict:
    """A small LoRA file with the given module keys (rank 2, 6 output rows so fused layers split)."""
    sd = {}
    for m in modules:
        sd[f"{m}.{down}.weight"], sd[f"{m}.{up}.weight"] = torch.ones(2, 2), torch.ones(6, 2)
        if alpha:
            sd[f"{m}.alpha"] = torch.tensor(2.0)
    return sd


def peft_keys(module: str) -> dict:
    return {f"base_model.model.{module}.lora_{x}.default.weight": torch.ones(2, 2) for x in "AB"}


def kohya_keys(*modules: str) -> dict:
    return lora_keys(*modules, down="lora_down", up="lora_up", alpha=True)


PEER_FILES = {
    # diffusers save_lora_weights: finetrainers, SimpleTuner, ai-toolkit's peft format
    "diffusers": (lora_keys("transformer.blocks.0.attn1.to_q"), ("diffusers", "wan")),
    # a raw peft model state dict: wrapper prefix and adapter name
    "peft-raw": (peft_keys("blocks.0.attn1.to_q"), ("diffusers", "wan")),
    # diffusion-pipe / ai-toolkit Wan: ComfyUI layout, no alpha
    "diffusion-pipe-wan": (lora_keys("diffusion_model.blocks.0.self_attn.q"), ("comfyui", "wan")),
    "wan-i2v": (lora_keys("diffusion_model.blocks.0.cross_attn.k_img"), ("comfyui", "wan_i2v")),
    # diffusion-pipe HunyuanVideo: original names under transformer.
    # (a single block tells HunyuanVideo from HunyuanVideo 1.5, whose double blocks have the same names)
    "diffusion-pipe-hv": (
        lora_keys("transformer.double_blocks.0.img_attn_qkv", "transformer.single_blocks.0.linear2"),
        ("comfyui", "hunyuan_video"),
    ),
    # musubi-tuner
    "musubi-wan": (kohya_keys("lora_unet_blocks_0_self_attn_q"), ("kohya", "wan")),
    "musubi-hv": (
        kohya_keys("lora_unet_double_blocks_0_img_mlp_fc1", "lora_unet_single_blocks_0_linear2"),
        ("kohya", "hunyuan_video"),
    ),
    # HunyuanVideo 1.5: musubi-tuner keeps Tencent's split q/k/v; a diffusers file past HunyuanVideo's 20 double blocks
    "musubi-hv15": (kohya_keys("lora_unet_double_blocks_0_img_attn_q"), ("kohya", "hunyuan_video15")),
    "diffusers-hv15": (lora_keys("transformer.transformer_blocks.30.attn.to_q"), ("diffusers", "hunyuan_video15")),
}


@pytest.mark.parametrize("tool", PEER_FILES)
def test_detect_format_of_peer_tool_files(tool):
    sd, want = PEER_FILES[tool]
    assert detect_format(sd)[:2] == want
    peft_sd, alphas, family = import_lora(sd)
    assert family == want[1] and alphas and all(peft_sd[f"{m}.lora_A.weight"].shape[0] == 2 for m in alphas)


def test_detect_format_says_when_unsure():
    with pytest.raises(LoraFormatError, match="ambiguous"):
        detect_format(lora_keys("transformer.proj_out"))
    with pytest.raises(LoraFormatError, match=r"ambiguous.*'hunyuan_video', 'hunyuan_video15'"):
        detect_format(lora_keys("transformer.transformer_blocks.0.attn.to_q"))  # HunyuanVideo 13B or 1.5
    assert detect_format(lora_keys("transformer.proj_out"), family="wan")[:2] == ("diffusers", "wan")
    with pytest.raises(LoraFormatError, match="cannot tell.*text_model.encoder"):
        detect_format(lora_keys("text_model.encoder.layers.0.q_proj"))
    with pytest.raises(LoraFormatError, match="mixed kohya"):
        detect_format({**kohya_keys("lora_unet_blocks_0_self_attn_q"), **lora_keys("diffusion_model.blocks.0.ffn.0")})


# ---------------------------------------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------------------------------------


def test_save_load_with_metadata_is_atomic(wan, tmp_path, monkeypatch):
    path = tmp_path / "lora.safetensors"
    sd = export_lora(wan.peft_sd, wan.alphas, "wan", "kohya")
    meta = {"family": "wan", "rank": 4, "alpha": 8.0, "targets": WAN_TARGETS, "trigger_words": "sks", "steps": 10}
    save_lora(path, sd, meta)
    loaded, header = load_lora(path)
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert header["family"] == "wan" and header["rank"] == "4" and header["targets"] == json.dumps(WAN_TARGETS)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(formats, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_lora(path, {k: v * 2 for k, v in sd.items()}, meta)
    assert os.listdir(tmp_path) == ["lora.safetensors"]  # old file intact, no temp file left
    assert torch.equal(load_lora(path)[0][next(iter(sd))], sd[next(iter(sd))])
