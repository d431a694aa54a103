"""Every trainer against nnU-Net's ``nnUNetTrainer``: training-step time, inference time (per ANU-Net /
UNet++ prune level too) and peak memory, in 2D and 3D; writes ``bench/RESULTS.md``.

Per configuration, a phantom dataset is planned by nnU-Net (``bench/step_time.py``: 8 cases of 96x96
or 24x64x64). The trainers are measured in groups of ``--group`` (plus the reference, built once per
configuration), each group in one process with the same batches: training steps interleaved round by
round (``bench/step_time.py``), then nnU-Net's predictor on the same preprocessed cases
(``bench/inference_time.py``), then the peak memory of one training step and of predicting one case
(``bench/peak_memory.py``: CUDA allocator peak, or on CPU the peak resident-set increase). Ratios are
against the reference's median in the same group's rounds. A trainer that cannot be built or run is
listed under "Failures" (the exit code is then 1); the others are measured. The papers' own networks
(``nnUNetTrainerANUNetPaper``, ``nnUNetTrainerResUNetPaper*``) are 2D, and their trainers refuse 3D plans: they
are listed under "Not run" in 3d_fullres.

    python bench/run_all.py                                    # all trainers, 2d and 3d_fullres (long on a CPU)
    python bench/run_all.py -tr nnUNetTrainerGODC --rounds 3   # a quick check
    python bench/run_all.py --device cuda -o bench/RESULTS_gpu.md

Numbers from a shared machine mislead, so the machine's load is part of the result: ``uptime`` before and
after is written into the file's header. When the 1-minute load average exceeds the number of logical CPUs
before the run (other processes are already competing), nothing runs; when it exceeds them by more than a
quarter at the end (the run's own ``torch`` threads keep it near the number of CPUs on a CPU; more means
other processes competed), the output file is not written. Both exit with code 3 unless ``--force``.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import subprocess
import sys
import tempfile
import traceback
from importlib.metadata import version
from typing import Dict, List, Optional

from tqdm import tqdm

import inference_time
import step_time
from peak_memory import peak_memory_meter

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = step_time.REFERENCE


def _fmt(value, spec: str = '.4f') -> str:
    return 'n/a' if value is None else format(value, spec)


def _ratio(value, reference) -> str:
    return 'n/a' if value is None or not reference else f'{value / reference:.3f}'


def not_run_reason(configuration: str, trainer_class: type) -> Optional[str]:
    """Why a trainer is left out of a configuration, or None: the papers' own networks are 2D (their trainers
    refuse 3D plans, ``nnunet_ext.training.paper_networks.check_2d``)."""
    from nnunet_ext.training.paper_networks import PaperANUNetArchitectureMixin, PaperResUNetArchitectureMixin
    if len(step_time.SHAPES[configuration]) != 2 and \
            issubclass(trainer_class, (PaperANUNetArchitectureMixin, PaperResUNetArchitectureMixin)):
        return "the paper's network is 2D (the paper segments slices): the trainer refuses 3D plans"
    return None


def _groups(names: List[str], size: int) -> List[List[str]]:
    return [names[i:i + size] for i in range(0, len(names), size)]


def _build_group(names, dataset_id, configuration, device, reference, failures) -> Dict[str, object]:
    trainers = {REFERENCE: reference}
    for name in names:
        try:
            trainer = step_time.build_trainer(name, dataset_id, configuration, device)
            step_time.share_initial_weights(reference, trainer)
            trainers[name] = trainer
        except Exception as e:  # recorded in RESULTS.md and on stderr, exit code 1
            failures.append((configuration, name, 'build', f'{type(e).__name__}: {e}', traceback.format_exc()))
    return trainers


def measure_configuration(configuration: str, dataset_id: int, names: List[str], args, device, meter, failures,
                          bar, not_run: Dict[str, str]) -> dict:
    """``names`` measured in ``configuration``; ``not_run`` (trainer -> reason) is recorded with the results."""
    step_time.prepare_dataset(dataset_id, configuration)
    reference = step_time.build_trainer(REFERENCE, dataset_id, configuration, device)
    batches = step_time.reference_batches(reference, args.rounds + args.warmup)
    cases = inference_time.preprocessed_cases(reference, args.inference_cases)
    out = dict(patch=list(reference.configuration_manager.patch_size), batch=reference.batch_size,
               case_shapes=[list(c.shape[1:]) for c in cases], steps=[], inference=[], pipeline={}, not_run=not_run)
    for group in _groups(names, args.group):
        trainers = _build_group(group, dataset_id, configuration, device, reference, failures)
        try:
            entries = [e for name, trainer in trainers.items() for e in inference_time.inference_entries(name, trainer)]
            medians, pipeline, step_peaks = step_time.time_steps(trainers, batches, device, args.rounds, args.warmup,
                                                                 meter, progress=bar.update)
            seconds, inference_peaks = inference_time.time_inference(entries, cases, device, args.inference_rounds,
                                                                     1, meter, progress=bar.update)
        except Exception as e:
            failures.append((configuration, ', '.join(group), 'measure', f'{type(e).__name__}: {e}',
                             traceback.format_exc()))
            continue
        finally:
            del trainers
            gc.collect()
        out['pipeline'].update(pipeline)
        for name in medians:
            if name == REFERENCE and out['steps']:
                continue  # the reference once per configuration (its median of each group is in every row)
            out['steps'].append(dict(trainer=name, median=medians[name], reference=medians[REFERENCE],
                                     peak=step_peaks.get(name)))
        reference_entry = next(e.label for e in entries if e.trainer == REFERENCE)
        for entry in entries:
            if entry.trainer == REFERENCE and out['inference']:
                continue
            out['inference'].append(dict(label=entry.label, trainer=entry.trainer, level=entry.level,
                                         mirroring=entry.mirroring,
                                         median=seconds[entry.label], reference=seconds[reference_entry],
                                         peak=inference_peaks.get(entry.label)))
    return out


def uptime() -> str:
    """``uptime``'s line (load averages over 1, 5 and 15 minutes)."""
    return subprocess.run(['uptime'], capture_output=True, text=True, check=True).stdout.strip()


