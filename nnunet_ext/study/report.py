"""The report of ``nnunet-ext study`` (``report.md``, ``report.html`` and two PNGs per configuration), and
its tables and pseudo-Dice plot (``bench/ab_real.py`` is a thin wrapper over the study).

``write_report(results, folder)`` takes the study's ``results`` (built by the collector from disk):

* ``name``, ``dataset``, ``baseline`` (trainer name), ``classes`` (scored classes or regions, no
  background), ``file_ending``;
* ``trainings``: one per (trainer, configuration, plans, fold, seed) with ``state`` ('done', 'missing',
  'failed', 'running', 'pending'), ``error`` (a failure's last log line), ``validation_per_case``
  (``{case: {class: Dice or None}}``), ``curves`` (nnU-Net's logged per-epoch lists), ``step_seconds``
  (median ``train_step``) and ``epochs``;
* ``tests``: one per (trainer, configuration, plans, seed) with ``state``, ``error``, ``per_case`` (test
  Dice of the fold ensemble) and ``predictions`` (a folder of ``CASE<file_ending>`` label maps);
* ``test_images`` (``{case: [channel files]}``, empty without a test set) and ``test_labels`` (a folder).

Per configuration the report has the cross-validation Dice with the paired test against the baseline, the
test-set Dice with its paired test, the seconds per iteration, the pseudo-Dice curves
(``pseudo_dice_<configuration>.png``), the test cases where the trainers differ most
(``qualitative_<configuration>.png``) and every training or test that is not done. The statistics are
those of :mod:`nnunet_ext.study.statistics`. Only the image, label and prediction files named in
``results`` are read. Markdown and HTML are rendered from the same blocks; the HTML links the PNGs by
relative path. The files are rendered into a temporary folder and moved into place at the end.
"""
from __future__ import annotations

import datetime
import html
import math
import os
import re
import shutil
import tempfile
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from nnunet_ext import __version__
from nnunet_ext.evaluation.paired_test import WILCOXON_CONVENTION
from nnunet_ext.evaluation.report import Table, markdown_table, wilcoxon_table
from nnunet_ext.study.statistics import (MEAN, arm_names, configuration_statistics, configurations, fold_key,
                                         nanmean)

__all__ = ["number", "mean_std", "dice_table_data", "dice_table", "paired_table_data", "paired_table",
           "cross_validation_table", "timing_table", "plot_pseudo_dice", "differing_cases", "plot_qualitative",
           "write_report"]

QUALITATIVE_CASES = 3
Block = Tuple[str, object]  # ('heading', (level, text)), ('text', [lines]), ('list', [items]), ('table', Table),
#                             ('image', (file name, alt text))


# ------------------------------------------------------------------------------------------------ tables

def number(value, spec: str = '.4f') -> str:
    """``value`` formatted, 'n/a' for None or NaN."""
    return 'n/a' if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def mean_std(stats: Mapping[str, float]) -> str:
    """'mean ± std' over seeds (4 decimals; 'n/a' without a mean, std 'n/a' for one seed)."""
    if math.isnan(stats['mean']):
        return 'n/a'
    return f"{stats['mean']:.4f} ± {number(stats['std'])}"


def dice_table_data(summary: Mapping[str, dict], classes: Sequence[str],
                    timing: Optional[Mapping[str, dict]] = None) -> Table:
    """Per trainer: seeds, per class and over classes the Dice mean ± std over seeds (``seed_statistics``);
    with ``timing`` also seconds per iteration, its ratio and the wall time per iteration."""
    header = ['trainer', 'seeds', *classes, 'mean over classes']
    if timing is not None:
        header += ['s/it (train_step)', 'ratio', 'wall s/it']
    rows = []
    for trainer, stats in summary.items():
        row = [trainer, str(stats[MEAN]['n_seeds']), *[mean_std(stats[c]) for c in classes], mean_std(stats[MEAN])]
        if timing is not None:
            t = timing[trainer]
            row += [number(t['step_s']), number(t['ratio'], '.3f'), number(t['wall_s'])]
        rows.append(row)
    return header, rows


def dice_table(summary: Mapping[str, dict], timing: Optional[Mapping[str, dict]], classes: Sequence[str]) -> str:
    """:func:`dice_table_data` as Markdown."""
    return markdown_table(dice_table_data(summary, classes, timing))


