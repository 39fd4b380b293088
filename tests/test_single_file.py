"""Original single-file checkpoints: a tiny model written in the original key layout (the inverse of diffusers'
converters) loads through vidlora's `model.transformer_file` path and gives the diffusers folder's outputs; bad
files get one clear line naming what is wrong."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel
from safetensors.torch import save_file

from tests.conftest import run_cli, write_recipe
from trainer.config import ModelSection, UserError
from trainer.models import get_family
from trainer.models.hunyuan_video import tiny_transformer_config as hv_config
from trainer.models.wan import tiny_transformer_config as wan_config

# --- diffusers -> original layout (inverse of diffusers' convert_{wan,hunyuan_video}_transformer_to_diffusers) ---

WAN_RENAMES = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    (".to_out.0.", ".o."),
    (".add_k_proj.", ".k_img."),
    (".add_v_proj.", ".v_img."),
    (".norm_added_k.", ".norm_k_img."),
    (".ffn.net.0.proj.", ".ffn.0."),
    (".ffn.net.2.", ".ffn.2."),
]


def wan_to_original(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        for a, b in WAN_RENAMES:
            key = key.replace(a, b)
        key = re.sub(r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation", key)
        key = re.sub(r"^scale_shift_table$", "head.modulation", key)
        key = re.sub(r"^proj_out\.", "head.head.", key)
        key = re.sub(r"^(blocks\.\d+)\.norm2\.", r"\1.norm3.", key)  # diffusers' norm2 is the cross-attention norm
        out[key] = value.clone().contiguous()
    return out


HV_TOP = [
    (r"^x_embedder\.", "img_in."),
    (r"^time_text_embed\.timestep_embedder\.linear_1", "time_in.mlp.0"),
    (r"^time_text_embed\.timestep_embedder\.linear_2", "time_in.mlp.2"),
    (r"^time_text_embed\.guidance_embedder\.linear_1", "guidance_in.mlp.0"),
    (r"^time_text_embed\.guidance_embedder\.linear_2", "guidance_in.mlp.2"),
    (r"^time_text_embed\.text_embedder\.linear_1", "vector_in.in_layer"),
    (r"^time_text_embed\.text_embedder\.linear_2", "vector_in.out_layer"),
    (r"^context_embedder\.proj_in\.", "txt_in.input_embedder."),
    (r"^context_embedder\.time_text_embed\.timestep_embedder\.linear_1", "txt_in.t_embedder.mlp.0"),
    (r"^context_embedder\.time_text_embed\.timestep_embedder\.linear_2", "txt_in.t_embedder.mlp.2"),
    (r"^context_embedder\.time_text_embed\.text_embedder\.", "txt_in.c_embedder."),
    (r"^context_embedder\.token_refiner\.refiner_blocks\.", "txt_in.individual_token_refiner.blocks."),
    (r"^proj_out\.", "final_layer.linear."),
    (r"^transformer_blocks\.", "double_blocks."),
    (r"^single_transformer_blocks\.", "single_blocks."),
]
HV_INSIDE = {
    "double_blocks.": [
        (".attn.to_out.0.", ".img_attn_proj."),
        (".attn.to_add_out.", ".txt_attn_proj."),
        (".attn.norm_added_q.", ".txt_attn_q_norm."),
        (".attn.norm_added_k.", ".txt_attn_k_norm."),
        (".attn.norm_q.", ".img_attn_q_norm."),
        (".attn.norm_k.", ".img_attn_k_norm."),
        (".norm1.linear.", ".img_mod.linear."),
        (".norm1_context.linear.", ".txt_mod.linear."),
        (".ff.net.0.proj.", ".img_mlp.fc1."),
        (".ff.net.2.", ".img_mlp.fc2."),
        (".ff_context.net.0.proj.", ".txt_mlp.fc1."),
        (".ff_context.net.2.", ".txt_mlp.fc2."),
    ],
    "single_blocks.": [
        (".proj_out.", ".linear2."),
        (".norm.linear.", ".modulation.linear."),
        (".attn.norm_q.", ".q_norm."),
        (".attn.norm_k.", ".k_norm."),
    ],
    "txt_in.individual_token_refiner.blocks.": [
        (".attn.to_out.0.", ".self_attn_proj."),
        (".norm_out.linear.", ".adaLN_modulation.1."),
        (".ff.net.0.proj.", ".mlp.fc1."),
        (".ff.net.2.", ".mlp.fc2."),
    ],
}


def hunyuan_to_original(sd: dict) -> dict:
    sd, out = dict(sd), {}
    for key in [k for k in list(sd) if re.search(r"attn\.to_q\.(weight|bias)$", k)]:
        block, suffix = key.split(".attn.to_q.")
        qkv = [sd.pop(f"{block}.attn.to_{c}.{suffix}") for c in "qkv"]
        if block.startswith("single_transformer_blocks."):  # linear1 = q, k, v, mlp
            qkv.append(sd.pop(f"{block}.proj_mlp.{suffix}"))
            out[f"{block.replace('single_transformer_blocks', 'single_blocks')}.linear1.{suffix}"] = torch.cat(qkv)
        elif block.startswith("transformer_blocks."):
            name = block.replace("transformer_blocks", "double_blocks")
            out[f"{name}.img_attn_qkv.{suffix}"] = torch.cat(qkv)
            txt = [sd.pop(f"{block}.attn.add_{c}_proj.{suffix}") for c in "qkv"]
            out[f"{name}.txt_attn_qkv.{suffix}"] = torch.cat(txt)
        else:
            name = block.replace(
                "context_embedder.token_refiner.refiner_blocks", "txt_in.individual_token_refiner.blocks"
            )
            out[f"{name}.self_attn_qkv.{suffix}"] = torch.cat(qkv)
    for suffix in ("weight", "bias"):
        scale, shift = sd.pop(f"norm_out.linear.{suffix}").chunk(2)  # the original stores [shift, scale]
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = torch.cat([shift, scale])
    for key, value in sd.items():
        for pattern, replacement in HV_TOP:
            key = re.sub(pattern, replacement, key)
        for prefix, renames in HV_INSIDE.items():
            if key.startswith(prefix):
                for a, b in renames:
                    key = key.replace(a, b)
        out[key] = value
    return {k: v.clone().contiguous() for k, v in out.items()}


# --- inputs and comparison -----------------------------------------------------------------------------------------


def wan_inputs(cfg: dict) -> dict:
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, cfg["in_channels"], 2, 4, 4, generator=g),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 512, cfg["text_dim"], generator=g),
    }
    if cfg.get("image_dim"):
        inputs["encoder_hidden_states_image"] = torch.randn(1, 65, cfg["image_dim"], generator=g)
    return inputs


def hv_inputs(cfg: dict, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, cfg["in_channels"], 1, 2, 2, generator=g).to(dtype),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 6, cfg["text_embed_dim"], generator=g).to(dtype),
        "encoder_attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]]),
        "pooled_projections": torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(dtype),
        "guidance": torch.tensor([6000.0]),
    }


def folder_with(tmp_path, model) -> str:
    """A model folder holding just the transformer (its config is all `transformer_file` needs)."""
    model.save_pretrained(tmp_path / "model" / "transformer")
    return str(tmp_path / "model")


def assert_same_model(ref, got, inputs):
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    assert all(torch.equal(ref_sd[k], got_sd[k]) for k in ref_sd)
    with torch.no_grad():
        a, b = ref(**inputs, return_dict=False)[0], got(**inputs, return_dict=False)[0]
    assert torch.allclose(a.float(), b.float(), atol=1e-6), (a - b).abs().max()


class Payload:
    """An arbitrary object in a pickle: what weights_only=True must refuse to rebuild."""


# --- tests ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "cfg", "prefix"),
    [
        ("wan_i2v", wan_config(in_channels=36, image_dim=16, added_kv_proj_dim=24), "model.diffusion_model."),
        ("wan", wan_config(), "diffusion_model."),
        ("wan22_5b", wan_config(in_channels=48, out_channels=48), "diffusion_model."),  # Wan2.2-TI2V-5B's names
    ],
)
def test_wan_original_safetensors_loads_equal(tmp_path, family, cfg, prefix):
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**cfg).eval()
    path = folder_with(tmp_path, ref)
    original = wan_to_original(ref.state_dict())
    assert "blocks.0.cross_attn.q.weight" in original and "head.modulation" in original
    file = tmp_path / "wan_original.safetensors"
    save_file({prefix + k: v for k, v in original.items()}, file)  # ComfyUI-style prefix
    got = get_family(ModelSection(family=family, path=path, transformer_file=str(file))).load_transformer(torch.float32)
    assert_same_model(ref, got, wan_inputs(cfg))


def hv_reference(tmp_path, **overrides):
    # diffusers splits single_blocks.N.linear1 assuming hidden size 3072, so the tiny model has no single block.
    cfg = hv_config(num_layers=2, num_single_layers=0, num_refiner_layers=2, **overrides)
    torch.manual_seed(0)
    ref = HunyuanVideoTransformer3DModel(**cfg).eval()
    return cfg, ref, folder_with(tmp_path, ref)


def test_hunyuan_original_pt_and_safetensors_load_equal(tmp_path):
    cfg, ref, path = hv_reference(tmp_path)
    original = hunyuan_to_original(ref.state_dict())
    assert "double_blocks.1.img_attn_qkv.weight" in original
    assert "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight" in original
    pt = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": original}, pt)  # the layout of Tencent's official checkpoint
    st = tmp_path / "hunyuan_video_comfy.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in original.items()}, st)
    for file in (pt, st):
        family = get_family(ModelSection(family="hunyuan_video", path=path, transformer_file=str(file)))
        assert_same_model(ref, family.load_transformer(torch.float32), hv_inputs(cfg))


@pytest.mark.parametrize(
    "overrides",
    [
        {"in_channels": 9, "guidance_embeds": False, "image_condition_type": "latent_concat"},  # the 33-channel model
        {"image_condition_type": "token_replace"},
    ],
    ids=["latent_concat", "token_replace"],
)
def test_hunyuan_i2v_original_file_loads_equal(tmp_path, overrides):
    """HunyuanVideo-I2V's checkpoints keep the T2V names: the 33-channel one has a wider img_in and no guidance_in."""
    cfg, ref, path = hv_reference(tmp_path, **overrides)
    original = hunyuan_to_original(ref.state_dict())
    assert original["img_in.proj.weight"].shape[1] == cfg["in_channels"]
    assert ("guidance_in.mlp.0.weight" in original) == cfg["guidance_embeds"]
    pt = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": original}, pt)
    family = get_family(ModelSection(family="hunyuan_video_i2v", path=path, transformer_file=str(pt)))
    assert_same_model(ref, family.load_transformer(torch.float32), hv_inputs(cfg))


