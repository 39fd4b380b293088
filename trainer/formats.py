"""LoRA file formats: diffusers/peft, ComfyUI (original checkpoint names) and kohya/musubi-tuner.

The canonical in-memory form is peft's: ``get_peft_model_state_dict(transformer)`` keys such as
``blocks.0.attn1.to_q.lora_A.weight`` / ``.lora_B.weight`` (diffusers module names, no prefix) plus a per-module
alpha. A module's update is ``B @ A * alpha / rank`` with ``rank = A.shape[0]``.

Formats written by :func:`export_lora`:

- ``diffusers``: ``transformer.<diffusers name>.lora_A/B.weight``. Files of this kind carry no alpha that every
  reader honours (diffusers before 0.33, ai-toolkit, peft loaders assume alpha = rank), so alpha/rank is **baked into
  lora_A** and the file is correct for any reader that assumes alpha = rank.
- ``comfyui``: ``diffusion_model.<original name>.lora_A/B.weight``, or ComfyUI's own internal name where its loader
  does not map the original one (``FamilyNames.comfyui_names``). Modules whose ``.alpha`` every reader applies keep
  it (``FamilyNames.alpha_in_original``); the others get alpha baked into lora_A, because diffusers' loader leaves
  those ``.alpha`` keys unconverted and then fails.
- ``kohya``: ``lora_unet_<name with . -> _>.lora_down/lora_up.weight`` + ``.alpha`` (musubi-tuner's layout), under
  the names ComfyUI maps (``FamilyNames.kohya_names``); other tools' spellings are read but never written.

Fused original layers (e.g. HunyuanVideo's ``img_attn_qkv`` and single-block ``linear1``) are written exactly: lora_A
is the concatenation of the parts' A, lora_B is block-diagonal, so the rank grows with the number of parts and the
product equals the trained updates stacked in the fused row layout. Reading them back, a block-diagonal B gives each
part exactly its own A rows and B columns; any other (dense) B is split the way diffusers does it (A copied into
every part, B cut by rows), which is exact only as a product.

Round trips between formats are exact as tensors, except through a format that bakes alpha: there an alpha != rank
survives as the product ``B @ A * alpha / rank`` only.

This module knows layouts, not models: each family declares its name tables (:class:`FamilyNames`), the modules that
tell it apart from families with the same names (``claims_lora``) and the quirks of the readers of its files
(``lora_reader_notes``) in its own file under trainer/models/.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from data.cache import atomic_write

FORMATS = ("diffusers", "comfyui", "kohya")


class LoraFormatError(ValueError):
    """A LoRA we refuse to read or write; the message names the offending keys."""


@dataclass(frozen=True)
class FamilyNames:
    """Everything format conversion needs to know about one model family's module names; each family declares its
    own (`ModelFamily.lora_names` in trainer/models/<family>.py).

    ``name_map`` rows are (diffusers module name(s), original checkpoint module name); ``{i}`` stands for a block
    index. A row with several diffusers names is one fused original layer whose output rows are those parts, in order.
    """

    name_map: tuple[tuple[str | tuple[str, ...], str], ...]
    # kohya names where they differ from the underscored original: the first is written, all are read.
    kohya_names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Names the comfyui file uses where ComfyUI does not map the original one (it maps its own internal name).
    comfyui_names: Mapping[str, str] = field(default_factory=dict)
    # LoRA-able diffusers modules with no safe original-layout export: refused with the reason.
    not_exportable: Mapping[str, str] = field(default_factory=dict)
    # Fused layers whose last part takes the rows left after the square (hidden -> hidden) parts.
    fused_rest: frozenset[str] = frozenset()
    # Original names whose `.alpha` both ComfyUI and diffusers' original-layout loader apply; others get alpha baked.
    alpha_in_original: str | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Name resolution over the tables.
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    diffusers: tuple[str, ...]
    original: str | None
    kohya: tuple[str, ...]
    comfyui: str | None = None  # the name written in comfyui files (the original, unless ComfyUI maps another)
    split_rest: bool = False
    refused: str | None = None


def _fill(template: str, i: str | None) -> str:
    return template if i is None else template.replace("{i}", i)


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)"))


@dataclass(frozen=True)
class _Index:
    rules: tuple[_Rule, ...]
    diffusers: tuple[tuple[re.Pattern[str], _Rule, int], ...]
    original: tuple[tuple[re.Pattern[str], _Rule], ...]
    kohya: tuple[tuple[re.Pattern[str], _Rule], ...]

    def find(self, layout: str, name: str) -> tuple[_Rule, int, str | None] | None:
        """(rule, part, block index) for a module name in a layout ("diffusers", "original" or "kohya")."""
        table = self.diffusers if layout == "diffusers" else [(p, r, 0) for p, r in getattr(self, layout)]
        for pattern, rule, part in table:
            m = pattern.fullmatch(name)
            if m:
                return rule, part, (m.group(1) if m.groups() else None)
        return None


@cache
def _index(family: str) -> _Index:
    names = _family_names(family)
    rules = []
    for diffusers, original in names.name_map:
        parts = (diffusers,) if isinstance(diffusers, str) else tuple(diffusers)
        kohya = names.kohya_names.get(original, (original.replace(".", "_"),))
        comfyui = names.comfyui_names.get(original, original)
        rules.append(_Rule(parts, original, kohya, comfyui, split_rest=original in names.fused_rest))
    rules += [_Rule((name,), None, (), refused=why) for name, why in names.not_exportable.items()]
    return _Index(
        rules=tuple(rules),
        diffusers=tuple((_pattern(t), r, k) for r in rules for k, t in enumerate(r.diffusers)),
        # original names, and ComfyUI's own where they differ (both are read)
        original=tuple((_pattern(t), r) for r in rules if r.original for t in dict.fromkeys((r.original, r.comfyui))),
        kohya=tuple((_pattern(t), r) for r in rules for t in r.kohya),
    )


def _family(family: str) -> type:
    """The registered family class (trainer/models), which declares its names, variants and readers' quirks."""
    from trainer.models import FAMILIES, family_class

    if family not in FAMILIES:
        raise LoraFormatError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    return family_class(family)


