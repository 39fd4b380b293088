"""A stand-in for ComfyUI's LoRA loader, to check which keys of a LoRA file ComfyUI would apply.

ComfyUI is not installed here, so this re-derives its rules (comfy/lora.py ``model_lora_keys_unet`` and
``load_lora``, as described in shared/reference/lora_formats.md) from the model's own weight names. It deliberately
shares nothing with trainer/formats.py's export maps: a test that checks our exports against it proves something
only because the two were written from different sources.

- The model's weight names come from the documented original architectures (Wan-Video/Wan2.1 ``model.py``,
  Tencent/HunyuanVideo ``models.py``); tests check them against diffusers' own single-file converters.
- ComfyUI's internal names: Wan uses the original names. HunyuanVideo (comfy/ldm/hunyuan_video/model.py, built from
  flux's layers) uses ``img_mod.lin``, ``img_attn.qkv``, ``img_attn.proj``, ``img_mlp.0/.2``, ``modulation.lin``;
  every MLP embedder (``time_in``, ``vector_in``, ``guidance_in``, the token refiner's ``t_embedder`` and
  ``c_embedder``) is an ``MLPEmbedder`` with ``in_layer``/``out_layer``; the token refiner's blocks have
  ``self_attn.qkv``, ``self_attn.proj``, ``mlp.0/.2``, ``adaLN_modulation.1``.
- HunyuanVideo 1.5 is the same model class (model_base.HunyuanVideo15 subclasses HunyuanVideo, so its LoRA keys are
  mapped the same way) with double blocks only, no ``vector_in``/``guidance_in``, plus ``byt5_in``
  (``layernorm``, ``fc1..3``), ``vision_in.proj.0/1/3/4`` (Wan's MLPProj) and ``cond_type_embedding``. Tencent's
  checkpoints keep each double block's q, k, v apart; ComfyUI's repackaged ones fuse them (``img_attn_qkv``), as its
  flux-style blocks hold them (musubi-tuner splits them back when it reads a ComfyUI file).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

_LINEAR = (".weight", ".bias")


def _linear(name: str) -> list[str]:
    return [name + s for s in _LINEAR]


def wan_original_weights(num_layers: int, i2v: bool = False, cross_attn_norm: bool = True) -> list[str]:
    """Parameter names of a Wan 2.1 checkpoint (Wan-Video/Wan2.1 wan/modules/model.py)."""
    names = [*_linear("patch_embedding"), *_linear("head.head"), "head.modulation"]
    for layer in ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1"):
        names += _linear(layer)
    for i in range(num_layers):
        b = f"blocks.{i}"
        names.append(f"{b}.modulation")
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                names += _linear(f"{b}.{attn}.{proj}")
            names += [f"{b}.{attn}.norm_q.weight", f"{b}.{attn}.norm_k.weight"]
        if i2v:
            names += [*_linear(f"{b}.cross_attn.k_img"), *_linear(f"{b}.cross_attn.v_img")]
            names.append(f"{b}.cross_attn.norm_k_img.weight")
        if cross_attn_norm:
            names += _linear(f"{b}.norm3")
        names += [*_linear(f"{b}.ffn.0"), *_linear(f"{b}.ffn.2")]
    if i2v:
        for k in (0, 1, 3, 4):  # LayerNorm, Linear, GELU (no weights), Linear, LayerNorm
            names += _linear(f"img_emb.proj.{k}")
    return names


def hunyuan_video_original_weights(
    num_double: int, num_single: int, num_refiner: int, guidance: bool = True
) -> list[str]:
    """Parameter names of a HunyuanVideo checkpoint (Tencent/HunyuanVideo hyvideo/modules/models.py)."""
    names = [*_linear("img_in.proj"), *_linear("final_layer.linear"), *_linear("final_layer.adaLN_modulation.1")]
    for layer in ("time_in.mlp.0", "time_in.mlp.2", "vector_in.in_layer", "vector_in.out_layer"):
        names += _linear(layer)
    if guidance:
        names += [*_linear("guidance_in.mlp.0"), *_linear("guidance_in.mlp.2")]
    t = "txt_in"
    for layer in (
        "input_embedder",
        "t_embedder.mlp.0",
        "t_embedder.mlp.2",
        "c_embedder.linear_1",
        "c_embedder.linear_2",
    ):
        names += _linear(f"{t}.{layer}")
    for i in range(num_refiner):
        b = f"{t}.individual_token_refiner.blocks.{i}"
        for layer in ("norm1", "self_attn_qkv", "self_attn_proj", "norm2", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            names += _linear(f"{b}.{layer}")
    for i in range(num_double):
        b = f"double_blocks.{i}"
        for s in ("img", "txt"):
            for layer in ("mod.linear", "attn_qkv", "attn_proj", "mlp.fc1", "mlp.fc2"):
                names += _linear(f"{b}.{s}_{layer}")
            names += [f"{b}.{s}_attn_q_norm.weight", f"{b}.{s}_attn_k_norm.weight"]
    for i in range(num_single):
        b = f"single_blocks.{i}"
        names += [*_linear(f"{b}.linear1"), *_linear(f"{b}.linear2"), *_linear(f"{b}.modulation.linear")]
        names += [f"{b}.q_norm.weight", f"{b}.k_norm.weight"]
    return names


# Families on HunyuanVideo's 13B architecture: ComfyUI loads HunyuanVideo-I2V (both its 33-channel concat model and the
# token-replace one) into the same model class, so the same names.
HUNYUAN_13B = ("hunyuan_video", "hunyuan_video_i2v")


def hunyuan_video15_original_weights(num_double: int, num_refiner: int) -> list[str]:
    """Parameter names of a HunyuanVideo 1.5 checkpoint as ComfyUI's repackaged files name them (q, k, v fused)."""
    names = hunyuan_video_original_weights(num_double, 0, num_refiner, guidance=False)
    names = [n for n in names if not n.startswith("vector_in.")]
    for layer in (
        "byt5_in.layernorm",
        "byt5_in.fc1",
        "byt5_in.fc2",
        "byt5_in.fc3",
        *(f"vision_in.proj.{k}" for k in (0, 1, 3, 4)),
    ):
        names += _linear(layer)
    return [*names, "cond_type_embedding.weight"]


