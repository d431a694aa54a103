"""The study spec: what ``study init`` writes reads back as the options said; every bad key is refused naming
the key; the job graph has the jobs the spec implies (counted by hand)."""
from __future__ import annotations

import os
import textwrap

import pytest

from nnunet_ext.errors import UserInputError
from nnunet_ext.study.spec import load_spec, render_spec

MINIMAL = '''
[data]
datasets = [978]
[trainers]
compare = ["nnUNetTrainerGODC"]
'''


def write(tmp_path, text: str, name: str = 'study.toml') -> str:
    path = os.path.join(tmp_path, name)
    with open(path, 'w', encoding='utf-8') as f:
        f.write(textwrap.dedent(text))
    return path


def test_minimal_spec_takes_the_documented_defaults(tmp_path):
    spec = load_spec(write(tmp_path, MINIMAL))
    assert spec.name == 'study' and spec.folder == os.path.join(str(tmp_path), 'study')
    assert spec.trainers == ('nnUNetTrainer', 'nnUNetTrainerGODC') and spec.baseline == 'nnUNetTrainer'
    assert spec.configurations == ('2d',) and spec.plans == 'nnUNetPlans'
    assert spec.folds == (0, 1, 2, 3, 4) and spec.seeds == (0,)
    assert spec.training_length() == {} and spec.device == 'cuda' and spec.predict_test
    assert spec.executor == 'local' and spec.jobs == 1 and spec.slurm.signal_seconds == 300


def test_init_text_reads_back_as_given(tmp_path):
    text = render_spec('ab', ['978', 'Dataset501_X'], ['nnUNetTrainerGODC', 'nnUNetTrainerMLL'], ['2d', '3d_fullres'],
                       [0, 'all'], [0, 1, 2], epochs=12, iterations=20, val_iterations=5, device='cpu',
                       executor='slurm', jobs=2, partition='gpu', time_limit='24:00:00', predict_test=False)
    spec = load_spec(write(tmp_path, text, 'ab.toml'))
    assert spec.datasets == ('978', 'Dataset501_X')
    assert spec.trainers == ('nnUNetTrainer', 'nnUNetTrainerGODC', 'nnUNetTrainerMLL')
    assert spec.configurations == ('2d', '3d_fullres') and spec.folds == (0, 'all') and spec.seeds == (0, 1, 2)
    assert spec.training_length() == {'epochs': 12, 'iterations': 20, 'val_iterations': 5}
    assert spec.device == 'cpu' and not spec.predict_test and spec.executor == 'slurm' and spec.jobs == 2
    assert spec.slurm.partition == 'gpu' and spec.slurm.time == '24:00:00'