def test_bad_single_files_name_the_problem(tmp_path):
    _, ref, path = hv_reference(tmp_path)
    original = hunyuan_to_original(ref.state_dict())

    def load(file):
        family = get_family(ModelSection(family="hunyuan_video", path=path, transformer_file=str(file)))
        return family.load_transformer(torch.float32)

    missing = dict(original)
    del missing["double_blocks.0.img_mlp.fc2.weight"]
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match=r"missing.safetensors.*1 weight\(s\) missing: transformer_blocks.0.ff.net.2"):
        load(tmp_path / "missing.safetensors")

    other = {k: v for k, v in original.items()}
    other["img_in.proj.weight"] = torch.zeros(20, 8, 1, 1, 1)  # a model with other input channels
    save_file(other, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match=r"other.safetensors.*of another shape, e.g. x_embedder.proj.weight"):
        load(tmp_path / "other.safetensors")

    torch.save({"module": original, "extra": Payload()}, tmp_path / "pickled.pt")
    with pytest.raises(UserError, match=r"pickled.pt: not a plain tensor checkpoint"):
        load(tmp_path / "pickled.pt")  # weights_only=True refuses to unpickle the object

    with pytest.raises(UserError, match="not found"):
        load(tmp_path / "nowhere.safetensors")


def test_cli_reports_a_bad_transformer_file_in_one_line(tmp_path, tiny_wan):
    file = tmp_path / "broken.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(24, 24)}, file)
    recipe = write_recipe(tmp_path / "r.toml", f'[model]\npath = "{tiny_wan}"\ntransformer_file = "{file}"\n')
    args = ["--prompt", "x", "--frames", "1", "--height", "16", "--width", "16", "--steps", "1"]
    proc = run_cli("sample", recipe, *args, "--out", tmp_path / "x.mp4", check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"vidlora: error: {file}: ") and "weight(s) missing" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_hunyuan_single_block_at_real_hidden_size(tmp_path):
    """diffusers splits single_blocks.N.linear1 with a hard-coded 3072, so this case needs the real width:
    24 heads x 128, one single block, no double or refiner block, mlp_ratio 1, bf16 (~150 M parameters)."""
    cfg = hv_config(
        num_attention_heads=24,
        attention_head_dim=128,
        rope_axes_dim=(16, 56, 56),
        num_layers=0,
        num_single_layers=1,
        num_refiner_layers=0,
        mlp_ratio=1.0,
    )
    torch.manual_seed(0)
    ref = HunyuanVideoTransformer3DModel(**cfg).to(torch.bfloat16).eval()
    path = folder_with(tmp_path, ref)
    file = tmp_path / "hv3072.safetensors"
    save_file(hunyuan_to_original(ref.state_dict()), file)
    family = get_family(ModelSection(family="hunyuan_video", path=path, transformer_file=str(file)))
    assert_same_model(ref, family.load_transformer(torch.bfloat16), hv_inputs(cfg, torch.bfloat16))


