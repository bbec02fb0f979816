"""The arithmetic bound bench/factor_speed.py compares its speed-up with counts the multiply-adds a training step
really runs (probex.experts.cost)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from probex.experts.cost import MaterialisingProbeX, ProbeX, step_macs, training_step

SHAPES = {"1280x1280": (1280, 1280), "320x768": (320, 768)}   # the bench's two SD 1.5 layer shapes
R, N_CLASSES = 128, 10


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("rank", [4, 64])
@pytest.mark.parametrize("variant", ["factor", "materialise"])
def test_step_macs_are_what_torch_counts(shape, rank, variant):
    d_w, d_h = SHAPES[shape]
    n = 2
    x = (torch.randn(n, d_w, rank), torch.randn(n, rank, d_h), torch.rand(n) + 0.5)
    cls = ProbeX if variant == "factor" else MaterialisingProbeX
    model = cls(d_w, d_h, R, R, R, n_out=N_CLASSES)
    with FlopCounterMode(display=False) as counter:   # forward and backward, 2 FLOPs per multiply-add
        training_step(model, x, torch.arange(n))
    assert counter.get_total_flops() == 2 * n * step_macs(variant, d_w, d_h, rank, R, R, R, N_CLASSES)