def overloaded(load_1min: float, own_load: float = 0.0) -> bool:
    """More runnable processes on average than logical CPUs (plus ``own_load``, the allowance for this run's
    own threads, at the end): timings are not results."""
    return load_1min > (os.cpu_count() or 1) + own_load


def results_markdown(results: Dict[str, dict], args, device, method: str, command: str, failures, started,
                     seconds: float, load, uptimes) -> str:
    import torch
    device_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
    lines = ['# Benchmarks: every trainer against nnUNetTrainer', '',
             f'- command: `{command}` (from the repository root)',
             f'- date: {started.isoformat(timespec="seconds")}, {seconds / 60:.1f} min',
             f'- machine: {platform.platform()}, {platform.processor() or platform.machine()}, '
             f'{os.cpu_count()} logical CPUs, device {device} ({device_name}), torch threads {torch.get_num_threads()}',
             f'- load average (1 min) at start / end: {load[0]:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} '
             f'logical CPUs (other processes compete for the CPUs above about {os.cpu_count()}: timings then vary '
             f'from round to round){" -- written with --force" if args.force else ""}',
             f'- `uptime` before: `{uptimes[0]}`; after: `{uptimes[1]}`',
             f'- versions: Python {platform.python_version()}, torch {torch.__version__}, '
             f'nnunetv2 {version("nnunetv2")}, nnunet-ext {version("nnunet-ext")}, numpy {version("numpy")}',
             f'- settings: {args.rounds} timed training steps per trainer after {args.warmup} warm-up steps; '
             f'{args.inference_rounds} timed inference rounds over {args.inference_cases} case(s) after 1 warm-up; '
             f'groups of {args.group} trainers + {REFERENCE}',
             f'- peak memory: {method}', '',
             'Training step: nnU-Net\'s `train_step` (forward, loss, backward, optimizer step) on the same batches '
             'from the reference\'s data loader, same initial weights where the networks share them. Inference: '
             'nnU-Net\'s `nnUNetPredictor.predict_sliding_window_return_logits` (tile step 0.5, Gaussian) on the same '
             'preprocessed cases, network rebuilt without deep supervision with the trainer\'s weights (as '
             'initialised), mirrored over the trainer\'s `inference_allowed_mirroring_axes`, as `nnUNetv2_predict` '
             'would predict with its checkpoint: each mirrored axis doubles the passes per tile, and a paper recipe '
             'predicts with the mirroring it trains with (column "mirror axes (passes)"; the recipes\' ratios '
             'below 1 are fewer passes, not a faster network). Ratios: median / the reference\'s median in the '
             'same rounds (> 1: slower).', '']
    for configuration, r in results.items():
        lines += [f'## {configuration}: patch {r["patch"]}, batch {r["batch"]}, inference cases {r["case_shapes"]}', '',
                  '| trainer | median step s | nnUNetTrainer step s | step ratio | step peak MiB |',
                  '|---|---|---|---|---|']
        lines += [f'| {s["trainer"]} | {s["median"]:.4f} | {s["reference"]:.4f} '
                  f'| {_ratio(s["median"], s["reference"])} | {_fmt(s["peak"], ".0f")} |' for s in r['steps']]
        lines += ['', '| network (prune level) | mirror axes (passes) | median s per case | nnUNetTrainer s per case '
                      '| inference ratio | inference peak MiB |', '|---|---|---|---|---|---|']
        lines += [f'| {i["label"]} | {i["mirroring"]} | {i["median"]:.4f} | {i["reference"]:.4f} '
                  f'| {_ratio(i["median"], i["reference"])} | {_fmt(i["peak"], ".0f")} |' for i in r['inference']]
        for name, s in r['pipeline'].items():
            lines.append(f'\n{name}: signed distance maps {s:.4f} s per batch in the data pipeline (per sample in the '
                         f'augmentation workers in real training, not in the step)')
        lines.append('')
    lines += ['## Not run', '']
    lines += [f'- {c} {n}: {reason}' for c, r in results.items() for n, reason in r['not_run'].items()] or ['none']
    lines += ['', '## Failures', '']
    lines += [f'- {c} {n} ({stage}): {message}' for c, n, stage, message, _ in failures] or ['none']
    return '\n'.join(lines) + '\n'


