"""The recipe schema: the one place where a setting is declared, with its default, type and meaning.

A recipe is a TOML file with the sections below. `load_recipe` validates it and turns any mistake into a
`RecipeError` whose message names the key and what is allowed, so the CLI can print one line instead of a
traceback. `docs/recipes.md` is generated from these classes (`python scripts/gen_recipe_docs.py`).
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class UserError(ValueError):
    """Bad input from the user (recipe, files, arguments): the CLI prints the message, no traceback."""


class RecipeError(UserError):
    """A recipe (or a --set override) is wrong; the message says which key and why."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    family: str = Field(
        default_factory=lambda: _default_family(),
        description="Model family: one of the registry in trainer/models (`vidlora make-tiny --help` lists them; "
        "docs/models.md describes each).",
    )
    path: str = Field(
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        description="Hugging Face hub id or local folder of the model in diffusers layout.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `path`.")
    transformer_file: str | None = Field(
        None,
        description="Original single-file transformer checkpoint to use instead of the one in `path` "
        "(.safetensors, ComfyUI prefixes allowed; .pt/.pth read with torch.load(weights_only=True)); `path` then "
        "supplies the config and the other components.",
    )
    transformer_2_file: str | None = Field(
        None,
        description="The same for the second transformer of a two-expert family (Wan 2.2 A14B: the low-noise "
        "expert, `transformer_2` in diffusers' layout).",
    )
    experts: Literal["both", "high", "low"] = Field(
        "both",
        description="For a family with two experts (Wan 2.2 A14B): train both in one run, one LoRA each, every step "
        "going to the expert of its noise level (both), or one expert per run on its range of noise levels (high, "
        "low). Families with one transformer take 'both'.",
    )
    guidance: float | None = Field(
        None,
        gt=0,
        description="Embedded guidance value fed to a guidance-distilled transformer while training (HunyuanVideo; "
        "the transformer gets it x1000); default: the family's (1.0). An error for families without one.",
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Dtype of the frozen weights: auto = bf16 on a GPU, fp32 on the CPU."
    )

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        from trainer.models import FAMILIES

        if value not in FAMILIES:
            raise ValueError(f"unknown family {value!r}; allowed: {', '.join(sorted(FAMILIES))}")
        return value


def _default_family() -> str:
    from trainer.models import DEFAULT_FAMILY

    return DEFAULT_FAMILY


class DatasetSection(Section):
    path: str = Field(description="Folder of clips/images with sidecar captions, or a .jsonl/.csv metadata file.")
    name: str | None = Field(None, description="Name in reports and cache; default: the folder or file name.")
    caption_extension: str = Field(".txt", description="Extension of sidecar caption files.")
    missing_caption: Literal["error", "skip", "use_default"] = Field(
        "error", description="What a file with a missing or empty caption gets."
    )
    default_caption: str | None = Field(None, description="Caption used when missing_caption = 'use_default'.")
    trigger: str | None = Field(
        None, description="Trigger word put in front of every caption (or replacing '[trigger]' in it)."
    )
    repeats: int = Field(1, ge=1, description="How many times each sample of this dataset is seen per epoch.")
    resolutions: list[int | tuple[int, int]] = Field(
        [480],
        min_length=1,
        description="Bucket pixel budgets: a side (480 = about 480x480 pixels) or [width, height] "
        "([832, 480] = Wan's 480p: 832x480, 480x832 and every ratio between at that area); sides snap to 16.",
    )
    max_aspect_ratio: float = Field(2.0, ge=1.0, description="Longest bucket side over shortest; wider is cropped.")
    target_frames: list[int] = Field(
        [81], min_length=1, description="Allowed clip lengths in frames, each 4k+1 (1 = a still image)."
    )
    frame_window: Literal["head", "chunk", "slide", "uniform", "full"] = Field(
        "head", description="How windows of target_frames are cut from a clip (see docs/data.md)."
    )
    frame_stride: int | None = Field(None, ge=1, description="Step between window starts for frame_window = 'slide'.")
    window_count: int = Field(1, ge=1, description="Windows per clip for frame_window = 'uniform'.")
    max_frames: int = Field(129, ge=1, description="Longest window for frame_window = 'full'.")
    target_fps: float | None = Field(
        None, gt=0, description="Resample clips to this frame rate; default: the family's native rate."
    )
    keep_source_fps: bool = Field(False, description="Keep every source frame (no resampling at all).")
    role: Literal["train", "regularisation"] = Field(
        "train",
        description="'regularisation': a prior-preservation dataset (e.g. what the base model makes of the class "
        "prompt): not part of the epoch; it fills `share` of each batch, and its loss is logged as loss_reg.",
    )
    share: float = Field(
        0.25, gt=0, lt=1, description="With role = 'regularisation': its share of the samples of each batch."
    )
    mask_weight: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Loss weight outside the loss masks (NAME.mask.png|mp4 next to a clip, or a `mask` metadata "
        "column: white counts, black gets this weight; see docs/data.md).",
    )

    @field_validator("target_frames")
    @classmethod
    def _four_k_plus_one(cls, value: list[int]) -> list[int]:
        bad = [f for f in value if f < 1 or (f - 1) % 4]
        if bad:
            raise ValueError(f"each must be 4k+1 (1, 5, 9, ..., 81); got {bad}")
        return value

    @field_validator("resolutions")
    @classmethod
    def _positive_sides(cls, value: list) -> list:
        if any(min(r if isinstance(r, tuple) else (r,)) < 16 for r in value):
            raise ValueError(f"each must be >= 16; got {value}")
        return value


