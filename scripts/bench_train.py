"""Benchmark vidlora's LoRA training step at real model sizes, against a bare diffusers + peft loop.

    python scripts/bench_train.py --model wan-14b --frames 81 --height 480 --width 832 --steps 5
    python scripts/bench_train.py --model small --steps 3 --set train.attention_backend=_native_math

The transformer is built from the published config with random weights (no download), fed random latents
and text embeddings of the right shapes. Each case runs in its own process (so peak memory is its own),
one after the other:
  vidlora         vidlora's step (trainer.train.build_model, forward_backward and optimizer_step: the loop's own)
  bare            the same model, LoRA config, optimizer and batch in a plain PyTorch loop (no vidlora)
  checkpointing   vidlora with train.gradient_checkpointing flipped
  adamw8bit       vidlora with bitsandbytes' 8-bit AdamW
  routing         vidlora with token routing (train.token_routing 0.5 unless the recipe sets a share; not by default)
With --context-parallel N, a "context-parallel" case runs vidlora's step in N processes (torchrun) that share
the sample, its sequence split (train.context_parallel = N), and reports the largest per-rank peak memory.
The script prints s/step, tokens/s, peak memory, achieved FLOP/s and MFU (trainer/perf.py has the
FLOPs formula and the device peaks; docs/performance.md explains both), then the ratios:
vidlora / bare time (overhead, goal <= 1.05) and the time and memory of each memory mode and of routing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ("vidlora", "bare", "checkpointing", "adamw8bit", "routing")
DEFAULT_CASES = CASES[:4]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from trainer.perf import presets

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(presets()), default="small", help="model size (published configs)")
    p.add_argument("--frames", type=int, help="pixel frames, 4k+1 (default 81; small presets: 9)")
    p.add_argument("--height", type=int, help="pixel height, multiple of 16 (default 480; small presets: 128)")
    p.add_argument("--width", type=int, help="pixel width, multiple of 16 (default 832; small presets: 128)")
    p.add_argument("--text-tokens", type=int, help="text length (default: Wan 512, HunyuanVideo 256)")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per case")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile, allocator, caches)")
    p.add_argument("--recipe", help="a recipe TOML whose lora/train settings to use (default: the defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma list out of {', '.join(CASES)}")
    p.add_argument(
        "--context-parallel", type=int, default=1, metavar="N", help="also run N processes sharing the sample"
    )
    p.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's own choice)")
    p.add_argument("--peak-tflops", type=float, help="the device's bf16 dense peak, if the table lacks it")
    p.add_argument("--json", help="also write all figures to this JSON file")
    p.add_argument(
        "--in-process", action="store_true", help="run the cases in this process: quicker, but peak memory is shared"
    )
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    p.add_argument("--with-bare", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    small = args.model.endswith("small")
    args.frames = args.frames or (9 if small else 81)
    args.height = args.height or (128 if small else 480)
    args.width = args.width or (128 if small else 832)
    return args


# --- one case, in its own process ---------------------------------------------------------------------


def case_overrides(args: argparse.Namespace, case: str) -> tuple[list[str], str]:
    """(recipe overrides, optimizer) of a case."""
    from trainer.config import load_recipe

    overrides = list(args.set)
    if case == "context-parallel":
        overrides.append(f"train.context_parallel={args.context_parallel}")
    if case == "checkpointing":
        gc = load_recipe(args.recipe, overrides).train.gradient_checkpointing
        overrides.append(f"train.gradient_checkpointing={'false' if gc else 'true'}")
    if case == "routing" and not load_recipe(args.recipe, overrides).train.token_routing:
        overrides.append("train.token_routing=0.5")
    return overrides, "adamw8bit" if case == "adamw8bit" else "adamw"


def vidlora_step(recipe, preset, optimizer_kind: str, batch: dict, family=None):
    """vidlora's own training step: build_model and flow_loss from trainer/train.py, and its loop body.

    Given the `family` of an earlier call, the new model shares that model's frozen weights.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from trainer.config import resolve_device_precision
    from trainer.memory import make_optimizer
    from trainer.models.base import DTYPES
    from trainer.perf import bench_family
    from trainer.train import build_model, forward_backward, optimizer_step

    t = recipe.train.model_copy(update={"optimizer": optimizer_kind})
    recipe = recipe.model_copy(update={"train": t})
    mixed_precision, weight_dtype = resolve_device_precision(t.mixed_precision, recipe.model.dtype)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation,
        cpu=not torch.cuda.is_available(),  # torchrun on a CPU: gloo, not N processes each alone
    )
    set_seed(t.seed)
    family = family or bench_family(preset, recipe.model, accelerator.device)
    model = build_model(recipe, family, DTYPES[weight_dtype])
    if t.context_parallel > 1:  # every rank has the same batch: the group's one sample
        from trainer.parallel import device_mesh, enable_context_parallel

        world, kind = accelerator.num_processes, t.context_parallel_kind
        mesh = device_mesh(t.context_parallel, kind, world, accelerator.device)
        for expert in model.experts.values():
            enable_context_parallel(expert, family.context_parallel_plan(), kind, mesh, accelerator.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, t)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=10**6)
    model, optimizer = accelerator.prepare(model, optimizer)
    micro = 0
    slots = list(range(batch["latents"].shape[0]))

    # The body of train.py's loop (for batch in loader: ...), minus logging and checkpointing.
    def step() -> float:
        nonlocal micro
        for _ in range(t.gradient_accumulation):
            with accelerator.accumulate(model):
                loss, _ = forward_backward(accelerator, model, batch, recipe, micro, slots, None, t.context_parallel)
            micro += 1
        optimizer_step(accelerator, params, optimizer, scheduler, t.max_grad_norm, bad=False)
        return loss.item()

    return step, model, family