def _family_names(family: str) -> FamilyNames:
    return _family(family).lora_names


def name_groups() -> dict[str, list[str]]:
    """Families by the name tables they share, keyed by the first registered one: files in one table cannot tell
    those families apart by their key names, only by which modules they hold (`ModelFamily.claims_lora`)."""
    from trainer.models import FAMILIES, family_class

    groups: dict[int, list[str]] = {}
    for name in FAMILIES:
        groups.setdefault(id(family_class(name).lora_names), []).append(name)
    return {members[0]: members for members in groups.values()}


def known_family(family: str | None) -> bool:
    from trainer.models import FAMILIES

    return family in FAMILIES


def to_diffusers_names(family: str, original_name: str) -> tuple[str, ...]:
    """Diffusers module name(s) of an original checkpoint module (several for a fused layer, in row order)."""
    hit = _index(family).find("original", original_name)
    if hit is None:
        raise LoraFormatError(f"{family}: original module {original_name!r} is not in the name map")
    rule, _, i = hit
    return tuple(_fill(t, i) for t in rule.diffusers)


# ---------------------------------------------------------------------------------------------------------------------
# Parsing keys of any layout.
# ---------------------------------------------------------------------------------------------------------------------

_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_down.weight": "A",
    ".lora_up.weight": "B",
    ".alpha": "alpha",
}
_ADAPTER_INFIX = re.compile(r"(.+\.lora_[AB])\.([^.]+)(\.weight)")
# Tensors of the other adapter kinds, under the names peft and ComfyUI share (no `.weight`): LoKr's Kronecker factors
# (each whole, or as a low-rank pair; ComfyUI's `lokr_*`), LoHa's Hadamard pairs (`hada_*`), and DoRA's magnitude: peft's
# `lora_magnitude_vector` (what diffusers reads) and ComfyUI's `dora_scale` (see :func:`comfyui_dora_scale`).
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
DORA_KEYS = ("lora_magnitude_vector", "dora_scale")
_EXTRA_KEYS = (*LOKR_KEYS, *LOHA_KEYS, *DORA_KEYS)
KINDS = ("lora", "lokr", "loha", "dora")
_KIND_NAMES = {"lora": "LoRA", "lokr": "LoKr", "loha": "LoHa", "dora": "DoRA"}


@dataclass
class _Lora:
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # tensors of LoKr, LoHa, DoRA (_EXTRA_KEYS)

    @property
    def kind(self) -> str:
        if any(k.startswith("lokr_") for k in self.extra):
            return "lokr"
        if any(k.startswith("hada_") for k in self.extra):
            return "loha"
        return "dora" if self.extra else "lora"


@dataclass
class _Parsed:
    fmt: str
    family: str
    layout: str  # "diffusers", "original" or "kohya"
    modules: dict[str, _Lora]
    unresolved: list[str]
    notes: list[str]


def _check_finite(sd: Mapping[str, torch.Tensor]) -> None:
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise LoraFormatError(f"non-finite values (NaN/inf) in {len(bad)} tensor(s): {', '.join(sorted(bad)[:10])}")


