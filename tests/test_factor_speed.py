"""bench/factor_speed.py's arithmetic bound counts the multiply-adds a training step really runs."""
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import factor_speed  # noqa: E402


@pytest.mark.parametrize("shape", list(factor_speed.SHAPES))
@pytest.mark.parametrize("rank", [4, 64])
@pytest.mark.parametrize("variant", ["factor", "materialise"])
def test_step_macs_are_what_torch_counts(shape, rank, variant):
    d_w, d_h = factor_speed.SHAPES[shape]
    n = 2
    x = (torch.randn(n, d_w, rank), torch.randn(n, rank, d_h), torch.rand(n) + 0.5)
    cls = factor_speed.ProbeX if variant == "factor" else factor_speed.MaterialisingProbeX
    model = cls(d_w, d_h, factor_speed.R_U, factor_speed.R_V, factor_speed.R_T, n_out=factor_speed.N_CLASSES)
    with FlopCounterMode(display=False) as counter:   # forward and backward, 2 FLOPs per multiply-add
        factor_speed.training_step(model, x, torch.arange(n))
    assert counter.get_total_flops() == 2 * n * factor_speed.step_macs(variant, d_w, d_h, rank)