# diffusers' scripts/convert_hunyuan_video1_5_to_diffusers.py (not part of the installed package), transcribed:
# Tencent's module names -> diffusers'. Fused q, k, v layers are split into `_q`, `_k`, `_v` before these apply.
_HV15_TO_DIFFUSERS = (
    (r"img_in\.proj", "x_embedder.proj"),
    (r"time_in\.mlp\.([02])", lambda m: f"time_embed.timestep_embedder.linear_{int(m[1]) // 2 + 1}"),
    (r"txt_in\.input_embedder", "context_embedder.proj_in"),
    (
        r"txt_in\.t_embedder\.mlp\.([02])",
        lambda m: f"context_embedder.time_text_embed.timestep_embedder.linear_{int(m[1]) // 2 + 1}",
    ),
    (r"txt_in\.c_embedder\.linear_(\d)", r"context_embedder.time_text_embed.text_embedder.linear_\1"),
    (
        r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.norm(\d)",
        r"context_embedder.token_refiner.refiner_blocks.\1.norm\2",
    ),
    (
        r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.self_attn_([qkv])",
        r"context_embedder.token_refiner.refiner_blocks.\1.attn.to_\2",
    ),
    (
        r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.self_attn_proj",
        r"context_embedder.token_refiner.refiner_blocks.\1.attn.to_out.0",
    ),
    (
        r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.mlp\.fc1",
        r"context_embedder.token_refiner.refiner_blocks.\1.ff.net.0.proj",
    ),
    (
        r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.mlp\.fc2",
        r"context_embedder.token_refiner.refiner_blocks.\1.ff.net.2",
    ),
    (
        r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.adaLN_modulation\.1",
        r"context_embedder.token_refiner.refiner_blocks.\1.norm_out.linear",
    ),
    (r"byt5_in\.layernorm", "context_embedder_2.norm"),
    (r"byt5_in\.fc(\d)", r"context_embedder_2.linear_\1"),
    (r"vision_in\.proj\.0", "image_embedder.norm_in"),
    (r"vision_in\.proj\.1", "image_embedder.linear_1"),
    (r"vision_in\.proj\.3", "image_embedder.linear_2"),
    (r"vision_in\.proj\.4", "image_embedder.norm_out"),
    (r"cond_type_embedding", "cond_type_embed"),
    (r"double_blocks\.(\d+)\.img_mod\.linear", r"transformer_blocks.\1.norm1.linear"),
    (r"double_blocks\.(\d+)\.txt_mod\.linear", r"transformer_blocks.\1.norm1_context.linear"),
    (r"double_blocks\.(\d+)\.img_attn_([qkv])", r"transformer_blocks.\1.attn.to_\2"),
    (r"double_blocks\.(\d+)\.img_attn_([qk])_norm", r"transformer_blocks.\1.attn.norm_\2"),
    (r"double_blocks\.(\d+)\.img_attn_proj", r"transformer_blocks.\1.attn.to_out.0"),
    (r"double_blocks\.(\d+)\.txt_attn_([qkv])", r"transformer_blocks.\1.attn.add_\2_proj"),
    (r"double_blocks\.(\d+)\.txt_attn_([qk])_norm", r"transformer_blocks.\1.attn.norm_added_\2"),
    (r"double_blocks\.(\d+)\.txt_attn_proj", r"transformer_blocks.\1.attn.to_add_out"),
    (r"double_blocks\.(\d+)\.img_mlp\.fc1", r"transformer_blocks.\1.ff.net.0.proj"),
    (r"double_blocks\.(\d+)\.img_mlp\.fc2", r"transformer_blocks.\1.ff.net.2"),
    (r"double_blocks\.(\d+)\.txt_mlp\.fc1", r"transformer_blocks.\1.ff_context.net.0.proj"),
    (r"double_blocks\.(\d+)\.txt_mlp\.fc2", r"transformer_blocks.\1.ff_context.net.2"),
    (r"final_layer\.linear", "proj_out"),
    (r"final_layer\.adaLN_modulation\.1", "norm_out.linear"),  # shift/scale halves swapped
)


