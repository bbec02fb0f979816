"""Metrics against hand-computed values and independent brute-force versions, then a whole expert evaluation."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from probex.errors import NoExpertError
from probex.evaluate import (evaluate_expert, knn_accuracy, one_class_auc, per_label_accuracy, precision_at_k,
                             router_accuracy, top1_accuracy, zero_shot_accuracy)
from probex.experts import ProbeX
from probex.train import TrainConfig, fit_expert
from probex.zoo import build_cache
from synthetic import make_lora_zoo


def test_accuracies_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.5, 3.0], [1.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    assert top1_accuracy(logits, torch.tensor([0, 2, 1, 1])) == 0.75
    multi = torch.tensor([[1.0, -1.0], [-2.0, -0.5]])
    assert per_label_accuracy(multi, torch.tensor([[1, 1], [0, 0]])) == 0.75


def test_zero_shot_uses_the_given_class_texts():
    torch.manual_seed(0)
    expert = ProbeX(4, 3, r_u=2, r_v=2, r_t=3, head="align", text_dim=3)
    x = torch.randn(6, 4, 3)
    text = torch.randn(2, 3)
    with torch.no_grad():
        labels = expert(x, text).argmax(1)
    assert zero_shot_accuracy(expert, x, labels, text) == 1.0
    assert zero_shot_accuracy(expert, x, 1 - labels, text) == 0.0


def clusters(n_per=6, seed=0, spread=0.05):
    g = np.random.default_rng(seed)
    centres = np.eye(3) * 3 + 0.5
    enc = np.concatenate([c + spread * g.standard_normal((n_per, 3)) for c in centres])
    return enc, np.repeat(np.arange(3), n_per)


def test_knn_on_clusters_and_on_scrambled_labels():
    enc, y = clusters()
    assert knn_accuracy(enc[::2], y[::2], enc[1::2], y[1::2], k=3) == 1.0
    scrambled = np.roll(y[::2], 1)           # neighbours now vote for the wrong classes
    assert knn_accuracy(enc[::2], scrambled, enc[1::2], y[1::2], k=1) < 0.5


def test_precision_at_k_excludes_the_query_itself():
    enc = np.array([[1, 0], [1, 0.01], [1, 0.02], [0, 1], [0.01, 1], [0.02, 1]], dtype=float)
    y = np.array([0, 0, 0, 1, 1, 1])
    assert precision_at_k(enc, y, k=2) == 1.0
    assert precision_at_k(enc, y, k=3) == pytest.approx(2 / 3)
    assert precision_at_k(enc, y, enc[:1], y[:1], k=3) == 1.0   # external query: itself counts


def brute_force_auc(ref, ref_y, test, test_y, k):
    """The same definition, written plainly: cosine distances, k nearest, Mann–Whitney pair counting."""
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    aucs = []
    for c in np.unique(ref_y):
        d = 1 - unit(test) @ unit(ref[ref_y == c]).T
        score = np.sort(d, axis=1)[:, :k].mean(1)
        anomalous, normal = score[test_y != c], score[test_y == c]
        pairs = (anomalous[:, None] > normal[None]).sum() + 0.5 * (anomalous[:, None] == normal[None]).sum()
        aucs.append(pairs / (len(anomalous) * len(normal)))
    return np.mean(aucs)


def test_one_class_auc_matches_brute_force():
    g = np.random.default_rng(1)
    ref, test = g.standard_normal((30, 5)), g.standard_normal((40, 5))
    ref_y, test_y = np.arange(30) % 3, np.arange(40) % 3
    ref += ref_y[:, None] * 0.7   # some class structure so AUCs differ from ½
    test += test_y[:, None] * 0.7
    got = one_class_auc(ref, ref_y, test, test_y, k=4)
    assert got["auc"] == pytest.approx(brute_force_auc(ref, ref_y, test, test_y, 4))
    assert set(got["per_class"]) == {0, 1, 2}
    enc, y = clusters()
    assert one_class_auc(enc[::2], y[::2], enc[1::2], y[1::2], k=2)["auc"] == 1.0


def test_router_accuracy_counts_refusals_for_foreign_models():
    class FakeRouter:
        def route(self, w):
            if w == "alien":
                raise NoExpertError("no tree expert for alien")
            return SimpleNamespace(tree=w[0])

    models = ["a1", "a2", "b1", "alien"]
    assert router_accuracy(FakeRouter(), models, ["a", "a", "b", None]) == 1.0
    assert router_accuracy(FakeRouter(), models, ["a", "b", "b", "a"]) == 0.5


def test_evaluate_expert_reports_every_metric(tmp_path):
    layer = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
    zoo = make_lora_zoo(tmp_path / "zoo", n_classes=12, per_class=6, layers={layer: (24, 16)}, ranks=(2, 4),
                        holdout_classes=4, holdout_per_class=6, text_dim=6, signal=0.8, seed=3)
    cache = build_cache(zoo.root, tmp_path / "cache")
    config = TrainConfig.of(epochs=30, batch_size=32, lr=1e-2, r_u=16, r_v=16, r_t=16)
    fit = fit_expert(cache, layer, "align", zoo.text_embeddings, config)
    report = evaluate_expert(fit.expert, cache, layer, text_embeddings=zoo.text_embeddings, k=3)
    assert report["task"] == "align" and report["n_models"]["test_holdout"] == 12
    assert report["top1_test"] == pytest.approx(fit.metrics["test"])
    assert report["zero_shot_test_holdout"] == pytest.approx(fit.metrics["test_holdout"])
    assert report["zero_shot_test_holdout"] > 0.5          # 4 held-out classes: chance 0.25
    assert report["knn3_test"] > 0.7 and report["precision@3_test"] > 0.6
    assert report["occ_auc3_holdout"] > 0.8
    multiclass = fit_expert(cache, layer, "multiclass", config=config)
    plain = evaluate_expert(multiclass.expert, cache, layer)
    assert "zero_shot_test_holdout" not in plain and plain["top1_test"] == pytest.approx(multiclass.metrics["test"])
