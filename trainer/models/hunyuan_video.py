"""HunyuanVideo (13B) text-to-video in diffusers layout.

Text: the pipeline's own `encode_prompt` (Llama hidden_states[-3] of the prompt inside the official template,
cropped after the template's prefix; CLIP-L `pooler_output`). The transformer builds its joint attention mask from
the number of valid text tokens only (the first N), so the cache keeps just the valid tokens and each batch is
padded on the right to its longest caption: less to store, less attention to compute, identical outputs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from torch import nn

from trainer.config import UserError
from trainer.formats import FamilyNames
from trainer.models.base import ModelFamily, pad_stack
from trainer.perf import Attention, Matmul, grid_tokens

_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_ADD_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
_REFINER = "context_embedder.token_refiner.refiner_blocks.{i}"
_TXT_REFINER = "txt_in.individual_token_refiner.blocks.{i}"
# ComfyUI builds HunyuanVideo from flux's layers: MLP embedders are `in_layer`/`out_layer`, MLPs `mlp.0`/`mlp.2`,
# modulations `*_mod.lin`. Its loader maps those internal names, plus the original spelling where a fixed list of
# replacements turns one into the other (`_mod.lin.` -> `_mod.linear.`, `mlp.0.` -> `mlp.fc1.`, `_attn.qkv.` ->
# `_attn_qkv.` ...); for the embedders it does not, so their comfyui and kohya names are ComfyUI's own.
_EMBEDDERS = {
    "time_in.mlp.0": "time_in.in_layer",
    "time_in.mlp.2": "time_in.out_layer",
    "guidance_in.mlp.0": "guidance_in.in_layer",
    "guidance_in.mlp.2": "guidance_in.out_layer",
    "txt_in.t_embedder.mlp.0": "txt_in.t_embedder.in_layer",
    "txt_in.t_embedder.mlp.2": "txt_in.t_embedder.out_layer",
    "txt_in.c_embedder.linear_1": "txt_in.c_embedder.in_layer",
    "txt_in.c_embedder.linear_2": "txt_in.c_embedder.out_layer",
}


def _kohya(internal: str, *also: str) -> tuple[str, ...]:
    """kohya names: ComfyUI's internal name with dots as underscores first (written), other spellings after (read)."""
    return (internal.replace(".", "_"), *also)


