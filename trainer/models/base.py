"""The seam every model family implements: one subclass of `ModelFamily` per file in trainer/models/.

The training loop, the cache writer and export only talk to this interface, so a new family is one file
plus one line in the registry. Diffusers does the heavy lifting: components load with `from_pretrained`,
prompts are encoded by the family's own pipeline (built without transformer and VAE), so training sees
exactly what inference feeds the transformer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from torch import nn

from data.cache import DTYPES  # noqa: F401 - re-exported: the dtypes of model weights
from trainer.config import ModelSection, RecipeError, UserError

if TYPE_CHECKING:
    from trainer.formats import FamilyNames

log = logging.getLogger("vidlora.models")


@dataclass(frozen=True)
class Denoiser:
    """One transformer of a family (most have one; Wan 2.2 A14B has a high- and a low-noise expert)."""

    component: str = "transformer"  # diffusers subfolder, and the pipeline's argument name
    label: str = ""  # "" for a family's only denoiser; names the expert in files, metrics and logs otherwise
    sigmas: tuple[float, float] = (0.0, 1.0)  # the noise levels it serves: low <= sigma < high (1.0 inclusive)

    @property
    def file_key(self) -> str:
        """The recipe key of its original single-file checkpoint (model.transformer_file, transformer_2_file)."""
        return f"{self.component}_file"

    @property
    def suffix(self) -> str:
        """What its adapter files carry after the name: `NAME_high_noise.safetensors`; nothing for a lone one."""
        return f"_{self.label}" if self.label else ""


class ModelFamily:
    """A model family: how to load it, what to cache for it, how to call its transformer, and what its LoRA files
    are called. Everything outside trainer/models/ asks the family; nothing else names one."""

    name: ClassVar[str]
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    transformer_class: ClassVar[type[nn.Module]]
    vae_class: ClassVar[type[nn.Module]]
    default_shift: ClassVar[float]  # flow-matching timestep shift used when the recipe sets none
    native_fps: ClassVar[float]  # frame rate the model was trained at; clips are resampled to it by default
    lora_presets: ClassVar[dict[str, str | list[str]]]  # peft target_modules per preset name; "default" required
    text_keys: ClassVar[tuple[str, ...]]  # tensors a text cache entry holds
    sample_defaults: ClassVar[dict[str, Any]] = {}  # extra pipeline arguments for samples
    # Folders of the model whose weights make the latent / text caches (a change there makes entries stale).
    vae_components: ClassVar[tuple[str, ...]] = ("vae",)
    text_components: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer")
    guidance_is_cfg: ClassVar[bool] = True  # the pipeline's guidance_scale is classifier-free (needs a negative)
    default_guidance: ClassVar[float | None] = None  # embedded guidance while training; None: no guidance input
    # Latent geometry: VAE compression (frames, height, width), latent channels, transformer patch (f, h, w).
    vae_stride: ClassVar[tuple[int, int, int]] = (4, 8, 8)
    latent_channels: ClassVar[int] = 16
    patch: ClassVar[tuple[int, int, int]] = (1, 2, 2)
    # LoRA files: module names in every export layout, and released models by hidden size (for adapter headers).
    lora_names: ClassVar[FamilyNames]
    variants: ClassVar[dict[int, str]] = {}
    # A family with several transformers: expert label (`Denoiser.label`) -> diffusers component it runs.
    expert_components: ClassVar[dict[str, str]] = {}
    # Benchmarks (scripts/bench_train.py): name -> (transformer config, text tokens, where it was published).
    bench_presets: ClassVar[dict[str, tuple[dict[str, Any], int, str]]] = {}

    def __init__(self, cfg: ModelSection):
        if cfg.guidance is not None and self.default_guidance is None:
            raise RecipeError(f"model.guidance: the {self.name} family's transformer has no guidance input")
        self.cfg = cfg

    @property
    def guidance(self) -> float | None:
        return self.cfg.guidance or self.default_guidance

    @classmethod
    def bucket_step(cls) -> int:
        """Bucket sides are multiples of this: the VAE's spatial stride times the patch size."""
        return cls.vae_stride[1] * cls.patch[1]

    @classmethod
    def claims_lora(cls, modules: set[str]) -> bool:
        """Whether a LoRA file with these (diffusers) modules is this family's rather than that of the first family
        registered with the same name tables (e.g. image cross-attention makes a Wan LoRA an I2V one)."""
        return False

    @classmethod
    def lora_reader_notes(cls, fmt: str, file_modules: set[str], modules: set[str]) -> list[str]:
        """What readers of such a file should know (a loader that will not read it, or only partly): `file_modules`
        are the names in the file's layout, `modules` the diffusers names they stand for."""
        return []

    @classmethod
    def patch_of(cls, config: dict[str, Any]) -> tuple[int, int, int]:
        """The patch (frames, height, width) of a transformer config."""
        return tuple(config["patch_size"])

    @classmethod
    def step_ops(cls, config: dict[str, Any], latent: tuple[int, int, int, int], t: int) -> list:
        """Every matrix product of one forward pass for one sample, for trainer/perf.py's FLOPs count."""
        raise NotImplementedError

    @classmethod
    def random_text(cls, config: dict[str, Any], batch_size: int, tokens: int, g: torch.Generator) -> dict:
        """Random text inputs shaped like a collated batch, for benchmarks."""
        raise NotImplementedError

    def denoisers(self) -> tuple[Denoiser, ...]:
        """The transformers this family denoises with, in the pipeline's order."""
        return (Denoiser(),)

    def trained_denoisers(self) -> tuple[Denoiser, ...]:
        """The ones a run trains (`model.experts`): all, or the expert whose label starts with high / low."""
        all_ = self.denoisers()
        if self.cfg.experts == "both":
            return all_
        chosen = tuple(d for d in all_ if d.label.startswith(self.cfg.experts))
        if not chosen:
            raise RecipeError(
                f"model.experts = {self.cfg.experts!r}: the {self.name} family has one transformer; use 'both'"
            )
        return chosen

    # --- loading -------------------------------------------------------------------------------------
    def _from_pretrained(self, cls: Any, subfolder: str, dtype: torch.dtype) -> Any:
        return cls.from_pretrained(self.cfg.path, subfolder=subfolder, revision=self.cfg.revision, dtype=dtype)

    def load_transformer(self, dtype: torch.dtype, denoiser: Denoiser | None = None) -> nn.Module:
        """A transformer (the first denoiser's by default) from the diffusers folder, or from an original single-file
        checkpoint."""
        denoiser = denoiser or self.denoisers()[0]
        file = getattr(self.cfg, denoiser.file_key, None)
        if file:
            return load_single_file(self.transformer_class, file, self.cfg, dtype, denoiser.component)
        return self._from_pretrained(self.transformer_class, denoiser.component, dtype)

    def load_vae(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """What the VAE pass of `prepare` needs: the VAE, plus any encoder the family's conditions need from
        pixels (Wan I2V's image encoder), so they share the pass and never meet the text encoder."""
        return self._from_pretrained(self.vae_class, "vae", dtype)

    def vae_module(self, loaded: nn.Module) -> nn.Module:
        """The autoencoder inside what `load_vae` returned (a family may load more for its VAE pass)."""
        return loaded

    def load_text_pipeline(self, dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
        """The family's pipeline with tokenizers and text encoders only (no transformer, no VAE)."""
        return self.pipeline_class.from_pretrained(
            self.cfg.path, revision=self.cfg.revision, transformer=None, vae=None, dtype=dtype
        )

    def load_pipeline(self, dtype: torch.dtype, denoisers: dict[str, nn.Module] | None = None) -> DiffusionPipeline:
        """A full pipeline for samples, around given (LoRA-wrapped) transformers by component name, the model's own
        for the others (single files included)."""
        given = denoisers or {}
        own = {d.component: self.load_transformer(dtype, d) for d in self.denoisers() if d.component not in given}
        return self.pipeline_class.from_pretrained(
            self.cfg.path, revision=self.cfg.revision, dtype=dtype, **own, **given
        )

    def load_adapters(self, pipe: DiffusionPipeline, files: dict[str, str | Path]) -> None:
        """Load exported diffusers-format adapters (by component) into a pipeline, as diffusers' users do: the
        second transformer's with `load_into_transformer_2=True`."""
        for component, file in files.items():
            extra = {} if component == "transformer" else {f"load_into_{component}": True}
            pipe.load_lora_weights(str(file), **extra)

    def sample_kwargs(self, image: str | Path | None, height: int, width: int) -> dict[str, Any]:
        """Pipeline arguments a sample needs besides prompt, size, frames, steps and generator."""
        if image is not None:
            raise UserError(f"{self.name} generates from text only; --image is for image-to-video families")
        return dict(self.sample_defaults)

    # --- caching -------------------------------------------------------------------------------------
    def encode_video(self, vae: nn.Module, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixels [B,3,F,H,W] in [-1, 1] -> {"latents": normalised latents [B,C,f,h,w], ...conditions}."""
        raise NotImplementedError

    def decode_video(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of `encode_video`: cached latents [B,C,f,h,w] -> pixels [B,3,F,H,W] in [-1, 1]."""
        raise NotImplementedError

    def encode_prompts(self, text_pipe: DiffusionPipeline, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        """One dict of tensors per prompt (named by `text_keys`), trimmed of padding to keep caches small."""
        raise NotImplementedError

    def collate_text(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad and stack cached text tensors into the batch the transformer expects."""
        raise NotImplementedError

    # --- training ------------------------------------------------------------------------------------
    def predict(
        self, transformer: nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The transformer's flow prediction (noise - data) for noisy latents at `sigmas` in (0, 1)."""
        raise NotImplementedError

    def validation_kwargs(
        self, text: dict[str, torch.Tensor], negative: dict[str, torch.Tensor] | None
    ) -> dict[str, Any]:
        """Pipeline arguments that stand in for the prompt (and negative prompt): the cached embeddings,
        batched as the transformer sees them in training, so validation never loads the text encoder."""
        kwargs: dict[str, Any] = dict(self.collate_text([text]))
        if negative is not None:
            kwargs.update({f"negative_{k}": v for k, v in self.collate_text([negative]).items()})
        return kwargs

    # --- tiny models for the demo and the tests ------------------------------------------------------
    @classmethod
    def make_tiny(cls, out_dir: Path, seed: int = 0) -> Path:
        """Write a tiny randomly initialised model folder that `pipeline_class.from_pretrained` loads."""
        raise NotImplementedError


class Denoisers(nn.Module):
    """The transformers a run trains, as one module, so accelerate, DDP and DeepSpeed prepare, checkpoint and shard
    them together; each call runs one of them (by component name) through the family's transformer call."""

    def __init__(self, family: ModelFamily, models: dict[str, nn.Module]):
        super().__init__()
        self.family = family
        self.experts = nn.ModuleDict(models)

    def forward(
        self, component: str, noisy: torch.Tensor, sigmas: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return self.family.predict(self.experts[component], noisy, sigmas, batch)


def pad_stack(tensors: list[torch.Tensor], length: int | None = None) -> torch.Tensor:
    """Stack [L_i, ...] tensors, zero-padding dim 0 on the right to `length` (default: the longest)."""
    length = length or max(t.shape[0] for t in tensors)
    out = tensors[0].new_zeros((len(tensors), length, *tensors[0].shape[1:]))
    for i, t in enumerate(tensors):
        out[i, : min(length, t.shape[0])] = t[:length]
    return out


# Prefixes original checkpoints carry in front of the transformer's keys (ComfyUI, ComfyUI full checkpoints).
SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The transformer tensors of an original checkpoint, with known prefixes stripped. `.safetensors`, or a
    torch file opened with `weights_only=True` (never unpickling code); HunyuanVideo's
    `mp_rank_00_model_states.pt` nests its weights under "module"."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: transformer_file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(path)
    elif path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (non-zip) torch files cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses pickled code: say so instead of a traceback
            raise UserError(f"{path}: not a plain tensor checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
        for key in ("module", "state_dict", "model"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
    else:
        raise UserError(f"{path}: transformer_file must be .safetensors or a torch .pt/.pth file")
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"{path}: holds no state dict of tensors")
    for prefix in SINGLE_FILE_PREFIXES:
        if any(k.startswith(prefix) for k in sd):  # a full checkpoint: keep the transformer's part only
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    return sd


def load_single_file(
    cls: Any, file: str | Path, cfg: ModelSection, dtype: torch.dtype, subfolder: str = "transformer"
) -> nn.Module:
    """An original-layout checkpoint through diffusers' `from_single_file`, with `cfg.path`'s transformer config
    (offline, no model-type guessing). diffusers fails on a missing or misnamed key with an opaque meta-tensor
    error, so the keys are converted and checked here first and a mismatch names the keys."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    config = cls.load_config(cfg.path, subfolder=subfolder, revision=cfg.revision)
    with init_empty_weights():
        expected = cls.from_config(config).state_dict()
    sd = read_checkpoint(file)
    if set(sd) != set(expected):
        convert = SINGLE_FILE_LOADABLE_CLASSES[cls.__name__]["checkpoint_mapping_fn"]
        try:
            sd = convert(checkpoint=sd, config=config)
        except Exception as e:  # noqa: BLE001 - diffusers' converters fail with bare KeyError/RuntimeError
            raise UserError(
                f"{file}: cannot convert to a {cls.__name__} ({type(e).__name__}: {str(e)[:200]})"
            ) from None
    missing = sorted(set(expected) - set(sd))
    wrong = sorted(k for k in set(expected) & set(sd) if sd[k].shape != expected[k].shape)
    if missing or wrong:
        detail = []
        if missing:
            detail.append(f"{len(missing)} weight(s) missing: {', '.join(missing[:6])}")
        if wrong:
            k = wrong[0]
            detail.append(f"{len(wrong)} of another shape, e.g. {k} {tuple(sd[k].shape)} != {tuple(expected[k].shape)}")
        raise UserError(f"{file}: does not match the transformer config of {cfg.path}: {'; '.join(detail)}")
    extra = sorted(set(sd) - set(expected))
    if extra:
        log.warning("%s: %d key(s) not in the transformer are ignored: %s", file, len(extra), ", ".join(extra[:6]))
    sd = {k: sd[k] for k in expected}
    model = cls.from_single_file(sd, config=cfg.path, subfolder=subfolder, config_revision=cfg.revision, dtype=dtype)
    on_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if on_meta:
        raise UserError(f"{file}: weights not loaded: {', '.join(on_meta[:6])}")
    return model
