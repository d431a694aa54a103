import copy
import json
import os
import signal
import sys
import tempfile

import pytest

# The suite runs several processes at once on few cores (DDP ranks, nnU-Net subprocesses); OpenMP's
# spin-waiting makes them stall each other (README, CPU section). Subprocesses inherit it.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

sys.path.insert(0, os.path.dirname(__file__))  # tests/cli_helpers.py, tests/trainer_helpers.py

from cli_helpers import plan_stock_phantoms, user_environment  # noqa: E402
from trainer_helpers import plan_phantom  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """The modules with tests marked ``cli`` (minutes each: stock nnU-Net commands in subprocesses) first,
    then the others, each module's tests together and in their order: pytest-xdist hands modules out in
    this order (``--dist loadfile --no-loadscope-reorder``), so the long ones start early and the short
    ones fill the end, and neither worker waits alone on a long module at the end of the run."""
    cli_modules = {item.nodeid.split('::')[0] for item in items if item.get_closest_marker('cli')}
    items.sort(key=lambda item: item.nodeid.split('::')[0] not in cli_modules)  # stable


def once_per_run(tmp_path_factory, name: str, build):
    """``build(folder)`` (a JSON-serialisable result) once per test run. Under pytest-xdist (the README's
    command runs two workers) the first worker to ask builds it in a folder shared by the workers while
    holding a file lock; the other waits and reads the result back. A failed build leaves no result: the
    next worker to ask tries again in a fresh folder."""
    if os.environ.get('PYTEST_XDIST_WORKER') is None:
        return build(str(tmp_path_factory.mktemp(name)))
    from filelock import FileLock
    shared = tmp_path_factory.getbasetemp().parent  # the run's base folder, above each worker's own
    result = shared / f'{name}.json'
    with FileLock(str(shared / f'{name}.lock')):
        if not result.exists():
            built = build(tempfile.mkdtemp(prefix=f'{name}_', dir=shared))
            result.write_text(json.dumps(built), encoding='utf-8')
        return json.loads(result.read_text(encoding='utf-8'))


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """Every test leaves SIGINT's and SIGTERM's handlers as it found them. A handler left behind by an in-process
    command is inherited by the pools nnU-Net forks later in the same worker: a pool worker that survived
    ``Pool.terminate()`` that way hung a CI run."""
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    yield
    after = {number: signal.getsignal(number) for number in before}
    assert after == before, f"the test left signal handlers changed: {before} -> {after}"


@pytest.fixture(scope='session')
def planned_phantom_files(tmp_path_factory):
    """A tiny 2D phantom planned once per run: ``(environ, plans, dataset_json)``."""
    return once_per_run(tmp_path_factory, 'loss_root', plan_phantom)


@pytest.fixture(scope='module')
def planned(planned_phantom_files):
    """(plans, dataset_json) of the tiny planned 2D phantom (copies), with nnU-Net's folders set to its
    root for the module; trainers are built from it by hand."""
    environ, plans, dataset_json = planned_phantom_files
    with pytest.MonkeyPatch.context() as patch:
        for k, v in environ.items():
            patch.setenv(k, v)
        yield copy.deepcopy(plans), copy.deepcopy(dataset_json)


@pytest.fixture
def raw(tmp_path, monkeypatch):
    """An empty nnUNet_raw, set in the environment, for converters called in-process."""
    folder = tmp_path / 'nnUNet_raw'
    folder.mkdir()
    monkeypatch.setenv('nnUNet_raw', str(folder))
    return str(folder)


@pytest.fixture
def env(tmp_path):
    """A user's environment after ``eval "$(nnunet-ext env --root TMP/data)"`` (empty nnUNet_raw); test
    modules that need a shared one define their own module-scoped ``env``."""
    return user_environment(str(tmp_path / 'data'))


@pytest.fixture(scope='session')
def stock_phantoms(tmp_path_factory):
    """The planned 2d and 3d_fullres phantoms shared by the stock-CLI tests (``plan_stock_phantoms``), once
    per run."""
    return once_per_run(tmp_path_factory, 'stock_phantoms', plan_stock_phantoms)


@pytest.fixture(scope='module')
def nnunet_folders(tmp_path_factory):
    """nnU-Net's three folders set for trainers built by hand (nothing is written there but empty fold folders)."""
    root = tmp_path_factory.mktemp('nnunet_folders')
    environ = {k: str(root / k) for k in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')}
    with pytest.MonkeyPatch.context() as patch:
        for k, v in environ.items():
            patch.setenv(k, v)
        yield environ
