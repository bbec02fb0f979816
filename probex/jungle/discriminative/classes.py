"""The class pool every fine-tuned model draws from, the other 'thing' classes roots learn, and image banks."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..atlas import load_atlas
from ..root import augment

POOL_SEED = 2025


def class_split(pool_size: int = 20) -> tuple[list[dict], list[dict]]:
    """(pool, others): atlas class records of the fixed pool and of the remaining 'thing' classes, deterministic."""
    _, classes = load_atlas()
    things = [c for c in classes if c["subject"] == "thing"]
    order = np.random.default_rng(POOL_SEED).permutation(len(things))
    shuffled = [things[i] for i in order]
    return shuffled[:pool_size], shuffled[pool_size:]


def image_bank(classes: list[dict], per_class: int, seed: int) -> Tensor:
    """(C, per_class, 3, 32, 32) augmented views in [-1, 1] of each class's emoji, fixed by `seed`."""
    images, all_classes = load_atlas()
    row = {c["id"]: i for i, c in enumerate(all_classes)}
    rgba = torch.from_numpy(images[[row[c["id"]] for c in classes]])
    views = augment(rgba.repeat_interleave(per_class, 0), torch.Generator().manual_seed(seed))
    return views.view(len(classes), per_class, 3, 32, 32)
