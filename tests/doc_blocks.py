"""The fenced code blocks of README.md and docs/*.md, and how tests/test_docs.py runs them.

A block is ```bash, ```sh, ```python or ```toml. An HTML comment on the line right before its fence says
what the block needs, visible to whoever edits the snippet:

    <!-- doc-test: skip (needs 8 GPUs) -->        syntax and flags are checked, the block is not run
    <!-- doc-test: setup=run -->                  run after a fixture of tests/test_docs.py (SETUPS) made
                                                 what the block starts from (here: a trained run)

Everything else runs as written, except for the substitutions below (the only ones):

- hub ids: `HUB_MODELS` lists the models the docs name; the test puts a tiny model made by
  `vidlora make-tiny` under each id in a local hub cache (HF_HUB_CACHE, HF_HUB_OFFLINE=1), so
  `from_pretrained("Wan-AI/...")` and recipes that name the id load the tiny model unchanged;
- `SUBSTITUTIONS`: a few text replacements (video sizes a tiny model takes, the one download);
- `RECIPE_OVERRIDES`, `DATASET_OVERRIDES`, `SAMPLE_ARGS`: appended to every `vidlora prepare|train|sample`
  a shell block runs, so the shipped GPU recipes take seconds on the tiny model.

Shell blocks run in bash (`set -eo pipefail`) where `vidlora` is `python -m tests.doc_blocks`: the real
`trainer.cli.main` with those arguments appended. Python blocks run in the venv's python with
FutureWarnings as errors (a deprecated call in a snippet fails).
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
LANGUAGES = {"bash": "shell", "sh": "shell", "python": "python", "toml": "toml"}
MARKER = re.compile(r"^<!--\s*doc-test:\s*(.*?)\s*-->$")
FENCE = re.compile(r"^```(\S*)\s*$")

# hub id -> the family whose tiny model stands in for it
HUB_MODELS = {
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "wan",
}

SNAPSHOT = "0" * 40  # the commit the local hub cache files each tiny model under


def hub_snapshot(cache: Path | str, repo_id: str) -> Path:
    """Where huggingface_hub looks for `repo_id` at SNAPSHOT in the hub cache `cache`."""
    return Path(cache) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / SNAPSHOT


# (language, pattern, replacement, why): applied to a block's text before it runs
SUBSTITUTIONS = [
    ("python", r"\bnum_frames=\d+", "num_frames=5", "the tiny models take small videos"),
    ("python", r"\bheight=\d+", "height=64", "the tiny models take small videos"),
    ("python", r"\bwidth=\d+", "width=64", "the tiny models take small videos"),
    ("shell", r"\bstep-\d{6}\b", "step-000002", "the tiny run's checkpoint (it trains 2 steps)"),
    (
        "shell",
        r"\bhf download (\S+) --local-dir (\S+)",
        lambda m: (
            f'hf download --help | grep -- --local-dir >/dev/null; cp -r "{hub_snapshot("$HF_HUB_CACHE", m[1])}" {m[2]}'
        ),
        "no network: the command and its option must exist, then the tiny model under that id is copied",
    ),
]
RECIPE_OVERRIDES = [
    "train.max_steps=2",
    "data.decode_workers=0",  # no worker processes to start on a 2-core machine
    "train.dataloader_workers=0",
    "logging.wandb=false",  # wandb's offline service takes seconds to start
]
DATASET_OVERRIDES = ["resolutions=[64]", "target_frames=[1,5]"]  # for every [[data.datasets]] table
SAMPLE_ARGS = ["--frames", "5", "--height", "64", "--width", "64", "--steps", "2"]
SHELL_PREAMBLE = 'set -eo pipefail\nvidlora() { "$DOC_PYTHON" -m tests.doc_blocks "$@"; }\n'


@dataclass
class Block:
    file: str  # relative to the repository root
    line: int  # of the opening fence
    lang: str  # shell, python or toml
    text: str
    skip: str | None = None  # the reason, from the marker
    setup: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def discover(root: Path = ROOT) -> list[Block]:
    """Every tested block of every doc page; a malformed or stray marker is an error naming its line."""
    blocks = []
    for path in doc_files(root):
        rel = path.relative_to(root).as_posix()
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            marker = MARKER.match(lines[i].strip())
            opening = FENCE.match(lines[i])
            following = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
            if marker and not (following and following[1] in LANGUAGES):
                raise ValueError(f"{rel}:{i + 1}: a doc-test marker must be the line right before a tested fence")
            if not opening:
                i += 1
                continue
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                raise ValueError(f"{rel}:{i + 1}: code fence is never closed")
            lang = LANGUAGES.get(opening[1])
            if lang:
                block = Block(rel, i + 1, lang, "\n".join(lines[i + 1 : end]) + "\n")
                if i > 0 and (prev := MARKER.match(lines[i - 1].strip())):
                    _apply_marker(block, prev[1], f"{rel}:{i}")
                blocks.append(block)
            i = end + 1
    return blocks


def _apply_marker(block: Block, text: str, where: str) -> None:
    if m := re.fullmatch(r"skip \((.+)\)", text):
        block.skip = m[1]
    elif m := re.fullmatch(r"setup=([\w,]+)", text):
        block.setup = m[1].split(",")
    else:
        raise ValueError(f"{where}: doc-test marker {text!r}: expected 'skip (REASON)' or 'setup=NAME'")


def substituted(block: Block) -> str:
    text = block.text
    for lang, pattern, replacement, _ in SUBSTITUTIONS:
        if lang == block.lang:
            text = re.sub(pattern, replacement, text)
    return text


# --- what the shell lines call -------------------------------------------------------------------------


def commands(text: str) -> list[list[str]]:
    """The simple commands of a shell text as argv lists: comments dropped, continuation lines joined, split
    at ; && || | ( ); a quoted argument that itself runs vidlora (srun bash -c '...') is searched too."""
    found: list[list[str]] = []
    for line in text.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        argv: list[str] = []
        for token in [*lex, ";"]:
            if set(token) <= set(";&|()"):
                found += [argv] if argv else []
                argv = []
            else:
                argv.append(token)
    nested = [t for argv in found for t in argv if " " in t and ("vidlora " in t or "trainer.cli" in t)]
    return found + [argv for t in nested for argv in commands(t)]


def vidlora_args(argv: list[str]) -> list[str] | None:
    """The arguments a command passes to vidlora (`vidlora ...` or `... -m trainer.cli ...`), else None;
    bare variable references ($RESUME) are left out: their value is not known here."""
    words = [w for w in argv if not re.fullmatch(r"\$\{?\w+\}?", w)]
    while words and re.match(r"\w+=", words[0]):  # VAR=value prefixes
        words = words[1:]
    if words[:1] == ["vidlora"]:
        return words[1:]
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == "trainer.cli":
            return words[i + 2 :]
    return None


# --- `vidlora` inside a shell block ----------------------------------------------------------------------


def recipe_overrides(recipe: str | Path) -> list[str]:
    """The --set values that make `recipe` run on a tiny model in seconds (none for a missing file)."""
    recipe = Path(recipe)
    raw = tomllib.loads(recipe.read_text(encoding="utf-8")) if recipe.is_file() else {}
    datasets = range(len(raw.get("data", {}).get("datasets", [])))
    return [*RECIPE_OVERRIDES, *(f"data.datasets.{i}.{kv}" for i in datasets for kv in DATASET_OVERRIDES)]


def tiny_argv(argv: list[str]) -> list[str]:
    """argv with the test's overrides appended to a recipe subcommand (the recipe's own values otherwise)."""
    from trainer.cli import build_parser

    args = build_parser().parse_args(argv)
    if args.command not in ("prepare", "train", "sample"):
        return argv
    extra = [a for s in recipe_overrides(args.recipe) for a in ("--set", s)]
    return [*argv, *extra, *(SAMPLE_ARGS if args.command == "sample" else [])]


if __name__ == "__main__":
    from trainer.cli import main

    sys.exit(main(tiny_argv(sys.argv[1:])))
