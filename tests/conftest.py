import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/cli_helpers.py, tests/trainer_helpers.py

from cli_helpers import user_environment  # noqa: E402
from trainer_helpers import planned_phantom  # noqa: E402


@pytest.fixture(scope='module')
def planned(tmp_path_factory):
    """(plans, dataset_json) of a tiny planned 2D phantom; trainers are built from it by hand."""
    yield from planned_phantom(tmp_path_factory)


@pytest.fixture
def env(tmp_path):
    """A user's environment after ``eval "$(nnunet-ext env --root TMP/data)"`` (empty nnUNet_raw); test
    modules that need a shared one define their own module-scoped ``env``."""
    return user_environment(str(tmp_path / 'data'))
