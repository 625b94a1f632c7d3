"""Training curves from runs' metrics.jsonl: `megarnn plot RUN [RUN ...] [--out FILE.png]`.

    plot_runs(["runs/a", "runs/b"], "curves.png")

One panel per quantity, against optimizer steps: loss (train solid, validation dashed), val/bpc,
the learning rate, tokens/s, and Newton iterations (ParaRNN: the mean over layers), each where
some run logged it; and the loss against training tokens (runs with another batch size or
sequence length line up there), from the `train/tokens` the trainer logs. A Newton panel whose
values are all 0 (every solve sequential, as the torch backend picks on CPU) is left out. Several runs are overlaid, one color each, with a legend. matplotlib is an
optional dependency (`pip install 'megarnn[plot]'`).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from megarnn.errors import ConfigError, DataError

METRICS = "metrics.jsonl"
CURVES = "curves.png"
NEWTON_ITERS = "newton/iters/"
TOKENS = "train/tokens"
LOSS_TOKENS = "loss against tokens"
# (title, y label, [(tag, line style)]); a panel is drawn when some run has one of its tags
# (the tokens panel: where some run logged train/tokens).
PANELS = [
    ("loss", "nats per token", [("train/loss", "-"), ("val/loss", "--")]),
    (LOSS_TOKENS, "nats per token", [("train/loss", "-"), ("val/loss", "--")]),
    ("validation bits per character", "bits per character", [("val/bpc", "--")]),
    ("learning rate", "lr", [("train/lr", "-")]),
    ("throughput", "tokens/s", [("train/tokens_per_sec", "-")]),
    ("Newton iterations (mean over layers)", "iterations", [(NEWTON_ITERS, "-")]),
]


def metrics_file(run: str | Path) -> Path:
    """A run directory or its metrics.jsonl -> the metrics.jsonl path (DataError if there is none)."""
    p = Path(run)
    f = p / METRICS if p.is_dir() else p
    if not f.is_file():
        raise DataError(f"{run}: no {METRICS} here; give a run directory (train.out_dir) or its {METRICS}")
    return f


def read_metrics(run: str | Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of a run. A step logged twice (a run resumed from an older checkpoint)
    keeps its last value; Newton iterations become their mean over layers under "newton/iters/"."""
    f = metrics_file(run)
    lines = f.read_text().splitlines()
    out: dict[str, dict[int, float]] = {}
    newton: dict[int, list[float]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step, tag, value = int(rec["step"]), str(rec["tag"]), float(rec["value"])
        except (ValueError, KeyError, TypeError):
            if n == len(lines):  # a run killed while writing its last line
                break
            raise DataError(f"{f}:{n}: not a metrics line {line[:80]!r}; expected "
                            '{"step": N, "tag": "train/loss", "value": X}') from None
        if tag.startswith(NEWTON_ITERS):
            newton.setdefault(step, []).append(value)
        else:
            out.setdefault(tag, {})[step] = value
    if newton:
        out[NEWTON_ITERS] = {s: sum(v) / len(v) for s, v in newton.items()}
    return out


def _tokens_per_step(d: dict) -> float:
    """Tokens per optimizer step of a run (its last logged train/tokens over that step); 0 if none."""
    tokens = d.get(TOKENS)
    if not tokens:
        return 0.0
    last = max(tokens)
    return tokens[last] / last if last else 0.0


_PER_STEP_LINE = re.compile(r"data: .*?([\d,]+) tokens per step")


def _with_tokens(d: dict, run: str | Path) -> dict:
    """A run logged before train/tokens existed: its tokens per step from the `data:` line of its
    log.txt, as a train/tokens series at the steps of its train/loss (unchanged otherwise)."""
    if TOKENS in d or "train/loss" not in d:
        return d
    log = metrics_file(run).parent / "log.txt"
    found = _PER_STEP_LINE.findall(log.read_text(errors="replace")) if log.is_file() else []
    if not found:
        return d
    per_step = int(found[-1].replace(",", ""))
    return {**d, TOKENS: {s: float(s * per_step) for s in d["train/loss"]}}


def choose_panels(data: list[dict]) -> list[tuple]:
    """The PANELS some run has data for: a tag of the panel logged, train/tokens for the tokens
    panel, and a nonzero value for Newton iterations."""
    def shown(title, tags):
        if not any(tag in d for d in data for tag, _ in tags):
            return False
        if title == LOSS_TOKENS:
            return any(_tokens_per_step(d) for d in data)
        if tags[0][0] == NEWTON_ITERS:
            return any(v for d in data for v in d.get(NEWTON_ITERS, {}).values())
        return True
    return [p for p in PANELS if shown(p[0], p[2])]


def _names(runs: list[str | Path]) -> list[str]:
    """Legend names: each run's directory name, or its whole path where two names are equal."""
    paths = [Path(r) for r in runs]
    dirs = [p if p.is_dir() else p.parent for p in paths]
    short = [d.resolve().name or str(d) for d in dirs]
    return [s if short.count(s) == 1 else str(d) for s, d in zip(short, dirs)]


def _import_matplotlib():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("megarnn plot needs matplotlib, which is not installed; "
                          "pip install 'megarnn[plot]' (or pip install matplotlib)") from None
    return Figure


def plot_runs(runs: list[str | Path], out: str | Path) -> Path:
    """Draw the runs' curves into `out` (a .png, or another format matplotlib knows) -> its path."""
    if not runs:
        raise ConfigError("give at least one run directory to plot")
    Figure = _import_matplotlib()
    data = [_with_tokens(read_metrics(r), r) for r in runs]
    names = _names(runs)
    per_step = [_tokens_per_step(d) for d in data]
    panels = choose_panels(data)
    if not panels:
        raise DataError(f"{', '.join(map(str, runs))}: no train/loss, val/loss, val/bpc, train/lr, "
                        "train/tokens_per_sec or Newton iterations logged yet")
    cols = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6.5 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (title, ylabel, tags) in zip(axes, panels):
        for d, name, color, tps in zip(data, names, colors, per_step):
            if title == LOSS_TOKENS and not tps:
                continue
            scale = tps if title == LOSS_TOKENS else 1
            for tag, style in tags:
                if tag not in d:
                    continue
                steps = sorted(d[tag])
                label = name if style == tags[0][1] else None  # one entry per run; styles in the title
                ax.plot([s * scale for s in steps], [d[tag][s] for s in steps], style, color=color, label=label,
                        marker="o" if len(steps) < 30 and style == "--" else None, markersize=3)
        ax.set_title(title + (" (train solid, validation dashed)" if len(tags) > 1 else ""))
        ax.set_xlabel("training tokens" if title == LOSS_TOKENS else "step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.legend(fontsize="small", ncol=2 if len(runs) > 5 else 1)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def write_curves(run_dir: str | Path) -> Path | None:
    """The end of `megarnn train`: run_dir/curves.png, or None (nothing written) without matplotlib
    or without metrics."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    if not (Path(run_dir) / METRICS).is_file():
        return None
    return plot_runs([run_dir], Path(run_dir) / CURVES)
