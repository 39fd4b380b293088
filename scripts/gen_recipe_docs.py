"""Regenerate docs/recipes.md from the recipe schema (tests fail when it is out of date)."""

from pathlib import Path

from trainer.config import recipe_reference

if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
    out.write_text(recipe_reference(), encoding="utf-8")
    print(f"wrote {out}")
