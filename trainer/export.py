"""Adapters in and out of vidlora: `vidlora export`, `convert`, `merge`, and `lora.init_from`.

trainer/formats.py knows the key layouts and the name maps; this module works on files, folders and models:

- :func:`read_adapter_file`: a LoRA made by any tool, or a vidlora run / checkpoint / adapter, as canonical peft keys
  plus per-module alphas, with its format, model family and the readers' quirks that apply to it.
- :func:`write_adapter`: one format, checked (finite, every key mapped) and self-describing: the safetensors header
  carries family, variant, base model, rank, alpha, targets, steps, trigger words and the recipe.
- :func:`export_files` (`export`, `convert`): several formats and several inputs in one call.
- :func:`merge_into_folder` (`merge`): the adapter baked into a diffusers transformer folder, one shard at a time.
- :func:`add_initial_adapter` (`lora.init_from`): the peft adapter a run starts from, loaded from any format.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from data.cache import DTYPES, atomic_write
from trainer.checkpoint import find_adapters, read_adapter
from trainer.config import LoraSection, UserError
from trainer.formats import (
    FORMATS,
    LoraFormatError,
    detect_format,
    export_lora,
    import_lora,
    merge_lora,
    save_lora,
)
from trainer.models import FAMILIES, family_class

if TYPE_CHECKING:
    from peft import PeftConfig

    from trainer.models.base import Denoiser, ModelFamily

DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Training metadata a vidlora adapter carries into every file exported from it.
CARRIED = (
    "base_model",
    "kind",
    "ema_decay",
    "rank",
    "alpha",
    "target_modules",
    "trigger_words",
    "steps",
    "recipe",
    "sigma_range",
)
# Header keys vidlora writes itself; anything else a source file carried goes under `source_metadata`.
OWN_KEYS = frozenset(
    {*CARRIED, "format", "family", "variant", "targets", "lora_modules", "export_format", "alpha_storage", "dtype"}
    | {"source", "source_format", "source_metadata", "exported_by", "alphas"}
)


@dataclass
class AdapterFile:
    """A LoRA read from disk, in canonical form (diffusers module names, peft keys, alpha per module)."""

    path: Path
    peft_sd: dict[str, torch.Tensor]
    alphas: dict[str, float]
    family: str
    fmt: str  # "vidlora" (a run's canonical adapter) or one of FORMATS
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # the safetensors header, JSON values decoded

    @property
    def expert(self) -> str:
        """The expert (of a two-expert family) the adapter is for: its header's, else its file name's `_high_noise`
        / `_low_noise` ending; "" for a family's only transformer."""
        labels = family_class(self.family).expert_components
        named = next((label for label in labels if self.path.stem.endswith(f"_{label}")), "")
        return self.meta.get("expert") or named

    @property
    def suffix(self) -> str:
        return f"_{self.expert}" if self.expert else ""


def read_adapter_files(src: str | Path | list, family: str | None = None) -> list[AdapterFile]:
    """Every adapter a file, a run or checkpoint folder, or a list of those holds (one per expert for two-expert
    families), each read with :func:`read_adapter_file`."""
    sources = src if isinstance(src, list) else [src]
    for s in sources:
        if not Path(s).exists():
            raise FileNotFoundError(f"{s}: no such file or folder")
    return [read_adapter_file(path, family) for s in sources for path in find_adapters(s)]