def hunyuan_video15_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A HunyuanVideo 1.5 state dict (Tencent's names, q/k/v split or fused) under diffusers' names."""
    split = {}
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        if module.endswith("_attn_qkv"):
            for x, part in zip("qkv", value.chunk(3, dim=0)):
                split[f"{module.removesuffix('qkv')}{x}.{param}"] = part
        else:
            split[key] = value
    out = {}
    for key, value in split.items():
        module, _, param = key.rpartition(".")
        pattern, target = next((p, t) for p, t in _HV15_TO_DIFFUSERS if re.fullmatch(p, module))
        if module == "final_layer.adaLN_modulation.1":
            shift, scale = value.chunk(2, dim=0)
            value = torch.cat([scale, shift], dim=0)
        out[f"{re.sub(pattern, target, module)}.{param}"] = value
    return out


# Original HunyuanVideo spelling -> ComfyUI's internal flux-style spelling (dots included so only whole parts match).
_HV_INTERNAL = (
    ("_mod.linear.", "_mod.lin."),
    ("_attn_qkv.", "_attn.qkv."),  # also the token refiner's self_attn_qkv
    ("_attn_proj.", "_attn.proj."),
    ("_mlp.fc1.", "_mlp.0."),
    ("_mlp.fc2.", "_mlp.2."),
    (".mlp.fc1.", ".mlp.0."),  # the token refiner's MLP
    (".mlp.fc2.", ".mlp.2."),
    (".modulation.linear.", ".modulation.lin."),
    ("time_in.mlp.0.", "time_in.in_layer."),
    ("time_in.mlp.2.", "time_in.out_layer."),
    ("guidance_in.mlp.0.", "guidance_in.in_layer."),
    ("guidance_in.mlp.2.", "guidance_in.out_layer."),
    ("t_embedder.mlp.0.", "t_embedder.in_layer."),
    ("t_embedder.mlp.2.", "t_embedder.out_layer."),
    ("c_embedder.linear_1.", "c_embedder.in_layer."),
    ("c_embedder.linear_2.", "c_embedder.out_layer."),
)


def original_weights(family: str, config: dict) -> list[str]:
    """Weight names of a family's original checkpoint for a diffusers transformer config. A new family adds its
    rules here, read from ComfyUI's own model code, so its exports are checked against ComfyUI too."""
    if family.startswith("wan"):
        i2v = config.get("added_kv_proj_dim") is not None
        return wan_original_weights(config["num_layers"], i2v=i2v, cross_attn_norm=config["cross_attn_norm"])
    if family.startswith("hunyuan_video15"):
        return hunyuan_video15_original_weights(config["num_layers"], config["num_refiner_layers"])
    if family in HUNYUAN_13B:
        return hunyuan_video_original_weights(
            config["num_layers"], config["num_single_layers"], config["num_refiner_layers"], config["guidance_embeds"]
        )
    raise ValueError(f"no ComfyUI rules for family {family!r}: add them to tests/comfyui_rules.py")


def comfyui_internal_weights(family: str, original_weights: Iterable[str]) -> list[str]:
    """ComfyUI's own weight names for a model given its original checkpoint weight names (see module docstring)."""
    if family.startswith("wan"):
        return list(original_weights)
    if not family.startswith("hunyuan_video"):
        raise ValueError(f"no ComfyUI rules for family {family!r}")
    out = []
    for name in original_weights:
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            continue  # flux norms hold `.scale`, not `.weight`
        out.append(hunyuan_internal_name(name))
    return out


def hunyuan_internal_name(original: str) -> str:
    name = original
    for old, new in _HV_INTERNAL:
        name = name.replace(old, new)
    return name


def original_names(family: str, original_weights: Iterable[str]) -> dict[str, str]:
    """ComfyUI's internal weight name -> the original checkpoint's, for a model's original weights."""
    originals = list(original_weights)
    return (
        dict(zip(comfyui_internal_weights(family, originals), originals))
        if family.startswith("wan")
        else {hunyuan_internal_name(o): o for o in originals}
    )


# ComfyUI's HunyuanVideo branch ("diffusion-pipe lora format"): internal spelling -> original spelling.
_HV_ORIGINAL_SPELLING = (
    ("_mod.lin.", "_mod.linear."),
    ("_attn.qkv.", "_attn_qkv."),
    ("_attn.proj.", "_attn_proj."),
    ("mlp.0.", "mlp.fc1."),
    ("mlp.2.", "mlp.fc2."),
    (".modulation.lin.", ".modulation.linear."),
)


def hunyuan_original_spelling(internal_weight: str) -> str:
    """The original HunyuanVideo spelling ComfyUI accepts for one of its internal weight names."""
    name = f"{internal_weight.removesuffix('.weight')}."
    for old, new in _HV_ORIGINAL_SPELLING:
        name = name.replace(old, new)
    suffix = ".weight" if internal_weight.endswith(".weight") else ""
    return name.removesuffix(".") + suffix


def comfyui_lora_key_map(family: str, internal_weights: Iterable[str]) -> dict[str, str]:
    """LoRA key prefix -> internal weight, as ComfyUI's ``model_lora_keys_unet`` builds it."""
    key_map = {}
    for weight in internal_weights:
        if not weight.endswith(".weight"):
            continue
        path = weight.removesuffix(".weight")
        key_map[f"diffusion_model.{path}"] = weight
        key_map[f"lora_unet_{path.replace('.', '_')}"] = weight
        if family.startswith("hunyuan_video"):  # ComfyUI's HunyuanVideo branch, which its 1.5 model class inherits
            original = hunyuan_original_spelling(path)
            key_map[f"transformer.{original}"] = weight
            key_map[f"diffusion_model.{original}"] = weight
    return key_map


# (up, down) suffix pairs ComfyUI's load_lora accepts, in the order it tries them.
_PAIRS = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
)


