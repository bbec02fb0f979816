"""A tree's gallery: its known models in the expert's representation, how uploads and texts are scored against them,
and the 2-D map they are drawn on.

Scoring. Concepts: an encoding's cosine to each class's anchor (the mean of its train models, else its caption's text
feature), z-normed per anchor over the known train models, so anchors near many models and anchors far from all of
them compare fairly. Search: a text feature's cosine to each model, z-normed per model over the vocabulary's captions,
so models that sit close to every caption (hubs) do not top every search.

The map. Gallery encodings get 2-D coordinates once, at build time: UMAP (umap-learn, cosine, fixed seed) — or PCA
for galleries too small for UMAP (``layout["method"]`` says which). New points (an upload, a text query) are placed
WITHOUT refitting — UMAP's `transform` would need the fitted object, which only pickles — as the average of their k
nearest gallery models' coordinates (cosine), weighted by 1 / cosine distance: a point on top of a known model lands
on it, a point between two clusters lands between them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

PLACE_K = 5
MIN_UMAP_MODELS = 10  # below this UMAP's neighbour graph is degenerate: PCA lays the gallery out instead
MIN_OFFSET_MODELS = 10  # val and val_holdout models each needed to set the open-set offset (fewer: noise, offset 0)


def class_means(encodings: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit mean of each class's unit encodings (C, r_T), and which classes have any models (C,) bool."""
    e = F.normalize(encodings.float(), dim=-1)
    sums = torch.zeros(n_classes, e.shape[1]).index_add_(0, y, e)
    return F.normalize(sums, dim=-1), torch.bincount(y, minlength=n_classes) > 0


