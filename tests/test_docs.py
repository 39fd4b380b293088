"""Every shell command, Python snippet and recipe in README.md and docs/ works as written.

The blocks, their markers and the substitutions are in tests/doc_blocks.py. Each block is a test case
(id FILE:LINE); a new block in a doc page is a new case. Every block is checked statically (bash -n and
the arguments of each vidlora / accelerate launch / scripts/ command against their real argparse parsers,
Python compiled, TOML validated as a recipe); shell and Python blocks then run in a fresh folder against
a tiny model, unless their marker skips them (with the reason in the doc, shown by pytest -ra).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import pytest

from tests.conftest import ROOT, cli_env, run_cli
from tests.doc_blocks import (
    HUB_MODELS,
    SHELL_PREAMBLE,
    Block,
    commands,
    discover,
    hub_snapshot,
    recipe_overrides,
    substituted,
    vidlora_args,
)

BLOCKS = discover()


def _blocks(*langs: str) -> list[Block]:
    return [b for b in BLOCKS if b.lang in langs]


# --- static checks: every block, skipped or not ------------------------------------------------------------


def _parse(parse, argv: list[str], what: str) -> None:
    """argparse's verdict on argv: --help is fine, an error fails the test with argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            parse(argv)
    except SystemExit as e:
        assert e.code == 0, f"{what} {' '.join(argv)}: {err.getvalue().strip().splitlines()[-1]}"


