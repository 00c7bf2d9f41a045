"""Fixtures shared by several test files."""
import shutil

import pytest

from run_dir_checks import train


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A finished small demo run (DSPH, 5 tasks, 1 epoch); copy it before changing it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train(out) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A copy of ``finished_run`` this test may change."""
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst
