"""Smoke tests of the bench entry points (no benchmark is run): their command lines parse and refuse bad
options, run_all's choice of what to run and its mirroring column, and the CPU peak-memory meter sees an
allocation of known size."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench')


def _script(name, *args):
    return subprocess.run([sys.executable, os.path.join(BENCH, name), *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize('name, words', [('run_all.py', ['--rounds', '--inference-rounds', '-tr', 'RESULTS.md']),
                                         ('convergence.py', ['--iterations', '--eval-every', '--dataset']),
                                         ('gpu_readiness.py', ['--stock-train', '--device', '-tr'])])
def test_help(name, words):
    result = _script(name, '--help')
    assert result.returncode == 0, result.stderr
    assert all(w in result.stdout for w in words), result.stdout


def test_convergence_refuses_bad_options():
    result = _script('convergence.py', '-tr', 'nnUNetTrainerGODC', '--iterations', '25', '--eval-every', '10')
    assert result.returncode == 2 and 'must divide --iterations 25' in result.stderr, result.stderr
    result = _script('convergence.py', '-tr', 'nnUNetTrainer')
    assert result.returncode == 2 and 'other than nnUNetTrainer' in result.stderr, result.stderr


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='the CPU meter reads /proc (Linux)')
def test_cpu_peak_memory_meter_sees_a_known_allocation():
    sys.path.insert(0, BENCH)
    try:
        from peak_memory import peak_memory_meter
    finally:
        sys.path.remove(BENCH)
    import torch
    meter, method = peak_memory_meter(torch.device('cpu'))
    assert meter is not None and 'VmHWM' in method
    size_mib = 64

    def allocate():
        block = np.ones(size_mib * 2 ** 20 // 8)  # every page written
        return float(block[-1])

    peak = meter(allocate)
    assert size_mib * 0.95 <= peak <= size_mib * 1.5, peak
    assert meter(lambda: None) < 8  # nothing allocated: (almost) nothing measured


def _run_all_module():
    sys.path.insert(0, BENCH)
    try:
        import run_all
    finally:
        sys.path.remove(BENCH)
    return run_all


def test_run_all_refuses_a_loaded_machine_and_writes_nothing(tmp_path, monkeypatch, capsys):
    run_all = _run_all_module()
    cores = os.cpu_count()
    monkeypatch.setattr(os, 'getloadavg', lambda: (cores + 0.5, cores + 0.5, cores + 0.5))
    out = tmp_path / 'R.md'
    assert run_all.main(['-tr', 'nnUNetTrainerGODC', '-o', str(out), '--no_pbar']) == 3
    assert not out.exists() and 'loaded' in capsys.readouterr().err
    assert run_all.overloaded(cores + 0.01) and not run_all.overloaded(cores)
    assert not run_all.overloaded(cores + 0.2, own_load=0.25 * cores) and run_all.overloaded(cores * 1.3, 0.25 * cores)
    assert 'load average' in run_all.uptime()


def test_run_all_leaves_only_the_papers_2d_networks_out_of_3d_and_names_the_mirroring():
    """The papers' own networks refuse 3D plans (their trainers' check): run_all lists them under "Not run"
    in 3d_fullres instead of failing on them; every trainer runs in 2d. The inference table's mirroring
    column: the axes and 2 ** len(axes) passes per tile."""
    from nnunet_ext.registry import trainer_classes
    run_all = _run_all_module()
    classes = trainer_classes()
    left_out = {n for n, c in classes.items() if run_all.not_run_reason('3d_fullres', c)}
    assert left_out == {'nnUNetTrainerANUNetPaper', 'nnUNetTrainerResUNetPaper', 'nnUNetTrainerResUNetPaperRecipe'}
    assert not any(run_all.not_run_reason('2d', c) for c in classes.values())
    entry = run_all.inference_time.InferenceEntry
    assert entry('t', None, None, (0, 1, 2)).mirroring == '0, 1, 2 (8)'
    assert entry('t', 2, None, None).mirroring == 'none (1)'


def test_pyradiomics_slices_keeps_the_tumour_slices_and_their_margin(tmp_path):
    """bench/pyradiomics_slices.py on stand-in volumes: the slices with tumour +- margin become PNG pairs, CT
    grey values follow the [-1000, 400] HU window, MRI the volume's 0.5-99.5 percentiles."""
    import SimpleITK as sitk
    from PIL import Image
    sys.path.insert(0, BENCH)
    try:
        import pyradiomics_slices as prs
    finally:
        sys.path.remove(BENCH)
    rng = np.random.default_rng(0)
    tumour_slices = {'brain1': (3, 5), 'brain2': (0, 0), 'breast1': (6, 7), 'lung1': (2, 2), 'lung2': (4, 6)}
    for case, (first, last) in tumour_slices.items():
        image = rng.uniform(-1000, 400, (8, 16, 12)) if case.startswith('lung') else rng.gamma(2.0, 100, (8, 16, 12))
        mask = np.zeros((8, 16, 12), np.uint8)
        mask[first:last + 1, 4:8, 3:6] = 1
        sitk.WriteImage(sitk.GetImageFromArray(image.astype(np.float32)), str(tmp_path / f'{case}_image.nrrd'))
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(tmp_path / f'{case}_label.nrrd'))
    counts = prs.write_slices(str(tmp_path), str(tmp_path / 'out'), margin=2)
    # slices first - 2 .. last + 2, clipped to the volume (8 slices)
    assert counts == {'brain1': (7, 3), 'brain2': (3, 1), 'breast1': (4, 2), 'lung1': (5, 1), 'lung2': (6, 3)}
    assert sorted(os.listdir(tmp_path / 'out' / 'images')) == sorted(os.listdir(tmp_path / 'out' / 'masks'))
    assert len(os.listdir(tmp_path / 'out' / 'images')) == sum(n for n, _ in counts.values())
    lung = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 'lung1_image.nrrd')))
    png = np.asarray(Image.open(tmp_path / 'out' / 'images' / 'lung1_z002.png'))
    np.testing.assert_array_equal(png, np.round((lung[2] + 1000) / 1400 * 255).astype(np.uint8))
    mask = np.asarray(Image.open(tmp_path / 'out' / 'masks' / 'lung1_z002.png'))
    assert set(np.unique(mask)) == {0, 255} and (mask == 255).sum() == 4 * 3
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 'brain1_image.nrrd')))
    low, high = np.percentile(brain, (0.5, 99.5))
    assert prs.grey(np.array([low, high, high + 1]), 'brain1').tolist() == [0, 255, 255]
