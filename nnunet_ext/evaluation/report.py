"""The files of ``nnunet-ext compare``: a Markdown report (tables pasteable as they are), a
self-contained HTML report (the same tables, the plots embedded as base64 PNG), the JSON with every
per-case number, and two PNG plots drawn with matplotlib's Agg canvas (no pyplot, no global backend):

* ``dice_boxplot.png``: per class, a box per trainer of the per-case Dice of all evaluated folds
  (NaN cases left out), every case drawn as a dot;
* ``training_curves.png``: per trainer (one colour) and fold (one line each), nnU-Net's logged
  training and validation loss, and the pseudo-Dice (``mean_fg_dice``, dotted) with its moving
  average (``ema_fg_dice``, solid), against the epoch.

Everything is rendered from the content of ``compare.json`` (NaN as None).
"""
from __future__ import annotations

import base64
import functools
import html
import io
import json
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from nnunet_ext.evaluation.summary import TABLE_METRICS

__all__ = ["render_report", "pooled_table", "fold_table", "wilcoxon_table", "markdown_table", "dice_boxplot",
           "training_curves_plot"]

Table = Tuple[List[str], List[List[str]]]
DISTANCES = ("HD95", "ASD")


def _metric_cell(metric: str, stats: Mapping[str, Optional[float]]) -> str:
    if stats["n_nan"] == stats["n"] or stats["mean"] is None:
        return "n/a"
    digits = 2 if metric in DISTANCES else 4
    text = f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
    return text + (f" ({stats['n_nan']} NaN)" if stats["n_nan"] else "")