def read_adapter_file(path: str | Path, family: str | None = None) -> AdapterFile:
    """Read a LoRA file of any supported format, or a vidlora adapter.

    ``family`` overrides what the keys (or a vidlora header) say. Every refusal names the file and the keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    sd, meta = read_adapter(path)
    try:
        if meta.get("format") == "vidlora":  # canonical adapter: bare peft keys, alphas in the header
            own = meta.get("family")
            if own not in FAMILIES:
                raise LoraFormatError(f"vidlora header names no known family ({own!r})")
            if family and family_class(family).lora_names is not family_class(own).lora_names:
                raise LoraFormatError(f"the header says family {own!r}, not {family!r}")
            peft_sd, _, fam = import_lora(sd, own)
            raw = meta.get("alphas") or meta.get("alpha")
            raw = raw if isinstance(raw, dict) else dict.fromkeys(_modules(peft_sd), raw)
            if set(raw) != set(_modules(peft_sd)) or None in raw.values():
                raise LoraFormatError("the vidlora header's alphas do not match the adapter's modules")
            alphas = {m: float(a) for m, a in raw.items()}
            return AdapterFile(path, peft_sd, alphas, fam, "vidlora", ["vidlora adapter"], meta)
        hint = family or (meta.get("family") if meta.get("family") in FAMILIES else None)
        fmt, fam, notes = detect_format(sd, hint)
        peft_sd, alphas, fam = import_lora(sd, fam, metadata=meta)
        return AdapterFile(path, peft_sd, alphas, fam, fmt, notes, meta)
    except LoraFormatError as e:
        raise LoraFormatError(f"{path}: {e}") from None


_TENSOR_SUFFIX = re.compile(r"\.(lora_[AB]\.weight|lora_magnitude_vector|dora_scale|lokr_\w+|hada_\w+)$")


def _modules(peft_sd: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted({_TENSOR_SUFFIX.sub("", k) for k in peft_sd})


def _one_or_all(values: Iterable) -> Any:
    distinct = sorted(set(values))
    return distinct[0] if len(distinct) == 1 else distinct


def delta_shape(peft_sd: Mapping[str, torch.Tensor], module: str) -> tuple[int, int]:
    """(out, in) of the weight update `module`'s tensors make, for every adapter kind (LoKr's is a Kronecker product
    of two factors, each whole or a low-rank pair; LoHa's a Hadamard product of low-rank pairs)."""

    def factor(name: str) -> tuple[int, int]:
        if f"{module}.{name}" in peft_sd:
            return tuple(peft_sd[f"{module}.{name}"].shape[:2])
        return peft_sd[f"{module}.{name}_a"].shape[0], peft_sd[f"{module}.{name}_b"].shape[1]

    if f"{module}.lora_A.weight" in peft_sd:
        return peft_sd[f"{module}.lora_B.weight"].shape[0], peft_sd[f"{module}.lora_A.weight"].shape[1]
    if f"{module}.hada_w1_a" in peft_sd:
        return factor("hada_w1")
    (a, b), (c, d) = factor("lokr_w1"), factor("lokr_w2")
    return a * c, b * d


def variant(family: str, peft_sd: Mapping[str, torch.Tensor]) -> str:
    """The released model an adapter fits, from its hidden size (attention input width); else the hidden size."""
    modules = _modules(peft_sd)
    widths = [delta_shape(peft_sd, m)[1] for m in modules if re.search(r"\.(to_q|net\.0\.proj)$", m)]
    widths += [delta_shape(peft_sd, m)[0] for m in modules if m.endswith("to_out.0")]
    if not widths:
        return f"{family} (hidden size unknown: no attention or FFN module)"
    hidden = Counter(widths).most_common(1)[0][0]
    return family_class(family).variants.get(hidden, f"{family} (hidden {hidden})")


def adapter_kind(peft_sd: Mapping[str, torch.Tensor]) -> str:
    """lora, dora, lokr or loha, from the tensor names."""
    names = " ".join(peft_sd)
    return next((k for k, mark in KIND_MARKS if mark in names), "lora")


KIND_MARKS = (("lokr", ".lokr_"), ("loha", ".hada_"), ("dora", ".lora_magnitude_vector"), ("dora", ".dora_scale"))