def bare_step(recipe, preset, optimizer_kind: str, batch: dict, tensors: dict):
    """The same step as a user would write it with diffusers + peft and nothing of vidlora, on a second
    instance of the transformer that shares the frozen `tensors` of the first (same weights, no copy)."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig

    from trainer.config import resolve_device_precision
    from trainer.models.base import DTYPES
    from trainer.perf import bench_family, build_transformer, checkpoint_some_blocks

    t = recipe.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mixed_precision, weight_dtype = resolve_device_precision(t.mixed_precision, recipe.model.dtype)
    presets = bench_family(preset, recipe.model).lora_presets  # the family's LoRA target regexes
    targets = (
        presets.get(recipe.lora.targets, recipe.lora.targets)
        if isinstance(recipe.lora.targets, str)
        else recipe.lora.targets
    )
    torch.manual_seed(t.seed)
    transformer = build_transformer(preset, DTYPES[weight_dtype], device, tensors=tensors)
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(
            r=recipe.lora.rank,
            lora_alpha=recipe.lora.alpha or recipe.lora.rank,
            lora_dropout=recipe.lora.dropout,
            target_modules=targets,
        )
    )
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if t.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        if t.gradient_checkpointing_ratio < 1:  # the same blocks as vidlora, through diffusers' hook
            checkpoint_some_blocks(transformer, t.gradient_checkpointing_ratio)
    if t.attention_backend != "sdpa":
        transformer.set_attention_backend(t.attention_backend)
    if t.compile == "blocks":
        transformer.compile_repeated_blocks()
    elif t.compile == "full":
        transformer.compile()
    if optimizer_kind == "adamw8bit":
        import bitsandbytes as bnb

        adamw = bnb.optim.AdamW8bit
    else:
        adamw = torch.optim.AdamW
    optimizer = adamw(params, lr=t.learning_rate, betas=t.adam_betas, weight_decay=t.weight_decay, eps=t.adam_epsilon)
    autocast = torch.autocast(device.type, dtype=DTYPES[mixed_precision]) if mixed_precision != "no" else nullcontext()
    x0 = batch["latents"]

    def step() -> float:
        for _ in range(t.gradient_accumulation):
            sigma = torch.rand(x0.shape[0], device=device)
            noise = torch.randn_like(x0)
            s = sigma.view(-1, 1, 1, 1, 1)
            with autocast:
                pred = bare_forward(preset, transformer, (1 - s) * x0 + s * noise, sigma * 1000, batch)
            loss = F.mse_loss(pred.float(), (noise - x0).float()) / t.gradient_accumulation
            loss.backward()
            value = loss.item()
        if t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value

    return step


def bare_forward(preset, transformer, noisy, timestep, batch: dict):
    """The transformer call of diffusers' own pipelines (Wan's, HunyuanVideo's with its pooled text and mask, or
    HunyuanVideo 1.5's with two masked text streams, zero condition channels and no image tokens). An image-to-video
    transformer's condition channels are zeros here: their values do not change the cost."""
    import torch

    if "prompt_embeds_2" in batch:
        b, _, f, h, w = noisy.shape
        return transformer(
            hidden_states=torch.cat([noisy, torch.zeros_like(noisy), noisy.new_zeros(b, 1, f, h, w)], dim=1),
            timestep=timestep,
            encoder_hidden_states=batch["prompt_embeds"],
            encoder_attention_mask=batch["prompt_embeds_mask"],
            encoder_hidden_states_2=batch["prompt_embeds_2"],
            encoder_attention_mask_2=batch["prompt_embeds_mask_2"],
            image_embeds=noisy.new_zeros(b, 0, transformer.config.image_embed_dim),
            return_dict=False,
        )[0]
    extra = transformer.config.in_channels - noisy.shape[1]
    if extra > 0:
        noisy = torch.cat([noisy, noisy.new_zeros(noisy.shape[0], extra, *noisy.shape[2:])], dim=1)
    if preset.family_class.per_token_timesteps:  # as its pipeline feeds it: the sample's timestep on every token
        from trainer.perf import grid_tokens

        tokens = grid_tokens(preset.family_class.patch_of(preset.config), tuple(noisy.shape[1:]))
        timestep = timestep[:, None].expand(-1, tokens)
    if "pooled_projections" not in batch:
        return transformer(
            hidden_states=noisy, timestep=timestep, encoder_hidden_states=batch["prompt_embeds"], return_dict=False
        )[0]
    return transformer(
        hidden_states=noisy,
        timestep=timestep,
        encoder_hidden_states=batch["prompt_embeds"],
        encoder_attention_mask=batch["encoder_attention_mask"],
        pooled_projections=batch["pooled_projections"],
        guidance=torch.full((noisy.shape[0],), 1000.0, device=noisy.device),
        return_dict=False,
    )[0]