def _group(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, _Lora]], list[str]]:
    """Group keys by (prefix, module), tolerating peft's adapter infix and `base_model.model.` prefix."""
    notes: set[str] = set()
    unknown, adapters = [], set()
    groups: dict[str, dict[str, _Lora]] = {}
    for key, value in sd.items():
        k = key
        if k.startswith("base_model.model."):
            k = k.removeprefix("base_model.model.")
            notes.add("stripped peft's 'base_model.model.' prefix")
        m = _ADAPTER_INFIX.fullmatch(k)
        if m:
            adapters.add(m.group(2))
            k = m.group(1) + m.group(3)
        suffix = next((s for s in _SUFFIXES if k.endswith(s)), None)
        extra = next((e for e in _EXTRA_KEYS if k.endswith(f".{e}")), None) if suffix is None else None
        if suffix is None and extra is None:
            unknown.append(key)
            continue
        name = k.removesuffix(suffix or f".{extra}")
        prefix = next((p for p in ("lora_unet_", "diffusion_model.", "transformer.") if name.startswith(p)), "")
        lora = groups.setdefault(prefix, {}).setdefault(name.removeprefix(prefix), _Lora())
        kind = _SUFFIXES.get(suffix, "extra")
        if kind == "extra":
            lora.extra[extra] = value
        elif kind == "alpha":
            lora.alpha = float(value.float().item())
        elif getattr(lora, kind) is not None:
            raise LoraFormatError(f"two tensors for {prefix}{name} lora_{kind}: {[*lora.keys, key]}")
        else:
            setattr(lora, kind, value)
        lora.keys.append(key)
    if unknown:
        raise LoraFormatError(
            f"{len(unknown)} key(s) are not LoRA, DoRA, LoKr or LoHa tensors (lora_bias, .diff and the others are "
            f"not supported): {', '.join(sorted(unknown)[:10])}"
        )
    if len(adapters) > 1:
        raise LoraFormatError(f"several peft adapters in one file: {sorted(adapters)}; save one adapter per file")
    if adapters:
        notes.add(f"stripped peft adapter infix '.{adapters.pop()}'")
    if not groups:
        raise LoraFormatError("no LoRA tensors found (empty state dict)")
    if "lora_unet_" in groups and len(groups) > 1:
        raise LoraFormatError(f"mixed kohya (lora_unet_) and other prefixes: {sorted(groups)}")
    return groups, sorted(notes)


def _parse(sd: Mapping[str, torch.Tensor], family: str | None = None) -> _Parsed:
    groups, notes = _group(sd)
    families = [family] if family else list(name_groups())
    for f in families:
        _family_names(f)
    modules: dict[str, _Lora] = {}
    for g in groups.values():
        for n, lora in g.items():
            if n in modules:
                raise LoraFormatError(f"module {n!r} appears under two prefixes: {modules[n].keys + lora.keys}")
            modules[n] = lora
    # Score every (family, layout) reading of the names; the one that explains the most modules wins.
    layouts = ("kohya",) if "lora_unet_" in groups else ("diffusers", "original")
    scores = {(f, lay): sum(_index(f).find(lay, n) is not None for n in modules) for f in families for lay in layouts}
    (fam, layout), hits = max(scores.items(), key=lambda item: item[1])
    if hits == 0:
        raise LoraFormatError(f"cannot tell the LoRA format or model family; module names seen: {_sample(modules)}")
    tied = [(f, lay) for (f, lay), h in scores.items() if h == hits]
    if len({f for f, _ in tied}) > 1:  # other families' tables explain the names too: one of them may claim them
        claims = [(f, lay) for f, lay in tied if _family(f).claims_lora(_diffusers_modules(_index(f), lay, modules))]
        if len({f for f, _ in claims}) != 1:
            raise LoraFormatError(
                f"ambiguous model family ({sorted({f for f, _ in tied})}) for module names {_sample(modules)}; "
                "name it (vidlora --family, or family=)"
            )
        fam, layout = claims[0]
    index = _index(fam)
    unresolved = sorted(k for n, lora in modules.items() if index.find(layout, n) is None for k in lora.keys)
    if family is None:  # same names, several families: the first that claims these modules, else the generic one
        targets = _diffusers_modules(index, layout, modules)
        fam = next((f for f in name_groups()[fam][1:] if _family(f).claims_lora(targets)), fam)
    prefixes = sorted(p or "(none)" for p in groups)
    notes.append(f"prefix {', '.join(prefixes)}")
    fmt = {"diffusers": "diffusers", "original": "comfyui", "kohya": "kohya"}[layout]
    if layout == "original" and "transformer." in groups:
        notes.append("original names under 'transformer.' (diffusion-pipe style); ComfyUI reads this only where its "
                     "loader maps that prefix for the model")  # fmt: skip
    if layout == "diffusers" and "diffusion_model." in groups:
        notes.append("diffusers names under 'diffusion_model.': ComfyUI will not load these")
    if any(lora.alpha is not None for lora in modules.values()):
        notes.append("per-module .alpha present")
    elif layout != "diffusers":
        notes.append("no .alpha: scale 1 (alpha = rank)")
    notes += _family(fam).lora_reader_notes(fmt, set(modules), _diffusers_modules(index, layout, modules))
    if unresolved:
        notes.append(f"{len(unresolved)} key(s) do not map to any {fam} module: {', '.join(unresolved[:10])}")
    return _Parsed(fmt, fam, layout, modules, unresolved, notes)