def paired_table_data(paired: Mapping[str, Mapping[str, dict]], classes: Sequence[str]) -> Table:
    """Per trainer and class (and over classes): the paired test against the baseline (``paired_statistics``)."""
    header = ['trainer', 'class', 'cases', 'mean diff', 'median diff', 'W', 'p', 'better', 'worse', 'note']
    rows = []
    for trainer, tests in paired.items():
        for c in [*classes, MEAN]:
            t = tests[c]
            rows.append([trainer, c, str(t['n_pairs']), number(t['mean_difference'], '+.4f'),
                         number(t['median_difference'], '+.4f'), number(t['statistic'], '.1f'), number(t['p'], '.4g'),
                         str(t['n_better']), str(t['n_worse']), t['note'] or ''])
    return header, rows


def paired_table(paired: Mapping[str, Mapping[str, dict]], classes: Sequence[str]) -> str:
    """:func:`paired_table_data` as Markdown."""
    return markdown_table(paired_table_data(paired, classes))


def cross_validation_table(stats: Mapping, classes: Sequence[str]) -> Table:
    """Per trainer and class (and over classes): folds, seeds, validation cases and the Dice over the pooled
    validation cases of all folds, mean ± std over seeds."""
    validation = stats['validation']
    header = ['trainer', 'class', 'folds', 'seeds', 'cases', 'Dice (mean ± std over seeds)']
    rows = []
    for arm in stats['arms']:
        folds = ' '.join(map(str, validation['folds'][arm])) or 'n/a'
        for c in [*classes, MEAN]:
            s = validation['summary'][arm][c]
            rows.append([arm, c, folds, str(s['n_seeds']), str(validation['cases'][arm]), mean_std(s)])
    return header, rows


def timing_table(stats: Mapping) -> Table:
    """Per trainer: trainings with a step time, epochs, mean over trainings of the median train_step
    seconds (± std) and the ratio to the baseline's."""
    header = ['trainer', 'trainings', 'epochs', 's/it (median train_step)', 'std', 'ratio to baseline']
    rows = []
    for arm in stats['arms']:
        t = stats['timing'][arm]
        rows.append([arm, str(t['n_runs']), ' '.join(map(str, t['epochs'])) or 'n/a', number(t['step_s']),
                     number(t['step_s_std']), number(t['ratio'], '.3f')])
    return header, rows


# ----------------------------------------------------------------------------------------------- figures

