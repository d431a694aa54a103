"""GPU readiness per trainer, against nnU-Net's ``nnUNetTrainer`` in the same run: graphs under
``torch.compile``, peak memory of a training step, and step time, in 2D and 3D.

* graphs: ``torch._dynamo.explain`` of the training-mode network on a batch: the number of graphs and
  graph breaks (1 and 0 is what DDP with nnU-Net's zero-weight deep-supervision head needs), with the
  first break's reason;
* step: nnU-Net's ``train_step`` (forward, loss, backward, optimizer step) on the same batches, rounds
  interleaved (``bench/step_time.py``). On CUDA the trainers are initialised as ``nnUNetv2_train`` does:
  compiled (unless ``nnUNet_compile=f``), fp16 autocast with a GradScaler; on a CPU neither (nnU-Net
  disables both there);
* peak memory of one step: CUDA ``max_memory_allocated``, CPU the peak resident-set increase
  (``bench/peak_memory.py``, a lower bound);
* ``--stock-train``: also ``nnUNetv2_train`` of one trainer per family for a few iterations with
  nnU-Net's defaults on the demo phantom (on CUDA: compile and AMP), exit status and seconds.

    python bench/gpu_readiness.py                                   # every trainer, CPU
    python bench/gpu_readiness.py --device cuda --stock-train -o bench/RESULTS_gpu_readiness.md
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version

import step_time
from peak_memory import peak_memory_meter

REFERENCE = step_time.REFERENCE
FAMILIES = ('nnUNetTrainerGODC', 'nnUNetTrainerGODCLFAM', 'nnUNetTrainerMLL', 'nnUNetTrainerMLN',
            'nnUNetTrainerIFECurvature', 'nnUNetTrainerIFEEntropy', 'nnUNetTrainerANUNet', 'nnUNetTrainerResUNet')


def graphs(trainer, batch) -> tuple:
    """``(graphs, breaks, first break reason)`` of the training-mode network under dynamo."""
    import torch
    network = getattr(trainer.network, '_orig_mod', trainer.network)
    torch._dynamo.reset()
    data = batch['data'].to(trainer.device)
    with contextlib.redirect_stdout(io.StringIO()):
        explained = torch._dynamo.explain(network)(data)
    torch._dynamo.reset()
    reason = explained.break_reasons[0].reason.split('\n')[0] if explained.break_reasons else ''
    return explained.graph_count, explained.graph_break_count, reason


def measure(configuration: str, dataset_id: int, names, device, rounds: int, warmup: int, meter) -> list:
    step_time.prepare_dataset(dataset_id, configuration)
    reference = step_time.build_trainer(REFERENCE, dataset_id, configuration, device)
    batches = step_time.reference_batches(reference, rounds + warmup)
    rows = []
    for name in names:
        trainer = step_time.build_trainer(name, dataset_id, configuration, device)
        step_time.share_initial_weights(reference, trainer)
        trainers = {REFERENCE: reference, name: trainer}
        prepared = step_time.with_trainer_targets(trainer, batches[:1])
        count, breaks, reason = graphs(trainer, prepared[0])
        medians, _, peaks = step_time.time_steps(trainers, batches, device, rounds, warmup, meter)
        rows.append(dict(trainer=name, graphs=count, breaks=breaks, reason=reason, step=medians[name],
                         reference_step=medians[REFERENCE], peak=peaks.get(name), reference_peak=peaks.get(REFERENCE)))
        del trainers, trainer
    return rows


def stock_train(device: str, iterations: int) -> list:
    """``nnUNetv2_train`` of one trainer per family for ``iterations`` iterations (one epoch) on the demo
    phantom (2d), nnU-Net's defaults otherwise; ``[(trainer, exit status, seconds, last line)]``.
    ``nnUNetTrainer`` reads no nnunet-ext variable (it would train its full length), so it is not run."""
    from nnunet_ext.demo.phantom import write_phantom_dataset
    from nnunet_ext.planning import plan_and_preprocess
    write_phantom_dataset(os.environ['nnUNet_raw'], 990, 'GPUReadiness', num_train=8, num_test=0, progress=False)
    with contextlib.redirect_stdout(io.StringIO()):
        plan_and_preprocess(990, 'ExperimentPlanner', ['2d'], [2], 2, progress=False)
    env = {**os.environ, 'nnUNet_ext_num_epochs': '1', 'nnUNet_ext_num_iterations_per_epoch': str(iterations),
           'nnUNet_ext_num_val_iterations_per_epoch': '2'}
    from nnunet_ext.environment import trainers_folder
    env['nnUNet_extTrainer'] = trainers_folder()
    out = []
    for name in FAMILIES:
        start = time.perf_counter()
        done = subprocess.run(['nnUNetv2_train', '990', '2d', '0', '-tr', name, '-device', device],
                              env=env, capture_output=True, text=True)
        lines = (done.stdout + done.stderr).strip().splitlines()
        out.append((name, done.returncode, time.perf_counter() - start, lines[-1] if lines else ''))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-tr', nargs='+', default=None, help='trainers (default: all of ours)')
    parser.add_argument('-c', nargs='+', default=list(step_time.SHAPES), choices=list(step_time.SHAPES))
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--rounds', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--stock-train', action='store_true', help='also nnUNetv2_train one trainer per family')
    parser.add_argument('--stock-iterations', type=int, default=10)
    parser.add_argument('-o', default=None, help='also write the Markdown to this file')
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error('--rounds must be >= 1 and --warmup >= 0')

    import warnings
    import torch
    from nnunet_ext.registry import trainer_classes
    warnings.filterwarnings('ignore')
    known = list(trainer_classes())
    names = args.tr or known
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f'unknown trainers {", ".join(unknown)}')
    device = torch.device(args.device)
    meter, method = peak_memory_meter(device)
    load = os.getloadavg()
    gpu = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'none'
    lines = ['# GPU readiness against nnUNetTrainer', '',
             f'- command: `python bench/gpu_readiness.py {" ".join(argv if argv is not None else sys.argv[1:])}`',
             f'- machine: {platform.platform()}, {os.cpu_count()} logical CPUs, device {device}, GPU {gpu}',
             f'- versions: torch {torch.__version__}, nnunetv2 {version("nnunetv2")}',
             f'- load average at start: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}',
             f'- peak memory: {method}', '']
    with tempfile.TemporaryDirectory(prefix='nnunet_ext_gpu_readiness_') as root:
        step_time.setup_environment(root)
        for i, configuration in enumerate(args.c):
            rows = measure(configuration, 985 + i, names, device, args.rounds, args.warmup, meter)
            lines += [f'## {configuration}', '',
                      '| trainer | graphs | breaks | step s | step ratio | peak MiB | peak ratio | first break |',
                      '|---|---|---|---|---|---|---|---|']
            for r in rows:
                peak_ratio = (f'{r["peak"] / r["reference_peak"]:.2f}' if r['peak'] is not None and r['reference_peak']
                              else 'n/a')
                peak = 'n/a' if r['peak'] is None else f'{r["peak"]:.0f}'
                lines.append(f'| {r["trainer"]} | {r["graphs"]} | {r["breaks"]} | {r["step"]:.4f} | '
                             f'{r["step"] / r["reference_step"]:.2f} | {peak} | {peak_ratio} | {r["reason"][:80]} |')
                print(lines[-1], flush=True)
            lines.append('')
        if args.stock_train:
            lines += ['## nnUNetv2_train, nnU-Net defaults, one trainer per family', '',
                      '| trainer | exit | seconds | last line |', '|---|---|---|---|']
            for name, status, seconds, last in stock_train(args.device, args.stock_iterations):
                lines.append(f'| {name} | {status} | {seconds:.0f} | {last[:100]} |')
    lines.append(f'\nload average at end: {" ".join(f"{x:.1f}" for x in os.getloadavg())}')
    text = '\n'.join(lines) + '\n'
    print(text)
    if args.o:
        with open(args.o, 'w', encoding='utf-8') as f:
            f.write(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