def rss_peak_bytes() -> int:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_case(args: argparse.Namespace, case: str, with_bare: bool) -> list[dict]:
    """One vidlora case (its peak memory is measured before anything else is built), and with `with_bare`
    the bare loop on the same frozen weights, timed step by step in alternation with vidlora's step so a
    busy machine slows both alike."""
    import accelerate  # noqa: F401  (every import before the memory baseline)
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import psutil
    import torch
    from tqdm.auto import tqdm

    import trainer.train  # noqa: F401
    from trainer.config import load_recipe
    from trainer.perf import (
        checkpointed_fractions,
        latent_shape,
        presets,
        random_batch,
        step_flops,
        token_routing,
        video_tokens,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides, optimizer_kind = case_overrides(args, case)
    recipe = load_recipe(args.recipe, overrides)
    t = recipe.train
    preset = presets()[args.model]
    latent = latent_shape(preset, args.frames, args.height, args.width)
    text_tokens = args.text_tokens or preset.text_tokens
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch = {k: v.to(device) for k, v in random_batch(preset, latent, t.batch_size, text_tokens, t.seed).items()}
    if optimizer_kind == "adamw8bit":
        import bitsandbytes  # noqa: F401
    rss_before = rss_peak_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def timed(step) -> tuple[float, float]:
        """(wall, CPU) seconds of one step; CPU time is what a busy shared CPU cannot inflate."""
        start, cpu = time.perf_counter(), time.process_time()
        step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu

    compared = case not in ("vidlora", "context-parallel")  # a memory mode: timed against vidlora without it
    bar = tqdm(total=args.warmup * (1 + with_bare + compared) + args.steps, desc=case, leave=False)
    step, model, family = vidlora_step(recipe, preset, optimizer_kind, batch)
    built = torch.cuda.memory_allocated() if cuda else psutil.Process().memory_info().rss  # weights, LoRA, batch
    for _ in range(args.warmup):
        timed(step)
        bar.update()
    memory = torch.cuda.max_memory_allocated() if cuda else rss_peak_bytes() - rss_before
    # what the steps add on top of the built model: activations (and optimizer state, on the first step)
    activations = max(0, (torch.cuda.max_memory_allocated() if cuda else rss_peak_bytes()) - built)
    if t.context_parallel > 1:  # the largest rank's
        every: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, (memory, activations))
        memory, activations = max(m for m, _ in every), max(a for _, a in every)
    # name -> (step, recipe, optimizer): the case first, then what it is compared with in alternation
    entries = {case: (step, recipe, optimizer_kind)}
    if with_bare:  # the plain loop, for the overhead ratio
        entries["bare"] = (
            bare_step(recipe, preset, optimizer_kind, batch, family.base_tensors),
            recipe,
            optimizer_kind,
        )
    if compared:  # vidlora without the memory mode (or routing), for the mode's time ratio
        reference = load_recipe(args.recipe, args.set)
        if case == "routing":
            reference = reference.model_copy(update={"train": reference.train.model_copy(update={"token_routing": 0})})
        entries[f"{case}-reference"] = (vidlora_step(reference, preset, "adamw", batch, family)[0], reference, "adamw")
    for name in list(entries)[1:]:
        for _ in range(args.warmup):
            timed(entries[name][0])
            bar.update()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in entries}
    for i in range(args.steps):
        for name in list(entries)[:: 1 if i % 2 == 0 else -1]:  # alternate who goes first
            times[name].append(timed(entries[name][0]))
        bar.update()
    bar.close()

    from trainer.train import unwrapped

    transformer = next(iter(unwrapped(model).experts.values()))  # the blocks are the same in every entry
    results = []
    for name, ts in times.items():
        _, r, optimizer = entries[name]
        per_step = r.train.batch_size * r.train.gradient_accumulation
        flops = step_flops(
            preset, latent, text_tokens, per_step, r.lora.rank, r.lora.targets, checkpointed_fractions(transformer, r),
            token_routing(transformer, preset.family, r),
        )  # fmt: skip
        s = statistics.median(wall for wall, _ in ts)
        results.append(
            {
                "case": name,
                "optimizer": optimizer,
                "gradient_checkpointing": r.train.gradient_checkpointing,
                "token_routing": r.train.token_routing,
                "s_per_step": s,
                "s_per_step_all": [wall for wall, _ in ts],
                "cpu_s_per_step": statistics.median(cpu for _, cpu in ts),
                "cpu_s_per_step_all": [cpu for _, cpu in ts],
                "tokens_per_s": per_step * video_tokens(preset, latent) / s,
                # later entries share the case's frozen weights, so only the case has a memory figure
                "peak_memory_bytes": memory if name == case else None,
                "step_memory_bytes": activations if name == case else None,
                "memory_kind": "cuda max_memory_allocated" if cuda else "peak RSS added by the case",
                "model_flops": flops.model,
                "hardware_flops": flops.hardware,
                "device": torch.cuda.get_device_name()
                if cuda
                else f"CPU ({os.cpu_count()} cores, torch {torch.__version__})",
            }
        )
    return results


