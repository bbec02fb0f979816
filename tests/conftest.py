"""Shared test setup: one torch thread — the machine's 2 cores are shared with long training jobs."""
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))  # tests/synthetic.py is a helper module the tests import
