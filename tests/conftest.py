"""Shared test setup: one torch thread — the machine's 2 cores are shared with long training jobs — and the fixtures
several test modules use."""
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))  # helper modules the tests import: helpers.py, synthetic.py, …


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """The test bundle of tests/helpers.py, built once per session: its paths (base, root, bundle, zoos)."""
    from helpers import build_test_bundle

    return build_test_bundle(tmp_path_factory.getbasetemp() / "studio")