# Tencent/HunyuanVideo hyvideo/modules/models.py <-> diffusers transformer_hunyuan_video.py (the table of diffusers'
# lora_conversion_utils._convert_hunyuan_video_lora_to_diffusers).
HUNYUAN_VIDEO_NAMES = FamilyNames(
    name_map=(
        (tuple(f"transformer_blocks.{{i}}.{p}" for p in _QKV), "double_blocks.{i}.img_attn_qkv"),
        (tuple(f"transformer_blocks.{{i}}.{p}" for p in _ADD_QKV), "double_blocks.{i}.txt_attn_qkv"),
        ("transformer_blocks.{i}.attn.to_out.0", "double_blocks.{i}.img_attn_proj"),
        ("transformer_blocks.{i}.attn.to_add_out", "double_blocks.{i}.txt_attn_proj"),
        ("transformer_blocks.{i}.ff.net.0.proj", "double_blocks.{i}.img_mlp.fc1"),
        ("transformer_blocks.{i}.ff.net.2", "double_blocks.{i}.img_mlp.fc2"),
        ("transformer_blocks.{i}.ff_context.net.0.proj", "double_blocks.{i}.txt_mlp.fc1"),
        ("transformer_blocks.{i}.ff_context.net.2", "double_blocks.{i}.txt_mlp.fc2"),
        ("transformer_blocks.{i}.norm1.linear", "double_blocks.{i}.img_mod.linear"),
        ("transformer_blocks.{i}.norm1_context.linear", "double_blocks.{i}.txt_mod.linear"),
        (
            (*(f"single_transformer_blocks.{{i}}.{p}" for p in _QKV), "single_transformer_blocks.{i}.proj_mlp"),
            "single_blocks.{i}.linear1",
        ),
        ("single_transformer_blocks.{i}.proj_out", "single_blocks.{i}.linear2"),
        ("single_transformer_blocks.{i}.norm.linear", "single_blocks.{i}.modulation.linear"),
        ("x_embedder.proj", "img_in.proj"),
        ("time_text_embed.timestep_embedder.linear_1", "time_in.mlp.0"),
        ("time_text_embed.timestep_embedder.linear_2", "time_in.mlp.2"),
        ("time_text_embed.guidance_embedder.linear_1", "guidance_in.mlp.0"),
        ("time_text_embed.guidance_embedder.linear_2", "guidance_in.mlp.2"),
        ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
        ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
        ("context_embedder.proj_in", "txt_in.input_embedder"),
        ("context_embedder.time_text_embed.timestep_embedder.linear_1", "txt_in.t_embedder.mlp.0"),
        ("context_embedder.time_text_embed.timestep_embedder.linear_2", "txt_in.t_embedder.mlp.2"),
        ("context_embedder.time_text_embed.text_embedder.linear_1", "txt_in.c_embedder.linear_1"),
        ("context_embedder.time_text_embed.text_embedder.linear_2", "txt_in.c_embedder.linear_2"),
        (f"{_REFINER}.attn.to_out.0", f"{_TXT_REFINER}.self_attn_proj"),
        (f"{_REFINER}.ff.net.0.proj", f"{_TXT_REFINER}.mlp.fc1"),
        (f"{_REFINER}.ff.net.2", f"{_TXT_REFINER}.mlp.fc2"),
        (f"{_REFINER}.norm_out.linear", f"{_TXT_REFINER}.adaLN_modulation.1"),
        ("proj_out", "final_layer.linear"),
    ),
    kohya_names={
        "double_blocks.{i}.img_mod.linear": _kohya("double_blocks.{i}.img_mod.lin", "double_blocks_{i}_img_mod_linear"),
        "double_blocks.{i}.txt_mod.linear": _kohya("double_blocks.{i}.txt_mod.lin", "double_blocks_{i}_txt_mod_linear"),
        "double_blocks.{i}.img_mlp.fc1": _kohya("double_blocks.{i}.img_mlp.0", "double_blocks_{i}_img_mlp_fc1"),
        "double_blocks.{i}.img_mlp.fc2": _kohya("double_blocks.{i}.img_mlp.2", "double_blocks_{i}_img_mlp_fc2"),
        "double_blocks.{i}.txt_mlp.fc1": _kohya("double_blocks.{i}.txt_mlp.0", "double_blocks_{i}_txt_mlp_fc1"),
        "double_blocks.{i}.txt_mlp.fc2": _kohya("double_blocks.{i}.txt_mlp.2", "double_blocks_{i}_txt_mlp_fc2"),
        "single_blocks.{i}.modulation.linear": _kohya(
            "single_blocks.{i}.modulation.lin", "single_blocks_{i}_modulation_linear"
        ),
        f"{_TXT_REFINER}.mlp.fc1": _kohya(f"{_TXT_REFINER}.mlp.0", f"{_TXT_REFINER}.mlp.fc1".replace(".", "_")),
        f"{_TXT_REFINER}.mlp.fc2": _kohya(f"{_TXT_REFINER}.mlp.2", f"{_TXT_REFINER}.mlp.fc2".replace(".", "_")),
        **{o: _kohya(c, o.replace(".", "_")) for o, c in _EMBEDDERS.items()},
    },
    comfyui_names=_EMBEDDERS,
    not_exportable={
        "norm_out.linear": "final_layer.adaLN_modulation.1 stores shift/scale swapped and diffusers' converter also "
        "permutes lora_A's rows, so no original-layout file loads correctly",
        **{
            f"{_REFINER}.{p}": "the token refiner's fused self_attn_qkv is split "
            "by diffusers' converter as if lora_A were fused too"
            for p in _QKV
        },
    },
    fused_rest=frozenset({"single_blocks.{i}.linear1"}),
)


