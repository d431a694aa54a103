"""The study's jobs other than training (``python -m nnunet_ext.study plan|test|report SPEC ...``): what
each SLURM task or local subprocess runs. Trainings run ``python -m nnunet_ext.study train`` (``train.py``)."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import List, Optional, Sequence

from nnunet_ext.study.files import write_json_atomically
from nnunet_ext.study.layout import StudyLayout
from nnunet_ext.study.spec import StudySpec, load_spec


# ------------------------------------------------------------------------------------------------- plan

def write_default_splits(dataset: str, spec: StudySpec) -> Optional[str]:
    """``splits_final.json`` as nnU-Net's first training would write it (its seeded 5-fold split of the cases
    preprocessed for the first configuration), when missing, so that trainings started together read it
    instead of racing to write it. Returns the path written, or None."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    from nnunet_ext.study.graph import data_folder, planned_configurations
    folder = os.path.join(os.environ['nnUNet_preprocessed'], dataset)
    path = os.path.join(folder, 'splits_final.json')
    if os.path.isfile(path):
        return None
    first = spec.configurations[0]
    data = data_folder(dataset, spec.plans, planned_configurations(dataset, spec.plans)[first])
    identifiers = sorted(infer_dataset_class(data).get_identifiers(data))
    return write_json_atomically(path, generate_crossval_split(identifiers, seed=12345, n_splits=5))


def plan(spec: StudySpec, dataset: str) -> None:
    """Plans and preprocesses what is missing (fingerprint kept when there is one), then writes the splits."""
    from nnunet_ext.planning import plan_and_preprocess_all
    from nnunet_ext.study.graph import plans_file, preprocessed
    if not preprocessed(dataset, spec):
        planner = spec.planner or 'ExperimentPlanner'
        dataset_id = int(dataset[len('Dataset'):len('Dataset') + 3])
        print(f'planning {dataset} with {planner} for {", ".join(spec.configurations)}', flush=True)
        processes = min(8, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1)
        if os.environ.get('nnUNet_n_proc_DA') == '0':  # nnU-Net's planner fails with 0 (a CPU trial's setting)
            os.environ['nnUNet_n_proc_DA'] = '1'
        written = plan_and_preprocess_all(dataset_id, planner, spec.configurations,
                                          [processes] * len(spec.configurations), processes, progress=False)
        if not os.path.isfile(plans_file(dataset, spec.plans)):
            raise RuntimeError(f"{planner} wrote the plans {', '.join(written)}, not {spec.plans}: set data.plans "
                               f"or data.planner in the spec")
    path = write_default_splits(dataset, spec)
    if path:
        print(f'wrote nnU-Net\'s default 5-fold split: {path}', flush=True)
    if spec.split is not None:
        from nnunet_ext.study.split import make_split, private_dataset
        split = make_split(spec, dataset)
        print(f"the study's own split: {len(split['train'])} training, {len(split['val'])} validation, "
              f"{len(split['test'])} test cases: {private_dataset(spec, dataset)}", flush=True)


# ------------------------------------------------------------------------------------------------- test

def test(spec: StudySpec, dataset: str, configuration: str, trainer: str, seed: int) -> None:
    """Predicts the test cases with the fold ensemble of (trainer, configuration, seed) as ``nnUNetv2_predict``
    does (its ``nnUNetPredictor`` at its defaults, ``checkpoint_final.pth``), then scores them against
    ``labelsTs`` with ``nnunet-ext evaluate``'s metrics. The folder appears complete or not at all."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunet_ext.evaluation.evaluate import evaluate_folders
    from nnunet_ext.study.split import test_set
    layout = StudyLayout(spec.folder)
    folder = layout.test_folder(seed, dataset, trainer, spec.plans, configuration)
    if os.path.isfile(os.path.join(folder, 'evaluation.json')):
        print(f'done already: {folder}')
        return
    cases, labels = test_set(spec, dataset)
    if not cases:
        raise RuntimeError(f"{dataset} has no test cases (imagesTs with labelsTs, or held out by [split])")
    device = torch.device(spec.device)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)  # an earlier attempt's leftovers (never complete)
    temporary = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(folder)}.partial-')
    try:
        predictions = os.path.join(temporary, 'predictions')
        os.makedirs(predictions)
        predictor = nnUNetPredictor(device=device, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(
            layout.model_folder(seed, dataset, trainer, spec.plans, configuration),
            use_folds=[f if f == 'all' else int(f) for f in spec.folds], checkpoint_name='checkpoint_final.pth')
        names = sorted(cases)
        inputs, outputs = [cases[c] for c in names], [os.path.join(predictions, c) for c in names]
        print(f'predicting {len(names)} test cases with folds {", ".join(map(str, spec.folds))}', flush=True)
        if device.type == 'cpu':
            predictor.predict_from_files_sequential(inputs, outputs, save_probabilities=False, overwrite=True)
        else:
            predictor.predict_from_files(inputs, outputs, save_probabilities=False, overwrite=True,
                                         num_processes_preprocessing=2, num_processes_segmentation_export=2)
        evaluate_folders(predictions, labels, dataset=dataset, output_file=os.path.join(temporary, 'evaluation.json'),
                         num_processes=1, progress=False)
        os.replace(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    print(f'test set scored: {os.path.join(folder, "evaluation.json")}')


# ----------------------------------------------------------------------------------------------- report

def report(spec: StudySpec) -> List[str]:
    """Writes the report from what is done (what is not is listed in it); returns the report files."""
    from nnunet_ext.study.collect import write_study_report
    return write_study_report(spec)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m nnunet_ext.study', description=__doc__)
    sub = parser.add_subparsers(dest='job', required=True)
    p = sub.add_parser('plan')
    p.add_argument('spec')
    p.add_argument('dataset')
    p = sub.add_parser('test')
    p.add_argument('spec')
    p.add_argument('dataset')
    p.add_argument('configuration')
    p.add_argument('trainer')
    p.add_argument('seed', type=int)
    p = sub.add_parser('report')
    p.add_argument('spec')
    args = parser.parse_args(argv)
    spec = load_spec(args.spec)
    if args.job == 'plan':
        plan(spec, args.dataset)
    elif args.job == 'test':
        test(spec, args.dataset, args.configuration, args.trainer, args.seed)
    else:
        for path in report(spec):
            print(f'report: {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