def _diffusers_modules(index: _Index, layout: str, modules: Mapping[str, _Lora]) -> set[str]:
    """The diffusers module names a file's modules stand for (every part of a fused layer)."""
    out = set()
    for n in modules:
        hit = index.find(layout, n)
        if hit is not None:
            rule, part, i = hit
            out |= {_fill(rule.diffusers[part], i)} if layout == "diffusers" else {_fill(t, i) for t in rule.diffusers}
    return out


def _sample(modules: Mapping[str, object], n: int = 8) -> str:
    names = sorted(modules)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def detect_format(sd: Mapping[str, torch.Tensor], family: str | None = None) -> tuple[str, str, list[str]]:
    """(format, family, notes) from the keys alone; raises LoraFormatError when the keys do not tell.

    Unmapped keys do not make detection fail; they are listed in the notes (and :func:`import_lora` refuses them).
    """
    parsed = _parse(sd, family)
    return parsed.fmt, parsed.family, parsed.notes


# ---------------------------------------------------------------------------------------------------------------------
# Import: any layout -> canonical peft state dict + alphas.
# ---------------------------------------------------------------------------------------------------------------------


def _adapter_alphas(metadata: Mapping[str, str] | None) -> dict | None:
    """diffusers' `lora_adapter_metadata` header (LoraConfig kwargs), with its `transformer.` prefix removed."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    config = json.loads(raw) if isinstance(raw, str) else dict(raw)
    return {k.removeprefix("transformer."): v for k, v in config.items()}


def _pattern_value(patterns: Mapping[str, float], name: str) -> float | None:
    for key, value in patterns.items():  # peft's get_pattern_key rule
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def _alpha_from_config(config: Mapping, name: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name)
    alpha = float(config.get("lora_alpha", rank) if alpha is None else alpha)
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def _checked_kind(name: str, lora: _Lora) -> str:
    """The module's adapter kind (lora, dora, lokr, loha), its tensors checked complete and of one kind."""
    kind = lora.kind
    if kind in ("lora", "dora"):
        _, B = _complete(name, lora)
        for key, t in lora.extra.items():
            if t.numel() != B.shape[0] or t.dim() > 2 or (t.dim() == 2 and t.shape[1] != 1):
                raise LoraFormatError(
                    f"{name}: {key} of shape {tuple(t.shape)} is not one value per output row ({B.shape[0]}); "
                    "a DoRA scale over input columns (LyCORIS' other axis) is not read"
                )
        return kind
    keys = set(lora.extra)
    mixed = lora.A is not None or lora.B is not None or (keys & {*DORA_KEYS}) or not keys <= {*LOKR_KEYS, *LOHA_KEYS}
    if mixed or (keys & {*LOKR_KEYS} and keys & {*LOHA_KEYS}):
        raise LoraFormatError(f"{name}: tensors of several adapter kinds in one module: {lora.keys}")
    if keys & {"lokr_t2", "hada_t1", "hada_t2"}:
        raise LoraFormatError(f"{name}: Tucker-decomposed {kind} factors (convolutions) are not supported")
    need = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"] if kind == "loha" else []
    if kind == "lokr":
        need = [k for w in ("lokr_w1", "lokr_w2") for k in ([w] if w in keys else [f"{w}_a", f"{w}_b"])]
    missing = [k for k in need if k not in keys]
    if missing:
        raise LoraFormatError(f"{name}: incomplete {kind}, missing {missing}; got {lora.keys}")
    return kind