# --- pre-quantised files (ComfyUI / kijai fp8_scaled) ----------------------------------------------------------

# What kijai's and ComfyUI's fp8_scaled Wan files keep out of float8: norms, biases, embeddings, modulation.
KEEP_HIGH_PRECISION = ("norm", "bias", "time_", "patch_embedding", "img_emb", "modulation", "text_embedding")


def to_fp8_scaled(original: dict, scale_input: bool = True) -> dict:
    """An fp8_scaled file as ComfyUI/kijai write one: each 2-D Linear weight of the blocks and head as
    float8_e4m3fn with a per-tensor `scale_weight` (amax / 448; fp32 scalars here, bf16 [1] there, as both are
    seen), `scale_input` 1.0 (ComfyUI), the rest bf16 with modulation fp32, and the `scaled_fp8` marker."""
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for i, (key, value) in enumerate(sorted(original.items())):
        if key.endswith(".weight") and value.dim() == 2 and not any(k in key for k in KEEP_HIGH_PRECISION):
            module = key.removesuffix(".weight")
            scale = value.abs().amax().float() / 448
            out[key] = (value / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            out[f"{module}.scale_weight"] = scale if i % 2 else scale.to(torch.bfloat16).reshape(1)
            if scale_input:
                out[f"{module}.scale_input"] = torch.tensor(1.0)
        else:
            out[key] = value.to(torch.float32 if "modulation" in key else torch.bfloat16)
    return out


def wan_fp8_reference(tmp_path):
    cfg = wan_config()
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**cfg).eval()
    return ref, folder_with(tmp_path, ref), wan_to_original(ref.state_dict())


