"""The study's results, read from disk into the dict ``nnunet_ext.study.report.write_report`` renders: per
training nnU-Net's validation Dice per case (``fold_F/validation/summary.json``), its training curves
(``checkpoint_final.pth``), its seconds per iteration (``study_training.json``); per test the Dice per case
of ``evaluation.json``; and the state of every job (the report lists what is missing or failed)."""
from __future__ import annotations

import json
import math
import os
import statistics
from typing import Dict, List, Optional

from nnunet_ext.study.files import write_json_atomically, write_text_atomically
from nnunet_ext.study.graph import TEST, TRAIN, Job, build_graph, resolve_datasets
from nnunet_ext.study.layout import StudyLayout
from nnunet_ext.study.spec import StudySpec
from nnunet_ext.study.state import DONE, REPORT_INPUTS, done_results, job_states, jobs_done


def scored_classes(dataset_json: dict) -> Dict[str, str]:
    """``{key in nnU-Net's summary.json: class name}`` of the labels (or regions) nnU-Net scores: every
    label but background and the ignore label, as nnU-Net's ``evaluate_folder`` keys them."""
    classes = {}
    for name, value in dataset_json['labels'].items():
        if name in ('background', 'ignore'):
            continue
        classes[str(tuple(value)) if isinstance(value, (list, tuple)) else str(int(value))] = name
    return classes


def _dice(value) -> Optional[float]:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def validation_per_case(fold_folder: str, dataset_json: dict) -> Optional[Dict[str, Dict[str, Optional[float]]]]:
    path = os.path.join(fold_folder, 'validation', 'summary.json')
    if not os.path.isfile(path):
        return None
    with open(path, encoding='utf-8') as f:
        summary = json.load(f)
    classes, ending = scored_classes(dataset_json), dataset_json['file_ending']
    per_case = {}
    for entry in summary['metric_per_case']:
        case = os.path.basename(entry['reference_file'])[:-len(ending)]
        per_case[case] = {name: _dice(entry['metrics'].get(key, {}).get('Dice')) for key, name in classes.items()}
    return per_case


def _training(job: Job, state: dict, dataset_json: dict) -> dict:
    from nnunet_ext.evaluation.results_folders import read_training_curves
    from nnunet_ext.study.train import read_training_record
    folder = str(job.info['folder'])
    done = state['state'] == DONE
    record = read_training_record(folder) if done else None
    steps = [a['median_train_step_seconds'] for a in (record or {}).get('attempts', [])
             if a.get('median_train_step_seconds') is not None]  # per attempt; their median
    checkpoint = os.path.join(folder, 'checkpoint_final.pth')
    curves = read_training_curves(checkpoint) if done and os.path.isfile(checkpoint) else None
    return dict(trainer=job.info['trainer'], configuration=job.info['configuration'], plans=job.info['plans'],
                fold=job.info['fold'], seed=job.info['seed'], state=state['state'], error=state['error'],
                validation_per_case=validation_per_case(folder, dataset_json) if done else None,
                curves=curves, step_seconds=statistics.median(steps) if steps else None,
                epochs=len(curves['ema_fg_dice']) if curves and 'ema_fg_dice' in curves else None)


def _test(job: Job, state: dict) -> dict:
    folder = str(job.info['folder'])
    per_case = None
    if state['state'] == DONE:
        with open(os.path.join(folder, 'evaluation.json'), encoding='utf-8') as f:
            summary = json.load(f)
        names = [c['name'] for c in summary['classes']]
        per_case = {c['case']: {n: _dice(c['metrics'][n]['Dice']) for n in names} for c in summary['metric_per_case']}
    return dict(trainer=job.info['trainer'], configuration=job.info['configuration'], plans=job.info['plans'],
                seed=job.info['seed'], state=state['state'], error=state['error'], per_case=per_case,
                predictions=os.path.join(folder, 'predictions') if per_case is not None else None)


def collect(spec: StudySpec, dataset: str, jobs: List[Job], states: Dict[str, dict]) -> dict:
    """The ``results`` dict of one dataset."""
    from nnunet_ext.study.split import raw_dataset_json, test_set
    dataset_json = raw_dataset_json(dataset)
    mine = [j for j in jobs if j.info.get('dataset') == dataset]
    test_images, test_labels = test_set(spec, dataset) if spec.predict_test else ({}, None)
    return dict(name=spec.name, dataset=dataset, baseline=spec.baseline,
                classes=list(scored_classes(dataset_json).values()), file_ending=dataset_json['file_ending'],
                trainings=[_training(j, states[j.id], dataset_json) for j in mine if j.kind == TRAIN],
                tests=[_test(j, states[j.id]) for j in mine if j.kind == TEST],
                test_images=test_images,
                test_labels=test_labels if test_images else None)


def write_study_report(spec: StudySpec, active: Optional[Dict[str, str]] = None) -> List[str]:
    """The report of every dataset under ``report/DATASET/``, and ``report/inputs.json`` (the trainings and
    tests it was written from: a later run rewrites it only when more are done)."""
    from nnunet_ext.study.report import write_report
    datasets = resolve_datasets(spec)
    jobs = build_graph(spec, datasets)
    states = job_states(jobs, spec, active)
    layout = StudyLayout(spec.folder)
    written = []
    for dataset in datasets:
        paths = write_report(collect(spec, dataset, jobs, states), os.path.join(layout.report, dataset))
        written.extend(paths.values() if isinstance(paths, dict) else paths)
    inputs = done_results(jobs, jobs_done(jobs, spec))
    index = _index(spec, datasets, jobs, states)
    written.append(write_text_atomically(os.path.join(layout.report, 'report.md'), index))
    write_json_atomically(os.path.join(layout.report, REPORT_INPUTS), inputs)
    return sorted(p for p in written if p.endswith('report.md')) + sorted(p for p in written if not p.endswith('.md'))


def _index(spec: StudySpec, datasets: List[str], jobs: List[Job], states: Dict[str, dict]) -> str:
    """``report/report.md``: one line per dataset, linking its report, and what is not done."""
    counts: Dict[str, int] = {}
    for state in states.values():
        counts[state['state']] = counts.get(state['state'], 0) + 1
    summary = ', '.join(f'{n} {s}' for s, n in sorted(counts.items()))
    lines = [f'# Study {spec.name}', '', f'{len(jobs)} jobs: {summary}', '']
    lines += [f'- [{dataset}]({dataset}/report.md)' for dataset in datasets]
    missing = [j for j in jobs if states[j.id]['state'] != DONE and j.kind in (TRAIN, TEST)]
    if missing:
        lines += ['', '## Not done', '']
        for job in missing:
            error = states[job.id]['error']
            lines.append(f"- {job.id}: {states[job.id]['state']}" + (f' ({error})' if error else ''))
    return '\n'.join(lines) + '\n'