def _figure(width: float, height: float):
    """A matplotlib figure on the Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), layout='constrained')
    FigureCanvasAgg(figure)
    return figure


def plot_pseudo_dice(curves: Mapping[str, Mapping[object, dict]], path: str, title: str, unit: str = 'seeds') -> None:
    """PNG: nnU-Net's EMA pseudo-Dice (``ema_fg_dice``) per epoch, one colour per trainer; thin: one run
    (``curves[trainer][run]``), thick: the mean over the runs (up to the shortest)."""
    import matplotlib
    import matplotlib.style
    from matplotlib.ticker import MaxNLocator
    with matplotlib.style.context('default'):
        figure = _figure(7.5, 4.5)
        ax = figure.subplots()
        colours = matplotlib.colormaps['tab10']
        for i, (trainer, runs) in enumerate(curves.items()):
            series = [[math.nan if v is None else v for v in runs[r]['ema_fg_dice']] for r in sorted(runs)
                      if runs[r].get('ema_fg_dice')]
            for values in series:
                ax.plot(range(1, len(values) + 1), values, color=colours(i % 10), alpha=0.35, linewidth=0.8)
            if series:
                length = min(len(v) for v in series)
                mean = np.mean([v[:length] for v in series], axis=0)
                ax.plot(range(1, length + 1), mean, color=colours(i % 10), linewidth=2.2, marker='o', markersize=3,
                        label=f'{trainer} ({len(series)} {unit})')
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, 'no training curves', ha='center', va='center', transform=ax.transAxes)
        ax.set(xlabel='epoch', ylabel='pseudo-Dice (EMA, foreground mean)', title=title, ylim=(-0.02, 1.02))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        figure.savefig(path, format='png', dpi=100)


def differing_cases(case_means: Mapping[str, Mapping[str, Mapping[str, float]]], n: int = QUALITATIVE_CASES
                    ) -> List[str]:
    """The ``n`` test cases with the largest spread (max - min over trainers) of the seed-averaged mean
    Dice over classes (``case_means[trainer][MEAN][case]``); ties by case name."""
    cases = sorted(set().union(*(m[MEAN].keys() for m in case_means.values())))
    spread = {}
    for case in cases:
        values = [m[MEAN][case] for m in case_means.values() if not math.isnan(m[MEAN].get(case, math.nan))]
        spread[case] = max(values) - min(values) if values else -1.0
    return sorted(cases, key=lambda case: -spread[case])[:n]


def _read(path: str) -> np.ndarray:
    """An image as a numpy array with SimpleITK, 2D as one slice along axis 0."""
    import SimpleITK as sitk
    array = sitk.GetArrayFromImage(sitk.ReadImage(path))
    return array[np.newaxis] if array.ndim == 2 else array


def _slice(predictions: Sequence[np.ndarray], reference: Optional[np.ndarray]) -> int:
    """Along axis 0: the slice where the predictions disagree (with each other, or with the reference for
    a single one) on most voxels; without disagreement the one with most reference foreground."""
    stack = [*predictions, *([reference] if reference is not None and len(predictions) < 2 else [])]
    if len(stack) >= 2:
        differs = np.any(np.stack(stack) != stack[0], axis=0).reshape(len(stack[0]), -1).sum(axis=1)
        if differs.max() > 0:
            return int(np.argmax(differs))
    if reference is not None and reference.any():
        return int(np.argmax((reference > 0).reshape(len(reference), -1).sum(axis=1)))
    shape = stack[0].shape if stack else (1,)
    return shape[0] // 2


def _show(ax, image: Optional[np.ndarray], labels: Optional[np.ndarray], reference: Optional[np.ndarray],
          title: str) -> None:
    """One panel: the image in grey, ``labels`` filled (one colour per label value), the reference's outline."""
    import matplotlib
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    if image is not None:
        low, high = np.percentile(image, [1, 99]) if image.size else (0, 1)
        ax.imshow(image, cmap='gray', vmin=low, vmax=high if high > low else low + 1, interpolation='nearest')
    palette = matplotlib.colormaps['tab10']
    if labels is not None:
        colours = np.zeros((*labels.shape, 4))
        for value in np.unique(labels[labels > 0]):
            colours[labels == value] = (*palette(int(value) % 10)[:3], 0.45)
        ax.imshow(colours, interpolation='nearest')
    if reference is not None:
        for value in np.unique(reference[reference > 0]):
            mask = (reference == value).astype(float)
            if 0 < mask.sum() < mask.size:
                ax.contour(mask, levels=[0.5], colors=[palette(int(value) % 10)], linewidths=1.0)


def _draw_row(axes, row: dict) -> None:
    """One case of the qualitative figure: the reference panel, then one panel per trainer."""
    reference = _read(row['reference']) if row['reference'] else None
    predictions = {t: _read(f) if f else None for t, (f, _) in row['predictions'].items()}
    image = _read(row['image']) if row['image'] else None
    arrays = [a for a in (reference, *predictions.values(), image) if a is not None]
    shape = arrays[0].shape if arrays else None  # the reference's, else the first prediction's
    usable = {t: p for t, p in predictions.items() if p is not None and p.shape == shape}
    z = _slice(list(usable.values()), reference) if usable or reference is not None else (shape or (1,))[0] // 2
    image = image[z] if image is not None and image.shape == shape else None
    ref = reference[z] if reference is not None else None
    where = f', slice {z}' if shape is not None and shape[0] > 1 else ''
    _show(axes[0], image, ref, None, f"{row['case']}: {'reference' if ref is not None else 'no reference'}{where}")
    for ax, trainer in zip(axes[1:], predictions):
        if trainer in usable:
            _show(ax, image, usable[trainer][z], ref, f"{trainer}\nmean Dice {number(row['predictions'][trainer][1])}")
        else:
            _show(ax, image, None, ref, f'{trainer}\nno usable prediction')
    for ax in axes[1 + len(predictions):]:
        ax.set_axis_off()


def plot_qualitative(rows: Sequence[dict], path: str, title: str) -> None:
    """PNG: one row per case (``{'case', 'image', 'reference', 'predictions': {trainer: (file, Dice)}}``,
    files or None): the image with the reference, then each trainer's prediction with the reference's
    outline, titled with its Dice; a 3D case at the slice of :func:`_slice`."""
    import matplotlib.style
    columns = 1 + max(len(r['predictions']) for r in rows)
    with matplotlib.style.context('default'):
        figure = _figure(2.6 * columns, 2.8 * len(rows) + 0.4)
        figure.suptitle(title, fontsize=10)
        for axes, row in zip(figure.subplots(len(rows), columns, squeeze=False), rows):
            _draw_row(axes, row)
        figure.savefig(path, format='png', dpi=100)


def _qualitative_rows(results: Mapping, configuration: str, stats: Mapping) -> Tuple[List[dict], str]:
    """The rows of the qualitative figure (each trainer's first seed with predictions), or [] and why not."""
    if not results.get('test_images'):
        return [], 'no test images'
    names = arm_names([e for e in [*results['trainings'], *results['tests']] if e['configuration'] == configuration],
                      results['baseline'])
    first: Dict[str, dict] = {}
    for t in sorted(results['tests'], key=lambda t: t['seed']):
        if (t['configuration'] == configuration and t['state'] == 'done' and t.get('predictions')
                and t.get('per_case') is not None):
            first.setdefault(names[(t['trainer'], t['plans'])], t)
    arms = [arm for arm in stats['arms'] if arm in first]
    if not arms:
        return [], 'no test predictions'
    ending, labels = results['file_ending'], results.get('test_labels')
    rows = []
    for case in differing_cases({a: stats['test']['case_means'][a] for a in arms}):
        if case not in results['test_images']:
            continue
        predictions = {}
        for arm in arms:
            file = os.path.join(first[arm]['predictions'], case + ending)
            dice = nanmean(math.nan if v is None else v for v in first[arm]['per_case'].get(case, {}).values())
            predictions[arm] = (file if os.path.isfile(file) else None, dice)
        reference = os.path.join(labels, case + ending) if labels else None
        rows.append({'case': case, 'image': (results['test_images'][case] or [None])[0],
                     'reference': reference if reference and os.path.isfile(reference) else None,
                     'predictions': predictions})
    return rows, '' if rows else 'no scored test case'


# ------------------------------------------------------------------------------------------------ blocks

def _not_done(results: Mapping, configuration: str) -> List[str]:
    """One line per training or test of the configuration whose state is not 'done'."""
    lines = []
    for kind, entries in (('training', results['trainings']), ('test', results['tests'])):
        for e in entries:
            if e['configuration'] == configuration and e['state'] != 'done':
                where = f"fold {e['fold']} seed {e['seed']}" if kind == 'training' else f"seed {e['seed']}"
                error = f": {e['error']}" if e.get('error') else ''
                lines.append(f"{kind} {e['trainer']} ({e['plans']}) {where}: {e['state']}{error}")
    return lines


def _paired_blocks(stats: Mapping, section: str, table: Optional[Table]) -> List[Block]:
    if stats['baseline'] is None:
        return [('text', [f'No baseline trainer in this configuration: no paired test ({section}).'])]
    if not stats[section]['paired']:
        return [('text', ['Only the baseline trained: nothing to test against it.'])]
    return [('table', table)]


def _configuration_blocks(results: Mapping, configuration: str, stats: Mapping, images: Mapping[str, str]
                          ) -> List[Block]:
    classes, baseline = results['classes'], stats['baseline'] or results['baseline']
    test = stats['test']
    wilcoxon = {'classes': [{'name': c} for c in [*classes, MEAN]],
                'wilcoxon': {'tests': stats['validation']['paired']}}
    blocks: List[Block] = [
        ('heading', (2, f'Configuration {configuration}')),
        ('heading', (3, 'Cross-validation (validation cases of all folds)')),
        ('text', ["Per trainer and seed: nnU-Net's validation Dice of each fold's validation cases, the folds "
                  'pooled, mean over cases (NaN skipped); then mean ± sample std (ddof=1) over seeds.']),
        ('table', cross_validation_table(stats, classes)),
        ('text', [f'Wilcoxon signed-rank test against {baseline}, per (fold, case) the Dice averaged over seeds '
                  f'({WILCOXON_CONVENTION}).']),
        *_paired_blocks(stats, 'validation', wilcoxon_table(wilcoxon)),
        ('heading', (3, 'Test set')),
    ]
    if test is None:
        blocks.append(('text', ['No test set: this study predicts no test images, so there is no test table.']))
    else:
        blocks += [
            ('text', ["Per trainer: mean ± sample std (ddof=1) over seeds of each run's mean Dice over the test "
                      "cases (predicted by the fold ensemble); 'mean over classes' = mean of the class means."]),
            ('table', dice_table_data(test['summary'], classes)),
            ('text', [f'Paired difference to {baseline}: per test case the Dice averaged over seeds (mean: then '
                      f'over classes); differences trainer - {baseline}; better/worse: cases above/below it; '
                      f"Wilcoxon signed-rank test ({WILCOXON_CONVENTION.replace('(fold, case)', 'test-case')})."]),
            *_paired_blocks(stats, 'test', paired_table_data(test['paired'], classes)),
        ]
    blocks += [('heading', (3, 'Seconds per iteration')),
               ('text', ["Per training the median duration of nnU-Net's train_step; per trainer the mean over its "
                         f'trainings, and the ratio to {baseline} (> 1: slower).']),
               ('table', timing_table(stats)),
               ('heading', (3, 'Pseudo-Dice per epoch')),
               ('text', ["nnU-Net's EMA pseudo-Dice on the validation iterations; thin: one training, thick: the "
                         'mean over the trainer\'s trainings.']),
               ('image', (images['pseudo_dice'], f'pseudo-Dice, {configuration}')),
               ('heading', (3, 'Test cases where the trainers differ most'))]
    if 'qualitative' in images:
        blocks += [('text', [f'The {QUALITATIVE_CASES} test cases with the largest spread of the seed-averaged mean '
                             "Dice across trainers; each trainer's first seed; 3D: the slice where the predictions "
                             'disagree most. Filled: labels; outline: the reference.']),
                   ('image', (images['qualitative'], f'qualitative, {configuration}'))]
    else:
        blocks.append(('text', [f"No figure: {images.get('qualitative_missing', 'no test set')}."]))
    problems = _not_done(results, configuration)
    blocks += [('heading', (3, 'Missing or failed')),
               ('list', problems) if problems else ('text', ['Nothing: every training and test is done.'])]
    return blocks


def _header(results: Mapping) -> List[Block]:
    entries = [*results['trainings'], *results['tests']]
    seeds = sorted({e['seed'] for e in entries})
    folds = sorted({t['fold'] for t in results['trainings']}, key=fold_key)
    done = sum(t['state'] == 'done' for t in results['trainings'])
    tests_done = sum(t['state'] == 'done' for t in results['tests'])
    return [('heading', (1, f"Study {results['name']}: {results['dataset']}")),
            ('list', [f"baseline: {results['baseline']}; trainers: "
                      f"{', '.join(dict.fromkeys(e['trainer'] for e in entries))}",
                      f"configurations: {', '.join(configurations(results))}; plans: "
                      f"{', '.join(dict.fromkeys(e['plans'] for e in entries))}",
                      f"folds: {' '.join(map(str, folds)) or 'none'}; seeds: {' '.join(map(str, seeds)) or 'none'}",
                      f"classes: {', '.join(results['classes'])}",
                      f"trainings done: {done} of {len(results['trainings'])}; test predictions done: {tests_done} "
                      f"of {len(results['tests'])}; test cases: {len(results.get('test_images') or {})}",
                      f"written {datetime.datetime.now().isoformat(timespec='seconds')} by nnunet-ext {__version__}",
                      'Dice: 4 decimals; mean ± sample std (ddof=1) over seeds, n/a for one seed or none'])]


def render_markdown(blocks: Sequence[Block]) -> str:
    """Markdown of the report blocks."""
    lines: List[str] = []
    for kind, body in blocks:
        if kind == 'heading':
            lines.append('#' * body[0] + ' ' + body[1])
        elif kind == 'text':
            lines += body
        elif kind == 'list':
            lines += [f'- {item}' for item in body]
        elif kind == 'table':
            lines.append(markdown_table(body))
        elif kind == 'image':
            lines.append(f'![{body[1]}]({body[0]})')
        lines.append('')
    return '\n'.join(lines)


def render_html(blocks: Sequence[Block], title: str) -> str:
    """A self-contained HTML page of the report blocks (inline style; images linked by relative path)."""
    parts = []
    for kind, body in blocks:
        if kind == 'heading':
            parts.append(f'<h{body[0]}>{html.escape(body[1])}</h{body[0]}>')
        elif kind == 'text':
            parts += [f'<p>{html.escape(line)}</p>' for line in body]
        elif kind == 'list':
            parts.append('<ul>' + ''.join(f'<li>{html.escape(item)}</li>' for item in body) + '</ul>')
        elif kind == 'table':
            header, rows = body
            head = ''.join(f'<th>{html.escape(h)}</th>' for h in header)
            cells = ''.join('<tr>' + ''.join(f'<td>{html.escape(c)}</td>' for c in row) + '</tr>' for row in rows)
            parts.append(f'<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>')
        elif kind == 'image':
            parts.append(f'<img src="{html.escape(body[0])}" alt="{html.escape(body[1])}">')
    style = ('body{font-family:sans-serif;margin:2em;max-width:90em}table{border-collapse:collapse;margin:1em 0}'
             'td,th{border:1px solid #bbb;padding:.25em .6em;text-align:left}th{background:#eee}img{max-width:100%}')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{style}</style></head><body>\n' + '\n'.join(parts) + '\n</body></html>\n')


# ------------------------------------------------------------------------------------------------- write

def _file_name(kind: str, configuration: str) -> str:
    return f"{kind}_{re.sub(r'[^A-Za-z0-9_.-]', '_', configuration)}.png"


def _render(results: Mapping, work: str) -> List[str]:
    """Writes every file of the report into ``work``; returns their names, the PNGs first."""
    blocks, written = _header(results), []
    for configuration in configurations(results):
        stats = configuration_statistics(results, configuration)
        images = {'pseudo_dice': _file_name('pseudo_dice', configuration)}
        plot_pseudo_dice(stats['curves'], os.path.join(work, images['pseudo_dice']),
                         f"{results['dataset']}, {configuration}: pseudo-Dice", unit='trainings')
        written.append(images['pseudo_dice'])
        rows, why_not = _qualitative_rows(results, configuration, stats) if stats['test'] else ([], 'no test set')
        if rows:
            images['qualitative'] = _file_name('qualitative', configuration)
            plot_qualitative(rows, os.path.join(work, images['qualitative']),
                             f"{results['dataset']}, {configuration}: test cases where the trainers differ most")
            written.append(images['qualitative'])
        else:
            images['qualitative_missing'] = why_not
        blocks += _configuration_blocks(results, configuration, stats, images)
    title = f"Study {results['name']}: {results['dataset']}"
    for name, text in (('report.html', render_html(blocks, title)), ('report.md', render_markdown(blocks))):
        with open(os.path.join(work, name), 'w', encoding='utf-8') as f:
            f.write(text)
        written.append(name)
    return written


def write_report(results: Mapping, folder: str) -> Dict[str, str]:
    """Writes ``report.md``, ``report.html`` and the PNGs of ``results`` into ``folder`` (created if needed);
    returns ``{file name: path}``. Everything is rendered into a temporary folder inside ``folder`` first and
    then moved into place file by file (``report.md`` last), so an error leaves the previous report as it
    was; PNGs of a previous report that this one no longer has are removed."""
    folder = os.path.abspath(folder)
    os.makedirs(folder, exist_ok=True)
    for leftover in os.listdir(folder):  # of a report killed while it was being written
        if re.fullmatch(r'\.report\..+\.tmp', leftover):
            shutil.rmtree(os.path.join(folder, leftover), ignore_errors=True)
    work = tempfile.mkdtemp(prefix='.report.', suffix='.tmp', dir=folder)
    try:
        names = _render(results, work)
        for name in names:
            os.replace(os.path.join(work, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for stale in os.listdir(folder):
        if re.fullmatch(r'(pseudo_dice|qualitative)_.+\.png', stale) and stale not in names:
            os.remove(os.path.join(folder, stale))
    return {name: os.path.join(folder, name) for name in names}
