"""HunyuanVideo 1.5 (8.3B) text-to-video in diffusers layout.

Text: the pipeline's own `encode_prompt`, two encoders. Qwen2.5-VL reads the caption inside the pipeline's chat
template (system message + caption) and gives `hidden_states[-3]`, cropped after the template's fixed 108-token
prefix; byT5 (Glyph-SDXL-v2) reads the quoted text of the caption (`Text "...". `), or nothing when there is none.
The transformer puts each stream's valid tokens first and masks the rest (they enter no attention), so the cache keeps
only the valid tokens of each and a batch pads them on the right with masks: the pipeline pads to 1000 + 256 tokens
and, for text-to-video, adds 729 all-zero image tokens that the transformer masks out; training gives the same
outputs from a few hundred tokens.

The transformer input is [noisy latents 32 | condition latents 32 | mask 1] on channels; for text-to-video the
condition and the mask are zeros (the pipeline's `prepare_cond_latents_and_mask`), so only the latents are cached.
Guidance is classifier-free through the pipeline's `guider` component (6.0 in the official configs).
"""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo15,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
)
from torch import nn

from trainer.config import UserError
from trainer.formats import FamilyNames
from trainer.models.base import ModelFamily, pad_stack
from trainer.models.hunyuan_video import HUNYUAN_VIDEO_NAMES, VideoStreamRouting, per_sample_rope
from trainer.perf import Attention, Matmul, grid_tokens

_DB = "transformer_blocks.{i}"
_REFINER = "context_embedder.token_refiner.refiner_blocks.{i}"
_TXT_REFINER = "txt_in.individual_token_refiner.blocks.{i}"
_QKV = tuple(f"{_DB}.attn.{p}" for p in ("to_q", "to_k", "to_v"))
_ADD_QKV = tuple(f"{_DB}.attn.{p}" for p in ("add_q_proj", "add_k_proj", "add_v_proj"))