HUNYUAN_13B = {
    "in_channels": 16,
    "out_channels": 16,
    "num_attention_heads": 24,
    "attention_head_dim": 128,
    "num_layers": 20,
    "num_single_layers": 40,
    "num_refiner_layers": 2,
    "mlp_ratio": 4.0,
    "patch_size": 2,
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "guidance_embeds": True,
    "text_embed_dim": 4096,
    "pooled_projection_dim": 768,
    "rope_theta": 256.0,
    "rope_axes_dim": (16, 56, 56),
}
# peft full-matches these against module names. Anchored at the block lists on purpose: a bare `to_q` would also
# wrap the token refiner (context_embedder.token_refiner...), whose fused original layout cannot be exported.
HV_ATTENTION = (
    r"(transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v))"
)
HV_MLP = (
    r"(transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
    r"|single_transformer_blocks\.\d+\.(proj_mlp|proj_out))"
)
HV_DOUBLE = r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)|(ff|ff_context)\.net\.(0\.proj|2))"
HV_SINGLE = r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)"


class VideoStreamRouting:
    """Token routing hooks of HunyuanVideo's and 1.5's blocks (with `ModelFamily`, which they override): a block
    returns (video, text), and its attention takes the routed tokens' per-sample RoPE (`PerSampleRope`)."""

    @classmethod
    def route_block_output(cls, out: tuple[torch.Tensor, torch.Tensor], put_back) -> tuple[torch.Tensor, torch.Tensor]:
        video, text = out  # the routed video tokens go back into the full sequence, the text stays
        return put_back(video), text

    @classmethod
    def route_span(cls, blocks: list[nn.Module]) -> None:
        route_attention(blocks)