def _number(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def pooled_table(content: dict) -> Table:
    """Per trainer and class: mean ± std over all evaluated cases of all folds."""
    header = ["trainer", "class", "folds", "cases",
              *[m + (" (mm)" if m in DISTANCES else "") for m in TABLE_METRICS]]
    rows = []
    for trainer in content["trainers"]:
        summary = content["per_trainer"][trainer]
        for c in content["classes"]:
            stats = summary["per_class"][c["name"]]
            rows.append([trainer, c["name"], " ".join(map(str, summary["folds"])), str(summary["cases"]),
                         *[_metric_cell(m, stats[m]) for m in TABLE_METRICS]])
    return header, rows


def fold_table(content: dict) -> Table:
    """Per trainer and class: mean Dice of each requested fold, and mean ± std over the evaluated folds."""
    folds = content["folds"]
    header = ["trainer", "class", *[f"fold {f}" for f in folds], "over folds"]
    rows = []
    for trainer in content["trainers"]:
        summary = content["per_trainer"][trainer]
        for c in content["classes"]:
            dice = summary["fold_dice"][c["name"]]
            cells = []
            for fold in folds:
                if fold not in summary["folds"]:
                    cells.append("missing")
                else:
                    cells.append(_number(dice["per_fold"][str(fold)], ".4f"))
            over = ("n/a" if dice["mean_over_folds"] is None else
                    f"{dice['mean_over_folds']:.4f} ± {dice['std_over_folds']:.4f} ({dice['n_folds']})")
            rows.append([trainer, c["name"], *cells, over])
    return header, rows


def wilcoxon_table(content: dict) -> Optional[Table]:
    """Per class and trainer: the paired test against the reference (None when skipped)."""
    wilcoxon = content["wilcoxon"]
    if "skipped" in wilcoxon:
        return None
    header = ["class", "trainer", "pairs", "non-zero", "mean Δ Dice", "median Δ Dice", "W", "p", "note"]
    rows = []
    for c in content["classes"]:
        for trainer, tests in wilcoxon["tests"].items():
            t = tests[c["name"]]
            rows.append([c["name"], trainer, str(t["n_pairs"]), str(t["n_nonzero"]),
                         _number(t["mean_difference"], "+.4f"), _number(t["median_difference"], "+.4f"),
                         _number(t["statistic"], "g"), _number(t["p"], ".4g"), t["note"] or ""])
    return header, rows


def markdown_table(table: Table) -> str:
    header, rows = table
    escape = lambda text: text.replace("|", "\\|")
    lines = ["| " + " | ".join(map(escape, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(table: Table) -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _default_style(draw):
    """``draw`` under matplotlib's default style, whatever a library set globally before (nnU-Net's
    progress plot sets seaborn's)."""
    @functools.wraps(draw)
    def drawn(*args, **kwargs):
        import matplotlib.style
        with matplotlib.style.context("default"):
            return draw(*args, **kwargs)
    return drawn


def _colours(trainers: Sequence[str]) -> Dict[str, str]:
    from matplotlib import colormaps
    palette = colormaps["tab10"]
    return {t: palette(i % 10) for i, t in enumerate(trainers)}


@_default_style
def dice_boxplot(content: dict) -> bytes:
    """PNG: per class a box per trainer of the per-case Dice (all evaluated folds, NaN left out)."""
    import numpy as np
    classes, trainers = [c["name"] for c in content["classes"]], content["trainers"]
    figure = _figure(max(4.0, 1.2 * len(trainers) + 2) * len(classes), 4.5)
    axes = figure.subplots(1, len(classes), squeeze=False)[0]
    rng = np.random.default_rng(0)  # jitter of the dots, the same on every run
    colours = _colours(trainers)
    for ax, name in zip(axes, classes):
        values = [[c["metrics"][name]["Dice"] for c in content["per_case"] if c["trainer"] == t
                   and c["metrics"][name]["Dice"] is not None] for t in trainers]
        positions = list(range(1, len(trainers) + 1))
        drawn = [(p, v) for p, v in zip(positions, values) if v]
        if drawn:
            ax.boxplot([v for _, v in drawn], positions=[p for p, _ in drawn], widths=0.5, showfliers=False)
        for position, trainer, v in zip(positions, trainers, values):
            ax.scatter(position + rng.uniform(-0.12, 0.12, len(v)), v, s=14, color=colours[trainer], zorder=3)
            if not v:
                ax.text(position, 0.5, "no defined\nDice", ha="center", va="center", fontsize=8)
        ax.set_xticks(positions, trainers, rotation=25, ha="right", fontsize=8)
        ax.set_xlim(0.4, len(trainers) + 0.6)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{name}: Dice per case")
        ax.set_ylabel("Dice")
        ax.grid(axis="y", alpha=0.3)
    return _png(figure)


@_default_style
def training_curves_plot(content: dict) -> bytes:
    """PNG: losses and pseudo-Dice per epoch, one line per trainer and fold."""
    from matplotlib.lines import Line2D
    trainers, curves = content["trainers"], content["curves"]
    colours = _colours(trainers)
    figure = _figure(12, 4.5)
    loss_ax, dice_ax = figure.subplots(1, 2)
    drawn = False
    for trainer in trainers:
        for fold, c in sorted(curves.get(trainer, {}).items(), key=lambda item: int(item[0])):
            style = dict(color=colours[trainer], marker="o", markersize=3, linewidth=1.2)
            epochs = lambda values: list(range(len(values)))
            loss_ax.plot(epochs(c["train_losses"]), c["train_losses"], linestyle="-", **style)
            loss_ax.plot(epochs(c["val_losses"]), c["val_losses"], linestyle="--", **style)
            dice_ax.plot(epochs(c["mean_fg_dice"]), c["mean_fg_dice"], linestyle=":", **style)
            dice_ax.plot(epochs(c["ema_fg_dice"]), c["ema_fg_dice"], linestyle="-", **style)
            drawn = True
    if not drawn:
        for ax in (loss_ax, dice_ax):
            ax.text(0.5, 0.5, "no checkpoint found:\nno training curves", ha="center", va="center",
                    transform=ax.transAxes)
    loss_ax.set(title="loss (solid: train, dashed: validation)", xlabel="epoch", ylabel="loss")
    dice_ax.set(title="pseudo-Dice (dotted: per epoch, solid: moving average)", xlabel="epoch",
                ylabel="mean foreground pseudo-Dice")
    from matplotlib.ticker import MaxNLocator
    for ax in (loss_ax, dice_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [Line2D([], [], color=colours[t], label=t) for t in trainers]
    dice_ax.legend(handles=handles, fontsize=8, title="one line per fold", title_fontsize=8)
    return _png(figure)


def _intro(content: dict) -> List[str]:
    return [f"dataset {content['dataset']}, configuration {content['configuration']}, plans {content['plans']}; "
            f"folds {' '.join(map(str, content['folds']))}; trainers {', '.join(content['trainers'])}",
            f"references: {content['reference_folder']}",
            f"created {content['created']} by nnunet-ext {content['version']} compare"]


def _sections(content: dict) -> List[Tuple[str, object]]:
    """(title, body) with body a list of text lines, a Table, or ('image', kind)."""
    problems = content["problems"] or ["nothing missing: every requested fold has its validation predictions and "
                                       "its final checkpoint"]
    wilcoxon = wilcoxon_table(content)
    sections = [
        ("Missing or left out", [f"- {p}" for p in problems]),
        ("All validation cases, folds pooled (mean ± std over cases)", pooled_table(content)),
        ("Dice per fold (mean over the fold's cases)", fold_table(content)),
        (f"Wilcoxon signed-rank test of per-case Dice against {content['reference_trainer']}",
         wilcoxon if wilcoxon is not None else [content["wilcoxon"]["skipped"]]),
        ("Per-case Dice", ("image", "boxplot")),
        ("Training curves", ("image", "curves")),
        ("Conventions", [f"- {k}: {v}" for k, v in content["conventions"].items()]),
    ]
    return sections


def _markdown(content: dict, names: Mapping[str, str]) -> str:
    lines = [f"# nnunet-ext compare: {content['dataset']} {content['configuration']}", "",
             *[line + "  " for line in _intro(content)], ""]
    for title, body in _sections(content):
        lines += [f"## {title}", ""]
        if isinstance(body, tuple) and body and body[0] == "image":
            lines.append(f"![{title}]({names[body[1]]})")
        elif isinstance(body, tuple):
            lines.append(markdown_table(body))
        else:
            lines += body
        lines.append("")
    return "\n".join(lines)


def _html(content: dict, images: Mapping[str, bytes]) -> str:
    title = f"nnunet-ext compare: {content['dataset']} {content['configuration']}"
    parts = [f"<h1>{html.escape(title)}</h1>", "<p>" + "<br>".join(map(html.escape, _intro(content))) + "</p>"]
    for section, body in _sections(content):
        parts.append(f"<h2>{html.escape(section)}</h2>")
        if isinstance(body, tuple) and body and body[0] == "image":
            data = base64.b64encode(images[body[1]]).decode("ascii")
            parts.append(f'<img alt="{html.escape(section)}" src="data:image/png;base64,{data}">')
        elif isinstance(body, tuple):
            parts.append(_html_table(body))
        else:
            parts.append("<ul>" + "".join(f"<li>{html.escape(line.removeprefix('- '))}</li>" for line in body)
                         + "</ul>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:90em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:.25em .6em;text-align:left}th{background:#eee}img{max-width:100%}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def render_report(content: dict, names: Mapping[str, str]) -> Dict[str, object]:
    """``{kind: text or PNG bytes}`` for the kinds of ``names`` (markdown, html, json, boxplot, curves);
    ``names`` maps kinds to file names (the Markdown links the PNGs by those names)."""
    images = {"boxplot": dice_boxplot(content), "curves": training_curves_plot(content)}
    return {"markdown": _markdown(content, names), "html": _html(content, images),
            "json": json.dumps(content, indent=2, allow_nan=False), **images}