def test_wan_fp8_scaled_file_loads_dequantised_with_fp32_modules_kept(tmp_path, caplog):
    ref, path, original = wan_fp8_reference(tmp_path)
    scaled = to_fp8_scaled(original)
    quantised = [k for k, v in scaled.items() if v.dtype == torch.float8_e4m3fn and v.numel()]
    assert "blocks.0.self_attn.q.weight" in quantised and "blocks.1.ffn.2.weight" in quantised
    file = tmp_path / "wan2.1_t2v_tiny_fp8_scaled.safetensors"
    save_file(scaled, file)
    family = get_family(ModelSection(family="wan", path=path, transformer_file=str(file)))
    with caplog.at_level("INFO", logger="vidlora.models"):
        got = family.load_transformer(torch.bfloat16)
    assert "the base is quantised" in caplog.text and "scale_input" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING"]

    to_original = dict(zip(ref.state_dict(), original))  # diffusers name -> original name (same order)
    keep = WanTransformer3DModel._keep_in_fp32_modules
    for name, param in got.named_parameters():
        src, stored = ref.state_dict()[name], scaled[to_original[name]]
        if any(k in name.split(".") for k in keep):  # fp32 as from_pretrained keeps them, from the file's values
            assert param.dtype == torch.float32 and torch.equal(param, stored.float()), name
        else:
            assert param.dtype == torch.bfloat16, name
        if stored.dtype == torch.float8_e4m3fn:  # weight x scale, then the compute dtype
            scale = scaled[to_original[name].removesuffix(".weight") + ".scale_weight"].float()
            assert torch.equal(param, (stored.float() * scale).to(torch.bfloat16)), name
            # within e4m3's rounding (3 mantissa bits; subnormals below 2^-6 x scale) and bf16's of the source
            bound = src.abs() * (2**-4 + 2**-8) + scale * 2**-9
            assert ((param.float() - src).abs() <= bound).all(), name
    assert sum(scaled[to_original[n]].dtype == torch.float8_e4m3fn for n, _ in got.named_parameters()) == len(quantised)