def _write_atomic(text: str, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(handle, 'w', encoding='utf-8') as f:
            f.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-tr', nargs='+', default=None,
                        help='trainers (default: every trainer of nnunet_ext.registry.trainer_classes())')
    parser.add_argument('-c', nargs='+', default=list(step_time.SHAPES), choices=list(step_time.SHAPES))
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--rounds', type=int, default=20, help='timed training steps per trainer (default: 20)')
    parser.add_argument('--warmup', type=int, default=3, help='warm-up training steps (default: 3)')
    parser.add_argument('--inference-rounds', type=int, default=5, help='timed inference rounds (default: 5)')
    parser.add_argument('--inference-cases', type=int, default=2, help='cases per inference round (default: 2)')
    parser.add_argument('--group', type=int, default=4, help='trainers per process-local group (default: 4)')
    parser.add_argument('-o', default=os.path.join(HERE, 'RESULTS.md'), help='output (default: bench/RESULTS.md)')
    parser.add_argument('--force', action='store_true',
                        help='write the results even when the load average exceeds the number of logical CPUs')
    parser.add_argument('--no_pbar', action='store_true')
    args = parser.parse_args(argv)
    for option in ('rounds', 'inference_rounds', 'inference_cases', 'group'):
        if getattr(args, option) < 1:
            parser.error(f'--{option.replace("_", "-")} must be >= 1')
    if args.warmup < 0:
        parser.error('--warmup must be >= 0')
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.o))):
        parser.error(f'the folder of -o {args.o} does not exist')

    import warnings
    import torch
    from nnunet_ext.registry import trainer_classes
    warnings.filterwarnings('ignore', category=FutureWarning)
    classes = trainer_classes()
    known = list(classes)
    names = args.tr or known
    unknown = [n for n in names if n not in known and n != REFERENCE]
    if unknown:
        parser.error(f'unknown trainers {", ".join(unknown)}; ours: {", ".join(known)}')
    names = [n for n in dict.fromkeys(names) if n != REFERENCE]
    device = torch.device(args.device)
    meter, method = peak_memory_meter(device)
    command = 'python bench/run_all.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    started, load, before = datetime.datetime.now(), os.getloadavg(), uptime()
    if overloaded(load[0]) and not args.force:
        print(f'not run: the machine is loaded ({before}; {os.cpu_count()} logical CPUs): its timings would not be '
              f'results. Run on an idle machine, or pass --force.', file=sys.stderr)
        return 3
    failures, results = [], {}
    not_run = {c: {n: reason for n in names if (reason := not_run_reason(c, classes[n]))} for c in args.c}
    measured = {c: [n for n in names if n not in not_run[c]] for c in args.c}
    rounds = sum(len(_groups(measured[c], args.group)) for c in args.c) * \
        (args.warmup + args.rounds + 1 + args.inference_rounds)
    with tempfile.TemporaryDirectory(prefix='nnunet_ext_bench_') as root, \
            tqdm(total=rounds, desc='bench rounds', disable=args.no_pbar) as bar:
        step_time.setup_environment(root)
        for i, configuration in enumerate(args.c):
            results[configuration] = measure_configuration(configuration, 980 + i, measured[configuration], args,
                                                           device, meter, failures, bar, not_run[configuration])
    seconds = (datetime.datetime.now() - started).total_seconds()
    after = uptime()
    text = results_markdown(results, args, device, method, command, failures, started, seconds, load, (before, after))
    print(text)
    if overloaded(os.getloadavg()[0], own_load=0.25 * (os.cpu_count() or 1)) and not args.force:
        print(f'{args.o} NOT written: the machine was loaded at the end ({after}; {os.cpu_count()} logical CPUs). '
              f'Rerun on an idle machine, or pass --force.', file=sys.stderr)
        return 3
    _write_atomic(text, args.o)
    for configuration, name, stage, message, trace in failures:
        print(f'FAILED {configuration} {name} ({stage}): {message}\n{trace}', file=sys.stderr)
    print(f'written: {args.o}')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