# Tencent/HunyuanVideo-1.5 <-> diffusers transformer_hunyuan_video15.py (diffusers'
# scripts/convert_hunyuan_video1_5_to_diffusers.py; `from_single_file` has no converter for this model). Tencent's
# checkpoints keep each double block's q, k and v apart (`img_attn_q`); ComfyUI builds the model from HunyuanVideo's
# flux-style blocks, whose q, k, v are one layer, and its repackaged checkpoints (and musubi-tuner's reader of them)
# name it `img_attn_qkv` as HunyuanVideo's original checkpoints do. ComfyUI maps HunyuanVideo's original spelling onto
# its layers, so the comfyui and kohya files write the fused names; Tencent's split names are read too.
HV15_NAMES = FamilyNames(
    name_map=(
        (_QKV, "double_blocks.{i}.img_attn_qkv"),
        (_ADD_QKV, "double_blocks.{i}.txt_attn_qkv"),
        (f"{_DB}.attn.to_out.0", "double_blocks.{i}.img_attn_proj"),
        (f"{_DB}.attn.to_add_out", "double_blocks.{i}.txt_attn_proj"),
        (f"{_DB}.ff.net.0.proj", "double_blocks.{i}.img_mlp.fc1"),
        (f"{_DB}.ff.net.2", "double_blocks.{i}.img_mlp.fc2"),
        (f"{_DB}.ff_context.net.0.proj", "double_blocks.{i}.txt_mlp.fc1"),
        (f"{_DB}.ff_context.net.2", "double_blocks.{i}.txt_mlp.fc2"),
        (f"{_DB}.norm1.linear", "double_blocks.{i}.img_mod.linear"),
        (f"{_DB}.norm1_context.linear", "double_blocks.{i}.txt_mod.linear"),
        ("x_embedder.proj", "img_in.proj"),
        ("time_embed.timestep_embedder.linear_1", "time_in.mlp.0"),
        ("time_embed.timestep_embedder.linear_2", "time_in.mlp.2"),
        ("context_embedder.proj_in", "txt_in.input_embedder"),
        ("context_embedder.time_text_embed.timestep_embedder.linear_1", "txt_in.t_embedder.mlp.0"),
        ("context_embedder.time_text_embed.timestep_embedder.linear_2", "txt_in.t_embedder.mlp.2"),
        ("context_embedder.time_text_embed.text_embedder.linear_1", "txt_in.c_embedder.linear_1"),
        ("context_embedder.time_text_embed.text_embedder.linear_2", "txt_in.c_embedder.linear_2"),
        (tuple(f"{_REFINER}.attn.{p}" for p in ("to_q", "to_k", "to_v")), f"{_TXT_REFINER}.self_attn_qkv"),
        (f"{_REFINER}.attn.to_out.0", f"{_TXT_REFINER}.self_attn_proj"),
        (f"{_REFINER}.ff.net.0.proj", f"{_TXT_REFINER}.mlp.fc1"),
        (f"{_REFINER}.ff.net.2", f"{_TXT_REFINER}.mlp.fc2"),
        (f"{_REFINER}.norm_out.linear", f"{_TXT_REFINER}.adaLN_modulation.1"),
        ("context_embedder_2.linear_1", "byt5_in.fc1"),
        ("context_embedder_2.linear_2", "byt5_in.fc2"),
        ("context_embedder_2.linear_3", "byt5_in.fc3"),
        ("image_embedder.linear_1", "vision_in.proj.1"),
        ("image_embedder.linear_2", "vision_in.proj.3"),
        ("proj_out", "final_layer.linear"),
        # Tencent's split q, k, v (read only: a name's first row is the one written).
        *((p, f"double_blocks.{{i}}.img_attn_{x}") for p, x in zip(_QKV, "qkv")),
        *((p, f"double_blocks.{{i}}.txt_attn_{x}") for p, x in zip(_ADD_QKV, "qkv")),
    ),
    # ComfyUI's own names where it maps no original spelling (flux's MLP embedders and modulations): HunyuanVideo's.
    kohya_names=HUNYUAN_VIDEO_NAMES.kohya_names,
    comfyui_names=HUNYUAN_VIDEO_NAMES.comfyui_names,
    not_exportable={
        "norm_out.linear": "final_layer.adaLN_modulation.1 stores shift and scale in the other order",
    },
)
# Weights of an original checkpoint that no LoRA targets (norms, the condition-type embedding), original -> diffusers.
_OTHER_WEIGHTS = {
    "double_blocks.{i}.img_attn_q_norm": f"{_DB}.attn.norm_q",
    "double_blocks.{i}.img_attn_k_norm": f"{_DB}.attn.norm_k",
    "double_blocks.{i}.txt_attn_q_norm": f"{_DB}.attn.norm_added_q",
    "double_blocks.{i}.txt_attn_k_norm": f"{_DB}.attn.norm_added_k",
    f"{_TXT_REFINER}.norm1": f"{_REFINER}.norm1",
    f"{_TXT_REFINER}.norm2": f"{_REFINER}.norm2",
    "byt5_in.layernorm": "context_embedder_2.norm",
    "vision_in.proj.0": "image_embedder.norm_in",
    "vision_in.proj.4": "image_embedder.norm_out",
    "cond_type_embedding": "cond_type_embed",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # shift, scale -> scale, shift
}
_OTHER_PATTERNS = [(re.compile(re.escape(o).replace(r"\{i\}", r"(\d+)")), d) for o, d in _OTHER_WEIGHTS.items()]

# The published 8.3B transformer (hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v/transformer/config.json; the 720p
# and I2V models differ only in target_size and task_type).
HUNYUAN15_8B = {
    "in_channels": 65,
    "out_channels": 32,
    "num_attention_heads": 16,
    "attention_head_dim": 128,
    "num_layers": 54,
    "num_refiner_layers": 2,
    "mlp_ratio": 4.0,
    "patch_size": 1,
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "text_embed_dim": 3584,
    "text_embed_2_dim": 1472,
    "image_embed_dim": 1152,
    "rope_theta": 256.0,
    "rope_axes_dim": (16, 56, 56),
    "target_size": 640,
    "task_type": "t2v",
}
# peft full-matches these against module names; anchored at the double blocks so the token refiner stays frozen.
HV15_ATTENTION = (
    r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
)
HV15_MLP = r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
SYSTEM_MESSAGE = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"].default
HV13B_DOUBLE_BLOCKS = 20  # HunyuanVideo (13B) has 20 double blocks, HunyuanVideo 1.5 has 54