def test_plain_float8_file_loads_and_says_the_base_is_quantised(tmp_path, caplog):
    ref, path, original = wan_fp8_reference(tmp_path)
    plain = {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in original.items()}
    file = tmp_path / "wan_fp8_e4m3fn.safetensors"
    save_file(plain, file)
    family = get_family(ModelSection(family="wan", path=path, transformer_file=str(file)))
    with caplog.at_level("INFO", logger="vidlora.models"):
        got = family.load_transformer(torch.float32)
    lines = [r.getMessage() for r in caplog.records if "quantised" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"{file}: ") and "float8" in lines[0]
    q = dict(zip(ref.state_dict(), original))["blocks.0.attn1.to_q.weight"]
    assert torch.equal(got.state_dict()["blocks.0.attn1.to_q.weight"], plain[q].float())


def test_malformed_scaled_fp8_files_are_refused_naming_the_file(tmp_path):
    _, path, original = wan_fp8_reference(tmp_path)
    scaled = to_fp8_scaled(original, scale_input=False)

    def load(name, sd):
        save_file(sd, tmp_path / name)
        family = get_family(ModelSection(family="wan", path=path, transformer_file=str(tmp_path / name)))
        return family.load_transformer(torch.bfloat16)

    lost = {k: v for k, v in scaled.items() if k != "blocks.1.ffn.0.scale_weight"}  # a scale lost in a merge
    with pytest.raises(
        UserError, match=r"lost.safetensors: malformed scaled-fp8.*without a scale_weight: blocks.1.ffn.0"
    ):
        load("lost.safetensors", lost)
    stray = {**scaled, "blocks.0.norm3.scale_weight": torch.tensor(0.5)}  # a scale for a bf16 weight
    with pytest.raises(UserError, match=r"stray.safetensors: malformed.*blocks.0.norm3.scale_weight scales a"):
        load("stray.safetensors", stray)
    vector = {**scaled, "blocks.0.self_attn.q.scale_weight": torch.ones(3)}
    with pytest.raises(UserError, match=r"vector.safetensors: malformed.*not one finite number \(shape \(3,\)\)"):
        load("vector.safetensors", vector)
    mixed = {
        **scaled,
        "blocks.0.self_attn.q.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8),
    }
    with pytest.raises(UserError, match=r"mixed.safetensors: ComfyUI mixed-precision quantised weights"):
        load("mixed.safetensors", mixed)
