"""Training many classifiers of one architecture at once.

Speed. ``train_models`` trains G classifiers at once: their weights are stacked and one forward runs them all
(torch.func.vmap over functional_call; convolutions become one grouped convolution). Each model's loss is its own
batch mean and the losses are summed, so each model gets exactly its own gradient, and Adam is elementwise: G
independent trainings, equal to one at a time up to float rounding (tests/test_discriminative.py). The gain is
measured at build time for each architecture (``grouping_speed``, best of 3) and written to build.json (figures:
docs/RESULTS.md). The work is small products either way: the gain is per-call overhead, so it shrinks as per-model
batches grow.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .models import ARCHITECTURES, initial_state


@dataclass(frozen=True)
class Recipe:
    """How one model is trained: Adam, a fixed number of epochs over a fixed image set."""
    lr: float = 1e-3
    epochs: int = 4
    batch_size: int = 16
    weight_decay: float = 0.0


@dataclass(frozen=True)
class RecipeSpace:
    """Per-model hyperparameters, drawn uniformly from these values (real populations are not trained alike)."""
    lrs: tuple[float, ...] = (5e-4, 1e-3, 2e-3)
    epochs: tuple[int, ...] = (3, 4, 6)
    batch_size: int = 16

    def sample(self, rng: np.random.Generator) -> Recipe:
        return Recipe(lr=float(rng.choice(self.lrs)), epochs=int(rng.choice(self.epochs)), batch_size=self.batch_size)


def batch_orders(seeds: list[int], n_images: int, recipe: Recipe) -> Tensor:
    """(steps, G, batch) image indices: each model shuffles its own images every epoch with its own seed."""
    per_epoch = n_images // recipe.batch_size
    orders = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        epochs = [torch.randperm(n_images, generator=g)[: per_epoch * recipe.batch_size] for _ in range(recipe.epochs)]
        orders.append(torch.cat(epochs).view(-1, recipe.batch_size))
    return torch.stack(orders, 1)


def stacked_forward(template: nn.Module):
    """f(params stacked over G models, x (G, B, …)) → (G, B, n_out): every model on its own batch, one call."""
    return vmap(lambda params, x: functional_call(template, params, (x,)))


def train_models(arch: str, inits: list[dict[str, Tensor]], images: Tensor, image_ids: Tensor, labels: Tensor,
                 seeds: list[int], recipe: Recipe) -> list[dict[str, Tensor]]:
    """Train len(inits) classifiers of `arch` together; model g starts from inits[g] and trains on
    images[image_ids[g]] with labels[g] (the same count for every model), shuffled by seeds[g]."""
    n_models = len(inits)
    params = {k: torch.stack([s[k] for s in inits]).requires_grad_() for k in inits[0]}
    optimizer = torch.optim.Adam(params.values(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    forward = stacked_forward(ARCHITECTURES[arch](1))  # shapes come from `params`; the template gives forward()
    rows = torch.arange(n_models)[:, None]
    for idx in batch_orders(seeds, image_ids.shape[1], recipe):
        logits = forward(params, images[image_ids[rows, idx]])
        loss_each = F.cross_entropy(logits.flatten(0, 1), labels[rows, idx].flatten(), reduction="none")
        optimizer.zero_grad(set_to_none=True)
        loss_each.view(n_models, -1).mean(1).sum().backward()  # model g's gradient = that of its own mean loss
        optimizer.step()
    return [{k: v[g].detach().clone() for k, v in params.items()} for g in range(n_models)]


@torch.no_grad()
def accuracy(arch: str, states: list[dict[str, Tensor]], images: Tensor, image_ids: Tensor,
             labels: Tensor) -> list[float]:
    """Each model's top-1 accuracy on its own images (images[image_ids[g]], labels[g])."""
    params = {k: torch.stack([s[k] for s in states]) for k in states[0]}
    logits = stacked_forward(ARCHITECTURES[arch](1))(params, images[image_ids])
    return (logits.argmax(-1) == labels).float().mean(1).tolist()


def grouping_speed(arch: str, recipe: Recipe, group: int, steps: int = 8, repeats: int = 3) -> dict:
    """Milliseconds per model-step training `group` models at once vs the same models one at a time (random data).
    Best of `repeats` runs each, alternating, since other jobs share the cores."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(group * recipe.batch_size * steps, 3, 32, 32, generator=g) * 2 - 1
    ids = torch.arange(len(images)).view(group, -1)
    labels = torch.randint(0, 10, ids.shape, generator=g)
    inits = [initial_state(arch, 10, s) for s in range(group)]
    one_epoch = replace(recipe, epochs=1)

    def together():
        train_models(arch, inits, images, ids, labels, list(range(group)), one_epoch)

    def one_at_a_time():
        for i in range(group):
            train_models(arch, inits[i:i + 1], images, ids[i:i + 1], labels[i:i + 1], [i], one_epoch)

    best = {together: float("inf"), one_at_a_time: float("inf")}
    for _ in range(repeats):
        for run in best:
            start = time.perf_counter()
            run()
            best[run] = min(best[run], time.perf_counter() - start)
    per_step = 1000 / (group * steps)
    return {"arch": arch, "group": group, "batch_size": recipe.batch_size,
            "grouped_ms_per_model_step": round(best[together] * per_step, 3),
            "single_ms_per_model_step": round(best[one_at_a_time] * per_step, 3),
            "speedup": round(best[one_at_a_time] / best[together], 2)}