class HunyuanVideo(VideoStreamRouting, ModelFamily):
    name = "hunyuan_video"
    pipeline_class = HunyuanVideoPipeline
    transformer_class = HunyuanVideoTransformer3DModel
    vae_class = AutoencoderKLHunyuanVideo
    default_shift = 7.0  # the official sampler's flow_shift; musubi-tuner trains HunyuanVideo video at 7 too
    native_fps = 24.0
    # Every Linear of the double- and single-stream blocks except the modulation (norm*.linear), as musubi-tuner
    # and diffusion-pipe train it; single blocks have no separate output projection: proj_out takes attention+MLP.
    lora_presets = {
        "default": f"({HV_ATTENTION}|{HV_MLP})",
        "attention": HV_ATTENTION,
        "double_blocks": HV_DOUBLE,
        "single_blocks": HV_SINGLE,
    }
    text_keys = ("prompt_embeds", "pooled_projections")
    text_length = 256  # Llama tokens after the template, as the pipeline encodes them
    # The distilled model is trained with guidance 1.0 (musubi-tuner, finetrainers) and sampled at 6.0 (official).
    default_guidance = 1.0
    sample_defaults = {"guidance_scale": 6.0}
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    guidance_is_cfg = False  # guidance_scale is the distilled model's embedded guidance, not CFG
    lora_names = HUNYUAN_VIDEO_NAMES
    variants = {3072: "HunyuanVideo-13B"}
    bench_presets = {
        "hunyuan-small": (  # the bench's "small" for the double/single-stream architecture
            {**HUNYUAN_13B, "num_attention_heads": 4, "attention_head_dim": 64, "rope_axes_dim": (16, 24, 24),
             "num_layers": 2, "num_single_layers": 2, "num_refiner_layers": 1, "text_embed_dim": 1024},
            256,
            "",
        ),
        "hunyuan-13b": (HUNYUAN_13B, 256, "hunyuanvideo-community/HunyuanVideo/transformer/config.json"),
    }  # fmt: skip

    @classmethod
    def patch_of(cls, config: dict) -> tuple[int, int, int]:
        return config["patch_size_t"], config["patch_size"], config["patch_size"]

    @classmethod
    def random_text(cls, config: dict, batch_size: int, tokens: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        return {
            "prompt_embeds": torch.randn(batch_size, tokens, config["text_embed_dim"], generator=g),
            "encoder_attention_mask": torch.ones(batch_size, tokens, dtype=torch.int64),
            "pooled_projections": torch.randn(batch_size, config["pooled_projection_dim"], generator=g),
        }

    @classmethod
    def lora_reader_notes(cls, fmt: str, file_modules: set[str], modules: set[str]) -> list[str]:
        """HunyuanVideo files diffusers' loader will not read (or silently ignores) although ComfyUI reads them."""
        if fmt == "kohya":
            return ["diffusers has no reader for HunyuanVideo kohya files"]
        if fmt != "comfyui":
            return []
        notes = []
        if not any("img_attn_qkv" in n for n in file_modules):
            notes.append(
                "no img_attn_qkv key: diffusers' HunyuanVideo loader does not recognise the original layout and "
                "silently loads nothing; use the diffusers format for diffusers"
            )
        comfy_only = sorted(n for n in file_modules if n.endswith(("in_layer", "out_layer")) and "vector_in" not in n)
        if comfy_only:
            notes.append(
                f"{', '.join(comfy_only[:4])}: ComfyUI's names for the embedders (ComfyUI maps no other), which "
                "diffusers' HunyuanVideo loader does not read; use the diffusers format for diffusers"
            )
        if any(n.startswith("single_blocks.") and n.endswith("linear1") for n in file_modules):
            notes.append(
                "single_blocks.N.linear1: diffusers' HunyuanVideo loader splits it assuming hidden size 3072 "
                "(the 13B model); other sizes load wrongly in diffusers"
            )
        return notes

    @classmethod
    def step_ops(cls, config: dict, latent: tuple[int, int, int, int], t: int) -> list[Matmul | Attention]:
        """Every matrix product of one forward pass for one sample (trainer/perf.py counts them)."""
        c = config
        d = c["num_attention_heads"] * c["attention_head_dim"]
        m = int(d * c["mlp_ratio"])
        dt, refiners, double, single = (
            c["text_embed_dim"],
            c["num_refiner_layers"],
            c["num_layers"],
            c["num_single_layers"],
        )
        n, p = grid_tokens(cls.patch_of(c), latent), math.prod(cls.patch_of(c))
        s = n + t  # single-stream blocks run on video and text tokens together
        frozen = {"input_grad": False}
        ops: list[Matmul | Attention] = [
            Matmul("x_embedder (conv)", n, c["in_channels"] * p, d, **frozen),
            # timestep + guidance embedders (256 -> d -> d) and the pooled-text projection, once per sample
            Matmul("time/guidance embedders linear_1", 1, 256, d, 1 + c["guidance_embeds"], **frozen),
            Matmul("time/guidance embedders linear_2", 1, d, d, 1 + c["guidance_embeds"], **frozen),
            Matmul("pooled text_embedder", 1, c["pooled_projection_dim"], d, **frozen),
            Matmul("pooled text_embedder.linear_2", 1, d, d, **frozen),
            # token refiner: its own time/text embedding, proj_in, and `refiners` self-attention blocks on the text
            Matmul("refiner time_text_embed", 1, 256 + d + dt + d, d, **frozen),
            Matmul("refiner proj_in", t, dt, d, **frozen),
            Matmul("refiner to_q/k/v/to_out", t, d, d, 4 * refiners, **frozen),
            Attention("refiner attn", t, t, d, refiners, grad=False),
            Matmul("refiner ff", t, d, 2 * 4 * d, refiners, **frozen),  # d->4d and 4d->d, mlp ratio 4
            Matmul("refiner norm_out", 1, d, 2 * d, refiners, **frozen),
        ]
        g = "transformer_blocks"
        for stream, tokens in (("", n), ("context ", t)):
            ops += [
                Matmul(f"double.0 {stream}q/k/v", tokens, d, d, 3, False, "attn", g),
                Matmul(f"double.N {stream}q/k/v", tokens, d, d, 3 * (double - 1), True, "attn", g),
                Matmul(f"double {stream}attn out", tokens, d, d, double, True, "attn", g),
                Matmul(f"double {stream}ff", tokens, d, m, double, True, "ffn", g),
                Matmul(f"double {stream}ff.net.2", tokens, m, d, double, True, "ffn", g),
                Matmul(f"double {stream}norm1 modulation", 1, d, 6 * d, double, False, None, g),
            ]
        ops.append(Attention("double joint attn", s, s, d, double, g))
        g = "single_transformer_blocks"
        ops += [
            Matmul("single norm modulation", 1, d, 3 * d, single, False, None, g),
            Matmul("single proj_mlp", s, d, m, single, True, "ffn", g),
            Matmul("single attn to_q/k/v", s, d, d, 3 * single, True, "attn", g),
            Attention("single attn", s, s, d, single, g),
            Matmul("single proj_out", s, d + m, d, single, True, "ffn", g),
            Matmul("norm_out modulation", 1, d, 2 * d, **frozen),
            Matmul("proj_out", n, d, c["out_channels"] * p),
        ]
        return ops

    @classmethod
    def routed_blocks(cls, transformer):
        # The single-stream blocks: video tokens in sequence (the text stream is a separate argument, joined inside).
        return transformer.single_transformer_blocks

    @classmethod
    def route_block_args(cls, args, pick):
        text, temb, mask, rope, *rest = args  # after hidden_states; rest: token replacement's inputs (unused here)
        n = mask.shape[-1] - text.shape[1]  # the key mask [B, 1, 1, video + text] of the joint attention
        mask = torch.cat([pick(mask[:, 0, 0, :n]), mask[:, 0, 0, n:]], 1)[:, None, None]
        return text, temb, mask, per_sample_rope(rope, pick), *rest

    @staticmethod
    def prompt_template(tokenizer) -> dict:
        """The official template with `crop_start` counted on this tokenizer (95 for llava-llama-3). Always passed
        explicitly: the pipeline's automatic count is wrong for tokenizers with a model_max_length."""
        prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
        return {"template": DEFAULT_PROMPT_TEMPLATE["template"], "crop_start": len(tokenizer(prefix).input_ids)}

    def encode_video(self, vae: nn.Module, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        # HunyuanVideo latents are only scaled (no shift); the pipeline divides by the same factor before decoding.
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
        return {"latents": latents * vae.config.scaling_factor}

    def decode_video(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.clamp(-1, 1)

    def encode_prompts(self, text_pipe: HunyuanVideoPipeline, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        encoder = text_pipe.text_encoder
        with torch.no_grad():
            embeds, pooled, mask = text_pipe.encode_prompt(
                prompt=prompts,
                prompt_template=self.prompt_template(text_pipe.tokenizer),
                max_sequence_length=self.text_length,
                device=encoder.device,
                dtype=encoder.dtype,
            )
        lengths = mask.sum(1)
        if not torch.equal(mask.bool(), torch.arange(mask.shape[1], device=mask.device)[None] < lengths[:, None]):
            raise UserError(f"{self.cfg.path}: the Llama tokenizer must pad on the right (padding_side='right')")
        return [
            {"prompt_embeds": e[:n].cpu(), "pooled_projections": p.cpu()}
            for e, p, n in zip(embeds, pooled, lengths.tolist())
        ]

    def collate_text(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        embeds = pad_stack([i["prompt_embeds"] for i in items])
        lengths = torch.tensor([i["prompt_embeds"].shape[0] for i in items])
        return {
            "prompt_embeds": embeds,
            "encoder_attention_mask": (torch.arange(embeds.shape[1])[None] < lengths[:, None]).long(),
            "pooled_projections": torch.stack([i["pooled_projections"] for i in items]),
        }

    def predict(self, transformer, noisy, sigmas, batch):
        dtype = noisy.dtype
        return transformer(
            hidden_states=noisy,
            timestep=sigmas * 1000,
            encoder_hidden_states=batch["prompt_embeds"].to(dtype),
            encoder_attention_mask=batch["encoder_attention_mask"].to(dtype),
            pooled_projections=batch["pooled_projections"].to(dtype),
            guidance=torch.full((noisy.shape[0],), self.guidance * 1000.0, device=noisy.device, dtype=dtype),
            return_dict=False,
        )[0]

    def validation_kwargs(self, text, negative):
        # The pipeline names the cached tensors differently from the transformer call.
        names = {"encoder_attention_mask": "prompt_attention_mask", "pooled_projections": "pooled_prompt_embeds"}
        kwargs = {}
        for prefix, item in (("", text), ("negative_", negative)):
            if item is not None:
                kwargs.update({prefix + names.get(k, k): v for k, v in self.collate_text([item]).items()})
        return kwargs

    def sample_kwargs(self, image, height, width):
        from transformers import AutoTokenizer

        tokenizer = self.pretrained(AutoTokenizer.from_pretrained, subfolder="tokenizer")
        return {**super().sample_kwargs(image, height, width), "prompt_template": self.prompt_template(tokenizer)}

    @classmethod
    def make_tiny(cls, out_dir: Path, seed: int = 0) -> Path:
        from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

        from trainer.models.tiny import clip_like_tokenizer, llama_like_tokenizer

        tokenizer = llama_like_tokenizer(DEFAULT_PROMPT_TEMPLATE["template"])
        tokenizer_2 = clip_like_tokenizer()
        torch.manual_seed(seed)
        transformer = HunyuanVideoTransformer3DModel(**tiny_transformer_config())
        vae = tiny_vae()
        text_encoder = LlamaModel(  # 3 layers at least: the pipeline reads hidden_states[-3]
            LlamaConfig(
                vocab_size=1000,
                hidden_size=16,
                intermediate_size=37,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=512,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        text_encoder_2 = CLIPTextModel(  # eos_token_id must be the tokenizer's (2 selects CLIP's legacy pooling)
            CLIPTextConfig(
                vocab_size=1000,
                hidden_size=8,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                projection_dim=32,
                max_position_embeddings=77,
                bos_token_id=tokenizer_2.bos_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
                pad_token_id=tokenizer_2.pad_token_id,
            )
        )
        pipe = HunyuanVideoPipeline(
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=cls.default_shift),
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        pipe.save_pretrained(out_dir)
        return Path(out_dir)


def tiny_vae() -> AutoencoderKLHunyuanVideo:
    """A 4-channel VAE with the real one's compression (8x spatial, 4x temporal) and scaling factor."""
    return AutoencoderKLHunyuanVideo(
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    )


# --- token routing (shared with HunyuanVideo 1.5) -------------------------------------------------------
def per_sample_rope(rope: tuple[torch.Tensor, torch.Tensor], pick) -> tuple[torch.Tensor, torch.Tensor]:
    """The routed tokens' RoPE cos and sin ([N, D] for the batch): [B, k, D], each sample's own positions."""
    return tuple(pick(r[None]) for r in rope)


def route_attention(blocks: list[nn.Module]) -> None:
    """Give each routed block's attention a processor that takes per-sample RoPE (`PerSampleRope`)."""
    for block in blocks:
        if not isinstance(block.attn.processor, PerSampleRope):
            block.attn.processor = PerSampleRope(block.attn.processor)


class PerSampleRope:
    """The attention processor of a routed block. Routed tokens have RoPE per sample ([B, k, D] cos and sin), which
    diffusers' apply_rotary_emb (one [N, D] table for the whole batch) cannot take: the block's own processor runs
    once per sample with that sample's table. Plain RoPE calls (validation, samples) go straight through."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __getattr__(self, name: str) -> Any:  # the attention backend and the rest: the wrapped processor's
        if name == "processor":
            raise AttributeError(name)
        return getattr(self.processor, name)

    def __setattr__(self, name: str, value: Any) -> None:  # so set_attention_backend reaches the wrapped processor
        if name == "processor":
            object.__setattr__(self, name, value)
        else:
            setattr(self.processor, name, value)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if image_rotary_emb is None or image_rotary_emb[0].ndim == 2:
            return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        cos, sin = image_rotary_emb
        each = [
            self.processor(
                attn,
                hidden_states[b : b + 1],
                None if encoder_hidden_states is None else encoder_hidden_states[b : b + 1],
                None if attention_mask is None else attention_mask[b : b + 1],
                (cos[b], sin[b]),
            )
            for b in range(hidden_states.shape[0])
        ]
        return tuple(torch.cat(parts) for parts in zip(*each))


def tiny_transformer_config(**overrides) -> dict:
    """diffusers' own test config for HunyuanVideo: hidden 20 (2 heads x 10), 1 double, 1 single, 1 refiner block."""
    return {
        "in_channels": 4,
        "out_channels": 4,
        "num_attention_heads": 2,
        "attention_head_dim": 10,
        "num_layers": 1,
        "num_single_layers": 1,
        "num_refiner_layers": 1,
        "patch_size": 1,
        "patch_size_t": 1,
        "guidance_embeds": True,
        "text_embed_dim": 16,
        "pooled_projection_dim": 8,
        "rope_axes_dim": (2, 4, 4),
        **overrides,
    }
