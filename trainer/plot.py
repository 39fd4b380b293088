"""`vidlora plot RUN_DIR`: the loss curve of a run (and its validation loss) as a PNG, from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.config import UserError


def read_metrics(run: Path) -> list[dict]:
    """Every logged row of a run, also of one in progress."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no metrics here (is {run} a run folder that has logged a step?)")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines.pop()  # a line the run is writing right now: every complete line ends with a newline
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not a JSON line ({e})") from None
    return rows


def ema(values: list[float], weight: float = 0.9) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else weight * avg + (1 - weight) * v
        out.append(avg)
    return out


def plot(run: str | Path, out: str | Path | None = None) -> Path:
    """Training loss (raw and smoothed), validation loss if logged, and the learning rate; returns the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    rows = read_metrics(run)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    lr = [(r["step"], r["lr"]) for r in rows if r.get("lr") is not None]
    if not train and not val:
        raise UserError(f"{run / 'metrics.jsonl'}: no loss values to plot")
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=[3, 1])
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
        ax.plot(steps, ema(list(losses)), color="tab:blue", linewidth=2, label="loss (smoothed)")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=2, label="validation loss")
    ax.set_ylabel("loss")
    ax.set_title(str(run))
    ax.grid(alpha=0.3)
    ax.legend()
    if lr:
        ax_lr.plot(*zip(*lr), color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out else run / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
