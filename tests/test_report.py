"""`vidlora report`: one HTML page for a run and its dataset, built by the real CLI from a real tiny run and real
caches, read back with an HTML parser, and opened in a real headless Chromium (skipped, saying so, where none is
installed: `.ci/run` installs Debian's chromium)."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest

from data import media, synth
from data.cache import read_meta
from data.inspect import pick
from tests.browser import Chromium, find_chromium
from tests.conftest import run_cli, write_recipe
from tests.training_setup import recipe_text
from trainer.config import load_recipe


class Page(HTMLParser):
    """A report as a test reads it: every tag with its attributes, the text of every table row, all the text."""

    def __init__(self, path: Path):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.rows: list[tuple[str, list[str]]] = []  # (class of the row's table, its cells' text)
        self.texts: list[str] = []
        self.table = ""
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self.table = dict(attrs).get("class", "")
        elif tag == "tr":
            self.rows.append((self.table, []))
        elif tag in ("td", "th") and self.rows:
            self.rows[-1][1].append("")

    def handle_data(self, data):
        self.texts.append(data)
        if self.rows and self.rows[-1][1]:
            self.rows[-1][1][-1] += data

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def all(self, tag: str) -> list[dict]:
        return [attrs for t, attrs in self.tags if t == tag]

    def row(self, table: str, first_cells: list[str]) -> list[str]:
        """The one row of the table of this class that starts with these cells (stripped)."""
        found = [[c.strip() for c in r] for t, r in self.rows if t == table]
        found = [r for r in found if r[: len(first_cells)] == first_cells]
        assert len(found) == 1, (table, first_cells, found)
        return found[0]


def bucket_counts(html_path: Path) -> dict[str, int]:
    """data-bucket cell -> the count it shows."""

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.counts, self.open = {}, None

        def handle_starttag(self, tag, attrs):
            self.open = dict(attrs).get("data-bucket")

        def handle_data(self, data):
            if self.open and data.strip():
                self.counts[self.open] = int(data)
                self.open = None

    cells = Cells()
    cells.feed(html_path.read_text(encoding="utf-8"))
    return cells.counts


@pytest.fixture(scope="module")
def run_report(validated_run):
    recipe, run, train_proc = validated_run
    proc = run_cli("report", run, "--thumbnails", "3")
    return recipe, run, run / "report.html", proc, train_proc


@pytest.mark.slow
def test_train_prints_the_report_command(run_report):
    _, run, out, proc, train_proc = run_report
    assert f"see it: vidlora report {run}" in train_proc.stdout
    assert proc.stdout.strip() == f"report: {out}"


@pytest.mark.slow
def test_run_report_has_every_validation_step_curve_bucket_and_thumbnail(run_report):
    recipe_path, run, out, _, _ = run_report
    page = Page(out)
    recipe = load_recipe(recipe_path)
    cache = Path(recipe.data.cache_dir)

    # every validation step of every prompt, side by side, each linked to the run's own file
    steps = sorted(p.name for p in (run / "validation").iterdir())
    assert steps == ["step-000000", "step-000003", "step-000006"]
    videos = [unquote(v["src"]).split("#")[0] for v in page.all("video")]
    assert videos == [f"validation/{s}/00-a_yellow_star_spins_slowly.mp4" for s in steps]
    assert all((run / v).is_file() for v in videos)
    assert page.row("videos", ["prompt"]) == ["prompt", "step 0", "step 3", "step 6"]
    assert page.row("videos", ["a yellow star spins slowlyplay row"])  # the prompt's own text heads its row

    # a chart per logged quantity, a line per noise level of the validation loss
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    captions = [c for c in page.texts if c.strip()]
    for title in ("training loss", "validation loss", "validation loss per noise level", "learning rate"):
        assert title in captions
    for title in ("gradient norm (before clipping)", "step time (s)", "model TFLOP/s", "memory (GB)"):
        assert title in captions
    for sigma in recipe.validation.loss_sigmas:
        assert f"σ={sigma:g}" in captions and f"val_loss_sigma_{sigma:g}" in rows[0]
    paths = [p for p in page.all("path") if p.get("class") == "series"]
    assert len(paths) >= 10 and all(p["d"].startswith("M") for p in paths)

    # the status: finished, its last validation loss
    last_val = [r["val_loss"] for r in rows if "val_loss" in r][-1]
    assert "step 6 of 6 (100%): finished" in page.text and f"{last_val:.5g} (step 6)" in page.text

    # the dataset half: every bucket with its count, thumbnails of the samples `pick` chooses, with their captions
    report = json.loads((cache / "report.json").read_text())
    assert bucket_counts(out) == report["buckets"]
    index = json.loads((cache / "index.json").read_text())
    chosen = pick(index["samples"], 3)
    frames = sum(min(len(s["frames"]), 3) for s in chosen)  # first, middle, last (a latent frame covers 4)
    images = [i["src"] for i in page.all("img")]
    assert len(images) == frames and all(i.startswith("data:image/jpeg;base64,") for i in images)
    for s in chosen:
        assert s["source"] in page.text
        assert all(read_meta(cache / "text" / f"{t}.safetensors")["caption"] in page.text for t in s["text_ids"])

    # the recipe and the environment the run started in
    assert (run / "recipe.toml").read_text() in page.text
    env = json.loads((run / "env.json").read_text())
    assert f"torch         {env['packages']['torch']}" in page.text


@pytest.mark.slow
def test_report_opens_in_a_real_browser(run_report, record_property):
    """No console errors, every chart drawn, every video and image loads; a screenshot stays with the run."""
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium here (apt-get install chromium): the report was not opened in a browser")
    _, run, out, _, _ = run_report
    with Chromium(chromium) as browser:
        browser.open(out)
        charts = browser.evaluate(
            """[...document.querySelectorAll('figure')].map(f => ({
                title: f.querySelector('figcaption').textContent,
                drawn: [...f.querySelectorAll('path.series')].map(p => p.getBBox().width)}))"""
        )
        videos = browser.evaluate(
            """Promise.all([...document.querySelectorAll('video')].map(v => new Promise(done => {
                const state = () => done({src: v.currentSrc, ready: v.readyState, error: v.error && v.error.code,
                                          width: v.videoWidth, height: v.videoHeight});
                if (v.readyState >= 2) return state();
                v.addEventListener('loadeddata', state);
                v.addEventListener('error', state);
                v.preload = 'auto';
                v.load();
                setTimeout(state, 20000);
            })))"""
        )
        images = browser.evaluate("[...document.images].map(i => i.complete && i.naturalWidth)")
        browser.evaluate("document.querySelector('button[data-row]').click()")
        playing = browser.evaluate(
            """new Promise(done => setTimeout(() => done([...document.querySelectorAll('tr[data-row] video')]
                .map(v => !v.paused)), 500))"""
        )
        shot = browser.screenshot(run / "report.png")
        errors = browser.errors()
    record_property("screenshot", str(shot))
    assert errors == []
    assert len(charts) >= 10 and all(c["drawn"] and max(c["drawn"]) > 0 for c in charts), charts
    assert len(videos) == 3 and all(v["ready"] >= 2 and v["error"] is None for v in videos), videos
    assert {(v["width"], v["height"]) for v in videos} == {(64, 64)}
    assert images and all(w and w > 0 for w in images), images
    assert playing == [True, True, True]  # "play row" starts the row's videos together
    assert shot.stat().st_size > 10_000


@pytest.mark.slow
def test_report_of_a_run_in_progress_elsewhere(run_report, tmp_path):
    """A run caught mid-write: a partial last metrics line is left out, what exists is shown; a report written
    outside the run folder takes copies of the videos along, beside it."""
    _, done, _, _, _ = run_report
    run = tmp_path / "run"
    run.mkdir()
    for name in ("recipe.toml", "env.json"):
        shutil.copy(done / name, run / name)
    lines = (done / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= 3]
    (run / "metrics.jsonl").write_text("\n".join(kept) + "\n" + lines[len(kept)][:20], encoding="utf-8")
    shutil.copytree(done / "validation/step-000000", run / "validation/step-000000")

    out = tmp_path / "elsewhere" / "page.html"
    run_cli("report", run, "--out", out, "--thumbnails", "0")
    page = Page(out)
    assert "step 3 of 6 (50%): in progress, or stopped" in page.text
    (video,) = [unquote(v["src"]).split("#")[0] for v in page.all("video")]
    assert video == "page_files/validation/step-000000/00-a_yellow_star_spins_slowly.mp4"
    assert (out.parent / video).read_bytes() == (run / video.removeprefix("page_files/")).read_bytes()
    assert "no final adapter yet" in page.text and "no thumbnails" in page.text


@pytest.fixture(scope="module")
def broken_cache(tiny_wan, tmp_path_factory):
    """A prepared cache of a folder with broken files, a default caption, and HTML in a file name and a caption;
    and the same folder prepared with --dry-run (report.json only). Both reported."""
    tmp = tmp_path_factory.mktemp("report_broken")
    clips = tmp / "clips"
    good = media.write_video(clips / 'a <b>bold</b> & "quoted".mp4', synth.pattern_frames(9, 64, 64, seed=1))
    good.with_suffix(".txt").write_text("a <script>alert(1)</script> & a pattern\n", encoding="utf-8")
    media.write_image(clips / "no caption.png", synth.pattern_frames(1, 96, 64, seed=2)[0])  # default caption
    synth.write_empty(clips / "empty.mp4")
    synth.write_random_bytes(clips / "noise.mov")
    synth.write_audio(clips / "song.m4a")
    broken = synth.truncate_file(media.write_video(clips / "cut.mp4", synth.pattern_frames(9, 64, 64, seed=3)), 0.4)
    broken.with_suffix(".txt").write_text("a clip cut short\n", encoding="utf-8")
    text = recipe_text(tiny_wan, tmp / "cache", tmp / "run").replace(
        "target_frames = [9]", 'target_frames = [1, 9]\nmissing_caption = "use_default"\ndefault_caption = "a clip"'
    )
    recipe = write_recipe(tmp / "r.toml", text)
    prepare = run_cli("prepare", recipe)
    run_cli("report", tmp / "cache", "--thumbnails", "3")
    run_cli("prepare", recipe, "--dry-run", "--set", f"data.cache_dir={json.dumps(str(tmp / 'dry'))}")
    run_cli("report", tmp / "dry")
    return tmp / "cache", tmp / "dry", clips, prepare


@pytest.mark.slow
def test_dataset_report_names_every_unused_file_with_its_reason(broken_cache):
    cache, dry, clips, prepare = broken_cache
    assert prepare.stdout.strip().splitlines()[-1] == f"see it: vidlora report {cache}"
    for folder in (cache, dry):
        out = folder / "report.html"
        page = Page(out)
        report = json.loads((folder / "report.json").read_text())
        unused = [r for r in report["inputs"] if r["status"] != "ok"]
        assert {Path(r["path"]).name for r in unused} == {"empty.mp4", "noise.mov", "song.m4a", "cut.mp4"}
        for r in unused:
            assert page.row("unused", [r["status"], r["path"]])[2] == r["reason"]
        for r in report["inputs"]:  # and every input, with what became of it
            made = page.row("inputs", [r["path"], r["status"]])[3]
            assert made == r["reason"] if r["status"] != "ok" else made.startswith(f"{r['samples']} sample")
        assert bucket_counts(out) == report["buckets"] and len(report["buckets"]) == 3
        (defaulted,) = [r for r in report["inputs"] if r.get("caption_missing")]
        assert defaulted["status"] == "ok" and defaulted["path"] == str(clips / "no caption.png")
        assert page.row("captions", [defaulted["path"]])[1] == "trained with the default caption"
    assert "a dry run" in Page(dry / "report.html").text and "a dry run" not in Page(cache / "report.html").text
    assert not Page(dry / "report.html").all("img")  # nothing encoded, nothing to decode
    index = json.loads((cache / "index.json").read_text())
    shown = sum(min(len(s["frames"]), 3) for s in pick(index["samples"], 3))  # first, middle and last frames
    assert len(Page(cache / "report.html").all("img")) == shown == 5  # a sample of each of the 3 bucket shapes


@pytest.mark.slow
def test_dataset_report_escapes_names_and_captions_and_refuses_other_folders(broken_cache):
    cache, _, clips, _ = broken_cache
    raw = (cache / "report.html").read_text(encoding="utf-8")
    page = Page(cache / "report.html")
    assert "<b>bold</b>" not in raw and "<script>alert" not in raw
    assert page.row("inputs", [str(clips / 'a <b>bold</b> & "quoted".mp4'), "ok"])
    assert "a <script>alert(1)</script> & a pattern" in page.texts  # shown as text beside its thumbnails
    proc = run_cli("report", clips, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"vidlora: error: {clips}: neither a run folder (no recipe.toml) nor a prepared cache "
        "(no index.json or report.json)"
    )