@pytest.mark.parametrize('edit, key', [
    ('[data]\ndatasets = [978]\n[trainers]\ncompare = ["A"]\n[runs]\nfold = [0]\n', 'runs.fold'),
    ('[data]\ndatasets = [978]\n[trainers]\ncompare = ["A"]\n[runs]\nfolds = [0, 0]\n', 'runs.folds'),
    ('[data]\ndatasets = [978]\n[trainers]\ncompare = ["A"]\n[runs]\nfolds = [-1]\n', 'runs.folds'),
    ('[data]\ndatasets = [978]\n[trainers]\ncompare = ["A"]\n[runs]\nseeds = ["x"]\n', 'runs.seeds'),
    ('[data]\ndatasets = [978]\n[trainers]\ncompare = ["A"]\n[runs]\nepochs = 0\n', 'runs.epochs'),
    ('[data]\ndatasets = [978]\n[trainers]\ncompare = ["A"]\n[runs]\nepochs = 1.5\n', 'runs.epochs'),
    ('[data]\ndatasets = [978]\n[trainers]\ncompare = ["A"]\n[runs]\ndevice = "gpu"\n', 'runs.device'),
    ('[data]\ndatasets = [978]\n[trainers]\ncompare = ["A"]\n[executor]\nkind = "lsf"\n', 'executor.kind'),
    ('[data]\ndatasets = [978]\n[trainers]\ncompare = ["A"]\n[executor.slurm]\ntime = "1 day"\n',
     'executor.slurm.time'),
    ('[data]\ndatasets = [978]\n[trainers]\ncompare = ["A"]\n[executor.slurm]\nextra = ["--qos=x"]\n',
     'executor.slurm.extra'),
    ('[data]\ndatasets = [978]\n[trainers]\ncompare = ["A"]\n[executor.slurm]\npartion = "gpu"\n',
     'executor.slurm.partion'),
    ('[data]\ndatasets = [978]\n[trainers]\ncompare = ["A"]\n[test]\npredict = "yes"\n', 'test.predict'),
    ('[data]\ndatasets = [978]\n[trainers]\ncompare = "A"\n', 'trainers.compare'),
    ('[data]\ndatasets = [978]\n', 'trainers'),
    ('[data]\n[trainers]\ncompare = ["A"]\n', 'data.datasets'),
    ('[study]\nname = "a b"\n[data]\ndatasets = [978]\n[trainers]\ncompare = ["A"]\n', 'study.name'),
    ('[data]\ndatasets = [978]\n[trainers]\ncompare = ["A"]\n[extras]\nx = 1\n', 'extras'),
])
def test_bad_spec_is_refused_naming_the_key(tmp_path, edit, key):
    with pytest.raises(UserInputError) as error:
        load_spec(write(tmp_path, edit))
    assert str(error.value).startswith(f'study spec: {key}:'), str(error.value)


def test_not_toml_or_missing_file_is_one_line(tmp_path):
    with pytest.raises(UserInputError, match='not valid TOML'):
        load_spec(write(tmp_path, '[data\n'))
    with pytest.raises(UserInputError, match='does not exist'):
        load_spec(os.path.join(str(tmp_path), 'nope.toml'))


def test_graph_has_one_training_per_fold_seed_trainer_and_one_test_per_seed(tmp_path, monkeypatch):
    from nnunet_ext.study import graph
    spec = load_spec(write(tmp_path, MINIMAL + '[runs]\nfolds = [0, 1]\nseeds = [3, 4, 5]\n'))
    monkeypatch.setattr(graph, 'needs_planning', lambda dataset, spec: dataset.endswith('B'))
    jobs = graph.build_graph(spec, ['Dataset001_A', 'Dataset002_B'])
    kinds = [j.kind for j in jobs]
    # 2 datasets x 1 configuration x 2 trainers x 2 folds x 3 seeds; tests: 2 x 2 trainers x 3 seeds; one plan (B)
    assert kinds.count('train') == 24 and kinds.count('test') == 12 and kinds.count('plan') == 1
    assert kinds[-1] == 'report' and len(jobs[-1].needs) == 36 and jobs[-1].after_any
    test = next(j for j in jobs if j.id == 'test__Dataset002_B__2d__nnUNetTrainerGODC__seed_4')
    assert sorted(test.needs) == ['train__Dataset002_B__2d__nnUNetTrainerGODC__fold_0__seed_4',
                                  'train__Dataset002_B__2d__nnUNetTrainerGODC__fold_1__seed_4']
    train_b = next(j for j in jobs if j.id == 'train__Dataset002_B__2d__nnUNetTrainer__fold_1__seed_5')
    assert train_b.needs == ('plan__Dataset002_B',)
    assert dict(train_b.env)['nnUNet_results'] == os.path.join(spec.folder, 'results', 'seed_5')
    assert train_b.argv[1:] == ('-m', 'nnunet_ext.study', 'train', 'Dataset002_B', '2d', '1', 'nnUNetTrainer', '-p',
                                'nnUNetPlans', '--seed', '5', '--device', 'cuda')
    assert next(j for j in jobs if j.id.startswith('train__Dataset001_A')).needs == ()
    ids = [j.id for j in jobs]
    assert all(ids.index(n) < ids.index(j.id) for j in jobs for n in j.needs)  # needs come first
