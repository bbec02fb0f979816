"""What one ProbeX training step costs, counted: the factor-space path against the release's materialising one.

bench/factor_speed.py times both paths and compares the speed-up with the ratio of these multiply-adds (its
arithmetic bound); tests/test_factor_speed.py checks the count against torch's own FLOP counter.
"""
from __future__ import annotations

import torch

from probex.experts.base import dense_from_factors
from probex.experts.probex import ProbeX
from probex.train import loss_and_score


class MaterialisingProbeX(ProbeX):
    """The release's input path: B·A formed for every model of the batch, then the dense forward."""

    def responses(self, x):
        return super().responses(dense_from_factors(x))


def step_macs(variant: str, d_w: int, d_h: int, r: int, r_u: int, r_v: int, r_t: int, n_classes: int) -> int:
    """Multiply-adds of one multiclass training step (forward + backward) per model of LoRA rank r on a d_w × d_h
    layer: ``variant`` "factor" (ProbeX) or "materialise" (MaterialisingProbeX)."""
    shared = 3 * (r_v * r_u * r_t + r_t * n_classes)
    if variant == "factor":
        return 2 * r * (d_w * r_v + d_h * r_u) + 3 * r * r_v * r_u + shared
    return d_w * d_h * (r + 2 * r_u) + 3 * d_w * r_v * r_u + shared


def training_step(model: ProbeX, x, y: torch.Tensor) -> None:
    """probex.train.train_epoch's step on one batch, up to the optimiser: encode, head, loss, backward."""
    model.zero_grad(set_to_none=True)
    loss, _ = loss_and_score("multiclass", model.logits(model.encode(x)), y)
    loss.backward()