def comfyui_patches(
    sd: Mapping[str, torch.Tensor], key_map: Mapping[str, str]
) -> tuple[dict[str, list[torch.Tensor]], list[str]]:
    """(internal weight -> weight updates ComfyUI would add, keys ComfyUI would log as "lora key not loaded").

    Each update is ``up @ down * alpha / rank`` (scale 1 without ``.alpha``), flattened like ComfyUI's
    ``calculate_weight``; several LoRA keys landing on one weight give several updates.
    """
    loaded: set[str] = set()
    patches: dict[str, list[torch.Tensor]] = {}
    for prefix, weight in key_map.items():
        alpha_key = f"{prefix}.alpha"
        alpha = float(sd[alpha_key].item()) if alpha_key in sd else None
        if alpha_key in sd:
            loaded.add(alpha_key)
        for up_suffix, down_suffix in _PAIRS:
            up_key, down_key = prefix + up_suffix, prefix + down_suffix
            if up_key in sd:
                up, down = sd[up_key].float(), sd[down_key].float()
                scale = alpha / down.shape[0] if alpha is not None else 1.0
                patches.setdefault(weight, []).append(up.flatten(1) @ down.flatten(1) * scale)
                loaded.update((up_key, down_key))
                break
    return patches, sorted(k for k in sd if k not in loaded)


