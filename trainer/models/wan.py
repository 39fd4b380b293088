"""Wan 2.1 text-to-video (1.3B, 14B) in diffusers layout."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from torch import nn

from trainer.formats import FamilyNames
from trainer.models.base import ModelFamily, pad_stack
from trainer.perf import Attention, Matmul, grid_tokens

WAN_ATTENTION = r".*blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
WAN_FFN = r".*blocks\.\d+\.ffn\.net\.(0\.proj|2)"

# Wan-Video/Wan2.1 wan/modules/model.py <-> diffusers transformer_wan.py (Wan 2.2 keeps the names). All renames are
# one-to-one; ComfyUI's internal names are the original ones.
WAN_NAMES = FamilyNames(
    name_map=(
        ("blocks.{i}.attn1.to_q", "blocks.{i}.self_attn.q"),
        ("blocks.{i}.attn1.to_k", "blocks.{i}.self_attn.k"),
        ("blocks.{i}.attn1.to_v", "blocks.{i}.self_attn.v"),
        ("blocks.{i}.attn1.to_out.0", "blocks.{i}.self_attn.o"),
        ("blocks.{i}.attn2.to_q", "blocks.{i}.cross_attn.q"),
        ("blocks.{i}.attn2.to_k", "blocks.{i}.cross_attn.k"),
        ("blocks.{i}.attn2.to_v", "blocks.{i}.cross_attn.v"),
        ("blocks.{i}.attn2.to_out.0", "blocks.{i}.cross_attn.o"),
        ("blocks.{i}.attn2.add_k_proj", "blocks.{i}.cross_attn.k_img"),
        ("blocks.{i}.attn2.add_v_proj", "blocks.{i}.cross_attn.v_img"),
        ("blocks.{i}.ffn.net.0.proj", "blocks.{i}.ffn.0"),
        ("blocks.{i}.ffn.net.2", "blocks.{i}.ffn.2"),
        ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
        ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
        ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
        ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
        ("condition_embedder.time_proj", "time_projection.1"),
        ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
        ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
        ("proj_out", "head.head"),
    ),
    not_exportable={
        "patch_embedding": "diffusers' Wan LoRA converter has no rule for patch_embedding in the original layout",
    },
    alpha_in_original=r"blocks\.\d+\.(self_attn|cross_attn|ffn)\.",
)
WAN_1_3B = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
# A block of a kohya file as diffusers' Wan converter requires it (it raises KeyError on any missing one).
_MUSUBI_WAN_BLOCK = [f"{a}_{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn_0", "ffn_2"]


def wan_reader_notes(fmt: str, file_modules: set[str]) -> list[str]:
    """Wan files diffusers' loader will not read although ComfyUI does."""
    if fmt == "comfyui" and not any(n.startswith("blocks.") for n in file_modules):
        return ["no block keys: diffusers' Wan converter fails on original-layout files without blocks.N keys"]
    if fmt == "kohya":
        blocks = {n.split("_")[1] for n in file_modules if n.startswith("blocks_")}
        full = {f"blocks_{b}_{m}" for b in blocks for m in _MUSUBI_WAN_BLOCK}
        if not blocks or not full <= file_modules or sorted(map(int, blocks)) != list(range(len(blocks))):
            return [
                "diffusers reads Wan kohya files only when blocks 0..N-1 each have self_attn and cross_attn "
                "q,k,v,o and ffn_0, ffn_2 (its converter raises KeyError otherwise)"
            ]
    return []