def lycoris_scale(kind: str, tensors: Mapping[str, torch.Tensor], alpha: float | None) -> float:
    """The scale of a LoKr/LoHa update as ComfyUI applies a file's ``.alpha``: alpha over the rank of the low-rank
    pair that has one (LoKr: w2's, else w1's), else 1 (ComfyUI ignores alpha then)."""
    if alpha is None:
        return 1.0
    rank_of = ("hada_w1_b",) if kind == "loha" else ("lokr_w2_b", "lokr_w1_b")
    dim = next((tensors[k].shape[0] for k in rank_of if k in tensors), None)
    return alpha / dim if dim else 1.0


def _complete(name: str, lora: _Lora) -> tuple[torch.Tensor, torch.Tensor]:
    if lora.A is None or lora.B is None:
        raise LoraFormatError(f"{name}: lora_A/lora_down and lora_B/lora_up must both be present; got {lora.keys}")
    if lora.B.shape[1] != lora.A.shape[0]:
        raise LoraFormatError(f"{name}: rank mismatch, A {tuple(lora.A.shape)} vs B {tuple(lora.B.shape)}")
    return lora.A, lora.B


def _split_rows(rule: _Rule, B: torch.Tensor, in_features: int, name: str) -> list[torch.Tensor]:
    n = len(rule.diffusers)
    rows = B.shape[0]
    if rule.split_rest:
        sizes = [in_features] * (n - 1) + [rows - in_features * (n - 1)]
    elif rows % n == 0:
        sizes = [rows // n] * n
    else:
        sizes = [0]
    if min(sizes) <= 0:
        raise LoraFormatError(f"{name}: lora_B has {rows} rows, which do not split into the {n} fused parts")
    return list(B.split(sizes, dim=0))


def _unfuse(rule: _Rule, A: torch.Tensor, B: torch.Tensor, alpha: float, name: str):
    """Split a fused original layer into its diffusers parts: [(part index, A, B, alpha)].

    The general split (diffusers' and finetrainers') copies A into every part and cuts B by rows: exact as a product
    but each part keeps the fused rank. When B is block-diagonal (each rank column feeds one part only, as in files
    fused by :func:`export_lora`), each part gets back exactly its own rows of A and columns of B, so the split is
    exact as tensors too; a part whose B is entirely zero contributes nothing and is left out.
    """
    parts = _split_rows(rule, B, A.shape[1], name)
    used = [(p != 0).any(dim=0) for p in parts]
    disjoint = bool((torch.stack(used).sum(dim=0) <= 1).all()) and any(bool(u.any()) for u in used)
    rank = A.shape[0]
    if not disjoint:
        return [(k, A.clone(), p, alpha) for k, p in enumerate(parts)]
    out = []
    for k, (p, u) in enumerate(zip(parts, used)):
        idx = u.nonzero().squeeze(1)
        if len(idx):
            out.append((k, A[idx], p[:, idx], alpha * len(idx) / rank))
    return out


def import_lora(
    sd: Mapping[str, torch.Tensor], family: str | None = None, metadata: Mapping[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, float], str]:
    """Read a LoRA of any supported layout into (peft state dict, alphas, family).

    ``metadata`` is the safetensors header (from :func:`load_lora`): a diffusers-format file whose weights were not
    baked may state its alphas there (``lora_adapter_metadata``); without it, alpha = rank. Refuses non-finite
    values, unmapped keys, half pairs and shape mismatches, naming the keys.
    """
    _check_finite(sd)
    parsed = _parse(sd, family)
    if parsed.unresolved:
        raise LoraFormatError(
            f"{len(parsed.unresolved)} key(s) do not map to any {parsed.family} module "
            f"(read as {parsed.fmt}): {', '.join(parsed.unresolved[:20])}"
        )
    index = _index(parsed.family)
    config = _adapter_alphas(metadata) if parsed.layout == "diffusers" else None
    peft_sd: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for name, lora in parsed.modules.items():
        kind = _checked_kind(name, lora)
        rule, part, i = index.find(parsed.layout, name)
        if kind != "lora" and parsed.layout != "diffusers" and len(rule.diffusers) > 1:
            raise LoraFormatError(f"{name}: a {kind} module on a fused layer cannot be split into its parts")
        if kind in ("lokr", "loha"):  # canonical alpha of a LoKr/LoHa module: its scale
            module = _fill(rule.diffusers[part if parsed.layout == "diffusers" else 0], i)
            peft_sd.update({f"{module}.{k}": t.clone() for k, t in lora.extra.items()})
            alphas[module] = lycoris_scale(kind, lora.extra, lora.alpha)
            continue
        A, B = _complete(name, lora)
        rank = A.shape[0]
        if lora.alpha is not None:
            alpha = lora.alpha
        elif config is not None:
            alpha = _alpha_from_config(config, name, rank)
        else:
            alpha = float(rank)
        if parsed.layout == "diffusers":
            pieces = [(part, A, B, alpha)]
        elif len(rule.diffusers) == 1:
            pieces = [(0, A, B, alpha)]
        else:
            pieces = _unfuse(rule, A, B, alpha, name)
        for k, a, b, al in pieces:
            module = _fill(rule.diffusers[k], i)
            if module in alphas:
                raise LoraFormatError(f"two keys map to the same module {module!r}: {lora.keys}")
            peft_sd[f"{module}.lora_A.weight"] = a.clone()
            peft_sd[f"{module}.lora_B.weight"] = b.clone()
            peft_sd.update({f"{module}.{k}": t.reshape(-1).clone() for k, t in lora.extra.items()})  # DoRA
            alphas[module] = al
    return peft_sd, alphas, parsed.family


# ---------------------------------------------------------------------------------------------------------------------
# Export: canonical -> diffusers / comfyui / kohya.
# ---------------------------------------------------------------------------------------------------------------------


def _canonical(peft_sd: Mapping[str, torch.Tensor], alphas: Mapping[str, float] | float) -> dict[str, _Lora]:
    """{module: its tensors and alpha} from a peft state dict; every module needs complete tensors of one kind and
    an alpha (for LoKr/LoHa: the scale)."""
    _check_finite(peft_sd)
    groups, _ = _group(peft_sd)
    if set(groups) != {""}:
        raise LoraFormatError(f"expected un-prefixed peft keys (module.lora_A.weight), got prefixes {sorted(groups)}")
    for name, lora in groups[""].items():
        _checked_kind(name, lora)
        alpha = alphas if isinstance(alphas, (int, float)) else alphas.get(name)
        if alpha is None:
            raise LoraFormatError(f"no alpha for module {name!r}")
        if not math.isfinite(float(alpha)):
            raise LoraFormatError(f"non-finite alpha for module {name!r}: {alpha}")
        lora.alpha = float(alpha)
    return groups[""]


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    return t.clone() if scale == 1.0 else (t.float() * scale).to(t.dtype)


def _fuse(
    parts: dict[int, tuple[torch.Tensor, torch.Tensor, float]], rule: _Rule, keep_alpha: bool, name: str
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """One original-layout LoRA from its diffusers parts: A stacked, B block-diagonal, same product.

    With ``keep_alpha`` the fused alpha is the first part's scale times the fused rank (other parts' scale ratios go
    into their A rows); otherwise every scale is baked into A and no alpha is returned.
    """
    n = len(rule.diffusers)
    if n == 1:
        A, B, alpha = parts[0]
        return (A.clone(), B.clone(), alpha) if keep_alpha else (_scaled(A, alpha / A.shape[0]), B.clone(), None)
    present = [parts[k] for k in sorted(parts)]
    in_features = present[0][0].shape[1]
    missing = [k for k in range(n) if k not in parts]
    if rule.split_rest and n - 1 in missing:
        raise LoraFormatError(
            f"{name}: fused layer needs its last part {_fill(rule.diffusers[-1], None)!r} targeted too "
            "(its row count is not known from the LoRA alone)"
        )
    if any(a.shape[1] != in_features or a.dim() != 2 for a, _, _ in present):
        raise LoraFormatError(f"{name}: fused parts have different input sizes")
    base = present[0][2] / present[0][0].shape[0] if keep_alpha else 1.0
    A_rows, blocks = [], []
    for k in range(n):
        if k in parts:
            A, B, alpha = parts[k]
            A_rows.append(_scaled(A, alpha / A.shape[0] / base))
            blocks.append(B)
        else:  # untargeted square part: zero rows of the fused update
            blocks.append(torch.zeros(in_features, 0, dtype=present[0][1].dtype))
    A = torch.cat(A_rows, dim=0)
    B = torch.block_diag(*blocks)
    return A, B, (base * A.shape[0] if keep_alpha else None)


def export_lora(
    peft_sd: Mapping[str, torch.Tensor], alphas: Mapping[str, float] | float, family: str, fmt: str
) -> dict[str, torch.Tensor]:
    """Write a canonical adapter (peft keys + per-module alpha, or one alpha for all) as ``fmt`` for ``family``.

    DoRA goes out with its magnitude: peft's ``lora_magnitude_vector`` in the diffusers layout, ComfyUI's
    ``dora_scale`` in the original layouts. LoKr/LoHa go out in ComfyUI's (LyCORIS') key names with their scale baked
    into the first factor; diffusers has no loader for them, so that layout is refused.
    """
    if fmt not in FORMATS:
        raise LoraFormatError(f"unknown format {fmt!r}; known: {FORMATS}")
    index = _index(family)
    modules = _canonical(peft_sd, alphas)
    unknown = sorted(m for m in modules if index.find("diffusers", m) is None)
    if unknown:
        raise LoraFormatError(f"{len(unknown)} module(s) are not {family} LoRA targets we map: {', '.join(unknown)}")
    out: dict[str, torch.Tensor] = {}
    if fmt == "diffusers":
        lycoris = sorted({m.kind for m in modules.values()} & {"lokr", "loha"})
        if lycoris:
            raise LoraFormatError(
                f"diffusers cannot load {' or '.join(_KIND_NAMES[k] for k in lycoris)} "
                "adapters (its loaders read LoRA and DoRA only): export the comfyui or kohya format"
            )
        for name, lora in modules.items():
            out[f"transformer.{name}.lora_A.weight"] = _scaled(lora.A, lora.alpha / lora.A.shape[0])
            out[f"transformer.{name}.lora_B.weight"] = lora.B.clone()
            if lora.kind == "dora":
                if "lora_magnitude_vector" not in lora.extra:
                    raise LoraFormatError(
                        f"{name}: DoRA without peft's lora_magnitude_vector (a ComfyUI dora_scale is relative to the "
                        "base weights): diffusers cannot load it"
                    )
                out[f"transformer.{name}.lora_magnitude_vector"] = lora.extra["lora_magnitude_vector"].clone()
        return out
    grouped: dict[str, tuple[_Rule, str | None, dict[int, _Lora]]] = {}
    for name, lora in modules.items():
        rule, part, i = index.find("diffusers", name)
        if rule.original is None:
            raise LoraFormatError(f"{name}: cannot be written in the original layout: {rule.refused}")
        original = _fill(rule.original, i)
        grouped.setdefault(original, (rule, i, {}))[2][part] = lora
    alpha_rule = _family_names(family).alpha_in_original
    for original, (rule, i, parts) in sorted(grouped.items()):
        if fmt == "comfyui":
            base, down, up = f"diffusion_model.{_fill(rule.comfyui, i)}", "lora_A", "lora_B"
        else:
            base, down, up = f"lora_unet_{_fill(rule.kohya[0], i)}", "lora_down", "lora_up"
        other = next((p for p in parts.values() if p.kind != "lora"), None)
        if other is not None and len(rule.diffusers) > 1:
            raise LoraFormatError(
                f"{original}: a {other.kind} adapter cannot be written on this fused layer of the original layout; "
                "use lora.kind = 'lora', or leave its parts out of lora.targets"
            )
        if other is not None and other.kind in ("lokr", "loha"):
            first = (
                "hada_w1_a" if other.kind == "loha" else next(k for k in ("lokr_w1", "lokr_w1_a") if k in other.extra)
            )
            for k, t in other.extra.items():  # no .alpha: the scale is baked into the first factor
                out[f"{base}.{k}"] = _scaled(t, other.alpha) if k == first else t.clone()
            continue
        if other is not None:  # DoRA
            if "dora_scale" not in other.extra:
                raise LoraFormatError(
                    f"{original}: ComfyUI's DoRA scale is relative to the base weights and this adapter does not "
                    "carry it: export from the run's adapter (vidlora writes it at the end of training)"
                )
            out[f"{base}.dora_scale"] = other.extra["dora_scale"].reshape(-1, 1).clone()
        keep_alpha = fmt == "kohya" or bool(alpha_rule and re.match(alpha_rule, original))
        A, B, alpha = _fuse({k: (p.A, p.B, p.alpha) for k, p in parts.items()}, rule, keep_alpha, original)
        out[f"{base}.{down}.weight"] = A
        out[f"{base}.{up}.weight"] = B
        if alpha is not None:
            out[f"{base}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def convert(sd: Mapping[str, torch.Tensor], to_fmt: str, family: str | None = None) -> dict[str, torch.Tensor]:
    """Any supported layout -> ``to_fmt``, through the canonical form."""
    peft_sd, alphas, family = import_lora(sd, family)
    return export_lora(peft_sd, alphas, family, to_fmt)


def check_lora(sd: Mapping[str, torch.Tensor], family: str | None = None) -> tuple[str, str, list[str]]:
    """Refuse a LoRA with a non-finite value or a key that maps to no module; else (format, family, notes)."""
    _check_finite(sd)
    parsed = _parse(sd, family)
    import_lora(sd, parsed.family)
    return parsed.fmt, parsed.family, parsed.notes


def alphas_from_model(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """Per-module alpha of a peft-adapted model, as the alpha that gives its scaling with alpha/rank (rsLoRA too); for
    LoKr/LoHa modules the scale itself (the canonical form of :func:`import_lora`)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer

    out = {}
    for name, module in model.named_modules():
        name = name.removeprefix("base_model.model.")
        if isinstance(module, LoraLayer) and adapter_name in module.r:
            out[name] = float(module.scaling[adapter_name] * module.r[adapter_name])
        elif isinstance(module, LycorisLayer) and adapter_name in module.r:
            out[name] = float(module.scaling[adapter_name])
    return out


def comfyui_dora_scales(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """ComfyUI's ``dora_scale`` of every DoRA module: ``m * |W| / |W + s B A|`` per output row (fp32).

    peft (and diffusers) normalise the adapted weight by its own row norm, ``m * (W + sBA) / |W + sBA|``; ComfyUI's
    ``weight_decompose`` divides by the row norm of the base weight ``W`` when the scale is one value per output row.
    The scale it needs thus depends on the base weights, which only the model has: it is computed here, when the
    adapter is saved. Modules whose base weight is not on this process (DeepSpeed ZeRO-3) are left out.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import transpose

    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_magnitude_vector:
            continue
        W = module.get_base_layer().weight
        if W.numel() == 0:
            continue
        with torch.no_grad():
            W = transpose(W.float(), module.fan_in_fan_out).flatten(1)
            A, B = module.lora_A[adapter_name].weight.float(), module.lora_B[adapter_name].weight.float()
            adapted = W + module.scaling[adapter_name] * (B.flatten(1) @ A.flatten(1))
            m = module.lora_magnitude_vector[adapter_name].weight.float().reshape(-1)
            out[f"{name.removeprefix('base_model.model.')}.dora_scale"] = (
                (m * W.norm(dim=1) / adapted.norm(dim=1)).cpu().clone()
            )
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------------------------------------


def save_lora(path: str | os.PathLike, sd: Mapping[str, torch.Tensor], metadata: Mapping | None = None) -> list[str]:
    """Write a checked LoRA as safetensors with string metadata, atomically; return the reader notes of the check.

    Non-string metadata values are JSON-encoded. The file is refused (nothing written) when :func:`check_lora` refuses
    it; a crash leaves either the old file or the new one, never half (``data.cache.atomic_write``).
    """
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in (metadata or {}).items()}
    family = metadata.get("family")
    notes = check_lora(sd, family if known_family(family) else None)[2]
    tensors, seen = {}, set()
    for k, v in sd.items():  # safetensors refuses shared storage: give each tensor its own
        v = v.detach().contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset())
        tensors[k] = v.clone() if ptr in seen or v.untyped_storage().nbytes() != v.nbytes else v
        seen.add(ptr)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return notes


def load_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata as strings) of a safetensors LoRA; no pickle is ever read."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            return tensors, dict(f.metadata() or {})
    except SafetensorError as e:  # a .pt/.ckpt pickle, a truncated download, an HTML error page...
        raise LoraFormatError(f"{path}: not a readable .safetensors file ({e}); other formats are not read") from None


# ---------------------------------------------------------------------------------------------------------------------
# Merge.
# ---------------------------------------------------------------------------------------------------------------------


def _base_state_dict(base: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = base.state_dict() if isinstance(base, torch.nn.Module) else dict(base)
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}


def merge_lora(
    base: torch.nn.Module | Mapping[str, torch.Tensor],
    peft_sd: Mapping[str, torch.Tensor],
    alphas: Mapping[str, float] | float,
    strength: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Base weights with ``strength * alpha/rank * B @ A`` added (what diffusers' ``fuse_lora(lora_scale=strength)``
    does). Accepts a transformer (peft-wrapped or not) or its state dict; returns a new state dict."""
    state = _base_state_dict(base)
    for name, lora in _canonical(peft_sd, alphas).items():
        if lora.kind != "lora":
            raise LoraFormatError(f"{name}: merging a {lora.kind} adapter is not supported (LoRA only)")
        A, B, alpha = lora.A, lora.B, lora.alpha
        key = f"{name}.weight"
        if key not in state:
            raise LoraFormatError(f"LoRA module {name!r} has no base weight {key!r}")
        W = state[key]
        delta = (B.float().flatten(1) @ A.float().flatten(1)) * (alpha / A.shape[0] * strength)
        if delta.numel() != W.numel():
            raise LoraFormatError(f"{name}: update {tuple(delta.shape)} does not fit weight {tuple(W.shape)}")
        state[key] = (W.float() + delta.reshape(W.shape)).to(W.dtype)
    return state
