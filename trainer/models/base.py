"""The seam every model family implements: one subclass of `ModelFamily` per file in trainer/models/.

The training loop, the cache writer and export only talk to this interface, so a new family is one file
plus one line in the registry. Diffusers does the heavy lifting: components load with `from_pretrained`,
prompts are encoded by the family's own pipeline (built without transformer and VAE), so training sees
exactly what inference feeds the transformer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import torch
from diffusers import DiffusionPipeline
from torch import nn

from data.cache import DTYPES  # noqa: F401 - re-exported: the dtypes of model weights
from trainer.config import ModelSection, RecipeError, TrainSection, UserError

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


T = TypeVar("T")


@cache
def hub_source(path: str, revision: str | None) -> dict[str, Any]:
    """How to load `model.path`: a local folder as it is; a hub id from the hub, after one quick request proves it
    reachable (otherwise huggingface_hub retries for ~30 s on every file, then fails with a traceback), or from the
    local cache (`local_files_only`) when the hub cannot be reached but the model is there. Asked once per model."""
    from huggingface_hub import constants, get_session, snapshot_download
    from huggingface_hub.utils import validate_repo_id

    if Path(path).is_dir():
        return {"revision": revision}
    try:
        validate_repo_id(path)
    except ValueError:
        raise UserError(f"{path}: model.path is neither a folder nor a hub id") from None
    if constants.HF_HUB_OFFLINE:
        why = f"HF_HUB_OFFLINE is set and {path} is not in the local cache ({constants.HF_HUB_CACHE})"
    else:
        try:  # any HTTP answer, even 401/404, means the hub is there (from_pretrained then says what is wrong)
            get_session().head(f"{constants.ENDPOINT}/api/models/{path}", timeout=constants.HF_HUB_ETAG_TIMEOUT)
            return {"revision": revision}
        except Exception as e:  # noqa: BLE001 - connection, timeout, proxy or TLS errors of whichever HTTP client
            why = f"cannot reach the hub for {path} ({constants.ENDPOINT}: {type(e).__name__})"
    try:
        snapshot_download(path, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the local cache (or not that revision)
        if not constants.HF_HUB_OFFLINE:
            why += f" and it is not in the local cache ({constants.HF_HUB_CACHE})"
        raise UserError(
            f"{why}; use a local folder as model.path, or download it with the hub reachable "
            f"(hf download {path}) and set HF_HUB_OFFLINE=1"
        ) from None
    if not constants.HF_HUB_OFFLINE:
        log.warning("%s: using its copy in the local cache", why)
    return {"revision": revision, "local_files_only": True}


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
    # The text encoder also reads the conditioning image (HunyuanVideo-I2V's LLaVA): a text entry then belongs to a
    # (caption, first frame) pair, and `encode_prompts` is given the pictures.
    text_needs_image: ClassVar[bool] = False
    fp32_components: ClassVar[tuple[str, ...]] = ()  # pipeline components loaded in fp32 whatever the weight dtype
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
    # The pipeline gives the transformer one timestep per token (Wan 2.2 TI2V-5B's `expand_timesteps`), not per sample.
    per_token_timesteps: ClassVar[bool] = False
    # Benchmarks (scripts/bench_train.py): name -> (transformer config, text tokens, where it was published).
    bench_presets: ClassVar[dict[str, tuple[dict[str, Any], int, str]]] = {}

    def __init__(self, cfg: ModelSection):
        if cfg.guidance is not None and self.default_guidance is None:
            raise RecipeError(f"model.guidance: the {self.name} family's transformer has no guidance input")
        self.cfg = cfg
        self._configs: dict[str, dict[str, Any]] = {}

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
        registered with the same name tables (e.g. image cross-attention makes a Wan LoRA an I2V one), or than that of
        another family whose own tables explain the file's names as well (HunyuanVideo 1.5 and 13B share names)."""
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
    def pretrained(self, load: Callable[..., T], **kwargs: Any) -> T:
        """`load(model.path, revision=..., **kwargs)`: every component and config of the model loads through here,
        so where it comes from (a folder, the hub, the local cache) is decided in one place (`hub_source`)."""
        return load(self.cfg.path, **hub_source(self.cfg.path, self.cfg.revision), **kwargs)

    def _from_pretrained(self, cls: Any, subfolder: str, dtype: torch.dtype) -> Any:
        return self.pretrained(cls.from_pretrained, subfolder=subfolder, dtype=dtype)

    def config(self, cls: Any, subfolder: str) -> dict[str, Any]:
        """A component's config.json (no weights), read once."""
        if subfolder not in self._configs:
            self._configs[subfolder] = dict(self.pretrained(cls.load_config, subfolder=subfolder))
        return self._configs[subfolder]

    def load_transformer(self, dtype: torch.dtype, denoiser: Denoiser | None = None) -> nn.Module:
        """A transformer (the first denoiser's by default) from the diffusers folder, or from an original single-file
        checkpoint."""
        denoiser = denoiser or self.denoisers()[0]
        file = getattr(self.cfg, denoiser.file_key, None)
        if file:
            config = self.config(self.transformer_class, denoiser.component)
            return load_single_file(
                self.transformer_class, file, config, self.cfg.path, dtype, self.convert_single_file
            )
        return self._from_pretrained(self.transformer_class, denoiser.component, dtype)

    @classmethod
    def convert_single_file(cls, sd: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
        """An original checkpoint's tensors renamed to the diffusers transformer's: diffusers' own single-file
        converter for the transformer class (a family whose class diffusers cannot load from one file brings its own)."""
        from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

        if cls.transformer_class.__name__ not in SINGLE_FILE_LOADABLE_CLASSES:
            raise ValueError(f"diffusers has no single-file loader for {cls.transformer_class.__name__}")
        convert = SINGLE_FILE_LOADABLE_CLASSES[cls.transformer_class.__name__]["checkpoint_mapping_fn"]
        return convert(checkpoint=sd, config=config)

    def load_vae(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """What the VAE pass of `prepare` needs: the VAE, plus any encoder the family's conditions need from
        pixels (Wan I2V's image encoder), so they share the pass and never meet the text encoder."""
        return self._from_pretrained(self.vae_class, "vae", dtype)

    def vae_module(self, loaded: nn.Module) -> nn.Module:
        """The autoencoder inside what `load_vae` returned (a family may load more for its VAE pass)."""
        return loaded

    def load_text_pipeline(self, dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
        """The family's pipeline with tokenizers and text encoders only (no transformer, no VAE)."""
        return self.pretrained(self.pipeline_class.from_pretrained, transformer=None, vae=None, dtype=dtype)

    def load_pipeline(self, dtype: torch.dtype, denoisers: dict[str, nn.Module] | None = None) -> DiffusionPipeline:
        """A full pipeline for samples, around given (LoRA-wrapped) transformers by component name, the model's own
        for the others (single files included)."""
        given = denoisers or {}
        own = {d.component: self.load_transformer(dtype, d) for d in self.denoisers() if d.component not in given}
        return self.pretrained(
            self.pipeline_class.from_pretrained,
            **own,
            **given,
            dtype={"default": dtype, **dict.fromkeys(self.fp32_components, torch.float32)},
        )

    def load_adapters(self, pipe: DiffusionPipeline, files: dict[str, str | Path]) -> None:
        """Load exported diffusers-format adapters (by component) into a pipeline, as diffusers' users do: the
        second transformer's with `load_into_transformer_2=True`."""
        for component, file in files.items():
            extra = {} if component == "transformer" else {f"load_into_{component}": True}
            pipe.load_lora_weights(str(file), **extra)

    def shape_problem(self, width: int, height: int, frames: int) -> str | None:
        """Why the transformer cannot take videos of this size, or None when it can."""
        return None

    def check_shapes(self, shapes: Iterable[tuple[int, int, int]], what: str) -> None:
        """Refuse in one line the (width, height, frames) sizes the transformer cannot take: before prepare encodes,
        when training starts or before a sample, not as a shape error inside the model at step 1."""
        bad = [(s, p) for s in sorted(set(shapes)) if (p := self.shape_problem(*s)) is not None]
        if bad:
            (width, height, frames), problem = bad[0]
            more = f" (and {len(bad) - 1} more size(s))" if len(bad) > 1 else ""
            raise UserError(
                f"{what} {width}x{height}, {frames} frames: the transformer of {self.cfg.path} cannot take it: "
                f"{problem}{more}"
            )

    def sample_kwargs(self, image: str | Path | None, height: int, width: int) -> dict[str, Any]:
        """Pipeline arguments a sample needs besides prompt, size, frames, steps and generator."""
        if image is not None:
            raise UserError(f"{self.name} generates from text only; --image is for image-to-video families")
        return dict(self.sample_defaults)

    def validation_videos(
        self, train: TrainSection, image: str | Path | None, height: int, width: int
    ) -> list[tuple[str, dict[str, Any]]]:
        """The validation videos of one prompt: (file name suffix, `sample_kwargs`) each. One by default; a family
        that generates from text and from a first frame makes one of each mode it trains."""
        return [("", self.sample_kwargs(image, height, width))]

    def run_pipeline(self, pipe: DiffusionPipeline, **kwargs: Any) -> Any:
        """Call the pipeline of `load_pipeline` (or validation's) with `sample_kwargs` among `kwargs`. A family whose
        pipeline class depends on the inputs (text only, or a first frame) runs the right one on the same components;
        one whose pipeline takes some arguments another way (HunyuanVideo 1.5 keeps guidance in a guider) adapts them."""
        return pipe(**kwargs)

    # --- caching -------------------------------------------------------------------------------------
    def encode_video(self, vae: nn.Module, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixels [B,3,F,H,W] in [-1, 1] -> {"latents": normalised latents [B,C,f,h,w], ...conditions}."""
        raise NotImplementedError

    def decode_video(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of `encode_video`: cached latents [B,C,f,h,w] -> pixels [B,3,F,H,W] in [-1, 1]."""
        raise NotImplementedError

    def latent_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A pixel loss mask [F, H, W] in [0, 1] on the latent grid [1, f, h, w]: each latent's mean over the pixels it
        encodes. The VAEs are causal in time: the first frame has a latent of its own, then each `vae_stride[0]`."""
        st, sh, sw = self.vae_stride
        rest = mask[1:].reshape(-1, st, *mask.shape[1:]).mean(1)
        frames = torch.cat([mask[:1], rest])
        return torch.nn.functional.avg_pool2d(frames[:, None], (sh, sw))[:, 0][None]

    def encode_prompts(
        self, text_pipe: DiffusionPipeline, prompts: list[str], images: list[np.ndarray] | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """One dict of tensors per prompt (named by `text_keys`), trimmed of padding to keep caches small. A family
        with `text_needs_image` is also given each prompt's picture (uint8 [H, W, 3], at the video's size)."""
        raise NotImplementedError

    def collate_text(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad and stack cached text tensors into the batch the transformer expects."""
        raise NotImplementedError

    # --- training ------------------------------------------------------------------------------------
    @classmethod
    def random_conditions(cls, config: dict[str, Any], latents: torch.Tensor, g: torch.Generator) -> dict:
        """Random conditioning inputs (an I2V family's first-frame latent ...) for a batch of `latents`, for
        benchmarks; none by default."""
        return {}

    def check_train(self, train: TrainSection) -> None:
        """Refuse, when training starts, [train] settings this family cannot honour."""
        if train.ti2v != "t2v":
            raise RecipeError(
                f"train.ti2v = {train.ti2v!r}: the {self.name} family does not choose between text- and "
                "image-to-video (only a model that does both takes it)"
            )

    @classmethod
    def context_parallel_plan(cls) -> dict[str, Any] | None:
        """How diffusers splits the transformer's sequence across processes and gathers it back
        (train.context_parallel; a diffusers `_cp_plan`); None: the family cannot train context-parallel."""
        return None

    def draw_conditions(self, train: TrainSection, generators: list[torch.Generator]) -> dict[str, torch.Tensor]:
        """Per-sample choices of a training step besides noise level and noise (for a model that does text- and
        image-to-video: whether a sample is conditioned on its first frame), each drawn from its sample's generator
        after those, so they too depend on (seed, micro-step, slot) only. They join the batch that `predict` and
        `loss_weight` get. None by default."""
        return {}

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Weights of the flow loss, broadcastable to the latents: 0 where the pipeline does not use the prediction
        (a given first frame), so training ignores it there; None when every element counts."""
        return None

    def predict(
        self, transformer: nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The transformer's flow prediction (noise - data) for noisy latents at `sigmas` in (0, 1)."""
        raise NotImplementedError

    @classmethod
    def routed_blocks(cls, transformer: nn.Module) -> nn.ModuleList:
        """The blocks that take the video tokens in sequence (first argument [B, N, D]), of which token routing
        (trainer/routing.py) lets a span skip some tokens. Refused by default: a family opts in with this and
        `route_block_args`."""
        raise RecipeError(f"train.token_routing: the {cls.name} family does not support token routing")

    @classmethod
    def route_block_args(cls, args: tuple, pick: Callable[[torch.Tensor], torch.Tensor]) -> tuple:
        """A routed block's positional arguments after the token sequence, with every per-token one (RoPE, a
        per-token timestep) cut to the routed tokens by `pick` (token dimension 1, batch dimension B or 1)."""
        raise NotImplementedError

    @classmethod
    def route_block_output(cls, out: Any, put_back: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        """The routed span's last block output with its token sequence (the routed tokens) put back into the full
        sequence by `put_back`. By default a block returns the sequence alone."""
        return put_back(out)

    @classmethod
    def route_span(cls, blocks: list[nn.Module]) -> None:
        """Make the span's blocks take routed inputs (once, when routing is installed); nothing by default."""

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

    def __init__(
        self, family: ModelFamily, models: dict[str, nn.Module], routing_blocks: tuple[int, int] | None = None
    ):
        super().__init__()
        from trainer.routing import TokenRouter

        self.family = family
        self.experts = nn.ModuleDict(models)
        # Token routing (`train.token_routing`): hooks on each expert's span of blocks `routing_blocks`.
        self.routers = {c: TokenRouter(family, m, routing_blocks) for c, m in models.items()} if routing_blocks else {}

    def forward(
        self, component: str, noisy: torch.Tensor, sigmas: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        from trainer.routing import ROUTED

        if component in self.routers:  # the tokens this forward routes (None: the full model)
            self.routers[component].keep = batch.get(ROUTED)
        return self.family.predict(self.experts[component], noisy, sigmas, batch)

    @property
    def _no_split_modules(self) -> list[str]:
        """The experts' block classes: accelerate's FSDP2 gives each block its own shard group (the transformer's
        `_no_split_modules`, read from the prepared module, which is this one)."""
        return sorted({name for m in self.experts.values() for name in getattr(m, "_no_split_modules", None) or []})


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


# ComfyUI's "fp8_scaled" files (and kijai's): each quantised Linear stores `<module>.weight` in float8 and
# `<module>.scale_weight`, a per-tensor scale (the weight is the stored value times it), next to a `scaled_fp8`
# marker; `<module>.scale_input` is the activation scale of ComfyUI's fp8 matmul, not part of the weights.
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# ComfyUI's newer mixed-precision format (per-layer `comfy_quant` config, `weight_scale`, block-scaled fp8/fp4/int8
# layouts): refused rather than guessed at.
COMFY_QUANT_SUFFIXES = (".comfy_quant", ".weight_scale", ".weight_scale_2", ".input_scale")


def dequantise(sd: dict[str, torch.Tensor], file: str | Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Float8 weights of an original checkpoint as `dtype` values: times their `scale_weight` in a scaled file,
    plainly cast otherwise (float8 converts exactly to bf16/fp16/fp32). Anything that would load wrong is refused
    by name: training on unscaled fp8 values (0.2 stored as 448) is training on garbage."""
    quant = sorted(k for k in sd if k.endswith(COMFY_QUANT_SUFFIXES))
    if quant:
        raise UserError(
            f"{file}: ComfyUI mixed-precision quantised weights ({quant[0]}, ...) are not supported; "
            "use the model's bf16/fp16 file or an fp8_scaled one"
        )
    marker = sd.pop("scaled_fp8", None)
    scales = {k.removesuffix(".scale_weight"): sd.pop(k) for k in [k for k in sd if k.endswith(".scale_weight")]}
    inputs = [sd.pop(k) for k in [k for k in sd if k.endswith(".scale_input")]]
    float8 = sorted(k for k, v in sd.items() if v.dtype in FLOAT8)
    if not float8 and not scales and marker is None:
        return sd
    problems = []
    for module, scale in sorted(scales.items()):
        weight = sd.get(f"{module}.weight")
        if weight is None:
            problems.append(f"{module}.scale_weight has no {module}.weight")
        elif weight.dtype not in FLOAT8:
            problems.append(f"{module}.scale_weight scales a {weight.dtype} weight, not a float8 one")
        elif scale.numel() != 1 or not torch.isfinite(scale).all():
            problems.append(f"{module}.scale_weight is not one finite number (shape {tuple(scale.shape)})")
    scaled = bool(scales) or marker is not None
    unscaled = [k for k in float8 if k.removesuffix(".weight") not in scales] if scaled else []
    if unscaled:
        problems.append(f"{len(unscaled)} float8 tensor(s) without a scale_weight: {', '.join(unscaled[:4])}")
    if problems:
        raise UserError(f"{file}: malformed scaled-fp8 checkpoint: {'; '.join(problems[:3])}")
    for key in float8:
        scale = scales.get(key.removesuffix(".weight"))
        sd[key] = sd[key].to(dtype) if scale is None else (sd[key].float() * scale.float()).to(dtype)
    kind = "scaled fp8 (float8 x scale_weight)" if scaled else "float8"
    log.info(
        "%s: %d of %d tensors are %s: loaded as %s; the base is quantised (fp8 rounding)%s",
        file, len(float8), len(sd), kind, str(dtype).removeprefix("torch."),
        f"; {len(inputs)} scale_input (fp8-matmul activation scales) not used" if inputs else "",
    )  # fmt: skip
    return sd


def load_single_file(
    cls: Any,
    file: str | Path,
    config: dict,
    path: str,
    dtype: torch.dtype,
    convert: Callable[[dict[str, torch.Tensor], dict[str, Any]], dict[str, torch.Tensor]],
) -> nn.Module:
    """An original-layout checkpoint converted by `convert` (the family's `convert_single_file`: diffusers' own
    single-file converter for `cls` unless the family brings one), with the transformer `config` of the model at
    `path` (no model-type guessing). diffusers' `from_single_file` fails on a missing or misnamed key with an opaque
    meta-tensor error, so the keys are converted and checked here and a mismatch names the keys; the checked weights
    then go straight into the model."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls.from_config(config)
    expected = model.state_dict()
    sd = dequantise(read_checkpoint(file), file, dtype)
    if set(sd) != set(expected):
        try:
            sd = convert(sd, config)
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
        raise UserError(f"{file}: does not match the transformer config of {path}: {'; '.join(detail)}")
    extra = sorted(set(sd) - set(expected))
    if extra:
        log.warning("%s: %d key(s) not in the transformer are ignored: %s", file, len(extra), ", ".join(extra[:6]))
    # What from_pretrained does (from_single_file casts the whole model to `dtype`): the class's
    # `_keep_in_fp32_modules` in fp32, the rest in `dtype`, each tensor cast from the checkpoint's own value.
    keep = cls._keep_in_fp32_modules or []
    sd = {k: sd[k].to(torch.float32 if any(m in k.split(".") for m in keep) else dtype) for k in expected}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()