@dataclass
class Gallery:
    """A tree's known models in its expert's representation, and the class text bank."""
    ids: list[str]
    model_classes: list            # per model: its class name, or its label list (multilabel trees)
    splits: list[str]
    vocabulary: list[str]          # class names: the rows of text_emb and the outputs of a classifier head
    encodings: torch.Tensor        # (N, r_T)
    coords: torch.Tensor           # (N, 2) map coordinates, laid out by layout["method"] (UMAP or PCA)
    text_emb: torch.Tensor         # (C, text_dim) embeddings of the vocabulary's prompts
    vocabulary_ids: list[str] = field(default_factory=list)  # atlas / zoo ids of the vocabulary classes
    vocabulary_keywords: list[list[str]] = field(default_factory=list)  # per class: words people search it by
    sample_paths: dict[str, str] = field(default_factory=dict)   # model id → LoRA file (absolute once loaded)
    layout: dict = field(default_factory=lambda: {"method": "umap", "seed": 0, "place_k": PLACE_K})
    _unit: tuple | None = field(default=None, init=False, repr=False, compare=False)  # unit_encodings' cache

    def place(self, encodings: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """(M, 2) map positions of new encodings: 1/cosine-distance weighted mean of the k nearest models' points."""
        k = min(k or self.layout.get("place_k", PLACE_K), len(self.ids))
        cos = F.normalize(encodings.float(), dim=-1) @ self.unit_encodings.T
        sim, idx = cos.topk(k, dim=1)
        weights = 1.0 / (1.0 - sim).clamp_min(1e-6)
        return (weights[..., None] * self.coords[idx]).sum(1) / weights.sum(1, keepdim=True)

    def class_anchors(self, text_features: torch.Tensor) -> torch.Tensor:
        """(C, r_T) unit vectors, one per vocabulary class, that concepts are scored against: the mean encoding of
        the class's known train-split models where it has any, else its text feature (held-out classes, free text).
        Both estimate where the class's LoRAs lie; on the emoji pilot the class mean reads in-distribution far
        better than text does (bench/jungle_signal.py). Multilabel trees keep their text features."""
        known = [i for i, s in enumerate(self.splits) if s == "train" and isinstance(self.model_classes[i], str)]
        if not known:
            return text_features
        row = {name: c for c, name in enumerate(self.vocabulary)}
        y = torch.tensor([row[self.model_classes[i]] for i in known])
        means, has = class_means(self.encodings[known], y, len(self.vocabulary))
        return torch.where(has[:, None], means, text_features)

    def calibration(self, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Z-norm of concept scores: each anchor's mean and standard deviation of cosine over the tree's known train
        models, (C,) each. Raw cosines are not comparable across anchors: a class mean lies among LoRAs, a caption's
        text feature farther from all of them, so by raw cosine a LoRA of a class without known models almost never
        has its class first (``bench/paper_tables.py`` prints both: see the README). Without two train models:
        (0, 1), raw cosine."""
        known = [i for i, s in enumerate(self.splits) if s == "train"]
        if len(known) < 2:
            return torch.zeros(len(anchors)), torch.ones(len(anchors))
        cos = self.unit_encodings[known] @ F.normalize(anchors, dim=-1).T
        return cos.mean(0), cos.std(0).clamp_min(1e-6)

    def concept_scores(self, encodings: torch.Tensor, anchors: torch.Tensor,
                       calibration: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """(N, C) concept scores of encodings against the class anchors: cosine, z-normed per anchor
        (``calibration``, computed here when not given) — how far above its usual score on known models."""
        mean, std = calibration if calibration is not None else self.calibration(anchors)
        return (F.normalize(encodings.float(), dim=-1) @ F.normalize(anchors, dim=-1).T - mean) / std

    @property
    def unit_encodings(self) -> torch.Tensor:
        """(N, r_T) the encodings at unit norm, computed once for the encodings held: every cosine to the known models
        starts here."""
        if self._unit is None or self._unit[0] is not self.encodings:
            self._unit = (self.encodings, F.normalize(self.encodings.float(), dim=-1))
        return self._unit[1]

    @cached_property
    def known_classes(self) -> torch.Tensor:
        """(C,) bool: the vocabulary classes with train-split models here (their anchors are class means); computed
        once (a gallery is not changed after it is built)."""
        known = torch.zeros(len(self.vocabulary), dtype=torch.bool)
        row = {name: c for c, name in enumerate(self.vocabulary)}
        known[[row[c] for c, s in zip(self.model_classes, self.splits) if s == "train" and isinstance(c, str)]] = True
        return known

    def unseen_offset(self, scores: torch.Tensor) -> float:
        """What the open-set concept list adds to the scores of classes without known models (held-out or new), so
        that it reads known and unseen classes equally well: the offset, on a grid of 0.05, that maximises the mean
        of top-1 on the tree's val models (known classes) and on its val_holdout models (unseen), nearest 0 among
        equals. ``scores``: ``concept_scores`` of every gallery model. 0 with fewer than MIN_OFFSET_MODELS of either kind.

        A known class's mean sits among its LoRAs while an unseen class has only its caption's text feature, so
        without an offset a LoRA of an unseen class nearly always has some known class first."""
        row = {name: c for c, name in enumerate(self.vocabulary)}
        groups = [[i for i, s in enumerate(self.splits) if s == split and isinstance(self.model_classes[i], str)]
                  for split in ("val", "val_holdout")]
        known = self.known_classes
        if min(map(len, groups)) < MIN_OFFSET_MODELS or known.all() or not known.any():
            return 0.0
        offsets = torch.arange(-60, 121) * 0.05
        reads = []
        for group in groups:
            z, y = scores[group], torch.tensor([row[self.model_classes[i]] for i in group])
            best_known, best_unseen = z.masked_fill(~known, -torch.inf).max(1), z.masked_fill(known, -torch.inf).max(1)
            unseen_first = best_unseen.values[None] + offsets[:, None] > best_known.values[None]   # (offsets, N)
            named = torch.where(unseen_first, best_unseen.indices[None], best_known.indices[None])
            reads.append((named == y[None]).float().mean(1))
        balanced = (reads[0] + reads[1]) / 2
        best = torch.nonzero(balanced == balanced.max()).flatten()
        return round(float(offsets[best[offsets[best].abs().argmin()]]), 2)

    def open_set_scores(self, scores: torch.Tensor, offset: float) -> torch.Tensor:
        """Concept scores with ``offset`` added to the classes without known models (``unseen_offset``)."""
        return scores + offset * (~self.known_classes).float()

    def model_calibration(self, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Z-norm of text search, the other way round: each gallery model's mean and standard deviation of cosine
        over the class vocabulary's text features, (N,) each. Some models sit close to every caption (hubs) and by
        raw cosine would top most searches; a model is found for a text that it matches more than its usual."""
        if not len(self.encodings):
            return torch.zeros(0), torch.ones(0)
        cos = self.unit_encodings @ F.normalize(text_features, dim=-1).T
        return cos.mean(1), cos.std(1).clamp_min(1e-6)

    def search_scores(self, queries: torch.Tensor, calibration: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(Q, N) text search scores of query text features against every gallery model (``model_calibration``)."""
        mean, std = calibration
        return (F.normalize(queries.float(), dim=-1) @ self.unit_encodings.T - mean) / std

    def nearest(self, encoding: torch.Tensor, k: int = 5) -> list[tuple[int, float]]:
        """(gallery index, cosine) of the k known models closest to one encoding."""
        cos = self.unit_encodings @ F.normalize(encoding.float(), dim=-1)
        sim, idx = cos.topk(min(k, len(self.ids)))
        return list(zip(idx.tolist(), sim.tolist()))


def layout_2d(encodings: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, str]:
    """2-D coordinates of the gallery: UMAP on cosine distance with a fixed seed, or PCA for tiny galleries."""
    x = F.normalize(encodings.float(), dim=-1).numpy()
    if len(x) >= MIN_UMAP_MODELS:
        import umap  # slow to import (numba): only when a bundle is built

        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(x) - 1), metric="cosine", random_state=seed,
                            n_jobs=1)
        return torch.from_numpy(reducer.fit_transform(x).astype(np.float32)), "umap"
    from sklearn.decomposition import PCA

    coords = PCA(n_components=min(2, len(x)), random_state=seed).fit_transform(x) if len(x) > 1 else np.zeros((1, 1))
    return torch.from_numpy(np.pad(coords, ((0, 0), (0, 2 - coords.shape[1]))).astype(np.float32)), "pca"
