"""A regular (non-editable) install must ship every module: build the wheel and compare."""
import glob
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = {'nnunet_ext': 'nnunet_ext', 'trainers': 'nnunet_ext/trainers',
           'architectures': 'nnunet_ext/architectures', 'plans': 'nnunet_ext/plans'}


def test_wheel_holds_every_module_of_the_source_tree(tmp_path):
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '-q', '-w',
                    str(tmp_path), ROOT], check=True, capture_output=True)
    wheel, = glob.glob(str(tmp_path / 'nnunet_ext-*.whl'))
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith('.py')}
    expected = set()
    for folder, target in FOLDERS.items():
        for path in glob.glob(os.path.join(ROOT, folder, '**', '*.py'), recursive=True):
            expected.add(os.path.join(target, os.path.relpath(path, os.path.join(ROOT, folder))).replace(os.sep, '/'))
    assert expected - shipped == set(), 'modules missing from the wheel: add their packages to pyproject.toml'
    assert not any(n.startswith(('trainers/', 'plans/', 'architectures/')) for n in shipped)  # no bare top-level