def adapter_metadata(lora: AdapterFile, fmt: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The header of a file written from ``lora`` as ``fmt`` (``tensors``: what is written)."""
    ranks = [v.shape[0] for k, v in lora.peft_sd.items() if k.endswith((".lora_A.weight", "_w1_b", "_w2_b"))]
    meta: dict[str, Any] = {"kind": adapter_kind(lora.peft_sd), "alpha": _one_or_all(lora.alphas.values())}
    meta["rank"] = _one_or_all(ranks) if ranks else "full"
    meta.update({k: lora.meta[k] for k in CARRIED if k in lora.meta})
    if lora.expert:
        meta["expert"] = lora.expert
    has_alpha = any(k.endswith(".alpha") for k in tensors)
    baked = len({k.rsplit(".", 2)[0] for k in tensors if not k.endswith(".alpha")}) > sum(
        k.endswith(".alpha") for k in tensors
    )
    meta.update(
        {
            "format": "pt",  # the safetensors convention (diffusers and transformers write the same)
            "family": lora.family,
            "variant": variant(lora.family, lora.peft_sd),
            "targets": sorted({re.sub(r"\.\d+\.", ".N.", m) for m in lora.alphas}),
            "lora_modules": len(lora.alphas),
            "export_format": fmt,
            "alpha_storage": (
                "per-module .alpha tensors, baked into lora_A where absent"
                if has_alpha and baked
                else "per-module .alpha tensors"
                if has_alpha
                else "baked into lora_A (read as alpha = rank)"
            ),
            "dtype": _one_or_all(DTYPE_NAMES.get(v.dtype, str(v.dtype)) for v in tensors.values() if v.dim() > 0),
            "source": str(lora.path),
            "source_format": lora.fmt,
            "exported_by": "vidlora",
        }
    )
    foreign = {k: v for k, v in lora.meta.items() if k not in OWN_KEYS}
    if foreign:  # kept, but out of the way: e.g. a diffusers `lora_adapter_metadata` would re-apply a baked alpha
        meta["source_metadata"] = foreign
    return meta


def build_adapter(lora: AdapterFile, fmt: str, dtype: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, header) of ``lora`` as ``fmt``, tensors cast to ``dtype`` (None keeps them; `.alpha` stays fp32)."""
    tensors = export_lora(lora.peft_sd, lora.alphas, lora.family, fmt)
    if dtype is not None:
        tensors = {k: v if k.endswith(".alpha") else v.to(DTYPES[dtype]) for k, v in tensors.items()}
    return tensors, adapter_metadata(lora, fmt, tensors)


def write_adapter(out: str | Path, lora: AdapterFile, fmt: str, dtype: str | None = None) -> list[str]:
    """Write ``lora`` as ``fmt`` and return the readers' notes; checked first (no non-finite value, every key maps
    to a module), written atomically."""
    return save_lora(out, *build_adapter(lora, fmt, dtype))


def expand_formats(formats: Iterable[str] | None, default: Iterable[str] = ("diffusers",)) -> list[str]:
    """Formats in the order given, once each; "all" is every format."""
    out: list[str] = []
    for f in formats or default:
        for g in FORMATS if f == "all" else [f]:
            if g not in FORMATS:
                raise UserError(f"unknown format {g!r}; allowed: {', '.join(FORMATS)}, all")
            if g not in out:
                out.append(g)
    return out


def default_output(lora: AdapterFile) -> tuple[Path, str]:
    """(folder, file-name stem) for an adapter's exports: a run's adapter -> the run folder and its name; a
    checkpoint's -> the run folder (checkpoints get pruned) and run-step; any other file -> its folder and stem
    (without an expert ending: the written files end with it)."""
    path = lora.path
    if path.name != f"adapter{lora.suffix}.safetensors":
        return path.parent, path.stem.removesuffix(lora.suffix) if lora.suffix else path.stem
    if path.parent.parent.name == "checkpoints":
        run = path.parent.parent.parent
        return run, f"{run.name}-{path.parent.name}"
    return path.parent, path.parent.name


@dataclass
class Written:
    fmt: str
    path: Path
    source: AdapterFile
    notes: list[str]


def export_files(
    sources: Iterable[str | Path],
    formats: Iterable[str] | None = None,
    out: str | Path | None = None,
    out_dir: str | Path | None = None,
    dtype: str | None = None,
    family: str | None = None,
    name: str | None = None,
) -> list[Written]:
    """Write every source in every format: `vidlora export` and `vidlora convert`.

    Defaults come from the source: formats (diffusers when ``out`` names one file) and dtype from a vidlora
    run's recipe (`[export]`), else diffusers and the source's own dtype; files go to ``out`` (one source, one
    format) or ``out_dir`` (default: next to the source) as ``<name>_<format>.safetensors``. The adapters of a
    two-expert family end with their expert: ``<name>_<format>_high_noise.safetensors`` (``out``: the expert goes
    before the extension). Every source is read, and all of a source's files are built, before any file is
    written: a refusal leaves no partial set of its files.
    """
    per_source = [read_adapter_files(s, family) for s in sources]
    loras = [lora for found in per_source for lora in found]
    experts = [lora.expert for lora in loras]
    one_set = len(per_source) == 1 and all(experts) and len(set(experts)) == len(experts)  # a run's experts
    if out is not None and len(loras) > 1 and not one_set:
        raise UserError("--out names one file: give one input, or use --out-dir")
    written = []
    for lora in loras:
        export = _recipe_export(lora.meta)
        # One named output file without --format: the diffusers layout, not the run's whole export.formats.
        fmts = expand_formats(formats, ["diffusers"] if out is not None else export.get("formats", ["diffusers"]))
        if out is not None and len(fmts) > 1:
            raise UserError(f"--out names one file but {len(fmts)} formats were asked for; use --out-dir")
        try:
            built = {fmt: build_adapter(lora, fmt, dtype or export.get("dtype")) for fmt in fmts}
        except LoraFormatError as e:
            raise LoraFormatError(f"{lora.path}: {e}") from None
        folder, stem = default_output(lora)
        stem = name if name and len(per_source) == 1 else stem
        for fmt, (tensors, meta) in built.items():
            if out is not None:
                path = Path(out).with_name(f"{Path(out).stem}{lora.suffix}{Path(out).suffix}")
            else:
                path = Path(out_dir or folder) / f"{stem}_{fmt}{lora.suffix}.safetensors"
            written.append(Written(fmt, path, lora, save_lora(path, tensors, meta)))
    return written


def _recipe_export(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The `[export]` section of the recipe a vidlora adapter was trained with (empty for other files)."""
    from trainer.config import tomllib

    recipe = meta.get("recipe")
    if not isinstance(recipe, str):
        return {}
    try:
        return dict(tomllib.loads(recipe).get("export", {}))
    except tomllib.TOMLDecodeError:
        return {}


def load_pipeline_adapters(family: ModelFamily, pipe: Any, lora: str | Path | list) -> None:
    """Load adapters into a pipeline as diffusers' users do (`ModelFamily.load_adapters`), except the files diffusers
    cannot read (LoKr, LoHa, vidlora's own adapters): those go through peft, as `lora.init_from` loads them."""
    files = pipeline_adapters(family, lora)
    via_peft = {}
    for component, path in files.items():
        src = read_adapter_file(path, family.name)
        if src.fmt == "vidlora" or adapter_kind(src.peft_sd) in ("lokr", "loha"):
            via_peft[component] = path
    family.load_adapters(pipe, {c: f for c, f in files.items() if c not in via_peft})
    for denoiser in family.denoisers():
        if denoiser.component in via_peft:
            lora_section = LoraSection(init_from=str(via_peft[denoiser.component]))
            add_initial_adapter(getattr(pipe, denoiser.component), lora_section, family, denoiser)


def pipeline_adapters(family: ModelFamily, lora: str | Path | list) -> dict[str, Path]:
    """{component: adapter file} for `load_pipeline_adapters`: a run folder's final
    `pytorch_lora_weights*.safetensors` (its `adapter*.safetensors` for a LoKr/LoHa run, which writes no diffusers
    file), or the given files, each placed by the expert its header or name says."""
    sources = [Path(p) for p in (lora if isinstance(lora, list) else [lora])]
    paths = [f for s in sources for f in (_final_adapters(s) if s.is_dir() else [s])]
    if not paths:
        raise UserError(f"{lora}: no pytorch_lora_weights*.safetensors or adapter*.safetensors in it")
    out: dict[str, Path] = {}
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        with safe_open(str(path), framework="pt") as f:
            expert = (f.metadata() or {}).get("expert", "")
        expert = expert or next((e for e in family.expert_components if path.stem.endswith(f"_{e}")), "")
        component = family.expert_components[expert] if expert else "transformer"
        if component in out:
            raise UserError(f"two adapters for the same transformer ({component}): {out[component]}, {path}")
        out[component] = path
    return out


def _final_adapters(run: Path) -> list[Path]:
    return sorted(run.glob("pytorch_lora_weights*.safetensors")) or sorted(run.glob("adapter*.safetensors"))


def export_adapter(src: str | Path, out: str | Path, fmt: str = "diffusers", dtype: str | None = "bf16") -> Path:
    """Write the adapter file ``src`` to ``out`` as ``fmt``."""
    return export_files([src], [fmt], out=out, dtype=dtype)[0].path


# ---------------------------------------------------------------------------------------------------------------------
# Merge: bake an adapter into the base weights.
# ---------------------------------------------------------------------------------------------------------------------


def transformer_folder(base: str | Path) -> Path:
    """The diffusers transformer folder of ``base``: a model folder (``transformer/``) or the folder itself."""
    base = Path(base)
    for folder in (base / "transformer", base):
        if (folder / "config.json").is_file():
            return folder
    raise UserError(
        f"{base}: not a diffusers model folder or transformer folder (no config.json here or in transformer/)"
    )


def merge_into_folder(
    base: str | Path, adapter: str | Path, out: str | Path, strength: float = 1.0, family: str | None = None
) -> Path:
    """Bake ``strength`` x the adapter into the transformer of ``base`` and write a diffusers transformer folder;
    for a two-expert adapter set (a run, or the expert files), each expert into its own transformer of the model
    folder ``base``, written as ``out/transformer``, ``out/transformer_2``.

    Shard by shard (memory: one shard), weights keep their dtype (the update is added in fp32), the sharding and
    index are kept, so ``<TransformerClass>.from_pretrained(out)`` loads it. The result equals diffusers'
    ``fuse_lora(lora_scale=strength)``. ``out`` must not exist or be empty; it appears only when complete.
    """
    loras = read_adapter_files(adapter, family)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not an empty folder; remove it or choose another --out")
    if len(loras) > 1 and not all(lora.expert for lora in loras):
        raise UserError(f"{adapter}: {len(loras)} adapters and not one per expert: merge them one at a time")
    tmp = out.parent / f".{out.name}.merging"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for lora in loras:
            if lora.expert:
                component = family_class(lora.family).expert_components[lora.expert]
                _merge_shards(transformer_folder(Path(base) / component), lora, tmp / component, strength)
            else:
                _merge_shards(transformer_folder(base), lora, tmp, strength)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _merge_shards(folder: Path, lora: AdapterFile, target: Path, strength: float) -> None:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    want = family_class(lora.family).transformer_class.__name__
    if config.get("_class_name") != want:
        raise UserError(
            f"{lora.path}: a {lora.family} adapter does not fit {folder} ({config.get('_class_name')}, not {want})"
        )
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (folder / "diffusion_pytorch_model.safetensors").is_file():
        shards = ["diffusion_pytorch_model.safetensors"]
    else:
        raise UserError(f"{folder}: no diffusion_pytorch_model*.safetensors weights (pickled .bin files are not read)")
    target.mkdir(parents=True, exist_ok=True)
    for extra in (folder / "config.json", index):
        if extra.is_file():
            atomic_write(target / extra.name, lambda p, src=extra: shutil.copyfile(src, p))
    merged: set[str] = set()
    for shard in tqdm(shards, desc="merge", unit="shard"):
        with safe_open(str(folder / shard), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            header = dict(f.metadata() or {})
        here = {m for m in lora.alphas if f"{m}.weight" in state}
        part = {k: v for k, v in lora.peft_sd.items() if _TENSOR_SUFFIX.sub("", k) in here}
        try:
            state = merge_lora(state, part, {m: lora.alphas[m] for m in here}, strength) if here else state
        except LoraFormatError as e:  # e.g. an adapter for another model size
            raise LoraFormatError(f"{lora.path} into {folder / shard}: {e}") from None
        merged.update(here)
        header.update({"format": "pt", "merged_lora": str(lora.path), "merge_strength": str(strength)})
        atomic_write(target / shard, lambda p, s=state, h=header: save_file(s, p, metadata=h))
    missing = sorted(set(lora.alphas) - merged)
    if missing:
        raise UserError(f"{lora.path}: {len(missing)} module(s) have no weight in {folder}: {', '.join(missing[:10])}")


# ---------------------------------------------------------------------------------------------------------------------
# lora.init_from: start training from an existing adapter.
# ---------------------------------------------------------------------------------------------------------------------


def _lora_layers(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return {n: m for n, m in transformer.named_modules() if isinstance(m, kinds)}


def selected_modules(transformer: torch.nn.Module, targets: str | list[str]) -> set[str]:
    """Layer names peft's ``target_modules`` selects (a regex is full-matched, a list entry matches a name suffix)."""
    layers = _lora_layers(transformer)
    if isinstance(targets, str):
        return {n for n in layers if re.fullmatch(targets, n)}
    return {n for n in layers if any(n == t or n.endswith(f".{t}") for t in targets)}


def _exact(module: str) -> str:
    """A peft rank/alpha pattern that matches exactly this module (peft matches patterns as name suffixes)."""
    return f"^{re.escape(module)}"


def _mode(values: Iterable):
    return Counter(values).most_common(1)[0][0]


def initial_adapter(sources: list[AdapterFile], denoiser: Denoiser | None) -> AdapterFile:
    """The adapter of ``sources`` that starts ``denoiser``: the one for its expert, or a lone adapter for any."""
    label = denoiser.label if denoiser else ""
    if len(sources) == 1 and not sources[0].expert:
        return sources[0]
    match = [s for s in sources if s.expert == label]
    if len(match) != 1:
        have = ", ".join(f"{s.path.name} ({s.expert or 'no expert'})" for s in sources)
        want = f"the {label} expert" if label else "a model with one transformer"
        raise UserError(f"lora.init_from: no single adapter for {want} among {have}")
    return match[0]


def adapter_config(
    kind: str,
    rank: int,
    alpha: float,
    dropout: float,
    targets: str | list[str],
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
) -> PeftConfig:
    """peft's own config for a `lora.kind`: LoRA, DoRA (LoRA with use_dora), LoKr or LoHa."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    patterns = {"rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {}}
    if kind in ("lokr", "loha"):
        config = LoKrConfig if kind == "lokr" else LoHaConfig
        return config(r=rank, alpha=alpha, target_modules=targets, init_weights=True, **patterns)
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        init_lora_weights=True,
        use_dora=kind == "dora",
        **patterns,
    )


def _lycoris_rank(peft_sd: Mapping[str, torch.Tensor], module: str, wanted: int | None) -> int:
    """The peft rank that rebuilds a LoKr/LoHa module's shapes: its low-rank pairs', or for LoKr's whole factors
    one large enough that peft keeps w2 whole (``r >= max(w2 shape) / 2``)."""
    for key in ("hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if f"{module}.{key}" in peft_sd:
            return peft_sd[f"{module}.{key}"].shape[0]
    return wanted or max(peft_sd[f"{module}.lokr_w2"].shape)


def add_initial_adapter(
    transformer: torch.nn.Module, lora: LoraSection, family: ModelFamily, denoiser: Denoiser | None = None
) -> PeftConfig:
    """Add the peft adapter that ``lora.init_from`` (any format, a run/checkpoint, or one file per expert) holds for
    ``denoiser``, weights loaded. One adapter without an expert starts every expert.

    What the recipe leaves unset is adopted from the file: rank (and per-module ranks), alpha, target modules (as a
    preset name when one selects exactly the file's modules). What the recipe sets must agree: another rank is refused
    (no lossless way to change it); another alpha rescales lora_A so every update stays the same; targets must
    include every module of the file, and extra ones start at zero as peft initialises them. ``lora`` is updated to
    what was adopted, so the run's metadata describes the adapter it trains. LoRA weights are fp32.
    """
    from peft import set_peft_model_state_dict

    src = initial_adapter(read_adapter_files(lora.init_from, family.name), denoiser)
    where = f"lora.init_from {src.path}"
    kind = adapter_kind(src.peft_sd)
    if "kind" in lora.model_fields_set and lora.kind != kind:
        raise UserError(
            f"{where}: the adapter is a {kind}, not lora.kind = {lora.kind!r}; remove lora.kind to adopt it"
        )
    lycoris = kind in ("lokr", "loha")
    if kind == "dora" and any(f"{m}.lora_magnitude_vector" not in src.peft_sd for m in src.alphas):
        raise UserError(
            f"{where}: a DoRA without peft's lora_magnitude_vector (ComfyUI's dora_scale) cannot start a run"
        )
    layers = _lora_layers(transformer)
    ranks, wrong = {}, []
    for m in src.alphas:
        if lycoris:  # shapes are checked by peft when the weights load
            ranks[m] = _lycoris_rank(src.peft_sd, m, lora.rank if "rank" in lora.model_fields_set else None)
            continue
        A, B = src.peft_sd[f"{m}.lora_A.weight"], src.peft_sd[f"{m}.lora_B.weight"]
        ranks[m] = A.shape[0]
        W = layers[m].weight if m in layers else None
        if W is None or A.shape[1:] != W.shape[1:] or B.shape[0] != W.shape[0]:
            got = "no such layer" if W is None else f"layer weight {tuple(W.shape)}"
            wrong.append(f"{m} (adapter {tuple(B.shape[:1]) + tuple(A.shape[1:])}, {got})")
    if wrong:
        raise UserError(f"{where}: the adapter does not fit this model: {'; '.join(wrong[:5])}")
    explicit = lora.model_fields_set
    rank = _mode(ranks.values())
    if "rank" in explicit and set(ranks.values()) != {lora.rank}:
        raise UserError(
            f"{where}: the adapter has rank {_one_or_all(ranks.values())} but lora.rank = {lora.rank}; "
            "remove lora.rank to adopt the adapter's (a rank cannot change without changing the adapter)"
        )
    # a LoKr/LoHa module's canonical alpha is its scale: as an alpha over its rank
    src_alphas = {m: a * ranks[m] for m, a in src.alphas.items()} if lycoris else src.alphas
    scales = {m: 1.0 for m in src.alphas}
    if "alpha" in explicit and lora.alpha is not None:
        scales = {m: a / lora.alpha for m, a in src_alphas.items()}  # same update B @ A * alpha / r
        alphas = dict.fromkeys(src.alphas, float(lora.alpha))
    else:
        alphas = dict(src_alphas)
    alpha = _mode(alphas.values())
    presets = family.lora_presets
    if "targets" in explicit:
        targets = presets.get(lora.targets, lora.targets) if isinstance(lora.targets, str) else lora.targets
        outside = sorted(set(src.alphas) - selected_modules(transformer, targets))
        if outside:
            raise UserError(
                f"{where}: lora.targets leaves out {len(outside)} module(s) of the adapter ({', '.join(outside[:5])}); "
                "remove lora.targets to adopt the adapter's"
            )
        adopted = lora.targets
    else:
        adopted = next((p for p, t in presets.items() if selected_modules(transformer, t) == set(src.alphas)), None)
        targets = presets[adopted] if adopted else "(" + "|".join(re.escape(m) for m in sorted(src.alphas)) + ")"
        adopted = adopted or targets
    config = adapter_config(
        kind,
        rank,
        alpha,
        lora.dropout,
        targets,
        rank_pattern={_exact(m): r for m, r in ranks.items() if r != rank},
        alpha_pattern={_exact(m): a for m, a in alphas.items() if a != alpha},
    )
    transformer.add_adapter(config)
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # before loading, so fp32 weights in the file stay exact
    state = {}
    for m, scale in scales.items():
        for key, t in src.peft_sd.items():
            if key.startswith(f"{m}.") and not key.endswith(".dora_scale"):
                first = key.endswith((".lora_A.weight", ".lokr_w1", ".lokr_w1_a", ".hada_w1_a"))
                state[key] = t.float() * scale if first else t.float()
    try:
        result = set_peft_model_state_dict(transformer, state, adapter_name="default")
    except RuntimeError as e:  # a size mismatch: another factorisation or rank of a LoKr/LoHa
        raise UserError(f"{where}: the adapter does not fit this model: {str(e).splitlines()[-1].strip()}") from None
    if result.unexpected_keys:
        raise UserError(
            f"{where}: peft did not take {len(result.unexpected_keys)} key(s): {result.unexpected_keys[:5]}"
        )
    lora.kind = kind
    lora.rank, lora.alpha, lora.targets = rank, alpha, adopted
    return config