# --- the driver: each case in a fresh process, then the table ------------------------------------------


def spawn_case(argv: list[str], case: str, with_bare: bool, processes: int = 1) -> list[dict]:
    """Run one case in a child process (or `processes` under torchrun); its last stdout line is the JSON result
    (progress goes to stderr; only the first rank prints it)."""
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", free_port()]
    cmd = [*launch, __file__, *argv, "--case", case] + (["--with-bare"] if with_bare else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        return [{"case": case, "error": f"exit code {proc.returncode} (traceback above)"}]
    return json.loads(lines[-1])


def free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def report(args: argparse.Namespace, results: list[dict]) -> None:
    from trainer.perf import device_peak_flops, latent_shape, presets, video_tokens

    ok = [r for r in results if "error" not in r]
    device = ok[0]["device"] if ok else "?"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else device_peak_flops(device)
    preset = presets()[args.model]
    tokens = video_tokens(preset, latent_shape(preset, args.frames, args.height, args.width))
    print(f"\nmodel {args.model}, {args.frames}x{args.height}x{args.width} -> {tokens} video tokens; {device}")
    print(f"bf16 dense peak: {peak / 1e12:.0f} TFLOP/s" if peak else "no peak known for this device: no MFU")
    print(f"{'case':<15}{'s/step':>9}{'tokens/s':>10}{'peak mem':>11}{'TFLOP/s':>9}{'MFU':>7}{'HFU':>7}")
    by_case = {r["case"]: r for r in ok}
    for r in results:
        if "error" in r:
            print(f"{r['case']:<15}failed: {r['error']}")
        elif not r["case"].endswith("-reference"):  # the references only time the memory modes
            achieved = r["model_flops"] / r["s_per_step"]
            mfu = f"{achieved / peak:.1%}" if peak else "-"
            hfu = f"{r['hardware_flops'] / r['s_per_step'] / peak:.1%}" if peak else "-"
            print(
                f"{r['case']:<15}{r['s_per_step']:>9.3f}{r['tokens_per_s']:>10.0f}"
                f"{fmt_bytes(r['peak_memory_bytes']):>11}{achieved / 1e12:>9.3f}{mfu:>7}{hfu:>7}"
            )
    base = by_case.get("vidlora")
    if base:
        print(f"FLOPs per step: {base['model_flops']:.4g} (what MFU counts)", end="")
        recompute = {r["case"]: r["hardware_flops"] for r in ok if r["hardware_flops"] > r["model_flops"]}
        print("".join(f"; {case} with recompute {f:.4g} (HFU)" for case, f in recompute.items()))
        print(f"memory: {base['memory_kind']}")
    if base and "bare" in by_case:
        ratio = base["s_per_step"] / by_case["bare"]["s_per_step"]
        print(f"overhead ratio (vidlora / bare s/step): {ratio:.3f} (goal <= 1.05)")
        if "CPU" in device:  # other processes inflate wall time; the CPU time each step used they do not
            cpu = base["cpu_s_per_step"] / by_case["bare"]["cpu_s_per_step"]
            print(f"overhead ratio by CPU time (vidlora / bare): {cpu:.3f}")
    cp = by_case.get("context-parallel")
    if base and cp:
        print(
            f"context parallel {args.context_parallel} vs vidlora: time ratio {cp['s_per_step'] / base['s_per_step']:.3f}, "
            f"per-rank peak memory ratio {cp['peak_memory_bytes'] / max(1, base['peak_memory_bytes']):.3f}, "
            f"per-rank step memory ratio {cp['step_memory_bytes'] / max(1, base['step_memory_bytes']):.3f} "
            "(what the steps add to the built model: activations)"
        )
    for case in ("checkpointing", "adamw8bit", "routing"):
        r, ref = by_case.get(case), by_case.get(f"{case}-reference")
        if base and r and ref:
            name = {
                "checkpointing": f"gradient_checkpointing={str(r['gradient_checkpointing']).lower()}",
                "routing": f"token_routing={r['token_routing']:g}",
            }.get(case, case)
            cpu = f" (by CPU time {r['cpu_s_per_step'] / ref['cpu_s_per_step']:.3f})" if "CPU" in device else ""
            print(
                f"{name} vs vidlora: time ratio "
                f"{r['s_per_step'] / ref['s_per_step']:.3f}{cpu}, peak memory ratio "
                f"{r['peak_memory_bytes'] / max(1, base['peak_memory_bytes']):.3f}"
            )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.case:
        import torch

        try:
            results = run_case(args, args.case, args.with_bare)
        except torch.OutOfMemoryError:
            results = [{"case": args.case, "error": "out of memory"}]
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(results))
        return 0
    from trainer.config import UserError, load_recipe
    from trainer.perf import latent_shape, presets

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    try:  # bad arguments fail here, once, not in every child
        load_recipe(args.recipe, args.set)
        latent_shape(presets()[args.model], args.frames, args.height, args.width)
        family_class = presets()[args.model].family_class
        if args.context_parallel > 1 and family_class.context_parallel_plan() is None:
            raise UserError(f"--context-parallel: the {family_class.name} family has no context-parallel plan")
        if "vidlora" not in cases or set(cases) - set(CASES):
            raise UserError(f"--cases {args.cases}: a comma list out of {', '.join(CASES)} that includes vidlora")
    except UserError as e:
        print(f"bench_train: error: {e}", file=sys.stderr)
        return 2
    results = []
    for case in [c for c in cases if c != "bare"]:
        with_bare = case == "vidlora" and "bare" in cases
        results += run_case(args, case, with_bare) if args.in_process else spawn_case(argv, case, with_bare)
    if args.context_parallel > 1:
        results += spawn_case(argv, "context-parallel", False, args.context_parallel)
    report(args, results)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
