"""Recipe validation: every mistake is one readable line naming the key and what is allowed."""

from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli, write_recipe
from trainer.config import RecipeError, load_recipe

RECIPES = sorted((ROOT / "recipes").rglob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.data.datasets, f"{path} has no dataset"


def test_unknown_key_names_it_and_suggests(tmp_path):
    r = write_recipe(tmp_path / "r.toml", "[train]\nlearnig_rate = 1e-4\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(r)
    msg = str(e.value)
    assert "train.learnig_rate" in msg and "did you mean 'learning_rate'" in msg


def test_wrong_type_and_wrong_choice(tmp_path):
    r = write_recipe(tmp_path / "r.toml", '[train]\nmax_steps = "many"\nlr_scheduler = "zigzag"\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(r)
    msg = str(e.value)
    assert "train.max_steps" in msg and "'many'" in msg
    assert "train.lr_scheduler" in msg and "'zigzag'" in msg and "cosine" in msg


def test_frames_must_be_4k_plus_1(tmp_path):
    r = write_recipe(tmp_path / "r.toml", '[[data.datasets]]\npath = "x"\ntarget_frames = [16]\n')
    with pytest.raises(RecipeError, match=r"data.datasets.0.target_frames.*4k\+1"):
        load_recipe(r)


def test_unknown_family(tmp_path):
    with pytest.raises(RecipeError, match="unknown family 'sora'.*allowed: .*wan"):
        load_recipe(None, ["model.family=sora"])


def test_overrides_types_and_list_items():
    recipe = load_recipe(
        ROOT / "recipes/wan/tiny_demo.toml",
        [
            "train.max_steps=7",
            "train.seed=3",
            "data.datasets.0.path=elsewhere",
            "data.datasets.0.resolutions=[32, 48]",
            "logging.wandb=false",
            "lora.targets=attention",
            "data.datasets.1.path=second",
        ],
    )
    assert recipe.train.max_steps == 7 and recipe.train.seed == 3 and recipe.logging.wandb is False
    assert recipe.data.datasets[0].path == "elsewhere" and recipe.data.datasets[0].resolutions == [32, 48]
    assert recipe.data.datasets[1].path == "second" and recipe.lora.targets == "attention"
    sized = load_recipe(None, ["data.datasets.0.path=x", "data.datasets.0.resolutions=[[832, 480], 720]"])
    assert sized.data.datasets[0].resolutions == [(832, 480), 720]
    with pytest.raises(RecipeError, match="resolutions"):
        load_recipe(None, ["data.datasets.0.path=x", "data.datasets.0.resolutions=[[832, 8]]"])
    with pytest.raises(RecipeError, match="not an index"):
        load_recipe(None, ["data.datasets.5.path=x"])


@pytest.mark.parametrize(
    ("toml", "expect"),
    [
        ("[train]\nlearnig_rate = 1e-4\n", "unknown key 'train.learnig_rate'"),
        ('[train]\nmax_steps = "many"\n', "train.max_steps"),
        ("[train\n", "not valid TOML"),
    ],
)
def test_cli_bad_recipe_is_one_line(tmp_path, toml, expect):
    r = write_recipe(tmp_path / "r.toml", toml)
    proc = run_cli("train", r, check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("vidlora: error:")]
    assert len(lines) == 1 and expect in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_missing_data_folder(tmp_path, tiny_wan):
    r = write_recipe(
        tmp_path / "r.toml",
        f'[model]\npath = "{tiny_wan}"\n[data]\ncache_dir = "{tmp_path / "c"}"\n'
        f'[[data.datasets]]\npath = "{tmp_path / "nope"}"\n',
    )
    proc = run_cli("prepare", r, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{tmp_path / 'nope'}: no such file or folder" in proc.stderr


def test_cli_missing_recipe(tmp_path):
    proc = run_cli("prepare", Path(tmp_path / "absent.toml"), check=False)
    assert proc.returncode == 2 and "recipe file not found" in proc.stderr


def test_recipe_reference_is_current():
    from trainer.config import recipe_reference

    assert (ROOT / "docs/recipes.md").read_text(encoding="utf-8") == recipe_reference(), (
        "docs/recipes.md is stale: run `python scripts/gen_recipe_docs.py`"
    )
