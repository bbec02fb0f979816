"""StatNN (Unterthiner et al. 2020): seven statistics of each layer's weights, read by gradient-boosted trees
(classification) or an MLP (text alignment) — the weight-statistics baseline of the paper's tables."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from probex.errors import InputError
from probex.experts.base import Expert, LayerInput, dense_from_factors

QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
N_STATS = 2 + len(QUANTILES)


def weight_statistics(x: LayerInput, bias: Tensor | None = None, chunk: int = 64) -> Tensor:
    """(N, 7) mean, variance and 5 quantiles of each model's weights; (N, 14) with the biases' statistics too.

    For LoRAs the statistics are those of the product scale·B·A — the weight change the LoRA makes — which is
    formed here `chunk` models at a time (fine for the small layers StatNN is run on)."""
    n = x.shape[0] if isinstance(x, Tensor) else x[0].shape[0]
    rows = []
    for start in range(0, n, chunk):
        part = x[start:start + chunk] if isinstance(x, Tensor) else tuple(t[start:start + chunk] for t in x)
        rows.append(_seven_stats(dense_from_factors(part).flatten(1)))
    stats = torch.cat(rows)
    return torch.cat([stats, _seven_stats(bias.flatten(1))], 1) if bias is not None else stats


def _seven_stats(flat: Tensor) -> Tensor:
    q = torch.quantile(flat.double(), torch.tensor(QUANTILES, dtype=torch.float64), dim=1).T.float()
    return torch.cat([flat.mean(1, keepdim=True), flat.var(1, keepdim=True), q], 1)


class StatNNClassifier:
    """StatNN for classification: weight statistics → gradient-boosted trees (sklearn); one model per label for
    multilabel targets. Plain fit / predict_scores, like scikit-learn."""

    def __init__(self, task: str = "multiclass", seed: int = 0, max_iter: int = 200):
        from sklearn.ensemble import HistGradientBoostingClassifier
        from sklearn.multioutput import MultiOutputClassifier

        trees = HistGradientBoostingClassifier(max_iter=max_iter, random_state=seed)
        self.task = task
        self.model = MultiOutputClassifier(trees) if task == "multilabel" else trees

    def fit(self, features: Tensor | np.ndarray, y: Tensor | np.ndarray) -> "StatNNClassifier":
        self.model.fit(np.asarray(features), np.asarray(y))
        return self

    def predict_scores(self, features: Tensor | np.ndarray) -> np.ndarray:
        """(N, C) class probabilities (multiclass) or per-label probabilities of the positive label (multilabel)."""
        features = np.asarray(features)
        if self.task == "multilabel":
            return np.stack([p[:, 1] for p in self.model.predict_proba(features)], 1)
        return self.model.predict_proba(features)

    def predict(self, features: Tensor | np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict(np.asarray(features)))


class StatMLP(Expert):
    """StatNN's MLP variant for text alignment: standardised statistics (N, n_features) → MLP → r_T, align head.
    Its input is the precomputed `weight_statistics` table, so training never recomputes them."""

    def __init__(self, n_features: int, hidden: int = 256, r_t: int = 128, head: str = "align",
                 n_out: int | None = None, text_dim: int | None = None, temperature: float | None = None):
        super().__init__(r_t, head, n_out, text_dim, temperature)
        self.n_features, self.hidden, self.r_t = n_features, hidden, r_t
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.mlp = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, r_t))

    def fit_normaliser(self, features: Tensor) -> "StatMLP":
        """Statistics differ by orders of magnitude (variance vs mean): standardise with the training split's."""
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp_min(1e-12))
        return self

    def encode(self, features: Tensor) -> Tensor:
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise InputError(f"this expert reads {self.n_features} weight statistics per model, got {tuple(features.shape)}")
        return self.mlp((features - self.mean) / self.std)
