"""`vidlora report RUN_OR_CACHE_DIR`: one HTML page to look at a dataset and a training run instead of reading JSON.

The page opens from disk with no server and no network: charts are inline SVG drawn here (no charting package),
thumbnails are embedded JPEGs, and validation videos are linked by relative paths (a video inside the report's folder
is linked where it is; any other is copied into a folder beside the report, which the page names). It reads whatever
exists, so it works on a run in progress and on a cache from a dry run; every string that comes from the user's
data (file names, captions, reasons) is escaped.
"""

from __future__ import annotations

import html
import io
import json
import math
import shlex
import shutil
import time
from base64 import b64encode
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from data.cache import atomic_write, read_meta
from trainer.config import UserError, load_recipe
from trainer.plot import ema, read_metrics

THUMB_SIDE = 256  # longest side of a thumbnail, in pixels
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
MAX_POINTS = 2000  # per curve; longer ones are thinned evenly (a chart is ~600 px wide)


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def command(*args: str | Path) -> str:
    """A shell line to copy: `vidlora report /path/with spaces`."""
    return " ".join(shlex.quote(str(a)) for a in ("vidlora", *args))


def build_report(
    target: str | Path,
    out: str | Path | None = None,
    thumbnails: int = 8,
    family_for: Callable[[Path], Any] | None = None,
) -> Path:
    """Write the report of a run folder (training, then its dataset) or of a cache folder (the dataset) and return
    its path (default TARGET/report.html). `family_for(cache)` gives the family whose VAE decodes `thumbnails`
    cached samples back to frames; without it, or with 0, the page has no thumbnails."""
    target = Path(target)
    if not target.is_dir():
        raise UserError(f"{target}: no such folder (give a run folder or a prepared cache)")
    run, cache = locate(target)
    out = Path(out) if out else target / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = []
    if run is not None:
        sections.append(training_section(run, cache, out))
    if cache is not None and cache.is_dir():
        sections.append(dataset_section(cache, thumbnails, family_for))
    elif cache is not None:
        sections.append(
            (
                "dataset",
                "Dataset",
                f"<p class=warn>cache {esc(cache)} not found (the recipe's data.cache_dir, "
                "relative to where training ran)</p>",
            )
        )
    page = render_page(target, sections)
    atomic_write(out, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return out


def locate(target: Path) -> tuple[Path | None, Path | None]:
    """(run folder, cache folder): a run names its cache in recipe.toml; a cache is reported alone."""
    if (target / "recipe.toml").is_file():
        return target, Path(load_recipe(target / "recipe.toml").data.cache_dir)
    if (target / "index.json").is_file() or (target / "report.json").is_file():
        return None, target
    raise UserError(
        f"{target}: neither a run folder (no recipe.toml) nor a prepared cache (no index.json or report.json)"
    )


def render_page(target: Path, sections: list[tuple[str, str, str]]) -> str:
    nav = " · ".join(f'<a href="#{key}">{esc(title)}</a>' for key, title, _ in sections)
    body = "\n".join(
        f'<section id="{key}"><h2>{esc(title)}</h2>\n{content}</section>' for key, title, content in sections
    )
    made = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,"><title>vidlora report: {esc(target.resolve().name)}</title>
<style>{CSS}</style></head>
<body><header><h1>vidlora report</h1><p><code>{esc(target.resolve())}</code> · made {made} by
<code>{esc(command("report", target))}</code></p><nav>{nav}</nav></header>
{body}
<script>{SCRIPT}</script>
</body></html>
"""


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1400px;padding:0 20px 40px;color:#222}
h1{margin:16px 0 4px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}h3{margin:20px 0 6px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}
pre{background:#f7f7f7;padding:8px;overflow:auto;max-height:420px;font-size:12px}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:6px;padding:6px 14px}
.card b{font-size:20px;display:block}.ok b{color:#2a7d2a}.failed b{color:#c0392b}.skipped b{color:#b9770e}
.warn{color:#b9770e}.bad{color:#c0392b}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:12px}
figure{margin:0;border:1px solid #eee;border-radius:6px;padding:4px}figcaption{font-weight:600;padding:2px 6px}
svg.chart{width:100%;height:auto;display:block}svg text{font:11px system-ui,sans-serif;fill:#555}
.thumbs{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:12px}
.thumb{border:1px solid #eee;border-radius:6px;padding:6px}.thumb img{max-height:128px;margin-right:4px}
.thumb p{margin:4px 0}.small{font-size:12px;color:#666}
video{width:288px;max-height:360px;background:#000;display:block}
td.heat{text-align:right;min-width:48px}
"""

SCRIPT = """
for (const b of document.querySelectorAll('button[data-row]')) {
  b.addEventListener('click', () => {
    for (const v of document.querySelectorAll('tr[data-row="' + b.dataset.row + '"] video')) { v.currentTime = 0; v.play(); }
  });
}
"""


# --- dataset -----------------------------------------------------------------------------------------------------


def dataset_section(cache: Path, thumbnails: int, family_for: Callable[[Path], Any] | None) -> tuple[str, str, str]:
    report = _read_json(cache / "report.json")
    index = _read_json(cache / "index.json")
    parts = [f"<p>cache <code>{esc(cache.resolve())}</code></p>"]
    if report is None:
        parts.append("<p class=warn>no report.json: run <code>vidlora prepare</code> to record every input</p>")
    else:
        if report.get("dry_run"):
            parts.append("<p class=warn>a dry run: the plan, nothing encoded yet</p>")
        parts.append(_status_cards(report))
        parts.append(_unused_inputs(report["inputs"]))
        parts.append(_caption_problems(report["inputs"]))
        parts.append(_worth_knowing(report["inputs"]))
        parts.append(_all_inputs(report["inputs"]))
    if index is not None:
        from data.inspect import inspect_cache

        parts.append(f"<h3>Summary</h3><pre>{esc(inspect_cache(cache))}</pre>")
    parts.append(_bucket_table(report, index))
    if index is not None:
        parts.append(_thumbnails(cache, index, thumbnails, family_for))
    return "dataset", "Dataset", "\n".join(parts)


def _status_cards(report: dict[str, Any]) -> str:
    cards = [f'<div class="card {esc(k)}"><b>{v}</b>{esc(k)}</div>' for k, v in sorted(report["counts"].items())]
    cards.append(f'<div class="card"><b>{report["samples"]}</b>samples</div>')
    return f'<h3>Inputs</h3><div class="cards">{"".join(cards)}</div>'


def _once(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A file that two datasets use is listed once (report.json has a row per dataset)."""
    return list({(r["path"], r["status"], r.get("reason"), r.get("note")): r for r in rows}.values())


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells are HTML already: escape what goes in."""
    th = "".join(f"<th>{h}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><tr>{th}</tr>{trs}</table>'


def _unused_inputs(inputs: list[dict[str, Any]]) -> str:
    bad = _once([r for r in inputs if r["status"] in ("failed", "skipped")])
    if not bad:
        return "<p>every input was used</p>"
    bad.sort(key=lambda r: (r["status"], r["path"]))
    rows = [
        [
            f'<span class="{esc(r["status"])}">{esc(r["status"])}</span>',
            f"<code>{esc(r['path'])}</code>",
            esc(r.get("reason", "")),
            esc(r["dataset"]),
        ]
        for r in bad
    ]
    return f"<h3>Not used ({len(bad)})</h3>" + _table(["status", "file", "reason", "dataset"], rows, "unused")


def _caption_problems(inputs: list[dict[str, Any]]) -> str:
    rows = _once([r for r in inputs if r.get("caption_missing")])
    if not rows:
        return "<h3>Captions</h3><p>every used file has its own caption</p>"
    cells = [
        [
            f"<code>{esc(r['path'])}</code>",
            "skipped" if r["status"] == "skipped" else "trained with the default caption",
            esc(r.get("reason") or r.get("note", "")),
        ]
        for r in rows
    ]
    return f"<h3>Captions missing or defaulted ({len(rows)})</h3>" + _table(
        ["file", "what happened", "why"], cells, "captions"
    )


def _worth_knowing(inputs: list[dict[str, Any]]) -> str:
    rows = []
    for r in _once([r for r in inputs if r["status"] == "ok"]):
        notes = [
            r.get("note"),
            r.get("color") and f"colour: {r['color']}",
            r.get("no_motion") and f"no multi-frame sample: {r['no_motion']}",
        ]
        notes = [n for n in notes if n and not (r.get("caption_missing") and n == r.get("note"))]
        if notes:
            rows.append([f"<code>{esc(r['path'])}</code>", "<br>".join(esc(n) for n in notes)])
    if not rows:
        return ""
    return f"<h3>Used, with a note ({len(rows)})</h3>" + _table(["file", "note"], rows, "notes")


def _all_inputs(inputs: list[dict[str, Any]]) -> str:
    """Every input with what became of it, folded away: there may be thousands."""
    rows = []
    for r in _once(inputs):
        if r["status"] == "ok":
            size = f"{r['width']}x{r['height']}, {_plural(r['frames'], 'frame')}" + (
                f", {r['fps']:g} fps" if r["frames"] > 1 else ""
            )
            made = f"{_plural(r['samples'], 'sample')} in {', '.join(r.get('buckets', []))}"
        else:
            size, made = "", r.get("reason", "")
        rows.append([f"<code>{esc(r['path'])}</code>", esc(r["status"]), esc(size), esc(made), esc(r["dataset"])])
    table = _table(["file", "status", "size", "samples, or why none", "dataset"], rows, "inputs")
    return f"<details><summary>All inputs ({len(rows)})</summary>{table}</details>"


def _bucket_table(report: dict[str, Any] | None, index: dict[str, Any] | None) -> str:
    """Samples per (resolution, frames): a 2-D histogram, cells shaded by count."""
    if report is not None:
        counts = {tuple(int(x) for x in k.split("x")): n for k, n in report["buckets"].items()}
    elif index is not None:
        counts = {}
        for s in index["samples"]:
            key = (*s["bucket"], len(s["frames"]))
            counts[key] = counts.get(key, 0) + 1
    else:
        return ""
    if not counts:
        return "<h3>Buckets</h3><p>no samples</p>"
    sizes = sorted({(w, h) for w, h, _ in counts}, key=lambda s: (s[0] * s[1], s))
    frames = sorted({f for *_, f in counts})
    top = max(counts.values())
    th = "".join(f"<th>{h}</th>" for h in ["size (W x H) \\ frames", *frames, "total"])
    trs = []
    for w, h in sizes:
        tds = []
        for f in frames:
            n = counts.get((w, h, f), 0)
            shade = f' style="background:rgba(31,119,180,{0.08 + 0.6 * n / top:.2f})"' if n else ""
            tds.append(f'<td class="heat" data-bucket="{w}x{h}x{f}"{shade}>{n}</td>' if n else '<td class="heat"></td>')
        total = sum(counts.get((w, h, f), 0) for f in frames)
        trs.append(f"<tr><th>{w}x{h}</th>{''.join(tds)}<td class=heat>{total}</td></tr>")
    return f"<h3>Buckets ({len(counts)})</h3><table class=buckets><tr>{th}</tr>{''.join(trs)}</table>"


def _thumbnails(cache: Path, index: dict[str, Any], n: int, family_for: Callable[[Path], Any] | None) -> str:
    """First, middle and last frame of a few samples (one per bucket shape first), decoded from the cached latents:
    the crop, orientation and colours the model is trained on, with the captions it reads."""
    from data.inspect import decode_frames, load_decoder, pick

    title = "<h3>What the model sees (decoded from the cache)</h3>"
    if n <= 0 or family_for is None or not index["samples"]:
        return title + "<p class=small>no thumbnails (<code>--thumbnails N</code> decodes N samples)</p>"
    started = time.perf_counter()
    try:
        family = family_for(cache)
        vae = load_decoder(family)
    except Exception as e:  # a model that cannot be loaded here costs the thumbnails, not the report
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return title + f"<p class=warn>thumbnails not decoded: cannot load the VAE ({esc(reason)})</p>"
    cells = []
    for s in pick(index["samples"], n):
        try:
            frames = decode_frames(cache, s, vae, family)
        except Exception as e:  # a damaged entry costs its thumbnail (the summary's health check names it)
            cells.append(f'<div class="thumb warn">{esc(s["file"])}: cannot decode ({esc(e)})</div>')
            continue
        shown = sorted({0, len(frames) // 2, len(frames) - 1})
        imgs = "".join(
            f'<img src="{_jpeg(frames[i])}" alt="frame {i}" title="frame {i} of {len(frames)}">' for i in shown
        )
        captions = "".join(f"<p>{esc(_caption(cache, t))}</p>" for t in s["text_ids"])
        w, h = s["bucket"]
        fps = f", {s['fps']:g} fps" if s.get("fps") and len(s["frames"]) > 1 else ""
        cells.append(
            f'<div class="thumb">{imgs}{captions}<p class=small><code>{esc(s["source"])}</code><br>'
            f"{w}x{h}, {_plural(len(s['frames']), 'frame')}{fps}, source frames {s['frames'][0]}-{s['frames'][-1]}</p></div>"
        )
    took = time.perf_counter() - started
    return (
        title
        + f'<p class=small>{len(cells)} samples decoded in {took:.1f} s</p><div class="thumbs">{"".join(cells)}</div>'
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _jpeg(frame: Any) -> str:
    from PIL import Image

    image = Image.fromarray(frame)
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + b64encode(buf.getvalue()).decode()


def _caption(cache: Path, text_id: str) -> str:
    return (read_meta(cache / "text" / f"{text_id}.safetensors") or {}).get("caption", f"(caption {text_id} missing)")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# --- training ----------------------------------------------------------------------------------------------------


def training_section(run: Path, cache: Path | None, out: Path) -> tuple[str, str, str]:
    recipe_text = (run / "recipe.toml").read_text(encoding="utf-8")
    recipe = load_recipe(run / "recipe.toml")
    rows = read_metrics(run) if (run / "metrics.jsonl").is_file() else []
    parts = [
        f"<p>run <code>{esc(run.resolve())}</code>, family {esc(recipe.model.family)}, "
        f"model <code>{esc(recipe.model.path)}</code></p>"
    ]
    parts.append(_status(run, rows, recipe.train.max_steps))
    if rows:
        parts.append(f'<h3>Curves</h3><div class="charts">{"".join(_charts(rows))}</div>')
    parts.append(_validation_videos(run, cache, out))
    parts.append(_files(run))
    parts.append(f"<h3>Recipe</h3><pre>{esc(recipe_text)}</pre>")
    parts.append(_environment(run))
    return "training", "Training", "\n".join(parts)


def _status(run: Path, rows: list[dict[str, Any]], max_steps: int) -> str:
    """The run at a glance: how far, whether it finished, and the numbers that say whether it is healthy."""
    train = [r for r in rows if "loss" in r]
    last = max((r["step"] for r in rows), default=0)
    finished = last >= max_steps and any(run.glob("adapter*.safetensors"))
    items = [
        f"step {last} of {max_steps} ({100 * last / max(max_steps, 1):.0f}%): "
        + ("finished" if finished else "in progress, or stopped")
    ]
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        items[-1] += f"; last logged {_ago(time.time() - metrics.stat().st_mtime)}"
    losses = [r["loss"] for r in train if r["loss"] is not None]
    if losses:
        smooth = ema(losses)
        items.append(f"loss (smoothed) {smooth[0]:.5g} → {smooth[-1]:.5g}")
    skipped = max((r.get("skipped_steps") or 0 for r in train), default=0)
    if skipped:
        items.append(f'<span class="bad">{skipped} non-finite steps skipped</span> (see the console for their files)')
    else:
        items.append("no non-finite steps")
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if val:
        best = min(val, key=lambda p: p[1])
        items.append(
            f"validation loss {val[0][1]:.5g} (step {val[0][0]}) → {val[-1][1]:.5g} (step {val[-1][0]}), "
            f"best {best[1]:.5g} at step {best[0]}"
        )
    norms = sorted(r["grad_norm"] for r in train if r.get("grad_norm") is not None)
    if norms:
        peak = max((r for r in train if r.get("grad_norm") is not None), key=lambda r: r["grad_norm"])
        items.append(
            f"grad norm median {norms[len(norms) // 2]:.3g}, max {peak['grad_norm']:.3g} at step {peak['step']}"
        )
    times = sorted(r["step_time"] for r in train if r.get("step_time") is not None)
    if times:
        items.append(f"step time median {times[len(times) // 2]:.3g} s")
    if train and train[-1].get("memory_gb") is not None:
        items.append(f"memory {max(r.get('memory_gb') or 0 for r in train):.2f} GB at most")
    return "<h3>Status</h3><ul class=status>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    return f"{seconds / 60:.0f} min ago" if seconds < 7200 else f"{seconds / 3600:.1f} h ago"


def _points(rows: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def _charts(rows: list[dict[str, Any]]) -> list[str]:
    """One chart per quantity; experts (loss_high_noise ...) and noise levels (val_loss_sigma_0.5) get a line each."""
    keys = {k for r in rows for k in r}
    experts = sorted(k[len("loss_") :] for k in keys if k.startswith("loss_"))
    sigmas = sorted((k for k in keys if k.startswith("val_loss_sigma_")), key=lambda k: float(k.rsplit("_", 1)[1]))
    charts = []

    loss = _points(rows, "loss")
    series = []
    if loss:
        series += [Series("loss", loss, COLORS[0], faint=True), Series("loss (smoothed)", _smooth(loss), COLORS[0])]
    for i, e in enumerate(experts, 1):
        series.append(Series(f"{e} (smoothed)", _smooth(_points(rows, f"loss_{e}")), COLORS[i]))
    charts.append(line_chart("training loss", series))

    val = [Series("val_loss", _points(rows, "val_loss"), COLORS[0], markers=True)]
    val += [Series(e, _points(rows, f"val_loss_{e}"), COLORS[i], markers=True) for i, e in enumerate(experts, 1)]
    charts.append(line_chart("validation loss", val))
    if sigmas:
        by_sigma = [
            Series(f"σ={k.rsplit('_', 1)[1]}", _points(rows, k), _shade(i, len(sigmas)), markers=True)
            for i, k in enumerate(sigmas)
        ]
        charts.append(line_chart("validation loss per noise level", by_sigma))
    for key, title in [
        ("lr", "learning rate"),
        ("grad_norm", "gradient norm (before clipping)"),
        ("step_time", "step time (s)"),
        ("samples_per_s", "samples per second"),
        ("tflops", "model TFLOP/s"),
        ("mfu", "MFU"),
        ("memory_gb", "memory (GB)"),
        ("skipped_steps", "non-finite steps skipped (total)"),
    ]:
        if key in keys:
            charts.append(line_chart(title, [Series(key, _points(rows, key), COLORS[0])]))
    if experts:
        steps = [Series(e, _points(rows, f"steps_{e}"), COLORS[i]) for i, e in enumerate(experts, 1)]
        charts.append(line_chart("steps per expert", steps))
    return charts


def _smooth(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return list(zip([x for x, _ in points], ema([y for _, y in points]))) if points else []


def _shade(i: int, n: int) -> str:
    """Low noise blue to high noise red: the lines of an ordered quantity read in order."""
    t = i / max(n - 1, 1)
    return f"rgb({int(40 + 180 * t)},{int(90 - 30 * t)},{int(200 - 160 * t)})"


def _validation_videos(run: Path, cache: Path | None, out: Path) -> str:
    """Each validation prompt's video at every validation step, side by side."""
    steps = sorted(p for p in (run / "validation").glob("step-*") if p.is_dir() and p.name[5:].isdigit())
    if not steps:
        return "<h3>Validation videos</h3><p>none yet (validation.every, data.validation_prompts)</p>"
    prompts = sorted({v.name for s in steps for v in s.glob("*.mp4")})
    index = _read_json(cache / "index.json") if cache is not None else None
    texts = index.get("validation", []) if index else []
    head = ["prompt", *[f"step {int(s.name.split('-')[1])}" for s in steps]]
    trs = []
    for n, name in enumerate(prompts):
        number = name.split("-", 1)[0]
        text = _caption(cache, texts[int(number)]) if number.isdigit() and int(number) < len(texts) else name
        cells = [f"<p>{esc(text)}</p><button data-row={n}>play row</button>"]
        for s in steps:
            video = s / name
            cells.append(
                # "#t=0": with preload="metadata" the first frame shows, without loading every video of the page
                f'<video controls loop muted preload="metadata" src="{esc(_link(video, out, run))}#t=0"></video>'
                if video.is_file()
                else ""
            )
        trs.append(f'<tr data-row="{n}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    return f'<h3>Validation videos</h3><div style="overflow-x:auto"><table class=videos><tr>{th}</tr>{"".join(trs)}</table></div>'


def _link(path: Path, out: Path, run: Path) -> str:
    """A relative URL from the report to `path`: in place when it lies under the report's folder, else a copy in
    REPORT_files/ beside the report (refreshed when the source changes), so the page and that folder travel together."""
    base = out.parent.resolve()
    source = path.resolve()
    if source.is_relative_to(base):
        rel = source.relative_to(base)
    else:
        rel = Path(f"{out.stem}_files") / source.relative_to(run.resolve())
        dest = base / rel
        stat = source.stat()
        if not dest.is_file() or dest.stat().st_size != stat.st_size or dest.stat().st_mtime < stat.st_mtime:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest)
    return quote(rel.as_posix())


def _files(run: Path) -> str:
    files = sorted(run.glob("*.safetensors"))
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("step-*") if p.is_dir())
    rows = [[f"<code>{esc(p.name)}</code>", _size(p.stat().st_size)] for p in files]
    text = _table(["adapter", "size"], rows) if rows else "<p>no final adapter yet</p>"
    if checkpoints:
        latest = run / "checkpoints" / "latest"
        newest = latest.read_text().strip() if latest.is_file() else checkpoints[-1]
        text += f"<p>checkpoints: {esc(', '.join(checkpoints))} (latest {esc(newest)})</p>"
    return "<h3>Files</h3>" + text


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _environment(run: Path) -> str:
    from trainer.env import collect, format_report

    info = _read_json(run / "env.json")
    where = "where the run started (RUN/env.json)"
    if info is None:
        info, where = collect(check_ops=False), "where this report was made (the run recorded none)"
    return f"<h3>Environment</h3><p class=small>vidlora env {where}</p><pre>{esc(format_report(info))}</pre>"


# --- charts ------------------------------------------------------------------------------------------------------


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]
    color: str
    faint: bool = False  # raw values under their smoothed line
    markers: bool = False  # a dot per point (sparse series such as validation losses)


W, H, LEFT, RIGHT, TOP, BOTTOM = 600, 240, 58, 12, 26, 30


def line_chart(title: str, series: list[Series]) -> str:
    """An SVG line chart with axes, ticks and a legend: enough to read a training curve, no library needed."""
    series = [s for s in series if s.points]
    if not series:
        return f"<figure><figcaption>{esc(title)}</figcaption><p class=small>nothing logged yet</p></figure>"
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points]
    x0, x1 = _span(min(xs), max(xs))
    y0, y1 = _span(min(ys), max(ys))

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT)

    def py(y: float) -> float:
        return H - BOTTOM - (y - y0) / (y1 - y0) * (H - TOP - BOTTOM)

    parts = [
        f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" fill="none" stroke="#ccc"/>'
    ]
    for t, label in _ticks(y0, y1):
        parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{LEFT - 4}" y="{py(t) + 4:.1f}" text-anchor="end">{label}</text>')
    for t, label in _ticks(x0, x1):
        parts.append(f'<text x="{px(t):.1f}" y="{H - BOTTOM + 14}" text-anchor="middle">{label}</text>')
    parts.append(f'<text x="{W - RIGHT}" y="{H - 4}" text-anchor="end">step</text>')
    legend_x = LEFT
    for s in series:
        points = s.points[:: math.ceil(len(s.points) / MAX_POINTS)]
        d = " ".join(f"{'M' if i == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for i, (x, y) in enumerate(points))
        style = f'stroke="{s.color}" stroke-width="{1 if s.faint else 2}" opacity="{0.35 if s.faint else 1}"'
        parts.append(f'<path class="series" d="{d}" fill="none" {style}><title>{esc(s.label)}</title></path>')
        if s.markers or len(points) == 1:
            parts += [
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{s.color}"><title>{esc(s.label)} at step '
                f"{x:g}: {y:.5g}</title></circle>"
                for x, y in points
            ]
        opacity = ' opacity="0.35"' if s.faint else ""
        parts.append(f'<rect x="{legend_x}" y="8" width="14" height="3" fill="{s.color}"{opacity}/>')
        parts.append(f'<text x="{legend_x + 18}" y="13">{esc(s.label)}</text>')
        legend_x += 26 + 6.5 * len(s.label)
    svg = f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{esc(title)}">{"".join(parts)}</svg>'
    return f"<figure><figcaption>{esc(title)}</figcaption>{svg}</figure>"


def _span(lo: float, hi: float) -> tuple[float, float]:
    """A non-empty range with a little room above and below."""
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def _ticks(lo: float, hi: float, n: int = 5) -> list[tuple[float, str]]:
    """About `n` round numbers (1, 2 or 5 times a power of ten apart) inside [lo, hi], with labels just precise
    enough to tell them apart."""
    raw = (hi - lo) / n
    power = math.floor(math.log10(raw))
    step = next(m * 10.0**power for m in (1, 2, 5, 10) if m * 10.0**power >= raw)
    first = math.ceil(lo / step) * step
    values = [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]
    big = max(abs(lo), abs(hi))
    if big >= 1e6 or big < 1e-3:  # scientific, with as many digits as the step needs
        digits = max(0, math.floor(math.log10(big)) - math.floor(math.log10(step)))
        return [(v, f"{v:.{digits}e}") for v in values]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return [(v, f"{v:.{decimals}f}") for v in values]