class HunyuanVideo15(VideoStreamRouting, ModelFamily):
    name = "hunyuan_video15"
    pipeline_class = HunyuanVideo15Pipeline
    transformer_class = HunyuanVideo15Transformer3DModel
    vae_class = AutoencoderKLHunyuanVideo15
    default_shift = 5.0  # the official 480p scheduler shift (720p: 9.0 for T2V, 7.0 for I2V)
    native_fps = 24.0
    # Every Linear of the double-stream blocks' attention and MLPs, no modulation (norm1*.linear), as musubi-tuner
    # and the official trainer's LoRA train it.
    lora_presets = {"default": f"({HV15_ATTENTION}|{HV15_MLP})", "attention": HV15_ATTENTION}
    text_keys = ("prompt_embeds", "prompt_embeds_2")
    image_tokens = 0  # context tokens from the input image (I2V: SigLIP's 729), for the FLOPs count
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    sample_defaults = {"guidance_scale": 6.0}  # the non-distilled models' guider (distilled ones: 1.0)
    vae_stride = (4, 16, 16)
    latent_channels = 32
    patch = (1, 1, 1)
    lora_names = HV15_NAMES
    variants = {2048: "HunyuanVideo-1.5-8.3B"}
    bench_presets = {
        "hunyuan15-small": (  # not published: the architecture at a size a CPU steps through in a fraction of a second
            {**HUNYUAN15_8B, "num_attention_heads": 4, "attention_head_dim": 64, "rope_axes_dim": (16, 24, 24),
             "num_layers": 4, "num_refiner_layers": 1, "text_embed_dim": 1024},
            256,
            "",
        ),
        "hunyuan15-8.3b": (HUNYUAN15_8B, 256, "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v/transformer/config.json"),
    }  # fmt: skip

    @classmethod
    def patch_of(cls, config: dict) -> tuple[int, int, int]:
        return config["patch_size_t"], config["patch_size"], config["patch_size"]

    @classmethod
    def claims_lora(cls, modules: set[str]) -> bool:
        """HunyuanVideo (13B) has the same double-block names: a block past its 20th, or a module only 1.5 has,
        tells a 1.5 file apart."""
        only_15 = ("time_embed.", "context_embedder_2.", "image_embedder.")
        blocks = [int(m.split(".")[1]) for m in modules if m.startswith("transformer_blocks.")]
        return any(m.startswith(only_15) for m in modules) or max(blocks, default=0) >= HV13B_DOUBLE_BLOCKS

    @classmethod
    def lora_reader_notes(cls, fmt: str, file_modules: set[str], modules: set[str]) -> list[str]:
        if fmt == "diffusers":
            return [
                "HunyuanVideo 1.5 pipelines have no load_lora_weights: load it with "
                "pipe.transformer.load_lora_adapter(FILE, prefix='transformer')"
            ]
        return ["for ComfyUI: diffusers reads only the diffusers format of HunyuanVideo 1.5"]

    @classmethod
    def step_ops(cls, config: dict, latent: tuple[int, int, int, int], t: int) -> list[Matmul | Attention]:
        """Every matrix product of one forward pass for one sample (trainer/perf.py counts them); `t` is the Qwen
        tokens. The byT5 stream is counted at its length without quoted text (one masked token)."""
        c = config
        d = c["num_attention_heads"] * c["attention_head_dim"]
        m = int(d * c["mlp_ratio"])
        dt, refiners, layers = c["text_embed_dim"], c["num_refiner_layers"], c["num_layers"]
        n, p = grid_tokens(cls.patch_of(c), latent), math.prod(cls.patch_of(c))
        glyph, image = 1, cls.image_tokens
        ctx = t + glyph + image  # the context stream of the double blocks: Qwen, byT5 and image tokens
        frozen = {"input_grad": False}
        ops: list[Matmul | Attention] = [
            Matmul("x_embedder (conv)", n, c["in_channels"] * p, d, **frozen),
            Matmul("time_embed linear_1", 1, 256, d, **frozen),
            Matmul("time_embed linear_2", 1, d, d, **frozen),
            # token refiner: its own time/text embedding, proj_in, and `refiners` self-attention blocks on the text
            Matmul("refiner time_text_embed", 1, 256 + d + dt + d, d, **frozen),
            Matmul("refiner proj_in", t, dt, d, **frozen),
            Matmul("refiner to_q/k/v/to_out", t, d, d, 4 * refiners, **frozen),
            Attention("refiner attn", t, t, d, refiners, grad=False),
            Matmul("refiner ff", t, d, 2 * 4 * d, refiners, **frozen),  # d->4d and 4d->d, mlp ratio 4
            Matmul("refiner norm_out", 1, d, 2 * d, refiners, **frozen),
            # byT5 projection (2048 wide whatever the model's width) and the image projection
            Matmul("context_embedder_2.linear_1/2", glyph, c["text_embed_2_dim"] + 2048, 2048, **frozen),
            Matmul("context_embedder_2.linear_3", glyph, 2048, d, **frozen),
            Matmul("image_embedder", image, c["image_embed_dim"], c["image_embed_dim"] + d, **frozen),
        ]
        g = "transformer_blocks"
        for stream, tokens in (("", n), ("context ", ctx)):
            live = layers - 1 if stream else layers  # no single-stream blocks follow: see below
            ops += [
                Matmul(f"block.0 {stream}q/k/v", tokens, d, d, 3, False, "attn", g),
                Matmul(f"block.N {stream}q/k/v", tokens, d, d, 3 * (layers - 1), True, "attn", g),
                Matmul(f"block {stream}norm1 modulation", 1, d, 6 * d, layers, False, None, g),
                Matmul(f"block {stream}attn out", tokens, d, d, live, True, "attn", g),
                Matmul(f"block {stream}ff", tokens, d, m, live, True, "ffn", g),
                Matmul(f"block {stream}ff.net.2", tokens, m, d, live, True, "ffn", g),
            ]
        ops += [  # the last block's context stream after attention is computed, but no gradient reaches it
            Matmul("last block context attn out", ctx, d, d, 1, True, "attn", g, backward=False),
            Matmul("last block context ff", ctx, d, m, 1, True, "ffn", g, backward=False),
            Matmul("last block context ff.net.2", ctx, m, d, 1, True, "ffn", g, backward=False),
        ]
        ops += [
            Attention("joint attn", n + ctx, n + ctx, d, layers, g),
            Matmul("norm_out modulation", 1, d, 2 * d, **frozen),
            Matmul("proj_out", n, d, c["out_channels"] * p),
        ]
        return ops

    @classmethod
    def random_text(cls, config: dict, batch_size: int, tokens: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        return {
            "prompt_embeds": torch.randn(batch_size, tokens, config["text_embed_dim"], generator=g),
            "prompt_embeds_mask": torch.ones(batch_size, tokens, dtype=torch.int64),
            "prompt_embeds_2": torch.randn(batch_size, 1, config["text_embed_2_dim"], generator=g),
            "prompt_embeds_mask_2": torch.zeros(batch_size, 1, dtype=torch.int64),  # no quoted text
        }

    # --- loading -------------------------------------------------------------------------------------
    def load_transformer(self, dtype: torch.dtype, denoiser=None) -> nn.Module:
        transformer = super().load_transformer(dtype, denoiser)
        if transformer.config.get("use_meanflow"):
            raise UserError(
                f"{self.cfg.path}: a step-distilled (MeanFlow) transformer; train a LoRA on the base model instead"
            )
        return transformer

    @classmethod
    def convert_single_file(cls, sd: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Tencent's checkpoint (or ComfyUI's repackaged one, q/k/v fused) -> diffusers names, by the LoRA name table
        for the layers it maps and `_OTHER_WEIGHTS` for the rest; keys it does not know are kept for the caller's
        check to name."""
        from trainer.formats import to_diffusers_names

        out: dict[str, torch.Tensor] = {}
        for key, value in sd.items():
            module, _, param = key.rpartition(".")
            other = next((t for p, t in _OTHER_PATTERNS if (m := p.fullmatch(module))), None)
            if other is not None:
                if module == "final_layer.adaLN_modulation.1":
                    shift, scale = value.chunk(2, dim=0)
                    value = torch.cat([scale, shift], dim=0)
                out[f"{other.replace('{i}', m.group(1)) if m.groups() else other}.{param}"] = value
                continue
            try:
                names = to_diffusers_names(cls.name, module)
            except ValueError:
                out[key] = value
                continue
            for name, part in zip(names, value.chunk(len(names), dim=0)):  # a fused layer's rows, part by part
                out[f"{name}.{param}"] = part
        return out

    def load_text_pipeline(self, dtype: torch.dtype = torch.float32, **without: None) -> HunyuanVideo15Pipeline:
        """The pipeline with its tokenizers and text encoders only. Its constructor reads the VAE's compression even
        when the VAE is None, so it is built around a weightless (meta) VAE that is dropped at once."""
        from accelerate import init_empty_weights

        with init_empty_weights():
            vae = self.vae_class.from_config(self.config(self.vae_class, "vae"))
        pipe = self.pretrained(self.pipeline_class.from_pretrained, transformer=None, vae=vae, dtype=dtype, **without)
        pipe.vae = None
        return pipe

    def load_adapters(self, pipe: HunyuanVideo15Pipeline, files: dict[str, str | Path]) -> None:
        """diffusers has no pipeline-level LoRA loader for HunyuanVideo 1.5: the transformer's own (peft) loader."""
        for component, file in files.items():
            getattr(pipe, component).load_lora_adapter(str(file), prefix="transformer")

    def run_pipeline(self, pipe: HunyuanVideo15Pipeline, **kwargs: Any) -> Any:
        """The pipeline's guidance is its `guider` component (ClassifierFreeGuidance), not a call argument."""
        guidance = kwargs.pop("guidance_scale", None)
        if guidance is not None:
            pipe.guider = pipe.guider.new(guidance_scale=guidance)
        return pipe(**kwargs)

    # --- caching -------------------------------------------------------------------------------------
    # The VAE's attention builds its causal mask for one video (diffusers 0.42: a batch of several fails with "doesn't
    # match the broadcast shape"), so videos go through it one at a time, as the pipelines do.
    def encode_video(self, vae: nn.Module, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        # Only scaled (no shift), as the pipelines scale the I2V image latent and unscale before decoding; mode()
        # keeps the cache deterministic.
        vae = self.vae_module(vae)
        latents = torch.cat([vae.encode(x[None].to(vae.dtype)).latent_dist.mode() for x in pixels])
        return {"latents": latents * vae.config.scaling_factor}

    def decode_video(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae_module(vae)
        latents = latents.to(vae.dtype) / vae.config.scaling_factor
        return torch.cat([vae.decode(z[None]).sample for z in latents]).clamp(-1, 1)

    def encode_prompts(self, text_pipe: HunyuanVideo15Pipeline, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        encoder = text_pipe.text_encoder
        with torch.no_grad():
            embeds, mask, embeds_2, mask_2 = text_pipe.encode_prompt(
                prompt=prompts, device=encoder.device, dtype=encoder.dtype, batch_size=len(prompts)
            )
        return [
            {"prompt_embeds": e[m.bool()].cpu(), "prompt_embeds_2": e2[m2.bool()].cpu()}
            for e, m, e2, m2 in zip(embeds, mask, embeds_2, mask_2)
        ]

    def collate_text(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Each stream's valid tokens padded on the right with its mask, under the pipeline's argument names (so the
        cached text also stands in for the prompt in validation). byT5 keeps one masked token when no caption of the
        batch has quoted text: the pipeline cannot take an empty stream."""
        out = {}
        for key, mask_key in (("prompt_embeds", "prompt_embeds_mask"), ("prompt_embeds_2", "prompt_embeds_mask_2")):
            lengths = torch.tensor([i[key].shape[0] for i in items])
            out[key] = pad_stack([i[key] for i in items], max(1, int(lengths.max())))
            out[mask_key] = (torch.arange(out[key].shape[1])[None] < lengths[:, None]).long()
        return out

    # --- training ------------------------------------------------------------------------------------
    def conditions(self, batch: dict[str, torch.Tensor], noisy: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(condition latents, mask) for the transformer's extra input channels: zeros for text-to-video."""
        b, _, f, h, w = noisy.shape
        return torch.zeros_like(noisy), noisy.new_zeros(b, 1, f, h, w)

    def image_embeds(self, transformer: nn.Module, batch: dict[str, torch.Tensor], noisy: torch.Tensor) -> torch.Tensor:
        """Text-to-video has no image tokens: the pipeline's 729 zero tokens are all masked, so none are passed."""
        return noisy.new_zeros(noisy.shape[0], 0, transformer.config.image_embed_dim)

    def predict(self, transformer, noisy, sigmas, batch):
        dtype = noisy.dtype
        return transformer(
            hidden_states=torch.cat([noisy, *self.conditions(batch, noisy)], dim=1),
            timestep=sigmas * 1000,
            encoder_hidden_states=batch["prompt_embeds"].to(dtype),
            encoder_attention_mask=batch["prompt_embeds_mask"],
            encoder_hidden_states_2=batch["prompt_embeds_2"].to(dtype),
            encoder_attention_mask_2=batch["prompt_embeds_mask_2"],
            image_embeds=self.image_embeds(transformer, batch, noisy),
            return_dict=False,
        )[0]

    @classmethod
    def routed_blocks(cls, transformer):
        return transformer.transformer_blocks  # double-stream only: video and text as separate streams

    @classmethod
    def route_block_args(cls, args, pick):
        text, temb, mask, rope = args  # the mask is the text's: attention pads it with the video tokens' own
        return text, temb, mask, per_sample_rope(rope, pick)

    # --- tiny model ----------------------------------------------------------------------------------
    @classmethod
    def make_tiny(cls, out_dir: Path, seed: int = 0) -> Path:
        cls.pipeline_class(**tiny_components(seed, task_type="t2v")).save_pretrained(out_dir)
        return Path(out_dir)


def tiny_components(seed: int = 0, **transformer_overrides: Any) -> dict[str, Any]:
    """Tokenizers, Qwen2.5-VL, byT5, VAE, transformer, scheduler and guider of a tiny HunyuanVideo 1.5, after
    diffusers' own pipeline test (the I2V family adds its image encoder). The VAE compresses as the real one
    (16x16 pixels, 4 frames) and the tokenizer counts the template's 108-token prefix as Qwen's does."""
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    from trainer.models.tiny import qwen_like_tokenizer

    tokenizer = qwen_like_tokenizer(SYSTEM_MESSAGE)
    tokenizer_2 = ByT5Tokenizer()  # byte-level: no vocabulary file to download
    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(**tiny_transformer_config(**transformer_overrides))
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8, 8),
        layers_per_block=1,
        spatial_compression_ratio=16,
        temporal_compression_ratio=4,
        downsample_match_channel=False,
        upsample_match_channel=False,
    )
    qwen = Qwen2_5_VLTextConfig(  # 3 layers at least: the pipeline reads hidden_states[-3]
        vocab_size=1000, hidden_size=16, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, rope_theta=1e6, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
    )  # fmt: skip
    byt5 = T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
    )  # fmt: skip
    return {
        "text_encoder": Qwen2_5_VLTextModel(qwen),
        "tokenizer": tokenizer,
        "transformer": transformer,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=HunyuanVideo15.default_shift),
        "text_encoder_2": T5EncoderModel(byt5),
        "tokenizer_2": tokenizer_2,
        "guider": ClassifierFreeGuidance(guidance_scale=HunyuanVideo15.sample_defaults["guidance_scale"]),
    }


def tiny_transformer_config(**overrides: Any) -> dict[str, Any]:
    """diffusers' own test config (1 double block, 2 heads x 8, 4 latent channels); target_size 64 makes the I2V
    pipeline keep the tiny recipes' 64x64 size."""
    return {
        "in_channels": 2 * 4 + 1,
        "out_channels": 4,
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "num_layers": 1,
        "num_refiner_layers": 1,
        "mlp_ratio": 2.0,
        "patch_size": 1,
        "patch_size_t": 1,
        "text_embed_dim": 16,
        "text_embed_2_dim": 32,
        "image_embed_dim": 12,
        "rope_axes_dim": (2, 2, 4),
        "target_size": 64,
        **overrides,
    }