class DataSection(Section):
    cache_dir: str = Field("cache", description="Where prepare writes latent and text-embedding caches.")
    datasets: list[DatasetSection] = Field(
        default_factory=list, description="One [[data.datasets]] table per source folder or metadata file."
    )
    cache_dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Dtype of cached latents/embeddings.")
    decode_workers: int = Field(2, ge=0, description="Processes decoding clips while the VAE encodes (0: inline).")
    vae_tiling: bool = Field(False, description="Encode large frames in tiles to save VAE memory.")
    encode_batch_size: int = Field(
        4, ge=1, description="Samples of one shape per VAE call; lower it if the VAE runs out of memory."
    )
    validation_prompts: list[str] = Field(
        default_factory=list, description="Prompts embedded at prepare time for validation samples."
    )

    @model_validator(mode="after")
    def _regularisation_shares(self) -> DataSection:
        regular = [d for d in self.datasets if d.role == "regularisation"]
        if regular and len(regular) == len(self.datasets):
            raise ValueError("every dataset has role = 'regularisation': at least one must be 'train'")
        if sum(d.share for d in regular) >= 1:
            raise ValueError(
                f"the regularisation datasets' shares add up to {sum(d.share for d in regular):g}; keep it under 1"
            )
        return self


class LoraSection(Section):
    kind: Literal["lora", "lokr", "loha", "dora"] = Field(
        "lora",
        description="Adapter kind, each peft's own: lora; dora (LoRA plus a learned magnitude per output row); lokr "
        "(Kronecker product) and loha (Hadamard product of two low-rank pairs), which diffusers cannot load: they "
        "export in the comfyui and kohya layouts only (see docs/export.md).",
    )
    rank: int = Field(32, ge=1, description="LoRA rank r.")
    alpha: float | None = Field(
        None, gt=0, description="LoRA alpha; the update is scaled by alpha / rank. Default: rank."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    targets: str | list[str] = Field(
        "default",
        description="A preset of the family (default, attention, ...), a list of module names, or a regex.",
    )
    init_from: str | list[str] | None = Field(
        None,
        description="Start from an existing adapter: a LoRA file in any format (vidlora, diffusers, ComfyUI, "
        "kohya/musubi), a run/checkpoint folder, or one file per expert (two-expert families; a lone adapter "
        "starts both). Its rank, alpha and targets are adopted unless set here; "
        "if set, the rank must match, another alpha rescales the weights (same update), and the targets must "
        "include the file's modules (see docs/export.md).",
    )


class TrainSection(Section):
    output_dir: str = Field("runs/vidlora", description="Run folder: checkpoints, metrics, final adapter.")
    max_steps: int = Field(1000, ge=1, description="Optimizer steps to train.")
    batch_size: int = Field(1, ge=1, description="Samples per micro-batch per process (one bucket per batch).")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate of AdamW.")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = Field("constant_with_warmup", description="Learning-rate schedule (diffusers.optimization names).")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables clipping).")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on a GPU that supports it, fp32 ('no') on the CPU."
    )
    seed: int = Field(42, description="Seed of data order, noise and timesteps.")
    timestep_sampling: Literal["uniform", "logit_normal", "sigmoid"] = Field(
        "logit_normal", description="Distribution of the flow-matching time t in (0, 1) before the shift."
    )
    shift: float | None = Field(None, gt=0, description="Timestep shift (higher = noisier); default: the family's.")
    logit_mean: float = Field(0.0, description="Mean of the normal for logit_normal sampling.")
    logit_std: float = Field(1.0, gt=0, description="Std of the normal for logit_normal sampling.")
    sigmoid_scale: float = Field(1.0, gt=0, description="Scale of the normal for sigmoid sampling.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="adamw (torch) or adamw8bit (bitsandbytes: 8-bit optimizer state, ~4x less of it)."
    )
    fp8_base: bool = Field(
        False,
        description="Store the frozen base weights in float8 (e4m3) and compute in the weight dtype: about half "
        "the weight memory of bf16. The LoRA stays fp32. Not with DeepSpeed.",
    )
    fp8_compute: Literal[False, "tensor", "row"] = Field(
        False,
        description="GPU with fp8 tensor cores (compute capability 8.9+): the frozen base's Linear layers in the "
        "transformer blocks multiply in float8 (e4m3) through torch._scaled_mm, with one scale per tensor "
        "('tensor') or per row ('row'); their input gradient and the LoRA stay in bf16/fp32. Refused elsewhere.",
    )
    block_offload: bool = Field(
        False,
        description="Keep the frozen base weights in CPU memory and move each layer to the GPU only while it "
        "runs (diffusers group offloading, leaf level); turns on gradient_checkpointing. For a transformer "
        "bigger than the GPU; slower. One process only.",
    )
    offload_inactive_expert: bool = Field(
        False,
        description="Two experts: keep the one a step does not train in CPU memory (moved back when its turn "
        "comes), so both fit one GPU; costs a transfer whenever the expert changes. One process only.",
    )
    expert_lr_scale: dict[str, float] = Field(
        default_factory=dict,
        description="Two experts: learning-rate factor per expert, e.g. {high_noise = 1.0, low_noise = 0.5} "
        "(default 1 for each).",
    )
    ti2v: Literal["t2v", "i2v", "mixed"] = Field(
        "t2v",
        description="For a model that generates from text and from a first frame (Wan 2.2 TI2V-5B): train "
        "text-to-video (t2v), image-to-video (i2v: each sample's first latent frame is its clean latent, with "
        "timestep 0, left out of the loss) or both (mixed: a share of the samples, `ti2v_i2v_share`, drawn per "
        "sample from the seed). Other families take only 't2v'.",
    )
    ti2v_i2v_share: float = Field(
        0.5, ge=0, le=1, description="With ti2v = 'mixed': the share of samples that are image-conditioned."
    )
    caption_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of samples trained on the empty prompt instead of their caption (drawn per sample and "
        "epoch from the seed); `vidlora prepare` embeds the empty prompt when this is above 0.",
    )
    max_nonfinite_in_row: int = Field(
        5, ge=1, description="Steps with a non-finite loss or gradient are skipped; this many in a row abort the run."
    )
    checkpoint_every: int = Field(250, ge=1, description="Save a resumable checkpoint every N optimizer steps.")
    checkpoints_keep: int = Field(3, ge=1, description="How many recent checkpoints to keep.")
    log_every: int = Field(10, ge=1, description="Log metrics (console, metrics.jsonl, wandb) every N optimizer steps.")
    dataloader_workers: int = Field(2, ge=0, description="DataLoader worker processes reading the cache.")
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Keep an exponential moving average of the LoRA weights with this decay (e.g. 0.999), updated "
        "after every optimizer step, saved in checkpoints and validated next to the raw weights (ema_val_loss, "
        "validation/ema/); `export.use_ema` makes it the run's adapter. Off by default.",
    )
    ema_on_cpu: bool = Field(False, description="Keep the EMA in CPU memory (saves GPU memory, costs a copy per step).")
    context_parallel: int = Field(
        1,
        ge=1,
        description="Processes that share each sample, its token sequence split between them (context "
        "parallelism, for a sample whose activations do not fit one GPU); 1 = off. Divides the processes "
        "launched; the rest is data parallel. Needs a family with a context-parallel plan (Wan). See "
        "docs/training.md.",
    )
    context_parallel_kind: Literal["ulysses", "ring"] = Field(
        "ulysses",
        description="How attention is split: 'ulysses' (all-to-all over the heads; the degree divides the "
        "attention heads) or 'ring' (key/value blocks passed around; needs a GPU attention backend that returns "
        "the log-sum-exp: train.attention_backend = '_native_cudnn', 'flash', ...).",
    )
    # speed switches, applied by trainer/perf.py (see docs/performance.md)
    compile: Literal[False, "blocks", "full"] = Field(
        False,
        description="torch.compile the transformer: false, 'blocks' (each repeated block, fast to compile) or "
        "'full' (the whole model).",
    )
    attention_backend: str = Field(
        "sdpa",
        description="'sdpa' (PyTorch scaled_dot_product_attention) or a diffusers attention backend such as "
        "'flash', '_flash_3', 'flex', 'xformers', '_native_cudnn' (its package must be installed).",
    )
    gradient_checkpointing_ratio: float = Field(
        1.0,
        gt=0,
        le=1,
        description="With gradient_checkpointing: the fraction of transformer blocks that recompute their "
        "activations (evenly spread); lower is faster and uses more memory.",
    )
    token_routing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Token routing (TREAD), training only: the share of each sample's video tokens that skip "
        "the `token_routing_blocks` span (drawn per sample from the seed) and rejoin after it; 0 = off. "
        "Families whose blocks take the video tokens in sequence (Wan; HunyuanVideo: its single-stream blocks; "
        "HunyuanVideo 1.5).",
    )
    token_routing_blocks: tuple[int, int] = Field(
        (2, -2),
        description="The span token routing skips: blocks [start, stop) as a Python slice (negative counts from "
        "the end) of the family's routed chain; default: all but the first two and the last two.",
    )

    @field_validator("attention_backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value == "sdpa":
            return value
        from diffusers.models.attention_dispatch import AttentionBackendName

        allowed = ["sdpa"] + [b.value for b in AttentionBackendName]
        if value not in allowed:
            raise ValueError(f"unknown attention backend {value!r}; allowed: {', '.join(allowed)}")
        return value


class LoggingSection(Section):
    wandb: bool = Field(True, description="Log to Weights & Biases (offline when no API key is configured).")
    wandb_mode: Literal["auto", "online", "offline"] = Field(
        "auto", description="auto = online when WANDB_API_KEY or a wandb login exists, else offline."
    )
    project: str = Field("vidlora", description="wandb project.")
    run_name: str | None = Field(None, description="wandb run name; default: the run folder's name.")


class ValidationSection(Section):
    every: int = Field(
        0,
        ge=0,
        description="Validate every N optimizer steps and at the last step (0: never): sample videos "
        "for data.validation_prompts and compute the held-out loss.",
    )
    at_start: bool = Field(False, description="Also validate before the first step (a baseline to compare with).")
    videos: bool = Field(True, description="Sample a video per validation prompt (needs data.validation_prompts).")
    num_frames: int = Field(17, ge=1, description="Frames of each validation video (4k+1).")
    width: int | None = Field(
        None, ge=16, description="Width of validation videos; default: the first training bucket."
    )
    height: int | None = Field(
        None, ge=16, description="Height of validation videos; default: the first training bucket."
    )
    images: list[str] = Field(
        default_factory=list,
        description="First frames for image-to-video validation videos (image-to-video families; with Wan 2.2 "
        "TI2V-5B, image-to-video videos next to the text-to-video ones): one image for all validation prompts, or "
        "one per prompt.",
    )
    inference_steps: int = Field(20, ge=1, description="Denoising steps per validation video.")
    guidance_scale: float | None = Field(
        None, ge=1.0, description="Classifier-free guidance of validation videos; default: the family's."
    )
    negative_prompt: str = Field(
        "", description="Negative prompt for validation videos, embedded by `vidlora prepare` with the prompts."
    )
    seed: int = Field(0, description="Seed of the validation videos and of the validation-loss noise.")
    holdout_clips: int = Field(
        0,
        ge=0,
        description="Hold the samples of this many source clips out of training for the validation loss (the "
        "same clips for every run on a cache: chosen by a hash of their paths).",
    )
    loss_cache_dir: str | None = Field(
        None, description="A cache prepared separately (same model) whose samples give the validation loss."
    )
    loss_sigmas: list[float] = Field(
        [0.1, 0.3, 0.5, 0.7, 0.9],
        min_length=1,
        description="Fixed noise levels of the validation loss; with fixed noise, runs are comparable.",
    )

    @field_validator("num_frames")
    @classmethod
    def _frames_four_k_plus_one(cls, value: int) -> int:
        if (value - 1) % 4:
            raise ValueError(f"must be 4k+1 (1, 5, 9, ..., 81); got {value}")
        return value

    @field_validator("loss_sigmas")
    @classmethod
    def _sigmas_in_unit_interval(cls, value: list[float]) -> list[float]:
        if any(not 0 < s < 1 for s in value):
            raise ValueError(f"each must be in (0, 1); got {value}")
        return value


class ExportSection(Section):
    dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Dtype of exported adapter tensors.")
    use_ema: bool = Field(
        False,
        description="The run's final adapter (and every file exported from it) holds the EMA of the weights "
        "(needs train.ema_decay); the raw weights stay in the last checkpoint.",
    )
    formats: list[Literal["diffusers", "comfyui", "kohya"]] = Field(
        ["diffusers"],
        min_length=1,
        description="Formats `vidlora export RUN` writes when no --format is given (see docs/export.md).",
    )


class Recipe(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainSection = Field(default_factory=TrainSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    export: ExportSection = Field(default_factory=ExportSection)

    @model_validator(mode="after")
    def _kind_fits(self) -> Recipe:
        if self.export.use_ema and self.train.ema_decay is None:
            raise ValueError("export.use_ema needs train.ema_decay (there is no EMA to export)")
        kind = self.lora.kind
        if kind in ("lokr", "loha"):
            if self.lora.dropout:
                raise ValueError(f"lora.dropout: {kind} has no input dropout (set it to 0)")
            if "diffusers" in self.export.formats:
                if "formats" in self.export.model_fields_set:
                    raise ValueError(f"export.formats: diffusers cannot load {kind} adapters; use comfyui or kohya")
                self.export.formats = ["comfyui"]
        return self

    @model_validator(mode="after")
    def _speed_modes_fit(self) -> Recipe:
        if self.train.fp8_compute and self.train.block_offload:
            raise ValueError(
                "train.fp8_compute and train.block_offload do not combine: the fp8 copies of the offloaded weights "
                "stay on the GPU and defeat the offload (turn one off)"
            )
        return self

    def to_toml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_toml(self) -> str:
        """The resolved recipe as TOML, for the run folder and the adapter header."""
        import tomli_w

        return tomli_w.dumps(self.to_toml_dict())


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value); the value is read as TOML when it parses, else as a string."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set` overrides to a raw recipe dict; list items are addressed by index (data.datasets.0.path)."""
    for item in overrides:
        path, value = parse_override(item)
        node: Any = raw
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                node = _list_item(node, part, path[: i + 1])
            else:
                node = node.setdefault(part, [] if path[i + 1].isdigit() else {})
        if isinstance(node, list):
            idx = _index(node, path[-1], path)
            if idx == len(node):
                node.append(value)
            else:
                node[idx] = value
        elif isinstance(node, dict):
            node[path[-1]] = value
        else:
            raise RecipeError(f"--set {item!r}: {'.'.join(path[:-1])} is not a section")
    return raw


def _index(node: list, part: str, path: list[str]) -> int:
    if not part.isdigit() or int(part) > len(node):
        raise RecipeError(f"--set {'.'.join(path)}: {part!r} is not an index 0..{len(node)}")
    return int(part)


def _list_item(node: list, part: str, path: list[str]) -> Any:
    idx = _index(node, part, path)
    if idx == len(node):
        node.append({})
    return node[idx]


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; every problem becomes a one-line RecipeError."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"{path}: recipe file not found")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{path}: not valid TOML: {e}") from None
    raw = apply_overrides(raw, overrides or [])
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        where = f"{path}: " if path else ""
        raise RecipeError(where + "; ".join(_describe(err) for err in e.errors())) from None


def _describe(err: dict) -> str:
    """One readable phrase per pydantic error: the dotted key, what is wrong, what is allowed."""
    key = ".".join(str(p) for p in err["loc"])
    if not key and err["type"] == "value_error":  # a check across sections names its keys itself
        return str(err["ctx"]["error"])
    if err["type"] == "extra_forbidden":
        *parent, name = [str(p) for p in err["loc"]]
        known = _known_keys(parent)
        hint = difflib.get_close_matches(name, known, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        return f"unknown key {key!r}{suggestion} (allowed: {', '.join(known)})"
    msg = err["msg"]
    if err["type"] == "literal_error":
        msg = f"got {err['input']!r}; {msg[0].lower() + msg[1:]}"
    elif err["type"] == "missing":
        msg = "is required"
    elif "input" in err and not isinstance(err["input"], dict):
        msg = f"{msg} (got {err['input']!r})"
    return f"{key}: {msg}"


def _known_keys(parent: list[str]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in parent:
        if part.isdigit():
            continue
        annotation = model.model_fields[part].annotation
        model = getattr(annotation, "__args__", [annotation])[0] if part == "datasets" else annotation
    return list(model.model_fields)


def resolve_device_precision(mixed_precision: str, dtype: str) -> tuple[str, str]:
    """Pick (mixed_precision, weight dtype) for this machine: bf16 on a capable GPU, fp32 on the CPU."""
    import torch

    cuda = torch.cuda.is_available()
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    if mixed_precision == "auto":
        mixed_precision = "bf16" if bf16_ok else ("fp16" if cuda else "no")
    if dtype == "auto":
        dtype = {"bf16": "bf16", "fp16": "fp16"}.get(mixed_precision, "fp32")
    return mixed_precision, dtype


def recipe_reference() -> str:
    """docs/recipes.md, generated from the schema so the reference can never drift from the code."""
    lines = [
        "# Recipe reference",
        "",
        "<!-- Generated by `python scripts/gen_recipe_docs.py` from trainer/config.py; do not edit. -->",
        "",
        "A recipe is one TOML file. Every key is optional unless marked required; unknown keys are errors.",
        "Override any value on the command line: `--set section.key=value` (TOML syntax for the value,",
        "e.g. `--set train.max_steps=500`, `--set data.datasets.0.resolutions=[480,720]`).",
        "Relative paths are relative to the directory you run `vidlora` from.",
        "",
    ]
    sections = [(name, field.annotation) for name, field in Recipe.model_fields.items()]
    sections.insert(2, ("data.datasets", DatasetSection))
    for name, model in sections:
        header = f"[[{name}]]" if name == "data.datasets" else f"[{name}]"
        lines += [f"## `{header}`", "", "| key | default | meaning |", "|---|---|---|"]
        for key, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) or key == "datasets":
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            allowed = getattr(field.annotation, "__args__", None)
            meaning = field.description or ""
            if allowed and all(isinstance(a, str) for a in allowed):
                meaning += f" One of: {', '.join(allowed)}."
            lines.append(f"| `{key}` | `{default}` | {meaning} |")
        lines.append("")
    return "\n".join(lines)
