"""Training inputs: cached layers in memory (one, or several read together) and what to predict for them.

A layer cache (probex.zoo.LayerCache) holds one layer of every model of a zoo; ``LayerData`` is that layer in memory,
dense (N, d_W, d_H) or LoRA factors, and batches are slices of it — no DataLoader, no workers: the experts' forward is
the cost. ``Targets`` are the labels of one task (multiclass, multilabel or align) with the split indices.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from probex.errors import InputError
from probex.zoo import HOLDOUT, IN_DISTRIBUTION, LayerCache


@dataclass
class LayerData:
    """A cached layer in memory: dense (N, d_W, d_H) or LoRA factors, with each model's true rank."""
    x: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    rank: torch.Tensor | None = None

    @classmethod
    def from_cache(cls, cache: LayerCache, layer: str) -> "LayerData":
        t = cache.load(layer)
        if "up" in t:
            return cls((t["up"], t["down"], t["scale"]), t.get("rank"))
        return cls(t["weight"])

    def __len__(self) -> int:
        return len(self.x if isinstance(self.x, torch.Tensor) else self.x[0])

    @property
    def shape(self) -> tuple[int, int]:
        if isinstance(self.x, torch.Tensor):
            return tuple(self.x.shape[1:])
        up, down, _ = self.x
        return up.shape[1], down.shape[2]

    def take(self, idx: torch.Tensor):
        """The models at `idx`; LoRA padding trimmed to the largest rank among them (less work, same result)."""
        if isinstance(self.x, torch.Tensor):
            return self.x[idx]
        up, down, scale = self.x
        r = int(self.rank[idx].max()) if self.rank is not None and len(idx) else up.shape[2]
        return up[idx, :, :r], down[idx, :r], scale[idx]

    def encode(self, expert, idx: torch.Tensor) -> torch.Tensor:
        """Encodings of the models at `idx`, in that order. LoRAs are encoded one rank at a time, so a batch mixing
        rank 4 and rank 64 costs its true ranks, not 64 each (padding is exact, but it is not free)."""
        if self.rank is None or isinstance(self.x, torch.Tensor):
            return expert.encode(self.take(idx))
        ranks = self.rank[idx]
        groups = [torch.nonzero(ranks == r).flatten() for r in ranks.unique()]
        if len(groups) == 1:
            return expert.encode(self.take(idx))
        enc = torch.cat([expert.encode(self.take(idx[g])) for g in groups])
        return enc[torch.cat(groups).argsort()]   # back to the order of idx


@dataclass
class Targets:
    """Labels for one task. y: class index (N,) — into `classes` for in-distribution models and into
    `holdout_classes` for held-out ones — or multi-hot (N, C) for multilabel. split: index tensors per split."""
    task: str
    y: torch.Tensor
    split: dict[str, torch.Tensor]
    classes: list[str]
    holdout_classes: list[str] = field(default_factory=list)
    text: torch.Tensor | None = None          # (len(classes), text_dim), align only
    holdout_text: torch.Tensor | None = None  # (len(holdout_classes), text_dim)

    def text_for(self, split: str) -> torch.Tensor | None:
        return self.holdout_text if split in HOLDOUT else self.text

    def evaluated_splits(self) -> list[str]:
        """Held-out classes can only be scored by the align head (the others have no output for them)."""
        splits = ("train", *IN_DISTRIBUTION[1:], *(HOLDOUT if self.task == "align" else ()))
        return [s for s in splits if len(self.split.get(s, ())) > 0]


def task_targets(cache: LayerCache, task: str | None = None, text_embeddings: torch.Tensor | None = None) -> Targets:
    """Targets for `task` (default: the cache's own, multiclass or multilabel) from the cache's labels."""
    task = task or cache.task
    models, vocab = cache.models, cache.classes
    split = {s: cache.split_indices(s) for s in (*IN_DISTRIBUTION, *HOLDOUT)}
    if task == "multilabel":
        if cache.task != "multilabel":
            raise InputError("multilabel training needs a zoo whose models carry label lists (dataset_chosen_targets)")
        pos = {c["id"]: i for i, c in enumerate(vocab)}
        y = torch.zeros(len(models), len(vocab))
        for i, m in enumerate(models):
            y[i, [pos[t] for t in m["labels"]]] = 1
        return Targets(task, y, split, [c["id"] for c in vocab])
    if task not in ("multiclass", "align"):
        raise InputError(f"unknown task {task!r}: use multiclass, multilabel or align")
    if any("class_id" not in m for m in models):
        raise InputError(f"{task} training needs one class per model (class_id or imagenet_class_id metadata)")
    seen = [c for c in vocab if not c["holdout"]]
    held = [c for c in vocab if c["holdout"]]
    pos = {c["id"]: i for i, c in enumerate(seen)} | {c["id"]: i for i, c in enumerate(held)}
    y = torch.tensor([pos[m["class_id"]] for m in models])
    targets = Targets(task, y, split, [c["id"] for c in seen], [c["id"] for c in held])
    if task == "align":
        if text_embeddings is None or len(text_embeddings) != len(vocab):
            raise InputError(f"align training needs one text embedding per class ({len(vocab)} classes)")
        is_held = torch.tensor([c["holdout"] for c in vocab])
        targets.text, targets.holdout_text = text_embeddings[~is_held].float(), text_embeddings[is_held].float()
    return targets


class LayerStack:
    """Several cached layers of the same models, read together (what ``train.train_expert`` takes as data)."""

    def __init__(self, layers: list):
        self.layers = layers  # LayerData, one per read layer

    @classmethod
    def from_cache(cls, cache, names: list[str]) -> "LayerStack":
        return cls([LayerData.from_cache(cache, n) for n in names])

    def __len__(self) -> int:
        return len(self.layers[0])

    def take(self, idx: Tensor) -> list:
        return [layer.take(idx) for layer in self.layers]

    def encode(self, expert, idx: Tensor) -> Tensor:
        return expert.encode(self.take(idx))