def _script_parser(script: Path):
    spec = importlib.util.spec_from_file_location(f"doc_script_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, "parse_args", None)


@pytest.mark.parametrize("block", _blocks("shell"), ids=str)
def test_shell_block_parses(block: Block) -> None:
    """bash -n, and every command's arguments through the parser that will read them."""
    from accelerate.commands.launch import launch_command_parser

    from trainer.cli import build_parser

    proc = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
    assert proc.returncode == 0, f"{block}: bash -n: {proc.stderr}"
    assert set(block.setup) <= set(SETUPS), f"{block}: unknown setup {block.setup}; known: {sorted(SETUPS)}"
    checked = 0
    for argv in commands(block.text):
        if (args := vidlora_args(argv)) is not None:
            _parse(build_parser().parse_args, args, f"{block}: vidlora")
            checked += 1
        if argv[:2] == ["accelerate", "launch"] and not any("$" in a for a in argv):
            _parse(launch_command_parser().parse_args, argv[2:], f"{block}: accelerate launch")
            if "--config_file" in argv:
                config = argv[argv.index("--config_file") + 1]
                assert (ROOT / config).is_file(), f"{block}: {config} does not exist"
        if len(argv) > 1 and argv[0] in ("bash", "python") and argv[1].startswith("scripts/"):
            script = ROOT / argv[1]
            assert script.is_file(), f"{block}: {argv[1]} does not exist"
            if script.suffix == ".py" and (parse := _script_parser(script)):
                _parse(parse, argv[2:], f"{block}: {argv[1]}")
            checked += 1
    mentions = "vidlora" in block.text or "trainer.cli" in block.text
    assert checked or not mentions, f"{block}: names vidlora, but no vidlora command was found to check"


@pytest.mark.parametrize("block", _blocks("python"), ids=str)
def test_python_block_compiles(block: Block) -> None:
    compile(block.text, str(block), "exec")
    assert set(block.setup) <= set(SETUPS), f"{block}: unknown setup {block.setup}; known: {sorted(SETUPS)}"


@pytest.mark.parametrize("block", _blocks("toml"), ids=str)
def test_toml_block_is_a_valid_recipe(block: Block, tmp_path: Path) -> None:
    """A recipe or a part of one: what is left out takes its default, so a fragment validates alone."""
    from trainer.config import load_recipe

    recipe = tmp_path / "block.toml"
    recipe.write_text(block.text, encoding="utf-8")
    load_recipe(recipe)  # a RecipeError names the key


def test_markers_are_read_and_strays_refused(tmp_path: Path) -> None:
    """A marker applies to the fence right after it; one anywhere else, or one not understood, is an error."""
    (tmp_path / "docs").mkdir()
    page = tmp_path / "README.md"
    page.write_text(
        "<!-- doc-test: skip (needs 8 GPUs) -->\n```bash\nvidlora env\n```\n\n"
        "<!-- doc-test: setup=run,clips -->\n```python\nprint(1)\n```\n```toml\n```\n```jsonl\n{}\n```\n"
    )
    found = [(str(b), b.lang, b.skip, b.setup) for b in discover(tmp_path)]
    assert found == [
        ("README.md:2", "shell", "needs 8 GPUs", []),
        ("README.md:7", "python", None, ["run", "clips"]),
        ("README.md:10", "toml", None, []),
    ]
    for bad in ("<!-- doc-test: skip -->\n```bash\n```\n", "<!-- doc-test: setup=run -->\n\n```bash\n```\n"):
        page.write_text(bad)
        with pytest.raises(ValueError, match="README.md:1"):
            discover(tmp_path)


# --- running the blocks -------------------------------------------------------------------------------------


class DocWorld:
    """What the doc blocks start from, made once per session with the real commands and functions: a local
    hub cache with the tiny models (HUB_MODELS), clips, and a trained run with its exports."""

    def __init__(self, root: Path, tiny_wan: Path) -> None:
        self.root = root
        self.tiny = {"wan": tiny_wan}
        self.hub = root / "hub"
        for repo_id, family in HUB_MODELS.items():
            if family not in self.tiny:
                self.tiny[family] = root / "models" / family
                run_cli("make-tiny", family, self.tiny[family])
            snapshot = hub_snapshot(self.hub, repo_id)
            shutil.copytree(self.tiny[family], snapshot)
            (snapshot.parents[1] / "refs").mkdir()
            (snapshot.parents[1] / "refs" / "main").write_text(snapshot.name)

    @property
    def tiny_wan(self) -> Path:
        return self.tiny["wan"]

    @cached_property
    def clips(self) -> Path:
        from data.synth import make_sample_clips

        make_sample_clips(self.root / "clips", n=2)
        return self.root / "clips"

    @cached_property
    def run(self) -> Path:
        """The shipped Wan style recipe trained on the tiny model with the doc tests' overrides; called `style`
        as the docs' runs/style."""
        from data.prepare import prepare
        from trainer.config import load_recipe
        from trainer.models import get_family
        from trainer.train import train

        recipe_file = ROOT / "recipes" / "wan" / "t2v_1.3b_style.toml"
        where = [
            f"model.path={self.tiny['wan']}",
            f"data.cache_dir={self.root / 'cache'}",
            f"data.datasets.0.path={self.clips}",
            f"train.output_dir={self.root / 'style'}",
        ]
        recipe = load_recipe(recipe_file, recipe_overrides(recipe_file) + where)
        assert prepare(recipe, get_family(recipe.model)) == 0
        return train(recipe)  # in bf16, after other tests of this process trained in fp32

    @cached_property
    def exports(self) -> Path:
        from trainer.export import export_files

        export_files([self.run], ["all"], out_dir=self.root / "exports")
        return self.root / "exports"

    @cached_property
    def merged(self) -> Path:
        from trainer.export import merge_into_folder

        return merge_into_folder(self.tiny_wan, self.run, self.root / "merged", 0.8)

    @cached_property
    def lora_files(self) -> Path:
        """LoRA files as other tools write them: musubi-tuner's (kohya) layout, ComfyUI's, and a peft file
        with only the Wan head (proj_out), whose keys also fit HunyuanVideo."""
        import torch
        from safetensors.torch import save_file

        from trainer.export import export_files

        out = self.root / "lora_files"
        for name, fmt in [("other_lora", "kohya"), ("a", "comfyui"), ("b", "kohya")]:
            export_files([self.run], [fmt], out=out / f"{name}.safetensors")
        head = {
            "transformer.proj_out.lora_A.weight": torch.randn(4, 24),
            "transformer.proj_out.lora_B.weight": torch.randn(64, 4),
        }
        save_file(head, out / "head_only.safetensors")
        return out


# setup name (the doc marker `setup=NAME`) -> what it copies into the block's folder: (DocWorld attribute, path)
SETUPS = {
    "clips": [("clips", "datasets/style")],
    "run": [("run", "runs/style"), ("run", "runs/wan13b_style")],
    "exports": [("exports", "exports")],
    "merged": [("tiny_wan", "wan13b"), ("merged", "wan13b_style_transformer")],
    "lora_files": [("lora_files", ".")],
}


@pytest.fixture(scope="session")
def doc_world(tmp_path_factory, tiny_wan) -> DocWorld:
    return DocWorld(tmp_path_factory.mktemp("docs"), tiny_wan)


def _outputs(block: Block) -> list[str]:
    """The files and folders the block's vidlora commands say they write (--out, --out-dir)."""
    outs = []
    for argv in commands(block.text):
        args = vidlora_args(argv) or []
        outs += [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--out", "--out-dir")]
    return outs


def _block_job(block: Block, world: DocWorld, tmp: Path) -> tuple[Path, Path, list[str], dict[str, str]]:
    """(folder, script, command, environment) of a block: a fresh checkout (the recipes, the venv) with what
    its setup marker asks for, and the block as it runs (tests/doc_blocks.py)."""
    work = tmp / "work"
    work.mkdir()
    shutil.copytree(ROOT / "recipes", work / "recipes")
    (work / ".venv").symlink_to(sys.prefix)  # the venv running the tests (CI: .venv)
    for name in block.setup:
        for attribute, dest in SETUPS[name]:
            shutil.copytree(getattr(world, attribute), work / dest, dirs_exist_ok=True)
    env = {
        **cli_env(),
        "HF_HUB_CACHE": str(world.hub),
        "HF_HUB_OFFLINE": "1",
        "DOC_PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",  # a tiny model gains nothing from threads that spin on a busy 2-core machine
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    if block.lang == "shell":
        script = tmp / "block.sh"
        script.write_text(SHELL_PREAMBLE + substituted(block), encoding="utf-8")
        cmd = ["bash", str(script)]
    else:
        script = tmp / "block.py"
        script.write_text(substituted(block), encoding="utf-8")
        cmd = [sys.executable, "-W", "error::FutureWarning", str(script)]
    return work, script, cmd, env


@pytest.fixture(scope="session")
def block_runs(request, doc_world: DocWorld, tmp_path_factory) -> dict[str, tuple]:
    """{block: (folder, script, process)} for every runnable block this session selected, run two at a time
    (a block is mostly Python start-up on one core: two at a time halve the wall time on 2 cores). The
    setups are made first, in this process."""
    blocks = [i.callspec.params["block"] for i in request.session.items if i.originalname == "test_block_runs"]
    jobs = {str(b): _block_job(b, doc_world, tmp_path_factory.mktemp("block")) for b in blocks if not b.skip}

    def run(job: tuple) -> tuple:
        work, script, cmd, env = job
        return work, script, subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(jobs, pool.map(run, jobs.values())))


@pytest.mark.slow
@pytest.mark.parametrize("block", _blocks("shell", "python"), ids=str)
def test_block_runs(block: Block, request) -> None:
    if block.skip:
        pytest.skip(f"{block}: {block.skip}")
    work, script, proc = request.getfixturevalue("block_runs")[str(block)]
    assert proc.returncode == 0, (
        f"{block} failed ({proc.returncode}) as run (markers and substitutions: tests/doc_blocks.py):\n"
        f"{script.read_text()}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    missing = [path for path in _outputs(block) if not (work / path).exists()]
    assert not missing, f"{block}: did not write {missing}"