def _lora_update(sd: Mapping[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, set[str]] | None:
    """(up @ down, keys used) of a LoRA pair under ``prefix``, as ComfyUI's LoRA adapter finds it."""
    for up_suffix, down_suffix in _PAIRS:
        up_key, down_key = prefix + up_suffix, prefix + down_suffix
        if up_key in sd:
            return sd[up_key].float().flatten(1) @ sd[down_key].float().flatten(1), {up_key, down_key}
    return None


def _lycoris_update(sd: Mapping[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, int | None, set[str]] | None:
    """(update without alpha, the rank alpha divides by or None for 1, keys used) of a LoHa (``hada_*``: the Hadamard
    product of two low-rank pairs) or LoKr (``lokr_*``: the Kronecker product of two factors, each whole or a
    low-rank pair) under ``prefix``: ComfyUI's weight_adapter/loha.py and lokr.py for linear layers."""
    get = {k.removeprefix(prefix + "."): v.float() for k, v in sd.items() if k.startswith(prefix + ".")}
    if "hada_w1_a" in get:
        w1 = get["hada_w1_a"] @ get["hada_w1_b"]
        w2 = get["hada_w2_a"] @ get["hada_w2_b"]
        used = {f"{prefix}.hada_{k}" for k in ("w1_a", "w1_b", "w2_a", "w2_b")}
        return w1 * w2, get["hada_w1_b"].shape[0], used
    if not any(k.startswith("lokr_") for k in get):
        return None
    dim, factors, used = None, [], set()
    for w in ("w1", "w2"):
        if f"lokr_{w}" in get:
            factors.append(get[f"lokr_{w}"])
            used.add(f"{prefix}.lokr_{w}")
        else:  # a low-rank pair: its rank is what alpha divides by (w2's when both are pairs)
            factors.append(get[f"lokr_{w}_a"] @ get[f"lokr_{w}_b"])
            dim = get[f"lokr_{w}_b"].shape[0]
            used |= {f"{prefix}.lokr_{w}_a", f"{prefix}.lokr_{w}_b"}
    return torch.kron(*factors), dim, used


def comfyui_patched_weights(
    sd: Mapping[str, torch.Tensor], key_map: Mapping[str, str], weights: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(internal weight -> its value after ComfyUI applies the file at strength 1, keys it would not load), for LoRA
    pairs, LoHa and LoKr modules, each with an optional DoRA ``dora_scale``; ``weights``: the base weights by
    ComfyUI's internal names.

    ComfyUI's calculate_weight adds ``alpha * update`` (alpha = .alpha / rank, or 1 without .alpha; for LoKr with two
    whole factors always 1). With a ``dora_scale`` of one value per output row it instead sets the weight to
    ``(W + alpha * update) * dora_scale / (|W| + eps)``, |W| the row norm of the *base* weight (weight_decompose).
    """
    loaded: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for prefix, weight in key_map.items():
        alpha_key, dora_key = f"{prefix}.alpha", f"{prefix}.dora_scale"
        alpha = float(sd[alpha_key].item()) if alpha_key in sd else None
        found = _lora_update(sd, prefix)
        if found is not None:
            update, used = found
            scale = alpha / used_rank(sd, used) if alpha is not None else 1.0
        else:
            lycoris = _lycoris_update(sd, prefix)
            if lycoris is None:
                continue
            update, dim, used = lycoris
            scale = alpha / dim if alpha is not None and dim else 1.0
        loaded |= used | ({alpha_key} & set(sd))
        W = weights[weight].float()
        patched = W + scale * update.reshape(W.shape)
        if dora_key in sd:
            loaded.add(dora_key)
            d = sd[dora_key].float()
            assert d.shape[0] == W.shape[0], "only the output-axis DoRA scale is modelled here"
            norm = W.reshape(W.shape[0], -1).norm(dim=1, keepdim=True) + torch.finfo(W.dtype).eps
            patched = patched * (d / norm)
        out[weight] = patched
    return out, sorted(k for k in sd if k not in loaded)


def used_rank(sd: Mapping[str, torch.Tensor], used: set[str]) -> int:
    """The rank of a LoRA pair: rows of its down (A) matrix."""
    down = next(k for k in used if "down" in k or "lora_A" in k)
    return sd[down].shape[0]
