"""The deploy predictor in the CLI tests: ``nnunet-ext export`` of a model folder the stock CLI trained, then
``python -m nnunet_ext.deploy`` in a process where torch, nnU-Net and their image libraries cannot be imported,
and its label maps against the stock predictor's on the same cases."""
from __future__ import annotations

import glob
import json
import os
import sys
from typing import Dict, List, Sequence

BLOCKED = ('torch', 'nnunetv2', 'skimage', 'nibabel', 'batchgenerators')

# `python -c BOOTSTRAP ARGS...` runs `python -m nnunet_ext.deploy ARGS...` with BLOCKED unimportable, and fails if any
# of them was imported anyway
BOOTSTRAP = '''
import sys
BLOCKED = {blocked!r}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError('blocked in this test: ' + name)
        return None
sys.meta_path.insert(0, Block())
import runpy
sys.argv = ['nnunet_ext.deploy'] + sys.argv[1:]
try:
    runpy.run_module('nnunet_ext.deploy', run_name='__main__', alter_sys=True)
finally:
    loaded = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)
    assert not loaded, loaded
'''


def torch_free_deploy(*args: str) -> List[str]:
    """The command line of ``python -m nnunet_ext.deploy ARGS`` with torch and nnU-Net blocked."""
    return [sys.executable, '-c', BOOTSTRAP.format(blocked=BLOCKED), *args]


def export_and_deploy_commands(model_folder: str, images: str, out: str, *export_options: str,
                               fold: str = '0') -> List[List[str]]:
    """``nnunet-ext export MODEL -f FOLD -o OUT/export`` and the torch-free prediction of ``images`` into
    ``OUT/predictions`` (run them in this order)."""
    export = os.path.join(out, 'export')
    return [['nnunet-ext', 'export', model_folder, '-f', fold, '-o', export, *export_options],
            torch_free_deploy(export, '-i', images, '-o', os.path.join(out, 'predictions'), '--threads', '1',
                              '--providers', 'CPUExecutionProvider', '--no-progress')]


def label_agreement(predictions: str, reference: str, labels: Sequence[int]) -> Dict[str, dict]:
    """Per case of ``reference`` (the stock predictor's label maps): the share of voxels with the same label in
    ``predictions`` and the Dice of each label (1 where both lack it), with numpy."""
    import numpy as np
    import SimpleITK as sitk
    cases = sorted(glob.glob(os.path.join(reference, '*.nii.gz')))
    assert cases and sorted(os.listdir(predictions)) == sorted(os.path.basename(c) for c in cases)
    report = {}
    for case in cases:
        ours = sitk.ReadImage(os.path.join(predictions, os.path.basename(case)))
        theirs = sitk.ReadImage(case)
        assert ours.GetSize() == theirs.GetSize() and np.allclose(ours.GetSpacing(), theirs.GetSpacing())
        assert np.allclose(ours.GetOrigin(), theirs.GetOrigin()) and np.allclose(ours.GetDirection(),
                                                                                 theirs.GetDirection())
        a, b = sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(theirs)
        dice = {}
        for label in labels:
            x, y = a == label, b == label
            total = int(x.sum() + y.sum())
            dice[label] = 1.0 if total == 0 else 2.0 * int((x & y).sum()) / total
        report[os.path.basename(case)] = {'agreement': float((a == b).mean()), 'dice': dice}
    return report


def assert_deploy_agrees(out: str, reference: str, minimum: float, labels: Sequence[int] = (0, 1, 2)) -> dict:
    """The torch-free predictions in ``OUT/predictions`` agree with ``reference`` on at least ``minimum`` of the
    voxels of every case; ``model.json`` is in the export. Prints and returns the per-case report."""
    with open(os.path.join(out, 'export', 'model.json'), encoding='utf-8') as f:
        document = json.load(f)
    report = label_agreement(os.path.join(out, 'predictions'), reference, labels)
    line = (f"deploy vs stock predictor, {document['source']['trainer']} {document['source']['configuration']}"
            f"{' pruned' if 'prune_level' in document['source'] else ''}: {json.dumps(report)}")
    print(line)
    if os.environ.get('NNUNET_EXT_DEPLOY_REPORT'):  # a file collecting the agreements of a run (for the docs)
        with open(os.environ['NNUNET_EXT_DEPLOY_REPORT'], 'a', encoding='utf-8') as f:
            f.write(line + '\n')
    for case, entry in report.items():
        assert entry['agreement'] >= minimum, (case, entry)
    return report