class Wan(ModelFamily):
    name = "wan"
    pipeline_class = WanPipeline
    transformer_class = WanTransformer3DModel
    vae_class = AutoencoderKLWan
    default_shift = 3.0  # Wan's own scheduler shift for 480p; musubi-tuner's default too
    native_fps = 16.0
    # Every Linear of the attention blocks (self- and cross-attention, FFN), as musubi-tuner and
    # diffusion-pipe train Wan; FFN keys also keep kohya exports readable by diffusers' converter.
    lora_presets = {"default": f"({WAN_ATTENTION}|{WAN_FFN})", "attention": WAN_ATTENTION}
    text_keys = ("prompt_embeds",)
    text_length = 512  # umT5 tokens the pipeline pads to; the padding is attended (no mask), so keep it
    sample_defaults = {"guidance_scale": 5.0}
    lora_names = WAN_NAMES
    variants = {1536: "Wan2.1-T2V-1.3B", 5120: "Wan2.1-T2V-14B"}
    bench_presets = {
        # Not a published model: Wan's architecture at a size where one CPU step takes a fraction of a second,
        # big enough that the training loop's own overhead would show next to the model's work.
        "small": (
            {**WAN_1_3B, "num_attention_heads": 4, "attention_head_dim": 64, "ffn_dim": 1024, "num_layers": 4,
             "text_dim": 1024},
            512,
            "",
        ),
        "wan-1.3b": (WAN_1_3B, 512, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers/transformer/config.json"),
        "wan-14b": (
            {**WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
            512,
            "Wan-AI/Wan2.1-T2V-14B-Diffusers/transformer/config.json",
        ),
    }  # fmt: skip

    @classmethod
    def lora_reader_notes(cls, fmt: str, file_modules: set[str], modules: set[str]) -> list[str]:
        notes = wan_reader_notes(fmt, file_modules)
        if not any(".attn2.add_" in m for m in modules):
            notes.append("no image cross-attention keys: T2V LoRA (also loads into I2V)")
        return notes

    @classmethod
    def step_ops(cls, config: dict, latent: tuple[int, int, int, int], t: int) -> list[Matmul | Attention]:
        """Every matrix product of one forward pass for one sample (trainer/perf.py counts them); Wan I2V's
        extra cross-attention to 257 image tokens is not counted (under 1% at 480p)."""
        c = config
        d, f, layers = c["num_attention_heads"] * c["attention_head_dim"], c["ffn_dim"], c["num_layers"]
        n, p = grid_tokens(cls.patch_of(c), latent), math.prod(cls.patch_of(c))
        g = "blocks"
        return [
            Matmul("patch_embedding (conv)", n, c["in_channels"] * p, d, input_grad=False),
            Matmul("time_embedder.linear_1", 1, c["freq_dim"], d, input_grad=False),
            Matmul("time_embedder.linear_2 + time_proj", 1, d, 7 * d, input_grad=False),
            Matmul("text_embedder.linear_1", t, c["text_dim"], d, input_grad=False),
            Matmul("text_embedder.linear_2", t, d, d, input_grad=False),
            # block 0's self-attention input comes from the frozen patch embedding: no gradient needed for it
            Matmul("blocks.0.attn1.to_q/k/v", n, d, d, 3, False, "attn", g, (0, 1)),
            Matmul("blocks.N.attn1.to_q/k/v", n, d, d, 3 * (layers - 1), True, "attn", g, (1, layers)),
            Attention("attn1 (self)", n, n, d, layers, g),
            Matmul("attn1.to_out + attn2.to_q", n, d, d, 2 * layers, True, "attn", g),
            Matmul("attn2.to_k/v (text)", t, d, d, 2 * layers, False, "attn", g),
            Attention("attn2 (cross, text)", n, t, d, layers, g),
            Matmul("attn2.to_out", n, d, d, layers, True, "attn", g),
            Matmul("ffn.net.0.proj", n, d, f, layers, True, "ffn", g),
            Matmul("ffn.net.2", n, f, d, layers, True, "ffn", g),
            Matmul("proj_out", n, d, c["out_channels"] * p),
        ]

    @classmethod
    def random_text(cls, config: dict, batch_size: int, tokens: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        """Random text inputs shaped like a collated batch (benchmarks)."""
        return {"prompt_embeds": torch.randn(batch_size, tokens, config["text_dim"], generator=g)}

    @classmethod
    def context_parallel_plan(cls) -> dict[str, Any]:
        """diffusers' own: the sequence split after the patch embedding (with the rotary embeddings; with TI2V-5B's
        per-token timesteps too), the text not split, the output gathered before the unpatchify."""
        return cls.transformer_class._cp_plan

    def shape_problem(self, width: int, height: int, frames: int) -> str | None:
        # Wan's RoPE table has rope_max_seq_len positions per axis of the patch grid: a longer axis fails inside
        # the transformer with "shape '[1, 1, N, -1]' is invalid".
        transformer, vae = self.config(self.transformer_class, "transformer"), self.config(self.vae_class, "vae")
        spatial, temporal = vae.get("scale_factor_spatial", 8), vae.get("scale_factor_temporal", 4)
        pt, ph, pw = transformer.get("patch_size", (1, 2, 2))
        grid = ((frames - 1) // temporal + 1) // pt, height // spatial // ph, width // spatial // pw
        limit = transformer.get("rope_max_seq_len", 1024)
        if max(grid) > limit:
            return f"its grid of {'x'.join(map(str, grid))} patches exceeds rope_max_seq_len = {limit} per axis"
        return None

    def encode_video(self, vae: nn.Module, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"latents": self.normalise(vae, vae.encode(pixels.to(vae.dtype)).latent_dist.mode())}

    def decode_video(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._mean_std(vae, latents.to(vae.dtype))
        return vae.decode(latents.to(vae.dtype) * std + mean).sample.clamp(-1, 1)

    @staticmethod
    def _mean_std(vae: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(like)
        return mean, torch.tensor(vae.config.latents_std).view(shape).to(like)

    @staticmethod
    def normalise(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Per-channel (x - mean) / std, the inverse of what WanPipeline does before decoding."""
        mean, std = Wan._mean_std(vae, latents)
        return (latents - mean) / std

    def encode_prompts(self, text_pipe: WanPipeline, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        with torch.no_grad():
            embeds, _ = text_pipe.encode_prompt(
                prompts,
                do_classifier_free_guidance=False,
                max_sequence_length=self.text_length,
                device=text_pipe.text_encoder.device,
            )
        mask = text_pipe.tokenizer(
            [prompt_clean(p) for p in prompts],
            padding="max_length",
            max_length=self.text_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).attention_mask
        return [{"prompt_embeds": e[:n].cpu()} for e, n in zip(embeds, mask.sum(1).tolist())]

    def collate_text(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": pad_stack([i["prompt_embeds"] for i in items], self.text_length)}

    def predict(self, transformer, noisy, sigmas, batch):
        return transformer(
            hidden_states=noisy,
            timestep=sigmas * 1000,
            encoder_hidden_states=batch["prompt_embeds"].to(noisy.dtype),
            return_dict=False,
        )[0]

    @classmethod
    def routed_blocks(cls, transformer):
        return transformer.blocks

    @classmethod
    def route_block_args(cls, args, pick):
        text, temb, rope = args  # a block's (hidden_states, encoder_hidden_states, temb, rotary_emb)
        if temb.ndim == 4:  # one timestep per token (TI2V-5B's expand_timesteps): [B, N, 6, D]
            temb = pick(temb)
        return text, temb, tuple(pick(r) for r in rope)  # RoPE cos, sin: [1, N, 1, head_dim]

    @classmethod
    def make_tiny(cls, out_dir: Path, seed: int = 0) -> Path:
        WanPipeline(**tiny_components(seed)).save_pretrained(out_dir)
        return Path(out_dir)


def tiny_components(seed: int = 0, **transformer_overrides) -> dict:
    """Tokenizer, umT5, VAE, transformer and scheduler of a tiny Wan (the I2V family adds its image encoder)."""
    from transformers import UMT5Config, UMT5EncoderModel

    from trainer.models.tiny import t5_like_tokenizer

    tokenizer = t5_like_tokenizer()
    torch.manual_seed(seed)
    umt5 = UMT5Config(
        vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        pad_token_id=0, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return {
        "tokenizer": tokenizer,
        "transformer": WanTransformer3DModel(**tiny_transformer_config(**transformer_overrides)),
        "vae": AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        ),
        "text_encoder": UMT5EncoderModel(umt5),
        "scheduler": UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    }


def tiny_transformer_config(**overrides) -> dict:
    """diffusers' own test config for Wan (2 blocks, 2 heads x 12, ~30k parameters), with the real model's RoPE
    table (1024 positions per axis, a few kB here) so it takes the shipped recipes' sizes."""
    return {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 32,
        "freq_dim": 256,
        "ffn_dim": 32,
        "num_layers": 2,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": 1024,
        **overrides,
    }
